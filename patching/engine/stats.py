"""Statistics shared by the figures (`patching.figures.plots`, `patching.apps.study.figures`), the study
summaries (`patching.apps.study.stats.Study.summary`) and the report's tables: one definition of each
interval and test, chosen by the outcome its experiment record declares (`Experiment.outcome`,
`Experiment.paired`), so a table and the figure beside it agree. docs/methods.md ("Statistics") lists
which statistic uses which.

- `interval(values, outcome, floor)`: the 95 % interval of a cell's mean over samples. A proportion
  (`outcome="binary"`: 0/1 per sample) gets the Wilson score interval (`proportion_ci`, statsmodels);
  a continuous mean the seeded percentile bootstrap (`bootstrap_ci`), except where every sample sits
  at 0 or at one other level `c` (`two_level`: a knockout on a confident model loses all of p(answer)
  or none of it), where the mean is `c` x the share of samples at `c` and gets `c` x that share's
  Wilson interval: a bootstrap of such values collapses to zero width when they all agree. Fewer than
  `MIN_N` samples get no interval.
- `paired_test(values, outcome, baseline, floor)`: the intervention against the plain run, sample by
  sample: the exact McNemar test for 0/1 outcomes (statsmodels), the exact sign test of the
  per-sample effect against 0 for continuous ones (scipy's `binomtest`; effects within the numerical
  floor count as none). `adjust(p)`: Holm's correction over the cells of a figure (statsmodels).
- `numerical_floor(unit, dtype)`: the smallest effect the dtype and path resolve, measured on the toy
  (fp32 against fp64, and the same cell in other batch compositions); an effect within it is "no
  effect" and no axis zooms into it.

    interval([1.0] * 56, "binary")              # (0.936, 1.0, "Wilson"): 56 of 56 is not [1, 1]
    paired_test([-100.0] * 7, "continuous")     # (0.0156, "sign test"): 7 of 7 samples lose p(answer)
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT, SEED = 1000, 0
LEVEL = 0.95
ALPHA = 0.05  # a cell is marked when its Holm-adjusted p is below this
MIN_N = 5  # fewer samples: the cell is marked, with no interval and no test

# The largest |difference| measured on the toy (8 + 8 samples; knockout with a 1-layer window, causal tracing,
# discarding, the logit lens) between the model in this dtype and in float64, in probability units, rounded up to
# the next power of ten: float32 2.6e-6 (p(answer) under knockout; the same cell in another batch composition
# 1.9e-6), float16 4.0e-3, bfloat16 4.0e-2. float64 is float32's 84 machine epsilons, not measured.
# docs/methods.md ("Statistics") has the measurement; tests/test_statistics.py re-measures float32.
FLOOR = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-1, "float64": 1e-13}
# units a record's value may be in (`Experiment.unit`), as multiples of a probability's error: a relative change in
# percent carries p's relative error x 100
UNITS = {"probability": 1.0, "percent": 100.0}
TWO_LEVEL_TOL = 0.01  # a value within 1 % of |c| (or the floor) of 0 or c sits at that level

INTERVALS = {
    "Wilson": "Wilson score 95 % interval",
    "bootstrap": f"percentile bootstrap 95 % interval of the mean ({N_BOOT} resamples, seed {SEED})",
    "Wilson, two levels": "every sample at 0 or at one level c: c x the Wilson 95 % interval of the share at c",
    "none": f"n < {MIN_N}: no interval",
}
TESTS = {
    "McNemar": "exact McNemar test against the plain run, sample by sample",
    "sign test": "exact sign test of the per-sample effect against 0 (effects within the numerical floor count as none)",
}
CORRECTION = "Holm"


def numerical_floor(unit: str | None, dtype="float32", scale: float = 1.0) -> float:
    """The smallest |value| of `unit` ("probability", "percent" or None: no floor, 0) that `dtype`
    resolves (`FLOOR`, measured on the toy), times `scale` (e.g. the hub's x100 indirect effect).

        numerical_floor("percent", "float32")  # 1e-3: a relative change of p(answer) below 0.001 % is noise
    """
    if unit is None:
        return 0.0
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {sorted(UNITS)} or None, got {unit!r}")
    name = str(dtype).removeprefix("torch.")
    if name not in FLOOR:
        raise ValueError(f"no numerical floor measured for dtype {dtype!r}; measured: {sorted(FLOOR)}")
    return FLOOR[name] * UNITS[unit] * scale


def bootstrap_ci(values, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (1-D): `n_boot` resamples with replacement, drawn as
    one `[n_boot, n]` index array from `numpy.random.default_rng(seed)`; `level` 0.95 gives the 2.5
    and 97.5 percentiles of the resampled means. NaN, NaN for no values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def proportion_ci(k: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of the proportion k / n (statsmodels' `proportion_confint`, fractions);
    NaN, NaN for n = 0.

        proportion_ci(5, 10)  # (0.237, 0.763)
    """
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return float("nan"), float("nan")
    lo, hi = proportion_confint(k, n, alpha=1 - level, method="wilson")
    return max(0.0, float(lo)), min(1.0, float(hi))


def two_level(values, floor: float = 0.0) -> float | None:
    """The level c when every value sits at 0 or at c (c: the value farthest from 0, |c| above the
    floor; "at" means within `TWO_LEVEL_TOL` x |c| or the floor, whichever is larger); else None.

        two_level([0.0, -100.0, -99.9997, 0.0], floor=1e-3)  # -100.0
    """
    v = np.asarray(values, dtype=float)
    if not len(v):
        return None
    c = float(v[np.abs(v).argmax()])
    if abs(c) <= floor:
        return None
    tol = max(floor, TWO_LEVEL_TOL * abs(c))
    return c if bool(np.all((np.abs(v) <= tol) | (np.abs(v - c) <= tol))) else None


def interval(values, outcome: str = "continuous", floor: float = 0.0, level: float = LEVEL, n_boot: int = N_BOOT,
             seed: int = SEED) -> tuple[float, float, str]:
    """(low, high, method) of the mean of `values` (one per sample, NaN dropped), `method` a key of
    `INTERVALS`: "Wilson" for 0/1 outcomes, "Wilson, two levels" for continuous values all at 0 or at
    one level, "bootstrap" otherwise, "none" (NaN, NaN) for fewer than `MIN_N` samples.

        interval([0.0, -100.0, -100.0, 0.0, -100.0], floor=1e-3)  # -100 x Wilson(3 of 5): (-88.2, -23.1, ...)
    """
    _outcome(outcome)
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n < MIN_N:
        return float("nan"), float("nan"), "none"
    if outcome == "binary":
        return (*proportion_ci(float(v.sum()), n, level), "Wilson")
    c = two_level(v, floor)
    if c is not None:
        tol = max(floor, TWO_LEVEL_TOL * abs(c))
        lo, hi = proportion_ci(float(np.sum(np.abs(v - c) <= tol)), n, level)
        return min(c * lo, c * hi), max(c * lo, c * hi), "Wilson, two levels"
    return (*bootstrap_ci(v, n_boot, seed, level), "bootstrap")


def paired_test(values, outcome: str = "continuous", baseline=None, floor: float = 0.0) -> tuple[float, str]:
    """(two-sided p, test) of an intervention against the plain run over samples: for 0/1 outcomes
    the exact McNemar test of `values` against `baseline` (the plain run's 0/1, same samples); for
    continuous ones `values` are the per-sample effects (e.g. knockout's relative change, causal
    tracing's indirect effect) and the test is the exact sign test against 0, effects within `floor`
    counted as none. Fewer than `MIN_N` samples: (NaN, "none"). No discordant pair / no effect: p = 1.

        paired_test([0, 0, 1, 0, 0, 0], "binary", baseline=[1] * 6)  # McNemar: 5 of 6 answers lost, p = 0.0625
    """
    from scipy.stats import binomtest

    _outcome(outcome)
    v = np.asarray(values, dtype=float)
    if outcome == "binary":
        if baseline is None:
            raise ValueError("a binary paired test needs the plain run's 0/1 per sample (baseline=)")
        b = np.asarray(baseline, dtype=float)
        if b.shape != v.shape:
            raise ValueError(f"values and baseline must pair sample by sample; got {v.shape} and {b.shape}")
        keep = np.isfinite(v) & np.isfinite(b)
        v, b = v[keep], b[keep]
        if len(v) < MIN_N:
            return float("nan"), "none"
        lost, gained = int(np.sum((b > 0.5) & (v < 0.5))), int(np.sum((b < 0.5) & (v > 0.5)))
        if lost + gained == 0:
            return 1.0, "McNemar"
        from statsmodels.stats.contingency_tables import mcnemar

        kept = int(np.sum((b > 0.5) & (v > 0.5)))
        return float(mcnemar([[kept, lost], [gained, len(v) - kept - lost - gained]], exact=True).pvalue), "McNemar"
    v = v[np.isfinite(v)]
    if len(v) < MIN_N:
        return float("nan"), "none"
    up, down = int(np.sum(v > floor)), int(np.sum(v < -floor))
    if up + down == 0:
        return 1.0, "sign test"
    return float(binomtest(down, up + down, 0.5).pvalue), "sign test"


def adjust(pvalues, method: str = "holm") -> np.ndarray:
    """p-values adjusted for the number of cells tested (statsmodels' `multipletests`, Holm by
    default); NaN entries (cells not tested) stay NaN and do not count.

        adjust([0.01, 0.04, 0.03, float("nan")])  # [0.03, 0.06, 0.06, nan]
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.isfinite(p)
    if tested.any():
        out[tested] = multipletests(p[tested], method=method)[1]
    return out


def no_effect(mean: float, floor: float) -> bool:
    """A mean effect within the numerical floor: reported as no effect."""
    return bool(math.isfinite(mean) and abs(mean) <= floor)


def _outcome(outcome: str) -> None:
    if outcome not in ("binary", "continuous"):
        raise ValueError(f"outcome must be 'binary' or 'continuous', got {outcome!r}")


def summarise(values, outcome: str = "continuous", floor: float = 0.0, baseline=None, paired: bool = False,
              n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """One cell over its samples (one value each): `n_samples`, `mean`, `ci_low`, `ci_high`, `interval`
    (the method, `interval`), and with `paired` the test against the plain run (`p_value`, `test`,
    `paired_test`; `baseline`: the plain run's 0/1 per sample for a binary outcome); `note`: "n < 5"
    (no interval, no test) or "no effect" (a paired continuous mean within the floor).

        summarise([-100.0] * 7, floor=1e-3, paired=True)  # mean -100, Wilson two levels, sign test p 0.0156
    """
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v)
    base = None if baseline is None else np.asarray(baseline, dtype=float)[keep]
    v = v[keep]
    lo, hi, method = interval(v, outcome, floor, n_boot=n_boot, seed=seed)
    mean = float(v.mean()) if len(v) else float("nan")
    p, test = paired_test(v, outcome, base, floor) if paired else (float("nan"), "")
    note = f"n < {MIN_N}" if len(v) < MIN_N else "no effect" if paired and outcome == "continuous" and no_effect(mean, floor) else ""
    return dict(n_samples=len(v), mean=mean, ci_low=lo, ci_high=hi, interval=method, p_value=p, test=test, note=note)


def cell_table(per_sample, keys: list[str], outcome: str = "continuous", floor: float = 0.0, paired: bool = False,
               n_boot: int = N_BOOT, seed: int = SEED):
    """`summarise` per cell of `per_sample` (a frame with `keys`, one row per sample and cell, its value
    in `v` and, for a paired binary outcome, the plain run's 0/1 in `base`), cells in order of first
    appearance, with Holm's correction over all of them (`p_holm`) and `significant` (p_holm < ALPHA).
    The one computation behind `Study.summary`'s rows and every figure's means, bands and marks.

        cell_table(pd.DataFrame(dict(layer=[0] * 6, v=[-100.0] * 6)), ["layer"], paired=True)  # p 0.031, Wilson two levels
    """
    import pandas as pd

    rows = []
    groups = per_sample.groupby(keys, sort=False, dropna=False) if keys else [((), per_sample)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        base = part["base"] if paired and outcome == "binary" and "base" in part else None
        rows.append({**dict(zip(keys, key)), **summarise(part["v"], outcome, floor, base, paired, n_boot, seed)})
    cols = [*keys, "n_samples", "mean", "ci_low", "ci_high", "interval", "p_value", "test", "note"]
    out = pd.DataFrame(rows, columns=cols)
    out["p_holm"] = adjust(out["p_value"])
    out["significant"] = out["p_holm"] < ALPHA
    return out


def min_half_range(unit: str | None, floor: float) -> float:
    """The smallest half-range an axis (or a centred colour scale) of a value in `unit` may have: 1000
    floors, so noise at the floor moves a curve by at most 0.1 % of the axis, and never more than the
    unit's full scale (1 for a probability, 100 for a percent); 0 for values without a unit."""
    if unit is None or floor <= 0:
        return 0.0
    return min(1000 * floor, UNITS[unit])
