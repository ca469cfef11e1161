"""The statistics every table and figure reports (patching/engine/stats.py), each against an independent
computation: Wilson intervals against the textbook formula, McNemar's and the sign test against binomial
sums written out, Holm's correction against its step-down definition, the seeded bootstrap against the
documented draw; the rules around them (fewer than 5 samples: no interval; values at two levels: the
share's interval); and the numerical floor against a fresh measurement on the toy (float32 against
float64)."""

from math import comb

import numpy as np
import pytest
import torch

from patching.engine.stats import (
    FLOOR,
    MIN_N,
    adjust,
    bootstrap_ci,
    cell_table,
    interval,
    min_half_range,
    numerical_floor,
    paired_test,
    proportion_ci,
    two_level,
)
from patching.figures.plots import wilson

Z = 1.959963984540054  # the 97.5 % normal quantile


@pytest.mark.parametrize("k, n", [(0, 5), (3, 7), (5, 10), (56, 56), (1, 200)])
def test_wilson_intervals_are_the_textbook_formula(k, n):
    lo, hi = proportion_ci(k, n)
    assert (lo, hi) == pytest.approx(wilson(k, n, z=Z), abs=1e-12)


def test_a_proportion_of_all_or_nothing_has_an_interval_of_width():
    # a bootstrap of 56 ones is [1, 1]; 56 of 56 is consistent with a true accuracy of 0.94
    lo, hi, method = interval([1.0] * 56, "binary")
    assert method == "Wilson" and hi == 1.0 and lo == pytest.approx(0.93581, abs=1e-5)
    assert bootstrap_ci([1.0] * 56) == (1.0, 1.0)  # what the table used to say
    lo, hi, _ = interval([0.0] * 56, "binary")
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(1 - 0.93581, abs=1e-5)


def test_fewer_than_five_samples_get_no_interval_and_no_test():
    for n in range(MIN_N):
        lo, hi, method = interval([-100.0] * n, "continuous")
        assert np.isnan(lo) and np.isnan(hi) and method == "none"
        assert np.isnan(paired_test([0.0] * n, "binary", baseline=[1.0] * n)[0])
    assert interval([1.0] * MIN_N, "binary")[2] == "Wilson"


def test_a_continuous_mean_gets_the_seeded_percentile_bootstrap():
    v = [0.3, -1.2, 2.5, 0.0, 4.1, -0.7]
    lo, hi, method = interval(v, "continuous")
    rng = np.random.default_rng(0)  # the documented draw: [1000, n] indices from seed 0
    means = np.asarray(v)[rng.integers(0, len(v), size=(1000, len(v)))].mean(1)
    assert method == "bootstrap" and (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)


def test_values_at_zero_or_one_level_get_that_levels_share_interval():
    # a knockout on a confident model: each sample loses all of p(answer) (-100 %, up to rounding) or nothing
    v = [-99.9997, 0.0, -100.0, 2e-5, -100.0, -99.99, 0.0]
    assert two_level(v, floor=1e-3) == -100.0
    lo, hi, method = interval(v, "continuous", floor=1e-3)
    w_lo, w_hi = wilson(4, 7, z=Z)
    assert method == "Wilson, two levels" and (lo, hi) == pytest.approx((-100 * w_hi, -100 * w_lo), abs=1e-9)
    assert two_level([-100.0, -37.0, 0.0], floor=1e-3) is None  # a value in between: continuous
    assert two_level([1e-5, -2e-4, 0.0], floor=1e-3) is None  # everything within the floor: no level at all
    # all at the level: the share is 1 and its interval is Wilson's, not a bootstrap of zero width
    lo, hi, _ = interval([-100.0] * 7, "continuous", floor=1e-3)
    assert (lo, hi) == pytest.approx((-100.0, -100 * wilson(7, 7, z=Z)[0]), abs=1e-9)


def _mcnemar_exact(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


@pytest.mark.parametrize("lost, gained, kept, wrong", [(5, 0, 3, 1), (3, 1, 10, 2), (0, 0, 6, 0), (2, 6, 1, 1)])
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs(lost, gained, kept, wrong):
    base = [1] * lost + [0] * gained + [1] * kept + [0] * wrong
    after = [0] * lost + [1] * gained + [1] * kept + [0] * wrong
    p, test = paired_test(after, "binary", baseline=base)
    assert test == "McNemar" and p == pytest.approx(_mcnemar_exact(lost, gained), abs=1e-12)


def test_the_sign_test_counts_effects_beyond_the_floor_only():
    effects = [-100.0, -100.0, -99.0, -60.0, -3.0, 4e-4, -2e-4, 0.0, 1.5]  # 5 down, 1 up, 3 within the floor 1e-3
    p, test = paired_test(effects, "continuous", floor=1e-3)
    naive = min(1.0, 2 * sum(comb(6, i) for i in range(2)) / 2 ** 6)
    assert test == "sign test" and p == pytest.approx(naive, abs=1e-12)
    assert paired_test([1e-6, -1e-6, 0.0, 5e-7, -3e-7], "continuous", floor=1e-5)[0] == 1.0  # noise is no effect
    assert paired_test([-100.0] * 7, "continuous")[0] == pytest.approx(2 / 2 ** 7)


def _holm(p):
    order = np.argsort(p)
    m, out, running = len(p), np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_is_the_step_down_rule_over_the_tested_cells():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.001])
    assert adjust(p) == pytest.approx(_holm(p), abs=1e-12)
    with_untested = adjust([0.01, np.nan, 0.04])
    assert np.isnan(with_untested[1]) and with_untested[[0, 2]] == pytest.approx(_holm(np.array([0.01, 0.04])))


def test_the_cell_table_tests_each_cell_and_corrects_over_all_of_them():
    import pandas as pd

    rows = [dict(edge=e, layer=layer, sample=s, v=(-100.0 if e == "a" and layer == 1 else 0.0) + 0.5 * (s == 0))
            for e in ("a", "b") for layer in range(3) for s in range(8)]
    t = cell_table(pd.DataFrame(rows), ["edge", "layer"], "continuous", floor=1e-3, paired=True)
    assert len(t) == 6 and (t.n_samples == 8).all()
    p = [paired_test(pd.DataFrame(rows).query("edge == @e and layer == @l").v, "continuous", floor=1e-3)[0]
         for e, l in zip(t.edge, t.layer)]
    assert t.p_value.tolist() == pytest.approx(p) and t.p_holm.tolist() == pytest.approx(_holm(np.array(p)).tolist())
    assert t.significant.tolist() == [False, True, False, False, False, False]
    assert (t.note[t.layer != 1 | (t.edge == "b")] == "").all()


def test_the_floor_is_in_the_values_unit_and_dtype():
    assert numerical_floor("probability") == FLOOR["float32"] == 1e-5
    assert numerical_floor("percent", "torch.float32") == 1e-3
    assert numerical_floor("probability", "bfloat16", scale=100) == pytest.approx(10.0)
    assert numerical_floor(None) == 0.0
    assert min_half_range("probability", 1e-5) == pytest.approx(0.01) and min_half_range("probability", 0.1) == 1.0
    with pytest.raises(ValueError, match="no numerical floor measured for dtype 'int8'"):
        numerical_floor("probability", "int8")


def test_the_float32_floor_is_above_what_float32_and_float64_disagree_by_on_the_toy(toy_model):
    # the measurement behind FLOOR["float32"], redone small: knockout cells of 2 toy samples, float32 against float64
    import hooked_av
    from hooked_av import toy
    from patching.methods.knockout import knockout

    m64 = hooked_av.load("toy", dtype=torch.float64)
    batch = toy.make_batch(2, seed=7, tokenizer=toy_model.tokenizer)
    x64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.inputs.items()}
    a = knockout(toy_model, batch.inputs, batch.answers.tolist(), window=1, progress=False).df
    b = knockout(m64, x64, batch.answers.tolist(), window=1, progress=False).df
    gap_p = (a.p_blocked - b.p_blocked).abs().max()
    gap_rel = (a.rel_change - b.rel_change).abs().max()
    assert 0 < gap_p < numerical_floor("probability") and gap_rel < numerical_floor("percent")
