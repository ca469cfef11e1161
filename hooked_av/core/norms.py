"""Normalisation layers with TransformerLens hook points (`hook_scale`, `hook_normalized`)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class RMSNorm(nn.Module):
    """Qwen-style RMSNorm: normalise in fp32, cast back, then multiply by the weight.

    `hook_scale` is the root mean square `sqrt(mean(x^2) + eps)` `[..., 1]`, the denominator, as in
    TransformerLens (its `apply_ln_to_stack` divides by it); `hook_normalized` is the output,
    weight included. Unhooked, the output is computed exactly as HF does (`x * rsqrt(...)`).
    """

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        dtype = x.dtype
        x32 = x.float()
        mean_sq = x32.pow(2).mean(-1, keepdim=True) + self.eps
        if self.hook_scale.has_hooks():
            normed = x32 / self.hook_scale(mean_sq.sqrt())
        else:
            normed = x32 * torch.rsqrt(mean_sq)
        return self.hook_normalized(self.weight * normed.to(dtype))


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameter names) with `hook_scale` (the std, `[..., 1]`; read-only: an
    edit does not feed back, the output keeps the fused kernel) and `hook_normalized`."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__(d, eps=eps)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        if self.hook_scale.has_hooks():  # an observation only: the output keeps the fused kernel
            var = x.float().var(-1, keepdim=True, unbiased=False)
            self.hook_scale((var + self.eps).sqrt().to(x.dtype))
        return self.hook_normalized(super().forward(x))
