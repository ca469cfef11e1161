"""A study's report: its figures as PNG files (`<dir>/figures/`) and one self-contained HTML page
(`<dir>/report.html`: figures inlined, summary tables) — or several studies compared side by side.

    write_report("runs/toy")                                   # runs/toy/report.html
    write_report(["runs/omni3b", "runs/omni7b"], "runs/compare.html")
"""

from __future__ import annotations

import time
from pathlib import Path

from hooked_av.viz import Report
from patching.study import figures
from patching.study.stats import Study

FIGURES = {"knockout": figures.knockout_figure, "discarding": figures.discarding_figure,
           "causal_tracing": figures.indirect_effect_figure}
HEADINGS = {
    "knockout": "Attention knockout: relative change of p(answer) (%), correctly answered samples, 95 % bands",
    "discarding": "Discarding the media from layer L on: accuracy (all samples) and FLOPs saved",
    "causal_tracing": "Causal tracing: indirect effect per restored token set",
    "logit_lens": "Logit lens: p(answer) per token group and layer",
    "sinks": "Attention sinks: modality dominance score",
}


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
    report.text(f"{' | '.join(f'{s.dir}: {s.n_done} samples' for s in items)}; written {time.strftime('%Y-%m-%d %H:%M')}.")
    report.heading("Accuracy").table(_table(items, "accuracy"))
    common = [e for e in items[0].experiments if all(e in s.experiments for s in items) and e != "accuracy"]
    for exp in common:
        report.heading(HEADINGS.get(exp, exp))
        if exp in FIGURES:
            fig = FIGURES[exp](items)
            fig.savefig(png_dir / f"{exp}.png", dpi=110, bbox_inches="tight")
            report.figure(fig)
        report.table(_table(items, exp))
    report.heading("Settings").pre("\n\n".join(f"{s.dir}\n{_settings_text(s)}" for s in items))
    return report.save(path)


def _table(items, exp):
    import pandas as pd

    t = pd.concat([s.summary(exp) for s in items], ignore_index=True).drop(columns=["experiment"])
    if exp == "knockout":  # the curve is the figure; the table gives each edge's strongest effect
        t = t[t.subset == "correct"].sort_values("mean").groupby(["model", *[c for c in ("kind", "task", "dataset") if c in t.columns], "edge"],
                                                                 sort=False).head(1)
    return t


def _settings_text(s: Study) -> str:
    import json

    return json.dumps(s.settings, indent=1, default=str)
