"""Processor glue for Qwen3-Omni: the HF components `Qwen3OmniMoeProcessor` holds (Whisper features at
16 kHz, Qwen2-VL image and video processors with Qwen3-VL's patch 16 and mean = std = 0.5) around a
tokenizer, loaded from a folder that holds them or assembled offline, and the media constants they imply.

Anchors: transformers 5.24 `processing_qwen3_omni_moe.py` (`Qwen3OmniMoeProcessor`: video size 128*32*32 to
768*32*32 px per frame, fps 1.0 when not passed, audio padded to the longest clip); the released
checkpoints' `preprocessor_config.json` for patch 16 and mean = std = 0.5 (docs/models.md section 4).
"""

from __future__ import annotations

import os

from hooked_av.families.qwen2_5_omni.processor import OmniParts, has_processor, load_omni_parts
from hooked_av.inputs.media import MediaConstants, media_constants

QWEN3_VIDEO_SIZE = {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}
QWEN3_FPS = 1.0  # Qwen3OmniMoeProcessor's fps when none is passed (video_second_per_grid = 2 / fps)
QWEN3_VL_NORM = (0.5, 0.5, 0.5)  # image_mean = image_std in Qwen3-VL / Qwen3-Omni preprocessor configs
QWEN3_PATCH = 16


def stock_components(num_mel_bins: int = 128, patch_size: int = QWEN3_PATCH, merge_size: int = 2,
                     temporal_patch_size: int = 2) -> tuple:
    """`(feature_extractor, image_processor, video_processor)` as the released preprocessor config sets
    them: `WhisperFeatureExtractor(num_mel_bins, 16 kHz, hop 160)` padded to the longest clip (so no 300 s
    chunk), Qwen2-VL processors with Qwen3-VL's patch and mean = std = 0.5."""
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    fe = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000, hop_length=160, n_fft=400)
    vision = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                  image_mean=list(QWEN3_VL_NORM), image_std=list(QWEN3_VL_NORM))
    return fe, Qwen2VLImageProcessor(**vision), Qwen2VLVideoProcessor(size=dict(QWEN3_VIDEO_SIZE), **vision)


def components_for_config(tc) -> tuple:
    """`stock_components` sized by a Thinker config (mel bins, patch, merge, temporal patch)."""
    v = tc.vision_config
    return stock_components(tc.audio_config.num_mel_bins, v.patch_size, v.spatial_merge_size, v.temporal_patch_size)


def assemble_parts(tokenizer, tc) -> OmniParts:
    """Offline: the components of `components_for_config(tc)` around `tokenizer`, with the processor's
    fps and video size and the config's `position_id_per_seconds` (the processor's class value, 13.0,
    must equal the model's for the layout and the ids to agree)."""
    if tokenizer is None:
        raise ValueError("no tokenizer: load the model from a folder that has one, set model.tokenizer, or pass "
                         "tokenizer=... (the Qwen3-Omni tokenizer)")
    return OmniParts(tokenizer, *components_for_config(tc), fps=QWEN3_FPS, video_size=dict(QWEN3_VIDEO_SIZE),
                     position_id_per_seconds=tc.position_id_per_seconds)


def parts_for_model(model, tokenizer=None) -> OmniParts:
    """The parts for a `HookedQwen3Omni`: loaded from its tokenizer's folder when that holds a
    `preprocessor_config.json` (then its own mean/std are used), else assembled from its config."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    folder = getattr(tok, "name_or_path", None)
    if has_processor(folder):
        parts = load_omni_parts(folder, tokenizer=tok)
        parts.fps, parts.video_size = QWEN3_FPS, dict(QWEN3_VIDEO_SIZE)
        parts.position_id_per_seconds = model.position_id_per_seconds
        return parts
    return assemble_parts(tok, model.hf_config)


def model_media_constants(model, folder: str | os.PathLike | None = None) -> MediaConstants:
    """Image mean/std and silent log-mel level of a `HookedQwen3Omni`'s processor: its `processor_parts`,
    else the checkpoint folder's preprocessor config, else the stock components sized by its config."""
    parts = getattr(model, "processor_parts", None)
    if parts is None and has_processor(folder):
        from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor

        return media_constants(Qwen2VLImageProcessor.from_pretrained(str(folder)),
                               WhisperFeatureExtractor.from_pretrained(str(folder)))
    if parts is None:
        fe, ip, _ = components_for_config(model.hf_config)
        return media_constants(ip, fe)
    return media_constants(parts.image_processor, parts.feature_extractor)

