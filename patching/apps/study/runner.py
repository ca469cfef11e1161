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
flight; a sample is done when every experiment's part is there and readable, an empty experiment's too,
and an experiment that gives a sample no rows also writes `<row>-<id hash>.empty.json` with why,
`Study.empty`); after the run, `<experiment>.parquet`, the parts merged in manifest order. Running again
skips done samples and recomputes a missing, empty or truncated part (naming it); a run with other
settings into the same folder is refused, as is a `settings.json` that cannot be read. Under torchrun
(RANK, WORLD_SIZE, LOCAL_RANK in the environment) rank r takes rows r, r + W, ...; the ranks meet at a
barrier (gloo on CPU, nccl on CUDA) before rank 0 merges; rank 0's progress bar counts every rank's samples.
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
    library's `knockout.default_window`, the papers' 9 for centred and inverse windows in models of
    18 layers or more, a quarter of the depth below; none for top-down / bottom-up);
    `options`: keyword arguments per experiment, e.g. `{"discarding": {"repeats": 1}, "knockout":
    {"window_style": "inverse"}}` (each record's `option_names()` says which it takes; unknown ones
    are refused before the model loads).

        out = run_study(model, manifest, ["knockout"], tmp / "study", window=1, options={"knockout": {"centres": [1]}},
                        progress=False)
        Study(out).frame("knockout")[["id", "edge", "layer", "rel_change", "sample_correct"]]
    """
    experiments = _experiments(experiments)
    out = _out_folder(out_dir)
    if window is not None:
        checks.count(window, "window", unit=" layer")
    # the model's shape from its config.json (no weights read): settings it cannot take are refused now
    cfg = model.cfg if not isinstance(model, (str, os.PathLike)) else _config(model)
    options = json.loads(json.dumps(check_options(options, experiments, window, cfg)))
    if limit is not None:
        checks.count(limit, "limit", unit=" sample")
    from hooked_av.utils import as_device, as_dtype

    dtype_ = as_dtype(dtype)
    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    tpl = parse_template(template)
    scorer = Scorer(scoring)
    rows = manifest.rows[:limit]
    tpl.check(rows)
    _check_result_columns(manifest, rows, experiments)
    if isinstance(model, (str, os.PathLike)):  # the tokenizer from the checkpoint's files, no weight loaded yet
        from hooked_av.registry import inspect

        tokenizer = inspect(model)[1]
    else:
        tokenizer = model.tokenizer
    _check_vocabulary(tokenizer, rows, tpl, manifest)
    scorer.check(tokenizer, rows)
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = as_device(f"cuda:{local}" if device == "cuda" and world > 1 else device)
    name = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    # the dtype the model runs in (the numerical floor of every result depends on it): a name loads in float32
    # unless dtype says otherwise, a loaded model runs in its own, which dtype may not contradict
    used = dtype_ or torch.float32
    if not isinstance(model, (str, os.PathLike)):
        used = next(model.parameters()).dtype
        if dtype_ is not None and dtype_ != used:
            raise ValueError(f"dtype={dtype!r} applies to a model loaded by name; this model is already loaded in "
                             f"{str(used).removeprefix('torch.')}: pass dtype={str(used).removeprefix('torch.')!r} "
                             "(or None), or load it in the dtype you want")
    settings = dict(model=str(name), dtype=str(used).removeprefix("torch."), device_type=dev.type,
                    manifest=manifest.sha256, experiments=experiments, template=tpl.settings(), scoring=scorer.settings(),
                    window=window, options=options, versions=_versions())
    created = _claim(out, settings, dict(manifest_path=str(manifest.path.resolve()), limit=limit))
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
    group = _process_group(world, dev)
    mine = rows[rank::world]
    missing = _missing_parts(out, mine, experiments)  # row index -> experiments whose part is absent or unreadable
    todo = [r for r in mine if r.index in missing]
    from patching.apps.study.progress import Progress

    # rank 0's bar counts every rank's samples
    bar = Progress(out, rank, world, len(rows) if group else len(mine), len(mine) - len(todo), progress, group, dev)
    t0 = time.perf_counter()
    try:
        for i, row in enumerate(todo):
            redo = [e for e in experiments if e in missing[row.index]]
            for exp, df in run_sample(model, row, tpl, scorer, redo, window, options, manifest.meta_columns, dev,
                                      first=i == 0):
                write_part(out, exp, row, df)  # an experiment without rows for this sample writes an empty part ...
                if not len(df) and exp != "accuracy":  # ... and why, for the report
                    write_empty(out, exp, row, df.attrs.get("why") or f"{exp} gave this sample no rows")
            bar.advance()
        _log_rank(out, rank, world, [r.id for r in todo], time.perf_counter() - t0)
        if group:
            torch.distributed.barrier()
    except Exception:
        if created and not (out / "parts").exists():  # refused on the first sample: the folder holds nothing to resume
            (out / "settings.json").unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        bar.close()
    if rank == 0:
        merge(out, experiments)
    if group:
        torch.distributed.barrier()  # no rank returns before the merged files exist
        if group == "created":
            torch.distributed.destroy_process_group()
    return out


def run_sample(model, row: Row, tpl, scorer: Scorer, experiments, window, options, meta_columns, device,
               first: bool = False) -> dict:
    """Yields `(experiment, rows)` for one sample as each experiment finishes, accuracy last; `first`:
    the run's first sample, where settings only data can check are refused (`StudySample.first`)."""
    from patching.engine.sweep import encode

    inputs = model.prepare(tpl.prompt(row))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tm = model.token_map(inputs)
    enc = encode(model, inputs)  # the towers, once for every experiment of this sample
    with torch.no_grad():
        last = model(**enc, logits_at="last")[0, -1]
    s = scorer.score(model, enc, last, row)
    front = {"id": row.id, **{c: row.meta.get(c) for c in meta_columns}, "sample_correct": s.correct}
    x = StudySample(model, inputs, enc, tm, s.answer_token, window, first=first)
    acc = pd.DataFrame([{**front, "prediction": s.prediction, "answer_text": row.answer_text, "answer_token": s.answer_token,
                         "p_answer": s.p_answer, "rule": scorer.rule, "chance": chance(row)}])
    for exp in experiments:
        if exp == "accuracy":
            continue
        df = get(exp).run(x, dict(options.get(exp, {})))
        if not len(df):
            yield exp, df
            continue
        clash = [c for c in front if c in df.columns]
        if clash:
            raise ValueError(f"metadata column(s) {clash} have the names of {exp} result columns; rename them in the manifest")
        df = df.drop(columns=["sample"], errors="ignore")
        for c in reversed(list(front)):
            df.insert(0, c, [front[c]] * len(df))
        yield exp, df.reset_index(drop=True)
    yield "accuracy", acc


def chance(row: Row) -> float:
    """The accuracy of a uniform guess for this sample: 1 / its number of options (`options`, else the
    manifest's `n_options` metadata); NaN when neither says."""
    if row.options:
        return 1 / len(row.options)
    n = row.meta.get("n_options")
    return 1 / float(n) if n is not None else float("nan")


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


def part_problem(path: Path) -> str | None:
    """Why the part at `path` cannot be read (missing, empty, truncated), or None."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    try:
        pq.read_metadata(path)
    except Exception as e:  # pyarrow's errors for a truncated or foreign file
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def write_empty(out: Path, exp: str, row: Row, why: str) -> Path:
    """`parts/<exp>/<part name>.empty.json`: this sample gave `exp` no rows, and why."""
    folder = out / "parts" / exp
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / part_name(row).replace(".parquet", ".empty.json")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"id": row.id, "why": why}))
    os.replace(tmp, path)
    return path


def read_empty(out: Path, exp: str) -> pd.DataFrame:
    """`id`, `why` of the samples that gave `exp` no rows, in manifest order."""
    files = sorted((Path(out) / "parts" / exp).glob("*.empty.json"))
    return pd.DataFrame([json.loads(f.read_text()) for f in files], columns=["id", "why"])


def read_parts(out: Path, exp: str) -> pd.DataFrame | None:
    """The parts of `exp` merged in manifest order (None when none holds a row); a part that cannot be
    read is named, with what to do."""
    files = sorted((Path(out) / "parts" / exp).glob("*.parquet"))
    frames = []
    for f in files:
        try:
            df = pd.read_parquet(f)
        except Exception as e:
            raise ValueError(f"cannot read the result part {f} ({type(e).__name__}: {e}); run the same study again to "
                             "recompute it (a part that cannot be read is done again)") from None
        if len(df):
            frames.append(df)
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)


def merge(out: Path, experiments) -> None:
    for exp in experiments:
        df = read_parts(out, exp)
        if df is None:
            continue
        tmp = out / f".{exp}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, out / f"{exp}.parquet")


def _missing_parts(out: Path, rows, experiments) -> dict[int, list[str]]:
    """Per row index, the experiments whose part is missing, empty or unreadable (a sample is done when none
    is); an unreadable part is named in a warning and recomputed."""
    import warnings

    have = {e: {p.name for p in (out / "parts" / e).glob("*.parquet")} for e in experiments}
    missing: dict[int, list[str]] = {}
    for r in rows:
        name = part_name(r)
        for e in experiments:
            why = part_problem(out / "parts" / e / name) if name in have[e] else "missing"
            if why is not None:
                if why != "missing":
                    warnings.warn(f"result part {out / 'parts' / e / name} (sample {r.id!r}) is {why}; recomputing it",
                                  stacklevel=3)
                missing.setdefault(r.index, []).append(e)
    return missing


def _out_folder(out_dir) -> Path:
    """`out_dir` as a Path, refused (before any work) where it, or the nearest existing folder above it, is a file."""
    out = Path(out_dir)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under {p}, which is a file"
                raise ValueError(f"the output folder {str(out)!r} {what}; name a folder (created if missing)")
            break
    return out


def _check_result_columns(manifest: Manifest, rows, experiments) -> None:
    """Refuse, before a model loads, metadata columns named like a result column of an experiment this study
    runs (its record's `columns`): the rows would hold one of the two."""
    from patching.datasets.manifest import ManifestError

    meta = [c for c in manifest.meta_columns if any(c in r.meta for r in rows)]
    problems = []
    for c in meta:
        owners = [e for e in experiments if c in get(e).columns]
        if owners:
            problems.append((0, None, c, f"{c!r} is a result column of {owners}; rename this metadata column"))
    if problems:
        raise ManifestError(manifest.path, problems)


def _check_vocabulary(tokenizer, rows, tpl, manifest: Manifest) -> None:
    """Refuse, before a model loads, rows whose prompt text (question, options, instruction, item labels)
    holds words the tokenizer does not know (its unknown token), e.g. a word outside the toy's vocabulary."""
    from patching.datasets.manifest import ManifestError

    unk = getattr(tokenizer, "unk_token_id", None)
    if tokenizer is None or unk is None:
        return
    problems = []
    for r in rows:
        p = tpl.prompt(r)
        texts = [("question", p.text())] + [(f"items[{j}].label", it.label) for j, it in enumerate(p.all_items()) if it.label]
        for col, text in texts:
            if unk not in tokenizer.encode(text, add_special_tokens=False):
                continue
            words = [w for w in text.split() if unk in tokenizer.encode(w, add_special_tokens=False)] or [text]
            if words:
                problems.append((r.index + 1, r.id, col, f"word(s) {words[:5]} are not in the model's vocabulary (the "
                                                         "tokenizer reads them as its unknown token); rephrase them"))
    if problems:
        raise ManifestError(manifest.path, problems)


def _claim(out: Path, settings: dict, info: dict) -> bool:
    """Write `settings.json` (True), or refuse when the folder holds a run with other settings (False
    when it holds this run's: a resume)."""
    path = out / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"a JSON object is expected, got {type(old).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} cannot be read ({e}); it records what the results in {out} were computed with, so "
                             f"the run cannot resume without it: restore it, or use another --out folder (or delete {out}) "
                             "to start over") from None
        theirs = {k: v for k, v in old.items() if k != "run"}
        if theirs != json.loads(json.dumps(settings)):
            diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != json.loads(json.dumps(settings.get(k))))
            raise ValueError(f"{out} holds a study with other settings ({', '.join(diff)} differ: "
                             f"{ {k: theirs.get(k) for k in diff} } there, { {k: settings.get(k) for k in diff} } now); "
                             "use another --out folder, or the same settings to resume")
        return False
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".settings.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**settings, "run": info}, indent=2, default=str))
    os.replace(tmp, path)
    return True


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


def _config(model):
    from hooked_av.registry import config

    return config(model)


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
