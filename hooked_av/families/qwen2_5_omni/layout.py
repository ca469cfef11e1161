"""Qwen2.5-Omni token arithmetic, the one place of it: the multimodal token ids (from the config),
tokens per audio, video temporal ids, seconds per audio token, and the audio-in-video chunk rule.
Prompt building (`prompt.py`), position ids (`positions.py`), the TokenMap (`token_map.py`) and the
tests all call these functions.

Units: temporal ids count `position_id_per_seconds` (25) per second; an audio-in-video chunk spans
`position_id_per_seconds * seconds_per_chunk` (50) temporal ids, i.e. 2 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hooked_av.encoders.omni_audio import audio_token_count

# the audio tower emits one token per 40 ms: 10 ms mel hops, conv stride 2, then pairs pooled
AUDIO_SECONDS_PER_TOKEN = 0.04
# Qwen2.5's <|vision_bos|>; older Thinker configs do not declare it, and HF's get_rope_index falls back to it
QWEN2_5_VISION_START, QWEN2_5_VISION_END = 151652, 151653


@dataclass(frozen=True)
class OmniTokenIds:
    audio: int
    image: int
    video: int
    audio_start: int
    audio_end: int
    vision_start: int
    vision_end: int


def token_ids(tc) -> OmniTokenIds:
    """The placeholder and delimiter ids of a `Qwen2_5OmniThinkerConfig`."""
    return OmniTokenIds(
        audio=tc.audio_token_id, image=tc.image_token_id, video=tc.video_token_id,
        audio_start=tc.audio_start_token_id, audio_end=tc.audio_end_token_id,
        vision_start=getattr(tc, "vision_start_token_id", QWEN2_5_VISION_START),
        vision_end=getattr(tc, "vision_end_token_id", QWEN2_5_VISION_END),
    )


def audio_token_counts(lengths_or_mask: Tensor | list) -> list[int]:
    """Tokens per audio: from the valid mel frames of each audio (a `feature_attention_mask`
    `[n_audio, frames]`, or the frame counts `[n_audio]`), by the audio tower's own arithmetic
    (`encoders.omni_audio.audio_token_count`)."""
    t = torch.as_tensor(lengths_or_mask)
    frames = t.sum(-1) if t.dim() == 2 else t
    return audio_token_count(frames.long()).tolist()


def video_temporal_ids(grid_t: int, second_per_grid: float | Tensor, per_second: int) -> Tensor:
    """Temporal position id of each temporal grid step `[grid_t]`: fp32 arithmetic, truncated,
    exactly as HF's `get_rope_index` computes it."""
    spg = torch.as_tensor(second_per_grid, dtype=torch.float).cpu()
    return (torch.arange(grid_t) * spg * per_second).long()


def chunk_bounds(temporal: Tensor, per_chunk: int, start: int) -> list[tuple[int, int]]:
    """Split a non-decreasing run of temporal ids where `id - start` crosses the next multiple of
    `per_chunk` (one boundary per token at most, as HF's `get_chunked_index` does)."""
    bounds, begin, k = [], 0, 1
    values = (temporal - start).tolist()
    for i, v in enumerate(values):
        if v >= k * per_chunk:
            bounds.append((begin, i))
            begin, k = i, k + 1
    bounds.append((begin, len(values)))
    return bounds


def av_chunk_runs(video_temporal: Tensor, n_audio: int, per_chunk: int) -> list[tuple[str, int, int, int]]:
    """The audio-in-video rule: the block's body as runs `(modality, chunk, begin, end)`, video chunk
    j then audio chunk j, where `begin:end` indexes that modality's own tokens. `video_temporal`
    `[n_video_tokens]`: each video token's temporal id from the block start (audio token k has id k);
    a chunk holds `per_chunk` temporal ids. Empty runs are left out."""
    v = chunk_bounds(video_temporal, per_chunk, 0)
    a = chunk_bounds(torch.arange(n_audio), per_chunk, 0)
    runs = []
    for j in range(max(len(v), len(a))):
        if j < len(v):
            runs.append(("video", j, *v[j]))
        if j < len(a):
            runs.append(("audio", j, *a[j]))
    return [r for r in runs if r[3] > r[2]]


def av_block_runs(
    grid_thw, second_per_grid: float, n_audio: int, merge: int, per_second: float, seconds_per_chunk: float
) -> list[tuple[str, int, int, int]]:
    """`av_chunk_runs` of one video `(t, h, w)` and its `n_audio` audio tokens as the processor lays
    them out: it chunks the float temporal ids `t * second_per_grid * per_second` (float64, not
    truncated), one per merged patch."""
    t, h, w = (int(x) for x in grid_thw)
    per_frame = (h // merge) * (w // merge)
    v_idx = np.repeat(np.arange(t) * float(second_per_grid) * per_second, per_frame)
    return av_chunk_runs(torch.from_numpy(v_idx), n_audio, int(per_second * seconds_per_chunk))
