"""Routing read-outs of a mixture-of-experts model: which experts the audio, video and question tokens use,
layer by layer.

    df = routing_counts(model, inputs)                  # layer, group, expert, count, share
    fig = plot_routing(df)                              # one layer x expert heatmap per token group
    Report("routing").figure(fig).table(top_experts(df)).save("runs/routing.html")

Counts are of `blocks.{l}.mlp.hook_router_choice` (`[batch, pos, k]`, the k experts each token is sent
to), per TokenMap group, over every sparse layer of one forward; padding is in no group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUPS = ("audio", "video", "image", "question")


def routing_counts(model, inputs: dict, groups: Sequence[str] | None = None, tm=None, layers: Sequence[int] | None = None):
    """A DataFrame with one row per (layer, group, expert): `count` (how many of the group's tokens chose
    the expert in that layer, over the batch), `tokens` (the group's tokens) and `share` = count / (tokens
    x k), the fraction of the group's routing slots the expert takes. `groups`: TokenMap specs (default:
    those of audio, video, image, question the inputs hold); `layers`: sparse layers (default: all).
    A model without routing, a dense layer, or a group the inputs do not hold is refused before the run."""
    import pandas as pd

    sparse = [l for l in range(model.cfg.n_layers) if f"blocks.{l}.mlp.hook_router_choice" in model.hook_dict]
    if not sparse:
        raise ValueError("this model has no mixture-of-experts layers (no blocks.{l}.mlp.hook_router_choice)")
    layers = sparse if layers is None else [int(l) for l in layers]
    dense = [l for l in layers if l not in sparse]
    if not layers or dense:
        raise ValueError(f"layers {dense or '[]'}: name sparse layers of this model ({sparse})")
    tm = model.token_map(inputs) if tm is None else tm
    if groups is None:
        groups = [g for g in GROUPS if bool(tm.mask(g).any())]
    masks = {}
    for g in groups:
        masks[g] = tm.mask(g)
        if not bool(masks[g].any()):
            raise ValueError(f"group {g!r} selects no token of these inputs; groups present: {tm.describe()}")
    names = [f"blocks.{l}.mlp.hook_router_choice" for l in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=names, return_type=None)
    n_experts = model.cfg.num_experts
    rows = []
    for l, name in zip(layers, names):
        choice = cache[name]  # [batch, pos, k]
        k = choice.shape[-1]
        for g, m in masks.items():
            chosen = choice[m.to(choice.device)]  # [n_tokens, k]
            counts = torch.bincount(chosen.flatten(), minlength=n_experts).tolist()
            n = int(m.sum())
            rows += [dict(layer=l, group=g, expert=e, count=c, tokens=n, share=c / (n * k)) for e, c in enumerate(counts)]
    return pd.DataFrame(rows)


def top_experts(df, n: int = 3):
    """The `n` experts with the largest share per (layer, group), one row each: layer, group, rank, expert, share."""
    top = df.sort_values(["layer", "group", "share", "expert"], ascending=[True, True, False, True])
    top = top.groupby(["layer", "group"], sort=False).head(n).copy()
    top["rank"] = top.groupby(["layer", "group"]).cumcount() + 1
    return top[["layer", "group", "rank", "expert", "share"]].reset_index(drop=True)


def plot_routing(df, groups: Sequence[str] | None = None):
    """One heatmap per group: layers (rows) x experts (columns), colour = the expert's share of the group's
    routing slots in that layer, on one scale from 0 for every panel."""
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(df.group)) if groups is None else list(groups)
    vmax = float(df[df.group.isin(groups)].share.max()) or 1.0
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 1.2 + 0.35 * df.layer.nunique() * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        sub = df[df.group == g].pivot(index="layer", columns="expert", values="share").sort_index()
        image = ax.imshow(sub.values, aspect="auto", vmin=0, vmax=vmax, cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(sub.index)), [str(l) for l in sub.index], fontsize=7)
        ax.set_ylabel("layer")
        n_tok = int(df[df.group == g].tokens.iloc[0])
        ax.set_title(f"{g} ({n_tok} tokens)", fontsize=9)
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(image, ax=list(axes[:, 0]), shrink=0.8, label="share of the group's routing slots")
    return fig


def routing_report(df, path, title: str = "Expert routing"):
    """A self-contained HTML report (`hooked_av.viz.Report`): the heatmaps and the top experts per layer and group."""
    from hooked_av.viz.report import Report

    return Report(title).figure(plot_routing(df)).heading("Top experts per layer and group").table(top_experts(df)).save(path)
