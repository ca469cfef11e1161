"""Head-level knockout (`block_attention(..., heads=)`): equal (fp32, 1e-5) to a naive reference that
recomputes the knocked-out head's output from its rotated queries, keys and values with the edge removed
from a hand-built causal mask, on the whole-forward and the recompute-what-changes path of the sweep
engine, on both samples of a left-padded batch; every head at once equals the mask knockout; bad heads
are refused before anything runs."""

from __future__ import annotations

import pytest
import torch
from test_patching_common import av_inputs, tiny_pair, token_map

from patching.engine.hooks import block_attention
from patching.engine.sweep import run_rows, samples

torch.set_num_threads(1)
TOL = 1e-5
EDGES = (("video", "last"), ("audio", "question"), ("last", "last"))


@pytest.fixture(scope="module")
def setup():
    _, model = tiny_pair()
    inputs = av_inputs(6, 7)  # two rows of different lengths: the first is left-padded
    return model, samples(model, inputs, token_map(model, inputs))


def reference_logits(model, s, src, dst, layers, head) -> torch.Tensor:
    """Last logits `[vocab]` of the sample with head `head`'s output in `layers` recomputed by hand:
    softmax(q k^T / sqrt(d) over the causal keys minus the src keys of dst queries) v, the other heads
    as the model computes them."""
    a = model.blocks[0].attn
    group = a.n_heads // a.n_kv_heads
    s_m, d_m = s.tm.mask(src)[0], s.tm.mask(dst)[0]
    n = s.seq_len
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & ~(d_m[:, None] & s_m[None, :])
    seen: dict = {}

    def keep(t, hook):
        seen[hook.name.rsplit(".", 1)[-1]] = t

    def redo(z, hook):
        q = seen["hook_rot_q"][0, :, head]  # [pos, d]
        k = seen["hook_rot_k"][0, :, head // group]
        v = seen["hook_v"][0, :, head // group]
        scores = (q @ k.T) * a.d_head**-0.5
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        z = z.clone()
        z[0, :, head] = p @ v
        return z

    hooks = [(f"blocks.{l}.attn.{h}", keep) for l in layers for h in ("hook_rot_q", "hook_rot_k", "hook_v")]
    hooks += [(f"blocks.{l}.attn.hook_z", redo) for l in layers]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model.run_language_model(**s.lm_inputs(1), logits_at="last")[0, -1]


def test_one_head_equals_the_naive_reference_on_both_paths(setup):
    model, data = setup
    for s in data:
        cells = [(src, dst, layers, head) for src, dst in EDGES for layers in ([1], [2, 3, 4]) for head in (0, 3)]
        ivs = [block_attention(s.tm, src, dst, layers, heads=[head]) for src, dst, layers, head in cells]
        stats = {}
        fast = run_rows(model, s, ivs, progress=False, stats=stats, batch_size=4)
        full = run_rows(model, s, ivs, progress=False, incremental=False, batch_size=4)
        ref = torch.stack([reference_logits(model, s, *c) for c in cells])
        torch.testing.assert_close(full, ref, atol=TOL, rtol=0)
        torch.testing.assert_close(fast, ref, atol=TOL, rtol=0)
        assert stats["incremental"] and stats["positions"] < stats["positions_full"] / 2
        # the reference is not a no-op: the knockout moves the logits
        plain = run_rows(model, s, [block_attention(s.tm, "last", "last", [0], heads=[1], rows=[1])], progress=False)
        assert (ref - plain).abs().amax(-1).min() > 1e-4


def test_every_head_is_the_mask_knockout_and_the_edit_is_on_the_scores(setup):
    model, data = setup
    s = data[0]
    h = model.cfg.n_heads
    every = block_attention(s.tm, "video", "last", [1, 2], heads=list(range(h)))
    assert every.hook_names == ["blocks.1.attn.hook_attn_scores", "blocks.2.attn.hook_attn_scores"]
    assert every.to_dict()[0]["heads"] == list(range(h))
    mask = block_attention(s.tm, "video", "last", [1, 2])
    torch.testing.assert_close(run_rows(model, s, [every], progress=False), run_rows(model, s, [mask], progress=False),
                               atol=TOL, rtol=0)


def test_bad_heads_are_refused_before_a_forward(setup):
    model, data = setup
    s = data[0]
    with pytest.raises(ValueError, match="heads is empty"):
        block_attention(s.tm, "video", "last", [1], heads=[])
    calls = []
    model.blocks[0].hook_resid_pre.add_hook(lambda t, hook: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"head\(s\) \[4\] out of range"):
            run_rows(model, s, [block_attention(s.tm, "video", "last", [1], heads=[4])], progress=False)
    finally:
        model.reset_hooks()
    assert not calls
