"""The `hooked-av study` and `hooked-av toy-data` subcommands, registered on `patching.apps.cli`'s parser.

    hooked-av toy-data data/toy --n 200
    hooked-av study --model toy --manifest data/toy/manifest.jsonl --experiment knockout \\
        --experiment discarding --out runs/toy --window 1 [--limit N] [--template mc] [--device cuda --dtype bfloat16]
        [--option knockout.window_style=inverse --option sinks.tau=3 --options options.json] [--plan [--memory GIB]]
    torchrun --nproc_per_node 4 --no-python hooked-av study ...        # data-parallel, one rank per GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    """Add `study` and `toy-data` to the subparsers of `hooked-av` (each sets `func`)."""
    from patching.datasets.scoring import RULES
    from patching.engine.experiment import names

    st = sub.add_parser("study", help="run experiments over a dataset manifest (resumable, torchrun-parallel) and write a report")
    st.add_argument("--model", required=True, help='hub id, local checkpoint folder, or a shipped toy ("toy", "toy-flow")')
    st.add_argument("--manifest", required=True, help="JSONL or CSV manifest (see patching.datasets.manifest)")
    st.add_argument("--experiment", action="append", choices=names(study=True), default=None,
                    help="an experiment to run; repeat for several (accuracy is always written)")
    st.add_argument("--out", required=True, help="output folder (running again resumes it)")
    st.add_argument("--limit", type=int, default=None, help="only the first N samples")
    st.add_argument("--template", default="default", help='"default", "mc" or a custom text with {question} (and {options})')
    st.add_argument("--scoring", default="first_token", choices=RULES)
    st.add_argument("--window", type=_window, default=None,
                    help="knockout window in layers (default: the papers' 9 for centred and inverse windows in models of 18 layers "
                         "or more, a quarter of the depth below; top-down and bottom-up take none)")
    st.add_argument("--option", action="append", default=[], metavar="EXPERIMENT.NAME=VALUE",
                    help="an experiment's option, e.g. knockout.window_style=inverse or causal_tracing.tokens='[\"sink(video)\"]' "
                         "(VALUE read as JSON, else as text); repeat for several")
    st.add_argument("--options", default=None, metavar="FILE",
                    help='a JSON file {"experiment": {"name": value}}; --option entries are applied on top')
    st.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    st.add_argument("--device", default=None, help='e.g. "cuda" (default: CPU); under torchrun each rank takes cuda:LOCAL_RANK')
    st.add_argument("--no-report", action="store_true", help="skip the HTML report")
    st.add_argument("--plan", action="store_true",
                    help="print what the study will cost (tokens, forwards per sample per experiment, memory per device, "
                         "time) from the config and the media, without loading weights, and stop; refuses a plan that "
                         "does not fit the device")
    st.add_argument("--memory", type=float, default=None, metavar="GIB",
                    help="each device's memory for the plan's check (default: what the device reports free)")
    st.set_defaults(func=run_study_command)

    td = sub.add_parser("toy-data", help="write the toy task as media files and a manifest")
    td.add_argument("dir", help="output folder (manifest.jsonl and clips/)")
    td.add_argument("--n", type=int, default=200, help="number of samples")
    td.add_argument("--seed", type=int, default=0)
    td.set_defaults(func=toy_data_command)


def run_study_command(args: argparse.Namespace) -> None:
    import os

    from patching.apps.study.runner import run_study

    if args.plan:
        from patching.apps.study.plan import plan_study

        plan = plan_study(args.model, args.manifest, args.experiment or ["accuracy"], limit=args.limit,
                          template=args.template, window=args.window, options=parse_options(args.option, args.options),
                          device=args.device, dtype=args.dtype, memory=args.memory, progress=True)
        print(plan.text())
        plan.check_fits()
        return
    try:
        out = run_study(args.model, args.manifest, args.experiment or ["accuracy"], args.out, limit=args.limit,
                        template=args.template, scoring=args.scoring, window=args.window, device=args.device, dtype=args.dtype,
                        options=parse_options(args.option, args.options))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the samples finished so far are kept in {args.out}; run the same command again to resume")
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", 0)) == 0 and not args.no_report:
        from patching.apps.study.report import write_report

        print(f"report: {write_report(out).resolve()}")


def _window(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def parse_options(entries: list[str], path: str | None = None) -> dict:
    """`{"experiment": {"name": value}}` from a JSON file and `experiment.name=value` entries (the
    value read as JSON when it parses, else as text; later entries win)."""
    options: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"--options {path}: no such file")
        try:
            options = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--options {path} is not JSON ({e})") from None
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError(f'--options {path} must hold {{"experiment": {{"name": value}}}}')
    for entry in entries:
        key, eq, text = entry.partition("=")
        exp, dot, name = key.partition(".")
        if not (eq and dot and exp and name):
            raise ValueError(f"--option {entry!r}: write EXPERIMENT.NAME=VALUE, e.g. knockout.window_style=inverse")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options.setdefault(exp, {})[name] = value
    return options


def toy_data_command(args: argparse.Namespace) -> None:
    from hooked_av.toy.dataset import write_toy_dataset

    print(f"manifest: {write_toy_dataset(args.dir, args.n, seed=args.seed)}")
