"""`HookedVideoSALMONN2`: video-SALMONN 2+ (a Qwen2.5-VL with a Whisper encoder and a window-level
Q-Former for audio) with a hook point on every residual stream, attention pattern and intermediate.
What is SALMONN's alone is here (Whisper + Q-Former audio, the repository's input names, its two
position modes); loading, `encode`'s merge, `forward` and `generate` are the template's (`families/base.py`).

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

from torch import Tensor

from hooked_av.core import checkpoint
from hooked_av.encoders.qformer import WindowQFormer
from hooked_av.encoders.qwen_vision import QwenVisionEncoder
from hooked_av.encoders.whisper import WhisperEncoder
from hooked_av.families.base import HookedAVFamily, MediaInputs
from hooked_av.families.video_salmonn2.layout import POSITION_IDS_PER_SECOND, token_ids
from hooked_av.families.video_salmonn2.positions import POSITION_MODES, salmonn_position_ids
from hooked_av.families.video_salmonn2.weights import convert_key, lm_config, split_config


def check_position_mode(mode: str) -> str:
    if mode not in POSITION_MODES:
        raise ValueError(f"position_mode {mode!r} is unknown; use one of {POSITION_MODES}")
    return mode


class HookedVideoSALMONN2(HookedAVFamily):
    """Hook names: `hook_audio_embeds` / `hook_image_embeds` / `hook_video_embeds` (tower outputs,
    `[n_tokens, d_model]`), `hook_embed` (merged embeddings, `[batch, pos, d_model]`), `blocks.{l}.*`,
    `ln_final.*`, `audio_encoder.*` (Whisper, one batch row per 30 s chunk), `audio_qformer.*`
    (one batch row per 0.5 s window), `vision_encoder.*` (see docs/architecture.md).

    `position_mode`: "inference" (default, the official inference behaviour) or "training"
    (time-aligned audio); `model.position_mode` is the default a call uses, `encode` returns the one used.
    Checkpoints: the repository's layout (`visual.*`, `audio.*`, `model.*`, `lm_head.*`) or the newer one
    (`model.language_model.*`, `model.visual.*`).
    """

    encode_options = ("position_mode",)
    placeholder_names = {"audio": "<|audio_pad|>", "image": "<|image_pad|>", "video": "<|video_pad|>"}

    def __init__(self, config, position_mode: str = "inference"):
        check_position_mode(position_mode)
        super().__init__(config)
        self.position_mode = position_mode

    def build(self, config) -> None:
        vl, audio, qformer, ids = split_config(config)
        self.hf_config = config
        self.cfg = c = lm_config(vl, audio, qformer)
        self.ids = token_ids(ids)
        a, q, v = c.towers["audio_encoder"], c.towers["audio_qformer"], c.towers["vision_encoder"]
        self.audio_encoder = WhisperEncoder(
            a["num_mel_bins"], a["d_model"], a["n_layers"], a["n_heads"], a["d_mlp"], a["max_source_positions"], a["act_fn"]
        )
        self.audio_qformer = WindowQFormer(
            q["d_model"], q["d_context"], q["n_layers"], q["n_heads"], q["d_mlp"], q["out_dim"], q["window"],
            q["stride"], q["n_query"], q["cross_attention_freq"], q["act_fn"], q["eps"],
        )
        self.vision_encoder = QwenVisionEncoder.from_settings(v)

    @classmethod
    def read_checkpoint_config(cls, folder):
        config = checkpoint.read_config(folder)  # a dict: AutoConfig would drop SALMONN's audio_config
        split_config(config)  # refuse a config that is not SALMONN's before touching any weight file
        return config

    def key_converter(self):
        return convert_key

    @property
    def audio_tokens_per_chunk(self) -> int:
        """LLM tokens one 30 s mel chunk makes (60 for the released models: 2 per second)."""
        q = self.audio_qformer
        return q.windows_per_chunk(self.audio_encoder.max_source_positions) * q.q_tokens.shape[1]

    @property
    def media_constants(self):
        """`hooked_av.inputs.media.MediaConstants` of this model's processor (image mean/std, silent
        log-mel level): what black frames and silence become as model inputs (`patching.corrupt`)."""
        from hooked_av.families.video_salmonn2.prompt import model_media_constants

        return model_media_constants(self)

    # ---- inputs -----------------------------------------------------------------------------
    def read_media(self, use_audio_in_video: bool | None = None, input_features=None, audio_feature=None,
                   pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                   video_second_per_grid=None, second_per_grid_ts=None, position_mode: str | None = None) -> MediaInputs:
        """Whisper mel chunks `[n_chunks, n_mels, 3000]` as `audio`. `audio_feature` / `second_per_grid_ts`
        are the repository's names for `input_features` / `video_second_per_grid`; the latter counts in
        "training" mode only (the official inference drops it: 1.0 s per grid step). `position_mode`
        (default `model.position_mode`) is returned with `encode`'s result."""
        features = input_features if input_features is not None else audio_feature
        spg = video_second_per_grid if video_second_per_grid is not None else second_per_grid_ts
        mode = check_position_mode(position_mode or self.position_mode)
        return MediaInputs(features, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, positions=dict(
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, video_second_per_grid=spg, position_mode=mode),
            returned={"position_mode": mode})

    def check_inputs(self, input_ids, attention_mask, media, use_audio_in_video) -> None:
        """The template's checks after Whisper's own input check; then a given `use_audio_in_video` must
        describe the layout (SALMONN's layout leaves no choice)."""
        if media.audio is not None:
            self.audio_encoder.check_input(media.audio)
        super().check_inputs(input_ids, attention_mask, media, use_audio_in_video)
        if use_audio_in_video is not None:
            self._check_audio_in_video(input_ids, attention_mask, use_audio_in_video)

    def audio_placeholders(self, audio):
        n = audio.shape[0]
        return n * self.audio_tokens_per_chunk, f"{n} chunk(s) of 30 s x {self.audio_tokens_per_chunk}"

    def get_audio_features(self, audio) -> Tensor:
        """Q-Former tokens `[n_chunks * tokens_per_chunk, d_model]` of Whisper mel chunks `[n_chunks, n_mels, 3000]`."""
        return self.audio_qformer(self.audio_encoder(audio.to(self.dtype)))

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

    # ---- inputs from media and the TokenMap ---------------------------------------------------
    def prepare(self, prompts, *, position_mode: str | None = None, use_audio_in_video: bool | None = None,
                parts=None, tokenizer=None, fps: float | None = None, min_frames: int | None = None,
                max_frames: int | None = None, max_pixels: int | None = None, **prompt_kwargs) -> dict:
        """Model inputs from media and a question (or a list of `hooked_av.inputs.Prompt`) for
        `position_mode` (default `model.position_mode`): see `hooked_av.families.video_salmonn2.prompt.prepare_salmonn`.
        `fps`, `min_frames`, `max_frames`, `max_pixels` override the sampling of this call (defaults
        10 fps, 16..768 frames, 61250 pixels per frame). `model(**inputs)` runs them."""
        from hooked_av.families.video_salmonn2.prompt import prepare_salmonn, salmonn_parts_for_model, with_settings

        mode = check_position_mode(position_mode or self.position_mode)
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
            inputs.get("text_parts"), inputs.get("media_items"),
        )
