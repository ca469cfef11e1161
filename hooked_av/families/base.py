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
from hooked_av.core.loss import Output, check_labels, check_loss_options, lm_loss
from hooked_av.core.sampling import repeat_rows, sampler
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
        return model.to(dtype).eval()  # .to() keeps cfg.device / cfg.dtype current

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

        model = checkpoint.build_and_load(make, tensors, convert, source, dtype, device, **placement)
        model.sync_cfg()  # a device map places weights without .to()
        return model

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
    def forward(self, input_ids: Tensor | str | list[str] | None = None, attention_mask: Tensor | None = None, *,
                inputs_embeds: Tensor | None = None, position_ids: Tensor | None = None,
                rope_deltas: Tensor | None = None, injections=None, use_audio_in_video: bool | None = None,
                return_type: str | None = "logits", logits_at=None, text_parts: Tensor | None = None,
                stop_at_layer: int | None = None, start_at_layer: int | None = None, labels: Tensor | None = None,
                tokens: Tensor | None = None, loss_per_token: bool = False, loss_fn=None,
                media_items: Tensor | None = None, **media):
        """Logits `[batch, pos, vocab]` from input ids and media, from `encode`'s outputs (with their
        `injections`), or from text: a string (or a list of them) is a text-only prompt built by the family's own
        prompt builder (`model.prepare(text)`: its chat template, system prompt and generation prompt), which
        `model.to_tokens(text)` returns.

        return_type: "logits"; "loss" (HF's mean next-token cross-entropy over the labelled positions, nats);
          "both" (`Output(logits, loss)`); "resid" (after `ln_final`); None. The labels are `labels` (HF's:
          `[batch, pos]` token ids, -100 where not scored) or by default those of
          `hooked_av.inputs.labels.default_labels`: the answer `prepare(..., answer=)` appended, else the
          tokens after the generation prompt, else the user's text; never media, padding or the template.
          `loss_per_token`: `[batch, pos - 1]` (0 where not scored), as TransformerLens's; `loss_fn(logits,
          labels)` replaces the cross-entropy. With `inputs_embeds` the loss needs `labels` or `tokens` (the ids).
        logits_at ("last", positions or None = all): only those positions are unembedded (HF's
          `logits_to_keep`), see `run_language_model`.
        stop_at_layer (as TransformerLens's): run the blocks before it only and return the residual stream
          entering it, `[batch, pos, d_model]`.
        start_at_layer (as TransformerLens's): `input_ids` (or `inputs_embeds`) is the residual stream entering
          that block `[batch, pos, d_model]` (e.g. what `stop_at_layer` returned); the blocks from it on run
          (negative counts from the end; `n_layers`: only the final norm and unembedding). Its positions are
          `position_ids` (pass `model.encode(...)["position_ids"]` for a prompt with media, and its `injections`
          on Qwen3-Omni), else a text prompt's 0..pos-1 after the padding of `attention_mask`; `tokens` gives
          the ids for a loss.
        A left-padded batch of ids without `attention_mask` gets its mask from the leading pad tokens
        (TransformerLens's habit with `to_tokens` batches). `use_audio_in_video`, `text_parts` (read by the
        loss's default labels), `media_items` (accepted, not read), `media`: see `encode`.

            logits = model(**batch.inputs, logits_at="last")   # [batch, 1, vocab]
            loss = model("what colour is the shape ?", return_type="loss")
        """
        if is_text(input_ids):
            given = {k: v for k, v in dict(attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                          position_ids=position_ids, rope_deltas=rope_deltas, injections=injections,
                                          use_audio_in_video=use_audio_in_video, text_parts=text_parts,
                                          start_at_layer=start_at_layer, tokens=tokens).items() if v is not None}
            if given or media:
                raise ValueError(f"a string is a text-only prompt; {sorted(given) + sorted(media)} do not apply to it: "
                                 "for media build the inputs with model.prepare(question, video=..., audio=...)")
            return self.forward(**self.text_inputs(input_ids), return_type=return_type, logits_at=logits_at,
                                stop_at_layer=stop_at_layer, labels=labels, loss_per_token=loss_per_token,
                                loss_fn=loss_fn)
        loss = check_loss_options(return_type, labels, tokens, loss_per_token, loss_fn, logits_at)
        if loss and stop_at_layer is not None:
            raise ValueError("stop_at_layer returns the residual stream entering that block, which has no loss: "
                             "leave return_type at 'logits' (or drop stop_at_layer)")
        if start_at_layer is not None:
            residual = input_ids if inputs_embeds is None else inputs_embeds
            return self._from_layer(residual, input_ids, inputs_embeds, start_at_layer, attention_mask, position_ids,
                                    injections, return_type, stop_at_layer, labels, tokens, loss_per_token, loss_fn,
                                    logits_at, media, rope_deltas, use_audio_in_video)
        if isinstance(input_ids, Tensor) and input_ids.is_floating_point():
            raise ValueError(f"input_ids is a float tensor {tuple(input_ids.shape)}: a residual stream goes in with "
                             "start_at_layer=k (TransformerLens's), merged embeddings as inputs_embeds=")
        if attention_mask is None and isinstance(input_ids, Tensor):
            attention_mask = self.padding_mask(input_ids)
        if loss and labels is None:  # before the towers: a prompt with nothing to score is refused first
            ids = tokens if tokens is not None else input_ids
            if ids is None:
                raise ValueError("a loss from inputs_embeds needs the token ids: pass labels= (HF's) or tokens=")
            labels = self.loss_labels(ids, attention_mask, text_parts)
        elif loss:
            labels = check_labels(labels, input_ids if inputs_embeds is None else inputs_embeds)
        options = {k: media.pop(k) for k in self.encode_options if k in media}
        out = self.route_forward(input_ids, attention_mask, inputs_embeds, position_ids,
                                 "logits" if loss else return_type, media, self.media_args, logits_at=logits_at,
                                 injections=injections, use_audio_in_video=use_audio_in_video,
                                 stop_at_layer=stop_at_layer, **options)
        if not loss:
            return out
        value = lm_loss(out, labels, loss_per_token, loss_fn)
        return value if return_type == "loss" else Output(out, value)

    def _from_layer(self, residual, input_ids, inputs_embeds, start_at_layer, attention_mask, position_ids, injections,
                    return_type, stop_at_layer, labels, tokens, loss_per_token, loss_fn, logits_at, media, rope_deltas,
                    use_audio_in_video):
        """`forward(residual, start_at_layer=k)`: the blocks from k on over a given residual stream."""
        n = self.cfg.n_layers
        if isinstance(start_at_layer, bool) or not isinstance(start_at_layer, int) or not -n <= start_at_layer <= n:
            raise ValueError(f"start_at_layer {start_at_layer!r}: the model has {n} blocks; use 0..{n} (or -{n}..-1)")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("with start_at_layer pass the residual stream once: as the first argument or as inputs_embeds")
        if not isinstance(residual, Tensor) or not residual.is_floating_point() or residual.dim() != 3 \
                or residual.shape[-1] != self.cfg.d_model:
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"start_at_layer takes the residual stream [batch, pos, d_model={self.cfg.d_model}] "
                             f"(floats), got {got}")
        extra = sorted(k for k, v in dict(media, rope_deltas=rope_deltas, use_audio_in_video=use_audio_in_video).items()
                       if v is not None)
        if extra:
            raise ValueError(f"start_at_layer runs blocks over a given residual stream; {extra} do not apply (the "
                             "towers and the merge have run): pass position_ids (and injections) from model.encode")
        if tokens is not None and tuple(tokens.shape) != tuple(residual.shape[:2]):
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match the residual stream's [batch, pos] "
                             f"{tuple(residual.shape[:2])}")
        if position_ids is None:
            if tokens is not None and bool(self.media_mask(tokens).any()):
                raise ValueError("these tokens hold media placeholders, whose positions are not 0..pos-1: pass "
                                 "position_ids=model.encode(...)['position_ids'] with start_at_layer")
            position_ids = self.text_positions(residual, attention_mask)
        loss = return_type in ("loss", "both")
        if loss:
            if labels is None and tokens is None:
                raise ValueError("a loss from start_at_layer needs the token ids: pass tokens= (TransformerLens's) or labels=")
            labels = self.loss_labels(tokens, attention_mask) if labels is None else check_labels(labels, residual)
        out = self.run_language_model(residual, position_ids, attention_mask, "logits" if loss else return_type,
                                      injections=injections, logits_at=logits_at,
                                      start_layer=start_at_layer if start_at_layer >= 0 else start_at_layer + n,
                                      stop_at_layer=stop_at_layer, embed=False)
        if not loss:
            return out
        value = lm_loss(out, labels, loss_per_token, loss_fn)
        return value if return_type == "loss" else Output(out, value)

    @torch.no_grad()
    def generate(self, input_ids: Tensor | str | list[str] | None = None, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int = 16, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, num_return_sequences: int = 1,
                 stop_at_eos: bool | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, return_type: str = "input", verbose: bool = False,
                 use_audio_in_video: bool | None = None, inputs_embeds: Tensor | None = None,
                 position_ids: Tensor | None = None, rope_deltas: Tensor | None = None, injections=None,
                 text_parts: Tensor | None = None, media_items: Tensor | None = None, **media):
        """New tokens with a KV cache, under whatever hooks are active: greedy (`do_sample=False`, HF's
        default), or sampled as HF's `generate` samples (its temperature, top-k and top-p warpers in that
        order, then `torch.multinomial`), so the same seed and settings give HF's tokens. A string (or list)
        is a text-only prompt (see `forward`). Decoding step n sits at id `n_real_tokens + rope_deltas` on
        every row (HF's); injections (DeepStack) are added on the prefill.

        do_sample, temperature (> 0), top_k, top_p (HF's and TransformerLens's meanings; unset: no warper,
          as TransformerLens, where HF's default top_k is 50); `seed` (a fresh generator) or `generator`;
          without either the global RNG, as HF. They apply only with `do_sample=True`.
        num_return_sequences: each prompt's rows repeated that many times (HF's order); the towers run once.
        eos_token_id (an id or a list): rows stop there and are padded with `pad_token_id` (default: their
          eos); `stop_at_eos=True` without it stops at the tokenizer's eos, `False` never stops.
        return_type: "tokens" (the new ids `[batch * num_return_sequences, n_new]`), "str" (their text up to
          the first eos, special tokens dropped: a list, one per row), "input" (TransformerLens's default: "str"
          for a string prompt, a single string for one, else "tokens"). Unlike both HF and TransformerLens,
          the prompt is not repeated in the output. `verbose` is accepted (no progress bar is drawn).
        Any other argument is refused, with the supported ones, before a tower runs.

            new = model.generate(**batch.inputs, max_new_tokens=4)   # [batch, 4]
            text = model.generate("what colour is the shape ?", max_new_tokens=2, do_sample=True, seed=0)
        """
        unknown = set(media) - set(self.media_args) - set(self.encode_options)
        if unknown:
            raise TypeError(f"generate() got unsupported argument(s) {sorted(unknown)}; supported: {generate_args()}, "
                            f"media inputs {list(self.media_args)}" + (f", options {list(self.encode_options)}"
                                                                      if self.encode_options else ""))
        text_in, single = is_text(input_ids), isinstance(input_ids, str)
        if return_type not in ("input", "tokens", "str"):
            raise ValueError(f"return_type must be 'input', 'tokens' or 'str', got {return_type!r}")
        if return_type == "str" or (return_type == "input" and text_in):
            self._need_tokenizer()
        pick = sampler(do_sample, temperature, top_k, top_p, seed, generator)
        if not isinstance(num_return_sequences, int) or isinstance(num_return_sequences, bool) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
        eos = self._eos(stop_at_eos, eos_token_id)
        decode_args(max_new_tokens, eos, self.cfg.d_vocab)  # refused before the towers run
        if pad_token_id is not None:
            decode_args(1, pad_token_id, self.cfg.d_vocab)
        if text_in:
            given = {k: v for k, v in dict(attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                          position_ids=position_ids, rope_deltas=rope_deltas, injections=injections,
                                          use_audio_in_video=use_audio_in_video, text_parts=text_parts).items()
                     if v is not None}
            if given or media:
                raise ValueError(f"a string is a text-only prompt; {sorted(given) + sorted(media)} do not apply to it: "
                                 "for media build the inputs with model.prepare(question, video=..., audio=...)")
            inputs = self.text_inputs(input_ids)
            input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
            inputs.pop("text_parts", None)
            use_audio_in_video = inputs.pop("use_audio_in_video", None)
            media = inputs
        if inputs_embeds is None:
            if injections is not None:
                raise ValueError("injections come from model.encode: pass them with inputs_embeds, not with input_ids")
            if attention_mask is None and isinstance(input_ids, Tensor):
                attention_mask = self.padding_mask(input_ids)
            enc = self.encode(input_ids, attention_mask, use_audio_in_video=use_audio_in_video, **media)
            inputs_embeds, position_ids, rope_deltas = enc["inputs_embeds"], enc["position_ids"], enc["rope_deltas"]
            injections = enc.get("injections")
        if num_return_sequences > 1:
            inputs_embeds, position_ids, attention_mask, rope_deltas, injections = repeat_rows(
                num_return_sequences, inputs_embeds, position_ids, attention_mask, rope_deltas, injections)
        new = self.greedy_decode(inputs_embeds, position_ids, attention_mask, rope_deltas, max_new_tokens,
                                 eos, injections=injections, pick=pick, pad_token_id=pad_token_id)
        if return_type == "tokens" or (return_type == "input" and not text_in):
            return new
        texts = self.decode_new(new, eos)
        return texts[0] if return_type == "input" and single and num_return_sequences == 1 else texts

    # ---- text, labels and decoding: what forward and generate share -----------------------------
    def text_inputs(self, text: str | list[str]) -> dict:
        """The model inputs of a text-only prompt (a string, or a list: left-padded rows), as the family's own
        prompt builder makes them (`prepare`: chat template, system prompt, generation prompt, `text_parts`).

            inputs = model.text_inputs("what colour is the shape ?")   # what model("...") runs
        """
        from hooked_av.inputs.prompt import Prompt

        self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given: pass a string or a non-empty list of strings")
        return self.prepare(texts[0] if len(texts) == 1 else [Prompt(t) for t in texts])

    def padding_mask(self, input_ids: Tensor) -> Tensor | None:
        """The attention mask `[batch, pos]` of left-padded ids (0 on each row's leading pad tokens), None when
        no row starts with the tokenizer's pad token (or there is no tokenizer): TransformerLens's inference
        for a `to_tokens` batch passed without a mask."""
        pad = getattr(getattr(self, "tokenizer", None), "pad_token_id", None)
        if pad is None or input_ids.dim() != 2 or not bool((input_ids[:, 0] == pad).any()):
            return None
        mask = (~(input_ids == pad).long().cumprod(-1).bool()).long()
        if not bool(mask.any(-1).all()):
            raise ValueError("a row of input_ids is all padding; drop it or pass attention_mask")
        return mask

    def media_token_ids(self) -> list[int]:
        """Ids of the media placeholders and their start / end tokens (never scored by a loss)."""
        names = ("audio", "image", "video", "audio_start", "audio_end", "vision_start", "vision_end")
        return sorted({int(v) for v in (getattr(self.ids, n, None) for n in names) if v is not None})

    def media_mask(self, input_ids: Tensor) -> Tensor:
        """bool `[batch, pos]`: media placeholders and their start / end tokens."""
        return torch.isin(input_ids, torch.tensor(self.media_token_ids(), device=input_ids.device))

    def loss_labels(self, input_ids: Tensor, attention_mask: Tensor | None = None, text_parts: Tensor | None = None) -> Tensor:
        """The labels `return_type="loss"` scores by default, `[batch, pos]` (HF's: ids, -100 elsewhere; the
        rules: `hooked_av.inputs.labels`); pass them to HF's model as `labels=` for the same loss.

            labels = model.loss_labels(inputs["input_ids"], inputs["attention_mask"], inputs.get("text_parts"))
        """
        from hooked_av.inputs.chat import ChatTokens, chat_tokens
        from hooked_av.inputs.labels import default_labels

        tok = getattr(self, "tokenizer", None)
        try:
            chat = chat_tokens(tok, None, self.cfg.d_vocab, self.ids.vision_start)
        except ValueError:  # a tokenizer without ChatML tokens: the text is raw
            chat = None
        assert chat is None or isinstance(chat, ChatTokens)
        return default_labels(input_ids, attention_mask, text_parts, chat, self.media_token_ids())

    def _eos(self, stop_at_eos: bool | None, eos_token_id) -> int | list[int] | None:
        if stop_at_eos is False:
            if eos_token_id is not None:
                raise ValueError("stop_at_eos=False never stops, so eos_token_id does not apply: pass one of them")
            return None
        if stop_at_eos and eos_token_id is None:
            eos = getattr(self._need_tokenizer(), "eos_token_id", None)
            if eos is None:
                raise ValueError("stop_at_eos=True: the tokenizer has no eos token; pass eos_token_id")
            return eos
        return eos_token_id

    def decode_new(self, new: Tensor, eos) -> list[str]:
        """Each row's new tokens `[batch, n]` as text, up to its first eos, special tokens dropped."""
        tok = self._need_tokenizer()
        stop = {int(eos)} if isinstance(eos, int) else {int(e) for e in eos or []}
        out = []
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            out.append(tok.decode(row[:cut], skip_special_tokens=True))
        return out

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


def is_text(x) -> bool:
    """A prompt given as text: a string or a non-empty list of strings."""
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, str) for t in x))


def generate_args() -> list[str]:
    """The keywords `generate` takes (besides media inputs)."""
    return [p for p in inspect.signature(HookedAVFamily.generate).parameters if p not in ("self", "media")]
