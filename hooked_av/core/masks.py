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
