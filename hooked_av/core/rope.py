"""Rotary position embeddings: multimodal RoPE (M-RoPE / TMRoPE) for the language model and the
axial 2D RoPE of the Qwen2.5-VL vision tower.

Inverse frequencies are computed in fp32 at call time (never stored as buffers), so casting the
model to bf16 cannot round them: this is what HF's `from_pretrained(dtype=bf16)` preserves too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def inv_freq(dim: int, theta: float, device=None) -> Tensor:
    """`1 / theta ** (arange(0, dim, 2) / dim)` in fp32, `[dim // 2]`."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))


def mrope_rows(head_dim: int, sections: Sequence[int], interleaved: bool, device=None) -> Tensor:
    """Which position row (0 temporal, 1 height, 2 width) gives each of the `head_dim // 2` frequency
    bands their angle, long `[head_dim // 2]`.

    Sectioned (Qwen2-VL / Qwen2.5-Omni, transformers `qwen2_5_omni`): band section `i` of `sections`
    takes row `i % 3`. Interleaved (Qwen3-VL / Qwen3-Omni, transformers `qwen3_omni_moe`,
    `recomposition_frequencies`): bands cycle t, h, w; band `j` takes row 1 when `j % 3 == 1` and
    `j < 3 * sections[1]`, row 2 when `j % 3 == 2` and `j < 3 * sections[2]`, else row 0."""
    n = head_dim // 2
    if interleaved:
        j = torch.arange(n, device=device)
        rows = torch.zeros(n, dtype=torch.long, device=device)
        for row in (1, 2):
            rows[(j % 3 == row) & (j < 3 * sections[row])] = row
        return rows
    if sum(sections) != n:
        raise ValueError(f"mrope sections {list(sections)} sum to {sum(sections)}, the head has {n} frequency bands")
    return torch.cat([torch.full((s,), i % 3, dtype=torch.long, device=device) for i, s in enumerate(sections)])


def mrope_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, sections: Sequence[int], dtype: torch.dtype,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    """cos/sin for M-RoPE.

    position_ids: `[3, batch, pos]` (temporal, height, width rows). Each frequency band takes its
    angle from the row `mrope_rows` assigns it. Returns cos, sin `[batch, pos, head_dim]` cast to
    `dtype` (HF rotates text q/k in the model dtype).
    """
    freqs = position_ids[..., None].float() * inv_freq(head_dim, theta, position_ids.device)
    cos, sin = freqs.cos(), freqs.sin()  # [3, batch, pos, head_dim // 2]
    rows = mrope_rows(head_dim, sections, interleaved, position_ids.device)

    def pick(f: Tensor) -> Tensor:
        f = f.gather(0, rows.view(1, 1, 1, -1).expand(1, *f.shape[1:]))[0]
        return torch.cat((f, f), dim=-1).to(dtype)

    return pick(cos), pick(sin)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q `[batch, pos, heads, d]` and k `[batch, pos, kv_heads, d]` by cos/sin `[batch, pos, d]`
    in the dtype of q (text convention)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rotary_fp32(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Vision convention: rotate in fp32 and cast back to the input dtype."""
    dtype = q.dtype
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q32, k32 = q.float(), k.float()
    q_rot = q32 * cos + rotate_half(q32) * sin
    k_rot = k32 * cos + rotate_half(k32) * sin
    return q_rot.to(dtype), k_rot.to(k.dtype)


def vision_cos_sin(hw: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """2D RoPE of the vision tower. hw: `[n_patches, 2]` (row, column) patch coordinates.

    Each patch gets angles `[h * inv, w * inv]` with `inv` over `head_dim // 2`, duplicated to
    `head_dim`; returned in fp32 `[n_patches, head_dim]`.
    """
    inv = inv_freq(head_dim // 2, theta, hw.device)
    freqs = hw[..., None].float() * inv  # [n, 2, head_dim // 4]
    freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()
