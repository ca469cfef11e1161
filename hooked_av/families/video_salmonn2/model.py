"""`HookedVideoSALMONN2`: video-SALMONN 2+ (a Qwen2.5-VL with a Whisper encoder and a window-level
Q-Former for audio) with a hook point on every residual stream, attention pattern and intermediate.

    model = HookedVideoSALMONN2.from_pretrained("path/to/video-SALMONN-2_plus_7B", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids, attention_mask, input_features=mel, pixel_values_videos=pv, video_grid_thw=grid)
    enc = model.encode(...)                        # towers once; enc["position_mode"] says which positions
    logits = model(**enc)                          # ... and sweep from here

Audio comes as Whisper mel chunks `[n_chunks, n_mels, 3000]` (30 s each, in prompt order); every chunk
makes 60 `<|audio_pad|>` tokens. Position ids follow the official inference script by default
(`position_mode="inference"`); `position_mode="training"` gives the time-aligned ids SALMONN was
trained with (see `positions.py`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_av.core.base import HookedAVModel
from hooked_av.core.language_model import MRoPELanguageModel, decode_args
from hooked_av.encoders.qformer import WindowQFormer
from hooked_av.encoders.qwen_vision import QwenVisionEncoder
from hooked_av.encoders.whisper import WhisperEncoder
from hooked_av.core import checkpoint
from hooked_av.core.placeholders import check_patch_rows, check_placeholders, merged_tokens
from hooked_av.families.video_salmonn2.layout import POSITION_IDS_PER_SECOND, token_ids
from hooked_av.families.video_salmonn2.positions import POSITION_MODES, salmonn_position_ids
from hooked_av.families.video_salmonn2.weights import convert_key, lm_config, split_config

MEDIA_ARGS = (
    "input_features", "audio_feature", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
    "video_second_per_grid", "second_per_grid_ts",
)


class HookedVideoSALMONN2(MRoPELanguageModel, HookedAVModel):
    """Hook names: `hook_audio_embeds` / `hook_image_embeds` / `hook_video_embeds` (tower outputs,
    `[n_tokens, d_model]`), `hook_embed` (merged embeddings, `[batch, pos, d_model]`), `blocks.{l}.*`,
    `ln_final.*`, `audio_encoder.*` (Whisper, one batch row per 30 s chunk), `audio_qformer.*`
    (one batch row per 0.5 s window), `vision_encoder.*` (see docs/architecture.md).

    `position_mode`: "inference" (default, the official inference behaviour) or "training"
    (time-aligned audio); `model.position_mode` is the default a call uses, `encode` returns the one used.
    """

    def __init__(self, config, position_mode: str = "inference"):
        super().__init__()
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode {position_mode!r} is unknown; use one of {POSITION_MODES}")
        self.position_mode = position_mode
        vl, audio, qformer, ids = split_config(config)
        self.hf_config = config
        self.cfg = c = lm_config(vl, audio, qformer)
        self.ids = token_ids(ids)
        self.tokenizer = None

        a, q, v = c.towers["audio_encoder"], c.towers["audio_qformer"], c.towers["vision_encoder"]
        self.audio_encoder = WhisperEncoder(
            a["num_mel_bins"], a["d_model"], a["n_layers"], a["n_heads"], a["d_mlp"], a["max_source_positions"], a["act_fn"]
        )
        self.audio_qformer = WindowQFormer(
            q["d_model"], q["d_context"], q["n_layers"], q["n_heads"], q["d_mlp"], q["out_dim"], q["window"],
            q["stride"], q["n_query"], q["cross_attention_freq"], q["act_fn"], q["eps"],
        )
        self.vision_encoder = QwenVisionEncoder.from_settings(v)
        self.build_language_model(c)
        self.hook_audio_embeds = HookPoint()
        self.hook_image_embeds = HookPoint()
        self.hook_video_embeds = HookPoint()
        self.setup()

    @property
    def audio_tokens_per_chunk(self) -> int:
        """LLM tokens one 30 s mel chunk makes (60 for the released models: 2 per second)."""
        q = self.audio_qformer
        return q.windows_per_chunk(self.audio_encoder.max_source_positions) * q.q_tokens.shape[1]

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32, device=None, position_mode: str = "inference"):
        """Random weights, for tests and shape studies (`device="meta"` allocates nothing)."""
        with torch.device(device or "cpu"):
            model = cls(config, position_mode)
        return model.to(dtype).eval()

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device=None,
        position_mode: str = "inference", device_map=None, max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
    ) -> "HookedVideoSALMONN2":
        """A hub id or a local checkpoint folder in the repository's layout (`visual.*`, `audio.*`,
        `model.*`, `lm_head.*`) or the newer one (`model.language_model.*`, `model.visual.*`).
        `device_map` ("auto", "balanced", "sequential" or a dict of module -> device), `max_memory` and
        `offload_folder` place the model across devices through accelerate as HF does (see
        `hooked_av.core.placement`); `device` puts it whole on one."""
        folder = checkpoint.resolve(name_or_path)
        config = checkpoint.read_config(folder)  # a dict: AutoConfig would drop SALMONN's audio_config
        split_config(config)  # refuse a config that is not SALMONN's before touching any weight file
        tokenizer = checkpoint.load_tokenizer(folder)  # before the weights: a bad tokenizer fails in a second
        tensors = checkpoint.iter_tensors(checkpoint.weight_files(folder))
        model = checkpoint.build_and_load(lambda: cls(config, position_mode), tensors, convert_key, str(folder), dtype,
                                          device, device_map, max_memory, offload_folder)
        model.tokenizer = tokenizer
        return model

    @property
    def media_constants(self):
        """`hooked_av.inputs.media.MediaConstants` of this model's processor (image mean/std, silent
        log-mel level): what black frames and silence become as model inputs (`patching.corrupt`)."""
        from hooked_av.families.video_salmonn2.prompt import model_media_constants

        return model_media_constants(self)

    # ---- inputs -----------------------------------------------------------------------------
    def _check_inputs(self, input_ids, features, image_grid_thw, video_grid_thw, pixel_values, pixel_values_videos):
        """Every mismatch between the prompt and the media, before any tower runs."""
        if features is not None:
            self.audio_encoder.check_input(features)
        n_chunks = 0 if features is None else features.shape[0]
        m = self.vision_encoder.merge
        check_placeholders(input_ids, [
            ("<|audio_pad|>", self.ids.audio, None if features is None else n_chunks * self.audio_tokens_per_chunk,
             "audio", f"{n_chunks} chunk(s) of 30 s x {self.audio_tokens_per_chunk}"),
            ("<|image_pad|>", self.ids.image, merged_tokens(image_grid_thw, m), "image", "image_grid_thw"),
            ("<|video_pad|>", self.ids.video, merged_tokens(video_grid_thw, m), "video", "video_grid_thw"),
        ])
        check_patch_rows(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        input_features: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        video_second_per_grid: Tensor | list[float] | None = None,
        position_mode: str | None = None,
        audio_feature: Tensor | None = None,
        second_per_grid_ts: Tensor | list[float] | None = None,
        use_audio_in_video: bool | None = None,
        text_parts: Tensor | None = None,
    ) -> dict:
        """Run the towers and merge: returns `inputs_embeds` `[batch, pos, d_model]`, `position_ids`
        `[3, batch, pos]`, `attention_mask`, `rope_deltas` `[batch, 1]` and `position_mode` (the mode
        used); `model(**enc)` continues. `audio_feature` / `second_per_grid_ts` are the repository's
        names for `input_features` / `video_second_per_grid`; the latter counts in "training" mode only (the
        official inference drops it: 1.0 s per grid step). `use_audio_in_video` is accepted for parity
        with `HookedQwen2_5Omni`: the token layout says where audio goes, and a given flag that
        disagrees with it is an error. `text_parts` (`prepare`'s record of the user's text, for
        `token_map`) is accepted and not read, so `model.encode(**inputs)` takes prepare's output as it is."""
        features = input_features if input_features is not None else audio_feature
        spg = video_second_per_grid if video_second_per_grid is not None else second_per_grid_ts
        mode = position_mode or self.position_mode
        if mode not in POSITION_MODES:
            raise ValueError(f"position_mode {mode!r} is unknown; use one of {POSITION_MODES}")
        self._check_inputs(input_ids, features, image_grid_thw, video_grid_thw, pixel_values, pixel_values_videos)
        if use_audio_in_video is not None:
            self._check_audio_in_video(input_ids, attention_mask, use_audio_in_video)
        position_ids, deltas = self.position_ids(input_ids, attention_mask, image_grid_thw, video_grid_thw, spg, mode)

        embeds = self.embed(input_ids)
        if features is not None:
            a = self.hook_audio_embeds(self.audio_qformer(self.audio_encoder(features.to(self.dtype))))
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
        return {
            "inputs_embeds": embeds, "position_ids": position_ids, "attention_mask": attention_mask,
            "rope_deltas": deltas, "position_mode": mode,
        }

    def _check_audio_in_video(self, input_ids: Tensor, attention_mask: Tensor | None, flag: bool) -> None:
        """A given `use_audio_in_video` must describe every video block: audio interleaved in it (True)
        or not (False); SALMONN's layout leaves no choice, so a flag that disagrees is a mistake."""
        for r, row in enumerate(input_ids.tolist()):
            if attention_mask is not None:
                row = [t for t, m in zip(row, attention_mask[r].tolist()) if m]
            start = None
            for i, t in enumerate(row):
                if t == self.ids.vision_start:
                    start = i
                elif t == self.ids.vision_end and start is not None:
                    block = row[start + 1 : i]
                    if self.ids.video in block and (self.ids.audio in block) != flag:
                        has = "interleaves audio" if not flag else "holds no audio"
                        raise ValueError(
                            f"row {r}: use_audio_in_video={flag} but a video block in input_ids {has}; "
                            "video-SALMONN's layout decides: leave use_audio_in_video out"
                        )
                    start = None

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                     video_second_per_grid=None, position_mode=None):
        """M-RoPE ids `[3, batch, pos]` and rope deltas `[batch, 1]` in `position_mode` (default:
        `model.position_mode`). Which rows are audio-visual, audio-only or visual is read from their
        tokens; `video_second_per_grid` counts in "training" mode only (the official inference drops it)."""
        return salmonn_position_ids(
            input_ids, attention_mask, self.ids, position_mode or self.position_mode, image_grid_thw,
            video_grid_thw, video_second_per_grid, self.vision_encoder.merge, POSITION_IDS_PER_SECOND,
        )

    def prepare(self, prompts, *, position_mode: str | None = None, use_audio_in_video: bool | None = None,
                parts=None, tokenizer=None, fps: float | None = None, min_frames: int | None = None,
                max_frames: int | None = None, max_pixels: int | None = None, **prompt_kwargs) -> dict:
        """Model inputs from media and a question (or a list of `hooked_av.inputs.Prompt`) for
        `position_mode` (default `model.position_mode`): see `hooked_av.families.video_salmonn2.prompt.prepare_salmonn`.
        `fps`, `min_frames`, `max_frames`, `max_pixels` override the sampling of this call (defaults
        10 fps, 16..768 frames, 61250 pixels per frame). `model(**inputs)` runs them."""
        from hooked_av.families.video_salmonn2.prompt import prepare_salmonn, salmonn_parts_for_model, with_settings

        mode = position_mode or self.position_mode
        if mode not in POSITION_MODES:
            raise ValueError(f"position_mode {mode!r} is unknown; use one of {POSITION_MODES}")
        if tokenizer is not None and parts is None:
            parts = salmonn_parts_for_model(self, tokenizer)
        parts = parts or getattr(self, "processor_parts", None) or salmonn_parts_for_model(self)
        self.processor_parts = parts
        given = dict(fps=fps, min_frames=min_frames, max_frames=max_frames, max_pixels=max_pixels)
        given = {k: v for k, v in given.items() if v is not None}
        if given:
            parts = with_settings(parts, **given)
        return prepare_salmonn(parts, self.ids, prompts, mode, use_audio_in_video, self.vision_encoder.merge, **prompt_kwargs)

    def token_map(self, inputs: dict, tokenizer=None, chat=None):
        """The `TokenMap` of model inputs (group, item, frame, time per position), with the position
        mode they run in (`inputs["position_mode"]`, else `model.position_mode`) as `tm.position_mode`.
        Without a tokenizer or `chat` (a `hooked_av.inputs.chat.ChatTokens`), Qwen2.5's own chat ids are
        used on a Qwen2.5 vocabulary, else all text is "question" (`hooked_av.inputs.chat.chat_tokens`).
        `inputs["text_parts"]` (from `prepare`) splits the user's text into question, options,
        instruction and label."""
        from hooked_av.inputs.chat import chat_tokens
        from hooked_av.families.video_salmonn2.token_map import salmonn_token_map

        tok = tokenizer if tokenizer is not None else self.tokenizer
        chat = chat_tokens(tok, chat, self.cfg.d_vocab, self.ids.vision_start)
        spg = inputs.get("video_second_per_grid", inputs.get("second_per_grid_ts"))
        return salmonn_token_map(
            inputs["input_ids"], inputs.get("attention_mask"), self.ids, chat, inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"), spg, self.vision_encoder.merge, inputs.get("position_mode") or self.position_mode,
            inputs.get("text_parts"),
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
        position_mode: str | None = None,
        use_audio_in_video: bool | None = None,
        return_type: str | None = "logits",
        logits_at=None,
        text_parts: Tensor | None = None,
        **media,
    ) -> Tensor | None:
        """Logits `[batch, pos, vocab]` from input ids and media, or from `encode`'s outputs.
        `return_type`: "logits", "resid" (after `ln_final`) or None; `logits_at` ("last", positions or
        None = all): only those positions are unembedded (HF's `logits_to_keep`), see `run_language_model`.
        `use_audio_in_video`, `text_parts` (accepted, not read): see `encode`."""
        return self.route_forward(
            input_ids, attention_mask, inputs_embeds, position_ids, return_type, media, MEDIA_ARGS,
            logits_at=logits_at, position_mode=position_mode, use_audio_in_video=use_audio_in_video,
        )

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
        max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None, inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None, rope_deltas: Tensor | None = None, position_mode: str | None = None,
        use_audio_in_video: bool | None = None, **media,
    ) -> Tensor:
        """Greedy decoding with a KV cache, under whatever hooks are active. Returns the new tokens
        `[batch, n_new]` (finished rows are padded with their eos)."""
        decode_args(max_new_tokens, eos_token_id, self.cfg.d_vocab)  # before the towers run
        if inputs_embeds is None:
            enc = self.encode(input_ids, attention_mask, position_mode=position_mode, use_audio_in_video=use_audio_in_video, **media)
            inputs_embeds, position_ids, rope_deltas = enc["inputs_embeds"], enc["position_ids"], enc["rope_deltas"]
        return self.greedy_decode(inputs_embeds, position_ids, attention_mask, rope_deltas, max_new_tokens, eos_token_id)
