"""`HookedAVFamily`: the template every model family subclasses. A family is its differences (as in HF's
`modular_qwen3_omni_moe.py`): it overrides named points, and loading, the media merge, `forward` and
`generate` are written once, here.

`encode` runs the points in this order; every step before the towers may refuse, so a mistake costs no
tower run:

    read_media -> check_inputs (audio_placeholders) -> position_ids
    -> embed -> get_audio_features, get_visual_features -> masked_scatter at get_placeholder_mask
    -> DeepStack features as injections (a tower that returns them)

A new family that is a variant of an existing one subclasses that one (its nearest sibling) and
overrides only what differs; `tests/standin_family/` is one, two files long.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_av.core import checkpoint
from hooked_av.core.base import HookedAVModel
from hooked_av.core.devices import as_device
from hooked_av.core.language_model import MRoPELanguageModel, decode_args, scatter_injections
from hooked_av.core.placeholders import check_patch_rows, check_placeholders, merged_tokens

KINDS = ("audio", "image", "video")
Features = tuple[Tensor, "Tensor | None"]  # tokens [n, d_model], DeepStack [k, n, d_model] or None


@dataclass
class MediaInputs:
    """One call's media as the family reads them (`HookedAVFamily.read_media`), before any tower runs.

    audio: what `get_audio_features` takes (the Qwen Omni families: mel features `[n_mels, frames]` and
      frames per clip `[n_audio]`), None without audio.
    pixel_values / pixel_values_videos `[n_patches, patch_dim]`, image_grid_thw / video_grid_thw `[n_items, 3]`.
    positions: the keywords the family's `position_ids` takes after `input_ids, attention_mask`.
    returned: entries `encode` adds to its result (video-SALMONN 2+: the `position_mode` used).
    """

    audio: Any = None
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    pixel_values_videos: Tensor | None = None
    video_grid_thw: Tensor | None = None
    positions: dict = field(default_factory=dict)
    returned: dict = field(default_factory=dict)


def check_finite_media(media: dict) -> None:
    """Refuse NaN or inf in any floating-point media input (features, pixels, seconds per grid, under any name
    the family reads, aliases included), before any tower runs: the towers would spread it to every logit."""
    for key, value in media.items():
        if isinstance(value, (list, tuple)) or type(value).__module__ == "numpy":  # e.g. seconds per grid as a list
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                continue
        if isinstance(value, Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                first = [int(i) for i in bad.nonzero()[0].tolist()]
                raise ValueError(f"{key} holds {int(bad.sum())} non-finite value(s) (NaN or inf), the first at index "
                                 f"{first}; they would make every logit NaN: fix the media (model.prepare refuses such "
                                 "media) or drop the item")


class HookedAVFamily(MRoPELanguageModel, HookedAVModel):
    """An audio-visual LLM: towers whose outputs replace placeholder tokens, and the M-RoPE decoder.

    A family defines (the template has no default):
      build(config)                    `hf_config`, `cfg`, `ids` and the towers
      key_converter()                  checkpoint key -> this model's parameter names
      audio_placeholders(audio)        (audio tokens the audio makes, where that count comes from)
      position_ids(input_ids, attention_mask, **positions)   `[3, batch, pos]`, rope deltas `[batch, 1]`
      prepare, token_map, media_constants
    and overrides where it differs (the defaults follow the Qwen Omni processors):
      read_checkpoint_config(folder)   config.json -> the config `build` takes (AutoConfig; `config_expects`)
      read_media(use_audio_in_video, **media) -> MediaInputs (audio by `audio_frames`); its keywords
                                       are `media_args`
      check_inputs, get_placeholder_mask, get_audio_features, get_visual_features
      placeholder_names, encode_options; `__init__`'s keywords after `config` are the family's options

        model = hooked_av.load("toy")                      # a HookedQwen2_5Omni, a HookedAVFamily
        batch = hooked_av.toy.make_batch(2, seed=0, tokenizer=model.tokenizer)
        logits = model(**model.encode(**batch.inputs))     # [2, pos, vocab]
    """

    encode_options: tuple[str, ...] = ()  # family keywords encode takes besides media (SALMONN: position_mode)
    placeholder_names = {"audio": "<|AUDIO|>", "image": "<|IMAGE|>", "video": "<|VIDEO|>"}  # as errors name them
    config_expects = "config.json names the family's model_type"  # said when a checkpoint's config has none

    def __init__(self, config):
        super().__init__()
        self.tokenizer = None  # from_pretrained: the checkpoint's
        self.checkpoint_folder = None  # from_pretrained: the folder it read
        self.build(config)
        self.build_language_model(self.cfg)
        self.hook_audio_embeds = HookPoint()  # tower outputs [n_tokens, d_model], before the merge
        self.hook_image_embeds = HookPoint()
        self.hook_video_embeds = HookPoint()
        self.setup()

    def build(self, config) -> None:
        """Read `config` into `self.hf_config`, `self.cfg` (a `HookedAVConfig`) and `self.ids` (placeholder
        ids: `audio`, `image`, `video`, ...) and build the towers (`audio_encoder`, `vision_encoder`, ...)."""
        raise self._undefined("build", "read the config and build the towers")

    # ---- construction and checkpoints -------------------------------------------------------
    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32, device=None, **options):
        """Random weights, for tests and shape studies (`device="meta"` allocates nothing); `options` are the
        family's (e.g. video-SALMONN 2+'s `position_mode`).

            model = HookedQwen2_5Omni.from_config(hooked_av.load("toy").hf_config, device="meta")
        """
        cls.check_options(options)
        with torch.device(as_device(device)):  # a device this machine lacks: our message, not the driver's
            model = cls(config, **options)
        return model.to(dtype).eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device=None,
                        device_map=None, max_memory: dict | None = None,
                        offload_folder: str | os.PathLike | None = None, **options):
        """A hub id or a local checkpoint folder, in any layout the family's `key_converter` reads; its
        tokenizer (if any) at `model.tokenizer`, the folder at `model.checkpoint_folder`. `device_map`
        ("auto", "balanced", "sequential" or a dict of module -> device), `max_memory` and `offload_folder`
        place the model across devices through accelerate as HF does (`hooked_av.core.placement`);
        `device` puts it whole on one. `options`: the family's (e.g. `position_mode`).

            model = HookedQwen2_5Omni.from_pretrained(hooked_av.toy.weights_dir())
        """
        cls.check_options(options)
        folder = checkpoint.resolve(name_or_path)
        config = cls.read_checkpoint_config(folder)  # a config not the family's is refused before any weight file
        tokenizer = checkpoint.load_tokenizer(folder)  # before the weights: a bad tokenizer fails in a second
        tensors = checkpoint.iter_tensors(checkpoint.weight_files(folder))
        model = cls._build_and_load(config, tensors, str(folder), dtype, device, options, device_map=device_map,
                                    max_memory=max_memory, offload_folder=offload_folder)
        model.tokenizer, model.checkpoint_folder = tokenizer, folder
        return model

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype | None = None, device=None, **options):
        """From an instantiated reference model (e.g. HF's Thinker, or the whole Omni model): its `config`
        and `state_dict()`, in its dtype unless `dtype` is given.

            model = HookedQwen2_5Omni.from_hf(Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path))
        """
        cls.check_options(options)
        dtype = dtype or next(hf_model.parameters()).dtype
        return cls._build_and_load(hf_model.config, hf_model.state_dict().items(), type(hf_model).__name__, dtype,
                                   device, options)

    @classmethod
    def read_checkpoint_config(cls, folder):
        """config.json of checkpoint `folder` as the config `build` takes; one that is not the family's is
        refused here, before any weight file is read. Default: a `model_type` (`config_expects` says which)
        that transformers' `AutoConfig` reads (never remote code)."""
        from transformers import AutoConfig

        checkpoint.model_type(folder, checkpoint.read_config(folder), cls.config_expects)
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)

    def key_converter(self):
        """`convert(key, tensor) -> [(our name, tensor), ...]`, None for a key skipped on purpose (see
        `core.checkpoint.load_converted`); asked of the model being loaded, once per load."""
        raise self._undefined("key_converter", "map checkpoint keys to this model's parameter names")

    @classmethod
    def check_options(cls, options: dict) -> None:
        """The family's options are `__init__`'s keywords after `config`; any other is refused before any work."""
        known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "config")]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"{cls.__name__} takes no option(s) {unknown}; its options: {known or 'none'} (dtype, "
                            "device, device_map, max_memory and offload_folder apply to every family)")

    @classmethod
    def _build_and_load(cls, config, tensors, source: str, dtype, device, options: dict, **placement):
        built = {}

        def make():
            built["model"] = cls(config, **options)
            return built["model"]

        def convert(key, t):  # the converter is the built model's (Qwen3-Omni's knows its towers and experts)
            if "convert" not in built:
                built["convert"] = built["model"].key_converter()
            return built["convert"](key, t)

        return checkpoint.build_and_load(make, tensors, convert, source, dtype, device, **placement)

    # ---- media -> merged embeddings -----------------------------------------------------------
    @property
    def media_args(self) -> tuple[str, ...]:
        """The media inputs `encode`, `forward` and `generate` take: `read_media`'s keywords, less
        `use_audio_in_video` and the family's `encode_options`."""
        names = inspect.signature(self.read_media).parameters
        return tuple(n for n in names if n != "use_audio_in_video" and n not in self.encode_options)

    def read_media(self, use_audio_in_video: bool | None = None, input_features=None, feature_attention_mask=None,
                   audio_feature_lengths=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                   video_grid_thw=None, video_second_per_grid=None) -> MediaInputs:
        """The media inputs by the Qwen Omni processors' names -> `MediaInputs` (audio through `audio_frames`)."""
        audio = None
        if input_features is not None:
            audio = self.audio_frames(input_features, feature_attention_mask, audio_feature_lengths)
        return MediaInputs(audio, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, positions=dict(
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            audio_feature_lengths=None if audio is None else audio[1], video_second_per_grid=video_second_per_grid,
            use_audio_in_video=use_audio_in_video))

    def audio_frames(self, input_features, feature_attention_mask, audio_feature_lengths) -> tuple[Tensor, Tensor]:
        """(mel features `[n_mels, total_frames]`, valid frames per clip `[n_audio]`) for `get_audio_features`."""
        raise self._undefined("audio_frames", "read the audio inputs (or override read_media)")

    def audio_placeholders(self, audio) -> tuple[int, str]:
        """(placeholder tokens `audio` makes, where that count comes from: said in a mismatch's error)."""
        raise self._undefined("audio_placeholders", "count the audio tokens its audio inputs make")

    def check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, media: MediaInputs,
                     use_audio_in_video: bool | None) -> None:
        """Every mismatch between the prompt and its media, before any tower runs: placeholder counts
        (audio by `audio_placeholders`, images and videos by their grids) and patch rows per grid."""
        names, merge = self.placeholder_names, self.vision_encoder.merge
        audio = (None, None) if media.audio is None else self.audio_placeholders(media.audio)
        check_placeholders(input_ids, [
            (names["audio"], self.ids.audio, audio[0], "audio", audio[1]),
            (names["image"], self.ids.image, merged_tokens(media.image_grid_thw, merge), "image", "image_grid_thw"),
            (names["video"], self.ids.video, merged_tokens(media.video_grid_thw, merge), "video", "video_grid_thw"),
        ])
        check_patch_rows(media.pixel_values, media.image_grid_thw, media.pixel_values_videos, media.video_grid_thw)

    def get_placeholder_mask(self, input_ids: Tensor) -> dict[str, Tensor]:
        """Where each kind's tower outputs go: bool `[batch, pos]` for "audio", "image" and "video" (the
        placeholder ids in `self.ids`, the ones `check_inputs` counts)."""
        return {kind: input_ids == getattr(self.ids, kind) for kind in KINDS}

    def get_audio_features(self, audio) -> Tensor:
        """Audio tokens `[n_audio_tokens, d_model]` from `read_media`'s `audio` (default: `audio_encoder` on
        mel features `[n_mels, frames]` and frames per clip)."""
        features, lengths = audio
        return self.audio_encoder(features.to(self.dtype), lengths)

    def get_visual_features(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
                            ) -> tuple[Features | None, Features | None]:
        """`(image, video)`, each `(tokens [n, d_model], DeepStack features [k, n, d_model] or None)`, None
        when not given, from ONE call of `vision_encoder`: a tower hook fires once per forward and a cache
        holds every frame (HF's separate image and video calls would keep the videos' alone). Default: a
        tower without DeepStack."""
        image, video = self.vision_encoder.images_and_videos(
            self._in_dtype(pixel_values), image_grid_thw, self._in_dtype(pixel_values_videos), video_grid_thw)
        return tuple(None if t is None else (t, None) for t in (image, video))

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, use_audio_in_video: bool | None = None,
               text_parts: Tensor | None = None, media_items: Tensor | None = None, **media) -> dict:
        """Run the towers and merge: returns `inputs_embeds` `[batch, pos, d_model]`, `position_ids`
        `[3, batch, pos]`, `attention_mask`, `rope_deltas` `[batch, 1]`, `injections` where the blocks take
        them (DeepStack: one `[batch, pos, d_model]` per tapped layer, zero off the visual positions; None
        without images or videos) and the family's `MediaInputs.returned`; `model(**enc)` continues.
        `media`: `model.media_args` (and `encode_options`). `use_audio_in_video`: the layout of each video
        block in `input_ids` decides; a flag that disagrees is a ValueError raised before any tower runs.
        `text_parts` and `media_items` (`prepare`'s records of the user's text and of the prompt's item of each
        media token, for `token_map`) are accepted and not read.

            enc = model.encode(**model.prepare("Which instrument plays?", video="clip.mp4"))
        """
        unknown = set(media) - set(self.media_args) - set(self.encode_options)
        if unknown:
            raise TypeError(f"unexpected argument(s) {sorted(unknown)}; accepted media inputs: {list(self.media_args)}"
                            + (f", options: {list(self.encode_options)}" if self.encode_options else ""))
        check_finite_media(media)
        m = self.read_media(use_audio_in_video=use_audio_in_video, **media)
        self.check_inputs(input_ids, attention_mask, m, use_audio_in_video)
        position_ids, deltas = self.position_ids(input_ids, attention_mask, **m.positions)  # checks the ids' layout
        embeds = self.embed(input_ids)
        where = self.get_placeholder_mask(input_ids)
        if m.audio is not None:
            a = self.hook_audio_embeds(self.get_audio_features(m.audio))
            embeds = embeds.masked_scatter(where["audio"][..., None], a.to(embeds.device, embeds.dtype))
        injections = None
        visual = self.get_visual_features(m.pixel_values, m.image_grid_thw, m.pixel_values_videos, m.video_grid_thw)
        for kind, got, hook in zip(("image", "video"), visual, (self.hook_image_embeds, self.hook_video_embeds)):
            if got is None:
                continue
            tokens, deepstack = got
            embeds = embeds.masked_scatter(where[kind][..., None], hook(tokens).to(embeds.device, embeds.dtype))
            if deepstack is not None:  # HF scatters images and videos together; disjoint masks summed are the same
                dense = scatter_injections(where[kind], deepstack, embeds)
                injections = dense if injections is None else [a + b for a, b in zip(injections, dense)]
        out = {"inputs_embeds": embeds, "position_ids": position_ids, "attention_mask": attention_mask,
               "rope_deltas": deltas}
        if self.cfg.recipe.injection:
            out["injections"] = injections
        return out | m.returned

    def _in_dtype(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(self.dtype)

    # ---- forward and generation: written once -------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                inputs_embeds: Tensor | None = None, position_ids: Tensor | None = None,
                rope_deltas: Tensor | None = None, injections=None, use_audio_in_video: bool | None = None,
                return_type: str | None = "logits", logits_at=None, text_parts: Tensor | None = None,
                stop_at_layer: int | None = None, media_items: Tensor | None = None, **media) -> Tensor | None:
        """Logits `[batch, pos, vocab]` from input ids and media, or from `encode`'s outputs (with their
        `injections`). `return_type`: "logits", "resid" (after `ln_final`) or None; `logits_at` ("last",
        positions or None = all): only those positions are unembedded (HF's `logits_to_keep`), see
        `run_language_model`. `stop_at_layer` (as TransformerLens's): run the blocks before it only and
        return the residual stream entering it, `[batch, pos, d_model]`. `use_audio_in_video`, `text_parts` and
        `media_items` (accepted, not read), `media`: see `encode`.

            logits = model(**batch.inputs, logits_at="last")   # [batch, 1, vocab]
        """
        options = {k: media.pop(k) for k in self.encode_options if k in media}
        return self.route_forward(input_ids, attention_mask, inputs_embeds, position_ids, return_type, media,
                                  self.media_args, logits_at=logits_at, injections=injections,
                                  use_audio_in_video=use_audio_in_video, stop_at_layer=stop_at_layer, **options)

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None,
                 use_audio_in_video: bool | None = None, inputs_embeds: Tensor | None = None,
                 position_ids: Tensor | None = None, rope_deltas: Tensor | None = None, injections=None,
                 text_parts: Tensor | None = None, media_items: Tensor | None = None, **media) -> Tensor:
        """Greedy decoding with a KV cache, under whatever hooks are active; decoding step n sits at id
        `n_real_tokens + rope_deltas` on every row (HF's); injections (DeepStack) are added on the prefill
        (from `encode`, or passed with `inputs_embeds`). Returns the new tokens `[batch, n_new]` (finished
        rows are padded with their eos).

            new = model.generate(**batch.inputs, max_new_tokens=4)   # [batch, 4]
        """
        decode_args(max_new_tokens, eos_token_id, self.cfg.d_vocab)  # refused before the towers run
        if inputs_embeds is None:
            if injections is not None:
                raise ValueError("injections come from model.encode: pass them with inputs_embeds, not with input_ids")
            enc = self.encode(input_ids, attention_mask, use_audio_in_video=use_audio_in_video, **media)
            inputs_embeds, position_ids, rope_deltas = enc["inputs_embeds"], enc["position_ids"], enc["rope_deltas"]
            injections = enc.get("injections")
        return self.greedy_decode(inputs_embeds, position_ids, attention_mask, rope_deltas, max_new_tokens,
                                  eos_token_id, injections=injections)

    # ---- what only a family knows ---------------------------------------------------------------
    def position_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None, **media_positions):
        """M-RoPE ids `[3, batch, pos]` and rope deltas `[batch, 1]`, exact against the reference's
        `get_rope_index`; `encode` passes `read_media`'s `positions`."""
        raise self._undefined("position_ids", "compute the position ids of its inputs")

    def prepare(self, prompts, **kwargs) -> dict:
        """Model inputs from media and a question (or `hooked_av.inputs.Prompt`s), equal to the reference
        processor's, with `text_parts`; `model(**inputs)` runs them."""
        raise self._undefined("prepare", "build inputs from media and a question; pass the processor's outputs")

    def token_map(self, inputs: dict, tokenizer=None, chat=None):
        """The `hooked_av.inputs.TokenMap` of `inputs` (group, item, frame, time, ... per position)."""
        raise self._undefined("token_map", "map its inputs' positions to groups")

    @property
    def media_constants(self):
        """`hooked_av.inputs.media.MediaConstants` of the family's processor (image mean/std, silent log-mel
        level): what black frames and silence become as model inputs (`patching.corrupt`)."""
        raise self._undefined("media_constants", "say its processor's image mean/std and silent log-mel level")

    def _undefined(self, point: str, what: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__} does not define {point}; a family defines it to {what} "
                                   "(docs/architecture.md, 'What a family provides')")
