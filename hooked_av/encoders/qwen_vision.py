"""The Qwen2.5-VL vision tower (also Qwen2.5-Omni's): patch embedding, 2D RoPE, window and
full-attention blocks, and the 2x2 patch merger.

Patches stay in the processor's order, `(h_block, w_block, ih, iw)` within a frame with each 2x2
merge block contiguous, and the tower runs with one batch row per frame (temporal grid step of an
image or video): full-attention blocks never attend across frames, so nothing `[n, n]` over a whole
clip is ever built. A window block's attention takes one batch row per (frame, window) and puts
every patch back in its place after it, instead of HF's permutation of the whole residual stream,
so a hook on `vision_encoder.blocks.{i}` indexes patches by (frame, h, w) in every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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


@dataclass(frozen=True)
class WindowRows:
    """The batch rows of the window blocks' attention: one row per (frame, window).

    Rows are frame-major, frames in the order of the block hooks' rows (items in order, then their
    temporal steps); within a frame, windows in raster order (window row, then window column) of
    `window_size`-px tiles from the frame's top-left corner, partial at the bottom and right edges
    (Qwen2.5-VL's partition, HF `get_vision_window_index`). Within a row, the window's patches in
    the processor's order, then padding up to the largest window of the call (padded keys masked).

    frame        long `[rows]`: the frame (row of `blocks.{i}.hook_*`) a window row belongs to
    window       long `[rows]`: the window's index within its frame
    patch        long `[rows, w]`: index of each slot's patch in its frame (the block hooks' patch
                 axis); -1 marks padding. `hook_pattern[r, h, i, j]` is how much patch `patch[r, i]`
                 of frame `frame[r]` attends to patch `patch[r, j]` of the same frame.
    frame_width  patches per block-hook row (the largest frame of the call)
    """

    frame: Tensor
    window: Tensor
    patch: Tensor
    frame_width: int

    @cached_property
    def n_frames(self) -> int:
        return int(self.frame[-1]) + 1

    @cached_property
    def real(self) -> Tensor:
        """bool `[rows, w]`: the slots that hold a patch."""
        return self.patch >= 0

    # built once per call of the tower and reused by every window block (cached_property writes the
    # instance's __dict__, which a frozen dataclass allows)
    @cached_property
    def _gather(self) -> Tensor:  # long [rows, w]: each slot's position in the flattened [frames * width]
        return self.frame[:, None] * self.frame_width + self.patch.clamp(min=0)

    @cached_property
    def _source(self) -> Tensor:
        """long `[frames * width]`: each frame position's slot in the flattened `[rows * w]`, or
        `rows * w` (one past the end: a zero row) for frame padding."""
        rows, w = self.patch.shape
        source = torch.full((self.n_frames * self.frame_width,), rows * w, dtype=torch.long, device=self.patch.device)
        source[self._gather[self.real]] = torch.arange(rows * w, device=self.patch.device).view(rows, w)[self.real]
        return source

    def to(self, device) -> "WindowRows":
        return WindowRows(self.frame.to(device), self.window.to(device), self.patch.to(device), self.frame_width)

    def to_windows(self, x: Tensor) -> Tensor:
        """`[frames, frame_width, ...]` -> `[rows, w, ...]` (padding slots repeat the frame's first patch)."""
        return x.flatten(0, 1)[self._gather]

    def to_frames(self, y: Tensor) -> Tensor:
        """`[rows, w, ...]` -> `[frames, frame_width, ...]`: every patch back at its place; frame
        positions past a smaller frame's patches (frame padding) get zeros."""
        flat = torch.cat([y.flatten(0, 1), y.new_zeros(1, *y.shape[2:])])
        return flat[self._source].view(self.n_frames, self.frame_width, *y.shape[2:])

    @cached_property
    def _frame_padding(self) -> Tensor | None:
        """bool `[frames, frame_width, 1]`: the frame positions past a smaller frame's patches (None if none)."""
        pad = (self._source == self.patch.numel()).view(self.n_frames, self.frame_width, 1)
        return pad if bool(pad.any()) else None

    def zero_frame_padding(self, x: Tensor) -> Tensor:
        """`x` `[frames, frame_width, d]` with zeros at frame padding (what `to_frames` puts there)."""
        pad = self._frame_padding
        return x if pad is None else x.masked_fill(pad, 0)

    def to_frame_pattern(self, pattern: Tensor) -> Tensor:
        """A window block's `[rows, heads, w, w]` pattern (or scores, mask) as the per-frame
        `[frames, heads, frame_width, frame_width]` it stands for: zero between windows."""
        out = pattern.new_zeros(self.n_frames, pattern.shape[1], self.frame_width, self.frame_width)
        both = self.real[:, :, None] & self.real[:, None, :]  # [rows, w, w]
        r, i, j = both.nonzero(as_tuple=True)
        out[self.frame[r], :, self.patch[r, i], self.patch[r, j]] = pattern[r, :, i, j]
        return out


class WindowAttention(Attention):
    """The attention of a window block: `[frames, frame_width, d]` in and out, each window attending
    inside itself with the windows as batch rows (`WindowRows`), never a `[patches, patches]` mask
    over a frame. Its hooks are per window: `hook_q/k/v/rot_q/rot_k/z` `[rows, w, heads, d_head]`,
    `hook_attn_mask` `[rows, 1, w, w]`, `hook_attn_scores` / `hook_pattern` `[rows, heads, w, w]`."""

    def forward(self, x: Tensor, windows: WindowRows, mask: Tensor | None, rotary) -> Tensor:
        """`mask` (additive `[rows, 1, w, w]`, or None when no window is padded) and `rotary` act on
        the window rows. The projections run on the frames, so partial windows' padding slots cost
        nothing there (only in the attention itself)."""
        q, k, v = (windows.to_windows(t) for t in self.project_qkv(x))
        z = self.attend(q, k, v, mask=mask, rotary=rotary)
        if self.use_attn_result:  # hook_result per window, as the other attention hooks
            return windows.to_frames(self.output(z))
        return windows.zero_frame_padding(self.output(windows.to_frames(z)))


class QwenVisionEncoder(nn.Module):
    """Input: `pixel_values` `[n_patches, C * T * P * P]` and `grid_thw` `[n_items, 3]` (patch grid
    per image/video). Output: `[n_patches / merge**2, out_dim]` in the same order.

    Hook points: `hook_patch_embed` and the blocks' (`blocks.{i}.hook_resid_*`, `ln*`, `mlp.*`) with
    shape `[frames, patches, d]`, one row per temporal grid step of every item in order, patches in
    the processor's order. Attention hooks of full-attention blocks (`fullatt_block_indexes`) are
    per frame: `[frames, patches, heads, d_head]`, patterns `[frames, heads, patches, patches]`.
    Attention hooks of window blocks are per window (`WindowAttention`): `[rows, w, heads, d_head]`,
    patterns `[rows, heads, w, w]`, rows and slots as `window_rows(grid_thw)` describes them
    (`WindowRows.to_frames` / `to_frame_pattern` map them back to frames). When items of different
    sizes share a call, frame rows are right-padded to the largest frame and padded keys are masked
    (a window block adds zero at those positions); window rows are padded to the largest window of
    the call (partial windows at the bottom and right edges, other frame sizes) and padded keys are
    masked, `hook_attn_mask` seeing the mask of "nothing masked" when no window is padded.
    `hook_out` `[n_patches / merge**2, out_dim]`.
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
                (Attention if i in self.fullatt_block_indexes else WindowAttention)(
                    d_model, n_heads, o_bias=True, names=("q", "k", "v", "proj")),
                RMSNorm(d_model, eps=1e-6),
                GatedMLP(d_model, d_mlp, act, bias=True),
            )
            for i in range(n_layers)
        )
        self.merger = Merger(d_model, out_dim, spatial_merge_size)
        self.hook_patch_embed = HookPoint()
        self.hook_out = HookPoint()

    def frame_layout(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """One `h x w`-patch frame in processor order: (row, column) `[h * w, 2]` and window id `[h * w]`
        (windows in raster order, see `WindowRows`)."""
        m, wm = self.merge, self.window_merged
        hw = merge_block_coords(h, w, m)
        n_win_w = -(-(w // m) // wm)
        return hw, (hw[:, 0] // m // wm) * n_win_w + hw[:, 1] // m // wm

    @staticmethod
    def _frames(grid_thw: Tensor) -> list[tuple[int, int]]:
        """(h, w) in patches of every frame (block-hook row) of a call, in order."""
        return [(h, w) for t, h, w in grid_thw.tolist() for _ in range(t)]

    def window_rows(self, grid_thw: Tensor) -> WindowRows:
        """The batch rows of the window blocks' attention hooks for a call with `grid_thw` `[n_items, 3]`:
        which frame, window and patches each row holds (`WindowRows`, on CPU)."""
        frames = self._frames(grid_thw)
        return self._window_rows(frames, {f: self.frame_layout(*f) for f in set(frames)})

    def _window_rows(self, frames: list[tuple[int, int]], layouts: dict) -> WindowRows:
        sorted_ids = {f: layouts[f][1].sort(stable=True) for f in layouts}  # patches grouped by window, in order
        counts = {f: torch.bincount(ids) for f, (ids, _) in sorted_ids.items()}  # patches per window
        w = max(int(c.max()) for c in counts.values())
        template = {}  # [windows, w] patch indices of one frame geometry, -1 = padding
        for f, (_, order) in sorted_ids.items():
            patch = torch.full((len(counts[f]), w), -1, dtype=torch.long)
            patch[torch.arange(w) < counts[f][:, None]] = order  # row-major fill: window by window
            template[f] = patch
        n = [len(counts[f]) for f in frames]
        return WindowRows(
            frame=torch.arange(len(frames)).repeat_interleave(torch.tensor(n)),
            window=torch.cat([torch.arange(k) for k in n]),
            patch=torch.cat([template[f] for f in frames]),
            frame_width=max(h * w_ for h, w_ in frames),
        )

    @classmethod
    def from_settings(cls, v: dict) -> "QwenVisionEncoder":
        """From `vision_tower_settings(...)`, as a family keeps it in `cfg.towers["vision_encoder"]`."""
        return cls(
            v["d_model"], v["n_layers"], v["n_heads"], v["d_mlp"], v["out_dim"], v["patch_size"],
            v["temporal_patch_size"], v["in_channels"], v["spatial_merge_size"], v["window_size"],
            v["fullatt_block_indexes"], v["act_fn"], v["rope_theta"],
        )

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
        frames = self._frames(grid_thw)
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
        windows = self._window_rows(frames, layouts).to(dev)
        win_cos, win_sin = windows.to_windows(cos), windows.to_windows(sin)

        def rotary(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return apply_rotary_fp32(q, k, cos, sin)

        def window_rotary(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return apply_rotary_fp32(q, k, win_cos, win_sin)

        real_slots = windows.real
        n_slots = real_slots.shape[1]
        window_mask = None if bool(real_slots.all()) else additive(
            real_slots[:, None, None, :].expand(-1, 1, n_slots, -1), x.dtype)
        full_mask = None  # one frame geometry: nothing padded
        if len(layouts) > 1:
            real = torch.arange(width, device=dev)[None, :] < torch.tensor(sizes, device=dev)[:, None]
            full_mask = additive(real[:, None, None, :].expand(-1, 1, width, -1), x.dtype)
        for i, block in enumerate(self.blocks):
            if i in self.fullatt_block_indexes:
                x = block(x, mask=full_mask, rotary=rotary)
            else:
                x = block(x, windows=windows, mask=window_mask, rotary=window_rotary)
        if len(layouts) > 1:
            x = x[real]
        return self.hook_out(self.merger(x.reshape(-1, x.shape[-1])))
