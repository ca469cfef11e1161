"""M-RoPE position ids of video-SALMONN 2+, `[3, batch, pos]` (temporal, height, width), in its two
modes. Written from the rules of the repository's `get_rope_index` (transformers 4.51.3 copy), which
uses 2 temporal ids per second and resumes text at the largest id + 1 (the stock 5.x function does not).

- "inference" (the default; what the official inference script runs, since it passes neither
  `audio_lengths` nor `second_per_grid_ts`): plain Qwen2.5-VL positions. Per image/video block, the
  first `T*H'*W'` tokens after `<|vision_start|>` (video and interleaved audio alike) get grid ids
  `(floor(t * spg * 2), h, w) + start` (`spg` 1.0 unless given, 0 for images); every other token counts
  up from the previous part's largest id + 1. Audio-only prompts get plain 1D positions.
- "training" (what SALMONN was trained with): audio is time-aligned. With videos, the k-th audio token
  of a video's block gets `(k, 0, k) + start` and its video tokens `(floor(t * spg * 2), h, w) + start`;
  with audio only, `(k, k, 0) + start`. Text after the last block resumes at the block's largest
  *temporal* id + 1; text between blocks at the previous block's largest id + 1. Images are ignored in
  the audio-visual branch (their tokens count as text), as in the repository.

Media are consumed in order across the batch; padding gets position 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POSITION_MODES = ("inference", "training")


@dataclass(frozen=True)
class SalmonnTokenIds:
    audio: int
    image: int
    video: int
    vision_start: int
    vision_end: int


def _count_up(n: int, start: int) -> Tensor:
    return (torch.arange(n) + start).view(1, -1).expand(3, -1)


def grid_positions(t: int, h: int, w: int, second_per_grid: float, ids_per_second: int) -> Tensor:
    """`[3, t*h*w]` ids (without offset) of a merged `t x h x w` grid; fp32 arithmetic, truncated."""
    tt = (torch.arange(t).view(-1, 1).expand(-1, h * w) * second_per_grid * ids_per_second).long().flatten()
    hh = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
    ww = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
    return torch.stack([tt, hh, ww])


def _blocks_opened_by(toks: list[int], start_id: int, kind: int) -> int:
    return sum(1 for i in range(len(toks) - 1) if toks[i] == start_id and toks[i + 1] == kind)


def salmonn_position_ids(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ids: SalmonnTokenIds,
    mode: str = "inference",
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid: Tensor | list[float] | None = None,
    has_audio: bool = False,
    spatial_merge_size: int = 2,
    ids_per_second: int = 2,
) -> tuple[Tensor, Tensor]:
    """Position ids `[3, batch, pos]` and rope deltas `[batch, 1]` (largest id + 1 - real tokens: the
    offset of decoding steps). `has_audio`: whether the prompt came with audio (training mode only
    time-aligns audio that is there; the audio token count of each block is read from `input_ids`)."""
    if mode not in POSITION_MODES:
        raise ValueError(f"position mode {mode!r} is unknown; use one of {POSITION_MODES}")
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep_rows = [attention_mask[r].bool().cpu() for r in range(batch)]
    rows = [input_ids[r].cpu()[keep_rows[r]].tolist() for r in range(batch)]
    spg = None if second_per_grid is None else [float(s) for s in torch.as_tensor(second_per_grid).flatten()]
    m = spatial_merge_size

    if mode == "training" and has_audio and video_grid_thw is not None:
        positions = _audio_visual(rows, ids, video_grid_thw, spg, m, ids_per_second)
    elif mode == "training" and has_audio:
        positions = _audio_only(rows, ids)
    elif image_grid_thw is not None or video_grid_thw is not None:
        positions = _visual(rows, ids, image_grid_thw, video_grid_thw, spg, m, ids_per_second)
    else:
        positions = [_count_up(len(toks), 0) for toks in rows]

    out = torch.ones(3, batch, seq, dtype=torch.long)
    deltas = []
    for r, pos in enumerate(positions):
        out[:, r, keep_rows[r]] = pos
        deltas.append(int(pos.max()) + 1 - len(rows[r]) if pos.numel() else 0)
    return out.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def _visual(rows, ids, image_grid_thw, video_grid_thw, spg, m, ids_per_second) -> list[Tensor]:
    image_i = video_i = 0
    out = []
    for toks in rows:
        n_img = _blocks_opened_by(toks, ids.vision_start, ids.image)
        n_vid = _blocks_opened_by(toks, ids.vision_start, ids.video)
        parts: list[Tensor] = []
        st = 0
        for _ in range(n_img + n_vid):
            ed_img = toks.index(ids.image, st) if n_img > 0 and ids.image in toks[st:] else len(toks) + 1
            ed_vid = toks.index(ids.video, st) if n_vid > 0 and ids.video in toks[st:] else len(toks) + 1
            if ed_img < ed_vid:
                t, h, w = image_grid_thw[image_i].tolist()
                seconds, ed = 0.0, ed_img
                image_i, n_img = image_i + 1, n_img - 1
            else:
                t, h, w = video_grid_thw[video_i].tolist()
                seconds, ed = (spg[video_i] if spg is not None else 1.0), ed_vid
                video_i, n_vid = video_i + 1, n_vid - 1
            nxt = int(parts[-1].max()) + 1 if parts else 0
            parts.append(_count_up(ed - st, nxt))
            parts.append(grid_positions(t, h // m, w // m, seconds, ids_per_second) + nxt + ed - st)
            st = ed + t * (h // m) * (w // m)
        if st < len(toks):
            nxt = int(parts[-1].max()) + 1 if parts else 0
            parts.append(_count_up(len(toks) - st, nxt))
        out.append(torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long))
    return out


def _audio_in_block(toks: list[int], ids: SalmonnTokenIds, first: int) -> int:
    """Audio tokens of the block whose first media token is at `first` (up to `<|vision_end|>`)."""
    end = toks.index(ids.vision_end, first) if ids.vision_end in toks[first:] else len(toks)
    return sum(1 for x in toks[first:end] if x == ids.audio)


def _audio_visual(rows, ids, video_grid_thw, spg, m, ids_per_second) -> list[Tensor]:
    video_i = 0
    out = []
    for toks in rows:
        parts: list[Tensor] = []
        st = 0
        for _ in range(_blocks_opened_by(toks, ids.vision_start, ids.video)):
            ed = toks.index(ids.video, st)
            t, h, w = video_grid_thw[video_i].tolist()
            seconds = spg[video_i] if spg is not None else 1.0
            video_i += 1
            start = (int(parts[-1].max()) + 1 if parts else 0) + ed - st
            parts.append(_count_up(ed - st, start - (ed - st)))
            video = grid_positions(t, h // m, w // m, seconds, ids_per_second) + start
            n_audio = _audio_in_block(toks, ids, ed)
            k = torch.arange(n_audio)
            audio = torch.stack([k, torch.zeros_like(k), k]) + start
            n = video.shape[1] + n_audio
            block = torch.zeros(3, n, dtype=torch.long)
            kinds = torch.tensor(toks[ed : ed + n])
            block[:, kinds == ids.audio] = audio
            block[:, kinds == ids.video] = video
            parts.append(block)
            st = ed + n
        if st < len(toks):
            nxt = int(parts[-1][0].max()) + 1 if parts else 0  # the block's largest temporal id + 1
            parts.append(_count_up(len(toks) - st, nxt))
        out.append(torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long))
    return out


def _audio_only(rows, ids) -> list[Tensor]:
    out = []
    for toks in rows:
        parts: list[Tensor] = []
        st = 0
        for _ in range(_blocks_opened_by(toks, ids.vision_start, ids.audio)):
            ed = toks.index(ids.audio, st)
            n_audio = _audio_in_block(toks, ids, ed)
            start = (int(parts[-1].max()) + 1 if parts else 0) + ed - st
            parts.append(_count_up(ed - st, start - (ed - st)))
            k = torch.arange(n_audio)
            parts.append(torch.stack([k, k, torch.zeros_like(k)]) + start)
            st = ed + n_audio
        if st < len(toks):
            nxt = int(parts[-1][0].max()) + 1 if parts else 0
            parts.append(_count_up(len(toks) - st, nxt))
        out.append(torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long))
    return out
