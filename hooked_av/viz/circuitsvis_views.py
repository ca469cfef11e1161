"""circuitsvis where it fits: the full `[heads, N, N]` pattern of one layer among a few dozen to a few
hundred positions (a short prompt, or a selection of query and key tokens), labelled by the TokenMap.

circuitsvis sends every cell to the browser as JSON and draws one square matrix with one token list
on both axes, so its page grows with heads x N^2: 131 MB for one head at 3,054 tokens. These views
estimate the page before reading anything and refuse past `max_bytes` (5 MB by default), naming the
aggregated views that grow with what is shown instead (`plot_group_mass_heads`,
`plot_attention_over_time`). The page inlines circuitsvis's own bundled script (its `local_src`,
`circuitsvis/dist/cdn/iife.js`, about 1.3 MB), so it works offline; `str()` of a circuitsvis object
would load it from a CDN and stay blank without network.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hooked_av.viz.reading import positions_of, token_labels

MAX_BYTES = 5_000_000
DECIMALS = 4  # attention weights are written with 4 decimals: 8 bytes a cell in circuitsvis's JSON
_BYTES_PER_CELL = 8
_AGGREGATED = (
    "use an aggregated view instead: hooked_av.viz.plot_group_mass_heads(group_attention_mass(model, inputs, tm, "
    "per_head=True)) for token group x token group per layer and head, or "
    "hooked_av.viz.plot_attention_over_time(query_attention(model, inputs, query)) for one query over time"
)


@dataclass
class OfflinePage:
    """A circuitsvis view with its script inlined: `fragment` (a div and a script, for a notebook cell or
    `Report.raw`), `page()` (a whole HTML document), `save(path)`."""

    fragment: str
    title: str

    def page(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title></head>"
                f"<body><h3 style='font-family: sans-serif'>{html.escape(self.title)}</h3>\n{self.fragment}\n</body></html>")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.page(), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        return self.fragment


def _circuitsvis():
    try:
        import circuitsvis.attention
        from circuitsvis.utils import render
    except ImportError as e:
        raise ImportError("the circuitsvis views need circuitsvis: pip install 'hooked-av[viz]' (or circuitsvis>=1.43)") from e
    return circuitsvis.attention, render


def script_bytes() -> int:
    """Size of circuitsvis's bundled script, which every page inlines."""
    _, render = _circuitsvis()
    return (Path(render.__file__).parent.parent / "dist" / "cdn" / "iife.js").stat().st_size


def page_bytes(n_positions: int, n_heads: int) -> int:
    """Estimated size of a page showing `n_heads` patterns over `n_positions` positions (bytes)."""
    return script_bytes() + n_heads * n_positions**2 * _BYTES_PER_CELL + 40 * n_positions


def _layout(model, inputs, layer, queries, keys, heads, row, tm, max_bytes, what):
    """Check everything and the size, before any forward: (tm, positions, query mask, key mask, heads)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not 0 <= int(layer) < n_layers:
        raise ValueError(f"layer {layer}: the model has {n_layers} layers (0..{n_layers - 1})")
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < n_heads]
    if not heads or bad:
        raise ValueError(f"heads {bad or '[]'}: the model has {n_heads} query heads (0..{n_heads - 1})")
    tm = model.token_map(inputs) if tm is None else tm
    if queries is None and keys is None:
        queries = keys = "all"
    q = positions_of(tm, queries if queries is not None else keys, row)
    k = positions_of(tm, keys if keys is not None else queries, row)
    pos = torch.unique(torch.cat([q, k]))  # sorted: circuitsvis draws one token list on both axes
    size = page_bytes(len(pos), len(heads))
    if size > max_bytes:
        raise ValueError(
            f"{what}: {len(heads)} head(s) x {len(pos)} x {len(pos)} positions would write a page of about "
            f"{size / 1e6:.0f} MB, over max_bytes={max_bytes / 1e6:g} MB (circuitsvis sends every cell to the "
            f"browser). Show fewer heads or positions (queries=, keys=), or {_AGGREGATED}"
        )
    return tm, pos, torch.isin(pos, q), torch.isin(pos, k), heads


def _square(model, inputs, layer, pos, is_q, is_k, heads, row, tm) -> np.ndarray:
    """`[heads, n, n]` over positions `pos`: the attention of query rows `is_q` to key columns `is_k`,
    zero elsewhere."""
    rows = model.attention_rows(inputs, queries=pos[is_q], layers=[layer], heads=heads, tm=tm)[0, row]  # [H, q, K]
    out = torch.zeros(len(heads), len(pos), len(pos), dtype=torch.float64)
    out[:, is_q.nonzero().flatten()[:, None], is_k.nonzero().flatten()[None, :]] = rows[:, :, pos[is_k]].double().cpu()
    return np.round(out.numpy(), DECIMALS)


def _top(att: np.ndarray) -> float:
    # the darkest colour is the largest weight shown: a selection's weights are a small part of each row
    return float(att.max()) if att.max() > 0 else 1.0


def _title(layer, heads: str, pos, is_q, is_k, top: float) -> str:
    return (f"layer {layer}, {heads}: {int(is_q.sum())} queries x {int(is_k.sum())} keys on {len(pos)} positions; "
            f"colour from 0 (white) to {top:.3g} (darkest); rows that are not queries and columns that are not keys are 0")


def _labels(model, inputs, tm, row, pos) -> list[str]:
    # circuitsvis strips whitespace from token labels (`replace(/\s/g, "")`): keep the parts apart with a dot
    labels = token_labels(model, inputs, tm, row)
    return [labels[p].replace(" ", "\u00b7") for p in pos.tolist()]


def attention_heads(model, inputs: dict, layer: int, queries=None, keys=None, heads=None, row: int = 0, tm=None,
                    max_bytes: int = MAX_BYTES) -> OfflinePage:
    """circuitsvis `AttentionHeads` of `layer` (one thumbnail per head, click to enlarge) for batch row `row`.

    queries / keys: TokenMap specs, Selections or positions; the view is the square over their union in
    position order, showing the attention of the query rows to the key columns (zero elsewhere); both
    None: every position of the row (a short prompt). One given: that set on both axes. Labels:
    `tm.labels()` (`A0·0.12s`, `V1·t3·(2,5)`, `Q·which`). Refused before any forward when the page would
    exceed `max_bytes`. Patterns are read through `model.attention_rows` (active hooks apply)."""
    cv, _ = _circuitsvis()
    tm, pos, is_q, is_k, heads = _layout(model, inputs, layer, queries, keys, heads, row, tm, max_bytes, "attention_heads")
    att = _square(model, inputs, layer, pos, is_q, is_k, heads, row, tm)
    top = _top(att)
    shown = cv.attention_heads(att, _labels(model, inputs, tm, row, pos),
                               attention_head_names=[f"L{layer}H{h}" for h in heads], max_value=top, min_value=0.0)
    return OfflinePage(shown.local_src, _title(layer, f"heads {heads[0]}..{heads[-1]}", pos, is_q, is_k, top))


def attention_pattern(model, inputs: dict, layer: int, head: int, queries=None, keys=None, row: int = 0, tm=None,
                      max_bytes: int = MAX_BYTES) -> OfflinePage:
    """circuitsvis `AttentionPattern` of one head (hover a cell for its value); positions, labels and the
    size budget as in `attention_heads`."""
    cv, _ = _circuitsvis()
    tm, pos, is_q, is_k, heads = _layout(model, inputs, layer, queries, keys, [head], row, tm, max_bytes, "attention_pattern")
    att = _square(model, inputs, layer, pos, is_q, is_k, heads, row, tm)[0]
    top = _top(att)
    shown = cv.attention_pattern(_labels(model, inputs, tm, row, pos), att, max_value=top, min_value=0.0)
    return OfflinePage(shown.local_src, _title(layer, f"head {head}", pos, is_q, is_k, top))
