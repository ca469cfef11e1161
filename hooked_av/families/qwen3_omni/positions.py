"""Position ids of the Qwen3-Omni Thinker, fp32 `[3, batch, pos]` (temporal, height, width), equal to HF's
`Qwen3OmniMoeThinkerForConditionalGeneration.get_rope_index` (transformers 5.24) value for value.

Rules (docs/models.md section 4): text counts up on all three rows; an audio clip counts up one id per
token; an image or video places each merged patch at `(t_id, h, w) + start` with float temporal ids
(`layout.video_temporal_ids`, not truncated); after a block the text resumes at the block's largest id
+ 1, so ids can be fractional. An audio-in-video block gives `<|vision_bos|><|audio_bos|>` two
consecutive ids, then its video and audio ids (both from one start) merged token by token by temporal
id, video first on ties (`layout.av_order`, compared in fp32 as the model does); the closing tokens sit
at consecutive ids from (largest id of the last run appended) + 1. Every sum is done in fp32 in HF's
order, so fractional ids round as HF's do.

HF has two branches, reproduced: with an image or video grid, padding gets 0; without (text, audio
alone), ids come from the attention mask and padding gets 1. HF needs `attention_mask` for the 3D ids
(without one its model silently falls back to 0..n); here a missing mask means every token is real.
Which layout a video block has is read from the ids (as the Qwen2.5-Omni family does); a
`use_audio_in_video` that disagrees is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_av.families.qwen2_5_omni.positions import check_video_layout, video_layout
from hooked_av.families.qwen3_omni.layout import Qwen3OmniTokenIds, av_order, image_temporal_ids, video_temporal_ids


def _count_up(n: int, start) -> Tensor:
    return torch.arange(n).view(1, -1).expand(3, -1) + start


def vision_grid_positions(t_ids: Tensor, h: int, w: int, start) -> Tensor:
    """fp32 `[3, t * h * w]` ids of merged patches with temporal ids `t_ids` on an `h x w` merged grid."""
    t = t_ids.view(-1, 1).expand(-1, h * w).flatten().float()
    hh = torch.arange(h).view(1, -1, 1).expand(len(t_ids), -1, w).flatten().float()
    ww = torch.arange(w).view(1, 1, -1).expand(len(t_ids), h, -1).flatten().float()
    return torch.stack([t, hh, ww]) + start


def _nth(items, i: int, what: str, row: int):
    if items is None or i >= len(items):
        raise ValueError(
            f"row {row}: the ids hold more {what} blocks than the {what} metadata describes "
            f"({0 if items is None else len(items)}); build input_ids and media together (the processor or model.prepare)"
        )
    return items[i]


def _opening(toks: list[int], e: int, expected: list[int], row: int, what: str) -> None:
    if toks[max(e - len(expected), 0):e] != expected:
        raise ValueError(
            f"row {row}: the {what} placeholders at token {e} are not preceded by their opening token(s) {expected}; "
            "build input_ids with the processor or model.prepare"
        )


def qwen3_omni_position_ids(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ids: Qwen3OmniTokenIds,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    audio_token_counts: list[int] | None = None,
    video_second_per_grid: Tensor | None = None,
    use_audio_in_video: bool | None = None,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 25,
) -> tuple[Tensor, Tensor]:
    """Returns fp32 position ids `[3, batch, pos]` and rope deltas fp32 `[batch, 1]` (largest id + 1 -
    real length: the offset of decoding steps). Media metadata are consumed in order across the batch,
    as the processor emits them. `audio_token_counts`: tokens per audio clip (`layout.audio_token_counts`)."""
    batch, seq = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if image_grid_thw is None and video_grid_thw is None:  # HF's 1D branch
        pos = mask.float().cumsum(-1) - 1
        pos = pos.masked_fill(mask == 0, 1).unsqueeze(0).expand(3, -1, -1)
        deltas = pos.max(0)[0].max(-1, keepdim=True)[0] + 1 - mask.sum(-1, keepdim=True)
        return pos.to(input_ids.device), deltas.to(input_ids.device)
    out = torch.zeros(3, batch, seq, dtype=torch.float)
    deltas = []
    m = spatial_merge_size
    image_i = video_i = audio_i = 0
    media = {ids.image, ids.video, ids.audio}
    for row in range(batch):
        keep = mask[row].cpu() == 1
        toks = input_ids[row].cpu()[keep].tolist()
        parts: list[Tensor] = []
        st = 0  # next unread token

        def nxt():  # HF: the next id is the largest id of the last part appended + 1
            return parts[-1].max() + 1 if parts else 0

        while True:
            e = next((i for i in range(st, len(toks)) if toks[i] in media), None)
            if e is None:
                break
            kind = toks[e]
            av = kind == ids.video and video_layout(toks, e, ids)
            if kind == ids.video:
                check_video_layout(av, use_audio_in_video, row, video_i)
            opening = ([ids.vision_start, ids.audio_start] if av else
                       [ids.audio_start] if kind == ids.audio else [ids.vision_start])
            _opening(toks, e, opening, row, "audio" if kind == ids.audio else "image" if kind == ids.image else "video")
            n_text = e - st - len(opening)
            start = nxt()
            if n_text > 0:
                parts.append(_count_up(n_text, start))
                start = start + n_text
            parts.append(_count_up(len(opening), start))
            start = start + len(opening)
            if kind == ids.audio:
                n = _nth(audio_token_counts, audio_i, "audio", row)
                audio_i += 1
                parts.append(_count_up(n, start))
                used = n
            elif kind == ids.image:
                gt, gh, gw = _nth(image_grid_thw, image_i, "image", row).tolist()
                image_i += 1
                block = vision_grid_positions(image_temporal_ids(gt, position_id_per_seconds), gh // m, gw // m, start)
                parts.append(block)
                used = block.shape[1]
            else:
                gt, gh, gw = _nth(video_grid_thw, video_i, "video", row).tolist()
                if video_second_per_grid is None:
                    raise ValueError("video inputs need video_second_per_grid (seconds per temporal grid step, "
                                     "temporal_patch_size / fps: the processor returns it)")
                t_ids = video_temporal_ids(gt, video_second_per_grid[video_i], position_id_per_seconds)
                video_i += 1
                vid = vision_grid_positions(t_ids, gh // m, gw // m, start)
                used = vid.shape[1]
                if not av:
                    parts.append(vid)
                else:
                    n = _nth(audio_token_counts, audio_i, "audio", row)
                    audio_i += 1
                    aud = _count_up(n, start)
                    order = av_order(vid[0].tolist(), aud[0].tolist())
                    if order != [("video", "audio")[t == ids.audio] for t in toks[e:e + used + n]]:
                        raise ValueError(
                            f"row {row}: the audio-in-video block at token {e} does not interleave its "
                            f"{used} video and {n} audio tokens by temporal id as the model orders them "
                            f"({position_id_per_seconds} ids/s); the processor's position_id_per_seconds must "
                            "equal the config's: build the ids with model.prepare"
                        )
                    vi = ai = 0
                    for kind_, k in _runs(order):  # append runs, as HF appends single tokens then tails
                        src, at = (vid, vi) if kind_ == "video" else (aud, ai)
                        parts.append(src[:, at:at + k])
                        vi, ai = (vi + k, ai) if kind_ == "video" else (vi, ai + k)
                    used += n
            parts.append(_count_up(len(opening), nxt()))  # the closing tokens, as many as opened
            st = e + used + len(opening)
        if st < len(toks):
            parts.append(_count_up(len(toks) - st, nxt()))
        pos = torch.cat([p.float() for p in parts], dim=1) if parts else torch.zeros(3, 0)
        if pos.shape[1] != len(toks):
            raise ValueError(
                f"row {row}: the media placeholders do not follow the processor's layout ({pos.shape[1]} "
                f"positions laid out for {len(toks)} tokens); build input_ids and media together (the "
                "processor or model.prepare)"
            )
        out[:, row, keep] = pos
        deltas.append(pos.max() + 1 - len(toks) if pos.numel() else torch.tensor(0.0))
    return out.to(input_ids.device), torch.stack(deltas).view(-1, 1).to(input_ids.device)


def _runs(order: list[str]) -> list[tuple[str, int]]:
    """Consecutive equal entries of `order` as `(kind, length)`."""
    runs: list[tuple[str, int]] = []
    for k in order:
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs
