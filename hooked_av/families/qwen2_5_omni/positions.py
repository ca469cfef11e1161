"""TMRoPE position ids of the Qwen2.5-Omni Thinker, `[3, batch, pos]` (temporal, height, width).

Written from the rules in docs/models.md and checked against HF's `get_rope_index` on every geometry:
text counts up on all three rows; an image/video block starts where the text left off and places
each merged patch at `(t_pos, h, w) + start`; audio counts up; after a block the text resumes at the
block's largest id + 1. An audio-in-video block (`<|vision_bos|><|audio_bos|>`, then one run of
video and audio placeholders) gives the video and its audio one start, interleaved in chunks of
`position_id_per_seconds * seconds_per_chunk` temporal ids; the closing tokens then sit at (largest
id of the last chunk appended) + 1, which can be below the block's maximum (HF's behaviour,
reproduced on purpose). Padding gets position 1.

Which of the two layouts a video block has is read from the ids, never assumed: HF's
`use_audio_in_video` is a claim about the layout, checked here (see `video_layout`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_av.families.qwen2_5_omni.layout import OmniTokenIds, av_chunk_runs, video_temporal_ids


def _count_up(n: int, start: int) -> Tensor:
    return (torch.arange(n) + start).view(1, -1).expand(3, -1)


def vision_grid_positions(t_pos: Tensor, h: int, w: int, start: int) -> Tensor:
    """`[3, t * h * w]` ids of merged patches with temporal ids `t_pos` on an `h x w` merged grid."""
    t = t_pos.view(-1, 1).expand(-1, h * w).flatten()
    hh = torch.arange(h).view(1, -1, 1).expand(len(t_pos), -1, w).flatten()
    ww = torch.arange(w).view(1, 1, -1).expand(len(t_pos), h, -1).flatten()
    return torch.stack([t, hh, ww]) + start


def video_layout(toks: list[int], start: int, ids: OmniTokenIds) -> bool:
    """True when the video block whose first placeholder is `toks[start]` is laid out audio-in-video:
    its run of media placeholders also holds audio (the processor interleaves the clip's audio in
    it); False when the run is video alone."""
    end = start
    while end < len(toks) and toks[end] in (ids.video, ids.audio):
        end += 1
    return ids.audio in toks[start:end]


def check_video_layout(laid_av: bool, use_audio_in_video: bool | None, row: int, video: int) -> None:
    if use_audio_in_video is None or bool(use_audio_in_video) == laid_av:
        return
    how = ("with its audio interleaved (<|vision_bos|><|audio_bos|>, then video and audio chunks in turn)" if laid_av
           else "as video alone (no audio placeholders in its block)")
    raise ValueError(
        f"row {row}: the media placeholders do not follow the layout for use_audio_in_video={use_audio_in_video}: "
        f"video {video} is laid out {how}; pass use_audio_in_video={laid_av} or leave it out (the layout in "
        "input_ids decides)"
    )


def _nth(items, i: int, what: str, row: int):
    if items is None or i >= len(items):
        raise ValueError(
            f"row {row}: the ids hold more {what} blocks than the {what} metadata describes "
            f"({0 if items is None else len(items)}); build input_ids and media together (the processor or model.prepare)"
        )
    return items[i]


def omni_position_ids(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ids: OmniTokenIds,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    audio_token_counts: list[int] | None = None,
    video_second_per_grid: Tensor | None = None,
    use_audio_in_video: bool | None = None,
    spatial_merge_size: int = 2,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: int = 2,
) -> tuple[Tensor, Tensor]:
    """Returns position ids `[3, batch, pos]` and rope deltas `[batch, 1]` (max + 1 - length, the
    offset of decoding steps). Media are consumed in order across the batch, as the processor
    emits them. `use_audio_in_video`: None (default) lays out each video block as its ids show
    (`video_layout`); True or False must agree with every video block, else a ValueError says
    which block disagrees and what to pass."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = torch.ones(3, batch, seq, dtype=torch.long)
    deltas = []
    m = spatial_merge_size
    image_i = video_i = audio_i = 0
    audio_counts = list(audio_token_counts or [])
    per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    media = {ids.image, ids.video, ids.audio}
    for row in range(batch):
        keep = attention_mask[row].bool().cpu()
        toks = input_ids[row].cpu()[keep].tolist()
        parts: list[Tensor] = []
        nxt = 0  # next free position id
        st = 0  # next unread token
        while True:
            e = next((i for i in range(st, len(toks)) if toks[i] in media), None)
            if e is None:
                break
            kind = toks[e]
            av = kind == ids.video and video_layout(toks, e, ids)
            if kind == ids.video:
                check_video_layout(av, use_audio_in_video, row, video_i)
            n_open = 2 if av else 1
            if e - st - n_open > 0:
                parts.append(_count_up(e - st - n_open, nxt))
                nxt += e - st - n_open
            parts.append(_count_up(1, nxt).repeat(1, n_open))  # the opening token(s), one shared id
            nxt += 1
            if kind == ids.audio:
                n = _nth(audio_counts, audio_i, "audio", row)
                audio_i += 1
                block = _count_up(n, nxt)
                parts.append(block)
                nxt = int(block.max()) + 1
                used = n
            elif kind == ids.image:
                gt, gh, gw = _nth(image_grid_thw, image_i, "image", row).tolist()
                image_i += 1
                t_pos = torch.arange(gt) * position_id_per_seconds
                block = vision_grid_positions(t_pos, gh // m, gw // m, nxt)
                parts.append(block)
                nxt = int(block.max()) + 1
                used = block.shape[1]
            elif not av:
                gt, gh, gw = _nth(video_grid_thw, video_i, "video", row).tolist()
                t_pos = video_temporal_ids(gt, video_second_per_grid[video_i], position_id_per_seconds)
                video_i += 1
                block = vision_grid_positions(t_pos, gh // m, gw // m, nxt)
                parts.append(block)
                nxt = int(block.max()) + 1
                used = block.shape[1]
            else:
                gt, gh, gw = _nth(video_grid_thw, video_i, "video", row).tolist()
                t_pos = video_temporal_ids(gt, video_second_per_grid[video_i], position_id_per_seconds)
                video_i += 1
                vid = vision_grid_positions(t_pos, gh // m, gw // m, nxt)
                n_audio = _nth(audio_counts, audio_i, "audio", row)
                audio_i += 1
                aud = _count_up(n_audio, nxt)
                last = None
                for kind_, _, begin, end in av_chunk_runs(vid[0] - nxt, n_audio, per_chunk):
                    last = (vid if kind_ == "video" else aud)[:, begin:end]
                    parts.append(last)
                nxt = int(last.max()) + 1  # the quirk: the last chunk's max, not the block's
                parts.append(_count_up(1, nxt).repeat(1, 2))  # audio_eos and vision_eos share an id
                nxt += 1
                used = vid.shape[1] + n_audio + 2
            st = e + used
        if st < len(toks):
            parts.append(_count_up(len(toks) - st, nxt))
        pos = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        if pos.shape[1] != len(toks):
            raise ValueError(
                f"row {row}: the media placeholders do not follow the processor's layout ({pos.shape[1]} "
                f"positions laid out for {len(toks)} tokens); build input_ids and media together (the "
                "processor or model.prepare)"
            )
        out[:, row, keep] = pos
        deltas.append(int(pos.max()) + 1 - len(toks) if pos.numel() else 0)
    return out.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
