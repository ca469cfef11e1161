"""The Qwen2.5-VL vision tower (also Qwen2.5-Omni's): patch embedding, 2D RoPE, window and
full-attention blocks, and the 2x2 patch merger.

Patches stay in the processor's order throughout, `(item, t, h_block, w_block, ih, iw)` with each
2x2 merge block contiguous; window attention is an explicit block mask in that order instead of
HF's permutation, so a hook on `vision_encoder.blocks.{i}` indexes patches by (t, h, w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention
from hooked_av.core.block import Block
from hooked_av.core.masks import additive, block_diagonal_allowed
from hooked_av.core.mlp import GatedMLP
from hooked_av.core.norms import RMSNorm
from hooked_av.core.rope import apply_rotary_fp32, vision_cos_sin


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch), i.e. a matmul (kept as Conv3d
    so the checkpoint's `patch_embed.proj.weight` loads as is)."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, d_model: int):
        super().__init__()
        k = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, d_model, kernel_size=k, stride=k, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1))


class Merger(nn.Module):
    def __init__(self, d_model: int, out_dim: int, merge: int = 2):
        super().__init__()
        self.d_in = d_model * merge**2
        self.ln_q = RMSNorm(d_model, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.d_in, self.d_in), nn.GELU(), nn.Linear(self.d_in, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.d_in))


class QwenVisionEncoder(nn.Module):
    """Input: `pixel_values` `[n_patches, C * T * P * P]` and `grid_thw` `[n_items, 3]` (patch grid
    per image/video). Output: `[n_patches / merge**2, out_dim]` in the same order.

    Hook points: `hook_patch_embed` `[1, n, d]`, the blocks' (`blocks.{i}.*`, batch 1, attention
    `[1, heads, n, n]`: window blocks see their 112-px window, full blocks one frame), `hook_out`.
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int,
        out_dim: int,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        in_channels: int = 3,
        spatial_merge_size: int = 2,
        window_size: int = 112,
        fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31),
        act: str = "silu",
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        self.d_head = d_model // n_heads
        self.merge = spatial_merge_size
        self.window_merged = window_size // spatial_merge_size // patch_size
        self.fullatt_block_indexes = tuple(fullatt_block_indexes)
        self.rope_theta = rope_theta
        self.patch_embed = PatchEmbed(in_channels, temporal_patch_size, patch_size, d_model)
        self.blocks = nn.ModuleList(
            Block(
                RMSNorm(d_model, eps=1e-6),
                Attention(d_model, n_heads, o_bias=True, names=("q", "k", "v", "proj")),
                RMSNorm(d_model, eps=1e-6),
                GatedMLP(d_model, d_mlp, act, bias=True),
            )
            for _ in range(n_layers)
        )
        self.merger = Merger(d_model, out_dim, spatial_merge_size)
        self.hook_patch_embed = HookPoint()
        self.hook_out = HookPoint()

    def layout(self, grid_thw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per patch, in processor order: (h, w) coordinates `[n, 2]`, frame id and window id `[n]`."""
        m, wm = self.merge, self.window_merged
        hw, frame, window = [], [], []
        n_frames = n_windows = 0
        for t, h, w in grid_thw.tolist():
            hb, wb, ih, iw = torch.meshgrid(
                torch.arange(h // m), torch.arange(w // m), torch.arange(m), torch.arange(m), indexing="ij"
            )
            rows, cols = (hb * m + ih).flatten(), (wb * m + iw).flatten()
            hw.append(torch.stack([rows, cols], -1).repeat(t, 1))
            frame.append(n_frames + torch.arange(t).repeat_interleave(h * w))
            nwh, nww = -(-(h // m) // wm), -(-(w // m) // wm)
            win = ((hb // wm) * nww + wb // wm).flatten()
            window.append(n_windows + (torch.arange(t)[:, None] * nwh * nww + win[None, :]).flatten())
            n_frames += t
            n_windows += t * nwh * nww
        dev = grid_thw.device
        return torch.cat(hw).to(dev), torch.cat(frame).to(dev), torch.cat(window).to(dev)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        hw, frame, window = self.layout(grid_thw)
        x = self.hook_patch_embed(self.patch_embed(pixel_values).unsqueeze(0))
        cos, sin = vision_cos_sin(hw, self.d_head, self.rope_theta)

        def rotary(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return apply_rotary_fp32(q, k, cos, sin)

        full_mask = additive(block_diagonal_allowed(frame), x.dtype)
        window_mask = additive(block_diagonal_allowed(window), x.dtype)
        for i, block in enumerate(self.blocks):
            mask = full_mask if i in self.fullatt_block_indexes else window_mask
            x = block(x, mask=mask, rotary=rotary)
        return self.hook_out(self.merger(x[0]))
