"""A study's report: its figures as PNG files (`<dir>/figures/`) and one self-contained HTML page
(`<dir>/report.html`: figures inlined, summary tables) — or several studies compared side by side.

Each table beside a figure holds the figure's own statistics (`Study.summary`: the mean over the same
samples, its 95 % interval and the method, n, the paired test against the plain run with Holm's
correction over the figure's cells), and its caption says which rows it keeps, which interval and
which test. An experiment that gave no rows still has its section, which says why, sample by sample.

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
from patching.engine.stats import ALPHA, CORRECTION, INTERVALS, MIN_N, TESTS

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
                "Figures: the mean over samples (thick) with its 95 % interval (band), every sample of a continuous value "
                f"(thin), x where n < {MIN_N} (no interval), a star where the paired test against the plain run holds after "
                f"{CORRECTION}'s correction over the figure's cells (p < {ALPHA:g}). Tables: the same numbers; each caption "
                "names its interval and test. n = samples.")
    acc_table, acc_caption = _table(items, "accuracy")
    report.heading(_heading("accuracy")).table(_format(acc_table)).text(acc_caption.replace("the figure's values, ", ""))
    common = [e for e in items[0].experiments if all(e in s.experiments for s in items) and e != "accuracy"]
    for exp in common:
        record = registry.get(exp)
        report.heading(_heading(exp))
        why = _without_rows(items, exp)
        if why is not None:  # no sample gave rows: the section says why, per sample
            report.text(f"No rows: no sample gave {exp} a result. Per sample, why:").table(why)
            continue
        try:
            fig = figures.figure(items, exp) if record.plot is not None else None
        except ValueError as e:  # nothing to draw (e.g. no sink in any sample): said, and the tables follow
            report.text(f"No figure: {e}")
            fig = None
        figs = [] if fig is None else fig if isinstance(fig, list) else [fig]
        for i, f in enumerate(figs):
            f.savefig(png_dir / (f"{exp}.png" if len(figs) == 1 else f"{exp}_{i}.png"), dpi=110, bbox_inches="tight")
            report.figure(f)
        table, caption = _table(items, exp)
        if not figs:
            caption = caption.replace("the figure's values", "no figure").replace("in the figure", "")
        report.text(caption).table(_format(table))
        empty = pd.concat([s.empty(exp) for s in items], ignore_index=True)
        if len(empty):
            report.text(f"{len(empty)} sample(s) have no {exp} result; why, per sample:").table(empty)
        for kind in record.report.derived if record.report else ():  # kinds computed from these rows
            report.heading(_heading(kind))
            fig = figures.figure(items, kind)
            fig.savefig(png_dir / f"{kind}.png", dpi=110, bbox_inches="tight")
            report.figure(fig)
            if kind == "knockout_accuracy":
                t = pd.concat([s.knockout_accuracy() for s in items], ignore_index=True)
                which = "the figure's values"
                if len(t) > MAX_ROWS:  # the cells where the knockout costs most accuracy; the rest are in the figure
                    which = (f"the {MAX_ROWS} of the figure's {len(t)} cells with the lowest accuracy (every cell: "
                             "Study(folder).knockout_accuracy())")
                    t = t.loc[t["accuracy"].sort_values(kind="stable").index[:MAX_ROWS]]
                report.text(f"Table: {which}: accuracy (%) under the knockout, n_samples, the {INTERVALS['Wilson']} "
                            f"(ci_low, ci_high; none for n < {MIN_N}), the {TESTS['McNemar']} (p_value) and {CORRECTION}'s "
                            f"correction over the figure's cells (p_holm).").table(_format(t))
    report.heading("Settings").pre("\n\n".join(f"{s.dir}\n{_settings_text(s)}" for s in items))
    return report.save(path)


def _without_rows(items, exp) -> pd.DataFrame | None:
    """(id, why) per sample when no study has a row of `exp`; None when one has."""
    out = []
    for s in items:
        try:
            s.frame(exp)
            return None
        except ValueError:
            out.append(s.empty(exp).assign(study=str(s.dir)))
    return pd.concat(out, ignore_index=True)


def _format(t: pd.DataFrame) -> pd.DataFrame:
    """A summary as the report shows it: p-values to 2 significant digits, the floor in g format,
    blanks for what a cell does not have (no interval: "-"), no columns for what no cell has (no test,
    no floor)."""
    t = t.copy()
    if "test" in t.columns:
        t["test"] = t["test"].fillna("").replace("none", "")
        if not (t["test"] != "").any():
            t = t.drop(columns=[c for c in ("p_value", "p_holm", "significant", "test") if c in t.columns])
        elif t.loc[t["test"] != "", "test"].nunique() == 1:  # one test, named in the caption
            t = t.drop(columns=["test"])
    if "floor" in t.columns and not t["floor"].fillna(0).astype(float).any():
        t = t.drop(columns=["floor"])
    # a column with one value in every row (the model of a single study, the subset, the test, the floor) is in
    # the caption: the table keeps what differs from row to row
    same = [c for c in ("model", "dataset", "task", "subset", "test", "floor") if c in t.columns and t[c].nunique(dropna=False) <= 1
            and len(t) > 1]
    t = t.drop(columns=same)
    for c in ("ci_low", "ci_high"):
        if c in t.columns:
            t[c] = [("-" if pd.isna(v) else f"{v:.3f}") for v in t[c]]
    for c in ("p_value", "p_holm"):
        if c in t.columns:
            t[c] = [("" if pd.isna(v) else f"{v:.2g}") for v in t[c]]
    if "floor" in t.columns:
        t["floor"] = [("" if not v else f"{v:.1g}") for v in t["floor"]]
    if "significant" in t.columns:
        t["significant"] = ["*" if v else "" for v in t["significant"]]
    return t.drop(columns=[c for c in ("value",) if c in t.columns])


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
    what = (f"mean {value} over {subset} samples, its 95 % interval (ci_low, ci_high; "
            + "; ".join(f"'{k}': {INTERVALS[k]}" for k in INTERVALS if k in set(t["interval"])) + "), n_samples")
    if record.paired is not None:
        test = TESTS["McNemar" if record.outcome == "binary" else "sign test"]
        what += (f"; p_value: the {test} ({record.paired[0]} against {record.paired[1]}), p_holm: {CORRECTION}'s correction "
                 f"over all its cells, significant (*) at p_holm < {ALPHA:g}")
        if record.outcome == "continuous":
            what += f"; note 'no effect': |mean| within the numerical floor ({_floors(t)}, docs/methods.md)"
    what += f"; note 'n < {MIN_N}': no interval, no test"
    table = rep.table if rep else "cells"
    if table == "lowest":  # the curve is the figure; the table gives where each mean curve is lowest
        return lowest_points(t), (f"Table: each edge's lowest point of the mean curve in the figure (the layer where it is "
                                  f"lowest; 'no drop at any layer' where no layer's mean falls below minus the numerical floor; {what}).")
    if table == "shares":
        return t, f"Table: share of the samples with audio and video that carry each label ({what})."
    if len(t) > MAX_ROWS:
        n = len(t)
        t = t.loc[t["mean"].abs().sort_values(ascending=False).index[:MAX_ROWS]]
        return t, (f"Table: the {MAX_ROWS} of the figure's {n} cells with the largest |mean| ({what}); every cell: "
                   f"Study(folder).summary({exp!r}).")
    return t, f"Table: the figure's values, {what}."


def _floors(t: pd.DataFrame) -> str:
    floors = sorted(set(t["floor"].dropna())) if "floor" in t.columns else []
    return ", ".join(f"{f:.1g}" for f in floors) or "none"


def lowest_points(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (model, kind / task / dataset, edge): the summary row (one subset) where the mean curve is
    lowest, i.e. the layer of the largest mean drop, with its interval, n and test; an edge whose
    mean never falls below minus the numerical floor has no lowest point: its row says "no drop at
    any layer" with the layer left empty (any layer would be arbitrary)."""
    keys = ["model", *[c for c in ("kind", "task", "dataset") if c in summary.columns], "edge"]
    keys = [k for k in keys if k in summary.columns]
    s = summary.dropna(subset=["mean"])
    low = s.sort_values("mean", kind="stable").groupby(keys, sort=False).head(1).sort_values(keys).copy()
    if "floor" in s.columns:
        flat = s.assign(within=s["mean"] >= -s["floor"]).groupby(keys)["within"].all()
        idx = pd.MultiIndex.from_frame(low[keys]) if len(keys) > 1 else low[keys[0]]
        is_flat = flat.reindex(idx).to_numpy(dtype=bool)
        low["layer"] = low["layer"].astype(object)
        low.loc[is_flat, "layer"] = ""
        low.loc[is_flat, "note"] = "no drop at any layer"
    return low


def _settings_text(s: Study) -> str:
    import json

    return json.dumps(s.settings, indent=1, default=str)
