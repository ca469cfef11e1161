"""The markup of the SAE feature page (`features_page`): the page, a feature's section and its cards, and
the small inline SVG pictures (a feature's activation histogram stacked by modality, the firing-frequency
density of every feature, mass shares, an audio snippet's waveform with the token's span). Everything is
inline: no script, no link, no font; one colour per modality throughout."""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from patching.datasets.feature_stats import MODALITIES, FeatureStats

COLOURS = {"audio": "#d9822b", "video": "#2b6cb0", "image": "#8a4fbf", "text": "#7a7a7a", "mixed": "#3c9d5d",
           "dead": "#bbbbbb"}
GROUPS = (*MODALITIES, "mixed", "dead")
CROP_SIDE = 192  # px: a crop's longer side at most (JPEG, quality 85: a few kB)

def wave_svg(clip: np.ndarray, start: float, t0: float, t1: float, width: int = 200, height: int = 36) -> str:
    """A min/max envelope of the snippet with the token's span shaded."""
    n = max(1, len(clip) // width)
    env = clip[: len(clip) // n * n].reshape(-1, n) if len(clip) >= n else clip.reshape(1, -1)
    lo, hi = env.min(1), env.max(1)
    scale = max(float(np.abs(clip).max()), 1e-6)
    xs = np.linspace(0, width, len(env))
    pts = " ".join(f"{x:.1f},{height / 2 - h / scale * height / 2:.1f}" for x, h in zip(xs, hi))
    pts += " " + " ".join(f"{x:.1f},{height / 2 - l / scale * height / 2:.1f}" for x, l in zip(xs[::-1], lo[::-1]))
    seconds = max(len(clip) / 16_000, 1e-9)
    a, b = (t0 - start) / seconds * width, (t1 - start) / seconds * width
    return (f"<svg class='wave' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>"
            f"<polygon points='{pts}'></polygon>"
            f"<rect class='span' x='{a:.1f}' y='0' width='{max(b - a, 1.5):.1f}' height='{height}'></rect></svg>")


def _histogram_svg(edges: np.ndarray, counts: dict[str, np.ndarray], width: int = 440, height: int = 130) -> str:
    """Bars of the firing activations' counts per bin on a log scale (a bar's height is log10(1 + count), so
    a tail of a few tokens stays visible beside a bin of thousands), split by modality in proportion to
    their counts."""
    left, bottom, top_pad = 40, 18, 6
    w, h = width - left - 6, height - bottom - top_pad
    total = counts["all"]
    top = max(int(total.max()), 1)
    scale = h / math.log10(1 + top)
    bw = w / len(total)
    bars = []
    for b in range(len(total)):
        y, n = height - bottom, int(total[b])
        for m in MODALITIES:
            c = int(counts[m][b])
            if c:
                bh = c / n * math.log10(1 + n) * scale
                y -= bh
                bars.append(f"<rect x='{left + b * bw + 0.5:.1f}' y='{y:.2f}' width='{max(bw - 1, 0.5):.1f}' "
                            f"height='{bh:.2f}' fill='{COLOURS[m]}'><title>{m}: {c} in "
                            f"[{edges[b]:.3g}, {edges[b + 1]:.3g})</title></rect>")
    ticks = "".join(f"<line x1='{left - 3}' x2='{left}' y1='{y:.1f}' y2='{y:.1f}' stroke='#444'></line>"
                    f"<text x='{left - 5}' y='{y + 3:.1f}' class='tick' text-anchor='end'>{v:,}</text>"
                    for v in sorted({top} | {10 ** k for k in range(7) if 10 ** k <= top / 2})
                    for y in [height - bottom - math.log10(1 + v) * scale])
    axis = (f"<line x1='{left}' y1='{height - bottom}' x2='{width - 6}' y2='{height - bottom}' stroke='#444'></line>"
            f"<line x1='{left}' y1='{top_pad}' x2='{left}' y2='{height - bottom}' stroke='#444'></line>"
            f"<text x='{left}' y='{height - 4}' class='tick'>0</text>"
            f"<text x='{width - 6}' y='{height - 4}' class='tick' text-anchor='end'>{edges[-1]:.3g}</text>"
            f"<text x='{left + w / 2}' y='{height - 4}' class='tick' text-anchor='middle'>activation</text>{ticks}")
    return f"<svg class='hist' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>{axis}{''.join(bars)}</svg>"


def _density_svg(table: pd.DataFrame, width: int = 520, height: int = 150, bins: int = 24) -> str:
    """How many features fire at each frequency (log10 of the share of tokens), stacked by modality group."""
    alive = table[table["n_firing"] > 0]
    if not len(alive):
        return "<p>No feature fires on any token of the store.</p>"
    logf = np.log10(alive["frequency"].to_numpy())
    lo, hi = math.floor(logf.min()), max(math.ceil(logf.max()), math.floor(logf.min()) + 1)
    edges = np.linspace(lo, hi, bins + 1)
    counts = {g: np.histogram(logf[alive["group"].to_numpy() == g], edges)[0] for g in GROUPS if g != "dead"}
    total = sum(counts.values())
    left, bottom = 34, 30
    w, h = width - left - 24, height - bottom - 8
    top = max(int(total.max()), 1)
    bw = w / bins
    bars = []
    for b in range(bins):
        y = height - bottom
        for g, c in counts.items():
            if c[b]:
                bh = c[b] / top * h
                y -= bh
                bars.append(f"<rect x='{left + b * bw + 0.5:.1f}' y='{y:.1f}' width='{max(bw - 1, 0.5):.1f}' height='{bh:.1f}' "
                            f"fill='{COLOURS[g]}'><title>{g}: {c[b]} feature(s)</title></rect>")
    ticks = "".join(f"<text x='{left + (e - lo) / (hi - lo) * w:.1f}' y='{height - bottom + 13}' class='tick' "
                    f"text-anchor='middle'>{100 * 10.0 ** e:g}%</text>" for e in range(lo, hi + 1))
    axis = (f"<line x1='{left}' y1='{height - bottom}' x2='{left + w}' y2='{height - bottom}' stroke='#444'></line>"
            f"<text x='{left + w / 2}' y='{height - 4}' class='tick' text-anchor='middle'>firing frequency (share of "
            f"the store's tokens, log scale)</text><text x='{left - 4}' y='16' class='tick' text-anchor='end'>{top}</text>"
            f"<text x='{left - 4}' y='{height - bottom}' class='tick' text-anchor='end'>0</text>")
    return f"<svg class='density' width='{width}' height='{height}'>{axis}{ticks}{''.join(bars)}</svg>"


def _shares_svg(row, width: int = 120, height: int = 12) -> str:
    x, parts = 0.0, []
    for m in MODALITIES:
        s = row[f"share_{m}"]
        if s > 0:
            parts.append(f"<rect x='{x:.1f}' y='0' width='{s * width:.1f}' height='{height}' fill='{COLOURS[m]}'>"
                         f"<title>{m} {s:.2f}</title></rect>")
            x += s * width
    return f"<svg width='{width}' height='{height}'>{''.join(parts)}</svg>"


def _badge(group: str) -> str:
    return f"<span class=badge style='background:{COLOURS[group]}'>{group}</span>"


def _stats_line(stats: FeatureStats, f: int) -> str:
    r = stats.table.loc[f]
    shares = ", ".join(f"{m} {r[f'share_{m}']:.2f}" for m in MODALITIES if stats.tokens[m])
    return (f"fires on {int(r['n_firing']):,} of {stats.n_tokens:,} tokens ({100 * r['frequency']:.2f}%); max "
            f"{r['max']:.3g}; mean where it fires {r['mean_firing']:.3g}; activation mass by modality: {shares}")


def feature_section(stats: FeatureStats, f: int, media) -> str:
    r = stats.table.loc[f]
    head = (f"<section class=feature id='f{f}'><h3>Feature {f} {_badge(r['group'])} <a class=up href='#top'>top</a>"
            f"</h3><p class=stats>{_stats_line(stats, f)}</p>")
    if f not in stats.edges:
        return head + "<p>It never fires on this store: no histogram and no top token.</p></section>"
    n_bins = len(stats.edges[f]) - 1
    cap = (f"Activations where it fires: n = {int(r['n_firing']):,} tokens in {n_bins} bins of "
           f"{stats.edges[f][1]:.3g} over (0, {stats.edges[f][-1]:.3g}], counts on a log scale, split by modality; the "
           f"{stats.n_tokens - int(r['n_firing']):,} tokens where it is 0 are not drawn. {_legend()}")
    top = stats.top[stats.top["feature"] == f]
    cards = []
    for i, row in top.iterrows():
        kind = "" if row["group"] == row["modality"] else f" ({html.escape(str(row['group']))})"
        q = media.samples.get(str(row["id"]), {}).get("question")
        q = q if isinstance(q, str) else ""
        where = f"{row['id']} · pos {int(row['pos'])}" + (f" · clip {int(row['item'])}" if int(row["item"]) >= 0 else "")
        cards.append(f"<div class='card' data-token='{int(row['token'])}' data-activation='{row['activation']:.9g}' "
                     f"style='border-top-color:{COLOURS[row['modality']]}'><div class=head>#{int(row['rank']) + 1}"
                     f" <b>{row['activation']:.3g}</b> {row['modality']}{kind}</div>"
                     f"{media.html(i)}<div class=where>{html.escape(where)}</div>"
                     f"<div class=q title='{html.escape(q)}'>{html.escape(q[:90])}</div></div>")
    return (head + f"<figure>{_histogram_svg(stats.edges[f], stats.counts[f])}<figcaption>{cap}</figcaption></figure>"
            f"<p class=sub>Top {len(top)} tokens across the store (of {int(r['n_firing']):,} where it fires; ties: the "
            f"earlier token in store order):</p><div class=cards>{''.join(cards)}</div></section>")


def page_html(sae, store, stats: FeatureStats, sections, sizes, media) -> str:
    t = stats.table
    cfg = sae.cfg
    arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else type(sae).__name__
    tokens = ", ".join(f"{m} {n:,}" for m, n in stats.tokens.items() if n)
    counts = t["group"].value_counts()
    shown = t.set_index("feature").loc[stats.features] if stats.features else t.iloc[:0]
    group_rows = "".join(
        f"<tr><td>{_badge(g)}</td><td>{int(counts.get(g, 0)):,}</td><td>{int((shown['group'] == g).sum())}</td></tr>"
        for g in GROUPS)
    tables = []
    for g in GROUPS:
        sub = shown[shown["group"] == g]
        if not len(sub):
            continue
        rows = "".join(f"<tr><td><a href='#f{f}'>{f}</a></td><td>{int(r['n_firing']):,} ({100 * r['frequency']:.2f}%)</td>"
                       f"<td>{r['max']:.3g}</td><td>{r['mean_firing']:.3g}</td><td>{_shares_svg(r)}</td></tr>"
                       for f, r in sub.iterrows())
        tables.append(f"<h3>{_badge(g)} {len(sub)} shown</h3><table><tr><th>feature</th><th>fires on (n, % of "
                      f"{stats.n_tokens:,} tokens)</th><th>max</th><th>mean where firing</th><th>mass share "
                      f"{_legend()}</th></tr>{rows}</table>")
    by_group = "".join(f"<h2>{_badge(g)} features: {len(fs)} shown</h2>" + "".join(sections[f] for f in fs)
                       for g in GROUPS for fs in [[f for f in stats.features if t.at[f, "group"] == g]] if fs)
    per = (f"{np.mean(sizes) / 1e3:,.0f} kB per feature on average (min {min(sizes) / 1e3:,.0f}, max "
           f"{max(sizes) / 1e3:,.0f})") if sizes else "no feature shown"
    notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in media.notes)
    body = f"""<a id=top></a><h1>SAE features at {html.escape(stats.hook)}</h1>
<p class=meta>SAE: {html.escape(str(arch))}, d_in {getattr(cfg, 'd_in', '?')}, d_sae {cfg.d_sae:,}. Store:
{html.escape(str(store.folder))}: n = {stats.n_tokens:,} tokens ({tokens}) of {stats.n_samples:,} samples, harvested
groups {html.escape(', '.join(map(str, store.settings.get('groups', []))))} with {html.escape(str(store.settings.get('model', '?')))}.
Shown: {len(stats.features)} features (the largest activation mass unless chosen), top {int(stats.top.groupby('feature').size().max()) if len(stats.top) else 0} tokens each.
Every number describes this store (n stated); none is an estimate with an interval.</p>{notes}
<h2>Features by modality</h2>
<p>A feature belongs to a modality when that modality holds at least {stats.threshold:.0%} of its activation mass (the sum
of its activations over the store's tokens), else it is <i>mixed</i>; <i>dead</i> features never fire (activation &gt; 0)
on the store. Shares carry the store's base rates (tokens per modality above).</p>
<table><tr><th>group</th><th>features (of {cfg.d_sae:,})</th><th>shown</th></tr>{group_rows}</table>
<figure>{_density_svg(t)}<figcaption>Firing frequency of the {int((t['n_firing'] > 0).sum()):,} features that fire
(n = {stats.n_tokens:,} tokens), stacked by group.</figcaption></figure>
{''.join(tables)}
{by_group}
<p class=foot>Page: {per}. Video and image crops: JPEG, the merged patch outlined ({CROP_SIDE} px at most); audio:
16 kHz mono 16-bit WAV, {media.audio_context:g} s either side of the token.</p>"""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>SAE features at {html.escape(stats.hook)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _legend() -> str:
    return " ".join(f"<span style='color:{COLOURS[m]}'>&#9632;</span>{m}" for m in MODALITIES)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 1.5em auto; color: #222; font-size: 14px; }
h1 { font-size: 1.45em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; } .up { font-size: 0.75em; font-weight: normal; margin-left: 0.5em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
.meta, .stats, .sub, figcaption, .foot, .note { color: #444; } .note { color: #a33; } figure { margin: 0.4em 0; }
figcaption { font-size: 0.85em; max-width: 720px; } .tick { font-size: 10px; fill: #444; }
.badge { color: #fff; border-radius: 3px; padding: 0 6px; font-size: 0.8em; font-weight: normal; }
section.feature { border-top: 1px solid #eee; padding-top: 0.3em; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, 214px); gap: 10px; }
.card { border: 1px solid #ddd; border-top: 4px solid #888; border-radius: 4px; padding: 6px; font-size: 12px; }
.card .head { margin-bottom: 4px; } .where { color: #555; font-size: 11px; margin-top: 2px; }
.q { color: #777; font-size: 11px; font-style: italic; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.crop { position: relative; display: inline-block; line-height: 0; }
.crop img { width: 200px; image-rendering: pixelated; }
.crop .box { position: absolute; outline: 2px solid #00e5ff; box-shadow: 0 0 0 1px #000; }
audio { width: 200px; height: 32px; } svg.wave polygon { fill: #9a9a9a; }
svg.wave .span { fill: rgba(217, 130, 43, 0.45); stroke: #d9822b; stroke-width: 1.5; }
.ctx { font-family: ui-monospace, monospace; font-size: 12px; line-height: 1.7; margin: 2px 0; word-break: break-word; }
.ctx span { white-space: pre; border-radius: 2px; border: 1px solid #e4e4e4; margin: 0 1px; padding: 0 1px; } .ctx .hit { outline: 2px solid #d9822b; font-weight: bold; }
.ctx .chip, .ctx .gap { color: #888; border: none; } .miss { color: #a33; }
"""
