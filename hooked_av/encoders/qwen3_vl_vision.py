"""The Qwen3-VL vision tower as Qwen3-Omni ships it (transformers `qwen3_omni_moe`,
`Qwen3OmniMoeVisionEncoder`): Conv3d patch embedding (patch 16, temporal 2, with bias), a learned
48 x 48 position table resampled to each frame's grid, 2D RoPE, LayerNorm blocks with a plain
`linear_fc1 -> gelu(tanh) -> linear_fc2` MLP attending within one frame, the 2x2 merger, and the
DeepStack mergers that turn the output of blocks `deepstack_indexes` into extra features which the
language model adds after its first layers.

Patches stay in the processor's order (each 2x2 merge block contiguous) and the tower runs with one
batch row per frame, as `QwenVisionEncoder` does: nothing `[n, n]` over a whole clip is built, and
a hook on `blocks.{i}` indexes patches by (frame, patch). Defaults follow the anchor (transformers
5.24 `Qwen3OmniMoeVisionEncoderConfig` class defaults).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention
from hooked_av.core.block import Block
from hooked_av.core.checkpoint import apply_key_table
from hooked_av.core.masks import additive
from hooked_av.core.mlp import MLP
from hooked_av.core.norms import LayerNorm
from hooked_av.core.rope import apply_rotary_fp32, vision_cos_sin
from hooked_av.encoders.qwen_vision import Merger, PatchEmbed, merge_block_coords, run_images_and_videos

# HF vision-tower key (after `visual.`, `thinker.visual.` or `model.visual.`) -> ours; the first row
# whose pattern matches the whole key wins. `blocks.{i}.attn.qkv` is fused in HF: see FUSED_QKV.
VISION_KEYS = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"pos_embed\.weight", "pos_embed.weight"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.ln1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.ln2.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.(linear_fc1|linear_fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"(merger|merger_list\.\d+)\.ln_q\.(weight|bias)", r"\1.ln_q.\2"),
    (r"(merger|merger_list\.\d+)\.mlp\.(0|2)\.(weight|bias)", r"\1.mlp.\2.\3"),
]
FUSED_QKV = r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)"  # rows [q; k; v] -> our attn.q, attn.k, attn.v


def convert_vision_key(rest: str, t: Tensor) -> list[tuple[str, Tensor]] | None:
    """One HF vision-tower key (without its prefix) -> `[(our name, tensor)]` (a fused `qkv` gives
    three); None for a key no row knows."""
    m = re.fullmatch(FUSED_QKV, rest)
    if m:
        return [(f"blocks.{m.group(1)}.attn.{n}.{m.group(2)}", x) for n, x in zip("qkv", t.chunk(3, dim=0))]
    return apply_key_table(VISION_KEYS, rest, t)


def vision_settings(v) -> dict:
    """`Qwen3VisionEncoder` keyword arguments from a HF `Qwen3OmniMoeVisionEncoderConfig`."""
    return dict(
        d_model=v.hidden_size, n_layers=v.depth, n_heads=v.num_heads, d_mlp=v.intermediate_size,
        out_dim=v.out_hidden_size, deepstack_indexes=tuple(v.deepstack_visual_indexes), patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, in_channels=v.in_channels, spatial_merge_size=v.spatial_merge_size,
        num_position_embeddings=v.num_position_embeddings, act=v.hidden_act,
        rope_theta=float((v.rope_parameters or {}).get("rope_theta", 10000.0)),
    )


def resampled_positions(table: Tensor, hw: Tensor, h: int, w: int) -> Tensor:
    """The square learned table `[side * side, d]` resampled bilinearly (align_corners=True: the grid's
    corners land on the table's) to an `h x w` grid, at patch coordinates `hw` (long `[n, 2]`):
    `[n, d]` in fp32. Weights are fp32 and the four taps are summed in fp32, as HF's
    `get_vision_interpolation_indices_and_weights` + weighted embedding sum."""
    side = math.isqrt(table.shape[0])

    def taps(index: Tensor, size: int) -> tuple[Tensor, Tensor]:
        src = index.float() * (side - 1) / max(size - 1, 1)
        low = src.floor()
        frac = src - low
        low = low.long()
        return torch.stack([low, (low + 1).clamp(max=side - 1)], -1), torch.stack([1 - frac, frac], -1)

    (rows, row_w), (cols, col_w) = taps(hw[:, 0], h), taps(hw[:, 1], w)
    index = (rows[:, :, None] * side + cols[:, None, :]).flatten(1)  # [n, 4]
    weight = (row_w[:, :, None] * col_w[:, None, :]).flatten(1)
    return (table[index] * weight[..., None]).sum(1)


class Qwen3VisionEncoder(nn.Module):
    """Input: `pixel_values` `[n_patches, C * T * P * P]` and `grid_thw` `[n_items, 3]` (patch grid per
    image/video). Output: `(tokens, deepstack)`: tokens `[n_patches / merge**2, out_dim]` in the same
    order, deepstack `[len(deepstack_indexes), n_patches / merge**2, out_dim]`, one tap per entry of
    `deepstack_indexes` in block order (HF's `deepstack_features` order).

    Hook points, one row per temporal grid step of every item in order, rows right-padded to the
    largest frame when sizes differ (padded keys masked):
      hook_patch_embed, hook_pos_embed   `[frames, patches, d_model]` (the patch embedding and the
                                         resampled learned positions; their sum enters block 0)
      blocks.{i}.*                       `[frames, patches, d_model]`; attention `[frames, heads, patches, patches]`
      hook_deepstack.{j}                 `[n_patches / merge**2, out_dim]`: merger_list.{j}'s output
                                         (the tap of block `deepstack_indexes[j]`)
      hook_out                           `[n_patches / merge**2, out_dim]`
    """

    def __init__(
        self,
        d_model: int = 1152,
        n_layers: int = 27,
        n_heads: int = 16,
        d_mlp: int = 4304,
        out_dim: int = 3584,
        deepstack_indexes: tuple[int, ...] = (8, 16, 24),
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        in_channels: int = 3,
        spatial_merge_size: int = 2,
        num_position_embeddings: int = 2304,
        act: str = "gelu_pytorch_tanh",
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        bad = [i for i in deepstack_indexes if not 0 <= i < n_layers]
        if bad or len(set(deepstack_indexes)) != len(deepstack_indexes):
            raise ValueError(f"deepstack_indexes {list(deepstack_indexes)} must be distinct block indexes in "
                             f"0..{n_layers - 1}; out of range or repeated: {bad or list(deepstack_indexes)}")
        if math.isqrt(num_position_embeddings) ** 2 != num_position_embeddings:
            raise ValueError(f"num_position_embeddings ({num_position_embeddings}) must be a square: the learned "
                             "positions are a side x side grid")
        self.d_head = d_model // n_heads
        self.merge = spatial_merge_size
        self.deepstack_indexes = tuple(deepstack_indexes)
        self.rope_theta = rope_theta
        self.patch_embed = PatchEmbed(in_channels, temporal_patch_size, patch_size, d_model, bias=True)
        self.patch_dim = in_channels * temporal_patch_size * patch_size**2
        self.pos_embed = nn.Embedding(num_position_embeddings, d_model)
        self.blocks = nn.ModuleList(
            Block(LayerNorm(d_model, eps=1e-6), Attention(d_model, n_heads, o_bias=True, names=("q", "k", "v", "proj")),
                  LayerNorm(d_model, eps=1e-6), MLP(d_model, d_mlp, act, names=("linear_fc1", "linear_fc2")))
            for _ in range(n_layers)
        )
        self.merger = Merger(d_model, out_dim, spatial_merge_size, norm=LayerNorm)
        self.merger_list = nn.ModuleList(
            Merger(d_model, out_dim, spatial_merge_size, norm=LayerNorm, postshuffle=True) for _ in deepstack_indexes
        )
        self.hook_patch_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.hook_deepstack = nn.ModuleList(HookPoint() for _ in deepstack_indexes)
        self.hook_out = HookPoint()

    def check_input(self, pixel_values: Tensor, grid_thw: Tensor) -> None:
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or bool((grid_thw <= 0).any()):
            raise ValueError(f"grid_thw must be [n_items, 3] positive (t, h, w) patch counts, got {grid_thw.tolist()}")
        if bool((grid_thw[:, 1:] % self.merge).any()):
            raise ValueError(f"every grid's h and w must be multiples of the merge size {self.merge}, got {grid_thw.tolist()}")
        n = int(grid_thw.prod(-1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape != (n, self.patch_dim):
            raise ValueError(f"pixel_values must be [{n}, {self.patch_dim}] (sum of t*h*w over grid_thw, C*T*P*P), "
                             f"got {tuple(pixel_values.shape)}")

    def images_and_videos(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """`(image, video)` from ONE call of the tower (`run_images_and_videos`), each `(tokens, deepstack)`
        as `forward` returns them for that kind alone, or None when not given."""
        ran = run_images_and_videos(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if ran is None:
            return None, None
        (tokens, deep), n_image = ran[0], ran[1] // self.merge**2
        return ((tokens[:n_image], deep[:, :n_image]) if pixel_values is not None else None,
                (tokens[n_image:], deep[:, n_image:]) if pixel_values_videos is not None else None)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
        self.check_input(pixel_values, grid_thw)
        frames = [(h, w) for t, h, w in grid_thw.tolist() for _ in range(t)]
        sizes = [h * w for h, w in frames]
        width, dev = max(sizes), pixel_values.device
        coords = {f: merge_block_coords(*f, self.merge).to(dev) for f in set(frames)}
        table = {f: resampled_positions(self.pos_embed.weight, coords[f], *f) for f in coords}

        def rows(per_frame: list[Tensor]) -> Tensor:  # [frames, width, ...], right-padded with zeros
            return nn.utils.rnn.pad_sequence(per_frame, batch_first=True)

        x = self.hook_patch_embed(rows(list(self.patch_embed(pixel_values).split(sizes))))
        x = x + self.hook_pos_embed(rows([table[f] for f in frames]).to(x.dtype))
        cos, sin = vision_cos_sin(rows([coords[f] for f in frames]).view(-1, 2), self.d_head, self.rope_theta)
        cos, sin = cos.view(len(frames), width, -1), sin.view(len(frames), width, -1)

        def rotary(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return apply_rotary_fp32(q, k, cos, sin)

        real = torch.arange(width, device=dev)[None, :] < torch.tensor(sizes, device=dev)[:, None]
        mask = None if len(coords) == 1 else additive(real[:, None, None, :].expand(-1, 1, width, -1), x.dtype)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, rotary=rotary)
            if i in self.deepstack_indexes:
                j = self.deepstack_indexes.index(i)
                taps.append(self.hook_deepstack[j](self.merger_list[j](x[real])))
        out = self.hook_out(self.merger(x[real]))
        return out, torch.stack(taps) if taps else out.new_zeros(0, *out.shape)
