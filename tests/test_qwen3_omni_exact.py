"""HookedQwen3Omni against HF's `Qwen3OmniMoeThinkerForConditionalGeneration` built from a tiny random config
(4 experts, top-2, 3 layers with layer 1 dense, DeepStack taps), saved with `save_pretrained` and loaded
through our `from_pretrained`: fp32 logits, residuals and router choices, bf16 within HF's own bf16 gap,
both checkpoint layouts, the registry, and the parameter count of the released 30B-A3B Thinker sizes."""

from __future__ import annotations

import json

import pytest
import torch
from qwen3_omni_helpers import GEOMETRIES, USER, batch, model_inputs, text, tiny_hf

import hooked_av
from hooked_av import HookedQwen3Omni

torch.set_num_threads(1)
TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = tiny_hf()
    folder = tmp_path_factory.mktemp("qwen3_thinker")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def pair(saved):
    hf, folder = saved
    return hf, HookedQwen3Omni.from_pretrained(folder)


def router_hooks(hf):
    """Forward hooks on HF's routers collecting (logits, weights, indices) per sparse layer."""
    got, handles = {}, []
    for i, layer in enumerate(hf.model.language_model.layers):
        if hasattr(layer.mlp, "gate"):
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out)))
    return got, handles


def text_inputs(padded: bool):
    rows = [text(12), text(7, 1)] if padded else [text(12)]
    ids, mask = batch(rows)
    return {"input_ids": ids, "attention_mask": mask}


def test_loaded_structure_and_registry(pair, saved):
    _, ours = pair
    assert [type(b.mlp).__name__ for b in ours.blocks] == ["SparseMoE", "GatedMLP", "SparseMoE"]
    assert ours.cfg.num_experts == 4 and ours.cfg.experts_per_token == 2 and ours.cfg.d_head == 16
    assert ours.ids.audio == 100 and ours.position_id_per_seconds == 13
    for name in ("blocks.0.mlp.hook_router_choice", "blocks.2.mlp.experts.3.hook_out", "blocks.0.hook_injection",
                 "blocks.0.attn.q_norm.hook_normalized", "hook_audio_embeds", "hook_video_embeds"):
        assert name in ours.hook_dict, name
    loaded = hooked_av.load(saved[1])
    assert type(loaded) is HookedQwen3Omni
    assert hooked_av.families.qwen3_omni.matches({"model_type": "qwen3_omni_moe"})
    assert not hooked_av.families.qwen3_omni.matches({"model_type": "qwen2_5_omni"})


@pytest.mark.parametrize("padded", [False, True], ids=["text", "left_padded"])
def test_text_logits_residuals_and_routing_equal_hf(pair, padded):
    hf, ours = pair
    inputs = text_inputs(padded)
    got, handles = router_hooks(hf)
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True)
    for h in handles:
        h.remove()
    names = lambda n: n.endswith("hook_resid_post") or "hook_router_" in n  # noqa: E731
    with torch.no_grad():
        logits, cache = ours.run_with_cache(**inputs, names_filter=names)
    real = inputs["attention_mask"].bool()
    assert (logits[real] - ref.logits[real]).abs().max() <= TOL
    for l in range(2):  # HF records each decoder layer's output (the last after its norm)
        hs = ref.hidden_states[l + 1][real]  # the residual grows to ~10-100: fp32 rounding relative to it
        diff = (cache[f"blocks.{l}.hook_resid_post"][real] - hs).abs().max()
        assert diff <= TOL * max(1.0, float(hs.abs().max())), (l, diff)
    b, s = inputs["input_ids"].shape
    for l in (0, 2):
        hf_logits, hf_weights, hf_choice = got[l]
        mine = cache[f"blocks.{l}.mlp.hook_router_choice"]
        assert torch.equal(mine[real], hf_choice.view(b, s, -1)[real])
        assert (cache[f"blocks.{l}.mlp.hook_router_weights"] - hf_weights.view(b, s, -1)).abs().max() <= TOL
        assert (cache[f"blocks.{l}.mlp.hook_router_logits"] - hf_logits.view(b, s, -1)).abs().max() <= TOL


@pytest.mark.parametrize("name", ["left_padded", "audio_in_video"])
def test_attention_patterns_equal_hfs_eager_attentions(pair, name):
    """Where HF exposes them (eager attention, output_attentions): every layer's pattern on the real queries
    and keys, media and a left-padded batch included (fp32, 1e-6)."""
    hf, ours = pair
    inputs, av = model_inputs(name)
    with torch.no_grad():
        ref = hf(**inputs, use_audio_in_video=av, output_attentions=True).attentions
        _, cache = ours.run_with_cache(**inputs, use_audio_in_video=av, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    real = inputs["attention_mask"].bool()
    assert len(ref) == ours.cfg.n_layers
    for l, theirs in enumerate(ref):
        mine = cache[f"blocks.{l}.attn.hook_pattern"]
        for r in range(real.shape[0]):
            keep = real[r]
            diff = (mine[r][:, keep][:, :, keep] - theirs[r][:, keep][:, :, keep]).abs().max()
            assert diff <= 1e-6, (l, r, diff)


MEDIA = [g for g in GEOMETRIES if not g.startswith("text")]


@pytest.mark.parametrize("name", MEDIA)
def test_media_logits_and_routing_equal_hf(pair, name):
    """fp32 logits (1e-5) and router choices on every media geometry, DeepStack included."""
    hf, ours = pair
    inputs, av = model_inputs(name)
    got, handles = router_hooks(hf)
    with torch.no_grad():
        ref = hf(**inputs, use_audio_in_video=av).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        logits, cache = ours.run_with_cache(**inputs, use_audio_in_video=av,
                                            names_filter=lambda n: n.endswith("hook_router_choice"))
    real = inputs["attention_mask"].bool()
    diff = (logits[real] - ref[real]).abs().max()
    assert diff <= TOL, diff
    b, s = inputs["input_ids"].shape
    for l in (0, 2):
        assert torch.equal(cache[f"blocks.{l}.mlp.hook_router_choice"][real], got[l][2].view(b, s, -1)[real])


def test_deepstack_injections_are_carried_by_encode(pair):
    hf, ours = pair
    inputs, _ = model_inputs("left_padded")
    enc = ours.encode(**inputs)
    k = len(hf.config.vision_config.deepstack_visual_indexes)
    assert len(enc["injections"]) == k
    visual = (inputs["input_ids"] == ours.ids.image) | (inputs["input_ids"] == ours.ids.video)
    assert all(bool(t[visual].abs().sum(-1).gt(0).all()) and not bool(t[~visual].any()) for t in enc["injections"])
    with torch.no_grad():
        full = ours(**enc)
        dropped = ours(**{**enc, "injections": None})
    assert torch.equal(full, ours(**inputs)) and (full - dropped).abs().max() > 1e-3


def test_positions_and_encode_outputs(pair):
    hf, ours = pair
    inputs = text_inputs(True)
    enc = ours.encode(**inputs)
    ref_pos, ref_delta = hf.model.get_rope_index(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.equal(enc["position_ids"], ref_pos) and torch.equal(enc["rope_deltas"], ref_delta)
    assert enc["injections"] is None  # no images or videos: nothing for DeepStack to add
    with torch.no_grad():
        assert torch.equal(ours(**enc), ours(**inputs))


def test_greedy_generation_equals_hf(pair):
    hf, ours = pair
    inputs = text_inputs(True)
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(ours.generate(**inputs, max_new_tokens=5), ref)


@pytest.mark.parametrize("name", ["image", "left_padded"])
def test_greedy_generation_with_media_equals_hf(pair, name):
    """DeepStack's injections on the prefill: greedy tokens equal HF's `generate` (image; video + audio +
    image in a left-padded batch), and differ from a run without the injections (they are used)."""
    hf, ours = pair
    inputs, av = model_inputs(name)
    with torch.no_grad():
        ref = hf.generate(**inputs, use_audio_in_video=av, max_new_tokens=6, do_sample=False,
                          pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
    got = ours.generate(**inputs, use_audio_in_video=av, max_new_tokens=6)
    assert torch.equal(got, ref), (got, ref)
    enc = ours.encode(**inputs)
    assert torch.equal(ours.generate(**enc, max_new_tokens=6), ref)
    with torch.no_grad():
        first = ours(**enc)[:, -1]
        without = ours(**{**enc, "injections": None})[:, -1]
    assert (first - without).abs().max() > 1e-3  # the prefill's injections change the first step


def test_expert_ablation_equals_hf_with_the_expert_zeroed(saved):
    hf, folder = saved
    ours = HookedQwen3Omni.from_pretrained(folder)
    inputs = text_inputs(False)
    with torch.no_grad():
        choice = ours.run_with_cache(**inputs, names_filter="blocks.2.mlp.hook_router_choice")[1]["blocks.2.mlp.hook_router_choice"]
        e = int(choice.flatten().mode().values)
        ablated = tiny_hf()
        ablated.model.language_model.layers[2].mlp.experts.down_proj[e].zero_()
        ref = ablated(**inputs).logits
        got = ours.run_with_hooks(**inputs, fwd_hooks=[(f"blocks.2.mlp.experts.{e}.hook_out", lambda t, hook: torch.zeros_like(t))])
    assert (got - ref).abs().max() <= TOL
    assert (got - ours(**inputs)).abs().max() > 1e-3  # the expert mattered


def test_both_checkpoint_layouts_and_from_hf_load_the_same_weights(saved, tmp_path):
    """The saved Thinker (`model.*`, per-expert tensors), the released layout (`thinker.*` in the whole
    Qwen3-Omni model, with Talker keys and a nested config) and an in-memory HF model (experts fused)."""
    from safetensors.torch import load_file, save_file
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    hf, folder = saved
    on_disk = load_file(folder / "model.safetensors")
    assert any(".mlp.experts.3.gate_proj.weight" in k for k in on_disk)  # per-expert on disk
    released = {f"thinker.{k}": v for k, v in on_disk.items()} | {"talker.model.norm.weight": torch.ones(4)}
    save_file(released, tmp_path / "model.safetensors")
    full = Qwen3OmniMoeConfig(thinker_config=json.loads(hf.config.to_json_string()))
    (tmp_path / "config.json").write_text(full.to_json_string())
    a = HookedQwen3Omni.from_pretrained(folder).state_dict()
    b = HookedQwen3Omni.from_pretrained(tmp_path).state_dict()
    c = HookedQwen3Omni.from_hf(hf).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    fused = hf.model.language_model.layers[0].mlp.experts
    assert torch.equal(a["blocks.0.mlp.experts.gate_up_proj"], fused.gate_up_proj.detach())
    del released["thinker.model.layers.2.mlp.experts.1.up_proj.weight"]  # one expert short
    save_file(released, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing, e.g. \['blocks.2.mlp.experts.gate_up_proj'\]"):
        HookedQwen3Omni.from_pretrained(tmp_path)


def test_bf16_within_hfs_own_bf16_gap(saved):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    hf32, folder = saved
    hf16 = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours16 = HookedQwen3Omni.from_pretrained(folder, dtype=torch.bfloat16)
    inputs = text_inputs(False)
    with torch.no_grad():
        ref = hf32(**inputs).logits
        hf_gap = (hf16(**inputs).logits.float() - ref).abs().max()
        our_gap = (ours16(**inputs).float() - ref).abs().max()
    assert ours16.dtype == torch.bfloat16 and hf_gap > 0
    assert our_gap <= 1.5 * hf_gap, (our_gap, hf_gap)


def test_meta_parameter_count_of_the_released_thinker_equals_hf():
    """The released 30B-A3B Thinker sizes (docs/models.md section 4: 48 layers, 32 q / 4 kv heads, head_dim
    128, 128 experts with 8 active, expert width 768, hidden 2048, vocabulary 152064), on the meta device:
    the towers, the language model and the unembedding."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    tc = Qwen3OmniMoeThinkerConfig(
        text_config=dict(vocab_size=152064, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                         moe_intermediate_size=768, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                     "mrope_section": [24, 20, 20]}),
        audio_config=dict(output_dim=2048), vision_config=dict(out_hidden_size=2048), user_token_id=USER,
        position_id_per_seconds=13)
    tc.vision_start_token_id = 151652
    with torch.device("meta"):
        hf = Qwen3OmniMoeThinkerForConditionalGeneration(tc)
    ours = HookedQwen3Omni.from_config(tc, device="meta")
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    expected = count(hf.parameters())
    assert count(ours.parameters()) == expected
    lm = count(hf.model.language_model.parameters()) + count(hf.lm_head.parameters())
    assert lm > 30e9 - 1e9  # the 30B of 30B-A3B is the decoder's
    print(f"released Thinker sizes: {count(ours.parameters()):,} parameters (HF: {expected:,})")


def test_expert_hook_points_are_built_when_asked_for(saved, monkeypatch):
    """The experts' hook points exist by name before they are built, are built on first lookup, and hook
    and cache exactly as the eagerly built ones (a filter function reaches them through `items()`)."""
    import contextlib

    import hooked_av.families.qwen3_omni.model as family

    hf, _ = saved
    lazy = HookedQwen3Omni.from_hf(hf)
    monkeypatch.setattr(family, "experts_without_hooks", contextlib.nullcontext)
    eager = HookedQwen3Omni.from_hf(hf)
    n_expert_points = 2 * 4 * 2  # hook_in / hook_out x 4 experts x 2 sparse layers
    assert set(lazy.hook_dict) == set(eager.hook_dict) and len(lazy.hook_dict) == len(eager.hook_dict)
    assert dict.__len__(lazy.hook_dict) == len(eager.hook_dict) - n_expert_points  # none built yet
    assert "blocks.2.mlp.experts.3.hook_out" in lazy.hook_dict and "blocks.2.mlp.experts.4.hook_out" not in lazy.hook_dict
    assert "blocks.1.mlp.experts.0.hook_out" not in lazy.hook_dict  # layer 1 is dense
    inputs = text_inputs(True)
    wanted = lambda n: n.endswith(("experts.1.hook_in", "experts.2.hook_out"))  # noqa: E731
    with torch.no_grad():
        a, ca = lazy.run_with_cache(**inputs, names_filter=wanted)
        b, cb = eager.run_with_cache(**inputs, names_filter=wanted)
    assert torch.equal(a, b) and sorted(ca.keys()) == sorted(cb.keys()) and len(ca.keys()) >= 2
    assert all(torch.equal(ca[k], cb[k]) for k in ca.keys())
    built = dict.__len__(lazy.hook_dict) - (len(eager.hook_dict) - n_expert_points)
    assert built == 8  # both points of experts 1 and 2 in both sparse layers, and no others
    assert all(not hp.has_hooks() for hp in lazy.hook_dict.values())  # removed after the run
    with pytest.raises(KeyError, match="does not exist"):
        lazy.run_with_hooks(**inputs, fwd_hooks=[("blocks.2.mlp.experts.4.hook_out", lambda t, hook: t)])
