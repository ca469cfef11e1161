"""Synthetic audio-visual clips, rendered straight into the Thinker's media tensors.

A clip is a short video of a large striped square (40 px, anywhere in a noisy dark 56-px frame) and a
tone. Both visual attributes (colour, brightness) are visible to any 14-px patch the square covers,
which a 2-layer ViT learns quickly; a global shape over 2x2 merged tokens is not, and a prototype of
this file found stripe orientation (a second-order feature under random phase) slow too (docs/toy.md).

    bank = make_clips(1000, seed=0)
    bank.pixels[i]    [rows, 3*2*14*14]  one clip's video patches, Qwen2-VL layout, CLIP-normalised
    bank.features[i]  [128, frames]      its Whisper log-mel (100 frames per second)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hooked_av.families.qwen2_5_omni.layout import audio_token_counts
from hooked_av.toy import vocab

SAMPLE_RATE = 16_000  # Hz, what Whisper features assume
HOP = 160  # samples per mel frame (10 ms)
N_MELS = 128
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2

RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 235), "yellow": (230, 210, 40)}
NOTE_HZ = {"do": 261.63, "sol": 392.00, "re": 587.33, "la": 880.00}
# harmonic amplitudes (1st, 2nd, ...): pure, odd-only, all: what the ear calls timbre. Equal
# amplitudes keep the three far apart in log-mel; gentler profiles (1/n roll-offs) were linearly
# separable too but left the instrument question at chance for 1,500 training steps.
HARMONICS = {
    "flute": [1.0],
    "clarinet": [1.0, 0.0] * 7,
    "trumpet": [1.0] * 14,
}
ATTRIBUTES = {  # attribute -> its answer words (the stored value is the index)
    "colour": vocab.COLOURS, "brightness": vocab.BRIGHTNESS,
    "note": vocab.NOTES, "instrument": vocab.INSTRUMENTS,
}


@dataclass
class ClipBank:
    """`n` clips held in memory. `attrs[name]` is `[n]` int64 (indices into `ATTRIBUTES[name]`,
    plus the derived `height` and `match`); `pixels` `[n, rows, 1176]`; `features` `[n, 128, frames]`."""

    attrs: dict[str, np.ndarray]
    pixels: Tensor
    features: Tensor
    grid_thw: tuple[int, int, int]
    second_per_grid: float  # seconds per temporal grid step (temporal_patch_size / fps)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def video_tokens(self) -> int:
        """Merged video tokens per clip (each `<|VIDEO|>` placeholder is one)."""
        t, h, w = self.grid_thw
        return t * h * w // MERGE**2

    @property
    def audio_tokens(self) -> int:
        """Audio tower output tokens per clip (25 per second), as the Omni audio tower counts them."""
        return audio_token_counts([self.features.shape[-1]])[0]


# The training format: every clip the shipped model saw has frames of SIZE x SIZE px, N_FRAMES of them
# at FPS frames per second, and SECONDS of audio.
SIZE, N_FRAMES, FPS, SECONDS = 56, 2, 2.0, 1.0


def make_clips(
    n: int, seed: int, size: int = SIZE, n_frames: int = N_FRAMES, fps: float = FPS, seconds: float = SECONDS
) -> ClipBank:
    """`n` clips with independent uniform attributes, deterministic in `seed`. `size` (px, a
    multiple of 28) and `n_frames` (even) fix the video grid; `seconds` the audio length."""
    attrs, video, audio = render_clips(n, seed, size, n_frames, seconds)
    return bank_from_media(attrs, video, audio, fps)


def render_clips(
    n: int, seed: int, size: int = SIZE, n_frames: int = N_FRAMES, seconds: float = SECONDS
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The media of `make_clips(n, seed, ...)` before the model's transforms: attributes, video
    `[n, frames, size, size, 3]` float in [0, 255] and audio `[n, samples]` float32 at 16 kHz."""
    if size % (PATCH * MERGE) or n_frames % TEMPORAL_PATCH:
        raise ValueError(f"size must be a multiple of {PATCH * MERGE} px and n_frames even; got {size}, {n_frames}")
    rng = np.random.default_rng(seed)
    attrs = {name: rng.integers(0, len(words), n) for name, words in ATTRIBUTES.items()}
    attrs["height"] = (attrs["note"] >= 2).astype(np.int64)
    attrs["match"] = (attrs["note"] == attrs["colour"]).astype(np.int64)
    video = np.stack([_render_video(rng, attrs, i, size, n_frames) for i in range(n)])
    audio = np.stack([_render_tone(rng, attrs, i, seconds) for i in range(n)])
    return attrs, video, audio


def bank_from_media(attrs: dict[str, np.ndarray], video: np.ndarray, audio: np.ndarray, fps: float = FPS) -> ClipBank:
    """A `ClipBank` from video `[n, frames, H, W, 3]` in [0, 255] (float or uint8) sampled at `fps`
    and audio `[n, samples]` at 16 kHz: the model's tensors, as in training."""
    n, frames, height, width, _ = video.shape
    grid = (frames // TEMPORAL_PATCH, height // PATCH, width // PATCH)
    return ClipBank(attrs, patchify(video), log_mel(audio), grid, TEMPORAL_PATCH / fps)


def _render_video(rng, attrs, i: int, size: int, n_frames: int) -> np.ndarray:
    """`[frames, H, W, 3]` float in [0, 255]: the striped square (5/7 of the frame, random place,
    still), fresh noise per frame."""
    side = size * 5 // 7
    level = (0.45, 1.0)[attrs["brightness"][i]] * rng.uniform(0.9, 1.1)
    rgb = np.array(RGB[vocab.COLOURS[attrs["colour"][i]]], dtype=np.float32) * level
    r0, c0 = rng.integers(0, size - side + 1, 2)
    period, phase = 4, rng.integers(0, 4)
    line = ((np.arange(side) + phase) % period) < period // 2  # 2 px on, 2 px off
    on = line[:, None] if rng.integers(2) else line[None, :]  # orientation: texture, never asked
    on = np.broadcast_to(on, (side, side))
    frames = []
    for _ in range(n_frames):
        img = rng.normal(40, 8, (size, size, 3)).astype(np.float32)
        square = np.where(on[..., None], rgb, 0.35 * rgb) + rng.normal(0, 6, (side, side, 3))
        img[r0 : r0 + side, c0 : c0 + side] = square
        frames.append(img)
    return np.clip(np.stack(frames), 0, 255)


def _render_tone(rng, attrs, i: int, seconds: float) -> np.ndarray:
    """`[samples]` float32 at 16 kHz: the note (detuned by up to 2%) with the instrument's harmonics."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = NOTE_HZ[vocab.NOTES[attrs["note"][i]]] * rng.uniform(0.98, 1.02)
    wave = np.zeros_like(t)
    for k, amp in enumerate(HARMONICS[vocab.INSTRUMENTS[attrs["instrument"][i]]], start=1):
        if amp and k * f0 < SAMPLE_RATE / 2 - 200:
            wave += amp * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    envelope = np.minimum(1.0, np.minimum(t / 0.02, (t[-1] - t) / 0.05))  # 20 ms attack, 50 ms release
    wave = rng.uniform(0.2, 0.6) * envelope * wave / np.abs(wave).max()
    return (wave + rng.normal(0, 0.005, t.shape)).astype(np.float32)


@functools.cache
def _image_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean/std of the Thinker's stock image processor (Qwen2-VL's), which the toy was trained with."""
    from hooked_av.families.qwen2_5_omni.processor import stock_components

    ip = stock_components(N_MELS)[1]
    return tuple(ip.image_mean), tuple(ip.image_std)


def patchify(video: np.ndarray) -> Tensor:
    """`[n, frames, H, W, 3]` in [0, 255] -> `[n, t*h*w, 3*2*14*14]`: the Qwen2-VL processor's
    rescale, normalise and patch order (rows (t, h_block, w_block, ih, iw); values (c, t, y, x))."""
    n, frames, height, width, _ = video.shape
    x = torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32)).permute(0, 1, 4, 2, 3) / 255.0
    mean, std = _image_norm()
    x = (x - torch.tensor(mean).view(1, 1, 3, 1, 1)) / torch.tensor(std).view(1, 1, 3, 1, 1)
    gt, gh, gw = frames // TEMPORAL_PATCH, height // PATCH, width // PATCH
    x = x.reshape(n, gt, TEMPORAL_PATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(n, gt * gh * gw, 3 * TEMPORAL_PATCH * PATCH * PATCH).contiguous()


def log_mel(audio: np.ndarray, chunk: int = 512) -> Tensor:
    """`[n, samples]` at 16 kHz -> `[n, 128, samples // 160]` with transformers' `WhisperFeatureExtractor`.

    The processor pads every audio to 30 s; padding with 480 zeros instead gives the same values on
    the valid frames (a frame reads +-200 samples, and the zeros never set Whisper's max-8 floor),
    at 1/30 of the cost. `tests/test_toy.py` checks this against a full 30 s extraction."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=N_MELS)
    frames = audio.shape[1] // HOP
    out = []
    for start in range(0, len(audio), chunk):
        part = list(audio[start : start + chunk])
        feats = fe(part, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=audio.shape[1] + 480,
                   return_tensors="np")["input_features"]
        out.append(torch.from_numpy(feats[:, :, :frames]))
    return torch.cat(out).contiguous()
