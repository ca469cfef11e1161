"""Where one query looks, over time: the attention of a `QueryAttention` summed per video frame (temporal
grid step), per audio second and per text group, split by modality and clip, per layer; and over audio
time under the waveform or spectrogram. Figures grow with layers x bins, never with tokens squared."""

from __future__ import annotations

import math

import numpy as np

from hooked_av.inputs.token_map import GROUPS, MEDIA

TEXT_GROUPS = ("system", "template", "question", "last", "generated")


def time_bins(qa, heads=None, audio_seconds: float = 1.0):
    """Tidy DataFrame of the query's attention summed over bins, one row per (layer, bin): columns layer,
    group (audio/video/image or a text group), item (clip; -1 for text), bin (frame index, audio bin
    index or 0), start, end (seconds from the clip's start; NaN for text and images), n_tokens, mass
    (summed over the bin's keys, mean over `heads`). Video bins are temporal grid steps, audio bins
    `audio_seconds` long, an image one bin, a text group one bin."""
    import pandas as pd

    if not (audio_seconds > 0 and math.isfinite(audio_seconds)):
        raise ValueError(f"audio_seconds must be a positive number of seconds, got {audio_seconds!r}")
    tm, r = qa.tm, qa.row
    w = qa.mean_heads(heads)  # [L, K]
    names = tm.names(r)
    keys: dict[tuple, list[int]] = {}
    spans: dict[tuple, list[float]] = {}
    for p, name in enumerate(names):
        if name in MEDIA:
            item = int(tm.item[r, p])
            t0, t1 = float(tm.time[r, p]), float(tm.time_end[r, p])
            b = int(tm.frame[r, p]) if name == "video" else (int(t0 // audio_seconds) if name == "audio" else 0)
            key = (name, item, b)
            if name == "audio":
                t0, t1 = b * audio_seconds, (b + 1) * audio_seconds
            span = spans.setdefault(key, [t0, t1])
            span[0], span[1] = min(span[0], t0), max(span[1], t1)
        elif name in TEXT_GROUPS:
            key = (name, -1, 0)
            spans.setdefault(key, [math.nan, math.nan])
        else:
            continue
        keys.setdefault(key, []).append(p)
    rows = []
    for key, pos in keys.items():
        mass = w[:, pos].sum(1).tolist()
        start, end = spans[key]
        if key[0] == "audio":  # the last bin ends where the audio does
            end = min(end, float(tm.time_end[r, pos].max()))
        for layer, m in zip(qa.layers, mass):
            rows.append(dict(layer=layer, group=key[0], item=key[1], bin=key[2], start=start, end=end, n_tokens=len(pos), mass=m))
    return pd.DataFrame(rows)


def _cmap():
    import matplotlib

    return matplotlib.colormaps["magma_r"]


def _layer_axis(ax, layers):
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_ylim(min(layers) - 0.5, max(layers) + 0.5)


def _panel(ax, sub, layers, norm):
    """A layer x bin heatmap of `sub` (one group and item), bins drawn over their seconds."""
    bins = sorted(sub.bin.unique())
    grid = sub.pivot_table(index="layer", columns="bin", values="mass").reindex(index=layers, columns=bins).to_numpy()
    first = sub.drop_duplicates("bin").set_index("bin").reindex(bins)
    if first.start.notna().all():
        edges = np.append(first.start.to_numpy(), first.end.to_numpy()[-1])
        ax.set_xlabel("seconds from the clip's start")
    else:
        edges = np.arange(len(bins) + 1) - 0.5
        ax.set_xticks(range(len(bins)), [str(b) for b in bins])
    ys = np.append(np.asarray(layers, dtype=float) - 0.5, layers[-1] + 0.5)
    return ax.pcolormesh(edges, ys, grid, cmap=_cmap(), norm=norm, shading="flat")


def plot_attention_over_time(qa, heads=None, audio_seconds: float = 1.0, df=None):
    """Where the query looks, per layer: one heatmap per (modality, clip) with time on x (a video frame's
    grid step or an audio second per bin; colour = attention summed over the bin's tokens), and one for
    the text groups. Rows share the layer axis, all panels one colour scale. `df`: `time_bins`'s output
    (computed here when None)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    df = time_bins(qa, heads, audio_seconds) if df is None else df
    layers = list(qa.layers)
    media = [(g, i) for g in ("video", "image", "audio") for i in sorted(df[df.group == g].item.unique())]
    texts = [g for g in TEXT_GROUPS if g in set(df.group)]
    kinds = [g for g in ("video", "image", "audio") if any(m[0] == g for m in media)]
    items = sorted({i for _, i in media})
    nrows, ncols = max(1, len(kinds)), len(items) + 1
    height = max(2.2, 0.12 * len(layers) + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * len(items) + 3.0, height * nrows), squeeze=False, layout="constrained",
                             gridspec_kw=dict(width_ratios=[3] * len(items) + [1.4]))
    norm = Normalize(0, max(float(df.mass.max()), 1e-9))
    image = None
    for ax in axes.flat:
        ax.axis("off")
    for (g, i) in media:
        ax = axes[kinds.index(g), items.index(i)]
        ax.axis("on")
        sub = df[(df.group == g) & (df.item == i)]
        image = _panel(ax, sub, layers, norm)
        unit = {"video": "frame", "audio": f"{audio_seconds:g} s", "image": "image"}[g]
        ax.set_title(f"{g}[{i}] per {unit}; layer {layers[-1]} total {sub.mass[sub.layer == layers[-1]].sum():.2f}", fontsize=9)
        _layer_axis(ax, layers)
        ax.set_ylabel("layer")
    ax = axes[0, -1]
    ax.axis("on")
    sub = df[df.group.isin(texts)]
    grid = sub.pivot_table(index="layer", columns="group", values="mass").reindex(index=layers, columns=texts).to_numpy()
    ys = np.append(np.asarray(layers, dtype=float) - 0.5, layers[-1] + 0.5)
    image = ax.pcolormesh(np.arange(len(texts) + 1) - 0.5, ys, grid, cmap=_cmap(), norm=norm, shading="flat")
    ax.set_xticks(range(len(texts)), texts, rotation=60, fontsize=8)
    ax.set_title("text", fontsize=9)
    _layer_axis(ax, layers)
    heads_txt = qa.head_label(heads)
    fig.suptitle(f"attention of {qa.query!r}" + (f" (mean of {qa.n_queries} positions)" if qa.n_queries > 1 else "")
                 + f", {heads_txt}: summed per bin", fontsize=10)
    fig.colorbar(image, ax=list(axes.flat), shrink=0.9, label="attention mass (sum over the bin's keys)")
    return fig


def audio_spectrogram(inputs: dict, tm, item: int = 0, row: int = 0) -> np.ndarray:
    """The log-mel features `[mels, frames]` of clip `item`'s audio in row `row`, from Qwen2.5-Omni-style
    inputs (`input_features` `[n_audio, mels, frames]` with `feature_attention_mask`, one entry per audio
    in batch order); other layouts: pass `spectrogram=` or `waveform=` to `plot_attention_on_audio`."""
    feats, mask = inputs.get("input_features"), inputs.get("feature_attention_mask")
    if feats is None or mask is None or feats.dim() != 3:
        raise ValueError("these inputs carry no per-audio input_features with feature_attention_mask; pass "
                         "plot_attention_on_audio(..., waveform=...) or spectrogram=[mels, frames]")
    index = media_index(tm, "audio", item, row)
    n = int(mask[index].sum())
    return feats[index, :, :n].float().cpu().numpy()


def media_index(tm, group: str, item: int, row: int) -> int:
    """The index of row `row`'s clip `item`'s `group` medium among all such media of the batch, in the
    order processors emit them (row by row, clip by clip)."""
    code = GROUPS.index(group)
    index = 0
    for r in range(row + 1):
        have = sorted(tm.item[r][tm.group[r] == code].unique().tolist())
        if r < row:
            index += len(have)
        elif item not in have:
            raise ValueError(f"row {row} has no {group} in clip {item} (clips with {group}: {have})")
        else:
            index += have.index(item)
    return index


def plot_attention_on_audio(qa, item: int = 0, heads=None, waveform=None, spectrogram=None, sample_rate: int = 16_000):
    """The query's attention on each audio token of clip `item` (layer x time, one column per token over its
    seconds) under the audio: `waveform` (float `[samples]` at `sample_rate`) or `spectrogram` (`[mels,
    frames]`, drawn over the audio's span) or nothing."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    tm, r = qa.tm, qa.row
    pos = tm.positions("audio", row=r, item=item)
    w = qa.mean_heads(heads)[:, pos].numpy()  # [L, tokens]
    t0, t1 = tm.time[r, pos].numpy(), tm.time_end[r, pos].numpy()
    end = float(t1.max())
    has_top = waveform is not None or spectrogram is not None
    layers = list(qa.layers)
    fig, axes = plt.subplots(2 if has_top else 1, 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=(10, 1.6 * has_top + max(2.0, 0.12 * len(layers) + 1.2)),
                             gridspec_kw=dict(height_ratios=[1, 2] if has_top else [1]))
    axes = axes[:, 0]
    if waveform is not None:
        wave = np.asarray(waveform, dtype=np.float32).reshape(-1)
        n = max(1, len(wave) // 2000)  # a min/max envelope of 2,000 columns draws a minute of audio at once
        env = wave[: len(wave) // n * n].reshape(-1, n)
        axes[0].fill_between(np.arange(len(env)) * n / sample_rate, env.min(1), env.max(1), color="0.3", lw=0.5)
        axes[0].set_ylabel("waveform")
    elif spectrogram is not None:
        spec = np.asarray(spectrogram)
        axes[0].imshow(spec, origin="lower", aspect="auto", extent=(0, end, 0, spec.shape[0]), cmap="Greys")
        axes[0].set_ylabel("mel bin")
    ax = axes[-1]
    edges = np.append(t0, t1[-1])
    ys = np.append(np.asarray(layers, dtype=float) - 0.5, layers[-1] + 0.5)
    image = ax.pcolormesh(edges, ys, w, cmap=_cmap(), norm=Normalize(0, max(float(w.max()), 1e-9)), shading="flat")
    ax.set_xlim(0, end)
    _layer_axis(ax, layers)
    ax.set_ylabel("layer")
    ax.set_xlabel(f"seconds from the start of clip {item}'s audio ({len(pos)} tokens)")
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="attention weight per token")
    fig.suptitle(f"attention of {qa.query!r} on audio[{item}], {qa.head_label(heads)}", fontsize=10)
    return fig
