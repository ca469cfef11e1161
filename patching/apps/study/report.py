"""A study's report: its figures as PNG files (`<dir>/figures/`) and one self-contained HTML page
(`<dir>/report.html`: figures inlined, summary tables) — or several studies compared side by side.

Each table beside a figure holds the figure's own statistic (`Study.summary`: the mean over the
same samples, the same bootstrap 95 % interval, n), and its caption says which rows it keeps.

    write_report("runs/toy")                                   # runs/toy/report.html
    write_report(["runs/omni3b", "runs/omni7b"], "runs/compare.html")
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from hooked_av.viz import Report
from patching.apps.study import figures
from patching.apps.study.stats import DEFAULTS, Study

FIGURES = {"knockout": figures.knockout_figure, "discarding": figures.discarding_figure,
           "causal_tracing": figures.indirect_effect_figure}
PLOTTED = ("logit_lens", "dla", "pathway", "fastv", "sinks")  # drawn by `figures.experiment_figure`
HEADINGS = {
    "knockout": "Attention knockout: relative change of p(answer) (%)",
    "discarding": "Discarding the media from layer L on: accuracy and FLOPs saved",
    "causal_tracing": "Causal tracing: indirect effect per restored token set",
    "logit_lens": "Logit lens: p(answer) per token group and layer",
    "sinks": "Attention sinks: modality dominance score",
    "pathway": "Effective pathway: accuracy with the pathway and with random blocking of as many edges",
    "fastv": "FastV beside discarding a whole modality: accuracy against prefill FLOPs saved",
    "var": "VAR (visual attention redistribution): accuracy with and without it",
    "dla": "Direct logit attribution per head, split by the token group read",
    "dominance": "Unimodal dominance: share of samples per label",
}
SUBSET = {"knockout": "correct", "causal_tracing": "correct"}  # the figures' subset; "all" elsewhere
MAX_ROWS = 40  # a longer table (DLA: layers x heads x groups) shows its largest |mean| cells and says so


def write_report(studies, path=None) -> Path:
    """One study folder (or `Study`), or several compared (then `path` is required). Returns the
    HTML path."""
    many = isinstance(studies, (list, tuple))
    items = [s if isinstance(s, Study) else Study(s) for s in (studies if many else [studies])]
    if many and path is None:
        raise ValueError("comparing several studies: give the report's path (it belongs to none of their folders)")
    path = Path(path) if path is not None else items[0].dir / "report.html"
    png_dir = path.parent / "figures"
    png_dir.mkdir(parents=True, exist_ok=True)
    names = ", ".join(f"{s.model} ({s.dir.name})" for s in items)
    report = Report(f"study: {names}")
    report.text(f"{' | '.join(f'{s.dir}: {s.n_done} samples' for s in items)}; written {time.strftime('%Y-%m-%d %H:%M')}. "
                "Figures: mean over samples (thick), bootstrap 95 % interval of the mean (band), every sample (thin); "
                "n = samples. Tables: the same means, intervals and n.")
    report.heading("Accuracy").table(_table(items, "accuracy")[0])
    common = [e for e in items[0].experiments if all(e in s.experiments for s in items) and e != "accuracy"]
    for exp in common:
        report.heading(HEADINGS.get(exp, exp))
        fig = FIGURES[exp](items) if exp in FIGURES else figures.experiment_figure(items, exp) if exp in PLOTTED else None
        figs = [] if fig is None else fig if isinstance(fig, list) else [fig]
        for i, f in enumerate(figs):
            f.savefig(png_dir / (f"{exp}.png" if len(figs) == 1 else f"{exp}_{i}.png"), dpi=110, bbox_inches="tight")
            report.figure(f)
        table, caption = _table(items, exp)
        if not figs:
            caption = caption.replace("the figure's values", "no figure").replace("in the figure", "")
        report.text(caption).table(table)
        if exp == "knockout":
            report.heading("Accuracy under the knockout (Map the Flow's count: correct plainly and under the knockout)")
            fig = figures.experiment_figure(items, "knockout_accuracy")
            fig.savefig(png_dir / "knockout_accuracy.png", dpi=110, bbox_inches="tight")
            report.figure(fig)
    report.heading("Settings").pre("\n\n".join(f"{s.dir}\n{_settings_text(s)}" for s in items))
    return report.save(path)


def _table(items, exp) -> tuple[pd.DataFrame, str]:
    """(table, caption): the summary rows of the figure's subset."""
    subset = SUBSET.get(exp, "all")
    t = pd.concat([s.summary(exp) for s in items], ignore_index=True).drop(columns=["experiment"])
    if exp == "var":  # beside the accuracy under VAR, the plain run's over the same samples
        plain = pd.concat([s.summary(exp, value="correct_orig") for s in items], ignore_index=True).drop(columns=["experiment"])
        t = pd.concat([t, plain.assign(intervention="none (plain run)")], ignore_index=True).sort_values(
            [c for c in ("model", "kind", "task", "dataset") if c in t.columns], kind="stable")
    t = t[t.subset == subset]
    value = DEFAULTS[exp][0]
    what = f"mean {value} over {subset} samples, bootstrap 95 % interval (ci_low, ci_high), n_samples"
    if exp == "knockout":  # the curve is the figure; the table gives where each mean curve is lowest
        return lowest_points(t), f"Table: each edge's lowest point of the mean curve in the figure (the layer where it is lowest; {what})."
    if exp == "dominance":
        return t, "Table: share of the samples with audio and video that carry each label, bootstrap 95 % interval, n_samples."
    if len(t) > MAX_ROWS:
        n = len(t)
        t = t.loc[t["mean"].abs().sort_values(ascending=False).index[:MAX_ROWS]]
        return t, (f"Table: the {MAX_ROWS} of the figure's {n} cells with the largest |mean| ({what}); every cell: "
                   f"Study(folder).summary({exp!r}).")
    return t, f"Table: the figure's values, {what}."


def lowest_points(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (model, kind / task / dataset, edge): the summary row (one subset) where the mean curve is
    lowest, i.e. the layer of the largest mean drop, with its interval and n."""
    keys = ["model", *[c for c in ("kind", "task", "dataset") if c in summary.columns], "edge"]
    keys = [k for k in keys if k in summary.columns]
    return summary.dropna(subset=["mean"]).sort_values("mean").groupby(keys, sort=False).head(1).sort_values(keys)


def _settings_text(s: Study) -> str:
    import json

    return json.dumps(s.settings, indent=1, default=str)
