"""Modality zeroing at the media level (the cross-modal-hub paper's corruption): the model inputs
that black frames or a silent waveform would have produced, with the same layout as the clean
inputs, so `causal_tracing(..., mode="inputs", corrupted=zero_modality(inputs, "audio"))` and
activation patching can pair them position by position.

Black frames: every pixel 0, i.e. `-mean / std` per channel after the processor's normalisation.
Silence: Whisper's log-mel of an all-zero waveform is `log10(1e-10) = -10` everywhere; its
dynamic-range clamp (max - 8) leaves that, and `(x + 4) / 4` makes it -1.5.
"""

from __future__ import annotations

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the Qwen2-VL image/video processors' defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SILENT_LOG_MEL = -1.5
PIXEL_KEYS = {"video": ("pixel_values_videos",), "image": ("pixel_values",), "vision": ("pixel_values", "pixel_values_videos")}


def black_patch_rows(rows: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Patch rows `[n, C * T * P * P]` (channel-major, as the Qwen2-VL processors flatten) of black frames."""
    c = len(mean)
    per = rows.shape[1] // c
    value = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=rows.dtype, device=rows.device)
    return value.repeat_interleave(per).expand_as(rows).clone()


def zero_modality(inputs: dict, modality: str, mean=CLIP_MEAN, std=CLIP_STD) -> dict:
    """A copy of processor-style `inputs` with `modality` ("audio", "video", "image", "vision")
    replaced by silence / black frames. Token ids, masks and grids are unchanged."""
    if modality not in ("audio", *PIXEL_KEYS):
        raise ValueError(f"modality must be 'audio', 'video', 'image' or 'vision', got {modality!r}")
    out = dict(inputs)
    if modality == "audio":
        key = "input_features" if "input_features" in inputs else "audio_feature"
        if key not in inputs:
            raise ValueError("these inputs have no audio (no input_features) to silence")
        out[key] = torch.full_like(inputs[key], SILENT_LOG_MEL)
        return out
    present = [k for k in PIXEL_KEYS[modality] if k in inputs]
    if not present:
        raise ValueError(f"these inputs have no {modality} pixels ({' or '.join(PIXEL_KEYS[modality])}) to black out")
    for k in present:
        out[k] = black_patch_rows(inputs[k], mean, std)
    return out
