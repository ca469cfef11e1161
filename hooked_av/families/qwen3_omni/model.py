"""`HookedQwen3Omni`: the Qwen3-Omni Thinker (audio encoder + Qwen3-VL vision tower with DeepStack + Qwen3 MoE
decoder) with a hook point on every residual stream, attention pattern, router and expert.

    model = HookedQwen3Omni.from_pretrained("Qwen/Qwen3-Omni-30B-A3B-Instruct", dtype=torch.bfloat16, device="cuda")
    logits = model(**processor_outputs)                                   # [batch, pos, vocab]
    enc = model.encode(**processor_outputs)                               # towers once (DeepStack in enc) ...
    logits = model(**enc)                                                 # ... and sweep from here

Anchor: transformers 5.24 `qwen3_omni_moe` (`Qwen3OmniMoeThinkerForConditionalGeneration`). The towers are
`hooked_av.encoders.qwen3_omni_audio` and `hooked_av.encoders.qwen3_vl_vision`, each with its key table.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_av.core import checkpoint
from hooked_av.core.base import HookedAVModel
from hooked_av.core.language_model import MRoPELanguageModel, decode_args, scatter_injections
from hooked_av.core.moe import experts_without_hooks, lazy_expert_hooks
from hooked_av.core.placeholders import check_patch_rows, check_placeholders, merged_tokens
from hooked_av.families.qwen3_omni.layout import audio_token_counts, token_ids
from hooked_av.families.qwen3_omni.positions import qwen3_omni_position_ids
from hooked_av.families.qwen3_omni.weights import Converter, lm_config, thinker_config

MEDIA_ARGS = (
    "input_features", "feature_attention_mask", "audio_feature_lengths", "pixel_values", "image_grid_thw",
    "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
)


def build_towers(tc) -> dict:
    """`{"audio": (module, key_map), "vision": (module, key_map)}`: Qwen3-Omni's audio encoder and the
    Qwen3-VL vision tower with their checkpoint key maps."""
    from hooked_av.encoders import qwen3_omni_audio as audio
    from hooked_av.encoders import qwen3_vl_vision as vision

    return {
        "audio": (audio.Qwen3OmniAudioEncoder(**audio.audio_settings(tc.audio_config)), audio.convert_audio_key),
        "vision": (vision.Qwen3VisionEncoder(**vision.vision_settings(tc.vision_config)), vision.convert_vision_key),
    }


class HookedQwen3Omni(MRoPELanguageModel, HookedAVModel):
    """Hook names: `hook_audio_embeds` / `hook_image_embeds` / `hook_video_embeds` (tower outputs
    `[n_tokens, d_model]`), `hook_embed` (merged embeddings `[batch, pos, d_model]`), `blocks.{l}.*`
    (with `attn.q_norm.*` / `attn.k_norm.*`, `mlp.hook_router_logits` / `hook_router_weights` /
    `hook_router_choice` and `mlp.experts.{e}.hook_in` / `hook_out` on sparse layers (built when first
    named, `core/moe.py`), and
    `hook_injection`, DeepStack's addition after blocks 0..k-1), `ln_final.*`, `audio_encoder.*`,
    `vision_encoder.*` (see docs/architecture.md)."""

    def __init__(self, config):
        super().__init__()
        tc = thinker_config(config)
        self.hf_config = tc
        self.cfg = c = lm_config(tc)
        self.ids = token_ids(tc)
        self.position_id_per_seconds = tc.position_id_per_seconds
        self.n_window = tc.audio_config.n_window
        self.merge = tc.vision_config.spatial_merge_size
        self.tokenizer = None
        self.checkpoint_folder = None
        towers = build_towers(tc)
        self._key_maps = {k: v[1] for k, v in towers.items()}
        self.audio_encoder, self.vision_encoder = towers["audio"][0], towers["vision"][0]
        with experts_without_hooks():  # 48 x 128 experts' hook points are built when asked for (core/moe.py)
            self.build_language_model(c)
        self.hook_audio_embeds = HookPoint()
        self.hook_image_embeds = HookPoint()
        self.hook_video_embeds = HookPoint()
        self.setup()
        lazy_expert_hooks(self)

    def converter(self) -> Converter:
        """The checkpoint key converter for this model (experts fused, the towers' key tables)."""
        return Converter(self.cfg.recipe.moe.n_experts if self.cfg.recipe.moe else 0, self._key_maps)

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32, device=None) -> "HookedQwen3Omni":
        """Random weights, for tests and shape studies (`device="meta"` allocates nothing)."""
        with torch.device(device or "cpu"):
            model = cls(config)
        return model.to(dtype).eval()

    @classmethod
    def _load(cls, config, tensors, source: str, dtype, device, **placement) -> "HookedQwen3Omni":
        holder = {}

        def make():
            holder["m"] = cls(config)
            return holder["m"]

        def convert(key, t):  # the converter belongs to the model being built (it knows its towers)
            if "c" not in holder:
                holder["c"] = holder["m"].converter()
            return holder["c"](key, t)

        return checkpoint.build_and_load(make, tensors, convert, source, dtype, device, **placement)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device=None, device_map=None, max_memory: dict | None = None,
                        offload_folder: str | os.PathLike | None = None) -> "HookedQwen3Omni":
        """A hub id or a local HF checkpoint folder: the released layout (`thinker.*` inside the whole
        Qwen3-Omni model, with the Talker's keys) or a saved Thinker (`model.*`), see `weights.py`.
        `device_map` ("auto", "balanced", "sequential" or a dict of module -> device), `max_memory` and
        `offload_folder` place the model across devices through accelerate as HF does (see
        `hooked_av.core.placement`); `device` puts it whole on one."""
        from transformers import AutoConfig

        folder = checkpoint.resolve(name_or_path)
        checkpoint.model_type(folder, checkpoint.read_config(folder),
                              "a Qwen3-Omni config has 'qwen3_omni_moe' (a bare Thinker: 'qwen3_omni_moe_thinker')")
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        tokenizer = checkpoint.load_tokenizer(folder)  # before the weights: a bad tokenizer fails in a second
        tensors = checkpoint.iter_tensors(checkpoint.weight_files(folder))
        model = cls._load(config, tensors, str(folder), dtype, device, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder)
        model.tokenizer = tokenizer
        model.checkpoint_folder = folder
        return model

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype | None = None, device=None) -> "HookedQwen3Omni":
        """From an instantiated HF `Qwen3OmniMoeThinkerForConditionalGeneration` (or the whole model)."""
        dtype = dtype or next(hf_model.parameters()).dtype
        return cls._load(hf_model.config, hf_model.state_dict().items(), type(hf_model).__name__, dtype, device)

    @property
    def media_constants(self):
        """`hooked_av.inputs.media.MediaConstants` of this model's processor (Qwen3-VL's mean = std = 0.5
        unless the checkpoint's preprocessor config says otherwise; the silent log-mel level)."""
        from hooked_av.families.qwen3_omni.processor import model_media_constants

        return model_media_constants(self, self.checkpoint_folder)

    # ---- inputs -----------------------------------------------------------------------------
    def _audio_frames(self, input_features, feature_attention_mask, audio_feature_lengths):
        """(mel features `[n_mels, total_frames]`, frames per clip `[n_audio]`), as HF's `get_audio_features`."""
        if feature_attention_mask is None:
            raise ValueError("audio inputs need feature_attention_mask (valid mel frames per clip), as the "
                             "processor returns it; HF's Thinker cannot place audio without it either")
        lens = feature_attention_mask.sum(1)
        feats = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        return feats, lens

    def _check_inputs(self, input_ids, audio_lens, image_grid_thw, video_grid_thw, pixel_values, pixel_values_videos):
        m = self.merge
        check_placeholders(input_ids, [
            ("audio", self.ids.audio, None if audio_lens is None else sum(audio_token_counts(audio_lens, self.n_window)),
             "audio", "the audio encoder's audio_token_count of each clip's mel frames"),
            ("image", self.ids.image, merged_tokens(image_grid_thw, m), "image", "image_grid_thw"),
            ("video", self.ids.video, merged_tokens(video_grid_thw, m), "video", "video_grid_thw"),
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
    ) -> dict:
        """Run the towers and merge: returns `inputs_embeds` `[batch, pos, d_model]`, `position_ids` fp32
        `[3, batch, pos]`, `attention_mask`, `rope_deltas` `[batch, 1]` and `injections` (DeepStack: one
        `[batch, pos, d_model]` per tapped layer, zero off the image/video positions; None without
        images or videos); `model(**enc)` continues. `use_audio_in_video`: the layout of each video block
        in `input_ids` decides; a flag that disagrees is a ValueError raised before any tower runs.
        `text_parts` (`prepare`'s record of the user's text, for `token_map`) is accepted and not read."""
        audio = None
        if input_features is not None:
            audio = self._audio_frames(input_features, feature_attention_mask, audio_feature_lengths)
        self._check_inputs(input_ids, None if audio is None else audio[1], image_grid_thw, video_grid_thw,
                           pixel_values, pixel_values_videos)
        position_ids, deltas = self.position_ids(  # before the towers: checks the ids' layout
            input_ids, attention_mask, image_grid_thw, video_grid_thw, None if audio is None else audio[1],
            video_second_per_grid, use_audio_in_video)
        embeds = self.embed(input_ids)
        if audio is not None:
            a = self.hook_audio_embeds(self.audio_encoder(audio[0].to(self.dtype), audio[1]))
            embeds = embeds.masked_scatter((input_ids == self.ids.audio)[..., None], a.to(embeds.device, embeds.dtype))
        injections = None
        if pixel_values is not None or pixel_values_videos is not None:
            embeds, injections = self._merge_visual(input_ids, embeds, pixel_values, image_grid_thw,
                                                    pixel_values_videos, video_grid_thw)
        return {"inputs_embeds": embeds, "position_ids": position_ids, "attention_mask": attention_mask,
                "rope_deltas": deltas, "injections": injections}

    def _merge_visual(self, input_ids, embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Scatter image and video tokens, and their DeepStack features as dense per-layer injections (HF
        scatters images and videos into one tensor in position order; disjoint masks summed are the same)."""
        image, video = self.vision_encoder.images_and_videos(  # each (tokens, deepstack [k, n, d]) or None
            None if pixel_values is None else pixel_values.to(self.dtype), image_grid_thw,
            None if pixel_values_videos is None else pixel_values_videos.to(self.dtype), video_grid_thw)
        injections = None
        for got, token, hook in ((image, self.ids.image, self.hook_image_embeds),
                                 (video, self.ids.video, self.hook_video_embeds)):
            if got is None:
                continue
            feats, deep = got
            where = input_ids == token
            embeds = embeds.masked_scatter(where[..., None], hook(feats).to(embeds.device, embeds.dtype))
            dense = scatter_injections(where, deep, embeds)
            injections = dense if injections is None else [a + b for a, b in zip(injections, dense)]
        return embeds, injections

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                     audio_feature_lengths=None, video_second_per_grid=None, use_audio_in_video=None):
        """Position ids fp32 `[3, batch, pos]` and rope deltas `[batch, 1]`, equal to HF's `get_rope_index`
        (`positions.py`); `audio_feature_lengths`: valid mel frames per clip."""
        counts = None if audio_feature_lengths is None else audio_token_counts(audio_feature_lengths, self.n_window)
        return qwen3_omni_position_ids(
            input_ids, attention_mask, self.ids, image_grid_thw, video_grid_thw, counts, video_second_per_grid,
            use_audio_in_video, self.merge, self.position_id_per_seconds)

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        rope_deltas: Tensor | None = None,
        injections=None,
        use_audio_in_video: bool | None = None,
        return_type: str | None = "logits",
        logits_at=None,
        text_parts: Tensor | None = None,
        **media,
    ) -> Tensor:
        """Logits `[batch, pos, vocab]` from processor outputs, or from `encode`'s outputs (with their
        `injections`). `return_type`: "logits", "resid" (after `ln_final`) or None; `logits_at`: see
        `run_language_model`. `use_audio_in_video`, `text_parts` (accepted, not read): see `encode`."""
        return self.route_forward(input_ids, attention_mask, inputs_embeds, position_ids, return_type, media,
                                  MEDIA_ARGS, logits_at=logits_at, injections=injections,
                                  use_audio_in_video=use_audio_in_video)

    # ---- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
        max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None,
        use_audio_in_video: bool | None = None, inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None, rope_deltas: Tensor | None = None, injections=None,
        text_parts: Tensor | None = None, **media,
    ) -> Tensor:
        """Greedy decoding with a KV cache, under whatever hooks are active; decoding step n sits at id
        `n_real_tokens + rope_deltas` on every row (HF's); DeepStack's injections are added on the prefill
        (from `encode`, or passed with `inputs_embeds`). Returns the new tokens `[batch, n_new]`."""
        decode_args(max_new_tokens, eos_token_id, self.cfg.d_vocab)  # refused before the towers run
        if inputs_embeds is None:
            if injections is not None:
                raise ValueError("injections come from model.encode: pass them with inputs_embeds, not with input_ids")
            enc = self.encode(input_ids, attention_mask, use_audio_in_video=use_audio_in_video, **media)
            inputs_embeds, position_ids, rope_deltas = enc["inputs_embeds"], enc["position_ids"], enc["rope_deltas"]
            injections = enc["injections"]
        return self.greedy_decode(inputs_embeds, position_ids, attention_mask, rope_deltas, max_new_tokens, eos_token_id,
                                  injections=injections)

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
