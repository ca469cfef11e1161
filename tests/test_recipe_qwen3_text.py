"""The Qwen3 block recipe (QK-norm, mixture of experts, interleaved M-RoPE, DeepStack injection) against
HF's Qwen3-Omni Thinker text model (`Qwen3OmniMoeThinkerTextModel`) built from a tiny random config:
logits, residuals, router choices and DeepStack injection in fp32, left padding included.

`QWEN3_TEXT_KEYS` is the Qwen3-Omni family's text key table (`families/qwen3_omni/weights.TEXT_KEYS`).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from hooked_av import HookedAVModel
from hooked_av.core.config import BlockRecipe, HookedAVConfig
from hooked_av.core.language_model import MRoPELanguageModel, scatter_injections
from hooked_av.core.rope import mrope_cos_sin

from hooked_av.families.qwen3_omni.weights import TEXT_KEYS

torch.set_num_threads(1)
TOL = 1e-5

# HF text-model key (after `model.language_model.` / `thinker.model.`) -> ours: the family's own table
QWEN3_TEXT_KEYS = TEXT_KEYS


def ours_key(key: str) -> str:
    for pattern, repl in QWEN3_TEXT_KEYS:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    raise KeyError(f"no mapping for HF key {key!r}")


class TextLM(MRoPELanguageModel, HookedAVModel):
    """The bare language model of a family, built from a config (what a family's model wraps)."""

    def __init__(self, cfg: HookedAVConfig):
        super().__init__()
        self.cfg = cfg
        self.build_language_model(cfg)
        self.setup()

    def forward(self, inputs_embeds, position_ids, attention_mask=None, **kw):
        return self.run_language_model(inputs_embeds, position_ids, attention_mask, **kw)


def tiny_text_config(**over):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, num_experts=6, num_experts_per_tok=2,
              moe_intermediate_size=16, mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                               "mrope_interleaved": True})
    kw.update(over)
    return Qwen3OmniMoeTextConfig(**kw)


def pair(seed: int = 0, **over):
    """(HF text model, our TextLM with its weights, lm_head weight) in fp32."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextModel

    torch.manual_seed(seed)
    text = tiny_text_config(**over)
    text._attn_implementation = "sdpa"
    hf = Qwen3OmniMoeThinkerTextModel(text).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # decisive routing and non-trivial norms
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    cfg = HookedAVConfig.from_qwen2_text(text, "tiny-qwen3", "Qwen3OmniMoeThinkerForConditionalGeneration", False,
                                         {}, recipe=BlockRecipe.qwen3_moe(text))
    ours = TextLM(cfg).eval()
    state = {ours_key(k): v for k, v in hf.state_dict().items()}
    state["unembed.weight"] = 0.3 * torch.randn(cfg.d_vocab, cfg.d_model)
    ours.load_state_dict(state, strict=True)
    return hf, ours, state["unembed.weight"]


def mm_positions(b: int, s: int) -> torch.Tensor:
    """`[3, b, s]` position ids whose three rows differ (as on media), so the rotary variant matters."""
    t = torch.arange(s).expand(b, -1)
    return torch.stack([t, t // 2 + 1, (t * 7) % 5]).contiguous()


def router_choices(hf):
    """Forward hooks on HF's routers collecting (logits, indices) per sparse layer."""
    got, handles = {}, []
    for i, layer in enumerate(hf.layers):
        if hasattr(layer.mlp, "gate"):
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out)))
    return got, handles


def test_recipe_builds_what_hf_decides():
    _, ours, _ = pair()
    assert [type(b.mlp).__name__ for b in ours.blocks] == ["SparseMoE", "GatedMLP", "SparseMoE"]
    assert ours.cfg.num_experts == 6 and ours.cfg.experts_per_token == 2
    for name in ("blocks.0.attn.q_norm.hook_normalized", "blocks.0.attn.k_norm.hook_scale",
                 "blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_router_weights",
                 "blocks.0.mlp.hook_router_choice", "blocks.2.mlp.experts.5.hook_out", "blocks.1.hook_injection"):
        assert name in ours.hook_dict, name
    assert "blocks.1.mlp.hook_router_logits" not in ours.hook_dict


def test_interleaved_rows_follow_hf_recomposition():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding

    text = tiny_text_config(head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                           "mrope_section": [6, 3, 3], "mrope_interleaved": True})
    pos = mm_positions(2, 9)
    cos_hf, sin_hf = Qwen3OmniMoeThinkerTextRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = mrope_cos_sin(pos, 24, 1e4, (6, 3, 3), torch.float32, interleaved=True)
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)
    sectioned = mrope_cos_sin(pos, 24, 1e4, (6, 3, 3), torch.float32)[0]
    assert not torch.allclose(sectioned, cos_hf)  # the variants differ on media positions


def test_text_logits_residuals_and_routing_equal_hf():
    hf, ours, w_u = pair()
    ids = torch.randint(0, 97, (2, 11))
    pos = mm_positions(2, 11)
    got, handles = router_choices(hf)
    with torch.no_grad():
        out = hf(inputs_embeds=hf.embed_tokens(ids), position_ids=pos, output_hidden_states=True)
    for h in handles:
        h.remove()
    names = [f"blocks.{l}.hook_resid_post" for l in range(3)] + [f"blocks.{l}.mlp.hook_router_{k}" for l in (0, 2)
                                                                 for k in ("logits", "choice", "weights")]
    logits, cache = ours.run_with_cache(ours.embed(ids), pos, names_filter=lambda n: n in names)
    torch.testing.assert_close(logits, F.linear(out.last_hidden_state, w_u), atol=TOL, rtol=0)
    for l in range(2):  # HF records each decoder layer's output
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_post"], out.hidden_states[l + 1], atol=TOL, rtol=0)
    for l in (0, 2):
        hf_logits, hf_weights, hf_choice = got[l]
        torch.testing.assert_close(cache[f"blocks.{l}.mlp.hook_router_logits"], hf_logits.view(2, 11, -1), atol=TOL, rtol=0)
        assert torch.equal(cache[f"blocks.{l}.mlp.hook_router_choice"], hf_choice.view(2, 11, -1))
        torch.testing.assert_close(cache[f"blocks.{l}.mlp.hook_router_weights"], hf_weights.view(2, 11, -1), atol=TOL, rtol=0)


def test_left_padded_batch_equals_hf():
    hf, ours, w_u = pair(1)
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    pos = ours.text_positions(torch.zeros(2, 10, 1), mask).contiguous()
    with torch.no_grad():
        ref = F.linear(hf(inputs_embeds=hf.embed_tokens(ids), attention_mask=mask, position_ids=pos).last_hidden_state, w_u)
        got = ours.run_language_model(ours.embed(ids), pos, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=TOL, rtol=0)


def test_deepstack_injection_equals_hf():
    hf, ours, w_u = pair(2)
    b, s, d = 2, 12, 32
    ids = torch.randint(0, 97, (b, s))
    visual = torch.zeros(b, s, dtype=torch.bool)
    visual[0, 3:7] = True
    visual[1, 5:8] = True
    feats = [torch.randn(int(visual.sum()), d) for _ in range(2)]  # layers 0 and 1
    pos = mm_positions(b, s)
    with torch.no_grad():
        embeds = hf.embed_tokens(ids)
        ref = F.linear(hf(inputs_embeds=embeds, position_ids=pos, visual_pos_masks=visual,
                          deepstack_visual_embeds=feats).last_hidden_state, w_u)
        plain = ours.run_language_model(embeds, pos)
        seen = {}
        with ours.hooks(fwd_hooks=[("blocks.1.hook_injection", lambda t, hook: seen.__setitem__("t", t.clone()))]):
            got = ours.run_language_model(embeds, pos, injections=scatter_injections(visual, feats, embeds))
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert not torch.allclose(plain, ref, atol=1e-3)  # the injection matters
    assert torch.equal(seen["t"][visual], feats[1]) and not bool(seen["t"][~visual].any())


def test_expert_ablation_equals_hf_with_the_expert_zeroed():
    hf, ours, w_u = pair(3)
    ids = torch.randint(0, 97, (1, 9))
    pos = mm_positions(1, 9)
    with torch.no_grad():
        choice = ours.run_with_cache(ours.embed(ids), pos, names_filter="blocks.2.mlp.hook_router_choice")[1][
            "blocks.2.mlp.hook_router_choice"]
        e = int(choice.flatten().mode().values)  # an expert that some tokens use
        hf.layers[2].mlp.experts.down_proj[e].zero_()
        ref = F.linear(hf(inputs_embeds=hf.embed_tokens(ids), position_ids=pos).last_hidden_state, w_u)
        fired = []

        def zero(t, hook):
            fired.append(t.shape[0])
            return torch.zeros_like(t)

        got = ours.run_with_hooks(ours.embed(ids), pos, fwd_hooks=[(f"blocks.2.mlp.experts.{e}.hook_out", zero)])
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert fired == [int((choice == e).sum())]  # the routed tokens only


def test_injection_refused_where_the_recipe_has_none():
    hf, ours, _ = pair()
    cfg = HookedAVConfig.from_qwen2_text(tiny_text_config(), "dense", "", False, {})
    dense = TextLM(cfg)
    x = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="injection=False"):
        dense.run_language_model(x, mm_positions(1, 4), injections={0: x})
    with pytest.raises(ValueError, match=r"\[batch, pos, d_model\]"):
        ours.run_language_model(x, mm_positions(1, 4), injections={0: x[:, :2]})
    with pytest.raises(ValueError, match="3 blocks"):
        ours.run_language_model(x, mm_positions(1, 4), injections={5: x})
