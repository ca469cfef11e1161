"""Modality zeroing at the media level (the cross-modal-hub paper's corruption): the model inputs
that black frames or a silent waveform would have produced, with the same layout as the clean
inputs, so `causal_tracing(..., mode="inputs", corrupted=zero_modality(inputs, "audio", model))` and
activation patching can pair them position by position.

Black frames: every pixel 0, i.e. `-mean / std` per channel after the processor's normalisation.
Silence: the level the feature extractor gives an all-zero waveform. Both come from the model's own
processor (`model.media_constants`, a `hooked_av.inputs.media.MediaConstants`).
"""

from __future__ import annotations

import torch

from hooked_av.inputs.media import MediaConstants, stock_media_constants

PIXEL_KEYS = {"video": ("pixel_values_videos",), "image": ("pixel_values",), "vision": ("pixel_values", "pixel_values_videos")}


def black_patch_rows(rows: torch.Tensor, mean, std) -> torch.Tensor:
    """Patch rows `[n, C * T * P * P]` (channel-major, as the Qwen2-VL processors flatten) of black
    frames, for per-channel `mean` / `std`."""
    c = len(mean)
    per = rows.shape[1] // c
    value = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=rows.dtype, device=rows.device)
    return value.repeat_interleave(per).expand_as(rows).clone()


def zero_modality(inputs: dict, modality: str, model=None, constants: MediaConstants | None = None) -> dict:
    """A copy of processor-style `inputs` with `modality` ("audio", "video", "image", "vision")
    replaced by silence / black frames. Token ids, masks and grids are unchanged. The numbers come
    from `constants` when given, else `model.media_constants`, else the stock Qwen2-VL / Whisper
    components both supported families ship with (`hooked_av.inputs.media.stock_media_constants`)."""
    if modality not in ("audio", *PIXEL_KEYS):
        raise ValueError(f"modality must be 'audio', 'video', 'image' or 'vision', got {modality!r}")
    if constants is not None and model is not None:
        raise ValueError("pass model= or constants=, not both: the constants would override the model's")
    out = dict(inputs)
    if modality == "audio":
        key = "input_features" if "input_features" in inputs else "audio_feature"
        if key not in inputs:
            raise ValueError("these inputs have no audio (no input_features) to silence")
    else:
        present = [k for k in PIXEL_KEYS[modality] if k in inputs]
        if not present:
            raise ValueError(f"these inputs have no {modality} pixels ({' or '.join(PIXEL_KEYS[modality])}) to black out")
    c = constants or (model.media_constants if model is not None else stock_media_constants())
    if modality == "audio":
        out[key] = torch.full_like(inputs[key], c.silent_log_mel)
        return out
    for k in present:
        out[k] = black_patch_rows(inputs[k], c.image_mean, c.image_std)
    return out


def zero_media(model, inputs: dict, modality: str) -> dict:
    """The cross-modal-hub paper's corruption of `inputs` (`kaistmm/crossmodal-hub`, its audio-only and
    video-only runs): `modality` black or silent at the media level with `model`'s own constants
    (`zero_modality(inputs, modality, model=model)`)."""
    return zero_modality(inputs, modality, model=model)
