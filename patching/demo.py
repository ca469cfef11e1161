"""The main job (`make demo` / `hooked-av demo`): the toolkit's information-flow analysis on the
embedded toy model, written to one self-contained HTML report.

Steps: held-out samples -> accuracy per question kind -> six-edge attention-knockout sweep for
auditory vs visual questions -> physical discarding of the media tokens from every layer ->
token-group attention mass per layer -> `runs/demo/report.html`. The same analysis runs on any
supported model through `hooked-av flow` (see `flow.py`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from hooked_av.viz import Report, group_attention_mass, plot_attention_mass
from patching.discarding import discarding
from patching.knockout import DEFAULT_EDGES, knockout
from patching.results import Result


def accuracy_by_kind(model, batch) -> pd.DataFrame:
    with torch.no_grad():
        pred = model(**batch.inputs)[:, -1].argmax(-1)
    right = (pred == batch.answers).tolist()
    df = pd.DataFrame({"kind": batch.kinds, "correct": right})
    out = df.groupby("kind", sort=False).correct.agg(["mean", "size"]).reset_index()
    return out.rename(columns={"mean": "accuracy", "size": "samples"})


def run_demo(out_dir: str | Path = "runs/demo", n_eval: int = 200, n_flow: int = 16, window: int = 1, seed: int = 2024) -> Path:
    import hooked_av
    from hooked_av import toy

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    model = hooked_av.load("toy")
    tok = model.tokenizer
    print(f"toy model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.cfg.n_layers} layers")

    batch = toy.make_batch(n_eval, seed=seed, tokenizer=tok)
    acc = accuracy_by_kind(model, batch)
    print("held-out accuracy per question kind:\n" + acc.to_string(index=False))

    from tqdm.auto import tqdm

    bar = tqdm(total=4, desc="knockout auditory/visual, discarding, attention mass")
    runs = []
    for i, kind in enumerate(("auditory", "visual")):
        b = toy.make_batch(n_flow, seed=seed + 1 + i, tokenizer=tok, kinds=(kind,))
        res = knockout(model, b.inputs, b.answers.tolist(), edges=DEFAULT_EDGES, window=window,
                       tm=model.token_map(b.inputs), progress=False)
        bar.update()
        runs.append(res.df.assign(kind=kind))
    ko_df = pd.concat(runs, ignore_index=True)
    summary = ko_df[ko_df.correct].groupby(["kind", "edge"]).rel_change.min().unstack("kind").round(1)
    print("knockout: largest drop of p(answer) in %, over window centres (correct samples):\n" + summary.to_string())

    d = toy.make_batch(max(16, n_flow), seed=seed + 3, tokenizer=tok)
    disc = discarding(model, d.inputs, d.answers.tolist(), group="audio|video", repeats=1, progress=False)
    bar.update()
    curve = disc.df.groupby("from_layer").agg(accuracy=("correct", "mean"), flops_saved=("flops_saved", "mean")).reset_index()
    print("discarding audio+video from layer L:\n" + curve.round(3).to_string(index=False))

    one = toy.make_batch(1, seed=seed + 4, tokenizer=tok, kinds=("two_clip",))
    flow_batch = toy.make_batch(n_flow, seed=seed + 5, tokenizer=tok)
    mass = group_attention_mass(model, flow_batch.inputs, model.token_map(flow_batch.inputs))
    bar.update()
    bar.close()

    report = Report("hooked_av demo: information flow in the toy audio-visual model")
    report.text(f"{model.cfg.n_layers}-layer Qwen2.5-Omni Thinker architecture trained on a synthetic task; "
                f"{n_eval} held-out samples, knockout window {window}, run time {time.perf_counter() - t0:.0f} s.")
    report.heading("Accuracy per question kind").table(acc)
    report.heading("Attention knockout (relative change of p(answer), %)")
    for kind in ("auditory", "visual"):
        sub = ko_df[ko_df.kind == kind].reset_index(drop=True)
        fig = Result("knockout", sub, {"window": window}).plot().figure
        fig.suptitle(f"{kind} questions")
        report.figure(fig)
    report.table(summary.reset_index())
    report.heading("Discarding audio + video tokens from layer L on").table(curve)
    report.figure(disc.plot().figure)
    report.heading("Token layout of one two-clip sample").pre(model.token_map(one.inputs).describe())
    report.heading("Attention mass between token groups, per layer").figure(plot_attention_mass(mass))
    path = report.save(out_dir / "report.html")
    Result("knockout", ko_df, {"window": window, "edges": DEFAULT_EDGES}).save(out_dir / "knockout.csv")
    disc.save(out_dir / "discarding.csv")
    print(f"\nreport: {path.resolve()}  ({time.perf_counter() - t0:.0f} s)")
    return path
