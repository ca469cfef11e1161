"""The `hooked-av` command: `demo` (the main job, on the embedded toy model), `flow` (the same
knockout analysis on any supported model and clip), `study` (experiments over a dataset manifest),
`harvest` (activations over a dataset manifest, for SAEs), `sae train` (an SAE on a harvested store),
`sae view` (an SAE's features with their media) and `toy-data` (the toy task as files and a manifest). A
user mistake prints one `error: ...` line
and exits with status 2; anything else (a bug) keeps its traceback."""

from __future__ import annotations

import argparse
import sys

from patching.apps.features_page import register as register_view
from patching.apps.harvest import register as register_harvest
from patching.apps.sae_train import register as register_sae
from patching.apps.study.cli import register as register_study


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hooked-av", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="information flow in the embedded toy model, as an HTML report")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--samples", type=int, default=200, help="held-out samples for accuracy and discarding")
    demo.add_argument("--flow-samples", type=int, default=16, help="samples per question kind for the knockout sweep")
    demo.add_argument("--window", type=int, default=None,
                      help="knockout window in layers (default: the library's rule, a quarter of the depth: 2 for toy-flow's 8 layers)")
    demo.add_argument("--seed", type=int, default=2024)
    demo.add_argument("--feature-rows", type=int, default=1500,
                      help="toy rows written for the feature level (about 0.6 x as many distinct clips; the SAE's data)")
    demo.add_argument("--feature-steps", type=int, default=1500, help="SAE training steps of 256 tokens")

    flow = sub.add_parser("flow", help="attention-knockout flow analysis of one clip on any supported model")
    flow.add_argument("--model", required=True, help='hub id, local checkpoint folder, or a shipped toy ("toy", "toy-flow")')
    flow.add_argument("--video", help="video file (its audio track is used when it has one)")
    flow.add_argument("--audio", help="separate audio file")
    flow.add_argument("--question", required=True)
    flow.add_argument("--answer", required=True, help="the expected answer; its first token is scored")
    flow.add_argument("--window", type=int, default=None,
                      help="knockout window in layers (default: 9 for models of 18 layers or more, a quarter of the depth below)")
    flow.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    flow.add_argument("--device", default=None, help='e.g. "cuda" (default: CPU)')
    flow.add_argument("--out", default="runs/flow")
    register_study(sub)  # study, toy-data: each sets args.func
    register_harvest(sub)
    sae = sub.add_parser("sae", help="sparse autoencoders on harvested activations: train one, view its features")
    sae_commands = sae.add_subparsers(dest="sae_command", required=True)
    register_sae(sae_commands)  # sae train
    register_view(sae_commands)  # sae view

    args = ap.parse_args(argv)
    try:
        if hasattr(args, "func"):
            args.func(args)
        elif args.command == "demo":
            from patching.apps.demo import run_demo

            run_demo(args.out, n_eval=args.samples, n_flow=args.flow_samples, window=args.window, seed=args.seed,
                     n_features=args.feature_rows, feature_steps=args.feature_steps)
        else:
            from patching.apps.flow import run_flow

            run_flow(args.model, args.video, args.question, args.answer, audio=args.audio, window=args.window,
                     out_dir=args.out, dtype=args.dtype, device=args.device)
    except (ValueError, OSError) as e:  # a user mistake (path, file, value): the message says what to do
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
