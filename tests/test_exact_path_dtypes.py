"""The exact attention path (any hooked pattern or score) in fp64 on a left-padded batch: the padding's
mask value `finfo(float64).min` used to become -inf in an fp32 softmax, a padding query row of -inf a
NaN, and the NaN spread through the padding's values to every row (even `steer` with alpha 0 gave NaN
logits). The exact path now equals the fast path (fp64, 1e-10) and the fp32 model keeps HF's fp32 softmax."""

from __future__ import annotations

import torch

import hooked_av
from hooked_av.toy import make_batch

torch.set_num_threads(1)


def test_fp64_exact_path_on_a_left_padded_batch_equals_the_fast_path():
    model = hooked_av.load("toy", dtype=torch.float64)
    inputs = make_batch(2, 0, model.tokenizer, n_clips=20, kinds=("auditory", "two_clip")).inputs
    assert model.token_map(inputs).padding[0].any()  # row 0 is left-padded
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        fast = model(**inputs)
        exact, cache = model.run_with_cache(**inputs, names_filter=names)
        rows = model.attention_rows(inputs, "last")
    assert torch.isfinite(exact).all()
    assert (exact - fast).abs().max() < 1e-10
    for l, n in enumerate(names):
        assert torch.isfinite(cache[n]).all()
        assert (rows[l, :, :, 0] - cache[n][:, :, -1]).abs().max() < 1e-12


def test_fp32_keeps_an_fp32_softmax():
    from hooked_av.core.attention import softmax_dtype

    assert [softmax_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)] == [
        torch.float32, torch.float32, torch.float32, torch.float64]
