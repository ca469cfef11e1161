"""The papers' figures from study folders: `figure(studies, experiment)` takes one study or several side
by side (two models, two datasets) and returns a matplotlib Figure (DLA: one per panel). Every panel is
drawn by the experiment's own `Result.plot` (`patching.figures.plots`) on the study's rows, with the
study's own statistics (`Study.summary`: the mean over samples, its 95 % interval as the band (Wilson
for 0/1 outcomes, the seeded bootstrap for continuous ones), x where n < 5, a star where the paired
test against the plain run holds after Holm's correction over the figure's cells), every sample of a
continuous value as a faint line, n= in the legend, integer layer ticks, the chance level on
accuracy figures (from the samples' `chance`, `runner.chance`); one panel per study and value of
`facet`. How a kind is laid out is its registry record's `Report`: columns drawn as panels of their
own (`split`, e.g. causal tracing's corrupted modality), one column per restore site (`by_site`), a
second axis (`twin`, discarding's FLOPs saved), the study's value and axis where they differ from
`Result.plot`'s (discarding's accuracy), and kinds derived from the rows (`derived`: knockout
accuracy from the knockout rows). Averaged over the record's subset (the correctly answered samples
for knockout and causal tracing, the summary's "correct" subset) unless `subset` says otherwise.

    fig = figure("runs/toy", "knockout")
    fig = figure(["runs/omni3b", "runs/omni7b"], "discarding")
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: a study runs headless
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from patching.apps.study.stats import Study  # noqa: E402
from patching.engine import experiment as registry  # noqa: E402
from patching.engine.experiment import Report  # noqa: E402
from patching.engine.results import Result  # noqa: E402


def _studies(studies) -> list[Study]:
    items = studies if isinstance(studies, (list, tuple)) else [studies]
    return [s if isinstance(s, Study) else Study(s) for s in items]


def _title(study: Study, many: bool) -> str:
    return f"{study.model} ({study.dir.name})" if many else study.model


def as_result(study: Study, kind: str, df: pd.DataFrame) -> Result:
    """The study's rows of one panel as a `Result` of `kind`: `sample` numbers the ids in manifest
    order; for kinds averaged over correct samples (knockout, causal tracing) `correct` is the study's
    `sample_correct` (its scoring rule), so the figure averages the samples the summary's "correct"
    subset does. Its settings: the study's dtype and options (what the numerical floor depends on)
    and, for knockout, the window the rows were run with."""
    df = df.assign(sample=pd.factorize(df["id"])[0])
    if registry.get(kind).correct_only:
        df = df.assign(correct=df["sample_correct"])
    opts = study.settings.get("options", {}).get(kind, {})
    dtype = study.settings.get("dtype", "float32")
    settings = {"dtype": "float32" if dtype == "checkpoint" else dtype, **opts}  # as Study.floor reads an older folder
    if kind == "knockout":
        style = opts.get("window_style", "centre")
        rows = df["window"].dropna().unique() if "window" in df.columns else []
        window = int(rows[0]) if len(rows) == 1 and rows[0] >= 0 else study.settings.get("window")
        rule = "none" if style in ("top_down", "bottom_up") else "given" if study.settings.get("window") is not None else \
            "default for the model's depth"
        settings.update(window=window, window_style=style, window_rule=rule)
    return Result(kind, df, settings)


def chance_of(study: Study, ids) -> float | None:
    """The chance accuracy of the samples `ids`: the mean of their `chance` (1 / number of options);
    None when the study's samples do not say (no options, no `n_options`)."""
    try:
        acc = study.frame("accuracy")
    except ValueError:
        return None
    if "chance" not in acc.columns:
        return None
    c = acc.loc[acc["id"].isin(set(ids)), "chance"].astype(float)
    return float(c.mean()) if len(c) and c.notna().all() else None


def _panels(studies, experiment, facet, split=None):
    """[(title, rows)] for every study x facet value (x `split` value: a column drawn as its own panel)."""
    out = []
    for st in studies:
        df = st.frame(experiment)
        keys = [c for c in (facet, split) if c and c in df.columns]
        if not keys:
            out.append((st, _title(st, len(studies) > 1), df))
            continue
        for key, part in df.groupby(keys, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            out.append((st, f"{_title(st, len(studies) > 1)}: " + ", ".join(map(str, key)), part))
    return out


def _grid(n_rows: int, n_cols: int, width: float = 5.6, height: float = 4.8):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes


def _wrapped(n: int, max_cols: int = 2, **kw):
    """`n` single-axes panels in rows of at most `max_cols` (a figure stays readable at page width);
    returns (figure, the n axes as [[ax], ...]) with the spare axes hidden."""
    cols = min(n, max_cols)
    fig, axes = _grid(-(-n // cols), cols, **kw)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, [[a] for a in flat[:n]]


def _empty(ax, title: str, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize="small", wrap=True)
    ax.set(title=title, xticks=[], yticks=[])
    ax.title.set_fontsize("small")


def _draw(fig, fig_axes, panels, kind, cells=None, **plot_kw):
    """Each panel's `Result.plot` on its row of axes, with its rows of the study's summary (`cells`:
    {study dir: summary}) and its samples' chance level. The plot's first title line (what is shown)
    stays under the panel's name; the lines every panel shares (the statistic, what the band, the
    thin lines and the marks are) go once into the figure's title. A panel whose subset is empty says
    so."""
    shared, failed = [], []
    record = registry.get(kind)
    binary = record.outcome_of(plot_kw.get("value", record.value)) == "binary"
    for axes, (st, title, df) in zip(fig_axes, panels):
        res = as_result(st, kind, df)
        kw = dict(plot_kw)
        if cells is not None:
            kw["cells"] = cells[st.dir]  # the plot keeps the rows of what it draws
        if binary:
            kw["chance"] = chance_of(st, df["id"].unique())
        try:
            res.plot(ax=axes if len(axes) > 1 else axes[0], **kw)
        except ValueError as e:  # e.g. no correctly answered sample in this panel: say so in the panel
            for ax in axes:
                _empty(ax, title, "\n".join(str(e).split("; ")))
            failed.append(str(e))
            continue
        for ax in axes:
            first, *rest = ax.get_title().split("\n")
            ax.set_title(f"{title}\n{first}", fontsize="small")
            shared += [r for r in rest if r not in shared]
    if len(failed) == len(panels):  # nothing drawn anywhere: no figure, and the reason
        import matplotlib.pyplot as plt

        plt.close(fig)
        raise ValueError(f"{failed[0]} (in each of the {len(panels)} panel(s))" if len(set(failed)) == 1 else "; ".join(failed))
    if shared:
        if plot_kw.get("samples") is False:
            shared = [r.replace("; thin lines: samples", "") for r in shared]
        fig.suptitle("\n".join(_wrap(_union(shared))), fontsize="medium", y=1.0, va="bottom")  # above the panels


def _union(lines: list[str]) -> str:
    """The panels' shared title lines as one: each "; "-part once, the bands of every panel named in
    one "band: ... or ..." part."""
    parts, bands = [], []
    for line in lines:
        for part in line.split("; "):
            if part.startswith("band: "):
                bands += [b for b in part.removeprefix("band: ").split(" or ") if b not in bands]
                part = "band: "
            if part not in parts:
                parts.append(part)
    # a star in some panel and none in another: the figure has stars, and says once what they mean
    parts = [p for p in parts if not (p.endswith(", none here") and p.removesuffix(", none here") in parts)]
    return "; ".join("band: " + " or ".join(bands) if p == "band: " else p for p in parts)


def _wrap(text: str, width: int = 110) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def figure(studies, experiment: str, facet: str | None = "kind", subset: str | None = None):
    """The figure of `experiment` over one study or several, laid out as its record's `Report` says
    (see the module); `subset` ("correct" / "all", default the record's) chooses the samples averaged."""
    studies = _studies(studies)
    record = registry.get(experiment)
    rep = record.report or Report(experiment)
    source = _source(experiment)
    if source is not None:
        return _derived_figure(studies, record, source, facet)
    correct_only = (subset or record.subset) == "correct"
    panels = _panels(studies, experiment, facet, split=rep.split[0] if rep.split else None)
    if record.plot is not None and record.plot.style == "heads":
        return _heatmap_figures(panels, experiment)
    n_sites = max(df["site"].nunique() for _, _, df in panels) if rep.by_site else 1
    if n_sites == 1:  # panels side by side, two to a row
        fig, rows = _wrapped(len(panels))
    else:  # one row per panel, one column per restore site
        fig, axes = _grid(len(panels), n_sites)
        rows = []
        for row, (_, _, df) in zip(axes, panels):
            k = df["site"].nunique()
            for ax in row[k:]:
                ax.set_visible(False)
            rows.append(list(row[:k]))
    value = record.summary_value if record.summary_value != record.value else None
    shown = value or record.value
    cells = None
    if shown == record.summary_value:  # the figure draws the summary's own numbers (Holm over all its cells)
        sub = "correct" if correct_only else "all"
        cells = {}
        for st in studies:  # by the panels' keys and the record's cells: the figure's own cells
            df = st.frame(experiment)
            by = [c for c in dict.fromkeys([facet, *rep.split[:1], *record.cells]) if c and c in df.columns]
            cells[st.dir] = st.summary(experiment, by=by, subsets=[sub])
    _draw(fig, rows, panels, experiment, cells=cells, correct_only=correct_only, samples=rep.samples,
          **({} if value is None else {"value": value}))
    for axes_row, (_, _, df) in zip(rows, panels):
        for ax in axes_row:
            if rep.twin is not None:
                column, label = rep.twin
                twin = ax.twinx()
                curve = df.groupby(record.plot.x)[column].mean()  # analytic: the same for every sample of a layout
                twin.plot(curve.index, curve.values, ls="--", color="grey", label=label)
                twin.set(ylim=rep.ylim, ylabel=label)  # the value's scale: 0 is 0 on both
            if rep.ylim is not None:
                ax.set_ylim(*rep.ylim)
            if rep.ylabel is not None:
                ax.set_ylabel(rep.ylabel)
    fig.tight_layout()
    return fig


def _source(kind: str) -> str | None:
    """The experiment whose rows `kind` is derived from (its record's `Report.derived`), if any."""
    for name in registry.names():
        rep = registry.get(name).report
        if rep is not None and kind in rep.derived:
            return name
    return None


def _heatmap_figures(panels, kind: str) -> list:
    """Layer x head heatmaps (DLA): one figure per panel (a row of heatmaps, one per source group, as
    `Result.plot` lays it out), every heatmap of every figure on one symmetric colour scale, so a
    colour means the same logit contribution in every panel."""
    record = registry.get(kind)
    figs = []
    for st, title, df in panels:
        fig = as_result(st, kind, df).plot(correct_only=False)
        fig.suptitle(f"{title}: mean {record.label or record.value} per layer and head, all samples; "
                     "one colour scale for every panel", fontsize="small", y=1.02)
        figs.append(fig)
    images = [im for fig in figs for ax in fig.axes for im in ax.get_images()]
    m = max((max(abs(v) for v in im.get_clim()) for im in images), default=1.0)
    for im in images:
        im.set_clim(-m, m)
    return figs


def _derived_figure(studies, record, source: str, facet):
    """A kind computed from another's rows (knockout accuracy from the knockout rows: the library's own
    `correct`, gold being the plain run's top token, Map the Flow's count), per study x facet."""
    panels = _panels(studies, source, facet)
    fig, axes = _wrapped(len(panels))
    # Holm over every cell of the figure (all panels), as `Study.knockout_accuracy` adjusts them
    tables = {st.dir: st.knockout_accuracy() for st in studies} if record.name == "knockout_accuracy" else {}
    shared = []
    for (ax,), (st, title, df) in zip(axes, panels):
        res = record.fn(Result(source, df.assign(sample=pd.factorize(df["id"])[0])))
        if st.dir in tables:
            t = tables[st.dir]
            keys = [c for c in st.group_columns(df) if c in t.columns and c != "model"]
            for k in keys:
                t = t[t[k].isin(df[k].unique())]
            res.df["p_holm"] = res.df[["edge", "layer"]].merge(t[["edge", "layer", "p_holm"]], how="left")["p_holm"].to_numpy()
        res.plot(ax=ax, chance=chance_of(st, df["id"].unique()))
        first, *rest = ax.get_title().split("\n")  # what every panel shares goes once above them, as in _draw
        ax.set_title(f"{title}\n{first}", fontsize="small")
        shared += [r for r in rest if r not in shared]
    if shared:
        fig.suptitle("\n".join(_wrap(_union(shared))), fontsize="medium", y=1.0, va="bottom")
    fig.tight_layout()
    return fig
