"""Qwen2.5-Omni Thinker: configuration parsing and checkpoint key conversion.

Accepted layouts (any of them, with or without the released checkpoints' `thinker.` prefix):
  HF 5.x in memory / on disk        model.language_model.* | model.audio_tower.* | model.visual.* | lm_head.*
  released (4.x) `thinker.*`         thinker.model.*        | thinker.audio_tower.* | thinker.visual.* | thinker.lm_head.*
Keys of the speech parts (`talker.*`, `token2wav.*`) are skipped.
"""

from __future__ import annotations

import re

from torch import Tensor

from hooked_av.core.config import HookedAVConfig
from hooked_av.encoders.qwen_vision import vision_tower_settings
from hooked_av.encoders.whisper import WHISPER_LAYER_KEYS
from hooked_av.core.checkpoint import apply_key_table

# (checkpoint name after the layout prefix) -> our name; applied in order, first match wins
TEXT_KEYS = [
    (r"embed_tokens\.weight", "embed.weight"),
    (r"norm\.weight", "ln_final.weight"),
    (r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.ln1.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ln2.weight"),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"blocks.\1.mlp.\2.weight"),
]
AUDIO_KEYS = [
    (r"(conv1|conv2|ln_post|proj)\.(weight|bias)", r"\1.\2"),
    (r"audio_bos_eos_token\.weight", "audio_bos_eos_token.weight"),
    *WHISPER_LAYER_KEYS,
]
VISION_KEYS = [
    (r"patch_embed\.proj\.weight", "patch_embed.proj.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"blocks.\1.ln1.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"blocks.\1.ln2.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k|v|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"merger\.ln_q\.weight", "merger.ln_q.weight"),
    (r"merger\.mlp\.(0|2)\.(weight|bias)", r"merger.mlp.\1.\2"),
]
FUSED_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")

PREFIXES = [  # checkpoint prefix -> (table, our prefix)
    ("model.language_model.", TEXT_KEYS, ""),
    ("model.audio_tower.", AUDIO_KEYS, "audio_encoder."),
    ("audio_tower.", AUDIO_KEYS, "audio_encoder."),
    ("model.visual.", VISION_KEYS, "vision_encoder."),
    ("visual.", VISION_KEYS, "vision_encoder."),
    ("model.", TEXT_KEYS, ""),  # the released layout's text decoder (after `thinker.`)
]
IGNORED = re.compile(r"^(talker|token2wav)\.")


def convert_vision_key(rest: str, t: Tensor) -> list[tuple[str, Tensor]] | None:
    """Map one vision-tower key (without its prefix); a fused `qkv` is split into q, k, v."""
    m = FUSED_QKV.fullmatch(rest)
    if m:
        q, k, v = t.chunk(3, dim=0)
        return [(f"blocks.{m.group(1)}.attn.{n}.{m.group(2)}", x) for n, x in zip("qkv", (q, k, v))]
    return apply_key_table(VISION_KEYS, rest, t)


def convert_key(key: str, t: Tensor) -> list[tuple[str, Tensor]] | None:
    """Checkpoint key -> our parameter names. Returns None for keys skipped on purpose; an unknown
    key comes back unchanged so the loader reports it as unexpected."""
    if IGNORED.match(key):
        return None
    k = key[len("thinker.") :] if key.startswith("thinker.") else key
    if k == "lm_head.weight":
        return [("unembed.weight", t)]
    for prefix, table, ours in PREFIXES:
        if k.startswith(prefix):
            rest = k[len(prefix) :]
            mapped = convert_vision_key(rest, t) if table is VISION_KEYS else apply_key_table(table, rest, t)
            if mapped is not None:
                return [(ours + name, x) for name, x in mapped]
    return [(key, t)]


def thinker_config(config):
    """The Thinker's HF config from a nested `Qwen2_5OmniConfig`, a bare Thinker config, or a dict."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig

    if isinstance(config, dict):
        kind = config.get("model_type")
        if kind == "qwen2_5_omni":
            config = Qwen2_5OmniConfig(**config)
        elif kind in ("qwen2_5_omni_thinker", None):
            config = Qwen2_5OmniThinkerConfig(**config)
        else:
            raise ValueError(f"model_type {kind!r} is not Qwen2.5-Omni; use the model class for {kind}")
    kind = getattr(config, "model_type", None)
    if kind == "qwen2_5_omni":
        return config.thinker_config
    if kind == "qwen2_5_omni_thinker":
        return config
    raise ValueError(f"model_type {kind!r} is not a Qwen2.5-Omni (Thinker) configuration")


def lm_config(tc, name: str = "qwen2_5_omni") -> HookedAVConfig:
    text = tc.text_config
    if getattr(text, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention is not implemented; the released Omni configs do not use it")
    a, v = tc.audio_config, tc.vision_config
    # HF ties the unembedding on the Thinker's own tie_word_embeddings, not the text config's
    return HookedAVConfig.from_qwen2_text(
        text, name, "Qwen2_5OmniThinkerForConditionalGeneration", bool(getattr(tc, "tie_word_embeddings", False)),
        towers={
            "audio_encoder": dict(
                d_model=a.d_model, n_layers=a.encoder_layers, n_heads=a.encoder_attention_heads,
                d_mlp=a.encoder_ffn_dim, num_mel_bins=a.num_mel_bins, n_window=a.n_window,
                output_dim=a.output_dim, act_fn=a.activation_function,
            ),
            "vision_encoder": vision_tower_settings(v),
        },
    )
