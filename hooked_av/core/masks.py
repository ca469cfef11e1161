"""Additive attention masks, built once per forward and shared (broadcast) by every layer."""

from __future__ import annotations

import torch
from torch import Tensor


def neg_inf(dtype: torch.dtype) -> float:
    """The large negative that masks a key (HF's `finfo(dtype).min`: finite, so a fully masked
    padding row gives a uniform pattern instead of NaN)."""
    return torch.finfo(dtype).min


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool `allowed` -> additive float mask (0 where allowed, `neg_inf` where not)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, neg_inf(dtype))


def causal_allowed(attention_mask: Tensor | None, q_len: int, k_len: int, batch: int, device) -> Tensor:
    """bool `[batch, 1, q_len, k_len]`: query i (the last `q_len` of `k_len` positions) sees key j
    when j <= i and key j is not padding (`attention_mask` `[batch, k_len]`, 1 = real token)."""
    offset = k_len - q_len
    q_idx = torch.arange(q_len, device=device)[:, None] + offset
    k_idx = torch.arange(k_len, device=device)[None, :]
    allowed = (k_idx <= q_idx)[None, None].expand(batch, 1, q_len, k_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :k_len].bool()
    return allowed



def open_mask(batch: int, q_len: int, k_len: int, causal: bool, dtype: torch.dtype, device) -> Tensor:
    """The additive mask that masks nothing, `[batch, 1, q_len, k_len]`: causal, or all zeros."""
    if causal:
        return additive(causal_allowed(None, q_len, k_len, batch, device), dtype)
    return torch.zeros(batch, 1, q_len, k_len, dtype=dtype, device=device)


def positions_or_mask(positions, seq: int, what: str, per_row_ints: bool = False) -> Tensor:
    """`positions` (ints, a bool mask, a Selection's `.mask`, or a tensor of either) as a tensor, refusing
    what would be misread: float positions (truncated otherwise), an integer tensor of 0/1 values as long as
    the positions (a mask of another dtype, e.g. an attention_mask row: read as indices it names positions 0
    and 1), and, unless `per_row_ints`, a 2-D integer tensor (int positions name the same positions in every
    row)."""
    t = torch.as_tensor(getattr(positions, "mask", positions))
    if t.dtype == torch.bool:
        return t
    if t.numel() == 0:  # `[]` is a float tensor to torch; the caller says that it selects nothing
        return t.long()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what}: positions must be ints or a bool mask, got {t.dtype} values; pass int positions")
    if seq >= 3 and t.dim() >= 1 and t.shape[-1] == seq and bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{what}: {tuple(t.shape)} 0/1 values of dtype {t.dtype} look like a mask over the {seq} "
                         "positions, which would be read as the indices 0 and 1; pass it as a bool mask (.bool()) "
                         "or list the positions")
    if t.dim() >= 2 and not per_row_ints:
        raise ValueError(f"{what}: int positions of shape {tuple(t.shape)}; int positions name the same positions in "
                         "every row: pass a 1-D list, or a bool mask [batch, pos] for per-row positions")
    return t
