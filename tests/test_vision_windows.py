"""The Qwen2.5-VL vision tower's window blocks attend with one batch row per (frame, window).

Oracles: HF's vision tower (`Qwen2_5OmniVisionEncoder`, which permutes tokens into windows and runs
eager attention window by window) for the output, and a per-frame reference written here from the
anchor's definition (112-px tiles from the top-left, 2D RoPE, softmax inside a window) for what the
window rows hold. The tiny tower (omni_helpers) has 56-px windows: 4x4 patches, 2x2 merged tokens;
block 1 is its full-attention block, blocks 0 and 2 are window blocks.
"""

from __future__ import annotations

import pytest
import torch
from omni_helpers import PATCH_DIM, tiny_hf_thinker

from hooked_av import HookedQwen2_5Omni
from hooked_av.core.masks import neg_inf

WINDOW = 4  # patches per window side in the tiny config (56 px / 14 px)
CASES = {  # name -> grids (t, h, w) in patches, one tower call
    "image": [(1, 8, 8)],  # 2x2 full windows
    "video": [(2, 8, 12)],  # 2 frames of 2x3 full windows
    "partial_edges": [(1, 6, 10)],  # 3x5 merged tokens: windows of 16, 16, 8 / 8, 8, 4 patches
    "image_and_video": [(1, 6, 10), (3, 10, 4)],  # two frame sizes: frame and window padding
}


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_thinker(seed=3)
    return hf, HookedQwen2_5Omni.from_hf(hf)


def _media(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    grids = torch.tensor(CASES[name])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grids.prod(-1).sum()), PATCH_DIM, generator=g), grids


def _coords(h: int, w: int) -> list[tuple[int, int]]:
    """(row, column) of each patch of a frame in the processor's order (h_block, w_block, ih, iw)."""
    return [(hb * 2 + ih, wb * 2 + iw) for hb in range(h // 2) for wb in range(w // 2) for ih in range(2) for iw in range(2)]


def _frames(name: str) -> list[tuple[int, int]]:
    return [(h, w) for t, h, w in CASES[name] for _ in range(t)]


@pytest.mark.parametrize("name", list(CASES))
def test_tower_output_equals_hf_vision_tower(pair, name):
    hf, ours = pair
    pixels, grids = _media(name)
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grids).pooler_output
        out = ours.vision_encoder(pixels, grids)
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    print(f"{name}: max |ours - HF| = {err:.2e}")
    assert err < 1e-5


def test_window_rows_hold_each_frames_windows_in_raster_order(pair):
    """Rows frame-major, windows raster within a frame, each row the window's patches in processor
    order then padding (-1); checked against tiles computed here from patch coordinates."""
    rows = pair[1].vision_encoder.window_rows(torch.tensor(CASES["image_and_video"]))
    frames = _frames("image_and_video")
    expected_frame, expected_window, expected_patches = [], [], []
    for f, (h, w) in enumerate(frames):
        n_w = -(-w // WINDOW)
        tiles: dict[int, list[int]] = {}
        for p, (r, c) in enumerate(_coords(h, w)):
            tiles.setdefault((r // WINDOW) * n_w + c // WINDOW, []).append(p)
        for k in sorted(tiles):
            expected_frame.append(f)
            expected_window.append(k)
            expected_patches.append(tiles[k])
    width = max(len(p) for p in expected_patches)
    assert rows.frame.tolist() == expected_frame
    assert rows.window.tolist() == expected_window
    assert rows.patch.tolist() == [p + [-1] * (width - len(p)) for p in expected_patches]
    assert rows.frame_width == max(h * w for h, w in frames) == 60
    # 6x10 image: 2x3 tiles of 16, 16, 8 / 8, 8, 4 patches; 10x4 video frames: 3x1 tiles of 16, 16, 8
    assert rows.real.sum(1).tolist() == [16, 16, 8, 8, 8, 4] + [16, 16, 8] * 3


def _reference_window_pattern(attn, normed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`[heads, h*w, h*w]` pattern of one frame from the block's normalised input `[h*w, d]`: q, k from
    the block's weights, 2D RoPE (angles [row * inv, column * inv] duplicated, rotate-half, fp32),
    softmax over the keys of the query's window only."""
    n, heads, dh = normed.shape[0], attn.n_heads, attn.d_head
    q, k = (lin(normed).view(n, heads, dh).transpose(0, 1) for lin in (attn.q, attn.k))
    rc = torch.tensor(_coords(h, w), dtype=torch.float32)
    inv = 1.0 / 10000 ** (torch.arange(0, dh // 2, 2).float() / (dh // 2))
    ang = torch.cat([rc[:, :1] * inv, rc[:, 1:] * inv], -1).repeat(1, 2)  # [n, dh]

    def rot(x):
        return x * ang.cos() + torch.cat([-x[..., dh // 2:], x[..., : dh // 2]], -1) * ang.sin()

    tile = (rc[:, 0] // WINDOW) * 100 + rc[:, 1] // WINDOW
    scores = rot(q) @ rot(k).transpose(1, 2) * dh**-0.5
    scores = scores.masked_fill(tile[:, None] != tile[None, :], float("-inf"))
    return scores.softmax(-1)


def test_window_patterns_map_back_to_each_frames_window_attention(pair):
    """`to_frame_pattern` of a window block's `[rows, heads, w, w]` pattern equals the per-frame
    window attention computed here, for frames of two sizes with partial windows."""
    _, ours = pair
    pixels, grids = _media("image_and_video")
    tower = ours.vision_encoder
    names = ["vision_encoder.blocks.2.ln1.hook_normalized", "vision_encoder.blocks.2.attn.hook_pattern"]
    cache = _tower_cache(ours, pixels, grids, names)
    rows = tower.window_rows(grids)
    frame_pattern = rows.to_frame_pattern(cache[names[1]])
    for f, (h, w) in enumerate(_frames("image_and_video")):
        with torch.no_grad():
            ref = _reference_window_pattern(tower.blocks[2].attn, cache[names[0]][f, : h * w], h, w)
        assert (frame_pattern[f, :, : h * w, : h * w] - ref).abs().max() < 1e-6
        assert frame_pattern[f, :, h * w:].abs().sum() == 0 and frame_pattern[f, :, :, h * w:].abs().sum() == 0  # frame padding


def _tower_cache(model, pixels, grids, names) -> dict[str, torch.Tensor]:
    """The named tower activations of one direct call of the tower (no language model)."""
    cache = {}

    def keep(t, hook):
        cache[hook.name] = t.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
        cache["out"] = model.vision_encoder(pixels, grids)
    return cache


def test_every_tower_hook_fires_once_with_its_documented_shape(pair):
    _, ours = pair
    tower = ours.vision_encoder
    pixels, grids = _media("image_and_video")
    frames, width = _frames("image_and_video"), 60
    rows = tower.window_rows(grids)
    n_rows, w = rows.patch.shape
    d, heads, dh = tower.patch_embed.proj.weight.shape[0], tower.blocks[0].attn.n_heads, tower.d_head
    names = [n for n in ours.hook_dict if n.startswith("vision_encoder.")]
    seen: dict[str, list[tuple[int, ...]]] = {}

    def note(t, hook):
        seen.setdefault(hook.name, []).append(tuple(t.shape))

    for b in tower.blocks:
        b.attn.use_attn_result = True  # so that hook_result fires too
    try:
        with torch.no_grad():
            plain = tower(pixels, grids)
            with ours.hooks(fwd_hooks=[(n, note) for n in names]):
                hooked = tower(pixels, grids)
    finally:
        for b in tower.blocks:
            b.attn.use_attn_result = False
    assert sorted(seen) == sorted(names)
    assert all(len(s) == 1 for s in seen.values())
    shape = {n: s[0] for n, s in seen.items()}
    for i in range(len(tower.blocks)):
        p = f"vision_encoder.blocks.{i}."
        window = i not in tower.fullatt_block_indexes
        b, t = (n_rows, w) if window else (len(frames), width)
        for n in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z"):
            assert shape[p + "attn." + n] == (b, t, heads, dh), n
        assert shape[p + "attn.hook_result"] == (b, t, heads, d)
        assert shape[p + "attn.hook_attn_mask"] == (b, 1, t, t)
        assert shape[p + "attn.hook_attn_scores"] == shape[p + "attn.hook_pattern"] == (b, heads, t, t)
        for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                  "ln1.hook_normalized", "ln2.hook_normalized"):
            assert shape[p + n] == (len(frames), width, d), n
    assert shape["vision_encoder.hook_patch_embed"] == (len(frames), width, d)
    assert shape["vision_encoder.hook_out"] == tuple(plain.shape) == (int(grids.prod(-1).sum()) // 4, tower.merger.mlp[2].out_features)
    assert (hooked - plain).abs().max() < 1e-6  # the exact path (patterns hooked) equals the fast one
    assert (n_rows, w) == (15, 16)


def _edit_mask(block: int, model, pixels, grids) -> tuple[list, list[float]]:
    """Run the tower with block `block`'s `hook_attn_mask` masking the first half of every window's
    keys; (what the hook saw: shape and how many entries were masked, relative change of that block's
    attention output and of the tower output)."""
    seen = []

    def first_half_of_keys(mask, hook):
        seen.append((tuple(mask.shape), int((mask < 0).sum())))
        mask[..., : mask.shape[-1] // 2] = neg_inf(mask.dtype)
        return mask

    names = [f"vision_encoder.blocks.{block}.hook_attn_out"]
    clean = _tower_cache(model, pixels, grids, names)
    with model.hooks(fwd_hooks=[(f"vision_encoder.blocks.{block}.attn.hook_attn_mask", first_half_of_keys)]):
        edited = _tower_cache(model, pixels, grids, names)
    assert torch.equal(clean["out"], _tower_cache(model, pixels, grids, [])["out"])  # the edit did not leak
    return seen, [float((edited[n] - clean[n]).abs().max() / clean[n].abs().max()) for n in names + ["out"]]


@pytest.mark.parametrize("block", [0, 2])
def test_mask_hook_on_an_unpadded_window_block_fires_and_acts(pair, block):
    """Full windows only: the window blocks need no mask, but a hooked mask point runs on the
    all-zero mask of "nothing masked" (one row per window) and its edit changes the output."""
    _, ours = pair
    pixels, grids = _media("image")
    seen, (attn_change, out_change) = _edit_mask(block, ours, pixels, grids)
    assert seen == [((4, 1, 16, 16), 0)]
    print(f"block {block}: relative change of its attention output {attn_change:.3f}, of the tower output {out_change:.4f}")
    assert attn_change > 1e-2 and out_change > 5e-4  # the thresholds of test_hook_points' tower cases


def test_mask_hook_on_a_padded_window_block_sees_the_padding_and_its_edit_acts(pair):
    _, ours = pair
    pixels, grids = _media("image_and_video")
    rows = ours.vision_encoder.window_rows(grids)
    pad_keys = int((~rows.real).sum()) * rows.patch.shape[1]  # every query row masks its window's padding
    seen, (attn_change, out_change) = _edit_mask(0, ours, pixels, grids)
    assert seen == [((15, 1, 16, 16), pad_keys)]
    print(f"padded windows: relative change of the attention output {attn_change:.3f}, of the tower output {out_change:.4f}")
    assert attn_change > 1e-2 and out_change > 5e-4
