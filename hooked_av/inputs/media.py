"""Media decoding: video files (frames and audio track, PyAV), audio files, images and numpy arrays,
checked and normalised to what the processors take: frames `[T, H, W, 3]` uint8 sampled at `fps`,
mono float32 waveforms at 16 kHz."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000  # every audio front end here (Whisper features) runs at 16 kHz


@dataclass
class Audio:
    """A mono waveform, float32 `[n_samples]` at 16 kHz, every sample finite."""

    waveform: np.ndarray

    def __post_init__(self):
        check_finite(self.waveform)

    @property
    def seconds(self) -> float:
        return len(self.waveform) / SAMPLE_RATE


@dataclass
class Video:
    """Frames `[T, H, W, 3]` uint8 sampled at `fps` frames per second, and the audio track if any."""

    frames: np.ndarray
    fps: float
    audio: Audio | None = None


@dataclass(frozen=True)
class MediaConstants:
    """What a family's processor does to the media, as numbers: `image_mean` / `image_std` per
    channel (pixels in [0, 1] become `(x - mean) / std`) and `silent_log_mel`, the value every
    log-mel feature of an all-zero waveform takes."""

    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    silent_log_mel: float


def media_constants(image_processor, feature_extractor) -> MediaConstants:
    """Read from a family's own components: the image processor's `image_mean` / `image_std`, and
    the feature extractor run on 0.1 s of silence (Whisper: `log10(1e-10) = -10`, clamped at max - 8,
    `(x + 4) / 4` = -1.5), which must come out as one value."""
    silent = feature_extractor(
        np.zeros(SAMPLE_RATE // 10, dtype=np.float32), sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np"
    )["input_features"]
    levels = np.unique(silent)
    if len(levels) != 1:
        raise ValueError(f"{type(feature_extractor).__name__} maps silence to {len(levels)} different values, not one level")
    return MediaConstants(
        tuple(float(x) for x in image_processor.image_mean), tuple(float(x) for x in image_processor.image_std),
        float(levels[0]),
    )


def stock_media_constants() -> MediaConstants:
    """`media_constants` of the stock transformers Qwen2-VL image processor and Whisper feature
    extractor, the front end both Qwen2.5-Omni and video-SALMONN 2+ ship with: the default where no
    model is at hand (a model's own are `model.media_constants`)."""
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor

    return media_constants(Qwen2VLImageProcessor(), WhisperFeatureExtractor())


def check_frames(frames, what: str = "frames") -> np.ndarray:
    """Frames as a uint8 array `[T, H, W, 3]`; a clear error otherwise."""
    arr = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"{what} must be an array [T, H, W, 3] (RGB, channels last, T >= 1); got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 (0-255); got {arr.dtype}. Convert floats in [0, 1] with "
            "(frames * 255).round().astype(np.uint8)"
        )
    return arr


def check_finite(waveform) -> None:
    """A NaN or inf sample would turn every logit into NaN downstream: refuse it here."""
    bad = ~np.isfinite(np.asarray(waveform))
    if bad.any():
        raise ValueError(
            f"the waveform has {int(bad.sum())} non-finite sample(s) (NaN or inf), the first at sample "
            f"{int(np.argmax(bad))}; replace them (np.nan_to_num) or cut them out before passing the audio"
        )


def resample(waveform, sample_rate: int) -> Audio:
    """A float waveform `[n]` or `[n, channels]`/`[channels, n]` at any rate -> mono 16 kHz `Audio`."""
    if not (isinstance(sample_rate, numbers.Real) and math.isfinite(sample_rate) and sample_rate > 0):
        raise ValueError(f"the sample rate must be a positive, finite number of samples per second; got {sample_rate!r}")
    w = np.asarray(waveform.numpy() if hasattr(waveform, "numpy") else waveform)
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"a waveform must be float (samples in [-1, 1]); got {w.dtype}")
    if w.ndim == 2:  # average channels, whichever axis is the short one
        w = w.mean(axis=0 if w.shape[0] < w.shape[1] else 1)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"a waveform must be a non-empty 1D array (or 2D with channels); got shape {w.shape}")
    w = w.astype(np.float32)
    check_finite(w)  # before resampling, so that the sample index is the caller's
    if int(sample_rate) == SAMPLE_RATE:
        return Audio(w)
    return Audio(_av_resample([w[None]], int(sample_rate), "fltp", "mono"))


def _av_resample(chunks: list[np.ndarray], rate: int, fmt: str, layout: str) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = []
    for c in chunks:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(c), format=fmt, layout=layout)
        frame.sample_rate = rate
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _open(path):
    import av

    if not os.path.exists(path):
        raise FileNotFoundError(f"media file {str(path)!r} does not exist")
    try:
        return av.open(str(path))
    except Exception as e:  # PyAV raises several error types for undecodable data
        raise ValueError(f"cannot read media file {str(path)!r} ({type(e).__name__}: {e}); expected a video (mp4, mkv, webm, ...) or audio (wav, flac, mp3, ...) file") from e


def check_media_file(path, kind: str) -> None:
    """A cheap check before any model loads: `path` exists, holds a `kind` ("video" or "audio") stream
    and its first frame decodes; a clear error naming the file otherwise."""
    import av

    if kind not in ("video", "audio"):
        raise ValueError(f"kind must be 'video' or 'audio', got {kind!r}")
    with _open(path) as c:  # a missing or unreadable file is an error that names it
        streams = c.streams.video if kind == "video" else c.streams.audio
        if not streams:
            other = "give it as audio" if kind == "video" else "give an audio file or a video with an audio track"
            raise ValueError(f"{str(path)!r} has no {kind} stream; {other}")
        try:
            next(c.decode(streams[0]))
        except (StopIteration, av.error.FFmpegError) as e:
            raise ValueError(f"cannot decode the {kind} of {str(path)!r} ({e or 'no frames'}); re-encode the file") from None


def _decode_audio(container, path) -> Audio:
    import av

    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = []
    try:
        for frame in container.decode(stream):
            frame.pts = None  # the resampler rejects timestamps it cannot follow; times are implicit
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode the audio of {str(path)!r}: {e}") from e
    if not out:
        raise ValueError(f"the audio track of {str(path)!r} holds no samples")
    return Audio(np.concatenate(out).astype(np.float32))


def load_audio(source, sample_rate: int | None = None) -> Audio:
    """An audio file (or the audio track of a video file), a `(waveform, sample_rate)` pair, a
    waveform with `sample_rate=`, or an `Audio` -> mono 16 kHz `Audio`."""
    if isinstance(source, Audio):
        return source
    if isinstance(source, tuple) and len(source) == 2:
        return resample(source[0], source[1])
    if isinstance(source, (str, os.PathLike)):
        with _open(source) as c:
            if not c.streams.audio:
                raise ValueError(f"{str(source)!r} has no audio stream")
            return _decode_audio(c, source)
    if sample_rate is None:
        raise ValueError("a bare waveform needs its sample rate: pass (waveform, sample_rate) or sample_rate=")
    return resample(source, sample_rate)


def sampled_rate(n_sampled: int, n_frames: int, source_fps: float) -> float:
    """Frames per second actually sampled when `n_sampled` of a clip's `n_frames` are kept, evenly
    spaced (qwen-omni-utils' `sample_fps`). Seconds per temporal grid step are `temporal_patch_size`
    over this, not over the requested fps: the count is clipped and made even, so a clip below the
    requested rate or longer than `max_frames` frames is sampled slower than asked."""
    return n_sampled / n_frames * source_fps


def sample_frames(n_frames: int, source_fps: float, fps: float, min_frames: int = 4, max_frames: int = 768) -> tuple[np.ndarray, float]:
    """Indices of the frames to keep and the rate they make (`sampled_rate`), by qwen-omni-utils'
    rule: `n_frames / source_fps * fps` frames, at least `min_frames` and at most `min(max_frames,
    n_frames)` (both bounds made even), floored to an even count, evenly spaced over the clip."""
    if n_frames < 2:
        raise ValueError(f"the video holds {n_frames} frame(s) but a video needs at least 2; pass a single frame as image= instead")
    if not source_fps > 0:
        raise ValueError(f"the video's frame rate is {source_fps}; pass the frames as Video(frames, fps) with the rate they were sampled at")
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(min(max_frames, n_frames) / 2) * 2
    n = math.floor(min(max(n_frames / source_fps * fps, lo), hi, n_frames) / 2) * 2
    return np.linspace(0, n_frames - 1, n).round().astype(int), sampled_rate(n, n_frames, source_fps)


def load_video(source, fps: float = 2.0, with_audio: bool = False, audio=None) -> Video:
    """A video file (decoded with PyAV, sampled at `fps` by `sample_frames`; `Video.fps` is the rate
    actually sampled), frames `[T, H, W, 3]` uint8 (taken as already sampled at `fps`), or a `Video`.
    With `with_audio=True` the audio track is decoded (or `audio` is used) and a missing one is an error."""
    if isinstance(source, Video):
        video = source
    elif isinstance(source, (str, os.PathLike)):
        with _open(source) as c:
            if not c.streams.video:
                raise ValueError(f"{str(source)!r} has no video stream; pass it as audio= instead")
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
            if not frames:
                raise ValueError(f"{str(source)!r} holds no decodable video frames")
            rate = float(c.streams.video[0].average_rate or 0)
        with _open(source) as c:
            track = _decode_audio(c, source) if c.streams.audio and with_audio and audio is None else None
            has_audio = bool(c.streams.audio)
        if with_audio and audio is None and not has_audio:
            raise ValueError(
                f"{str(source)!r} has no audio track, but its audio was requested (use_audio_in_video=True); "
                "pass use_audio_in_video=False to use the frames only, or give the audio with audio=..."
            )
        keep, sampled_fps = sample_frames(len(frames), rate, fps)
        video = Video(np.stack([frames[i] for i in keep]), sampled_fps, track)
    else:
        video = Video(check_frames(source), fps)
    if audio is not None:
        video = Video(video.frames, video.fps, load_audio(audio))
    if with_audio and video.audio is None:
        raise ValueError("this video has no audio but its audio was requested (use_audio_in_video=True); pass audio=(waveform, sample_rate) with it or use_audio_in_video=False")
    return video


def load_image(source) -> np.ndarray:
    """An image file, a PIL image or an array `[H, W, 3]` uint8 -> array `[H, W, 3]` uint8."""
    if isinstance(source, (str, os.PathLike)):
        from PIL import Image

        if not os.path.exists(source):
            raise FileNotFoundError(f"image file {str(source)!r} does not exist")
        try:
            with Image.open(source) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:
            raise ValueError(f"cannot read image file {str(source)!r} ({type(e).__name__}: {e})") from e
    if hasattr(source, "convert"):  # PIL
        return np.asarray(source.convert("RGB"))
    return check_frames(np.asarray(source)[None], "an image")[0]
