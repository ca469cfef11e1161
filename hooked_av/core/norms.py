"""Normalisation layers with TransformerLens hook points (`hook_scale`, `hook_normalized`)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class RMSNorm(nn.Module):
    """Qwen-style RMSNorm: normalise in fp32, cast back, then multiply by the weight.

    `hook_scale` is the reciprocal root-mean-square `[..., 1]` (what TransformerLens's `apply_ln`
    divides by); `hook_normalized` is the output, weight included.
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
        scale = self.hook_scale(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.hook_normalized(self.weight * (x32 * scale).to(dtype))


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameter names) with `hook_scale` (1/std) and `hook_normalized`."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__(d, eps=eps)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        if self.hook_scale.has_hooks():  # only computed when someone looks: the output uses the fused kernel
            var = x.float().var(-1, keepdim=True, unbiased=False)
            self.hook_scale(torch.rsqrt(var + self.eps).to(x.dtype))
        return self.hook_normalized(super().forward(x))
