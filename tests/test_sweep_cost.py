"""What a sweep costs, counted before it runs (`plan_sweep`, `SweepPlan.stats`) and checked against what it
does: its FLOPs equal the products the run calls (torch's FlopCounterMode for the matrix products, every
attention call's queries x keys x heads x d counted at the call) on every family (MoE included), with the
rows of a chunk folded over the shared prefix and not; its peak tensor bytes bound what is measured (a
dispatch mode watching every tensor) within a factor 2; chunks of short suffixes hold many rows within the
memory a whole forward of `max_batch_tokens` may use; `Attention.after_prefix` equals the exact path's
arithmetic on a cached prefix."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from family_cases import NAMES, family
from memory_helpers import TensorPeak
from torch.utils.flop_counter import FlopCounterMode

from patching.engine import cost
from patching.engine.hooks import ablate, block_attention, steer
from patching.engine.sweep import SweepPlan, plan_rows, plan_sweep, rows_per_forward, run_rows, samples
from patching.methods.knockout import default_edges, window_layers


@contextlib.contextmanager
def counted_flops():
    """`{"flops": n}` after the block: 2 x multiply-adds of every matrix product (FlopCounterMode) and of every
    `scaled_dot_product_attention` call (4 x batch x heads x queries x keys x d; a causal call the keys up to
    each query), which the flop counter does not see on the CPU with grouped-query heads."""
    out = {"flops": 0}
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None, is_causal=False, **kw):
        b, h, n_q, d = q.shape
        n_k = k.shape[2]
        pairs = n_q * (n_q + 1) / 2 if is_causal else n_q * n_k
        out["flops"] += 4 * b * h * pairs * d
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = counting
    try:
        with FlopCounterMode(display=False) as fc:
            yield out
    finally:
        F.scaled_dot_product_attention = sdpa
    out["flops"] += fc.get_total_flops()


def sweep_cells(model, tm):
    L = model.cfg.n_layers
    edges = default_edges(tm)
    ivs = [block_attention(tm, src, dst, window_layers(c, 3, L)) for src, dst in edges for c in range(L)]
    ivs += [block_attention(tm, src, dst, [1], heads=[0]) for src, dst in edges[:2]]  # the exact path
    ivs += [steer(tm, dst, src, 0.5, [L - 1]) for src, dst in edges[:2]]
    return ivs


@pytest.mark.parametrize("name", NAMES)
def test_the_flops_a_sweep_reports_are_the_products_it_runs(name):
    torch.manual_seed(0)
    model, inputs = family(name)
    for s in samples(model, inputs):
        ivs = sweep_cells(model, s.tm)
        for batch_size in (None, 3):  # rows folded over the prefix where few (None), and per row
            stats: dict = {}
            with counted_flops() as counted:
                run_rows(model, s, ivs, progress=False, stats=stats, batch_size=batch_size)
            assert stats["incremental"]
            assert counted["flops"] == pytest.approx(stats["flops"], rel=1e-9)
            plan = plan_sweep(model, s.seq_len, ivs, batch_size=batch_size)
            assert plan.stats(model.cfg) == stats  # the plan, counted without running, is the run's
        assert stats["flops_floor"] <= stats["flops"] < stats["flops_full"]
        # whole forwards: the layers whose mask or scores are hooked read every key, the others the causal triangle
        for whole in (ivs[:1], ivs[-1:], [ablate(["blocks.1.hook_resid_post"], positions=[0])]):
            with counted_flops() as counted:
                run_rows(model, s, whole, progress=False, incremental=False, stats=stats)
            assert counted["flops"] == pytest.approx(stats["flops"], rel=1e-9)
        assert stats["flops"] == pytest.approx(cost.forward_flops(model.cfg, s.seq_len), rel=1e-9)


def test_measured_peak_bytes_stay_under_the_estimate_within_a_factor_2():
    model, inputs = family("qwen2_5_omni")
    s = samples(model, inputs)[1]
    ivs = sweep_cells(model, s.tm)[: 2 * model.cfg.n_layers]
    for batch_size in (None, 2):
        stats: dict = {}
        with torch.no_grad(), TensorPeak() as peak:
            run_rows(model, s, ivs, progress=False, stats=stats, batch_size=batch_size)
        assert peak.peak <= stats["peak_bytes"] <= 2 * peak.peak, (peak.peak, stats["peak_bytes"])


def test_chunks_of_short_suffixes_hold_many_rows_within_a_whole_forwards_memory():
    # a 4k-token clip at the benchmark's width (benchmarks/run_all.py), planned on the config alone
    from types import SimpleNamespace

    from hooked_av.core.config import BlockRecipe

    cfg = SimpleNamespace(d_model=512, n_heads=8, n_key_value_heads=2, d_head=64, d_mlp=1536, d_vocab=152064,
                          n_layers=8, gated_mlp=True, recipe=BlockRecipe())
    seq, n = 4096, 48
    starts = [seq - 25] * (n // 2) + [seq - 1] * (n // 2)  # ... -> question, ... -> last
    plan = plan_rows(cfg, seq, starts, [0] * n)
    assert [len(rows) for rows, _, _ in plan.chunks] == [24, 24]  # 12 chunks of rows_per_forward = 4 before
    assert rows_per_forward(seq, None, 16384) == 4
    budget = cost.run_bytes(cfg, 4, seq, seq)
    assert all(plan.chunk_bytes(cfg, len(rows), st) <= budget for rows, st, _ in plan.chunks)
    # a chunk stops where one more row would not fit: 200-position suffixes
    wide = plan_rows(cfg, seq, [seq - 200] * 400, [0] * 400)
    most = max(len(rows) for rows, _, _ in wide.chunks)
    assert wide.chunk_bytes(cfg, most, seq - 200) <= budget < wide.chunk_bytes(cfg, most + 1, seq - 200)
    assert isinstance(wide, SweepPlan) and not plan_rows(cfg, seq, [0] * 3, [0] * 3).incremental


@pytest.mark.parametrize("rows, m, p", [(3, 1, 20), (4, 5, 40), (2, 6, 9)])
def test_after_prefix_equals_the_exact_path_on_the_concatenated_keys(rows, m, p):
    from hooked_av.core.attention import Attention, softmax_dtype
    from hooked_av.core.masks import additive, causal_allowed

    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8)
    qh = torch.randn(rows, 4, m, 8)
    kh, vh = torch.randn(rows, 2, m, 8), torch.randn(rows, 2, m, 8)
    kp, vp = torch.randn(1, p, 2, 8), torch.randn(1, p, 2, 8)
    mask = additive(causal_allowed(None, m, p + m, rows, "cpu"), torch.float32).clone()
    mask[0, 0, :, 3] = torch.finfo(torch.float32).min  # an edit in one row
    got = attn.after_prefix(qh, kh, vh, (kp, vp), mask)
    k = torch.cat([kp.transpose(1, 2).expand(rows, -1, -1, -1), kh], 2).repeat_interleave(2, 1)
    v = torch.cat([vp.transpose(1, 2).expand(rows, -1, -1, -1), vh], 2).repeat_interleave(2, 1)
    pattern = F.softmax(qh @ k.transpose(2, 3) * attn.scale + mask, -1, dtype=softmax_dtype(qh.dtype))
    torch.testing.assert_close(got, pattern @ v, atol=1e-6, rtol=0)
