"""Sliding-window attention knockout (Geva et al. 2023; Zhang et al. 2025; "From Senses to Decisions").

For every edge src -> dst and every centre layer l, dst queries may not attend to src keys in the
window `range(max(0, l - k//2), min(L, l - (-k//2)))`; the metric is the relative change of the
probability of the answer's first token, `(p_blocked - p_orig) / p_orig * 100`, per sample, and its
mean over correctly answered samples (`result.mean()`, `result.plot()`).

    res = knockout(model, inputs, answers=first_token_ids)
    res.plot()   # relative change against layer, one line per edge
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import combinations

import pandas as pd
import torch

from patching import checks
from patching.hooks import block_attention
from patching.metrics import AnswerProb, relative_change
from patching.results import Result
from patching.sweep import forward_rows, run_rows, samples

DEFAULT_EDGES = (
    ("audio", "question"), ("video", "question"), ("audio", "last"),
    ("video", "last"), ("question", "last"), ("last", "last"),
)


def window_layers(centre: int, k: int, n_layers: int) -> range:
    """The k-layer window centred on `centre`, clipped to the model (METHODS.md)."""
    checks.count(k, "window", unit=" layer")  # a 0-layer window edits nothing
    return range(max(0, centre - k // 2), min(n_layers, centre - (-k // 2)))


def _present(tm, spec) -> bool:
    return bool(tm.select(spec).mask.any(-1).all())


def default_edges(tm) -> list[tuple[str, str]]:
    """The six edges whose groups every row has, plus for interleaved media items the cross-item
    edges `item i -> item j` (i < j; an item is its audio and video tokens together)."""
    edges = [(s, d) for s, d in DEFAULT_EDGES if _present(tm, s) and _present(tm, d)]
    n_items = 0
    while any(_present(tm, f"{m}[{n_items}]") for m in ("audio", "video", "image")):
        n_items += 1
    if n_items > 1:
        def item(i):
            return "|".join(f"{m}[{i}]" for m in ("audio", "video", "image") if _present(tm, f"{m}[{i}]"))

        edges += [(item(i), item(j)) for i, j in combinations(range(n_items), 2)]
    return edges


def parse_edge(edge) -> tuple[str, str]:
    """`("audio", "last")` or `"audio->last"` -> (src, dst)."""
    if isinstance(edge, str):
        if "->" not in edge:
            raise ValueError(f"an edge is 'src->dst' or (src, dst), got {edge!r}")
        src, dst = (s.strip() for s in edge.split("->", 1))
        return src, dst
    src, dst = edge
    return src, dst


def knockout(
    model,
    inputs: dict,
    answers,
    edges: Sequence | None = None,
    window: int = 9,
    centres: Sequence[int] | None = None,
    tm=None,
    batch_size: int | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
) -> Result:
    """`answers`: the answer's first token id per sample, one for all, or an `AnswerProb`. `edges`: list of
    (src, dst) or "src->dst" (default `default_edges` of each sample). `centres`: window centres
    (default every layer). Returns a Result with one row per (sample, edge, centre)."""
    L = model.cfg.n_layers
    checks.count(window, "window", unit=" layer")
    centres = checks.layers(model, centres, "centres", "window centre(s)")
    if edges is not None:
        edges = [parse_edge(e) for e in checks.nonempty(edges, "edges", none_ok=True)]
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    metric.check(model, checks.batch_of(inputs))
    data = samples(model, inputs, tm)
    plans = []
    for s in data:  # build (and so validate) every intervention before the first forward
        sample_edges = default_edges(s.tm) if edges is None else edges
        if not sample_edges:
            raise ValueError(f"sample {s.index} has none of the default edges' token groups; pass edges= explicitly")
        cells, ivs = [], []
        for src, dst in sample_edges:
            for c in centres:
                layers = window_layers(c, window, L)
                try:
                    ivs.append(block_attention(s.tm, src, dst, layers))
                except ValueError as e:
                    raise ValueError(f"knockout edge {src}->{dst} (sample {s.index}): {e}") from None
                cells.append((f"{src}->{dst}", src, dst, c, layers.start, layers.stop - 1))
        plans.append((s, cells, ivs))

    rows, t0 = [], time.perf_counter()
    for s, cells, ivs in plans:
        with torch.no_grad():
            base = forward_rows(model, s, 1)
        p_orig = float(metric(base, s.index)[0])
        correct = bool(metric.correct(base, s.index)[0])
        p = run_rows(model, s, ivs, reduce=lambda lg, i=s.index: metric(lg, i), batch_size=batch_size,
                     max_batch_tokens=max_batch_tokens, progress=progress, desc=f"knockout sample {s.index}")
        rel = relative_change(p, p_orig)
        for (edge, src, dst, c, lo, hi), pb, rc in zip(cells, p.tolist(), rel.tolist()):
            rows.append(dict(sample=s.index, edge=edge, src=src, dst=dst, layer=c, window_start=lo, window_end=hi,
                             p_orig=p_orig, p_blocked=pb, rel_change=rc, correct=correct))
    settings = dict(window=window, centres=centres, edges=None if edges is None else [list(e) for e in edges],
                    metric=metric.settings(), n_layers=L, seconds=time.perf_counter() - t0,
                    interventions_sample0=[iv.to_dict() for iv in plans[0][2]] if plans else [])
    return Result("knockout", pd.DataFrame(rows), settings)
