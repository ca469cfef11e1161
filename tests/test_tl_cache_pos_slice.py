"""TransformerLens's own `run_with_cache(pos_slice=...)` tests, ported to the toy model (TransformerLens
`tests/integration/test_cache_pos_slice.py` at commit 4cd36aae, current main, checked against the installed 3.9).

Their model (`tiny-stories-1M` from the hub) is replaced by the shipped toy and their Lorem-ipsum prompt by toy
words as a string (the toy's text-only prompt); every comparison is kept. Adapted: `num_tokens` is the length of
the prompt the string runs as (theirs: the tokenizer's encoding of the bare text), and the `pos_embed` lines are
dropped (rotary positions: the toy has no `hook_pos_embed`).
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
PROMPT = "what colour is the shape ? is the sound high or low ? which note is played ?"
PER_POSITION = ("resid_pre", "resid_post", "resid_mid", "attn_out", "pre", "post", "mlp_out")  # [.., pos, d]
PER_HEAD = ("q", "k", "v", "z")  # [.., pos, head, d_head]
PER_QUERY = ("attn_scores", "pattern")  # [.., head, query, key]
NORMS = [("scale", "ln1"), ("scale", "ln2"), ("normalized", "ln1"), ("normalized", "ln2")]


@pytest.fixture(scope="module")
def model(toy_model):
    return toy_model


def positions(model):
    n = model.to_tokens(PROMPT).shape[1]
    return n, [0, n // 2, n - 1, -1]


def test_run_with_cache_pos_slice_keep_batch(model):
    with torch.no_grad():
        _, whole = model.run_with_cache(PROMPT, return_type=None)
    n, tests = positions(model)
    c = model.cfg
    for i in tests:
        with torch.no_grad():
            _, part = model.run_with_cache(PROMPT, return_type=None, pos_slice=i)
        assert part["embed"].shape == (1, 1, c.d_model)
        assert part["q", 0].shape == (1, 1, c.n_heads, c.d_head)
        assert torch.equal(whole["embed"][0, i, :], part["embed"][0, 0, :])
        for layer in range(c.n_layers):
            for act in PER_POSITION:
                assert torch.equal(whole[act, layer][0, i, :], part[act, layer][0, 0, :]), act
            for act, ln in NORMS:
                assert torch.equal(whole[act, layer, ln][0, i, :], part[act, layer, ln][0, 0, :]), (act, ln)
            for act in PER_HEAD:
                assert torch.equal(whole[act, layer][0, i, :, :], part[act, layer][0, 0, :, :]), act
            for act in PER_QUERY:
                assert torch.equal(whole[act, layer][0, :, i, :], part[act, layer][0, :, 0, :]), act


def test_run_with_cache_pos_slice_remove_batch(model):
    with torch.no_grad():
        _, whole = model.run_with_cache(PROMPT, remove_batch_dim=True, return_type=None)
    n, tests = positions(model)
    c = model.cfg
    for i in tests:
        with torch.no_grad():
            _, part = model.run_with_cache(PROMPT, remove_batch_dim=True, pos_slice=i)
        assert part["embed"].shape == (1, c.d_model)
        assert part["q", 0].shape == (1, c.n_heads, c.d_head)
        assert torch.equal(whole["embed"][i, :], part["embed"][0, :])
        for layer in range(c.n_layers):
            for act in PER_POSITION:
                assert torch.equal(whole[act, layer][i, :], part[act, layer][0, :]), act
            for act, ln in NORMS:
                assert torch.equal(whole[act, layer, ln][i, :], part[act, layer, ln][0, :]), (act, ln)
            for act in PER_HEAD:
                assert torch.equal(whole[act, layer][i, :, :], part[act, layer][0, :, :]), act
            for act in PER_QUERY:
                assert torch.equal(whole[act, layer][:, i, :], part[act, layer][:, 0, :]), act
