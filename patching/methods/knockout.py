"""Sliding-window attention knockout (Geva et al. 2023; Zhang et al. 2025; "From Senses to Decisions";
Kim et al., "Map the Flow").

For every edge src -> dst and every layer l, dst queries may not attend to src keys in the layers of
l's window (`styled_window`: centred, or Map the Flow's inverse, top-down and bottom-up). Per row: the
relative change of the probability of the gold answer's first token, `(p_blocked - p_orig) / p_orig *
100` (`rel_change`), the same for the model's own top token of the plain run (`rel_change_pred`, Zhang
et al.'s metric), the top token under the knockout and whether it is the gold one (`correct_blocked`,
Map the Flow's accuracy: `knockout_accuracy`). `heads=` knocks the edge out in those query heads only.

    res = knockout(model, inputs, answers=first_token_ids)
    res.plot()   # relative change against layer, one line per edge
    knockout_accuracy(res).df   # accuracy (%) per edge and layer
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import combinations

import pandas as pd
import torch

from patching.engine import checks, cost
from patching.engine.experiment import Cost, Experiment, Plot, Report, StudySample
from patching.engine.hooks import block_attention
from patching.engine.metrics import AnswerProb, relative_change
from patching.engine.results import Result
from patching.engine.stats import adjust, interval, paired_test
from patching.engine.sweep import forward_rows, plan_sweep, run_rows, sample_maps, samples

DEFAULT_EDGES = (
    ("audio", "question"), ("video", "question"), ("audio", "last"),
    ("video", "last"), ("question", "last"), ("last", "last"),
)


WINDOW_STYLES = ("centre", "inverse", "top_down", "bottom_up")
DEFAULT_WINDOW = 9  # Zhang et al. and Map the Flow (information_flow_analysis.py, --window 9)
MIN_LAYERS_FOR_DEFAULT = 18  # 9 layers are a window (at most half the model) from 18 layers on


def default_window(n_layers: int) -> int:
    """The knockout window a model gets when none is given: the anchors' 9 layers where the model has
    at least 18 (their models have 28 to 40; 9 is then at most half the depth), else a quarter of the
    depth, at least 1 (the 4-layer toy: 1; 8 layers: 2; 16: 4), so that no window covers the whole
    model and the curve can say where along the depth an edge matters.

        default_window(28), default_window(4)  # (9, 1)
    """
    checks.count(n_layers, "n_layers", unit=" layer")
    return DEFAULT_WINDOW if n_layers >= MIN_LAYERS_FOR_DEFAULT else max(1, n_layers // 4)


def window_rule(k: int | None, n_layers: int, style: str = "centre") -> str:
    """How the window of a knockout was chosen, for settings and titles: "given", "default for N
    layers", or "none" for the styles that take no size."""
    if style in ("top_down", "bottom_up"):
        return "none"
    return "given" if k is not None else f"default for {n_layers} layers"


def whole_model_centres(k: int, n_layers: int, centres=None) -> list[int]:
    """The centres at which a centred `k`-layer window covers every layer of an `n_layers` model."""
    return [c for c in (range(n_layers) if centres is None else centres) if len(window_layers(c, k, n_layers)) == n_layers]


def warn_wide_window(k: int | None, n_layers: int, style: str = "centre", centres=None) -> None:
    """A UserWarning when a given centred window knocks out the whole model at some centre (the curve is
    then flat there and its lowest point arbitrary); the default window never does."""
    if k is None or style != "centre":
        return
    whole = whole_model_centres(k, n_layers, centres)
    if whole:
        import warnings

        warnings.warn(f"a {k}-layer knockout window covers every layer of this {n_layers}-layer model at centre(s) {whole}: "
                      f"each of those points knocks the edge out everywhere and the curve is flat there; pass a smaller "
                      f"window (None gives {default_window(n_layers)}, the default for {n_layers} layers)", UserWarning,
                      stacklevel=3)


def window_layers(centre: int, k: int, n_layers: int) -> range:
    """The k-layer window centred on `centre`, clipped to the model (docs/methods.md; Map the Flow's
    "center": `range(max(0, l - k//2), min(L, l - (-k//2)))`)."""
    checks.count(k, "window", unit=" layer")  # a 0-layer window edits nothing
    return range(max(0, centre - k // 2), min(n_layers, centre - (-k // 2)))


def styled_window(layer: int, k: int | None, n_layers: int, style: str = "centre") -> list[int]:
    """The layers knocked out for `layer`, as Map the Flow's `information_flow_analysis.py` builds them
    (`--window_style`): `centre` (its "center"): `window_layers(layer, k)`; `inverse`: every layer
    outside that window; `top_down`: `layer`..L-1; `bottom_up`: 0..`layer`. `k` (None:
    `default_window(n_layers)`, their 9 from 18 layers on) sizes the first two; the last two take no
    size (pass None). An empty list (an inverse window that covers the model) is refused: it would
    knock out nothing."""
    style = "centre" if style == "center" else style
    if style not in WINDOW_STYLES:
        raise ValueError(f"window style must be one of {list(WINDOW_STYLES)}, got {style!r}")
    if style in ("top_down", "bottom_up"):
        if k is not None:
            raise ValueError(f"a {style} window runs {'from the layer to the last' if style == 'top_down' else 'from layer 0 to the layer'}"
                             f" and takes no window size; pass window=None (got {k})")
        return list(range(layer, n_layers)) if style == "top_down" else list(range(0, layer + 1))
    window = list(window_layers(layer, default_window(n_layers) if k is None else k, n_layers))
    if style == "centre":
        return window
    out = [x for x in range(n_layers) if x not in window]
    if not out:
        raise ValueError(f"the inverse of the {k}-layer window around layer {layer} is empty in a {n_layers}-layer "
                         "model, so nothing would be knocked out; use a smaller window")
    return out


def _present(tm, spec) -> bool:
    return bool(tm.select(spec).mask.any(-1).all())


def default_edges(tm) -> list[tuple[str, str]]:
    """The six edges whose groups every row has; with several clips in every row ("From Senses to
    Decisions"' interleaved items), per clip `item[i] -> question` and `item[i] -> last`
    (where the row has a question), then `item[i] -> item[j]` for i < j (attention is causal: an
    earlier clip never reads a later one). A clip (`item[i]`) is all its media tokens; the text
    naming the clips is the group `label`, not the question.

        default_edges(tm)  # [("audio", "question"), ("video", "question"), ("audio", "last"), ...]
    """
    edges = [(s, d) for s, d in DEFAULT_EDGES if _present(tm, s) and _present(tm, d)]
    n_items = 0
    while _present(tm, f"item[{n_items}]"):
        n_items += 1
    if n_items > 1:
        items = [f"item[{i}]" for i in range(n_items)]
        edges += [(it, dst) for it in items for dst in ("question", "last") if _present(tm, dst)]
        edges += [(items[i], items[j]) for i, j in combinations(range(n_items), 2)]
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
    window: int | None = None,
    centres: Sequence[int] | None = None,
    window_style: str = "centre",
    heads: Sequence[int] | None = None,
    tm=None,
    batch_size: int | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
) -> Result:
    """`answers`: the gold answer's first token id per sample, one for all, or an `AnswerProb` (words are read
    as the first token the model would write after each prompt: `model.answer_tokens`). `edges`:
    list of (src, dst) or "src->dst" (default `default_edges` of each sample). `centres`: the layers l
    the windows are built around (default every layer). `window` (default `default_window(n_layers)`
    for `centre` and `inverse`: Map the Flow's and Zhang et al.'s 9 from 18 layers on, a quarter of
    the depth below; None for `top_down` / `bottom_up`, which take no size) and `window_style` as in
    `styled_window`; a given centred window that covers the whole model at some centre warns. The
    window used and how it was chosen are in the settings (`window`, `window_rule`) and every row
    (`window`, -1 for the styles without a size). `heads`: knock out in these query heads only
    (default all).

    One row per (sample, edge, centre): `p_orig`, `p_blocked`, `rel_change` (gold token, percent);
    `pred` (the plain run's top token), `p_pred_orig`, `p_pred_blocked`, `rel_change_pred` (Zhang et
    al.'s metric: their answer is the model's own first generated token); `pred_blocked` (top token
    under the knockout), `correct` (gold is the plain run's top token), `correct_blocked` (gold is the
    top token under the knockout).

        res = knockout(model, inputs, answers=[answer], window=1, centres=[1, 2], progress=False)
        res.df[["edge", "layer", "rel_change"]]
    """
    L = model.cfg.n_layers
    style = "centre" if window_style == "center" else window_style
    if style not in WINDOW_STYLES:
        raise ValueError(f"window_style must be one of {list(WINDOW_STYLES)}, got {window_style!r}")
    centres = checks.layers(model, centres, "centres", "window centre(s)")
    layer_sets = {c: styled_window(c, window, L, style) for c in centres}  # refuses what cannot apply
    warn_wide_window(window, L, style, centres)
    size = None if style in ("top_down", "bottom_up") else (default_window(L) if window is None else window)
    if heads is not None:
        heads = checks.heads(model, checks.nonempty(heads, "heads", none_ok=True))
    if edges is not None:
        edges = [parse_edge(e) for e in checks.nonempty(edges, "edges", none_ok=True)]
    if batch_size is not None:
        checks.count(batch_size, "batch_size")
    checks.count(max_batch_tokens, "max_batch_tokens")
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    metric.check(model, checks.batch_of(inputs), inputs)
    # every intervention built (so checked) before the towers
    plans = [_cells(stm, index, edges, centres, layer_sets, heads) for index, stm in enumerate(sample_maps(model, inputs, tm))]
    plans = [(s, *plan) for s, plan in zip(samples(model, inputs, tm), plans)]

    rows, t0 = [], time.perf_counter()
    for s, cells, ivs in plans:
        with torch.no_grad():
            base = forward_rows(model, s, 1)
        p_orig = float(metric(base, s.index)[0])
        correct = bool(metric.correct(base, s.index)[0])
        pred = int(base[0].argmax())
        own = AnswerProb(pred)
        p_pred_orig = float(own(base)[0])

        def reduce(lg, i=s.index, own=own):  # [rows, 4]: p(gold), p(pred), top token, gold is top
            return torch.stack([metric(lg, i), own(lg), lg.argmax(-1).double(), metric.correct(lg, i).double()], -1)

        out = run_rows(model, s, ivs, reduce=reduce, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                       progress=progress, desc=f"knockout sample {s.index}")
        rel, rel_pred = relative_change(out[:, 0], p_orig), relative_change(out[:, 1], p_pred_orig)
        for (edge, src, dst, c, lo, hi, n), o, rc, rcp in zip(cells, out.tolist(), rel.tolist(), rel_pred.tolist()):
            rows.append(dict(sample=s.index, edge=edge, src=src, dst=dst, layer=c, window=-1 if size is None else size,
                             window_start=lo, window_end=hi, n_window_layers=n, p_orig=p_orig, p_blocked=o[0], rel_change=rc, pred=pred,
                             p_pred_orig=p_pred_orig, p_pred_blocked=o[1], rel_change_pred=rcp,
                             pred_blocked=int(o[2]), correct=correct, correct_blocked=bool(o[3])))
    settings = dict(window=size, window_rule=window_rule(window, L, style), window_style=style, heads=heads, centres=centres,
                    edges=None if edges is None else [list(e) for e in edges],
                    metric=metric.settings(), n_layers=L, seconds=time.perf_counter() - t0,
                    interventions_sample0=[iv.to_dict() for iv in plans[0][2]] if plans else [])
    return Result("knockout", pd.DataFrame(rows), settings)


def _cells(stm, index: int, edges, centres, layer_sets: dict, heads) -> tuple[list, list]:
    """`(cells, interventions)` of one sample's knockout: per edge and centre, its row's labels and the edit."""
    sample_edges = default_edges(stm) if edges is None else edges
    if not sample_edges:
        raise ValueError(f"sample {index} has none of the default edges' token groups; pass edges= explicitly")
    cells, ivs = [], []
    for src, dst in sample_edges:
        for c in centres:
            layers = layer_sets[c]
            try:
                ivs.append(block_attention(stm, src, dst, layers, heads=heads))
            except ValueError as e:
                raise ValueError(f"knockout edge {src}->{dst} (sample {index}): {e}") from None
            cells.append((f"{src}->{dst}", src, dst, c, layers[0], layers[-1], len(layers)))
    return cells, ivs


def knockout_accuracy(result: Result, sample_mode: str = "correct") -> Result:
    """Accuracy under the knockout per (edge, layer), in percent of the samples that have the edge
    (`n_samples`; all of them where every sample holds the edge's groups), as Map the Flow's
    `information_flow_analysis.py` counts it: with `sample_mode="correct"` (its default) only samples
    the plain run answers correctly are knocked out, so a sample counts when it is correct both
    plainly and under the knockout; `"all"` counts every sample correct under the knockout. The frame
    also holds `accuracy_base`, the plain run's accuracy (percent), the Wilson 95 % interval of each
    accuracy (`ci_low`, `ci_high`, percent; none below `stats.MIN_N` samples), the exact McNemar test
    of each cell against the plain run over the same samples (`p_value`) and Holm's correction over
    the cells (`p_holm`).

        res = knockout(model, inputs, answers=[answer], window=1, centres=[1], progress=False)
        knockout_accuracy(res).df  # accuracy (%) per edge and layer
    """
    if result.kind != "knockout":
        raise ValueError(f"knockout_accuracy takes a knockout Result, got a {result.kind!r} one")
    if sample_mode not in ("correct", "all"):
        raise ValueError(f"sample_mode must be 'correct' or 'all', got {sample_mode!r}")
    df = result.df
    missing = {"correct", "correct_blocked", "sample"} - set(df.columns)
    if missing:
        raise ValueError(f"this knockout frame has no {sorted(missing)} column(s); rerun knockout to get them")
    n = df["sample"].nunique()
    hit = df["correct_blocked"] & df["correct"] if sample_mode == "correct" else df["correct_blocked"]
    # over the samples that have the edge (a sample without the edge's groups has no row for it)
    per_sample = df.assign(hit=hit).groupby(["edge", "layer", "sample"], sort=False)[["hit", "correct"]].first()
    rows = []
    for (edge, layer), part in per_sample.groupby(["edge", "layer"], sort=False):
        v, base = part["hit"].to_numpy(dtype=float), part["correct"].to_numpy(dtype=float)
        lo, hi, _ = interval(v, "binary")
        rows.append(dict(edge=edge, layer=layer, accuracy=100.0 * v.mean(), n_samples=len(v), ci_low=100.0 * lo,
                         ci_high=100.0 * hi, p_value=paired_test(v, "binary", base)[0]))
    acc = pd.DataFrame(rows, columns=["edge", "layer", "accuracy", "n_samples", "ci_low", "ci_high", "p_value"])
    acc["p_holm"] = adjust(acc["p_value"])
    acc["accuracy_base"] = 100.0 * df.groupby("sample")["correct"].first().mean()
    return Result("knockout_accuracy", acc, dict(sample_mode=sample_mode, n_samples=n, **result.settings))


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    """A study's knockout of one sample; the window is the study's `window=` (None: `default_window`
    of the model's depth, as the library's)."""
    return knockout(x.model, x.enc, [x.answer], window=x.window, tm=x.tm, progress=False, **opts).df


def _plan(x: StudySample, opts: dict) -> Cost:
    """What `_run` costs on one sample, counted without running: the plain forward, then the sweep as the
    engine plans it (`patching.engine.sweep.plan_sweep`)."""
    model, L = x.model, x.model.cfg.n_layers
    style = opts.get("window_style", "centre")
    centres = checks.layers(model, opts.get("centres"), "centres", "window centre(s)")
    layer_sets = {c: styled_window(c, x.window, L, "centre" if style == "center" else style) for c in centres}
    edges = opts.get("edges")
    edges = None if edges is None else [parse_edge(e) for e in edges]
    stm = sample_maps(model, x.inputs, x.tm)[0]
    _, ivs = _cells(stm, 0, edges, centres, layer_sets, opts.get("heads"))
    stats = plan_sweep(model, stm.seq_len, ivs, batch_size=opts.get("batch_size"),
                       max_batch_tokens=opts.get("max_batch_tokens", 16384)).stats(model.cfg)
    return Cost(stats["flops"] + stats["flops_forward"], stats["forwards"] + 1,
                max(stats["peak_bytes"], cost.run_bytes(model.cfg, 1, stm.seq_len, stm.seq_len, mask=False)))


def _check(opts: dict, window, cfg=None) -> None:
    """The style and the window's size agree; with the model's config (before its weights load), the
    window against the depth: an inverse window that leaves nothing is refused, one that covers the
    whole model warns."""
    style = opts.get("window_style", "centre")
    style = "centre" if style == "center" else style
    L = getattr(cfg, "n_layers", None)
    try:
        styled_window(0, window, 10**6, style)
        if L is not None:
            centres = opts.get("centres")
            centres = range(L) if centres is None else checks.indices(centres, L, "centres", "window centre(s)")
            for c in centres:
                styled_window(c, window, L, style)
    except ValueError as e:
        raise ValueError(f"knockout window {window} with window_style {style!r}: {e}") from None
    if L is not None:
        warn_wide_window(window, L, style, opts.get("centres"))


EXPERIMENT = Experiment(
    "knockout", knockout, by=("edge", "layer"), value="rel_change", label="relative change of p(answer) (%)",
    correct_only=True, plot=Plot("lines", x="layer", series="edge", xlabel="layer", window=True), run=_run,
    cells=("edge", "layer"), not_options=frozenset({"window"}), check=_check, plan=_plan, paired=("p_blocked", "p_orig"), unit="percent",
    report=Report("Attention knockout: relative change of p(answer) (%)", derived=("knockout_accuracy",), table="lowest"),
    columns=("edge", "src", "dst", "layer", "window", "window_start", "window_end", "n_window_layers", "p_orig",
             "p_blocked", "rel_change", "pred", "p_pred_orig", "p_pred_blocked", "rel_change_pred",
             "pred_blocked", "correct", "correct_blocked"),
)
ACCURACY = Experiment(
    "knockout_accuracy", knockout_accuracy, by=("edge", "layer"), value="accuracy", label="accuracy (%)", outcome="binary",
    paired=("correct_blocked", "correct"),
    plot=Plot("accuracy", x="layer", series="edge", xlabel="window centre layer"),
    report=Report("Accuracy under the knockout (Map the Flow's count: correct plainly and under the knockout)"),
)
