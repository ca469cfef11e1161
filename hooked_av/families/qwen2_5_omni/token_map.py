"""The TokenMap of Qwen2.5-Omni inputs, read back from input ids and media metadata (the token
arithmetic itself is `layout.py`).

Times follow the model's TMRoPE ids (`positions.py`): a video token of temporal grid
index t starts at `long(t * second_per_grid * 25) / 25` s; audio token k covers `[k, k+1) * 0.04` s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_av.families.qwen2_5_omni.layout import AUDIO_SECONDS_PER_TOKEN, OmniTokenIds, av_block_runs, video_temporal_ids
from hooked_av.inputs.chat import ChatTokens, text_groups
from hooked_av.inputs.token_map import (
    TokenMap, TokenMapBuilder, check_media_items, check_text_parts, clip_numbers, fill_audio, fill_grid, media_runs,
    row_records, with_text_parts,
)


def omni_token_map(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ids: OmniTokenIds,
    chat: ChatTokens | None,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    audio_counts: list[int] | None = None,
    video_second_per_grid: Tensor | list | None = None,
    merge: int = 2,
    per_second: float = 25,
    seconds_per_chunk: float = 2.0,
    text_parts: Tensor | None = None,
    media_items: Tensor | None = None,
) -> TokenMap:
    """TokenMap of a Qwen2.5-Omni batch `[batch, pos]` (left or right padded). Media metadata are
    consumed in order across the batch, as the processor emits them; an audio-in-video block is a
    run of media tokens holding both video and audio ids. Items are numbered by clip within each row
    (`clip_numbers`). `text_parts`: `prepare`'s record of the user's text (`inputs["text_parts"]`),
    which makes it question, options, instruction and label; without it all user text is question."""
    b, s = input_ids.shape
    parts = check_text_parts(text_parts, input_ids)
    record = check_media_items(media_items, input_ids)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = TokenMapBuilder(b, s)
    media = {ids.audio: "audio", ids.video: "video", ids.image: "image"}
    specials = {ids.audio_start, ids.audio_end, ids.vision_start, ids.vision_end}
    grids = {"image": image_grid_thw, "video": video_grid_thw}
    spg = [1.0] * (0 if video_grid_thw is None else len(video_grid_thw))
    if video_second_per_grid is not None:
        spg = [float(x) for x in torch.as_tensor(video_second_per_grid).flatten().tolist()]
    used = {"audio": 0, "video": 0, "image": 0}  # items consumed across the batch
    for row in range(b):
        pos = mask[row].bool().nonzero().flatten().tolist()
        toks = input_ids[row, pos].tolist()
        groups = with_text_parts(text_groups(toks, chat), None if parts is None else parts[row, pos].tolist())
        for p, g in zip(pos, groups):
            out.set(row, p, g)
        for p, t in zip(pos, toks):
            if t in specials:
                out.set(row, p, "template")
        runs = list(media_runs(toks, media))
        for (i, j, block), clip in zip(runs, clip_numbers(runs, *row_records(record, parts, row, pos))):
            kinds = set(block)
            if "image" in kinds and len(kinds) > 1:
                raise ValueError(f"row {row}: image placeholders at positions {pos[i]}..{pos[j-1]} are mixed with other media")
            av = kinds == {"audio", "video"}
            chunk_of = {}
            if av:
                chunk_of = _av_chunks(block, grids["video"], used["video"], spg, audio_counts, used["audio"], merge, per_second, seconds_per_chunk, row)
            for kind in sorted(kinds):
                where = [pos[i + k] for k, m in enumerate(block) if m == kind]
                _fill_item(out, row, where, kind, clip, used[kind], grids, spg, audio_counts, merge, per_second,
                           chunk_of.get(kind))
                used[kind] += 1
        if pos:
            out.set(row, pos[-1], "last")
    for kind, n in used.items():
        have = _n_items(kind, grids, audio_counts)
        if n != have:
            raise ValueError(f"the ids hold {n} {kind} item(s) but the metadata describes {have}; pass the inputs the processor (or model.prepare) built together")
    return out.build()


def _n_items(kind, grids, audio_counts) -> int:
    if kind == "audio":
        return len(audio_counts or [])
    return 0 if grids[kind] is None else len(grids[kind])


def _av_chunks(block, video_grid, vi, spg, audio_counts, ai, merge, per_second, seconds_per_chunk, row) -> dict:
    if video_grid is None or audio_counts is None or vi >= len(video_grid) or ai >= len(audio_counts):
        raise ValueError(f"row {row}: an audio-in-video block has no matching video_grid_thw / audio features")
    runs = av_block_runs(video_grid[vi].tolist(), spg[vi], audio_counts[ai], merge, per_second, seconds_per_chunk)
    expected = [m for m, _, b, e in runs for _ in range(e - b)]
    if expected != block:
        raise ValueError(
            f"row {row}: the audio-in-video block does not follow the processor's 2 s chunk layout for "
            f"video grid {video_grid[vi].tolist()} and {audio_counts[ai]} audio tokens; build the ids with "
            "model.prepare or the HF processor with the same media"
        )
    return {m: torch.tensor([c for mm, c, b, e in runs if mm == m for _ in range(e - b)]) for m in ("video", "audio")}


def _fill_item(out, row, where, kind, item, index, grids, spg, audio_counts, merge, per_second, chunk) -> None:
    if kind == "audio":
        fill_audio(out, row, where, item, index, audio_counts, AUDIO_SECONDS_PER_TOKEN, chunk)
        return
    frame = fill_grid(out, row, where, kind, item, index, grids, merge)
    if frame is None:
        return
    t = int(frame[-1]) + 1
    ids = video_temporal_ids(t + 1, spg[index], int(per_second)).float() / per_second  # one more for the end
    out.set(row, where, "video", item=item, frame=frame, time=ids[:-1][frame], time_end=ids[1:][frame], chunk=chunk)
