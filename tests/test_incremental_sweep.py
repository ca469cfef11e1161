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
from test_sweep_start_rule import naive_first

from hooked_av import HookedVideoSALMONN2
from patching.engine.hooks import ablate, block_attention, scale_attention, steer
from patching.engine.intervention import Intervention, Part
from patching.methods.knockout import default_edges, window_layers
from patching.engine.sweep import run_rows, samples

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
        # each cell recomputes from its first dst query that sees a src key (... -> last: one position; an edge
        # into a question before its src: the last position), rows of a forward from the earliest of theirs;
        # plus the clean forward that keeps the keys and values
        starts = sorted(min(naive_first(s.tm, src, dst), s.seq_len - 1)
                        for src, dst in default_edges(s.tm) for _ in range(model.cfg.n_layers))
        expected = s.seq_len + sum(len(starts[i:i + 5]) * (s.seq_len - starts[i]) for i in range(0, len(starts), 5))
        assert stats["positions"] == expected < stats["positions_full"] / 2
        scaled = [scale_attention(s.tm, "last", "audio", 0.3, [1, 2]), scale_attention(s.tm, "question", "video", 2.0, [4]),
                  steer(s.tm, "question", "audio", 0.7, [2, 3]), steer(s.tm, "last", "video", -0.5, [4], heads=[1]),
                  # |alpha| > 1 used to turn masked scores into NaN (alpha * |finfo.min| overflows, then * 0)
                  steer(s.tm, "question", "audio", 2.0, [1, 2]), steer(s.tm, "last", "video", -1.5, [3])]
        fast, full, stats = both_ways(model, s, scaled)
        assert torch.isfinite(full).all()
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        assert stats["incremental"]


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
    # activation edits name their first position now (patching.engine.hooks.run_from); one at position 0 of block 0
    # leaves no clean prefix or block to reuse, so the chunk runs whole
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]
    ivs = [block_attention(s.tm, "audio", "last", [1]), ablate(["blocks.0.hook_resid_post"], positions=[0])]
    fast, full, stats = both_ways(model, s, ivs)
    assert not stats["incremental"] and stats["positions"] == stats["positions_full"] == 2 * s.seq_len
    assert torch.equal(fast, full)


@pytest.mark.parametrize("dst", ["last", "question"])
def test_masks_of_the_recomputed_part_are_rows_by_suffix(dst):
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]
    shapes: list = []
    n = s.seq_len - int(s.tm.mask(dst)[0].nonzero()[0, 0])
    iv = block_attention(s.tm, "audio", dst, [1]) + observer("blocks.1.attn.hook_attn_mask", shapes, s.seq_len - n)
    run_rows(model, s, [iv] * 8, progress=False)  # enough cells that the clean forward pays for itself
    assert shapes[-1] == (8, 1, n, s.seq_len)


def observer(name: str, seen: list, first: int) -> Intervention:
    """An intervention that records the shape at `name` and says it edits from `first` on (so the sweep
    may start there)."""
    def fn(t, hook):
        seen.append(tuple(t.shape))

    fn.first_query = first
    return Intervention([Part("observe", {"name": name}, make=lambda rows: [(name, fn)])])


def test_cells_start_at_their_first_edited_block():
    # a knockout in blocks [a, b] changes nothing before block a: a cell runs blocks a.. from the clean
    # forward's residual entering block a, and equals the whole recomputation on every centred window
    _, model = tiny_pair()
    inputs = av_inputs(6, 7)
    L = model.cfg.n_layers
    for s in samples(model, inputs, token_map(model, inputs)):
        ivs = cells(model, s, window=1)
        fast, full, stats = both_ways(model, s, ivs, batch_size=1)
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        parts = [(s.seq_len - min(naive_first(s.tm, src, dst), s.seq_len - 1)) * (L - c)
                 for src, dst in default_edges(s.tm) for c in range(L)]
        assert stats["incremental"] and stats["layer_positions"] == s.seq_len * L + sum(parts)
        # blocks before the cell's first one do not run at all
        seen: list = []
        last = block_attention(s.tm, "audio", "last", [3])
        run_rows(model, s, [last + observer("blocks.2.hook_resid_post", seen, s.seq_len - 1),
                            last + observer("blocks.3.hook_resid_pre", seen, s.seq_len - 1)], progress=False, batch_size=1)
        assert seen == [(1, 1, model.cfg.d_model)] * 2  # the first cell from block 2, the second from 3


def test_an_in_place_edit_of_the_cached_residual_stays_in_its_cell():
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]
    name = "blocks.2.hook_resid_pre"

    def double(t, hook):
        t[:, -3:].mul_(2.0)  # in place, on the tensor the sweep feeds block 2 (the last 3 positions)

    double.first_query = s.seq_len - 3
    iv = Intervention([Part("double", {}, make=lambda rows: [(name, double)], layers=(2,))])
    fast, full, stats = both_ways(model, s, [iv] * 3, batch_size=1)
    assert stats["incremental"]
    torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
    torch.testing.assert_close(fast[2], fast[0], atol=0, rtol=0)


def test_a_hook_already_on_the_model_makes_the_sweep_run_whole_forwards():
    # a caller's hook may index positions (here: the residual's position 4): a suffix run would move it
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]

    def bump(t, hook):
        t = t.clone()
        t[:, 4] += 3.0
        return t

    ivs = [block_attention(s.tm, "audio", "last", [2]), block_attention(s.tm, "video", "question", [1])]
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", bump)]):
        fast, full, stats = both_ways(model, s, ivs)
    assert not stats["incremental"]
    assert torch.equal(fast, full)


def test_start_layer_is_checked():
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]
    L = model.cfg.n_layers
    with pytest.raises(ValueError, match=rf"start_layer {L + 1}: the model has {L} blocks"):
        model.run_language_model(**s.lm_inputs(1), start_layer=L + 1)
    with torch.no_grad():  # start_layer = n_layers: no block, the final norm and unembedding alone (TransformerLens's)
        resid = model.run_language_model(**s.lm_inputs(1), stop_at_layer=L)
        assert torch.equal(model.run_language_model(resid, s.position_ids, start_layer=L), model.unembed(model.ln_final(resid)))
    with pytest.raises(ValueError, match="discard cannot run from start_layer > 0"):
        model.run_language_model(**s.lm_inputs(1), start_layer=1, discard=(s.tm.select("audio"), 2))
    with pytest.raises(ValueError, match=r"kv_caches holds 2 slots; the model has"):
        model.run_language_model(**s.lm_inputs(1), kv_caches=[None, None])


def test_a_cell_that_edits_only_generated_queries_reads_the_clean_last_position():
    # its first prompt query is past the prompt: it used to run a suffix of 0 positions and crash
    _, model = tiny_pair()
    inputs = av_inputs(6)
    s = samples(model, inputs, token_map(model, inputs))[0]
    ivs = [block_attention(s.tm, "audio", "generated", [2], generated="by_group")] * 3
    fast, full, stats = both_ways(model, s, ivs)
    assert stats["incremental"]
    torch.testing.assert_close(fast, full, atol=TOL, rtol=0)


def test_multi_step_tracing_keeps_the_qwen3_injections(qwen3_setup):  # noqa: F811
    # causal tracing's steps > 1 probe ran the prompt without DeepStack's injections (0.83 logits off)
    from patching.methods.causal_tracing import _probe
    from patching.engine.intervention import Intervention

    model, kw, visual = qwen3_setup
    s = samples(model, kw, qwen3_token_map(kw["attention_mask"], visual))[0]
    cand = list(range(model.cfg.d_vocab))
    one = _probe(model, s, [Intervention()], cand, steps=1)[0]
    two = _probe(model, s, [Intervention()], cand, steps=2)[0]
    assert float((two - one).min()) >= -1e-6  # the best over two steps includes step 1
    assert float((two - one).max()) > 1e-3  # and the second step was read
