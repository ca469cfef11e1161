"""The query's attention on one frame's patches, drawn over that frame: a `[H / merge, W / merge]` grid
per layer from the TokenMap's patch coordinates, over the frame's pixels (the caller's own frame, or the
model inputs' `pixel_values_videos` / `pixel_values` un-normalised with `model.media_constants`)."""

from __future__ import annotations

import numpy as np
import torch

from hooked_av.viz.time_views import _cmap, media_index


def frame_image(model, inputs: dict, item: int = 0, frame: int = 0, group: str = "video", row: int = 0, tm=None) -> np.ndarray:
    """uint8 `[H, W, 3]`: the first picture of temporal grid step `frame` of row `row`'s clip `item`
    (`group` "video" or "image"), rebuilt from the processor's patches: rows `(t, h/merge, w/merge, merge,
    merge)` of `(channels, temporal_patch, patch, patch)` values (Qwen2-VL's image processor), times the
    image std plus the mean of `model.media_constants`."""
    if group not in ("video", "image"):
        raise ValueError(f"group must be 'video' or 'image', got {group!r}")
    tm = model.token_map(inputs) if tm is None else tm
    pv, grid = (inputs.get("pixel_values_videos"), inputs.get("video_grid_thw")) if group == "video" else \
        (inputs.get("pixel_values"), inputs.get("image_grid_thw"))
    if pv is None or grid is None:
        raise ValueError(f"the inputs carry no {group} pixels; pass image= (the frame as uint8 [H, W, 3]) instead")
    index = media_index(tm, group, item, row)
    t, h, w = (int(x) for x in grid[index].tolist())
    if not 0 <= frame < t:
        raise ValueError(f"frame {frame}: clip {item}'s {group} has {t} temporal grid steps (0..{t - 1})")
    start = int(grid[:index].prod(-1).sum())
    tp, p, _ = model.vision_encoder.patch_embed.proj.kernel_size
    m = model.vision_encoder.merge
    c = pv.shape[-1] // (tp * p * p)
    x = pv[start : start + t * h * w].float().cpu().view(t, h // m, w // m, m, m, c, tp, p, p)
    x = x[frame, ..., 0, :, :].permute(4, 0, 2, 5, 1, 3, 6).reshape(c, h * p, w * p)  # (c, H, W) of the first picture
    const = model.media_constants
    x = x * torch.tensor(const.image_std).view(-1, 1, 1) + torch.tensor(const.image_mean).view(-1, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def frame_grid(qa, item: int, frame: int, group: str = "video", heads=None) -> np.ndarray:
    """float `[layers, H / merge, W / merge]`: the query's attention on each merged patch of the frame."""
    tm, r = qa.tm, qa.row
    if tm.patch_row is None:
        raise ValueError("this TokenMap carries no patch coordinates (patch_row); build it with model.token_map(inputs)")
    pos = tm.positions(group, row=r, item=item, frame=frame)
    rows, cols = tm.patch_row[r, pos], tm.patch_col[r, pos]
    if bool((rows < 0).any()):
        raise ValueError(f"the TokenMap has no patch grid for {group}[{item}]; its builder did not know the grid")
    w = qa.mean_heads(heads)[:, pos]
    out = torch.zeros(w.shape[0], int(rows.max()) + 1, int(cols.max()) + 1)
    out[:, rows, cols] = w
    return out.numpy()


def plot_attention_on_frame(qa, frame: int = 0, item: int = 0, image=None, group: str = "video", layers=None,
                            heads=None, ncols: int = 4, alpha: float = 0.6):
    """One panel per layer (default: up to 8 of the layers read, evenly spaced): the frame (`image`, uint8
    `[H, W, 3]`, e.g. `frame_image(model, inputs, item, frame)` or the caller's own frame) with the query's
    attention on each merged patch laid over it, one colour scale for every panel; the title gives the
    layer's total attention on the frame."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    grid = frame_grid(qa, item, frame, group, heads)  # [L, gh, gw]
    if layers is None:
        idx = sorted(set(np.linspace(0, len(qa.layers) - 1, min(8, len(qa.layers))).round().astype(int).tolist()))
    else:
        missing = [l for l in layers if l not in qa.layers]
        if missing:
            raise ValueError(f"layers {missing} were not read; the QueryAttention holds {qa.layers}")
        idx = [qa.layers.index(l) for l in layers]
    gh, gw = grid.shape[1:]
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H, W, 3]; got {image.dtype} {tuple(image.shape)}")
    extent = (0, gw, gh, 0)
    n = len(idx)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows * gh / gw + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    norm = Normalize(0, max(float(grid[idx].max()), 1e-9))
    shown = None
    for ax, i in zip(axes.flat, idx):
        if image is not None:
            ax.imshow(image, extent=extent)
        shown = ax.imshow(grid[i], extent=extent, cmap=_cmap(), norm=norm, alpha=alpha if image is not None else 1.0,
                          interpolation="nearest")
        ax.set_title(f"layer {qa.layers[i]}: {grid[i].sum():.3f} on the frame", fontsize=9)
    fig.colorbar(shown, ax=list(axes.flat), shrink=0.8, label="attention weight per merged patch")
    fig.suptitle(f"attention of {qa.query!r} on {group}[{item}] frame {frame} ({gh}x{gw} patches), {qa.head_label(heads)}",
                 fontsize=10)
    return fig
