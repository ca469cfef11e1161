"""Token group x token group attention mass per layer and head (the output of
`group_attention_mass(..., per_head=True)`): one layer x head heatmap per (attending, attended) group
pair, so a head that moves audio to the last token stands out. Grows with groups^2 x layers x heads."""

from __future__ import annotations


def plot_group_mass_heads(df, dst=None, src=None, ncols: int | None = None):
    """Rows of panels: attending groups `dst` (default: every dst in `df`, in its order); columns: attended
    groups `src` (default likewise). Each panel: layer (y) x head (x), colour = mean mass the dst queries
    put on the src keys (0 to 1, one scale). Custom groups (`audio[1]`) keep their names."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if "head" not in df.columns:
        raise ValueError("this view needs per-head mass: group_attention_mass(..., per_head=True)")
    order = list(dict.fromkeys(list(df.dst) + list(df.src)))
    dst = [g for g in order if g in set(df.dst)] if dst is None else list(dst)
    src = [g for g in order if g in set(df.src)] if src is None else list(src)
    for name, want, have in (("dst", dst, set(df.dst)), ("src", src, set(df.src))):
        missing = [g for g in want if g not in have]
        if missing or not want:
            raise ValueError(f"{name} groups {missing or '[]'} are not in the mass table; it has {sorted(have)}")
    layers, heads = sorted(df.layer.unique()), sorted(df["head"].unique())
    # at most 10 inches wide, so that a report page shows it at its size and the labels stay readable
    panel = min(2.6, 8.8 / len(src))
    height = min(max(1.4, panel * len(layers) / len(heads)), 3.0) + 0.4
    fig, axes = plt.subplots(len(dst), len(src), squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(panel * len(src) + 1.2, height * len(dst) + 0.5))
    image = None
    for i, d in enumerate(dst):
        for j, s in enumerate(src):
            ax = axes[i, j]
            sub = df[(df.dst == d) & (df.src == s)]
            grid = sub.pivot_table(index="layer", columns="head", values="mass").reindex(index=layers, columns=heads)
            image = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                              origin="lower", extent=(heads[0] - 0.5, heads[-1] + 0.5, layers[0] - 0.5, layers[-1] + 0.5))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            if i == 0:
                ax.set_title(f"on {s}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{d} (layer)", fontsize=9)
            if i == len(dst) - 1:
                ax.set_xlabel("head", fontsize=8)
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="mean attention mass (query group -> key group)")
    fig.suptitle("attention mass per layer and head: rows attend, columns are attended", fontsize=10)
    return fig
