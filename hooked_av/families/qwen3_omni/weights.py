"""Qwen3-Omni Thinker: configuration parsing (config -> `HookedAVConfig` with the Qwen3 block recipe) and
checkpoint key conversion.

Accepted layouts (anchor: transformers 5.24 `qwen3_omni_moe` and its `conversion_mapping.py` rule
`qwen2_moe`), each with or without the released checkpoints' `thinker.` prefix:
  on disk (released `Qwen/Qwen3-Omni-30B-A3B-*`, and what 5.x `save_pretrained` writes):
      model.* (text decoder) | audio_tower.* | visual.* | lm_head.*, one tensor per expert:
      model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight
  in memory (a 5.x model's `state_dict()`, what `from_hf` reads):
      model.language_model.* | model.audio_tower.* | model.visual.* | lm_head.*, experts fused:
      mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I]
Keys of the speech parts (`talker.*`, `code2wav.*`) are skipped. Per-expert tensors are gathered and
fused into the core MoE's layout (HF's in-memory one) once all E experts of a layer have arrived.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import Tensor

from hooked_av.core.checkpoint import apply_key_table
from hooked_av.core.config import BlockRecipe, HookedAVConfig

# HF text-model key (after its layout prefix) -> ours; first match wins
TEXT_KEYS = [
    (r"embed_tokens\.weight", "embed.weight"),
    (r"norm\.weight", "ln_final.weight"),
    (r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.ln1.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ln2.weight"),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"blocks.\1.mlp.\2.weight"),
    (r"layers\.(\d+)\.mlp\.gate\.weight", r"blocks.\1.mlp.gate.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", r"blocks.\1.mlp.experts.\2"),
]
EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
TEXT_PREFIXES = ("model.language_model.", "model.")  # in memory; on disk (after `thinker.`)
TOWER_PREFIXES = {  # checkpoint prefixes of each tower, in memory and on disk -> our module
    "audio": (("model.audio_tower.", "audio_tower."), "audio_encoder."),
    "vision": (("model.visual.", "visual."), "vision_encoder."),
}
IGNORED = re.compile(r"^(talker|code2wav)\.")
# HF's fallback when rope_parameters has no mrope_section (`Qwen3OmniMoeThinkerTextRotaryEmbedding`)
QWEN3_MROPE_SECTION = (24, 20, 20)

KeyMap = Callable[[str, Tensor], "list[tuple[str, Tensor]] | None"]


class Converter:
    """Checkpoint key -> our parameter names, for `core.checkpoint.load_converted`. Returns None for keys
    skipped on purpose, [] while a layer's per-expert tensors are still arriving, and an unknown key
    unchanged so the loader reports it as unexpected.

    towers: `{"audio": key_map, "vision": key_map}`, each mapping a key inside its tower (without the
    prefix) to our names inside the tower module (`encoders.*` own these tables)."""

    def __init__(self, n_experts: int, towers: dict[str, KeyMap]):
        self.n_experts = n_experts
        self.towers = towers
        self.pending: dict[tuple[int, str], dict[int, Tensor]] = {}

    def __call__(self, key: str, t: Tensor) -> list[tuple[str, Tensor]] | None:
        if IGNORED.match(key):
            return None
        k = key.removeprefix("thinker.")
        if k == "lm_head.weight":
            return [("unembed.weight", t)]
        for kind, (prefixes, ours) in TOWER_PREFIXES.items():
            for prefix in prefixes:
                if k.startswith(prefix):
                    mapped = self.towers[kind](k[len(prefix):], t)
                    return [(key, t)] if mapped is None else [(ours + n, x) for n, x in mapped]
        for prefix in TEXT_PREFIXES:
            if k.startswith(prefix):
                rest = k[len(prefix):]
                m = EXPERT.fullmatch(rest)
                if m:
                    return self._expert(int(m.group(1)), int(m.group(2)), m.group(3), t)
                mapped = apply_key_table(TEXT_KEYS, rest, t)
                if mapped is not None:
                    return mapped
        return [(key, t)]

    def _expert(self, layer: int, e: int, proj: str, t: Tensor) -> list[tuple[str, Tensor]]:
        """Gather expert `e`'s `proj`; once every expert of the layer has its gate and up (or down), emit
        the fused tensor: gate_up_proj `[E, 2I, H]` = per expert cat(gate, up) on rows, down_proj `[E, H, I]`."""
        if not 0 <= e < self.n_experts:
            return [(f"blocks.{layer}.mlp.experts.{e}.{proj}.weight", t)]  # reported as unexpected
        fused = "down_proj" if proj == "down_proj" else "gate_up_proj"
        got = self.pending.setdefault((layer, proj), {})
        got[e] = t
        parts = ("down_proj",) if fused == "down_proj" else ("gate_proj", "up_proj")
        if any(len(self.pending.get((layer, p), {})) < self.n_experts for p in parts):
            return []
        tensors = [self.pending.pop((layer, p)) for p in parts]
        rows = [torch.cat([d[i] for d in tensors], dim=0) for i in range(self.n_experts)]
        return [(f"blocks.{layer}.mlp.experts.{fused}", torch.stack(rows))]


def thinker_config(config):
    """The Thinker's HF config from a nested `Qwen3OmniMoeConfig`, a bare Thinker config, or a dict."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (Qwen3OmniMoeConfig,
                                                                                  Qwen3OmniMoeThinkerConfig)

    if isinstance(config, dict):
        kind = config.get("model_type")
        if kind == "qwen3_omni_moe":
            config = Qwen3OmniMoeConfig(**config)
        elif kind in ("qwen3_omni_moe_thinker", None):
            config = Qwen3OmniMoeThinkerConfig(**config)
        else:
            raise ValueError(f"model_type {kind!r} is not Qwen3-Omni; use the model class for {kind}")
    kind = getattr(config, "model_type", None)
    if kind == "qwen3_omni_moe":
        return config.thinker_config
    if kind == "qwen3_omni_moe_thinker":
        return config
    raise ValueError(f"model_type {kind!r} is not a Qwen3-Omni (Thinker) configuration "
                     "('qwen3_omni_moe' or 'qwen3_omni_moe_thinker')")


def lm_config(tc, name: str = "qwen3_omni") -> HookedAVConfig:
    """The language model's `HookedAVConfig`: the Qwen3 recipe (`BlockRecipe.qwen3_moe`), `head_dim` from
    the config, the unembedding tied on the Thinker's own `tie_word_embeddings` (as HF ties it), and
    HF's [24, 20, 20] when the config names no `mrope_section`. Options HF would apply and the core
    does not implement are refused."""
    text = tc.text_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope_type {rope['rope_type']!r} is not implemented; Qwen3-Omni's configs use 'default'")
    if getattr(text, "sliding_window", None) is not None:
        raise NotImplementedError("sliding-window attention is not implemented; the released Qwen3-Omni configs do not use it")
    cfg = HookedAVConfig.from_qwen2_text(
        text, name, "Qwen3OmniMoeThinkerForConditionalGeneration", bool(getattr(tc, "tie_word_embeddings", False)),
        towers={"audio_encoder": tc.audio_config.to_dict(), "vision_encoder": tc.vision_config.to_dict()},
        recipe=BlockRecipe.qwen3_moe(text),
    )
    if "mrope_section" not in rope:
        cfg = dataclasses.replace(cfg, mrope_section=QWEN3_MROPE_SECTION)
    return cfg
