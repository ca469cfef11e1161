"""The TokenMap of Qwen3-Omni inputs, read back from input ids and media metadata (the token arithmetic itself
is `layout.py`).

Times follow the model's temporal position ids (`positions.py`) divided by `position_id_per_seconds`: a
video token of temporal grid step t spans `[t, t + 1) * second_per_grid` s; audio token k of a clip spans
`[k, k + 1) * layout.audio_seconds_per_token` (1/13 s, one id per token at 13 ids/s). There are no
audio-in-video chunks (the clip's tokens are merged one by one), so `chunk` stays -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_av.families.qwen3_omni.layout import (Qwen3OmniTokenIds, audio_seconds_per_token, audio_token_counts,
                                                  processor_av_order, token_ids)
from hooked_av.inputs.chat import ChatTokens, chat_tokens, text_groups
from hooked_av.inputs.token_map import (TokenMap, TokenMapBuilder, check_media_items, check_text_parts, clip_numbers,
                                        fill_audio, fill_grid, media_runs, row_records, with_text_parts)


def qwen3_omni_token_map(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    ids: Qwen3OmniTokenIds,
    chat: ChatTokens | None,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    audio_counts: list[int] | None = None,
    video_second_per_grid: Tensor | list | None = None,
    merge: int = 2,
    per_second: float = 13,
    seconds_per_audio_token: float = 1 / 13,
    text_parts: Tensor | None = None,
    media_items: Tensor | None = None,
) -> TokenMap:
    """TokenMap of a Qwen3-Omni batch `[batch, pos]` (left or right padded). Media metadata are consumed in
    order across the batch; an audio-in-video block is one run of media tokens holding both ids, checked
    against the processor's interleave (`layout.processor_av_order`). Items are clips (`clip_numbers`).
    `text_parts`: `prepare`'s record of the user's text (`inputs["text_parts"]`), which makes it question,
    options, instruction and label; without it all user text is question."""
    b, s = input_ids.shape
    parts = check_text_parts(text_parts, input_ids)
    record = check_media_items(media_items, input_ids)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = TokenMapBuilder(b, s)
    media = {ids.audio: "audio", ids.video: "video", ids.image: "image"}
    specials = {t for t in (ids.audio_start, ids.audio_end, ids.vision_start, ids.vision_end) if t is not None}
    grids = {"image": image_grid_thw, "video": video_grid_thw}
    spg = [] if video_second_per_grid is None else [float(x) for x in torch.as_tensor(video_second_per_grid).flatten()]
    used = {"audio": 0, "video": 0, "image": 0}
    for row in range(b):
        pos = mask[row].bool().nonzero().flatten().tolist()
        toks = input_ids[row, pos].tolist()
        for p, g in zip(pos, with_text_parts(text_groups(toks, chat), None if parts is None else parts[row, pos].tolist())):
            out.set(row, p, g)
        for p, t in zip(pos, toks):
            if t in specials:
                out.set(row, p, "template")
        runs = list(media_runs(toks, media))
        for (i, j, block), clip in zip(runs, clip_numbers(runs, *row_records(record, parts, row, pos))):
            kinds = set(block)
            if "image" in kinds and len(kinds) > 1:
                raise ValueError(f"row {row}: image placeholders at positions {pos[i]}..{pos[j - 1]} are mixed with other media")
            if kinds == {"audio", "video"}:
                vi, ai = used["video"], used["audio"]
                if video_grid_thw is None or audio_counts is None or vi >= len(video_grid_thw) or ai >= len(audio_counts):
                    raise ValueError(f"row {row}: an audio-in-video block has no matching video_grid_thw / audio features")
                if processor_av_order(video_grid_thw[vi].tolist(), spg[vi], audio_counts[ai], merge, per_second) != block:
                    raise ValueError(
                        f"row {row}: the audio-in-video block does not interleave its video and audio tokens as the "
                        f"processor does at {per_second} ids/s; build the ids with model.prepare")
            for kind in sorted(kinds):
                where = [pos[i + k] for k, m in enumerate(block) if m == kind]
                _fill(out, row, where, kind, clip, used[kind], grids, spg, audio_counts, merge, seconds_per_audio_token)
                used[kind] += 1
        if pos:
            out.set(row, pos[-1], "last")
    for kind, n in used.items():
        have = len(audio_counts or []) if kind == "audio" else (0 if grids[kind] is None else len(grids[kind]))
        if n != have:
            raise ValueError(f"the ids hold {n} {kind} item(s) but the metadata describes {have}; pass the inputs "
                             "the processor (or model.prepare) built together")
    return out.build()


def _fill(out, row, where, kind, item, index, grids, spg, audio_counts, merge, sec_per_audio_token) -> None:
    if kind == "audio":
        fill_audio(out, row, where, item, index, audio_counts, sec_per_audio_token)
        return
    frame = fill_grid(out, row, where, kind, item, index, grids, merge)
    if frame is None:
        return
    if index >= len(spg):
        raise ValueError("video inputs need video_second_per_grid (the processor returns it)")
    step = spg[index]
    out.set(row, where, "video", item=item, frame=frame, time=frame * step, time_end=(frame + 1) * step)


def model_token_map(model, inputs: dict, tokenizer=None, chat=None) -> TokenMap:
    """`qwen3_omni_token_map` of a `HookedQwen3Omni`'s inputs; the chat structure comes from `chat`, else the
    tokenizer (`model.tokenizer`), else all text is "question"; the closing audio / vision ids from the
    config, else the tokenizer. `inputs["text_parts"]` (from `prepare`) splits the user's text."""
    tok = tokenizer if tokenizer is not None else model.tokenizer
    fam = inputs.get("feature_attention_mask")
    counts = None if fam is None else audio_token_counts(fam, model.n_window)
    return qwen3_omni_token_map(
        inputs["input_ids"], inputs.get("attention_mask"), token_ids(model.hf_config, tok),
        chat_tokens(tok, chat, model.cfg.d_vocab, model.ids.vision_start),
        inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), counts, inputs.get("video_second_per_grid"),
        model.merge, model.position_id_per_seconds, audio_seconds_per_token(model.n_window), inputs.get("text_parts"),
        inputs.get("media_items"),
    )
