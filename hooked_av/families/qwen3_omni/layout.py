"""Qwen3-Omni token arithmetic, the one place of it: the multimodal token ids (from the Thinker config),
tokens per audio clip, video temporal ids, seconds per audio token and the audio-in-video interleave rule.
Positions (`positions.py`), prompts (`prompt.py`), the TokenMap (`token_map.py`) and the tests call these.

Anchor: transformers 5.24 `qwen3_omni_moe` (`modeling_qwen3_omni_moe.py`, `get_rope_index`;
`processing_qwen3_omni_moe.py`, `replace_video_with_audio_token`). Units: temporal ids count
`position_id_per_seconds` per second (the config's; the released checkpoints use 13); audio token k of a
clip has temporal id k, i.e. one id per audio token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hooked_av.encoders.qwen3_omni_audio import audio_token_count  # the one frames -> tokens rule (the tower's)

# mel frames are 10 ms apart (WhisperFeatureExtractor hop 160 at 16 kHz, the processor's feature extractor)
MEL_SECONDS_PER_FRAME = 0.01


@dataclass(frozen=True)
class Qwen3OmniTokenIds:
    """Placeholder and delimiter ids. `audio_end` / `vision_end` are not read by HF's model (only the
    TokenMap labels them); None where neither the config nor the tokenizer names them."""

    audio: int
    image: int
    video: int
    audio_start: int
    vision_start: int
    audio_end: int | None = None
    vision_end: int | None = None


def token_ids(tc, tokenizer=None) -> Qwen3OmniTokenIds:
    """The ids of a `Qwen3OmniMoeThinkerConfig` (the released checkpoints' differ from the class
    defaults, e.g. audio 151675 / audio_start 151669, so they are always read from the config).
    `vision_start_token_id` is not a declared Thinker field, yet HF's `get_rope_index` reads it: a
    config without it is refused. The closing ids come from the config, else from `tokenizer`
    (`vision_eos_token` / `audio_eos_token`), else None."""
    vs = getattr(tc, "vision_start_token_id", None)
    if vs is None:
        raise ValueError(
            "the Thinker config has no vision_start_token_id, which Qwen3-Omni's position ids need (HF's "
            "get_rope_index reads it); add it to thinker_config in config.json (151652 in the released checkpoints)"
        )

    def closing(field: str, token_attr: str) -> int | None:
        got = getattr(tc, field, None)
        if got is None and tokenizer is not None and getattr(tokenizer, token_attr, None):
            got = tokenizer.convert_tokens_to_ids(getattr(tokenizer, token_attr))
        return None if got is None else int(got)

    return Qwen3OmniTokenIds(
        audio=int(tc.audio_token_id), image=int(tc.image_token_id), video=int(tc.video_token_id),
        audio_start=int(tc.audio_start_token_id), vision_start=int(vs),
        audio_end=closing("audio_end_token_id", "audio_eos_token"),
        vision_end=closing("vision_end_token_id", "vision_eos_token"),
    )


def audio_token_counts(lengths_or_mask: Tensor | list, n_window: int) -> list[int]:
    """Tokens per audio clip from a `feature_attention_mask` `[n_audio, frames]` or frame counts `[n_audio]`
    (`encoders.qwen3_omni_audio.audio_token_count`, right for any `n_window`; HF's
    `_get_feat_extract_output_lengths` writes 13 tokens per chunk as a literal, right at n_window 50 only)."""
    t = torch.as_tensor(lengths_or_mask)
    frames = t.sum(-1) if t.dim() == 2 else t
    return audio_token_count(frames.long(), n_window).tolist()


def audio_seconds_per_token(n_window: int) -> float:
    """Seconds one audio token spans in a full chunk: `2 * n_window` mel frames (1 s at n_window 50) make
    13 tokens, so 1/13 s; temporal ids count one per token, which equals seconds only at 13 ids/s."""
    chunk = 2 * n_window
    return chunk * MEL_SECONDS_PER_FRAME / int(audio_token_count(torch.tensor(chunk), n_window))


def video_temporal_ids(grid_t: int, second_per_grid, per_second: float) -> Tensor:
    """Temporal id of each temporal grid step, fp32 `[grid_t]`, not truncated: `t * second_per_grid *
    per_second` in HF's order and precision (`get_rope_index`)."""
    spg = torch.as_tensor(second_per_grid).cpu().float()
    return (torch.arange(grid_t) * spg * per_second).float()


def image_temporal_ids(grid_t: int, per_second: float) -> Tensor:
    """Temporal ids of an image's grid steps (`t * 1 * per_second`, as HF), fp32 `[grid_t]`."""
    return (torch.arange(grid_t) * 1 * per_second).float()


def av_order(video_ids, audio_ids) -> list[str]:
    """The audio-in-video rule: the video and audio tokens of one clip merged one by one in order of
    temporal id, video first on ties (no chunks). `video_ids` `[n_video]`, `audio_ids` `[n_audio]`
    (non-decreasing, any precision: the processor compares in float64, the model in float32, and each
    caller passes its own). Returns "video" / "audio" per token in sequence order."""
    v, a = list(video_ids), list(audio_ids)
    out, i, j = [], 0, 0
    while i < len(v) and j < len(a):
        if v[i] <= a[j]:
            out.append("video")
            i += 1
        else:
            out.append("audio")
            j += 1
    return out + ["video"] * (len(v) - i) + ["audio"] * (len(a) - j)


def processor_av_order(grid_thw, second_per_grid: float, n_audio: int, merge: int, per_second: float) -> list[str]:
    """`av_order` of one video `(t, h, w)` and its `n_audio` audio tokens as the processor lays them out:
    float64 temporal ids `t * second_per_grid * per_second`, one per merged patch (HF
    `Qwen3OmniMoeProcessor.replace_video_with_audio_token`)."""
    t, h, w = (int(x) for x in grid_thw)
    per_frame = (h // merge) * (w // merge)
    v = np.repeat(np.arange(t), per_frame) * float(second_per_grid) * per_second
    return av_order(v.tolist(), np.arange(n_audio).tolist())
