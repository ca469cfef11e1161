"""Token-group x token-group attention mass per layer (and head), reduced inside the forward.

A 7B model on a 4k-token clip has 28 x 28 x 4k x 4k attention weights; nobody looks at them
one by one. This view hooks each layer's pattern, reduces it to `[groups, groups]` on the spot and
keeps only that, so its cost grows with the groups shown, not with tokens squared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_GROUPS = ("system", "template", "audio", "video", "image", "question", "last")


def group_attention_mass(
    model,
    inputs: dict,
    token_map,
    groups: Sequence[str] = DEFAULT_GROUPS,
    layers: Sequence[int] | None = None,
    per_head: bool = False,
):
    """Mean over the query positions of group `dst` of the attention mass they put on the keys of
    group `src` (a number in [0, 1]; a row sums to 1 over groups that cover every key).

    Returns a tidy DataFrame: layer, (head,) dst, src, mass, n_dst, n_src, averaged over batch rows
    that have both groups. Groups absent from the input are skipped.
    """
    import pandas as pd

    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    present = [g for g in groups if bool(token_map.mask(g).any())]
    if not present:
        raise ValueError(f"none of the groups {list(groups)} occurs in this input")
    masks = torch.stack([token_map.mask(g) for g in present]).float()  # [G, batch, pos]
    out: dict[int, Tensor] = {}

    def reduce(pattern: Tensor, hook) -> None:
        m = masks.to(pattern.device, pattern.dtype)
        to_src = torch.einsum("bhqk,gbk->bhqg", pattern, m)  # mass each query puts on each src group
        summed = torch.einsum("bhqg,fbq->bhfg", to_src, m)  # summed over the queries of each dst group
        n_dst = m.sum(-1).T  # [batch, G]
        out[hook.layer()] = (summed / n_dst.clamp(min=1)[:, None, :, None]).float().cpu()

    with torch.no_grad():
        model.run_with_hooks(
            **inputs, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", reduce) for l in layers]
        )
    counts = masks.sum(-1).T.cpu()  # [batch, G]
    both = (counts[:, :, None] > 0) & (counts[:, None, :] > 0)  # [batch, dst, src]
    rows = []
    for layer in layers:
        mass = out[layer]  # [batch, heads, dst, src]
        heads = range(mass.shape[1]) if per_head else [None]
        for h in heads:
            m = mass[:, h] if h is not None else mass.mean(1)
            weight = both.float()
            mean = (m * weight).sum(0) / weight.sum(0).clamp(min=1)
            for i, dst in enumerate(present):
                for j, src in enumerate(present):
                    if not bool(both[:, i, j].any()):
                        continue
                    row = {"layer": layer, "dst": dst, "src": src, "mass": float(mean[i, j]),
                           "n_dst": int(counts[:, i].max()), "n_src": int(counts[:, j].max())}
                    if h is not None:
                        row["head"] = h
                    rows.append(row)
    return pd.DataFrame(rows)


def plot_attention_mass(df, layers: Sequence[int] | None = None, ncols: int = 4):
    """One heatmap per layer: rows = attending group (dst), columns = attended group (src)."""
    import matplotlib.pyplot as plt

    layers = sorted(df.layer.unique()) if layers is None else list(layers)
    order = [g for g in DEFAULT_GROUPS if g in set(df.dst) | set(df.src)]
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, min(ncols, len(layers)), figsize=(3.2 * min(ncols, len(layers)), 3.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        sub = df[df.layer == layer].groupby(["dst", "src"]).mass.mean().unstack().reindex(index=order, columns=order)
        ax.axis("on")
        image = ax.imshow(sub.values, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), order, fontsize=7)
        ax.set_title(f"layer {layer}", fontsize=9)
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="mean attention mass")
    fig.supxlabel("attended group (key)")
    fig.supylabel("attending group (query)")
    return fig
