"""video-SALMONN 2+ token arithmetic, the one place of it: its token ids (from the config), audio
tokens per second, and the interleaved audio-visual block that prompt building, the TokenMap and
the tests share (position ids read the block back from the ids, `positions.py`).

Block: `<|vision_start|> [<|video_pad|> x H'W', <|audio_pad|> x n_t] for t in 0..T-1 <|vision_end|>`
with `n_t` the audio tokens of grid step t (2 per second); audio only: `<|vision_start|> <|audio_pad|>
x L <|vision_end|>` (docs/models.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# SALMONN's get_rope_index hard-codes 2 temporal ids per second (one per audio token)
POSITION_IDS_PER_SECOND = 2
AUDIO_SECONDS_PER_TOKEN = 0.5  # the window Q-Former emits one token per 25 Whisper frames


def audio_per_step(grid_t: int, second_per_grid: float, n_audio: int) -> list[int]:
    """Audio tokens placed after each of the `grid_t` video steps: `floor(t * spg * 2)` differences,
    the last step taking the remainder."""
    bounds = [min(math.floor(t * second_per_grid / AUDIO_SECONDS_PER_TOKEN), n_audio) for t in range(grid_t)]
    return [bounds[t + 1] - bounds[t] for t in range(grid_t - 1)] + [n_audio - bounds[-1]]


def salmonn_block_ids(ids, video_grid_thw=None, second_per_grid: float = 1.0, n_audio: int = 0, merge: int = 2) -> list[int]:
    """The token ids of one audio-visual (or audio-only, or video-only) block, bos and eos included."""
    if video_grid_thw is None:
        return [ids.vision_start] + [ids.audio] * n_audio + [ids.vision_end]
    t, h, w = (int(x) for x in video_grid_thw)
    per_frame = (h // merge) * (w // merge)
    body = []
    for n in audio_per_step(t, second_per_grid, n_audio) if n_audio else [0] * t:
        body += [ids.video] * per_frame + [ids.audio] * n
    return [ids.vision_start] + body + [ids.vision_end]


@dataclass(frozen=True)
class SalmonnTokenIds:
    audio: int
    image: int
    video: int
    vision_start: int
    vision_end: int


def token_ids(ids: dict) -> SalmonnTokenIds:
    """The placeholder and delimiter ids from `weights.split_config`'s id dict."""
    return SalmonnTokenIds(
        audio=ids["audio_token_id"], image=ids["image_token_id"], video=ids["video_token_id"],
        vision_start=ids["vision_start_token_id"], vision_end=ids["vision_end_token_id"],
    )
