"""Processor glue for Qwen2.5-Omni: the HF components (Whisper features, Qwen2-VL image and video
processors) and a tokenizer, loaded from a folder / hub id that holds them, or assembled offline."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hooked_av.inputs.media import MediaConstants, media_constants

# Qwen2_5OmniProcessor's class-level defaults (its video size and fps are not in the released configs),
# which are qwen-omni-utils' VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS and FPS
OMNI_VIDEO_SIZE = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
OMNI_FPS = 2.0
# qwen-omni-utils' VIDEO_TOTAL_PIXELS: 90% of a 128k-token context, shared by a video's frames
OMNI_VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


@dataclass
class OmniParts:
    """What `prepare` needs: `tokenizer`, `feature_extractor` (WhisperFeatureExtractor),
    `image_processor`, `video_processor` (Qwen2-VL), the video sampling rate `fps` (frames per
    second), the video resize bounds in pixels per frame and the pixel budget of a whole video
    (`video_max_pixels`)."""

    tokenizer: object
    feature_extractor: object
    image_processor: object
    video_processor: object
    fps: float = OMNI_FPS
    video_size: dict = field(default_factory=lambda: dict(OMNI_VIDEO_SIZE))
    video_total_pixels: float = OMNI_VIDEO_TOTAL_PIXELS
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2.0


def video_max_pixels(parts: OmniParts, n_frames: int) -> int:
    """The most pixels one frame of an `n_frames` video is resized to: qwen-omni-utils' per-frame cap
    (its `fetch_video`), an even share of `video_total_pixels` per 2 frames (one temporal grid step),
    within `video_size` and never below 1.05x its smallest frame, floored to whole pixels (the
    processor takes integers; the resized size is the same). It binds past 300 frames (a 150 s clip
    at 2 fps). The stock Qwen2-VL video processor applies a variant only when asked
    (`cap_pixels_per_frame`); `prepare` applies this rule itself."""
    lo, hi = parts.video_size["shortest_edge"], parts.video_size["longest_edge"]
    return int(max(min(hi, parts.video_total_pixels / n_frames * 2), int(lo * 1.05)))


def has_processor(folder) -> bool:
    return folder is not None and Path(folder).is_dir() and (Path(folder) / "preprocessor_config.json").exists()


def load_omni_parts(name_or_path: str | os.PathLike, tokenizer=None) -> OmniParts:
    """From a local folder or hub id holding the processor configs (and a tokenizer, unless given)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    src = str(name_or_path)
    try:
        fe = WhisperFeatureExtractor.from_pretrained(src)
        ip = Qwen2VLImageProcessor.from_pretrained(src)
        try:
            vp = Qwen2VLVideoProcessor.from_pretrained(src)
        except (OSError, ValueError):  # older checkpoints keep the video settings in the image config
            vp = Qwen2VLVideoProcessor(**{k: v for k, v in ip.to_dict().items() if k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")})
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise OSError(f"could not load the Qwen2.5-Omni processor from {src!r} ({e}); offline, build one with assemble_omni_parts(tokenizer)") from e
    return OmniParts(tok, fe, ip, vp)


def assemble_omni_parts(tokenizer, num_mel_bins: int = 128, chunk_length: int = 300, **video_kwargs) -> OmniParts:
    """Offline: the released configuration's components (128 mel bins, audio padded to 300 s, Qwen2-VL
    defaults for images and video) around a given tokenizer. Tiny test models pass their own
    `num_mel_bins` and may shorten `chunk_length` (seconds of padding)."""
    if tokenizer is None:
        raise ValueError(
            "no tokenizer: load the model from a folder that has one, set model.tokenizer, or pass "
            "tokenizer=... (the Qwen2/2.5 tokenizer; see docs/models.md for building it offline)"
        )
    return OmniParts(tokenizer, *stock_components(num_mel_bins, chunk_length, **video_kwargs))


def stock_components(num_mel_bins: int = 128, chunk_length: int = 300, **video_kwargs) -> tuple:
    """`(feature_extractor, image_processor, video_processor)` of the released configuration:
    `WhisperFeatureExtractor(num_mel_bins, 16 kHz, hop 160, chunk_length s)` and the stock Qwen2-VL
    image and video processors (what `Qwen2_5OmniProcessor` holds)."""
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    fe = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=chunk_length, n_fft=400)
    return fe, Qwen2VLImageProcessor(), Qwen2VLVideoProcessor(**video_kwargs)


def model_media_constants(model) -> MediaConstants:
    """Image mean/std and the silent log-mel level of a `HookedQwen2_5Omni`'s processor: the parts its
    `prepare` uses (`model.processor_parts`, else those `parts_for_model` finds for its tokenizer),
    else the stock components sized by its config."""
    parts = getattr(model, "processor_parts", None)
    if parts is None and getattr(model, "tokenizer", None) is not None:
        parts = parts_for_model(model)
    if parts is None:
        fe, ip, _ = stock_components(model.hf_config.audio_config.num_mel_bins)
        return media_constants(ip, fe)
    return media_constants(parts.image_processor, parts.feature_extractor)


def parts_for_model(model, tokenizer=None) -> OmniParts:
    """The parts for a `HookedQwen2_5Omni`: loaded from the folder its tokenizer came from when that
    folder holds a processor, else assembled from components sized by the model's config."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    folder = getattr(tok, "name_or_path", None)
    if has_processor(folder):
        return load_omni_parts(folder, tokenizer=tok)
    parts = assemble_omni_parts(tok, num_mel_bins=model.hf_config.audio_config.num_mel_bins)
    parts.position_id_per_seconds = model.position_id_per_seconds
    parts.seconds_per_chunk = model.seconds_per_chunk
    return parts


def hf_processor(parts: OmniParts, chat_template: str | None = None):
    """The stock `Qwen2_5OmniProcessor` over the same components (for cross-checks). The tokenizer
    must name its multimodal tokens (`image_token`, `audio_token`, `video_token`, bos/eos)."""
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor(
        image_processor=parts.image_processor, video_processor=parts.video_processor,
        feature_extractor=parts.feature_extractor, tokenizer=parts.tokenizer, chat_template=chat_template,
    )
