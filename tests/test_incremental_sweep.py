"""Sweeps that recompute only what changes: a knockout cell run from its first edited query on, against
the clean keys and values of the prefix, equals the whole recomputation (fp32, 1e-5) on every default edge
and window, both samples of a left-padded batch, SALMONN and the Qwen3 recipe with injections; the positions
actually recomputed are counted; activation edits fall back to whole forwards."""

from __future__ import annotations

import pytest
import salmonn_helpers as H
import torch
from test_layer_loop import setup as qwen3_setup  # noqa: F401  (fixture)
from test_layer_loop import token_map as qwen3_token_map
from test_patching_common import av_inputs, tiny_pair, token_map
from test_salmonn_inputs import salmonn_tokenizer, write_mp4

from hooked_av import HookedVideoSALMONN2
from patching.hooks import ablate, block_attention, scale_attention
from patching.knockout import default_edges, window_layers
from patching.sweep import run_rows, samples

torch.set_num_threads(1)
TOL = 1e-5


def cells(model, s, window=3):
    L = model.cfg.n_layers
    return [block_attention(s.tm, src, dst, window_layers(c, window, L))
            for src, dst in default_edges(s.tm) for c in range(L)]


def both_ways(model, s, ivs, **kw):
    stats = {}
    fast = run_rows(model, s, ivs, progress=False, stats=stats, **kw)
    full = run_rows(model, s, ivs, progress=False, incremental=False, **kw)
    return fast, full, stats


def test_every_edge_and_window_on_a_left_padded_batch():
    _, model = tiny_pair()
    inputs = av_inputs(6, 7)
    for s in samples(model, inputs, token_map(model, inputs)):
        ivs = cells(model, s)
        fast, full, stats = both_ways(model, s, ivs, batch_size=5)
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        assert stats["incremental"]
        # each cell recomputes from its first dst query (... -> last: one position), rows of a forward from
        # the earliest of theirs; plus the clean forward that keeps the keys and values
        first = {"last": s.seq_len - 1, "question": int(s.tm.mask("question")[0].nonzero()[0, 0])}
        starts = sorted(first[dst] for src, dst in default_edges(s.tm) for _ in range(model.cfg.n_layers))
        expected = s.seq_len + sum(len(starts[i:i + 5]) * (s.seq_len - starts[i]) for i in range(0, len(starts), 5))
        assert stats["positions"] == expected < stats["positions_full"] / 2
        scaled = [scale_attention(s.tm, "last", "audio", 0.3, [1, 2]), scale_attention(s.tm, "question", "video", 2.0, [4])]
        torch.testing.assert_close(*both_ways(model, s, scaled)[:2], atol=TOL, rtol=0)


def test_salmonn(tmp_path):
    torch.manual_seed(0)
    model = HookedVideoSALMONN2.from_config(H.Reference(seed=0).salmonn_config())
    model.tokenizer = salmonn_tokenizer()
    inputs = model.prepare("What makes the sound?", video=write_mp4(tmp_path / "c.mp4", seconds=2.0, fps=10))
    s = samples(model, inputs)[0]
    fast, full, stats = both_ways(model, s, cells(model, s, window=2))
    torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
    assert stats["incremental"]


def test_qwen3_recipe_with_injections(qwen3_setup):  # noqa: F811
    model, kw, visual = qwen3_setup
    for s in samples(model, kw, qwen3_token_map(kw["attention_mask"], visual)):
        ivs = [block_attention(s.tm, src, dst, [l]) for src, dst in (("question", "video"), ("video", "last")) for l in range(3)]
        fast, full, stats = both_ways(model, s, ivs)
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        assert stats["incremental"]


def test_an_edit_from_the_first_position_falls_back_to_whole_forwards():
    # activation edits name their first position now (patching.hooks.run_from); one at position 0 leaves no
    # clean prefix to reuse, so the chunk runs whole
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]
    ivs = [block_attention(s.tm, "audio", "last", [1]), ablate(["blocks.2.hook_resid_post"], positions=[0])]
    fast, full, stats = both_ways(model, s, ivs)
    assert not stats["incremental"] and stats["positions"] == stats["positions_full"] == 2 * s.seq_len
    assert torch.equal(fast, full)


@pytest.mark.parametrize("dst", ["last", "question"])
def test_masks_of_the_recomputed_part_are_rows_by_suffix(dst):
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]
    shapes = []
    model.blocks[1].attn.hook_attn_mask.add_hook(lambda m, hook: shapes.append(tuple(m.shape)))
    try:
        run_rows(model, s, [block_attention(s.tm, "audio", dst, [1])] * 3, progress=False)
    finally:
        model.reset_hooks()
    n = s.seq_len - int(s.tm.mask(dst)[0].nonzero()[0, 0])
    assert shapes[-1] == (3, 1, n, s.seq_len)
