"""The loss, gradients and sampling of our models against HF's own Thinkers (Qwen2.5-Omni's
`Qwen2_5OmniThinkerForConditionalGeneration`, Qwen3-Omni's `Qwen3OmniMoeThinkerForConditionalGeneration`,
eager attention, fp32, tiny random weights) on media geometries: `return_type="loss"` equals HF's loss given
the same labels; every activation's and parameter's gradient equals autograd on HF's model (<= 1e-5;
residual streams, attention patterns on the exact path, the towers' outputs); `generate(do_sample=True, ...)`
gives HF's tokens for the same seed and settings (temperature, top_k, top_p, num_return_sequences, eos with
padding), under an intervention too, and greedy decoding stays HF's."""

from __future__ import annotations

import pytest
import torch
from omni_helpers import geometries, tiny_hf_thinker
from qwen3_omni_helpers import model_inputs, tiny_hf

from hooked_av import HookedQwen2_5Omni, HookedQwen3Omni

torch.set_num_threads(1)
OMNI = geometries()
CASES = [("qwen2_5_omni", g) for g in ("audio_and_video_blocks", "audio_in_video", "padded_batch")] + \
        [("qwen3_omni", g) for g in ("image", "audio_in_video", "left_padded")]


@pytest.fixture(scope="module")
def pairs():
    q2 = tiny_hf_thinker(seed=0)
    q3 = tiny_hf(seed=0)
    return {"qwen2_5_omni": (q2, HookedQwen2_5Omni.from_hf(q2)), "qwen3_omni": (q3, HookedQwen3Omni.from_hf(q3))}


def case(name: str, geometry: str) -> tuple[dict, bool | None]:
    return OMNI[geometry] if name == "qwen2_5_omni" else model_inputs(geometry)


def hf_parts(hf):
    """The language model's decoder layers and the towers of an HF Thinker."""
    inner = hf.model
    return inner.language_model.layers, [inner.audio_tower, inner.visual]


@pytest.mark.parametrize("name,geometry", CASES)
def test_loss_and_every_gradient_equal_hf_autograd(pairs, name, geometry):
    hf, ours = pairs[name]
    inputs, av = case(name, geometry)
    labels = ours.loss_labels(inputs["input_ids"], inputs["attention_mask"])
    assert (labels != -100).sum() > 0
    try:
        loss, cache = ours.run_with_cache(**inputs, use_audio_in_video=av, return_type="loss", labels=labels,
                                          incl_bwd=True)
        towers = []
        layers, tower_modules = hf_parts(hf)

        def keep(module, args, out):  # every tower call's output (HF runs the images' and videos' separately)
            t = out.pooler_output if getattr(out, "pooler_output", None) is not None else getattr(out, "last_hidden_state", out)
            t = t[0] if isinstance(t, tuple) else t
            t.retain_grad()
            towers.append((module, t))

        handles = [m.register_forward_hook(keep) for m in tower_modules]
        try:
            out = hf(**inputs, use_audio_in_video=av, labels=labels, output_hidden_states=True, output_attentions=True)
        finally:
            for h in handles:
                h.remove()
        for t in (*out.hidden_states, *out.attentions):
            t.retain_grad()
        out.loss.backward()
        assert abs(loss.item() - out.loss.item()) < 1e-6
        real = inputs["attention_mask"].bool()
        for l in range(ours.cfg.n_layers):  # the residual entering each block, and each block's pattern
            torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_pre_grad"][real], out.hidden_states[l].grad[real],
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern_grad"], out.attentions[l].grad, atol=1e-5, rtol=0)
            assert ours.blocks[l].attn.last_path == "exact"
        audio = [t for m, t in towers if m is tower_modules[0]]
        visual = [t for m, t in towers if m is tower_modules[1]]
        if audio:
            torch.testing.assert_close(cache["hook_audio_embeds_grad"], torch.cat([t.grad for t in audio]), atol=1e-5, rtol=0)
        kinds = [k for k in ("image", "video") if f"{k}_grid_thw" in inputs]  # HF: images first, then videos
        for k, t in zip(kinds, visual):
            torch.testing.assert_close(cache[f"hook_{k}_embeds_grad"], t.grad, atol=1e-5, rtol=0)
        convert = ours.key_converter()
        ours_p = dict(ours.named_parameters())
        checked = 0
        for key, p in hf.named_parameters():
            mapped = convert(key, p) if p.grad is not None else None
            for our_name, _ in mapped or []:
                if our_name in ours_p and ours_p[our_name].shape == p.shape:
                    torch.testing.assert_close(ours_p[our_name].grad, p.grad, atol=1e-5, rtol=0, msg=our_name)
                    checked += 1
        assert checked > 0.8 * sum(p.grad is not None for p in hf.parameters())
    finally:
        hf.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)


SETTINGS = [dict(temperature=0.7, top_k=20, top_p=0.9), dict(top_p=0.5, num_return_sequences=3), dict(temperature=1.3)]


@pytest.mark.parametrize("name,geometry", CASES)
def test_sampling_gives_hfs_tokens_for_the_same_seed_and_settings(pairs, name, geometry):
    hf, ours = pairs[name]
    inputs, av = case(name, geometry)
    n = inputs["input_ids"].shape[1]
    for kw in SETTINGS:
        torch.manual_seed(3)  # HF samples from the global generator
        with torch.no_grad():
            ref = hf.generate(**inputs, use_audio_in_video=av, max_new_tokens=5, do_sample=True, pad_token_id=0,
                              **{"top_k": 0, **kw})[:, n:]  # top_k=0: no HF default of 50
        assert torch.equal(ours.generate(**inputs, use_audio_in_video=av, max_new_tokens=5, do_sample=True, seed=3, **kw), ref)
    with torch.no_grad():  # greedy stays HF's; an eos stops a row, which HF pads with pad_token_id
        greedy = hf.generate(**inputs, use_audio_in_video=av, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, n:]
    assert torch.equal(ours.generate(**inputs, use_audio_in_video=av, max_new_tokens=5), greedy)
    eos = int(greedy[0, 1])
    with torch.no_grad():
        ref = hf.generate(**inputs, use_audio_in_video=av, max_new_tokens=5, do_sample=False, eos_token_id=eos,
                          pad_token_id=7)[:, n:]
    got = ours.generate(**inputs, use_audio_in_video=av, max_new_tokens=5, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(got, ref) and (got == 7).any() == (ref == 7).any()


@pytest.mark.parametrize("name", ["qwen2_5_omni", "qwen3_omni"])
def test_sampling_under_an_intervention_gives_hfs_tokens_under_the_same_edit(pairs, name):
    """Block 1's MLP output times 30: a forward hook on HF's layer, `blocks.1.hook_mlp_out` on ours (the tiny
    random models' logits are nearly flat; at temperature 0.05 the edit changes what is sampled)."""
    hf, ours = pairs[name]
    inputs, av = case(name, CASES[0][1] if name == "qwen2_5_omni" else "image")
    n = inputs["input_ids"].shape[1]
    layers, _ = hf_parts(hf)
    handle = layers[1].mlp.register_forward_hook(lambda m, a, out: out * 30.0)
    try:
        torch.manual_seed(11)
        with torch.no_grad():
            ref = hf.generate(**inputs, use_audio_in_video=av, max_new_tokens=6, do_sample=True, top_k=0, temperature=0.05,
                              pad_token_id=0)[:, n:]
    finally:
        handle.remove()
    with ours.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda t, hook: t * 30.0)]):
        got = ours.generate(**inputs, use_audio_in_video=av, max_new_tokens=6, do_sample=True, temperature=0.05, seed=11)
    assert torch.equal(got, ref)
    plain = ours.generate(**inputs, use_audio_in_video=av, max_new_tokens=6, do_sample=True, temperature=0.05, seed=11)
    assert not torch.equal(plain, got)  # the edit changes what is sampled
