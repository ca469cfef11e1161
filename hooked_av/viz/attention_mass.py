"""Token-group x token-group attention mass per layer (and head), reduced inside the forward.

A 7B model on a 4k-token clip has 28 x 28 x 4k x 4k attention weights; nobody looks at them
one by one. This view has each layer compute its own attention a block of query rows at a time (`Attention.blockwise`:
scores once, each block against the keys up to its last row, the output and the masses from the same
pattern, interventions on the mask included), reduces each block to `[groups, groups]` and drops it:
memory grows with `block_rows x tokens`, never `tokens x tokens`, and the time is the layer's own attention
(the causal triangle) plus the reduction. On the exact path (a hooked pattern or scores) it reads the
pattern the layer made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_GROUPS = ("system", "template", "audio", "video", "image", "label", "question", "options", "instruction", "last")


def group_attention_mass(
    model,
    inputs: dict,
    token_map,
    groups: Sequence[str] = DEFAULT_GROUPS,
    layers: Sequence[int] | None = None,
    per_head: bool = False,
    block_rows: int = 64,
):
    """Mean over the query positions of group `dst` of the attention mass they put on the keys of
    group `src` (a number in [0, 1]; a row sums to 1 over groups that cover every key).

    Returns a tidy DataFrame: layer, (head,) dst, src, mass, n_dst, n_src, averaged over batch rows
    that have both groups. In a batch whose rows hold different groups, each (dst, src) cell is averaged
    over its own rows, so a dst row of the frame need not sum to 1 (read one sample at a time, or
    rows of one layout, for shares that add up). Groups absent from the input are skipped. Query rows
    are read `block_rows` at a time (memory `batch x heads x block_rows x tokens` per layer); active
    hooks apply.
    """
    from hooked_av.core.validate import layer_list

    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    import pandas as pd

    layers = layer_list(layers, model.cfg.n_layers, "layers")
    ref = inputs.get("inputs_embeds", inputs.get("input_ids"))
    if ref is not None and (token_map.batch != ref.shape[0] or token_map.seq_len != ref.shape[1]):
        raise ValueError(f"the TokenMap is [{token_map.batch}, {token_map.seq_len}] but the inputs are "
                         f"{list(ref.shape[:2])}; build it from the same inputs (model.token_map(inputs))")
    present = [g for g in groups if bool(token_map.mask(g).any())]
    if not present:
        raise ValueError(f"none of the groups {list(groups)} occurs in this input")
    masks = torch.stack([token_map.mask(g) for g in present]).float()  # [G, batch, pos]
    out: dict[int, Tensor] = {}
    with model.attention_readers({l: _MassReader(l, masks, block_rows, out) for l in layers}), torch.no_grad():
        model(**inputs, return_type=None)
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


class _MassReader:
    """One layer's group x group mass: on the fast path the layer computes its attention a block of query rows
    at a time (`Attention.blockwise`, the keys cut at the block's last row) and hands each block's pattern to
    `block`; on the exact path (a hooked pattern or scores) it is called with the full pattern. Sums the mass
    each dst group's queries put on each src group into `out[layer]` `[batch, heads, dst, src]`, averaged
    over the dst queries when the last block is read."""

    def __init__(self, layer: int, masks: Tensor, block_rows: int, out: dict):
        self.layer, self.masks, self.block_rows, self.out = layer, masks, block_rows, out
        self.summed: Tensor | float = 0.0

    def block(self, start: int, p: Tensor) -> None:
        """`p` `[batch, heads, rows, keys]`: the pattern of query rows `start..` over the first `keys` keys."""
        m = self.masks.to(p.device, p.dtype)
        rows, keys = p.shape[2], p.shape[3]
        to_src = torch.einsum("bhqk,gbk->bhqg", p, m[:, :, :keys])  # mass each query puts on each src group
        self.summed = self.summed + torch.einsum("bhqg,fbq->bhfg", to_src, m[:, :, start : start + rows])
        if start + rows == m.shape[-1]:
            n_dst = m.sum(-1).T  # [batch, G]
            self.out[self.layer] = (self.summed / n_dst.clamp(min=1)[:, None, :, None]).float().cpu()

    def __call__(self, attn, qh, kh, mask, causal, pattern) -> None:
        """The exact path: the full pattern `[batch, heads, q, k]`, read `block_rows` rows at a time."""
        for start in range(0, qh.shape[2], self.block_rows):
            self.block(start, pattern[:, :, start : start + self.block_rows])


def plot_attention_mass(df, layers: Sequence[int] | None = None, ncols: int = 4):
    """One heatmap per layer: rows = attending group (dst), columns = attended group (src), in the
    order the groups were given to `group_attention_mass` (custom ones such as `audio[1]` included)."""
    import matplotlib.pyplot as plt

    layers = sorted(df.layer.unique()) if layers is None else list(layers)
    order = list(dict.fromkeys([*df.dst, *df.src]))  # the frame lists groups in the order they were asked for
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, min(ncols, len(layers)), figsize=(3.2 * min(ncols, len(layers)), 3.0 * nrows), squeeze=False,
                             layout="constrained")  # keeps the shared axis labels clear of the rotated ticks
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, layer) in enumerate(zip(axes.flat, layers)):
        sub = df[df.layer == layer].groupby(["dst", "src"]).mass.mean().unstack().reindex(index=order, columns=order)
        ax.axis("on")
        image = ax.imshow(sub.values, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), order if i % axes.shape[1] == 0 else [], fontsize=7)  # names once per row of panels
        ax.set_title(f"layer {layer}", fontsize=9)
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="mean attention mass")
    fig.supxlabel("attended group (key)")
    fig.supylabel("attending group (query)")
    return fig
