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
from patching.apps.study.stats import Study
from patching.engine import experiment as registry

MAX_ROWS = 40  # a longer table (DLA: layers x heads x groups) shows its largest |mean| cells and says so


def write_report(studies, path=None) -> Path:
    """One study folder (or `Study`), or several compared (then `path` is required). Returns the
    HTML path.

        out = run_study(model, manifest, ["logit_lens"], tmp / "study", progress=False)
        write_report(out)  # out / "report.html", figures in out / "figures"
    """
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
    report.heading(_heading("accuracy")).table(_table(items, "accuracy")[0])
    common = [e for e in items[0].experiments if all(e in s.experiments for s in items) and e != "accuracy"]
    for exp in common:
        record = registry.get(exp)
        report.heading(_heading(exp))
        fig = figures.figure(items, exp) if record.plot is not None else None
        figs = [] if fig is None else fig if isinstance(fig, list) else [fig]
        for i, f in enumerate(figs):
            f.savefig(png_dir / (f"{exp}.png" if len(figs) == 1 else f"{exp}_{i}.png"), dpi=110, bbox_inches="tight")
            report.figure(f)
        table, caption = _table(items, exp)
        if not figs:
            caption = caption.replace("the figure's values", "no figure").replace("in the figure", "")
        report.text(caption).table(table)
        for kind in record.report.derived if record.report else ():  # kinds computed from these rows
            report.heading(_heading(kind))
            fig = figures.figure(items, kind)
            fig.savefig(png_dir / f"{kind}.png", dpi=110, bbox_inches="tight")
            report.figure(fig)
    report.heading("Settings").pre("\n\n".join(f"{s.dir}\n{_settings_text(s)}" for s in items))
    return report.save(path)


def _heading(kind: str) -> str:
    record = registry.get(kind)
    return record.report.heading if record.report else kind


def _table(items, exp) -> tuple[pd.DataFrame, str]:
    """(table, caption): the summary rows of the figure's subset."""
    record = registry.get(exp)
    rep = record.report
    subset = record.subset
    t = pd.concat([s.summary(exp) for s in items], ignore_index=True).drop(columns=["experiment"])
    if rep is not None and rep.baseline:  # beside the value under the intervention, the plain run's over the same samples
        plain = pd.concat([s.summary(exp, value=rep.baseline) for s in items], ignore_index=True).drop(columns=["experiment"])
        cell = record.cells[0]
        t = pd.concat([t, plain.assign(**{cell: "none (plain run)"})], ignore_index=True).sort_values(
            [c for c in ("model", "kind", "task", "dataset") if c in t.columns], kind="stable")
    t = t[t.subset == subset]
    value = record.summary_value
    what = f"mean {value} over {subset} samples, bootstrap 95 % interval (ci_low, ci_high), n_samples"
    table = rep.table if rep else "cells"
    if table == "lowest":  # the curve is the figure; the table gives where each mean curve is lowest
        return lowest_points(t), f"Table: each edge's lowest point of the mean curve in the figure (the layer where it is lowest; {what})."
    if table == "shares":
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
