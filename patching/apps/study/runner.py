"""The study runner: every sample of a manifest through the chosen experiments, results streamed to
parquet as each sample finishes, resumable, and data-parallel under torchrun.

    run_study("toy", "data/toy/manifest.jsonl", ["knockout", "discarding"], "runs/study", window=1)

Per sample: media decoded (`model.prepare` on the template's Prompt), the towers run once
(`model.encode`), the answer scored (`scoring.Scorer`), then each experiment (its registry record's `run`,
`patching.engine.experiment`) is called
once with the encoded inputs and the sample's TokenMap, so every cell reuses the towers' output. Each experiment's
rows (the library's own columns, unchanged: `correct` is the experiment's, e.g. discarding's accuracy
per cell) gain the sample's `id`, its metadata columns and `sample_correct` (the sample answered
correctly by the scoring rule, the subset the papers average over).

Files in `out_dir`: `settings.json` (what decides the results, and the versions); `parts/<experiment>/
<row>-<id hash>.parquet`, one per sample, written atomically (a crash loses at most the sample in
flight; the accuracy part is written last and marks the sample done); after the run,
`<experiment>.parquet`, the parts merged in manifest order. Running again skips done samples; a run
with other settings into the same folder is refused. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in
the environment) rank r takes rows r, r + W, ...; the ranks meet at a barrier (gloo on CPU, nccl on
CUDA) before rank 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from patching.datasets.manifest import Manifest, Row, read_manifest
from patching.datasets.scoring import Scorer
from patching.datasets.templates import parse_template
from patching.engine import checks
from patching.engine.experiment import StudySample, check_options, get, study_experiments

# measured wall times (discarding, FastV) differ from run to run; every other column is a function of the inputs
TIMING_COLUMNS = ("seconds", "seconds_full", "time_saved", "gen_seconds", "gen_time_saved")


def run_study(
    model,
    manifest,
    experiments=("accuracy",),
    out_dir="runs/study",
    *,
    limit: int | None = None,
    template="default",
    scoring: str = "first_token",
    window: int | None = None,
    options: dict | None = None,
    device=None,
    dtype="float32",
    progress: bool = True,
) -> Path:
    """Run (or resume) a study into `out_dir` and return it. `model`: a name for `hooked_av.load`
    ("toy", a hub id, a folder) or a loaded model; `manifest`: a path or a `Manifest`;
    `experiments`: names of registered experiments a study can run (`patching.engine.experiment.names(study=True)`; accuracy is always written: every result needs each
    sample's correctness); `limit`: the first N samples; `template`: "default", "mc" or a custom
    text; `scoring`: a `scoring.RULES` rule; `window`: the knockout window in layers (None: the
    library's, 9 for centred and inverse windows as the papers', none for top-down / bottom-up);
    `options`: keyword arguments per experiment, e.g. `{"discarding": {"repeats": 1}, "knockout":
    {"window_style": "inverse"}}` (each record's `option_names()` says which it takes; unknown ones
    are refused before the model loads).

        out = run_study(model, manifest, ["knockout"], tmp / "study", window=1, options={"knockout": {"centres": [1]}},
                        progress=False)
        Study(out).frame("knockout")[["id", "edge", "layer", "rel_change", "sample_correct"]]
    """
    experiments = _experiments(experiments)
    if window is not None:
        checks.count(window, "window", unit=" layer")
    options = json.loads(json.dumps(check_options(options, experiments, window)))
    if limit is not None:
        checks.count(limit, "limit", unit=" sample")
    from hooked_av.utils import as_device, as_dtype

    dtype_ = as_dtype(dtype)
    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    tpl = parse_template(template)
    scorer = Scorer(scoring)
    rows = manifest.rows[:limit]
    tpl.check(rows)
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = as_device(f"cuda:{local}" if device == "cuda" and world > 1 else device)
    name = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    settings = dict(model=str(name), dtype=str(dtype_ or "checkpoint").removeprefix("torch."), device_type=dev.type,
                    manifest=manifest.sha256, experiments=experiments, template=tpl.settings(), scoring=scorer.settings(),
                    window=window, options=options, versions=_versions())
    out = Path(out_dir)
    _claim(out, settings, dict(manifest_path=str(manifest.path.resolve()), limit=limit))
    done = {p.name for p in (out / "parts" / "accuracy").glob("*.parquet")}
    beyond = sorted(done - {part_name(r) for r in rows})
    if beyond:  # the folder's results would hold them: a smaller --limit cannot take them out
        raise ValueError(f"{out} already holds {len(beyond)} finished sample(s) beyond this run's first {len(rows)} "
                         f"(e.g. {beyond[0].removesuffix('.parquet')}); a smaller limit cannot remove them: use another "
                         "--out folder, or a limit of at least what the folder holds")

    if isinstance(model, (str, os.PathLike)):
        from hooked_av import load
        from patching.apps.study.plan import plan_study

        # what the first sample will cost, from the config alone: a study that cannot fit is refused before loading
        first = plan_study(model, manifest, experiments, limit=1, template=template, window=window, options=options,
                           device=dev, dtype=dtype, measure=False)
        if progress and rank == 0:
            print(first.text().replace("1 sample(s)", f"the first of {len(rows)} sample(s)"), flush=True)
        first.check_fits()
        model = load(model, dtype=dtype_ or torch.float32, device=dev)
    model.eval()
    scorer.check(model.tokenizer, rows)
    group = _process_group(world, dev)
    mine = rows[rank::world]
    todo = [r for r in mine if part_name(r) not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="sample", desc="study",
               disable=not progress or rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    for row in todo:
        for exp, df in run_sample(model, row, tpl, scorer, experiments, window, options, manifest.meta_columns, dev):
            if len(df) or exp == "accuracy":  # accuracy comes last: its part marks the sample done
                write_part(out, exp, row, df)
        bar.update()
    bar.close()
    _log_rank(out, rank, world, [r.id for r in todo], time.perf_counter() - t0)
    if group:
        torch.distributed.barrier()
    if rank == 0:
        merge(out, experiments)
    if group:
        torch.distributed.barrier()  # no rank returns before the merged files exist
        if group == "created":
            torch.distributed.destroy_process_group()
    return out


def run_sample(model, row: Row, tpl, scorer: Scorer, experiments, window, options, meta_columns, device) -> dict:
    """Yields `(experiment, rows)` for one sample as each experiment finishes, accuracy last."""
    from patching.engine.sweep import encode

    inputs = model.prepare(tpl.prompt(row))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tm = model.token_map(inputs)
    enc = encode(model, inputs)  # the towers, once for every experiment of this sample
    with torch.no_grad():
        last = model(**enc, logits_at="last")[0, -1]
    s = scorer.score(model, enc, last, row)
    front = {"id": row.id, **{c: row.meta.get(c) for c in meta_columns}, "sample_correct": s.correct}
    x = StudySample(model, inputs, enc, tm, s.answer_token, window)
    acc = pd.DataFrame([{**front, "prediction": s.prediction, "answer_text": row.answer_text, "answer_token": s.answer_token,
                         "p_answer": s.p_answer, "rule": scorer.rule}])
    for exp in experiments:
        if exp == "accuracy":
            continue
        df = get(exp).run(x, dict(options.get(exp, {})))
        clash = [c for c in front if c in df.columns]
        if clash:
            raise ValueError(f"metadata column(s) {clash} have the names of {exp} result columns; rename them in the manifest")
        df = df.drop(columns=["sample"], errors="ignore")
        for c in reversed(list(front)):
            df.insert(0, c, [front[c]] * len(df))
        yield exp, df.reset_index(drop=True)
    yield "accuracy", acc


# ---- files ------------------------------------------------------------------------------------
def part_name(row: Row) -> str:
    """`<manifest row>-<id hash>.parquet`: sorts in manifest order; the id may hold any character."""
    return f"{row.index:08d}-{hashlib.sha1(row.id.encode()).hexdigest()[:10]}.parquet"


def write_part(out: Path, exp: str, row: Row, df: pd.DataFrame) -> Path:
    folder = out / "parts" / exp
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / part_name(row)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)  # atomic: a reader or a resumed run never sees half a part
    return path


def read_parts(out: Path, exp: str) -> pd.DataFrame | None:
    """The parts of `exp` merged in manifest order (None when there are none)."""
    files = sorted((Path(out) / "parts" / exp).glob("*.parquet"))
    if not files:
        return None
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def merge(out: Path, experiments) -> None:
    for exp in experiments:
        df = read_parts(out, exp)
        if df is None:
            continue
        tmp = out / f".{exp}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, out / f"{exp}.parquet")


def _claim(out: Path, settings: dict, info: dict) -> None:
    """Write `settings.json`, or refuse when the folder holds a run with other settings."""
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        theirs = {k: v for k, v in old.items() if k != "run"}
        if theirs != json.loads(json.dumps(settings)):
            diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != json.loads(json.dumps(settings.get(k))))
            raise ValueError(f"{out} holds a study with other settings ({', '.join(diff)} differ: "
                             f"{ {k: theirs.get(k) for k in diff} } there, { {k: settings.get(k) for k in diff} } now); "
                             "use another --out folder, or the same settings to resume")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".settings.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**settings, "run": info}, indent=2, default=str))
    os.replace(tmp, path)


def _log_rank(out: Path, rank: int, world: int, ids: list[str], seconds: float) -> None:
    """`ranks/rank<r>.json`: the ids this rank ran in its last call and its throughput (samples/s)."""
    (out / "ranks").mkdir(exist_ok=True)
    info = dict(rank=rank, world_size=world, ids=ids, seconds=seconds, samples_per_s=len(ids) / seconds if ids else None)
    (out / "ranks" / f"rank{rank}.json").write_text(json.dumps(info, indent=2))


def _versions() -> dict:
    import hooked_av

    out = {"hooked_av": hooked_av.__version__, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def _experiments(experiments) -> list[str]:
    return study_experiments(experiments)


def _process_group(world: int, device) -> str | None:
    """A process group for the end-of-run barrier when there are several ranks: the caller's, or one
    made here ("created", destroyed at the end of the run)."""
    if world <= 1:
        return None
    import torch.distributed as dist

    if dist.is_initialized():
        return "existing"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return "created"
