"""The papers' figures from study summaries (`stats.Study.summary`), each taking one study or several
side by side (two models, two datasets) and returning a matplotlib Figure.

- `knockout_figure`: relative change of p(answer) against the window's centre layer, one line per
  edge with its bootstrap 95 % band, over correctly answered samples; one panel per study and value
  of `facet` (e.g. the toy's question kind).
- `discarding_figure`: accuracy with the media discarded from layer L on (band: 95 % interval) and
  the FLOPs saved, against L.
- `indirect_effect_figure`: causal tracing's indirect effect per restored token set (bars at the
  layer where the mean peaks, error bars: 95 % interval), per corrupted modality and site.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: a study runs headless
import matplotlib.pyplot as plt  # noqa: E402

from matplotlib.ticker import MaxNLocator  # noqa: E402

from patching.study.stats import DEFAULTS, Study  # noqa: E402


def _studies(studies) -> list[Study]:
    items = studies if isinstance(studies, (list, tuple)) else [studies]
    return [s if isinstance(s, Study) else Study(s) for s in items]


def _title(study: Study, many: bool) -> str:
    return f"{study.model} ({study.dir.name})" if many else study.model


def _panels(studies, experiment, facet, value=None, subset="correct"):
    """[(title, summary rows)] for every study x facet value (samples pooled over everything else)."""
    out = []
    for st in studies:
        columns = st.frame(experiment).columns
        facet_here = facet if facet and facet in columns else None
        by = ["model"] + ([facet_here] if facet_here else []) + [c for c in DEFAULTS[experiment][1] if c in columns]
        s = st.summary(experiment, value=value, by=by)
        s = s[s.subset == subset]
        if facet_here:
            out += [(f"{_title(st, len(studies) > 1)}: {v}", part) for v, part in s.groupby(facet, sort=True)]
        else:
            out.append((_title(st, len(studies) > 1), s))
    return out


def _axes(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, sharey=True)
    return fig, axes[0]


def knockout_figure(studies, facet: str | None = "kind", subset: str = "correct"):
    panels = _panels(_studies(studies), "knockout", facet, subset=subset)
    fig, axes = _axes(len(panels))
    for ax, (title, s) in zip(axes, panels):
        for edge, part in s.groupby("edge", sort=False):
            part = part.sort_values("layer")
            line, = ax.plot(part.layer, part["mean"], marker="o", ms=3, label=edge)
            ax.fill_between(part.layer, part.ci_low, part.ci_high, color=line.get_color(), alpha=0.15, lw=0)
        n = int(s.n_samples.max()) if len(s) else 0
        ax.axhline(0, color="grey", lw=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=f"{title} (n={n})", xlabel="window centre layer")
    axes[0].set_ylabel(f"relative change of p(answer) (%), {subset} samples")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def discarding_figure(studies, facet: str | None = None):
    studies = _studies(studies)
    acc = _panels(studies, "discarding", facet, subset="all")
    flops = _panels(studies, "discarding", facet, value="flops_saved", subset="all")
    fig, axes = _axes(len(acc))
    for ax, (title, s), (_, f) in zip(axes, acc, flops):
        for group, part in s.groupby("group", sort=False):
            part = part.sort_values("from_layer")
            line, = ax.plot(part.from_layer, part["mean"], marker="o", ms=3, label=f"accuracy ({group} discarded)")
            ax.fill_between(part.from_layer, part.ci_low, part.ci_high, color=line.get_color(), alpha=0.15, lw=0)
        twin = ax.twinx()
        for group, part in f.groupby("group", sort=False):
            part = part.sort_values("from_layer")
            twin.plot(part.from_layer, part["mean"], ls="--", color="grey", label="FLOPs saved")
        twin.set(ylim=(0, 1), ylabel="FLOPs saved (fraction)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=f"{title} (n={int(s.n_samples.max()) if len(s) else 0})", xlabel="discarded from layer", ylim=(0, 1.05))
    axes[0].set_ylabel("accuracy, all samples")
    axes[-1].legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return fig


def indirect_effect_figure(studies, subset: str = "correct"):
    studies = _studies(studies)
    fig, axes = _axes(len(studies), width=5.0)
    for ax, st in zip(axes, studies):
        cells = [c for c in DEFAULTS["causal_tracing"][1] if c in st.frame("causal_tracing").columns]
        s = st.summary("causal_tracing", by=["model"] + cells)
        s = s[(s.subset == subset) & (s.n_samples > 0)]
        keys = [c for c in cells if c != "layer"]
        peak = s.loc[s.groupby(keys, sort=False)["mean"].idxmax()] if len(s) else s
        labels = [" / ".join(str(r[k]) for k in keys) + f" (L{int(r.layer)})" for _, r in peak.iterrows()]
        err = [(peak["mean"] - peak.ci_low).clip(lower=0), (peak.ci_high - peak["mean"]).clip(lower=0)]
        ax.bar(range(len(peak)), peak["mean"], yerr=err, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(peak)), labels, rotation=30, ha="right", fontsize="small")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(title=_title(st, len(studies) > 1), ylabel=f"indirect effect (peak layer), {subset}")
    fig.tight_layout()
    return fig
