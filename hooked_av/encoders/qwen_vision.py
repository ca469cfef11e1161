"""The Qwen2.5-VL vision tower (also Qwen2.5-Omni's): patch embedding, 2D RoPE, window and
full-attention blocks, and the 2x2 patch merger.

Patches stay in the processor's order, `(h_block, w_block, ih, iw)` within a frame with each 2x2
merge block contiguous, and the tower runs with one batch row per frame (temporal grid step of an
image or video): full-attention blocks never attend across frames, so nothing `[n, n]` over a whole
clip is ever built. Window attention is an explicit per-frame block mask instead of HF's token
permutation, so a hook on `vision_encoder.blocks.{i}` indexes patches by (frame, h, w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention
from hooked_av.core.block import Block
from hooked_av.core.masks import additive
from hooked_av.core.mlp import GatedMLP
from hooked_av.core.norms import RMSNorm
from hooked_av.core.rope import apply_rotary_fp32, vision_cos_sin


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch), i.e. a matmul (kept as Conv3d
    so the checkpoint's `patch_embed.proj.weight` loads as is). `[n_patches, C * T * P * P]` ->
    `[n_patches, d_model]`; `bias`: Qwen3-VL's has one, Qwen2.5-VL's not."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, d_model: int, bias: bool = False):
        super().__init__()
        k = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, d_model, kernel_size=k, stride=k, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


class Merger(nn.Module):
    """`[n_patches, d_model]` (each 2x2 merge block contiguous) -> `[n_patches / merge**2, out_dim]`:
    the norm (eps 1e-6) per patch, the merge block's patches concatenated, Linear, GELU, Linear.
    `norm`: RMSNorm (Qwen2.5-VL) or LayerNorm (Qwen3-VL); `postshuffle`: the norm runs after the
    concatenation, over `d_model * merge**2` (Qwen3-VL's DeepStack mergers)."""

    def __init__(self, d_model: int, out_dim: int, merge: int = 2, norm: type[nn.Module] = RMSNorm,
                 postshuffle: bool = False):
        super().__init__()
        self.d_in = d_model * merge**2
        self.postshuffle = postshuffle
        self.ln_q = norm(self.d_in if postshuffle else d_model, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.d_in, self.d_in), nn.GELU(), nn.Linear(self.d_in, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.postshuffle:
            return self.mlp(self.ln_q(x.reshape(-1, self.d_in)))
        return self.mlp(self.ln_q(x).view(-1, self.d_in))


def merge_block_coords(h: int, w: int, merge: int) -> Tensor:
    """(row, column) of each patch of one `h x w`-patch frame in the processor's order, long
    `[h * w, 2]`: `(h_block, w_block, ih, iw)`, each `merge x merge` block contiguous."""
    hb, wb, ih, iw = torch.meshgrid(
        torch.arange(h // merge), torch.arange(w // merge), torch.arange(merge), torch.arange(merge), indexing="ij"
    )
    return torch.stack([(hb * merge + ih).flatten(), (wb * merge + iw).flatten()], -1)


def run_images_and_videos(tower: nn.Module, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
    """ONE call of `tower` on the images' and the videos' patches together (images' frames first), so
    every tower hook fires once per forward and a cache holds all the frames (two calls would leave
    the videos' activations only). Returns `(output, n_image_patches)`, or None when no media is given."""
    given = [(p, g) for p, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)) if p is not None]
    if not given:
        return None
    out = tower(torch.cat([p for p, _ in given]), torch.cat([g.to(given[0][1].device) for _, g in given]))
    return out, 0 if pixel_values is None else int(image_grid_thw.prod(-1).sum())


def vision_tower_settings(v) -> dict:
    """`QwenVisionEncoder` arguments (plus `act_fn`) from a HF Qwen2.5-VL / Omni vision config."""
    return dict(
        d_model=v.hidden_size, n_layers=v.depth, n_heads=v.num_heads, d_mlp=v.intermediate_size,
        out_dim=v.out_hidden_size, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        in_channels=v.in_channels, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
        fullatt_block_indexes=tuple(v.fullatt_block_indexes), act_fn=v.hidden_act,
        rope_theta=float((getattr(v, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
    )


class QwenVisionEncoder(nn.Module):
    """Input: `pixel_values` `[n_patches, C * T * P * P]` and `grid_thw` `[n_items, 3]` (patch grid
    per image/video). Output: `[n_patches / merge**2, out_dim]` in the same order.

    Hook points: `hook_patch_embed` and the blocks' (`blocks.{i}.*`) with shape `[frames, patches,
    d]`, one row per temporal grid step of every item in order; attention `[frames, heads, patches,
    patches]` (window blocks see their 112-px window, full blocks the whole frame). When items of
    different sizes share a call, rows are right-padded to the largest frame and padded keys are
    masked; `hook_out` `[n_patches / merge**2, out_dim]`.
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

    def frame_layout(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """One `h x w`-patch frame in processor order: (row, column) `[h * w, 2]` and window id `[h * w]`."""
        m, wm = self.merge, self.window_merged
        hw = merge_block_coords(h, w, m)
        n_win_w = -(-(w // m) // wm)
        return hw, (hw[:, 0] // m // wm) * n_win_w + hw[:, 1] // m // wm

    def images_and_videos(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """`(image tokens, video tokens)` (each None when not given) from ONE call of the tower
        (`run_images_and_videos`)."""
        ran = run_images_and_videos(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if ran is None:
            return None, None
        out, n_image = ran[0], ran[1] // self.merge**2
        return (out[:n_image] if pixel_values is not None else None,
                out[n_image:] if pixel_values_videos is not None else None)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        frames = [(h, w) for t, h, w in grid_thw.tolist() for _ in range(t)]
        sizes = [h * w for h, w in frames]
        width = max(sizes)
        dev = pixel_values.device
        x = self.patch_embed(pixel_values)
        rows = nn.utils.rnn.pad_sequence(list(x.split(sizes)), batch_first=True)  # [frames, width, d]
        x = self.hook_patch_embed(rows)

        layouts = {hw: self.frame_layout(*hw) for hw in set(frames)}
        hw = torch.stack([F.pad(layouts[f][0], (0, 0, 0, width - n)) for f, n in zip(frames, sizes)]).to(dev)
        cos, sin = vision_cos_sin(hw.view(-1, 2), self.d_head, self.rope_theta)
        cos, sin = cos.view(len(frames), width, -1), sin.view(len(frames), width, -1)

        def rotary(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return apply_rotary_fp32(q, k, cos, sin)

        if len(layouts) == 1:  # one frame geometry: no padding, one window mask for every frame
            win = layouts[frames[0]][1].to(dev)
            full_mask = None
            window_mask = additive((win[:, None] == win[None, :])[None, None], x.dtype)
        else:
            win = torch.stack([F.pad(layouts[f][1], (0, width - n), value=-1) for f, n in zip(frames, sizes)]).to(dev)
            real = torch.arange(width, device=dev)[None, :] < torch.tensor(sizes, device=dev)[:, None]
            keys = real[:, None, None, :]
            full_mask = additive(keys.expand(-1, 1, width, -1), x.dtype)
            window_mask = additive((win[:, :, None] == win[:, None, :])[:, None] & keys, x.dtype)
        for i, block in enumerate(self.blocks):
            mask = full_mask if i in self.fullatt_block_indexes else window_mask
            x = block(x, mask=mask, rotary=rotary)
        if len(layouts) > 1:
            x = x[real]
        return self.hook_out(self.merger(x.reshape(-1, x.shape[-1])))
