"""Guided decoding: the formula, scale 0 = plain greedy decoding, per-row scales, and a guide that
blocks the audio changes auditory answers of the toy model."""

import torch

import hooked_av
from hooked_av import toy
from patching.methods.guidance import guided_generate, guided_logits
from patching.engine.hooks import block_attention


def test_guided_logits_interpolate_log_probabilities():
    a, b = torch.randn(2, 7), torch.randn(2, 7)
    half = guided_logits(a, b, 0.5)
    assert torch.allclose(half, (a.log_softmax(-1) + b.log_softmax(-1)) / 2, atol=1e-6)
    per_row = guided_logits(a, b, torch.tensor([0.0, 1.0]))
    assert torch.allclose(per_row[0], a[0].log_softmax(-1)) and torch.allclose(per_row[1], b[1].log_softmax(-1), atol=1e-6)


def test_guided_generation_on_the_toy_model():
    model = hooked_av.load("toy")
    batch = toy.make_batch(6, seed=31, tokenizer=model.tokenizer, n_clips=32, kinds=("auditory",))

    def no_audio(tm):
        return block_attention(tm, "audio", tm.select("all") - tm.select("audio"), range(model.cfg.n_layers))

    plain = guided_generate(model, batch.inputs, no_audio, scale=0.0, max_new_tokens=2)
    with torch.no_grad():
        reference = model.generate(**batch.inputs, max_new_tokens=2)
    assert torch.equal(plain, reference)
    assert (plain[:, 0] == batch.answers).float().mean() >= 0.95
    guided = guided_generate(model, batch.inputs, no_audio, scale=1.0, max_new_tokens=1)
    assert (guided[:, 0] == batch.answers).float().mean() <= 0.6
    mixed = guided_generate(model, batch.inputs, no_audio, scale=torch.tensor([0.0, 1.0] * 3), max_new_tokens=1)
    assert torch.equal(mixed[0::2], plain[0::2, :1]) and torch.equal(mixed[1::2], guided[1::2])


def test_guided_generation_keeps_deepstack_injections():
    """Qwen3-Omni's DeepStack features are added on the prompt at every step: scale 0 equals the
    model's own greedy decoding on a left-padded video + audio + image batch (dropping the injections
    decodes [[48, 30, 48, ...], [74, 74, ...]] instead)."""
    from qwen3_omni_helpers import model_inputs, tiny_hf

    from hooked_av import HookedQwen3Omni
    from patching.engine.intervention import Intervention

    torch.set_num_threads(1)
    model = HookedQwen3Omni.from_hf(tiny_hf())
    inputs, _ = model_inputs("left_padded")
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=6)
    assert reference.tolist() == [[48] * 6, [111, 111, 53, 7, 92, 7]]
    assert torch.equal(guided_generate(model, inputs, lambda tm: Intervention(), scale=0.0, max_new_tokens=6), reference)


def test_make_hooks_that_returns_no_intervention_is_refused_before_any_forward(toy_model):
    # a make_hooks without `return` failed with "'NoneType' object is not iterable" after the plain forward
    import pytest

    batch = toy.make_batch(2, seed=31, tokenizer=toy_model.tokenizer, n_clips=32, kinds=("auditory",))
    ran = []
    handle = toy_model.blocks[0].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        for make, message in ((lambda tm: None, r"make_hooks\(tm\) returned NoneType None; it must return an Intervention"),
                              (lambda tm: [("blocks.0.hook_resid_post",)], r"returned list .* non-empty list of \(hook_name, fn\)"),
                              (lambda tm: [("blocks.9.hook_resid_post", lambda t, hook: t)], r"does not exist"),
                              ("block_attention", r"make_hooks must be a function of the TokenMap")):
            with pytest.raises((TypeError, KeyError), match=message):
                guided_generate(toy_model, batch.inputs, make, scale=1.0, max_new_tokens=1)
    finally:
        handle.remove()
    assert not ran
    pairs = guided_generate(toy_model, batch.inputs, lambda tm: list(block_attention(tm, "audio", "last", [0, 1])),
                            scale=1.0, max_new_tokens=1)
    iv = guided_generate(toy_model, batch.inputs, lambda tm: block_attention(tm, "audio", "last", [0, 1]), scale=1.0,
                         max_new_tokens=1)
    assert torch.equal(pairs, iv)
