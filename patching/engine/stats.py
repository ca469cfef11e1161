"""Statistics shared by the figures (`patching.figures.plots`) and the study summaries
(`patching.apps.study.stats`): one definition of the interval both draw, so a table and the figure
beside it agree.

- `bootstrap_ci`: the percentile bootstrap 95 % interval of a mean over samples, seeded
  (`N_BOOT` resamples from `numpy.random.default_rng(SEED)`).
"""

from __future__ import annotations

import numpy as np

N_BOOT, SEED = 1000, 0


def bootstrap_ci(values, n_boot: int = N_BOOT, seed: int = SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (1-D): `n_boot` resamples with replacement, drawn as
    one `[n_boot, n]` index array from `numpy.random.default_rng(seed)`; `level` 0.95 gives the 2.5
    and 97.5 percentiles of the resampled means. NaN, NaN for no values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
