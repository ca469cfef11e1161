"""Figures of experiment `Result`s (`Result.plot` calls `plot`), drawn so that they say what the data say.

- Every dimension of interest keeps its own series or panel: the edge (knockout), the restored token
  set and the restore site (causal tracing, activation patching, attribution), the token group (logit
  lens, DLA), the run (pathway), the method (FastV), the discarded group. Nothing is averaged away
  but the samples.
- The statistics are `patching.engine.stats`' (`cell_table`), the ones a study's tables report: the
  mean over samples with its 95 % interval as a band (Wilson for 0/1 outcomes, the seeded percentile
  bootstrap for continuous ones, Wilson of the share where every sample sits at 0 or at one level);
  cells with fewer than 5 samples drawn as an x with no band; cells whose paired test against the
  plain run holds after Holm's correction over the figure's cells marked with a star.
- Continuous values keep every sample as a faint line of the same colour, so a bimodal cell reads as
  two bundles; 0/1 outcomes, and values all at 0 or one level (a knockout that loses all of p(answer)
  or none), are drawn as the share with its interval instead: their sample lines would only zigzag.
- More than 10 series get distinct colour and line-style pairs; a series whose curve is another's says
  so in the legend. Accuracy figures draw the chance level (`chance=`). No axis zooms into the
  numerical floor (`stats.min_half_range`).
- The number of samples behind each series is in the legend (`n=`), the statistic in the title, layer
  axes have integer ticks, signed quantities use a diverging colour map centred on 0 with symmetric
  limits, and per-position heatmaps label positions with the TokenMap's labels when one is given.

    res.plot()                       # knockout: one line per edge, band and samples; a Figure
    res.plot(tm=tm, sample=0)        # per-position patching: layer x position heatmap, tokens labelled
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import CenteredNorm, Normalize
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import offset_copy

from patching.engine import checks, experiment
from patching.engine.stats import (
    ALPHA,
    CORRECTION,
    MIN_N,
    cell_table,
    min_half_range,
    numerical_floor,
    two_level,
)

SIGNED = {"normalised", "attribution", "indirect_effect", "ie_corrupt_pred", "rel_change", "rel_change_pred", "dla",
          "mds", "metric_change"}  # values with a meaningful 0 in the middle: diverging colours centred there
MAX_SAMPLE_LINES = 200  # per series; past this the faint lines are a smear, the band says the rest
MAX_TICK_LABELS = 60  # per axis; past this every k-th position is labelled
MAX_PLAIN_SERIES = 10  # past this, series differ by colour and line style
LEGEND_WIDTH = 48  # characters per legend line
LEGEND_DROP = 34  # points between the axes' bottom and the legend: room for tick labels and the x label
SAME_AT_SCALE = 0.005  # curves closer than this share of the y axis are one line on the page
LINE_STYLES = ("-", "--", "-.", ":")
BAND_NAMES = {"bootstrap": "bootstrap 95% CI of the mean", "Wilson": "Wilson 95% CI",
              "Wilson, two levels": "Wilson 95% CI of the share (every sample at 0 or one level)"}


def plot(result, ax=None, correct_only: bool | None = None, value: str | None = None, tm=None, sample: int | None = None,
         samples: bool = True, min_gap: float | None = None, figsize=None, chance: float | None = None, cells=None):
    """The figure of `result` (a `patching.engine.results.Result`), a matplotlib `Figure`. `value`: the
    column shown (default per kind); `correct_only` as in `Result.rows`; `tm`: the TokenMap of the
    inputs, whose labels name the positions of per-position heatmaps; `sample`: show that sample only
    (per-position heatmaps of samples with different layouts need it); `samples`: draw every sample of
    a continuous value as a faint line; `min_gap` (activation patching's `normalised` only, default
    0.05): samples whose clean - corrupted gap is below that share of the largest gap among the
    samples are left out (their ratio divides by almost nothing: a sample the corruption does not
    change has no effect to restore), and the title says how many; `chance`: the chance accuracy (a
    fraction) drawn on accuracy figures; `cells`: the per-cell statistics to draw (`stats.cell_table`'s
    columns, e.g. a study's summary rows of this panel, whose Holm correction spans the whole figure;
    default: computed here over this figure's cells).
    `ax`: an Axes (or a sequence of as many Axes as the figure has panels) to draw into; the Figure
    holding them is returned. How each kind is drawn is its record's `plot` (`patching.engine.experiment`).

        res = knockout(model, inputs, [answer], window=1, progress=False)
        plot(res).savefig(tmp / "knockout.png")
    """
    kind = result.kind
    record = experiment.get(kind) if experiment.known(kind) else None
    if record is None or record.plot is None:
        raise ValueError(f"no figure for a {kind!r} result; kinds with one: {sorted(experiment.names(plotted=True))}")
    value = value or record.value
    if value not in result.df.columns:
        raise ValueError(f"this {kind} frame has no column {value!r}; choose from {list(result.df.columns)}")
    if chance is not None:
        checks.finite(chance, "chance", minimum=0)
        if chance > 1:
            raise ValueError(f"chance is an accuracy as a fraction in [0, 1], got {chance}")
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
    outcome = record.outcome_of(value, result.df[value])
    # the paired test belongs to the record's summary value (the effect it tests); a floor to the values in its unit
    paired = record.paired if value == record.summary_value and record.paired else None
    if paired is not None and outcome == "binary" and paired[1] not in df.columns:
        paired = None
    unit = record.unit if outcome == "continuous" and value in (record.value, record.summary_value) else None
    st = result.settings
    floor = numerical_floor(unit, st.get("dtype", "float32"), record.unit_scale(st) if record.unit_scale and unit else 1.0)
    ctx = dict(kind=kind, value=value, subset=subset, note=note, tm=tm, sample=sample, samples=samples, settings=st,
               record=record, outcome=outcome, paired=paired, unit=unit, floor=floor, chance=chance, cells=cells)
    drawn = STYLES[record.plot.style](df, ax, figsize, ctx)
    return np.atleast_1d(drawn)[0].figure


# ---- statistics -------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % for z 1.96), as fractions: the textbook
    formula, kept as the reference `patching.engine.stats.proportion_ci` (statsmodels) is tested against."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def per_sample(df: pd.DataFrame, keys: list[str], value: str, base: str | None = None) -> pd.DataFrame:
    """One value per (keys, sample): the mean over a sample's rows in a cell (e.g. several heads), NaN
    rows dropped (a normalised effect whose clean and corrupted metric agree); with `base`, that
    column's mean beside it (the plain run of a paired 0/1 comparison)."""
    cols = [value] if base is None else [value, base]
    out = df.groupby([*keys, "sample"], sort=False)[cols].mean().reset_index()
    return out[np.isfinite(out[value].astype(float))]


def _cells(ps: pd.DataFrame, keys: list[str], ctx, part: pd.DataFrame) -> pd.DataFrame:
    """The statistics of each cell of `ps` (`per_sample`'s frame of the rows `part`): `ctx["cells"]`
    where given (a study's summary: Holm over its whole figure), restricted to `part`'s values of its
    cell columns (those before `subset`), else `stats.cell_table` over these cells."""
    if ctx["cells"] is not None:
        given = ctx["cells"]
        missing = [k for k in keys if k not in given.columns]
        if missing:
            raise ValueError(f"cells= has no column(s) {missing}; pass the per-cell statistics of this figure's cells")
        by = list(given.columns[:list(given.columns).index("subset")]) if "subset" in given.columns else list(keys)
        for c in by:
            if c not in keys and c in part.columns:
                given = given[given[c].isin(part[c].unique())]
        if given.duplicated(keys).any():
            raise ValueError(f"cells= holds several rows per {keys} for this panel; pass the statistics of its cells only")
        return given
    paired = ctx["paired"] is not None
    frame = ps.rename(columns={ctx["value"]: "v"})
    if paired and ctx["outcome"] == "binary":
        frame = frame.rename(columns={ctx["paired"][1]: "base"})
    return cell_table(frame, keys, ctx["outcome"], ctx["floor"], paired)


def _lookup(table: pd.DataFrame, keys: dict) -> pd.DataFrame:
    mask = np.ones(len(table), dtype=bool)
    for k, v in keys.items():
        mask &= (table[k] == v).to_numpy()
    return table[mask]


def _band_text(methods, ctx, thin: bool, marks: bool, small: bool) -> str:
    """What the band, the thin lines and the marks of a panel are, for its title."""
    bands = [BAND_NAMES[m] for m in BAND_NAMES if m in set(methods)]  # one order in every panel
    parts = ["band: " + " or ".join(bands)] if bands else []
    if thin:
        parts.append("thin lines: samples")
    if small:
        parts.append(f"x: n < {MIN_N}, no interval")
    if ctx["paired"] is not None:  # the test is named whether or not a cell holds it
        test = "McNemar" if ctx["outcome"] == "binary" else "sign test"
        parts.append(f"*: {CORRECTION}-adjusted p < {ALPHA:g} ({test} vs the plain run){'' if marks else ', none here'}")
    if ctx["floor"] > 0 and ctx["paired"] is not None:
        parts.append(f"|effect| <= {ctx['floor']:.1g}: no effect")
    return "; ".join(parts)


def _legend(ax, ns: dict, what: str) -> None:
    """Legend below the axes (never over the data) with the sample counts: in its title when every
    series has the same n, else per entry."""
    counts = set(ns.values())
    if len(counts) != 1:
        for artist in [*ax.get_lines(), *ax.patches]:
            if artist.get_label() in ns:
                artist.set_label(f"{artist.get_label()} (n={ns[artist.get_label()]})")
    _legend_below(ax, f"n={counts.pop()} {what}" if len(counts) == 1 else what)


def _legend_below(ax, title: str, drop: float = LEGEND_DROP) -> None:
    """The axes' legend `drop` points under it (never over the data), long entries wrapped, fewer
    columns for them."""
    import textwrap

    handles, labels = ax.get_legend_handles_labels()
    labels = ["\n".join(textwrap.wrap(label, LEGEND_WIDTH)) for label in labels]  # a long merged entry wraps
    longest = max((len(line) for label in labels for line in label.split("\n")), default=0)
    ncol = 1 if longest > LEGEND_WIDTH // 2 + 4 else 2 if longest > 18 else 3
    below = offset_copy(ax.transAxes, fig=ax.figure, y=-drop, units="points")  # under the ticks and the x label
    ax.legend(handles, labels, fontsize="small", title=title, title_fontsize="small", loc="upper center",
              bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=min(ncol, max(1, len(labels))), frameon=False)


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


def _styles(names) -> dict:
    """{name: (colour, line style)}: solid lines in the colour cycle up to `MAX_PLAIN_SERIES` series;
    past that, distinct (colour, style) pairs (colour i mod 10, the i // 10-th of `LINE_STYLES`)."""
    colour = _colours(names)
    many = len(names) > MAX_PLAIN_SERIES
    return {n: (colour[n], LINE_STYLES[(i // MAX_PLAIN_SERIES) % len(LINE_STYLES)] if many else "-") for i, n in enumerate(names)}


def _same_curves(curves: dict, tol: float) -> dict:
    """{name: the earlier series whose curve it coincides with (within `tol` at every x)}: drawn later,
    it hides that one, and its legend entry says so."""
    out, seen = {}, []
    for name, (xs, ys) in curves.items():
        for other, (xo, yo) in seen:
            if len(xs) == len(xo) and np.array_equal(xs, xo) and np.allclose(ys, yo, rtol=0, atol=tol, equal_nan=True):
                out[name] = other
                break
        seen.append((name, (xs, ys)))
    return out


def _floor_axis(ax, ctx) -> None:
    """Widen the y axis to at least `stats.min_half_range` about its centre: no zoom into noise."""
    half = min_half_range(ctx["unit"], ctx["floor"])
    lo, hi = ax.get_ylim()
    if half > 0 and hi - lo < 2 * half:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - half, mid + half)


def _chance(ax, ctx, scale: float = 1.0) -> None:
    if ctx["chance"] is not None:
        ax.axhline(ctx["chance"] * scale, color="black", ls=":", lw=1, label=f"chance ({ctx['chance'] * scale:.3g})")


def _integer_ticks(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def _norm(values: np.ndarray, value: str, floor_half: float = 0.0):
    """Diverging and centred on 0 (symmetric limits) for signed values, else sequential from the data;
    never narrower than `floor_half` about 0 (no colour scale zooms into the numerical floor)."""
    finite = values[np.isfinite(values)]
    if value in SIGNED or (finite.size and finite.min() < 0):
        top = float(np.abs(finite).max()) if finite.size else 0.0
        return CenteredNorm(vcenter=0.0, halfrange=max(top, floor_half) if max(top, floor_half) > 0 else 1.0), "RdBu_r"
    lo = 0.0 if not finite.size or finite.min() >= 0 else float(finite.min())
    hi = float(finite.max()) if finite.size and finite.max() > lo else lo + 1.0
    return Normalize(lo, max(hi, lo + floor_half)), "viridis"


def _series_title(ctx, extra: str = "", band: str = "") -> str:
    return f"{ctx['kind'].replace('_', ' ')}{extra}\nmean over {ctx['subset']}{ctx['note']}\n{band}"


# ---- lines against layer ----------------------------------------------------------------------
def _lines(ax, df, x: str, series: str, ctx) -> tuple[dict, str, dict]:
    """Per series: the mean over samples against `x` with its band, x marks where n < 5, stars where
    the paired test holds, and (continuous values only) the samples as faint lines. Returns
    ({series name: number of samples}, what the band and marks are, {series name: (x, mean)})."""
    value = ctx["value"]
    base = ctx["paired"][1] if ctx["paired"] is not None and ctx["outcome"] == "binary" else None
    ps = per_sample(df, [series, x], value, base)
    table = _cells(ps, [series, x], ctx, df)
    names = list(dict.fromkeys(df[series]))
    style = _styles(names)
    ns, faint, curves, methods, bands, marks = {}, [], {}, [], {}, []
    any_small = any_mark = any_thin = False
    for name in names:  # the labelled mean lines first, so ax.get_lines() starts with one line per series
        part = ps[ps[series] == name]
        grid = part.pivot_table(index="sample", columns=x, values=value, sort=True)
        cells = _lookup(table, {series: name}).set_index(x).reindex(grid.columns)
        xs = grid.columns.to_numpy()
        mean = cells["mean"].to_numpy(dtype=float)
        lo, hi = cells["ci_low"].to_numpy(dtype=float), cells["ci_high"].to_numpy(dtype=float)
        colour, ls = style[name]
        ax.plot(xs, mean, marker="o", ms=3, lw=1.8, color=colour, ls=ls, label=str(name))
        bands[str(name)] = ax.fill_between(xs, lo, hi, where=np.isfinite(lo), color=colour, alpha=0.15, lw=0)
        small = (cells["n_samples"] < MIN_N).to_numpy()
        sig = (cells["significant"].fillna(False).to_numpy(dtype=bool) if ctx["paired"] is not None and "significant" in cells
               else np.zeros(len(xs), dtype=bool))
        marks.append((colour, xs, mean, small, sig))
        any_small |= bool(small.any())
        any_mark |= bool(sig.any())
        methods += [m for m in cells["interval"] if isinstance(m, str)]
        ns[str(name)] = len(grid)
        curves[str(name)] = (xs, mean)
        # 0/1 outcomes and values all at 0 or one level: the band is the share's; their lines would zigzag
        # (nor do values that never leave 0 by more than the floor: each sample's line is the mean's)
        v = part[value].to_numpy(dtype=float)
        thin = ctx["outcome"] == "continuous" and two_level(v, ctx["floor"]) is None and bool(np.abs(v).max(initial=0) > ctx["floor"])
        if thin:
            faint.append((name, grid))
    for colour, xs, mean, small, sig in marks:  # after every series' line: ax.get_lines() starts with one line per series
        if small.any():
            ax.plot(xs[small], mean[small], "x", ms=7, mew=1.5, color=colour, label="_small")
        if sig.any():
            ax.plot(xs[sig], mean[sig], "*", ms=9, color=colour, mec="black", mew=0.5, label="_significant")
    if ctx["samples"]:
        for name, grid in faint:
            colour, _ = style[name]
            for _, row in grid.head(MAX_SAMPLE_LINES).iterrows():
                ax.plot(row.index, row.values, color=colour, lw=0.8, alpha=0.35, label="_sample")
            any_thin = True
    ax._series_bands = bands  # for _merge_same: the bands of series hidden under another
    return ns, _band_text(methods, ctx, any_thin, any_mark, any_small), curves


def _merge_same(ax, curves: dict, ns: dict, tol: float, exact: float = 0.0) -> None:
    """Series whose curves coincide (within `tol` at every x: closer than the eye tells apart) share
    one legend entry, on the line drawn last (the one seen): "a = b (same curve)" when they agree
    within `exact` (the numerical floor), else "(one line at this scale)"; the lines under it leave
    the legend. `ns` follows the labels."""
    same = _same_curves(curves, tol)
    groups: dict = {}
    for name in curves:
        root = name
        while root in same:
            root = same[root]
        groups.setdefault(root, []).append(name)
    relabel = {}
    for members in groups.values():
        if len(members) > 1:
            ys = np.array([curves[m][1] for m in members], dtype=float)
            spread = float(np.nanmax(ys.max(0) - ys.min(0))) if np.isfinite(ys).any() else 0.0
            what = "same curve" if spread <= exact else "one line at this scale"
            relabel[members[-1]] = f"{' = '.join(members)} ({what})"
            relabel.update({m: "_hidden" for m in members[:-1]})
    for line in ax.get_lines():
        name = line.get_label()
        if name in relabel:
            line.set_label(relabel[name])
            n = ns.pop(name)
            if not relabel[name].startswith("_"):
                ns[relabel[name]] = n
            else:  # its band lies under the one drawn over it: stacked, it would only darken that one
                band = getattr(ax, "_series_bands", {}).get(name)
                if band is not None:
                    band.set_visible(False)


def _line_panels(df, ax, figsize, ctx, x: str, series: str, panel: str | None, xlabel: str, what: str = ""):
    panels = list(dict.fromkeys(df[panel])) if panel else [None]
    axes = _axes(ax, len(panels), figsize)
    for a, p in zip(axes, panels):
        part = df if p is None else df[df[panel] == p]
        curves = {}
        if (part[x] < 0).all():  # one cell over every layer at once (e.g. causal tracing with window=None)
            ns, band = _bars(a, part, series, ctx)
        else:
            ns, band, curves = _lines(a, part, x, series, ctx)
            _integer_ticks(a.xaxis)
            a.set_xlabel(xlabel)
        a.axhline(0, color="grey", lw=0.5)
        _chance(a, ctx)
        _floor_axis(a, ctx)
        lo, hi = a.get_ylim()  # curves closer than 0.5 % of the axis hide each other: one legend entry says so
        _merge_same(a, curves, ns, max(ctx["floor"], SAME_AT_SCALE * (hi - lo)), max(ctx["floor"], 1e-12))
        a.set_title(_series_title(ctx, what + ("" if p is None else f" ({panel} {p})"), band), fontsize="small")
        _legend(a, ns, ctx["subset"])
    axes[0].set_ylabel(_ylabel(ctx))
    return _out(axes)


def _ylabel(ctx) -> str:
    record = ctx["record"]
    return record.label or record.value if ctx["value"] == record.value else ctx["value"]


def _bars(ax, df, series: str, ctx) -> tuple[dict, str]:
    """One bar per series: mean over samples with its 95 % interval (x where n < 5), the samples as
    dots for continuous values, stars where the paired test holds."""
    value = ctx["value"]
    base = ctx["paired"][1] if ctx["paired"] is not None and ctx["outcome"] == "binary" else None
    ps = per_sample(df, [series], value, base)
    table = _cells(ps, [series], ctx, df)
    names = list(dict.fromkeys(df[series]))
    colour = _colours(names)
    ns, methods = {}, []
    any_small = any_mark = False
    top = float(np.nanmax(np.abs(ps[value].to_numpy(dtype=float)))) if len(ps) else 1.0
    for i, name in enumerate(names):
        v = ps.loc[ps[series] == name, value].to_numpy(dtype=float)
        cell = _lookup(table, {series: name}).iloc[0]
        m, lo, hi = float(cell["mean"]), float(cell["ci_low"]), float(cell["ci_high"])
        err = [[max(m - lo, 0)], [max(hi - m, 0)]] if np.isfinite(lo) else None
        ax.bar(i, m, color=colour[name], alpha=0.7, label=str(name), yerr=err, capsize=4)
        if not np.isfinite(lo) and len(v):
            ax.plot(i, m, "x", ms=8, mew=1.5, color="black")
            any_small = True
        if ctx["paired"] is not None and bool(cell.get("significant", False)):
            ax.text(i, (hi if np.isfinite(hi) else m) + 0.03 * (top or 1.0), "*", ha="center", fontsize="large")
            any_mark = True
        if ctx["samples"] and len(v) and ctx["outcome"] == "continuous":
            jitter = np.random.default_rng(i).uniform(-0.25, 0.25, len(v))
            ax.scatter(i + jitter, v, s=8, color="black", alpha=0.4, zorder=3)
        if isinstance(cell["interval"], str):
            methods.append(cell["interval"])
        ns[str(name)] = len(v)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={ns[str(n)]})" for n in names], fontsize="small")
    band = _band_text(methods, ctx, False, any_mark, any_small).replace("band:", "error bars:")
    if ctx["samples"] and ctx["outcome"] == "continuous":
        band += "; dots: samples"
    return ns, band


def _lines_style(df, ax, figsize, ctx):
    """The mean of the value against the record's `x`, one line per `series` (one panel per `panel`);
    a knockout's title says which layers a point knocks out and how that window was chosen."""
    spec, what = ctx["record"].plot, ""
    st = ctx["settings"]
    if spec.window and st.get("window_style"):  # the x axis is the window's anchor layer
        k, rule = st.get("window"), st.get("window_rule")
        if st["window_style"] in ("top_down", "bottom_up"):
            size = ""
        elif k is None:  # a frame from before the window was recorded: knockout's rule needs the depth
            size = "default-size "
        else:
            size = f"{k}-layer "
        chosen = f" ({rule})" if rule and rule not in ("given", "none") else ""
        what = f", {size}{st['window_style'].replace('_', '-')} window{chosen} at each layer"
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
    return _norm(np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids]), ctx["value"],
                 min_half_range(ctx["unit"], ctx["floor"]))


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
    counted (x where n < 5), stars where McNemar's test against the plain run holds after Holm's
    correction over the figure's cells, the plain run's accuracy dashed, the chance level dotted."""
    n = ctx["settings"].get("n_samples")
    if not n:
        raise ValueError("this knockout_accuracy result has no settings['n_samples'] (the samples counted); "
                         "make it with patching.methods.knockout.knockout_accuracy")
    (ax,) = _axes(ax, 1, figsize)
    edges = list(dict.fromkeys(df["edge"]))
    style = _styles(edges)
    curves, bands, any_small, any_mark = {}, {}, False, False
    for edge in edges:
        part = df[df["edge"] == edge].sort_values("layer")
        acc = part[ctx["value"]].to_numpy(dtype=float)
        ns = part["n_samples"].to_numpy(dtype=float) if "n_samples" in part else np.full(len(acc), n)  # per edge
        if {"ci_low", "ci_high"} <= set(part.columns):
            band = part[["ci_low", "ci_high"]].to_numpy(dtype=float)
        else:  # a frame from before the interval was a column: the same Wilson interval, here
            band = np.array([wilson(a / 100 * k, int(k)) if k >= MIN_N else (np.nan, np.nan) for a, k in zip(acc, ns)]) * 100
        colour, ls = style[edge]
        xs = part["layer"].to_numpy()
        ax.plot(xs, acc, marker="o", ms=3, color=colour, ls=ls, label=edge)
        bands[edge] = ax.fill_between(xs, band[:, 0], band[:, 1], where=np.isfinite(band[:, 0]), color=colour, alpha=0.1, lw=0)
        small = ns < MIN_N
        if small.any():
            ax.plot(xs[small], acc[small], "x", ms=7, mew=1.5, color=colour, label="_small")
            any_small = True
        if "p_holm" in part:
            sig = (part["p_holm"] < ALPHA).to_numpy()
            if sig.any():
                ax.plot(xs[sig], acc[sig], "*", ms=9, color=colour, mec="black", mew=0.5, label="_significant")
                any_mark = True
        curves[edge] = (xs, acc)
    ax._series_bands = bands
    _merge_same(ax, curves, {k: n for k in curves}, SAME_AT_SCALE * 104, 1e-9)  # the axis spans 104 points
    if "accuracy_base" in df.columns:
        ax.axhline(float(df["accuracy_base"].iloc[0]), color="black", ls="--", lw=1, label="no knockout")
    _chance(ax, ctx, 100.0)
    _integer_ticks(ax.xaxis)
    mode = ctx["settings"].get("sample_mode", "correct")
    tested = "p_holm" in df.columns
    marks = "".join([f"; x: n < {MIN_N}, no interval" if any_small else "",
                     f"; *: {CORRECTION}-adjusted p < {ALPHA:g} (McNemar vs the plain run){'' if any_mark else ', none here'}"
                     if tested else ""])
    ax.set(xlabel="window centre layer", ylabel=_ylabel(ctx), ylim=(-2, 102),
           title=f"knockout accuracy ({mode} samples counted) over n={n}\nband: Wilson 95% CI{marks}")
    ax.title.set_fontsize("small")
    _legend_below(ax, f"n={n} samples")  # below the axes: accuracy curves fill the whole height
    return ax


def _pathway(df, ax, figsize, ctx):
    """One bar per value of the record's `series` (the pathway and its random baseline; an SAE's token
    groups) with its 95 % interval; the pathway's share of attention edges kept under each bar, the plain
    run's accuracy dashed, the chance level dotted."""
    (ax,) = _axes(ax, 1, figsize, width=5.0)
    series = ctx["record"].plot.series
    ns, band = _bars(ax, df, series, ctx)
    if "kept_share" in df.columns:
        kept = df.groupby(series, sort=False)["kept_share"].mean()
        ax.set_xticks(ax.get_xticks(), [f"{r}\nkept {kept[r]:.0%} of edges\n(n={ns[str(r)]})" for r in kept.index],
                      fontsize="small")
    if ctx["value"] == "correct" and "correct_orig" in df.columns:
        ax.axhline(df.groupby("sample")["correct_orig"].first().mean(), color="black", ls="--", lw=1, label="no blocking")
    _chance(ax, ctx)
    if ax.get_legend_handles_labels()[0]:
        _legend_below(ax, "", drop=52)  # inside, it covered the bars; under their three-line labels
    _floor_axis(ax, ctx)
    if ctx["outcome"] == "binary":
        ax.set_ylim(0, 1.1)
    what = "accuracy" if ctx["outcome"] == "binary" else f"mean {ctx['value']}"
    name = "effective pathway" if ctx["kind"] == "pathway" else ctx["kind"].replace("_", " ")
    ax.set(ylabel=_ylabel(ctx), title=f"{name}: {what} over {ctx['subset']}\n{band}")
    ax.title.set_fontsize("small")
    return ax


def _fastv(df, ax, figsize, ctx):
    """Accuracy (or `value`) against the share of prefill FLOPs saved, one point per method with its
    95 % interval over samples (Wilson for accuracy), stars where McNemar's test against the full
    forward holds, the chance level dotted."""
    (ax,) = _axes(ax, 1, figsize, width=5.5)
    value = ctx["value"]
    base = ctx["paired"][1] if ctx["paired"] is not None and ctx["outcome"] == "binary" else None
    ps = per_sample(df, ["method"], value, base)
    table = _cells(ps, ["method"], ctx, df)
    methods = list(dict.fromkeys(df["method"]))
    colour = _colours(methods)
    used, any_small, any_mark = [], False, False
    for m in methods:
        cell = _lookup(table, {"method": m}).iloc[0]
        mean, lo, hi = float(cell["mean"]), float(cell["ci_low"]), float(cell["ci_high"])
        x = float(df.loc[df["method"] == m, "flops_saved"].mean())
        err = [[mean - lo], [hi - mean]] if np.isfinite(lo) else None
        ax.errorbar(x, mean, yerr=err, fmt="x" if err is None else "o", capsize=4, color=colour[m],
                    label=f"{m} (n={int(cell['n_samples'])})")
        any_small |= err is None
        if ctx["paired"] is not None and bool(cell.get("significant", False)):
            ax.plot(x, mean, "*", ms=11, color=colour[m], mec="black", mew=0.5, label="_significant")
            any_mark = True
        if isinstance(cell["interval"], str):
            used.append(cell["interval"])
    _chance(ax, ctx)
    _floor_axis(ax, ctx)
    if ctx["outcome"] == "binary":  # an accuracy: the whole scale, so a drop reads as what it is
        ax.set_ylim(-0.02, 1.02)
    band = _band_text(used, ctx, False, any_mark, any_small).replace("band:", "error bars:")
    what = "accuracy" if ctx["outcome"] == "binary" else f"mean {value}"
    ax.set(xlabel="prefill FLOPs saved (fraction)", ylabel=_ylabel(ctx),
           title=f"FastV vs discarding: {what} over {ctx['subset']}\n{band}")
    ax.title.set_fontsize("small")
    ax.legend(fontsize="small")
    return ax


def _sinks(df, ax, figsize, ctx):
    """One point per sink: position against its modality dominance score, by modality and by
    cross-modal / unimodal; the legend counts sinks and samples. A study's rows of samples without a
    sink (`n_sinks` 0) are counted in the title, not drawn."""
    (ax,) = _axes(ax, 1, figsize)
    none = df[df["n_sinks"] == 0]["sample"].nunique() if "n_sinks" in df.columns else 0
    if "n_sinks" in df.columns:
        df = df[df["n_sinks"] > 0]
    if not len(df):
        raise ValueError(f"no sink in any of the {none} sample(s): nothing to draw; each sample's row says why")
    for (m, cross), part in df.groupby(["modality", "cross_modal"]):
        ax.scatter(part["pos"], part[ctx["value"]], s=14,
                   label=f"{m} {'cross-modal' if cross else 'unimodal'} ({len(part)} sinks, n={part['sample'].nunique()})")
    ax.axhline(0, color="grey", lw=0.5)
    _integer_ticks(ax.xaxis)
    without = f"; {none} sample(s) without a sink" if none else ""
    ax.set(xlabel="position", ylabel=_ylabel(ctx), title=f"sinks: {ctx['value']} per sink over layers ({ctx['subset']}{without})")
    ax.title.set_fontsize("small")
    ax.legend(fontsize="small")
    return ax


STYLES = {  # a record's `Plot.style` -> how it is drawn
    "lines": _lines_style, "traced": _traced, "heads": _heads_style, "accuracy": _knockout_accuracy,
    "bars": _pathway, "points": _fastv, "scatter": _sinks,
}
