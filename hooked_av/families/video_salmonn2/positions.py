"""M-RoPE position ids of video-SALMONN 2+, `[3, batch, pos]` (temporal, height, width), in its two
modes. Written from the rules of the repository's `get_rope_index` (transformers 4.51.3 copy), which
uses 2 temporal ids per second and resumes text at the largest id + 1 (the stock 5.x function does not).

- "inference" (the default; what the official inference script runs, since it passes neither
  `audio_lengths` nor `second_per_grid_ts`): plain Qwen2.5-VL positions at 1.0 s per grid step, whatever
  seconds per grid step the input carries. Per image/video block, the first `T*H'*W'` tokens after
  `<|vision_start|>` (video and interleaved audio alike) get grid ids `(floor(t * 1.0 * 2), h, w) + start`
  (`t * 0` for images); every other token counts up from the previous part's largest id + 1. Rows
  without image or video get plain 1D positions.
- "training" (what SALMONN was trained with): the repository's data pipeline computes each sample's ids
  on its own, so the branch is chosen per row: audio and video -> the k-th audio token of a video's
  block gets `(k, 0, k) + start` and its video tokens `(floor(t * spg * 2), h, w) + start` (images count
  as text); else image or video -> the inference rules with the given `spg` (audio counts as text);
  else audio -> `(k, k, 0) + start`; else 1D. In the audio branches text after the last block resumes
  at the block's largest *temporal* id + 1; text between blocks at the previous block's largest id + 1.

Each row takes the grids of the blocks it opens, in order across the batch; padding gets position 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_av.families.video_salmonn2.layout import SalmonnTokenIds

POSITION_MODES = ("inference", "training")


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
    spatial_merge_size: int = 2,
    ids_per_second: int = 2,
) -> tuple[Tensor, Tensor]:
    """Position ids `[3, batch, pos]` and rope deltas `[batch, 1]` (largest id + 1 - real tokens: the
    offset of decoding steps). `second_per_grid` (one per video) is read in "training" mode only: the
    official inference never passes it, so its ids use 1.0 s per grid step whatever the clip's rate."""
    if mode not in POSITION_MODES:
        raise ValueError(f"position mode {mode!r} is unknown; use one of {POSITION_MODES}")
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep_rows = [attention_mask[r].bool().cpu() for r in range(batch)]
    rows = [input_ids[r].cpu()[keep_rows[r]].tolist() for r in range(batch)]
    images = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
    videos = [] if video_grid_thw is None else [tuple(g) for g in video_grid_thw.tolist()]
    spg = _seconds_per_grid(mode, second_per_grid, len(videos))
    m = spatial_merge_size

    positions, image_i, video_i = [], 0, 0
    for toks in rows:  # each row with its own media, as the repository's training data computes them
        n_img = _blocks_opened_by(toks, ids.vision_start, ids.image)
        n_vid = _blocks_opened_by(toks, ids.vision_start, ids.video)
        row_images = images[image_i : image_i + n_img]
        row_videos = [(*g, s) for g, s in zip(videos[video_i : video_i + n_vid], spg[video_i : video_i + n_vid])]
        image_i, video_i = image_i + n_img, video_i + n_vid
        if mode == "training" and ids.audio in toks and ids.video in toks:
            positions.append(_audio_visual(toks, ids, row_videos, m, ids_per_second))
        elif mode == "training" and ids.audio in toks and ids.image not in toks:
            positions.append(_audio_only(toks, ids))
        else:  # with no image or video this counts 0, 1, 2, ... like the repository's text branch
            positions.append(_visual(toks, ids, row_images, row_videos, m, ids_per_second))

    out = torch.ones(3, batch, seq, dtype=torch.long)
    deltas = []
    for r, pos in enumerate(positions):
        out[:, r, keep_rows[r]] = pos
        deltas.append(int(pos.max()) + 1 - len(rows[r]) if pos.numel() else 0)
    return out.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def _seconds_per_grid(mode: str, second_per_grid, n_videos: int) -> list[float]:
    if mode == "inference" or second_per_grid is None:
        return [1.0] * n_videos  # get_rope_index's value when none is passed
    spg = [float(s) for s in torch.as_tensor(second_per_grid).flatten()]
    if len(spg) != n_videos:
        raise ValueError(f"video_second_per_grid has {len(spg)} value(s) but video_grid_thw has {n_videos} video(s); pass one per video")
    return spg


def _visual(toks, ids, images, videos, m, ids_per_second) -> Tensor:
    """Qwen2.5-VL ids of one row: the first `T*H'*W'` tokens of each block take the grid."""
    images, videos = list(images), list(videos)
    parts: list[Tensor] = []
    st = 0
    for _ in range(len(images) + len(videos)):
        ed_img = toks.index(ids.image, st) if images and ids.image in toks[st:] else len(toks) + 1
        ed_vid = toks.index(ids.video, st) if videos and ids.video in toks[st:] else len(toks) + 1
        if ed_img < ed_vid:
            (t, h, w), seconds, ed = images.pop(0), 0.0, ed_img
        else:
            (t, h, w, seconds), ed = videos.pop(0), ed_vid
        nxt = int(parts[-1].max()) + 1 if parts else 0
        parts.append(_count_up(ed - st, nxt))
        parts.append(grid_positions(t, h // m, w // m, seconds, ids_per_second) + nxt + ed - st)
        st = ed + t * (h // m) * (w // m)
    if st < len(toks):
        nxt = int(parts[-1].max()) + 1 if parts else 0
        parts.append(_count_up(len(toks) - st, nxt))
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def _audio_in_block(toks: list[int], ids: SalmonnTokenIds, first: int) -> int:
    """Audio tokens of the block whose first media token is at `first` (up to `<|vision_end|>`)."""
    end = toks.index(ids.vision_end, first) if ids.vision_end in toks[first:] else len(toks)
    return sum(1 for x in toks[first:end] if x == ids.audio)


def _audio_visual(toks, ids, videos, m, ids_per_second) -> Tensor:
    """Time-aligned ids of one row: video on its grid, the k-th audio token of a block at (k, 0, k)."""
    parts: list[Tensor] = []
    st = 0
    for t, h, w, seconds in videos:
        ed = toks.index(ids.video, st)
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
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def _audio_only(toks, ids) -> Tensor:
    """Ids of one row whose media are audio blocks only: the k-th token of a block at (k, k, 0)."""
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
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
