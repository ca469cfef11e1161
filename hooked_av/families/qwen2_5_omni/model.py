"""`HookedQwen2_5Omni`: the Qwen2.5-Omni Thinker (audio tower + vision tower + Qwen2 decoder) with a
hook point on every residual stream, attention pattern and intermediate.

    model = HookedQwen2_5Omni.from_pretrained("Qwen/Qwen2.5-Omni-7B", dtype=torch.bfloat16, device="cuda")
    logits = model(**processor_outputs)                                   # [batch, pos, vocab]
    enc = model.encode(**processor_outputs)                               # run the towers once ...
    logits = model(**enc)                                                 # ... and sweep from here
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_av.core.base import HookedAVModel
from hooked_av.core.language_model import MRoPELanguageModel, decode_args
from hooked_av.core import checkpoint
from hooked_av.core.placeholders import check_patch_rows, check_placeholders, merged_tokens
from hooked_av.encoders.omni_audio import OmniAudioEncoder
from hooked_av.encoders.qwen_vision import QwenVisionEncoder
from hooked_av.families.qwen2_5_omni.layout import audio_token_counts, token_ids
from hooked_av.families.qwen2_5_omni.positions import omni_position_ids
from hooked_av.families.qwen2_5_omni.weights import convert_key, lm_config, thinker_config

MEDIA_ARGS = (
    "input_features", "feature_attention_mask", "audio_feature_lengths", "pixel_values", "image_grid_thw",
    "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
)


class HookedQwen2_5Omni(MRoPELanguageModel, HookedAVModel):
    """Hook names: `hook_audio_embeds` / `hook_image_embeds` / `hook_video_embeds` (tower outputs,
    `[n_tokens, d_model]`), `hook_embed` (merged embeddings, `[batch, pos, d_model]`), `blocks.{l}.*`,
    `ln_final.*`, `audio_encoder.*`, `vision_encoder.*` (see docs/architecture.md)."""

    def __init__(self, config):
        super().__init__()
        tc = thinker_config(config)
        self.hf_config = tc
        self.cfg = c = lm_config(tc)
        self.ids = token_ids(tc)
        self.position_id_per_seconds = tc.position_id_per_seconds
        self.seconds_per_chunk = tc.seconds_per_chunk
        self.tokenizer = None

        a, v = c.towers["audio_encoder"], c.towers["vision_encoder"]
        self.audio_encoder = OmniAudioEncoder(
            a["num_mel_bins"], a["d_model"], a["n_layers"], a["n_heads"], a["d_mlp"], a["output_dim"],
            a["n_window"], a["act_fn"],
        )
        self.vision_encoder = QwenVisionEncoder.from_settings(v)
        self.build_language_model(c)
        self.hook_audio_embeds = HookPoint()
        self.hook_image_embeds = HookPoint()
        self.hook_video_embeds = HookPoint()
        self.setup()

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32, device=None) -> "HookedQwen2_5Omni":
        """Random weights, for tests and shape studies (`device="meta"` allocates nothing)."""
        with torch.device(device or "cpu"):
            model = cls(config)
        return model.to(dtype).eval()

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device=None,
        device_map=None, max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
    ) -> "HookedQwen2_5Omni":
        """A hub id or a local HF checkpoint folder, in the released (`thinker.*`, with the Talker's
        keys) or the HF 5.x layout, with a nested `Qwen2_5OmniConfig` or a bare Thinker config.
        `device_map` ("auto", "balanced", "sequential" or a dict of module -> device), `max_memory` and
        `offload_folder` place the model across devices through accelerate as HF does (see
        `hooked_av.core.placement`); `device` puts it whole on one."""
        from transformers import AutoConfig

        folder = checkpoint.resolve(name_or_path)
        checkpoint.model_type(folder, checkpoint.read_config(folder),
                              "a Qwen2.5-Omni config has 'qwen2_5_omni' (a bare Thinker: 'qwen2_5_omni_thinker')")
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        tokenizer = checkpoint.load_tokenizer(folder)  # before the weights: a bad tokenizer fails in a second
        tensors = checkpoint.iter_tensors(checkpoint.weight_files(folder))
        model = checkpoint.build_and_load(lambda: cls(config), tensors, convert_key, str(folder), dtype, device,
                                          device_map, max_memory, offload_folder)
        model.tokenizer = tokenizer
        return model

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype | None = None, device=None) -> "HookedQwen2_5Omni":
        """From an instantiated HF `Qwen2_5OmniThinkerForConditionalGeneration` (or the full Omni model)."""
        dtype = dtype or next(hf_model.parameters()).dtype
        return checkpoint.build_and_load(
            lambda: cls(hf_model.config), hf_model.state_dict().items(), convert_key, type(hf_model).__name__, dtype, device
        )

    @property
    def media_constants(self):
        """`hooked_av.inputs.media.MediaConstants` of this model's processor (image mean/std, silent
        log-mel level): what black frames and silence become as model inputs (`patching.corrupt`)."""
        from hooked_av.families.qwen2_5_omni.processor import model_media_constants

        return model_media_constants(self)

    # ---- inputs -----------------------------------------------------------------------------
    def _audio_features(self, input_features, feature_attention_mask, audio_feature_lengths):
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

    def _check_placeholders(self, input_ids, audio_lens, image_grid_thw, video_grid_thw, pixel_values, pixel_values_videos):
        m = self.vision_encoder.merge
        check_placeholders(input_ids, [
            ("<|AUDIO|>", self.ids.audio, None if audio_lens is None else sum(audio_token_counts(audio_lens)), "audio", "25 tokens a second"),
            ("<|IMAGE|>", self.ids.image, merged_tokens(image_grid_thw, m), "image", "image_grid_thw"),
            ("<|VIDEO|>", self.ids.video, merged_tokens(video_grid_thw, m), "video", "video_grid_thw"),
        ])
        check_patch_rows(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        input_features: Tensor | None = None,
        feature_attention_mask: Tensor | None = None,
        audio_feature_lengths: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        video_second_per_grid: Tensor | None = None,
        use_audio_in_video: bool | None = None,
        text_parts: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the towers and merge: returns `inputs_embeds` `[batch, pos, d_model]`, `position_ids`
        `[3, batch, pos]`, `attention_mask`, `rope_deltas` `[batch, 1]`; `model(**enc)` continues.
        `use_audio_in_video`: the layout of each video block in `input_ids` decides (its audio
        interleaved or not, as the processor built it); None (default) follows it, True or False is
        checked against it and a mismatch is a ValueError raised before any tower runs. `text_parts`
        (`prepare`'s record of the user's text, for `token_map`) is accepted and not read, so
        `model.encode(**inputs)` takes prepare's output as it is."""
        audio = None
        if input_features is not None:
            audio = self._audio_features(input_features, feature_attention_mask, audio_feature_lengths)
        self._check_placeholders(
            input_ids, None if audio is None else audio[1], image_grid_thw, video_grid_thw, pixel_values, pixel_values_videos
        )
        if video_grid_thw is not None and video_second_per_grid is None:
            video_second_per_grid = torch.ones(len(video_grid_thw))
        # before the towers: the ids' layout is checked here (use_audio_in_video, media order)
        position_ids, deltas = self.position_ids(
            input_ids, attention_mask, image_grid_thw, video_grid_thw,
            None if audio is None else audio[1], video_second_per_grid, use_audio_in_video,
        )
        embeds = self.embed(input_ids)
        if audio is not None:
            a = self.hook_audio_embeds(self.audio_encoder(audio[0].to(self.dtype), audio[1]))
            embeds = embeds.masked_scatter((input_ids == self.ids.audio)[..., None], a.to(embeds.device, embeds.dtype))
        im, vi = self.vision_encoder.images_and_videos(
            None if pixel_values is None else pixel_values.to(self.dtype), image_grid_thw,
            None if pixel_values_videos is None else pixel_values_videos.to(self.dtype), video_grid_thw,
        )
        if im is not None:
            im = self.hook_image_embeds(im)
            embeds = embeds.masked_scatter((input_ids == self.ids.image)[..., None], im.to(embeds.device, embeds.dtype))
        if vi is not None:
            vi = self.hook_video_embeds(vi)
            embeds = embeds.masked_scatter((input_ids == self.ids.video)[..., None], vi.to(embeds.device, embeds.dtype))
        return {"inputs_embeds": embeds, "position_ids": position_ids, "attention_mask": attention_mask, "rope_deltas": deltas}

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                     audio_feature_lengths=None, video_second_per_grid=None, use_audio_in_video=None):
        """TMRoPE ids `[3, batch, pos]` and rope deltas `[batch, 1]` (always 3D, with or without an
        attention mask: HF falls back to 1D positions without one). `use_audio_in_video`: see `encode`."""
        counts = None if audio_feature_lengths is None else audio_token_counts(audio_feature_lengths)
        return omni_position_ids(
            input_ids, attention_mask, self.ids, image_grid_thw, video_grid_thw, counts, video_second_per_grid,
            use_audio_in_video, self.vision_encoder.merge, self.position_id_per_seconds, self.seconds_per_chunk,
        )

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        rope_deltas: Tensor | None = None,
        use_audio_in_video: bool | None = None,
        return_type: str | None = "logits",
        logits_at=None,
        text_parts: Tensor | None = None,
        **media,
    ) -> Tensor:
        """Logits `[batch, pos, vocab]` from processor outputs, or from `encode`'s outputs.
        `return_type`: "logits", "resid" (after `ln_final`) or None; `logits_at` ("last", positions or
        None = all): only those positions are unembedded (HF's `logits_to_keep`), see `run_language_model`.
        `use_audio_in_video`, `text_parts` (accepted, not read): see `encode`."""
        return self.route_forward(
            input_ids, attention_mask, inputs_embeds, position_ids, return_type, media, MEDIA_ARGS, logits_at=logits_at,
            use_audio_in_video=use_audio_in_video,
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
            inputs.get("text_parts"),
        )

    # ---- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
        max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None,
        use_audio_in_video: bool | None = None, inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None, rope_deltas: Tensor | None = None, **media,
    ) -> Tensor:
        """Greedy decoding with a KV cache, under whatever hooks are active. Returns the new tokens
        `[batch, n_new]` (finished rows are padded with their eos)."""
        decode_args(max_new_tokens, eos_token_id, self.cfg.d_vocab)  # refused before the towers run
        if inputs_embeds is None:
            enc = self.encode(input_ids, attention_mask, use_audio_in_video=use_audio_in_video, **media)
            inputs_embeds, position_ids, rope_deltas = enc["inputs_embeds"], enc["position_ids"], enc["rope_deltas"]
        return self.greedy_decode(inputs_embeds, position_ids, attention_mask, rope_deltas, max_new_tokens, eos_token_id)
