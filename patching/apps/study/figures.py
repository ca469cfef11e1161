"""The papers' figures from study folders, each taking one study or several side by side (two models,
two datasets) and returning a matplotlib Figure. Every panel is drawn by the experiment's own
`Result.plot` (`patching.figures.plots`) on the study's rows: the mean over samples with its bootstrap 95 %
band (`patching.engine.stats.bootstrap_ci`, the interval `Study.summary` reports), every sample as a faint
line, n= in the legend, integer layer ticks; one panel per study and value of `facet`.

- `knockout_figure`: relative change of p(answer) against layer, one line per edge, over the samples
  answered correctly by the study's scoring rule (`sample_correct`, the summary's "correct" subset).
- `discarding_figure`: accuracy with the media discarded from layer L on, all samples, and the FLOPs
  saved (dashed, right axis), against L.
- `indirect_effect_figure`: causal tracing's indirect effect against layer, one line per restored
  token set, one panel per corrupted modality and restore site.
- `experiment_figure`: any other experiment with a `Result.plot` (logit lens per lens, pathway, FastV,
  sinks, knockout accuracy); DLA as one figure per panel on one colour scale (`dla_figures`).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: a study runs headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from patching.engine.results import Result  # noqa: E402
from patching.apps.study.stats import Study  # noqa: E402

CORRECT_IS_SAMPLE = ("knockout", "causal_tracing")  # kinds whose `correct` is the sample's, not the cell's value


def _studies(studies) -> list[Study]:
    items = studies if isinstance(studies, (list, tuple)) else [studies]
    return [s if isinstance(s, Study) else Study(s) for s in items]


def _title(study: Study, many: bool) -> str:
    return f"{study.model} ({study.dir.name})" if many else study.model


def as_result(study: Study, kind: str, df: pd.DataFrame) -> Result:
    """The study's rows of one panel as a `Result` of `kind`: `sample` numbers the ids in manifest
    order; for knockout and causal tracing `correct` is the study's `sample_correct` (its scoring
    rule), so the figure averages the samples the summary's "correct" subset does."""
    df = df.assign(sample=pd.factorize(df["id"])[0])
    if kind in CORRECT_IS_SAMPLE:
        df = df.assign(correct=df["sample_correct"])
    opts = study.settings.get("options", {}).get(kind, {})
    settings = {"window": study.settings.get("window"), "window_style": opts.get("window_style", "centre")} if kind == "knockout" else {}
    return Result(kind, df, settings)


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


def _draw(fig, fig_axes, panels, kind, **plot_kw):
    """Each panel's `Result.plot` on its row of axes. The plot's first title line (what is shown)
    stays under the panel's name; the lines every panel shares (the statistic, what the band and the
    thin lines are) go once into the figure's title. A panel whose subset is empty says so."""
    shared = []
    for axes, (st, title, df) in zip(fig_axes, panels):
        res = as_result(st, kind, df)
        try:
            drawn = res.plot(ax=axes if len(axes) > 1 else axes[0], **plot_kw)
        except ValueError as e:  # e.g. no correctly answered sample in this panel: say so in the panel
            for ax in axes:
                _empty(ax, title, "\n".join(str(e).split("; ")))
            continue
        for ax in np.atleast_1d(drawn):
            first, *rest = ax.get_title().split("\n")
            ax.set_title(f"{title}\n{first}", fontsize="small")
            shared += [r for r in rest if r not in shared]
    if shared:
        if plot_kw.get("samples") is False:
            shared = [r.replace("; thin lines: samples", "") for r in shared]
        fig.suptitle("; ".join(shared), fontsize="medium", y=1.0, va="bottom")  # above the panels, never over a title


def knockout_figure(studies, facet: str | None = "kind", subset: str = "correct"):
    panels = _panels(_studies(studies), "knockout", facet)
    fig, axes = _wrapped(len(panels))
    _draw(fig, axes, panels, "knockout", correct_only=subset == "correct")
    fig.tight_layout()
    return fig


def discarding_figure(studies, facet: str | None = "kind"):
    """Accuracy is 0 or 1 per sample: thin per-sample lines would only zigzag between the two, so the
    figure shows the mean, its band and n."""
    panels = _panels(_studies(studies), "discarding", facet)
    fig, axes = _wrapped(len(panels))
    _draw(fig, axes, panels, "discarding", value="correct", correct_only=False, samples=False)
    for (ax,), (_, _, df) in zip(axes, panels):
        twin = ax.twinx()
        flops = df.groupby("from_layer")["flops_saved"].mean()  # analytic: the same for every sample of a layout
        twin.plot(flops.index, flops.values, ls="--", color="grey", label="FLOPs saved")
        twin.set(ylim=(-0.05, 1.05), ylabel="FLOPs saved (fraction, dashed)")  # the same scale as accuracy: 0 is 0 on both
        ax.set(ylim=(-0.05, 1.05), ylabel="accuracy (all samples)")
    fig.tight_layout()
    return fig


def indirect_effect_figure(studies, subset: str = "correct", facet: str | None = "kind"):
    """One row per study x `facet` value x corrupted modality, one column per restore site."""
    studies = _studies(studies)
    panels = _panels(studies, "causal_tracing", facet, split="corrupted")
    n_sites = max(df["site"].nunique() for _, _, df in panels)
    if n_sites == 1:  # one site: panels side by side, two to a row
        fig, rows = _wrapped(len(panels))
        _draw(fig, rows, panels, "causal_tracing", correct_only=subset == "correct")
        fig.tight_layout()
        return fig
    fig, axes = _grid(len(panels), n_sites)
    rows = []
    for row, (st, title, df) in zip(axes, panels):
        k = df["site"].nunique()
        for ax in row[k:]:
            ax.set_visible(False)
        rows.append(list(row[:k]))
    _draw(fig, rows, panels, "causal_tracing", correct_only=subset == "correct")
    fig.tight_layout()
    return fig


SPLIT = {"logit_lens": "lens"}  # a column drawn as panels of its own


def experiment_figure(studies, experiment: str, facet: str | None = "kind"):
    """`Result.plot` of `experiment` (knockout_accuracy: from the knockout rows) per study x facet."""
    studies = _studies(studies)
    if experiment == "knockout_accuracy":
        return _knockout_accuracy_figure(studies, facet)
    panels = _panels(studies, experiment, facet, split=SPLIT.get(experiment))
    if experiment == "dla":
        return dla_figures(panels)
    fig, rows = _wrapped(len(panels))
    _draw(fig, rows, panels, experiment, correct_only=False)
    fig.tight_layout()
    return fig


def dla_figures(panels) -> list:
    """DLA: one figure per panel (a row of layer x head heatmaps, one per source group, as
    `Result.plot` lays it out), every heatmap of every figure on one symmetric colour scale, so a
    colour means the same logit contribution in every panel."""
    figs = []
    for st, title, df in panels:
        axes = as_result(st, "dla", df).plot(correct_only=False)
        fig = np.atleast_1d(axes)[0].figure
        fig.suptitle(f"{title}: mean direct logit attribution per layer and head (logit), all samples; "
                     "one colour scale for every panel", fontsize="small", y=1.02)
        figs.append(fig)
    images = [im for fig in figs for ax in fig.axes for im in ax.get_images()]
    m = max((max(abs(v) for v in im.get_clim()) for im in images), default=1.0)
    for im in images:
        im.set_clim(-m, m)
    return figs


def _knockout_accuracy_figure(studies, facet):
    from patching.methods.knockout import knockout_accuracy

    panels = _panels(studies, "knockout", facet)
    fig, axes = _wrapped(len(panels))
    for (ax,), (st, title, df) in zip(axes, panels):
        # the library's own `correct` (gold is the plain run's top token), Map the Flow's count
        res = knockout_accuracy(Result("knockout", df.assign(sample=pd.factorize(df["id"])[0])))
        res.plot(ax=ax)
        ax.set_title(f"{title}\n{ax.get_title()}", fontsize="small")
        handles, labels = ax.get_legend_handles_labels()  # below the axes: inside, it hid the curves
        ax.legend(handles, labels, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False,
                  title=ax.get_legend().get_title().get_text(), title_fontsize="small")
    fig.tight_layout()
    return fig
