"""The TokenMap of video-SALMONN 2+ inputs, read back from input ids (the block layout itself is
`layout.py`). `ids` is any object with `audio`, `image`, `video`, `vision_start`, `vision_end` (the
model's `SalmonnTokenIds`).

Times: video step t starts at `t * second_per_grid` s, audio token k covers `[k, k+1) * 0.5` s
(training-mode positions: temporal id `floor(t * spg * 2)` and k, in 0.5 s units).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_av.families.video_salmonn2.layout import AUDIO_SECONDS_PER_TOKEN
from hooked_av.inputs.chat import ChatTokens, text_groups
from hooked_av.inputs.token_map import (TokenMap, TokenMapBuilder, check_media_items, check_text_parts, clip_numbers,
                                        media_runs, row_records, with_text_parts)

def salmonn_token_map(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ids,
    chat: ChatTokens | None,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid: Tensor | list | None = None,
    merge: int = 2,
    position_mode: str | None = None,
    text_parts: Tensor | None = None,
    media_items: Tensor | None = None,
) -> TokenMap:
    """TokenMap of a video-SALMONN 2+ batch `[batch, pos]`: audio tokens get the grid step they
    follow as `frame`; blocks are consumed in order across the batch; items are numbered by clip within
    each row (`clip_numbers`). `position_mode` (the model's
    "inference" or "training") is recorded on the map. `text_parts`: `prepare`'s record of the user's
    text (`inputs["text_parts"]`), which makes it question, options, instruction, label and the
    template's newline after each item; without it all user text is question."""
    b, s = input_ids.shape
    parts = check_text_parts(text_parts, input_ids)
    record = check_media_items(media_items, input_ids)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = TokenMapBuilder(b, s)
    media = {ids.audio: "audio", ids.video: "video", ids.image: "image"}
    spg = [1.0] * (0 if video_grid_thw is None else len(video_grid_thw))
    if second_per_grid is not None:
        spg = [float(x) for x in torch.as_tensor(second_per_grid).flatten().tolist()]
    used = {"video": 0, "image": 0}
    for row in range(b):
        pos = mask[row].bool().nonzero().flatten().tolist()
        toks = input_ids[row, pos].tolist()
        groups = with_text_parts(text_groups(toks, chat), None if parts is None else parts[row, pos].tolist())
        for p, t, g in zip(pos, toks, groups):
            out.set(row, p, "template" if t in (ids.vision_start, ids.vision_end) else g)
        runs = list(media_runs(toks, media))
        for (i, j, block), clip in zip(runs, clip_numbers(runs, *row_records(record, parts, row, pos))):
            kinds = set(block)
            grid = None
            for kind in ("video", "image"):
                if kind in kinds:
                    table = video_grid_thw if kind == "video" else image_grid_thw
                    if table is None or used[kind] >= len(table):
                        raise ValueError(f"row {row} has {kind} placeholders but no {kind}_grid_thw entry is left for them")
                    grid = (kind, [int(x) for x in table[used[kind]].tolist()], spg[used[kind]] if kind == "video" else 0.0)
            per_frame = 0 if grid is None else (grid[1][1] // merge) * (grid[1][2] // merge)
            k = {"audio": 0, "video": 0, "image": 0}
            for off, kind in enumerate(block):
                p = pos[i + off]
                n = k[kind]
                k[kind] += 1
                if kind == "audio":
                    step = (k["video"] - 1) // per_frame if per_frame and k["video"] else -1
                    out.set(row, p, "audio", item=clip, frame=step,
                            time=n * AUDIO_SECONDS_PER_TOKEN, time_end=(n + 1) * AUDIO_SECONDS_PER_TOKEN)
                elif kind == "video":
                    t = n // per_frame
                    out.set(row, p, "video", item=clip, frame=t, time=t * grid[2], time_end=(t + 1) * grid[2])
                else:
                    out.set(row, p, "image", item=clip, frame=n // per_frame)
            if grid is not None:
                expected = grid[1][0] * per_frame
                if k[grid[0]] != expected:
                    raise ValueError(f"row {row}: {grid[0]} of clip {clip} has {k[grid[0]]} placeholders but its grid {grid[1]} makes {expected}")
                out.set_patches(row, [pos[i + off] for off, m in enumerate(block) if m == grid[0]], grid[1][1] // merge, grid[1][2] // merge)
                used[grid[0]] += 1
        if pos:
            out.set(row, pos[-1], "last")
    return out.build(position_mode)
