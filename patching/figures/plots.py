"""Figures of experiment `Result`s (`Result.plot` calls `plot`), drawn so that they say what the data say.

- Every dimension of interest keeps its own series or panel: the edge (knockout), the restored token
  set and the restore site (causal tracing, activation patching, attribution), the token group (logit
  lens, DLA), the run (pathway), the method (FastV), the discarded group. Nothing is averaged away
  but the samples.
- Line plots show the mean over samples with a bootstrap 95 % interval of the mean as a band (the
  percentile bootstrap of `patching.engine.stats.bootstrap_ci`, seeded), and every sample as a faint
  line of the same colour, so a bimodal cell (half the samples at 0, half at -100) reads as two
  bundles, not as one mean at -50. Accuracies from counts (knockout_accuracy) carry a Wilson 95 %
  interval.
- The number of samples behind each series is in the legend (`n=`), the statistic in the title, layer
  axes have integer ticks, signed quantities use a diverging colour map centred on 0 with symmetric
  limits, and per-position heatmaps label positions with the TokenMap's labels when one is given.

    res.plot()                       # knockout: one line per edge, band and samples
    res.plot(tm=tm, sample=0)        # per-position patching: layer x position heatmap, tokens labelled
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import CenteredNorm, Normalize
from matplotlib.ticker import MaxNLocator

from patching.engine import checks, experiment
from patching.engine.stats import bootstrap_ci
from patching.methods.knockout import DEFAULT_WINDOW

SIGNED = {"normalised", "attribution", "indirect_effect", "ie_corrupt_pred", "rel_change", "rel_change_pred", "dla",
          "mds", "metric_change"}  # values with a meaningful 0 in the middle: diverging colours centred there
MAX_SAMPLE_LINES = 200  # per series; past this the faint lines are a smear, the band says the rest
MAX_TICK_LABELS = 60  # per axis; past this every k-th position is labelled
BAND = "band: bootstrap 95% CI of the mean; thin lines: samples"


def plot(result, ax=None, correct_only: bool | None = None, value: str | None = None, tm=None, sample: int | None = None,
         samples: bool = True, min_gap: float | None = None, figsize=None):
    """The figure of `result` (a `patching.engine.results.Result`). `value`: the column shown (default per
    kind); `correct_only` as in `Result.rows`; `tm`: the TokenMap of the inputs, whose labels name the
    positions of per-position heatmaps; `sample`: show that sample only (per-position heatmaps of
    samples with different layouts need it); `samples`: draw every sample as a faint line;
    `min_gap` (activation patching's `normalised` only, default 0.05): samples whose clean -
    corrupted gap is below that share of the largest gap among the samples are left out (their
    ratio divides by almost nothing: a sample the corruption does not change has no effect to
    restore), and the title says how many.
    Returns the Axes, or an array of Axes when the figure has several panels (`ax` may then be a
    sequence of that many Axes). How each kind is drawn is its record's `plot` (`patching.engine.experiment`)."""
    kind = result.kind
    record = experiment.get(kind) if experiment.known(kind) else None
    if record is None or record.plot is None:
        raise ValueError(f"no figure for a {kind!r} result; kinds with one: {sorted(experiment.names(plotted=True))}")
    value = value or record.value
    if value not in result.df.columns:
        raise ValueError(f"this {kind} frame has no column {value!r}; choose from {list(result.df.columns)}")
    df = result.rows(correct_only)
    if sample is not None:
        if sample not in set(df["sample"]):
            raise ValueError(f"no rows for sample {sample}; samples here: {sorted(set(df['sample']))}")
        df = df[df["sample"] == sample]
    subset = "correct samples" if (record.correct_only if correct_only is None else correct_only) else "all samples"
    note = ""
    if value == "normalised" and {"m_clean", "m_corrupt"} <= set(df.columns):
        share = 0.05 if min_gap is None else checks.finite(min_gap, "min_gap", minimum=0)
        gap = (df["m_clean"] - df["m_corrupt"]).abs()
        small = df.loc[gap < share * gap.max(), "sample"].unique()
        if len(small):
            note = f"; {len(small)} left out: |clean - corrupted| < {share:g} x the largest"
            df = df[~df["sample"].isin(small)]
    elif min_gap is not None:
        raise ValueError("min_gap applies to activation patching's 'normalised' value only")
    ctx = dict(kind=kind, value=value, subset=subset, note=note, tm=tm, sample=sample, samples=samples, settings=result.settings,
               record=record)
    return STYLES[record.plot.style](df, ax, figsize, ctx)


# ---- statistics -------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % for z 1.96), as fractions."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def per_sample(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """One value per (keys, sample): the mean over a sample's rows in a cell (e.g. several heads), NaN
    rows dropped (a normalised effect whose clean and corrupted metric agree)."""
    out = df.groupby([*keys, "sample"], sort=False)[value].mean().reset_index()
    return out[np.isfinite(out[value].astype(float))]


def _legend(ax, ns: dict, what: str) -> None:
    """Legend below the axes (never over the data) with the sample counts: in its title when every
    series has the same n, else per entry."""
    counts = set(ns.values())
    if len(counts) != 1:
        for artist in [*ax.get_lines(), *ax.patches]:
            if artist.get_label() in ns:
                artist.set_label(f"{artist.get_label()} (n={ns[artist.get_label()]})")
    ax.legend(fontsize="small", title=f"n={counts.pop()} {what}" if len(counts) == 1 else what, title_fontsize="small",
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, len(ns)), frameon=False)


# ---- layout helpers ---------------------------------------------------------------------------
def _axes(ax, n: int, figsize, width: float = 5.5, height: float = 3.8, sharey: bool = True):
    """`n` panels side by side (a given `ax`, or a sequence of n Axes, is used as is)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = np.atleast_1d(np.asarray(ax, dtype=object))
        if len(axes) != n:
            raise ValueError(f"this figure has {n} panel(s) but ax holds {len(axes)}; pass {n} Axes or leave ax=None")
        return axes
    _, axes = plt.subplots(1, n, figsize=figsize or (width * n, height), squeeze=False, sharey=sharey)
    return axes[0]


def _out(axes):
    return axes[0] if len(axes) == 1 else axes


def _colours(names) -> dict:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def _integer_ticks(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def _norm(values: np.ndarray, value: str):
    """Diverging and centred on 0 (symmetric limits) for signed values, else sequential from the data."""
    finite = values[np.isfinite(values)]
    if value in SIGNED or (finite.size and finite.min() < 0):
        return CenteredNorm(vcenter=0.0, halfrange=float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0), "RdBu_r"
    lo = 0.0 if not finite.size or finite.min() >= 0 else float(finite.min())
    return Normalize(lo, float(finite.max()) if finite.size and finite.max() > lo else lo + 1.0), "viridis"


def _series_title(ctx, extra: str = "") -> str:
    band = BAND if ctx["samples"] else BAND.split(";")[0]  # no faint lines drawn, none claimed
    return f"{ctx['kind'].replace('_', ' ')}{extra}\nmean over {ctx['subset']}{ctx['note']}\n{band}"


# ---- lines against layer ----------------------------------------------------------------------
def _lines(ax, df, x: str, series: str, ctx) -> dict:
    """Per series: the mean over samples against `x`, its bootstrap band, the samples as faint lines.
    Returns {series name: number of samples}."""
    value = ctx["value"]
    ps = per_sample(df, [series, x], value)
    names = list(dict.fromkeys(df[series]))
    colour = _colours(names)
    ns, faint = {}, []
    for name in names:  # the labelled mean lines first, so ax.get_lines() starts with one line per series
        part = ps[ps[series] == name]
        grid = part.pivot_table(index="sample", columns=x, values=value, sort=True)
        xs = grid.columns.to_numpy()
        mean = np.array([np.nanmean(grid[c]) for c in xs])
        ci = np.array([bootstrap_ci(grid[c].dropna().to_numpy()) for c in xs]).reshape(-1, 2)
        ax.plot(xs, mean, marker="o", ms=3, lw=1.8, color=colour[name], label=str(name))
        ax.fill_between(xs, ci[:, 0], ci[:, 1], color=colour[name], alpha=0.15, lw=0)
        ns[str(name)] = len(grid)
        faint.append((name, grid))
    if ctx["samples"]:
        for name, grid in faint:
            for _, row in grid.head(MAX_SAMPLE_LINES).iterrows():
                ax.plot(row.index, row.values, color=colour[name], lw=0.8, alpha=0.35, label="_sample")
    return ns


def _line_panels(df, ax, figsize, ctx, x: str, series: str, panel: str | None, xlabel: str, what: str = ""):
    panels = list(dict.fromkeys(df[panel])) if panel else [None]
    axes = _axes(ax, len(panels), figsize)
    for a, p in zip(axes, panels):
        part = df if p is None else df[df[panel] == p]
        if (part[x] < 0).all():  # one cell over every layer at once (e.g. causal tracing with window=None)
            ns = _bars(a, part, series, ctx)
        else:
            ns = _lines(a, part, x, series, ctx)
            _integer_ticks(a.xaxis)
            a.set_xlabel(xlabel)
        a.axhline(0, color="grey", lw=0.5)
        a.set_title(_series_title(ctx, what + ("" if p is None else f" ({panel} {p})")), fontsize="small")
        _legend(a, ns, ctx["subset"])
    axes[0].set_ylabel(_ylabel(ctx))
    return _out(axes)


def _ylabel(ctx) -> str:
    record = ctx["record"]
    return record.label or record.value if ctx["value"] == record.value else ctx["value"]


def _bars(ax, df, series: str, ctx) -> dict:
    """One bar per series: mean over samples, bootstrap 95 % error bar, the samples as dots."""
    value = ctx["value"]
    ps = per_sample(df, [series], value)
    names = list(dict.fromkeys(df[series]))
    colour = _colours(names)
    ns = {}
    for i, name in enumerate(names):
        v = ps.loc[ps[series] == name, value].to_numpy(dtype=float)
        m, (lo, hi) = (v.mean() if len(v) else np.nan), bootstrap_ci(v)
        ax.bar(i, m, color=colour[name], alpha=0.7, label=str(name),
               yerr=[[max(m - lo, 0)], [max(hi - m, 0)]] if len(v) else None, capsize=4)
        if ctx["samples"] and len(v):
            jitter = np.random.default_rng(i).uniform(-0.25, 0.25, len(v))
            ax.scatter(i + jitter, v, s=8, color="black", alpha=0.4, zorder=3)
        ns[str(name)] = len(v)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={ns[str(n)]})" for n in names], fontsize="small")
    return ns


def _lines_style(df, ax, figsize, ctx):
    """The mean of the value against the record's `x`, one line per `series` (one panel per `panel`);
    a knockout's title says which layers a point knocks out."""
    spec, what = ctx["record"].plot, ""
    st = ctx["settings"]
    if spec.window and st.get("window_style"):  # the x axis is the window's anchor layer
        k = st.get("window")
        size = "" if st["window_style"] in ("top_down", "bottom_up") else f"{DEFAULT_WINDOW if k is None else k}-layer "
        what = f", {size}{st['window_style'].replace('_', '-')} window at each layer"
    return _line_panels(df, ax, figsize, ctx, spec.x, spec.series, spec.panel, spec.xlabel or spec.x, what)


def _traced(df, ax, figsize, ctx):
    """Causal tracing / activation patching / attribution: per-position heatmaps when positions were
    patched one by one, else one panel per site with one line per token set."""
    if "pos" in df.columns and (df["pos"] >= 0).any():
        return _position_heatmaps(df, ax, figsize, ctx)
    if "head" in df.columns and (df["head"] >= 0).any():
        return _head_heatmaps(df, ax, figsize, ctx)
    spec = ctx["record"].plot
    return _line_panels(df, ax, figsize, ctx, spec.x, spec.series, spec.panel, spec.xlabel or spec.x)


# ---- heatmaps ---------------------------------------------------------------------------------
def position_labels(tm, row: int) -> list[str]:
    """Labels of the real (unpadded) positions of `row`: `tm.labels(row)` where the TokenMap has it,
    else its group names."""
    labels = tm.labels(row) if hasattr(tm, "labels") else tm.names(row)
    keep = (~tm.padding[row]).tolist()
    return [str(label) for label, k in zip(labels, keep) if k]


def _position_grid(df, ctx) -> tuple[pd.DataFrame, list[str], int]:
    """(layer x position mean over samples, position labels, number of samples). Samples are averaged
    position by position only when they share one token layout."""
    value = ctx["value"]
    layouts = {s: tuple(p.drop_duplicates("pos").sort_values("pos")["tokens"]) for s, p in df.groupby("sample")}
    if len(set(layouts.values())) > 1:
        lengths = sorted({len(v) for v in layouts.values()})
        raise ValueError(f"the samples have different token layouts (lengths {lengths}), so position p is not the same token "
                         f"in each; pass sample= (one of {sorted(layouts)}) to plot one sample")
    ps = per_sample(df, ["layer", "pos"], value)
    grid = ps.groupby(["layer", "pos"])[value].mean().unstack("pos").sort_index()
    first = min(layouts)
    if ctx["tm"] is not None:
        labels = position_labels(ctx["tm"], first)
        if len(labels) != grid.shape[1]:
            raise ValueError(f"the TokenMap has {len(labels)} real positions in row {first} but the result has {grid.shape[1]}; "
                             "pass the TokenMap of the inputs the experiment ran on")
    else:
        labels = list(layouts[first])
    return grid, labels, len(layouts)


def _label_positions(ax, labels: list[str]) -> None:
    step = max(1, math.ceil(len(labels) / MAX_TICK_LABELS))
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=6)


def _heatmap(ax, grid: pd.DataFrame, norm, cmap):
    im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(grid.index)), [str(int(i)) for i in grid.index], fontsize="small")
    return im


def _shared_norm(grids, ctx):
    return _norm(np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids]), ctx["value"])


def _position_heatmaps(df, ax, figsize, ctx):
    keys = ["site"] + (["head"] if "head" in df.columns and (df["head"] >= 0).any() else [])
    panels = list(dict.fromkeys(map(tuple, df[keys].to_numpy().tolist())))
    made = []
    for p in panels:
        part = df[(df[keys] == pd.Series(p, index=keys)).all(axis=1)]
        made.append((p, *_position_grid(part, ctx)))
    axes = _axes(ax, len(panels), figsize, width=max(6.0, 0.12 * made[0][1].shape[1] + 2), height=4.2)
    norm, cmap = _shared_norm([m[1] for m in made], ctx)
    for a, (p, grid, labels, n) in zip(axes, made):
        im = _heatmap(a, grid, norm, cmap)
        _label_positions(a, labels)
        a.set(xlabel="position", ylabel="layer")
        who = f"sample {ctx['sample']}" if ctx["sample"] is not None else f"mean over n={n}, {ctx['subset']}{ctx['note']}"
        a.set_title(f"{ctx['kind'].replace('_', ' ')}: {' '.join(map(str, p))}, {ctx['value']} ({who})", fontsize="small")
    axes[0].figure.colorbar(im, ax=list(axes), label=_ylabel(ctx))
    return _out(axes)


def _head_heatmaps(df, ax, figsize, ctx, panel: str = "tokens"):
    """Layer x head heatmaps, one panel per `panel` value (token set, or DLA's source group)."""
    value = ctx["value"]
    panels = list(dict.fromkeys(df[panel]))
    grids, ns = [], []
    for p in panels:
        ps = per_sample(df[df[panel] == p], ["layer", "head"], value)
        grids.append(ps.groupby(["layer", "head"])[value].mean().unstack("head").sort_index())
        ns.append(ps["sample"].nunique())
    axes = _axes(ax, len(panels), figsize, width=3.6, height=3.6)
    norm, cmap = _shared_norm(grids, ctx)
    for a, p, grid, n in zip(axes, panels, grids, ns):
        im = _heatmap(a, grid, norm, cmap)
        a.set_xticks(range(grid.shape[1]), [str(int(h)) for h in grid.columns], fontsize="small")
        a.set_xlabel("head")
        a.set_title(f"{p} (n={n})", fontsize="small")
    axes[0].figure.colorbar(im, ax=list(axes), label=f"mean {_ylabel(ctx)} over {ctx['subset']}{ctx['note']}")
    axes[0].set_ylabel("layer")
    axes[0].figure.suptitle(f"{ctx['kind'].replace('_', ' ')}: mean {value} per layer and head", fontsize="small", y=1.04)
    return _out(axes)


def _heads_style(df, ax, figsize, ctx):
    return _head_heatmaps(df, ax, figsize, ctx, panel=ctx["record"].plot.panel)


# ---- the other kinds --------------------------------------------------------------------------
def _knockout_accuracy(df, ax, figsize, ctx):
    """Accuracy under the knockout per edge against layer with Wilson 95 % bands over the samples
    counted (`settings["n_samples"]`), the plain run's accuracy dashed."""
    n = ctx["settings"].get("n_samples")
    if not n:
        raise ValueError("this knockout_accuracy result has no settings['n_samples'] (the samples counted); "
                         "make it with patching.methods.knockout.knockout_accuracy")
    (ax,) = _axes(ax, 1, figsize)
    edges = list(dict.fromkeys(df["edge"]))
    colour = _colours(edges)
    for edge in edges:
        part = df[df["edge"] == edge].sort_values("layer")
        acc = part[ctx["value"]].to_numpy(dtype=float)
        ns = part["n_samples"].to_numpy(dtype=float) if "n_samples" in part else np.full(len(acc), n)  # per edge
        band = np.array([wilson(a / 100 * k, k) for a, k in zip(acc, ns)]) * 100
        ax.plot(part["layer"], acc, marker="o", ms=3, color=colour[edge], label=edge)
        ax.fill_between(part["layer"], band[:, 0], band[:, 1], color=colour[edge], alpha=0.1, lw=0)
    if "accuracy_base" in df.columns:
        ax.axhline(float(df["accuracy_base"].iloc[0]), color="black", ls="--", lw=1, label="no knockout")
    _integer_ticks(ax.xaxis)
    mode = ctx["settings"].get("sample_mode", "correct")
    ax.set(xlabel="window centre layer", ylabel=_ylabel(ctx), ylim=(-2, 102),
           title=f"knockout accuracy ({mode} samples counted) over n={n}\nband: Wilson 95% interval")
    ax.title.set_fontsize("small")
    # below the axes: accuracy curves fill the whole height, so a legend inside covers a curve
    ax.legend(fontsize="small", title=f"n={n} samples", title_fontsize="small", loc="upper center",
              bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    return ax


def _pathway(df, ax, figsize, ctx):
    """Accuracy (or `value`) of the pathway and its random baseline, one bar each with the share of
    attention edges kept; the plain run's accuracy dashed."""
    (ax,) = _axes(ax, 1, figsize, width=5.0)
    ns = _bars(ax, df, "run", ctx)
    kept = df.groupby("run", sort=False)["kept_share"].mean()
    ax.set_xticks(ax.get_xticks(), [f"{r}\nkept {kept[r]:.0%} of edges\n(n={ns[str(r)]})" for r in kept.index], fontsize="small")
    if ctx["value"] == "correct" and "correct_orig" in df.columns:
        ax.axhline(df.groupby("sample")["correct_orig"].first().mean(), color="black", ls="--", lw=1, label="no blocking")
        ax.legend(fontsize="small")
    ax.set(ylabel=_ylabel(ctx), title=f"effective pathway: mean {ctx['value']} over {ctx['subset']}\n"
                                      "error bars: bootstrap 95% CI; dots: samples")
    ax.title.set_fontsize("small")
    return ax


def _fastv(df, ax, figsize, ctx):
    """Accuracy (or `value`) against the share of prefill FLOPs saved, one point per method with a
    bootstrap 95 % error bar over samples."""
    (ax,) = _axes(ax, 1, figsize, width=5.5)
    value = ctx["value"]
    methods = list(dict.fromkeys(df["method"]))
    colour = _colours(methods)
    for m in methods:
        part = df[df["method"] == m]
        v = part.groupby("sample")[value].mean().to_numpy(dtype=float)
        lo, hi = bootstrap_ci(v)
        x = float(part["flops_saved"].mean())
        ax.errorbar(x, v.mean(), yerr=[[v.mean() - lo], [hi - v.mean()]], fmt="o", capsize=4, color=colour[m],
                    label=f"{m} (n={len(v)})")
    ax.set(xlabel="prefill FLOPs saved (fraction)", ylabel=_ylabel(ctx),
           title=f"FastV vs discarding: mean {value} over {ctx['subset']}\nerror bars: bootstrap 95% CI")
    ax.title.set_fontsize("small")
    ax.legend(fontsize="small")
    return ax


def _sinks(df, ax, figsize, ctx):
    """One point per sink: position against its modality dominance score, by modality and by
    cross-modal / unimodal; the legend counts sinks and samples."""
    (ax,) = _axes(ax, 1, figsize)
    for (m, cross), part in df.groupby(["modality", "cross_modal"]):
        ax.scatter(part["pos"], part[ctx["value"]], s=14,
                   label=f"{m} {'cross-modal' if cross else 'unimodal'} ({len(part)} sinks, n={part['sample'].nunique()})")
    ax.axhline(0, color="grey", lw=0.5)
    _integer_ticks(ax.xaxis)
    ax.set(xlabel="position", ylabel=_ylabel(ctx), title=f"sinks: {ctx['value']} per sink over layers ({ctx['subset']})")
    ax.title.set_fontsize("small")
    ax.legend(fontsize="small")
    return ax


STYLES = {  # a record's `Plot.style` -> how it is drawn
    "lines": _lines_style, "traced": _traced, "heads": _heads_style, "accuracy": _knockout_accuracy,
    "bars": _pathway, "points": _fastv, "scatter": _sinks,
}
