"""Composable interventions checked against the HF model with hand-edited 4D masks, and bad input."""

import math

import pytest
import torch
from test_patching_common import N_LAYERS, av_inputs, tiny_pair, token_map

from hooked_av.core.masks import neg_inf
from patching.engine.hooks import ablate, add_noise, block_attention, discard, patch_from_cache, scale_attention, steer


@pytest.fixture(scope="module")
def setup():
    hf, model = tiny_pair()
    inputs = av_inputs()
    return hf, model, inputs, token_map(model, inputs)


def _hf_mask(tm, src, dst) -> torch.Tensor:
    """Causal 4D additive mask with dst -> src knocked out, built by hand from the TokenMap."""
    s = tm.seq_len
    m = torch.zeros(1, 1, s, s)
    m.masked_fill_(torch.ones(s, s, dtype=torch.bool).triu(1), neg_inf(torch.float32))
    m[0, 0][tm.mask(dst)[0][:, None] & tm.mask(src)[0][None, :]] = neg_inf(torch.float32)
    return m


def test_block_attention_on_all_layers_equals_hf_with_a_4d_mask(setup):
    hf, model, inputs, tm = setup
    pos = model.encode(**inputs)["position_ids"]
    iv = block_attention(tm, "audio|video", "last", range(N_LAYERS))
    with torch.no_grad():
        ref = hf(**{**inputs, "attention_mask": _hf_mask(tm, "audio|video", "last")}, position_ids=pos).logits
        ours = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
        assert [b.attn.last_path for b in model.blocks] == ["fast"] * N_LAYERS  # the SDPA path honours it
        clean = model(**inputs)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours[0, -1] - clean[0, -1]).abs().max() > 1e-3  # the knockout did something


def test_block_attention_on_a_window_equals_hf_with_a_pre_hook_on_those_layers(setup):
    hf, model, inputs, tm = setup
    pos = model.encode(**inputs)["position_ids"]
    window = range(2, 5)
    edited = _hf_mask(tm, "video", "question")
    s = tm.seq_len
    plain = torch.zeros(1, 1, s, s).masked_fill_(torch.ones(s, s, dtype=torch.bool).triu(1), neg_inf(torch.float32))

    def pre(module, args, kwargs):
        kwargs["attention_mask"] = edited
        return args, kwargs

    handles = [hf.model.language_model.layers[i].register_forward_pre_hook(pre, with_kwargs=True) for i in window]
    try:
        with torch.no_grad():
            ref = hf(**{**inputs, "attention_mask": plain}, position_ids=pos).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        ours = model.run_with_hooks(**inputs, fwd_hooks=block_attention(tm, "video", "question", window))
        full = model.run_with_hooks(**inputs, fwd_hooks=block_attention(tm, "video", "question", range(N_LAYERS)))
    assert (ours - ref).abs().max() < 1e-5
    assert (ours - full).abs().max() > 1e-4  # the window is not all layers


def test_scale_attention_by_zero_is_a_knockout_and_by_one_changes_nothing(setup):
    _, model, inputs, tm = setup
    with torch.no_grad():
        clean = model(**inputs)
        one = model.run_with_hooks(**inputs, fwd_hooks=scale_attention(tm, "last", "audio", 1.0, range(N_LAYERS)))
        zero = model.run_with_hooks(**inputs, fwd_hooks=scale_attention(tm, "last", "audio", 0.0, range(N_LAYERS)))
        ko = model.run_with_hooks(**inputs, fwd_hooks=block_attention(tm, "audio", "last", range(N_LAYERS)))
    assert (one - clean).abs().max() < 1e-6
    assert (zero - ko).abs().max() < 1e-6


def test_scale_attention_matches_its_softmax_formula_on_the_pattern(setup):
    _, model, inputs, tm = setup
    f = 3.0
    names = lambda n: n == "blocks.1.attn.hook_pattern"  # noqa: E731
    with torch.no_grad():
        _, c0 = model.run_with_cache(**inputs, names_filter=names)
        with model.hooks(fwd_hooks=scale_attention(tm, "last", "audio", f, [1])):
            _, c1 = model.run_with_cache(**inputs, names_filter=names)
    p0, p1 = c0["blocks.1.attn.hook_pattern"][0, :, -1], c1["blocks.1.attn.hook_pattern"][0, :, -1]  # [h, k]
    w = p0.clone()
    audio = tm.mask("audio")[0]
    w[:, audio] *= f
    assert (w / w.sum(-1, keepdim=True) - p1).abs().max() < 1e-5


def test_steer_adds_alpha_abs_score_on_the_edge_only(setup):
    _, model, inputs, tm = setup
    names = lambda n: n == "blocks.2.attn.hook_attn_scores"  # noqa: E731
    with torch.no_grad():
        _, c0 = model.run_with_cache(**inputs, names_filter=names)
        with model.hooks(fwd_hooks=steer(tm, "last", "video", 0.2, [2], heads=[1])):
            _, c1 = model.run_with_cache(**inputs, names_filter=names)
    s0, s1 = c0["blocks.2.attn.hook_attn_scores"], c1["blocks.2.attn.hook_attn_scores"]
    video = tm.mask("video")[0]
    assert (s1[0, 1, -1, video] - 1.2 * s0[0, 1, -1, video].clamp(min=0) - 0.8 * s0[0, 1, -1, video].clamp(max=0)).abs().max() < 1e-5
    s1[0, 1, -1, video] = s0[0, 1, -1, video]
    assert (s1 - s0).abs().max() == 0  # nothing else moved


def test_rows_restrict_an_intervention_to_its_rows(setup):
    _, model, inputs, tm = setup
    enc = model.encode(**inputs)
    two = {k: (v.expand(2, -1, -1) if k == "inputs_embeds" else v.expand(-1, 2, -1) if k == "position_ids" else None)
           for k, v in enc.items() if k in ("inputs_embeds", "position_ids")}
    iv = block_attention(tm, "audio", "last", range(N_LAYERS), rows=[1])
    with torch.no_grad():
        clean = model(**inputs)[0, -1]
        out = model.run_with_hooks(**two, fwd_hooks=iv)[:, -1]
        ko = model.run_with_hooks(**inputs, fwd_hooks=block_attention(tm, "audio", "last", range(N_LAYERS)))[0, -1]
    assert (out[0] - clean).abs().max() < 1e-5 and (out[1] - ko).abs().max() < 1e-5


def test_interventions_compose_print_and_serialise(setup):
    _, model, inputs, tm = setup
    iv = block_attention(tm, "audio", "last", [0, 1]) + scale_attention(tm, "last", "video", 2.0, [3]) + discard(tm, "audio", 4, N_LAYERS)
    assert len(iv) == 2 + 1 + 2
    text = repr(iv)
    assert "block_attention(src=audio, dst=last" in text and "factor=2.0" in text and "discard(group=audio, from_layer=4)" in text
    d = iv.on_rows([0]).to_dict()
    assert [p["op"] for p in d] == ["block_attention", "scale_attention", "discard"] and d[0]["rows"] == [0]
    assert math.isclose(d[1]["factor"], 2.0)


def test_patch_ablate_and_noise_edit_the_named_positions_only(setup):
    _, model, inputs, tm = setup
    name = "blocks.1.hook_resid_pre"
    audio = tm.select("audio")
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=[name])
        got = {}

        def grab(t, hook):
            got["x"] = t.clone()

        for iv in (ablate(name, "zero", positions=audio), add_noise(name, audio, std=2.0, seed=3),
                   patch_from_cache({name: cache[name] + 1.0}, name, positions=audio)):
            model.run_with_hooks(**inputs, fwd_hooks=list(iv) + [(name, grab)])
            diff = (got["x"] - cache[name])[0].abs().amax(-1)
            assert bool((diff[audio.mask[0]] > 1e-3).all()) and float(diff[~audio.mask[0]].max()) == 0
    assert abs(float((got["x"] - cache[name])[0, audio.mask[0]].mean()) - 1.0) < 1e-6


def test_bad_input_gives_clear_errors(setup):
    _, model, inputs, tm = setup
    with pytest.raises(ValueError, match=r"'image' selects no position in row 0"):
        block_attention(tm, "image", "last", [0])
    with pytest.raises(ValueError, match=rf"layer\(s\) \[{N_LAYERS}\] out of range; the model has {N_LAYERS} layers \(0..{N_LAYERS - 1}\)"):
        block_attention(tm, "audio", "last", [0, N_LAYERS]).check(model)
    with pytest.raises(ValueError, match="negative layer"):
        block_attention(tm, "audio", "last", [-1])
    with pytest.raises(ValueError, match="unknown token group 'vidoe'"):
        block_attention(tm, "vidoe", "last", [0])
    with pytest.raises(KeyError, match="the cache has no"):
        patch_from_cache({}, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="mode must be"):
        ablate("blocks.0.hook_resid_pre", mode="median")


def test_a_bool_mask_is_a_token_set_and_other_objects_are_refused(setup):
    # block_attention(tm, <bool tensor>, ...) failed with "Tensor.__contains__ only supports Tensor or scalar"
    model, inputs, tm = setup[1], setup[2], setup[3]
    for src, dst in ((tm.mask("audio"), "last"), ("audio", tm.mask("last")), (tm.mask("audio")[0], tm.mask("last")[:1])):
        by_mask = block_attention(tm, src, dst, [1, 2])
        by_name = block_attention(tm, "audio", "last", [1, 2])
        with torch.no_grad():
            assert torch.equal(model.run_with_hooks(**inputs, fwd_hooks=by_mask.check(model)),
                               model.run_with_hooks(**inputs, fwd_hooks=by_name.check(model)))
    assert "mask[" in str(block_attention(tm, tm.mask("audio"), "last", [1]))
    with pytest.raises(ValueError, match=r"a bool mask of shape \(1, 5\) does not fit this TokenMap of \[1, \d+\] positions"):
        block_attention(tm, torch.ones(5, dtype=torch.bool), "last", [1])
    with pytest.raises(ValueError, match=r"a torch.int64 tensor is not a token set; pass a bool mask"):
        block_attention(tm, torch.tensor([3, 4]), "last", [1])
    with pytest.raises(TypeError, match=r"a token set is a group name .* got int 3"):
        block_attention(tm, 3, "last", [1])
    with pytest.raises(TypeError, match=r"got NoneType None"):
        tm.select(None)
