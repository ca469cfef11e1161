"""`HookedQwen3Omni`: the Qwen3-Omni Thinker (audio encoder + Qwen3-VL vision tower with DeepStack + Qwen3 MoE
decoder) with a hook point on every residual stream, attention pattern, router and expert. What is
Qwen3-Omni's alone is here (its towers, DeepStack, the experts' lazy hooks, its checkpoint layouts); loading,
`encode`'s merge (DeepStack's features become `injections`), `forward` and `generate` are the template's
(`families/base.py`).

    model = HookedQwen3Omni.from_pretrained("Qwen/Qwen3-Omni-30B-A3B-Instruct", dtype=torch.bfloat16, device="cuda")
    logits = model(**processor_outputs)                                   # [batch, pos, vocab]
    enc = model.encode(**processor_outputs)                               # towers once (DeepStack in enc) ...
    logits = model(**enc)                                                 # ... and sweep from here

Anchor: transformers 5.24 `qwen3_omni_moe` (`Qwen3OmniMoeThinkerForConditionalGeneration`). The towers are
`hooked_av.encoders.qwen3_omni_audio` and `hooked_av.encoders.qwen3_vl_vision`, each with its key table.
"""

from __future__ import annotations

from hooked_av.core.moe import experts_without_hooks, lazy_expert_hooks
from hooked_av.families.base import HookedAVFamily
from hooked_av.families.qwen3_omni.layout import audio_token_counts, token_ids
from hooked_av.families.qwen3_omni.positions import qwen3_omni_position_ids
from hooked_av.families.qwen3_omni.weights import Converter, lm_config, thinker_config


def build_towers(tc) -> dict:
    """`{"audio": (module, key_map), "vision": (module, key_map)}`: Qwen3-Omni's audio encoder and the
    Qwen3-VL vision tower with their checkpoint key maps."""
    from hooked_av.encoders import qwen3_omni_audio as audio
    from hooked_av.encoders import qwen3_vl_vision as vision

    return {
        "audio": (audio.Qwen3OmniAudioEncoder(**audio.audio_settings(tc.audio_config)), audio.convert_audio_key),
        "vision": (vision.Qwen3VisionEncoder(**vision.vision_settings(tc.vision_config)), vision.convert_vision_key),
    }


class HookedQwen3Omni(HookedAVFamily):
    """Hook names: `hook_audio_embeds` / `hook_image_embeds` / `hook_video_embeds` (tower outputs
    `[n_tokens, d_model]`), `hook_embed` (merged embeddings `[batch, pos, d_model]`), `blocks.{l}.*`
    (with `attn.q_norm.*` / `attn.k_norm.*`, `mlp.hook_router_logits` / `hook_router_weights` /
    `hook_router_choice` and `mlp.experts.{e}.hook_in` / `hook_out` on sparse layers (built when first
    named, `core/moe.py`), and
    `hook_injection`, DeepStack's addition after blocks 0..k-1), `ln_final.*`, `audio_encoder.*`,
    `vision_encoder.*` (see docs/architecture.md).

    Checkpoints: the released layout (`thinker.*` inside the whole Qwen3-Omni model, with the Talker's
    keys) or a saved Thinker (`model.*`), see `weights.py`."""

    placeholder_names = {"audio": "audio", "image": "image", "video": "video"}
    config_expects = "a Qwen3-Omni config has 'qwen3_omni_moe' (a bare Thinker: 'qwen3_omni_moe_thinker')"

    def build(self, config) -> None:
        tc = thinker_config(config)
        self.hf_config = tc
        self.cfg = lm_config(tc)
        self.ids = token_ids(tc)
        self.position_id_per_seconds = tc.position_id_per_seconds
        self.n_window = tc.audio_config.n_window
        self.merge = tc.vision_config.spatial_merge_size
        towers = build_towers(tc)
        self._key_maps = {k: v[1] for k, v in towers.items()}
        self.audio_encoder, self.vision_encoder = towers["audio"][0], towers["vision"][0]

    def build_language_model(self, c) -> None:
        with experts_without_hooks():  # 48 x 128 experts' hook points are built when asked for (core/moe.py)
            super().build_language_model(c)

    def setup(self) -> None:
        super().setup()
        lazy_expert_hooks(self)  # hook_dict knows every expert's points; each is built on first lookup

    def key_converter(self) -> Converter:
        """The checkpoint key converter for this model (experts fused, the towers' key tables)."""
        return Converter(self.cfg.recipe.moe.n_experts if self.cfg.recipe.moe else 0, self._key_maps)

    @property
    def media_constants(self):
        """`hooked_av.inputs.media.MediaConstants` of this model's processor (Qwen3-VL's mean = std = 0.5
        unless the checkpoint's preprocessor config says otherwise; the silent log-mel level)."""
        from hooked_av.families.qwen3_omni.processor import model_media_constants

        return model_media_constants(self, self.checkpoint_folder)

    # ---- inputs -----------------------------------------------------------------------------
    def audio_frames(self, input_features, feature_attention_mask, audio_feature_lengths):
        """(mel features `[n_mels, total_frames]`, frames per clip `[n_audio]`), as HF's `get_audio_features`."""
        if feature_attention_mask is None:
            raise ValueError("audio inputs need feature_attention_mask (valid mel frames per clip), as the "
                             "processor returns it; HF's Thinker cannot place audio without it either")
        lens = feature_attention_mask.sum(1)
        feats = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        return feats, lens

    def audio_placeholders(self, audio):
        return (sum(audio_token_counts(audio[1], self.n_window)),
                "the audio encoder's audio_token_count of each clip's mel frames")

    def get_visual_features(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """`(image, video)`, each `(tokens [n, d_model], DeepStack [k, n, d_model])` or None: the Qwen3-VL
        tower's merger output and its DeepStack mergers' (`encode` makes them `injections`)."""
        return self.vision_encoder.images_and_videos(
            self._in_dtype(pixel_values), image_grid_thw, self._in_dtype(pixel_values_videos), video_grid_thw)

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                     audio_feature_lengths=None, video_second_per_grid=None, use_audio_in_video=None):
        """Position ids fp32 `[3, batch, pos]` and rope deltas `[batch, 1]`, equal to HF's `get_rope_index`
        (`positions.py`); `audio_feature_lengths`: valid mel frames per clip."""
        counts = None if audio_feature_lengths is None else audio_token_counts(audio_feature_lengths, self.n_window)
        return qwen3_omni_position_ids(
            input_ids, attention_mask, self.ids, image_grid_thw, video_grid_thw, counts, video_second_per_grid,
            use_audio_in_video, self.merge, self.position_id_per_seconds)

    # ---- inputs from media and the TokenMap ---------------------------------------------------
    def prepare(self, prompts, *, use_audio_in_video: bool | None = None, parts=None, tokenizer=None,
                **prompt_kwargs) -> dict:
        """Model inputs from media and a question (or a list of `hooked_av.inputs.Prompt`), equal to
        `Qwen3OmniMoeProcessor`'s: see `hooked_av.families.qwen3_omni.prompt.prepare_qwen3_omni`.
        `model(**inputs)` runs them; `parts` (`processor.parts_for_model`) are kept as `processor_parts`."""
        from hooked_av.families.qwen3_omni.layout import token_ids as read_ids
        from hooked_av.families.qwen3_omni.processor import parts_for_model
        from hooked_av.families.qwen3_omni.prompt import prepare_qwen3_omni

        parts = parts or getattr(self, "processor_parts", None) or parts_for_model(self, tokenizer)
        self.processor_parts = parts
        ids = read_ids(self.hf_config, parts.tokenizer)  # the closing ids may be the tokenizer's alone
        return prepare_qwen3_omni(parts, ids, self.n_window, prompts, use_audio_in_video, **prompt_kwargs)

    def token_map(self, inputs: dict, tokenizer=None, chat=None):
        """The `TokenMap` of processor/`prepare` outputs (group, item, frame, time per position); see
        `token_map.qwen3_omni_token_map`."""
        from hooked_av.families.qwen3_omni.token_map import model_token_map

        return model_token_map(self, inputs, tokenizer, chat)
