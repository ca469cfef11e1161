"""`HookedQwen2_5Omni`: the Qwen2.5-Omni Thinker (audio tower + vision tower + Qwen2 decoder) with a
hook point on every residual stream, attention pattern and intermediate. What is Qwen2.5-Omni's alone is
here; loading, `encode`'s merge, `forward` and `generate` are the template's (`families/base.py`).

    model = HookedQwen2_5Omni.from_pretrained("Qwen/Qwen2.5-Omni-7B", dtype=torch.bfloat16, device="cuda")
    logits = model(**processor_outputs)                                   # [batch, pos, vocab]
    enc = model.encode(**processor_outputs)                               # run the towers once ...
    logits = model(**enc)                                                 # ... and sweep from here
"""

from __future__ import annotations

import torch

from hooked_av.encoders.omni_audio import OmniAudioEncoder
from hooked_av.encoders.qwen_vision import QwenVisionEncoder
from hooked_av.families.base import HookedAVFamily
from hooked_av.families.qwen2_5_omni.layout import audio_token_counts, token_ids
from hooked_av.families.qwen2_5_omni.positions import omni_position_ids
from hooked_av.families.qwen2_5_omni.weights import convert_key, lm_config, thinker_config


class HookedQwen2_5Omni(HookedAVFamily):
    """Hook names: `hook_audio_embeds` / `hook_image_embeds` / `hook_video_embeds` (tower outputs,
    `[n_tokens, d_model]`), `hook_embed` (merged embeddings, `[batch, pos, d_model]`), `blocks.{l}.*`,
    `ln_final.*`, `audio_encoder.*`, `vision_encoder.*` (see docs/architecture.md).

    Checkpoints: the released layout (`thinker.*`, with the Talker's keys) or the HF 5.x one, with a
    nested `Qwen2_5OmniConfig` or a bare Thinker config (`weights.py`)."""

    config_expects = "a Qwen2.5-Omni config has 'qwen2_5_omni' (a bare Thinker: 'qwen2_5_omni_thinker')"

    def build(self, config) -> None:
        tc = thinker_config(config)
        self.hf_config = tc
        self.cfg = c = lm_config(tc)
        self.ids = token_ids(tc)
        self.position_id_per_seconds = tc.position_id_per_seconds
        self.seconds_per_chunk = tc.seconds_per_chunk
        a, v = c.towers["audio_encoder"], c.towers["vision_encoder"]
        self.audio_encoder = OmniAudioEncoder(
            a["num_mel_bins"], a["d_model"], a["n_layers"], a["n_heads"], a["d_mlp"], a["output_dim"],
            a["n_window"], a["act_fn"],
        )
        self.vision_encoder = QwenVisionEncoder.from_settings(v)

    def key_converter(self):
        return convert_key

    @property
    def media_constants(self):
        """`hooked_av.inputs.media.MediaConstants` of this model's processor (image mean/std, silent
        log-mel level): what black frames and silence become as model inputs (`patching.corrupt`)."""
        from hooked_av.families.qwen2_5_omni.processor import model_media_constants

        return model_media_constants(self)

    # ---- inputs -----------------------------------------------------------------------------
    def audio_frames(self, input_features, feature_attention_mask, audio_feature_lengths):
        """(mel features `[n_mels, total_frames]`, frames per clip): from the padded `[n_audio, n_mels,
        frames]` with `feature_attention_mask` or `audio_feature_lengths` (else every frame counts), or
        already flat `[n_mels, total_frames]` with `audio_feature_lengths`."""
        if feature_attention_mask is not None:
            lens = feature_attention_mask.sum(1)
            feats = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        else:
            if input_features.dim() == 2:
                if audio_feature_lengths is None:
                    raise ValueError("2D input_features need audio_feature_lengths (frames per audio)")
                return input_features, torch.as_tensor(audio_feature_lengths, device=input_features.device)
            lens = torch.full((input_features.shape[0],), input_features.shape[2], device=input_features.device)
            if audio_feature_lengths is not None:
                lens = torch.as_tensor(audio_feature_lengths, device=input_features.device)
            feats = torch.cat([f[:, :n] for f, n in zip(input_features, lens.tolist())], dim=1)
        return feats, lens

    def audio_placeholders(self, audio):
        return sum(audio_token_counts(audio[1])), "25 tokens a second"

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                     audio_feature_lengths=None, video_second_per_grid=None, use_audio_in_video=None):
        """TMRoPE ids `[3, batch, pos]` and rope deltas `[batch, 1]` (always 3D, with or without an
        attention mask: HF falls back to 1D positions without one). `video_second_per_grid` defaults to
        1 s per grid step; `use_audio_in_video`: see `encode`."""
        if video_grid_thw is not None and video_second_per_grid is None:
            video_second_per_grid = torch.ones(len(video_grid_thw))
        counts = None if audio_feature_lengths is None else audio_token_counts(audio_feature_lengths)
        return omni_position_ids(
            input_ids, attention_mask, self.ids, image_grid_thw, video_grid_thw, counts, video_second_per_grid,
            use_audio_in_video, self.vision_encoder.merge, self.position_id_per_seconds, self.seconds_per_chunk,
        )

    # ---- inputs from media and the TokenMap (hooked_av/inputs) --------------------------------
    def prepare(self, prompts, *, use_audio_in_video: bool | None = None, parts=None, tokenizer=None, **prompt_kwargs) -> dict:
        """Model inputs from media and a question (or a list of `hooked_av.inputs.Prompt`): see
        `hooked_av.families.qwen2_5_omni.prompt.prepare_omni`. `model(**inputs)` runs them."""
        from hooked_av.families.qwen2_5_omni.processor import parts_for_model
        from hooked_av.families.qwen2_5_omni.prompt import prepare_omni

        parts = parts or getattr(self, "processor_parts", None) or parts_for_model(self, tokenizer)
        self.processor_parts = parts
        return prepare_omni(parts, self.ids, prompts, use_audio_in_video, **prompt_kwargs)

    def token_map(self, inputs: dict, tokenizer=None, chat=None):
        """The `TokenMap` of processor/`prepare` outputs (group, item, frame, time, chunk per position).
        The chat structure comes from `chat` (a `hooked_av.inputs.chat.ChatTokens`), else the tokenizer,
        else Qwen2.5's fixed chat ids when the config has Qwen2.5's vocabulary; otherwise all text is
        "question". `inputs["text_parts"]` (from `prepare`) splits the user's text into question,
        options, instruction and label."""
        from hooked_av.families.qwen2_5_omni.token_map import omni_token_map
        from hooked_av.inputs.chat import chat_tokens

        tok = tokenizer if tokenizer is not None else self.tokenizer
        frames = inputs.get("feature_attention_mask")  # valid mel frames per audio, or their counts
        frames = frames if frames is not None else inputs.get("audio_feature_lengths")
        counts = None if frames is None else audio_token_counts(frames)
        return omni_token_map(
            inputs["input_ids"], inputs.get("attention_mask"), self.ids, chat_tokens(tok, chat, self.cfg.d_vocab, self.ids.vision_start),
            inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), counts,
            inputs.get("video_second_per_grid"), self.vision_encoder.merge, self.position_id_per_seconds, self.seconds_per_chunk,
            inputs.get("text_parts"), inputs.get("media_items"),
        )
