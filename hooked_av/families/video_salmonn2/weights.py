"""video-SALMONN 2+: configuration parsing and checkpoint key conversion.

config.json is a Qwen2.5-VL config (`model_type: qwen2_5_vl`, text fields flat or under `text_config`)
plus `audio_config` (SALMONN's WhisperConfig, with `qformer_config` nested in it) and `audio_token_id`.

Accepted key layouts (the repository's, and the newer HF naming of the LLM and the vision tower):
  model.*  | model.language_model.*      -> the decoder (`embed`, `blocks`, `ln_final`)
  visual.* | model.visual.*              -> vision_encoder (a fused `qkv` is split into q, k, v)
  lm_head.weight                         -> unembed (absent when tied, as on 3B)
  audio.{conv1,conv2,embed_positions,layer_norm,layers.N}.*              -> audio_encoder
  audio.q_tokens, audio.audio_proj.*, audio.qformer.bert.{embeddings.LayerNorm,encoder.layer.N}.* -> audio_qformer
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from hooked_av.core.config import HookedAVConfig
from hooked_av.encoders.qwen_vision import vision_tower_settings
from hooked_av.encoders.whisper import WHISPER_LAYER_KEYS
from hooked_av.core.checkpoint import apply_key_table
from hooked_av.families.qwen2_5_omni.weights import TEXT_KEYS, convert_vision_key

WHISPER_KEYS = [
    (r"(conv1|conv2|layer_norm)\.(weight|bias)", r"\1.\2"),
    (r"embed_positions\.weight", "embed_positions.weight"),
    *WHISPER_LAYER_KEYS,
]
QFORMER_KEYS = [  # after `audio.`
    (r"q_tokens", "q_tokens"),
    (r"audio_proj\.(weight|bias)", r"audio_proj.\1"),
    (r"qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"ln_query.\1"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.dense.\2"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.ln1.\2"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.(weight|bias)", r"blocks.\1.cross_attn.dense.\2"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.ln_cross.\2"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.output_query\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"qformer\.bert\.encoder\.layer\.(\d+)\.output_query\.LayerNorm\.(weight|bias)", r"blocks.\1.ln2.\2"),
]
# BertEmbeddings' persistent `position_ids` buffer (unused: the queries have no positions)
IGNORED = re.compile(r"^audio\.qformer\.bert\.embeddings\.position_ids$")

# SALMONN's BertConfig / WhisperConfig defaults, used only for fields a config.json leaves out
QFORMER_DEFAULTS = dict(
    num_hidden_layers=2, num_attention_heads=12, hidden_size=3072, intermediate_size=12288, hidden_act="gelu",
    layer_norm_eps=1e-12, cross_attention_freq=1, query_length=1,
)
WHISPER_DEFAULTS = dict(
    num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
    activation_function="gelu", max_source_positions=1500, second_per_window=0.5, second_stride=0.5,
)


def convert_key(key: str, t: Tensor) -> list[tuple[str, Tensor]] | None:
    """Checkpoint key -> our parameter names; None for keys skipped on purpose; an unknown key comes
    back unchanged so the loader reports it as unexpected."""
    if IGNORED.match(key):
        return None
    if key == "lm_head.weight":
        return [("unembed.weight", t)]
    mapped = None
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            mapped = convert_vision_key(key[len(prefix):], t)
            return [("vision_encoder." + n, x) for n, x in mapped] if mapped else [(key, t)]
    if key.startswith("audio."):
        rest = key[len("audio."):]
        mapped = apply_key_table(WHISPER_KEYS, rest, t)
        if mapped:
            return [("audio_encoder." + n, x) for n, x in mapped]
        mapped = apply_key_table(QFORMER_KEYS, rest, t)
        return [("audio_qformer." + n, x) for n, x in mapped] if mapped else [(key, t)]
    for prefix in ("model.language_model.", "model."):
        if key.startswith(prefix):
            mapped = apply_key_table(TEXT_KEYS, key[len(prefix):], t)
            if mapped:
                return mapped
    return [(key, t)]


def _as_dict(config) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a config dict or a transformers config, got {type(config).__name__}")


def split_config(config) -> tuple[Any, dict, dict, dict]:
    """(Qwen2.5-VL config, audio (Whisper) fields, Q-Former fields, token ids) from config.json's dict
    or a config object. Raises when the audio part is missing."""
    from transformers import Qwen2_5_VLConfig

    d = _as_dict(config)
    audio = d.pop("audio_config", None)
    audio = _as_dict(audio) if audio is not None else None
    if not audio or not audio.get("qformer_config"):
        raise ValueError(
            "this config has no audio_config.qformer_config, so it is not a video-SALMONN 2+ config (a plain "
            "Qwen2.5-VL one?); use a video-SALMONN 2+ checkpoint's config.json, whose audio_config (Whisper) "
            "holds qformer_config (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, ...)"
        )
    qformer = {**QFORMER_DEFAULTS, **_as_dict(audio.pop("qformer_config"))}
    audio = {**WHISPER_DEFAULTS, **audio}
    if "audio_token_id" not in d:
        raise ValueError("config has no audio_token_id (the id of <|audio_pad|>); add it to config.json")
    ids = {k: d[k] for k in ("audio_token_id",)}
    d.pop("architectures", None)
    vl = Qwen2_5_VLConfig(**{k: v for k, v in d.items() if k not in ("audio_token_id", "model_type")})
    ids.update(
        image_token_id=vl.image_token_id, video_token_id=vl.video_token_id,
        vision_start_token_id=vl.vision_start_token_id, vision_end_token_id=vl.vision_end_token_id,
    )
    return vl, audio, qformer, ids


def lm_config(vl, audio: dict, qformer: dict) -> HookedAVConfig:
    text, v = vl.text_config, vl.vision_config
    if getattr(text, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention is not implemented; the released configs do not use it")
    frames_per_second = audio["max_source_positions"] / 30.0  # Whisper frames in a 30 s chunk
    return HookedAVConfig.from_qwen2_text(
        text, "video_salmonn2", "video_SALMONN2_plus", bool(vl.tie_word_embeddings),
        towers={
            "audio_encoder": dict(
                num_mel_bins=audio["num_mel_bins"], d_model=audio["d_model"], n_layers=audio["encoder_layers"],
                n_heads=audio["encoder_attention_heads"], d_mlp=audio["encoder_ffn_dim"],
                act_fn=audio["activation_function"], max_source_positions=audio["max_source_positions"],
            ),
            "audio_qformer": dict(
                d_model=qformer["hidden_size"], d_context=qformer.get("encoder_width", audio["d_model"]),
                n_layers=qformer["num_hidden_layers"], n_heads=qformer["num_attention_heads"],
                d_mlp=qformer["intermediate_size"], out_dim=text.hidden_size,
                window=round(frames_per_second * audio["second_per_window"]),
                stride=round(frames_per_second * audio["second_stride"]),
                n_query=qformer["query_length"], cross_attention_freq=qformer["cross_attention_freq"],
                act_fn=qformer["hidden_act"], eps=qformer["layer_norm_eps"],
            ),
            "vision_encoder": vision_tower_settings(v),
        },
    )
