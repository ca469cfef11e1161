"""The effective pathway (Kim et al., "Map the Flow", `byminji/map-the-flow`,
`analysis/effective_pathway_analysis.py`): keep each attention edge only inside its layer range and
block it in every other layer, all in one forward; report the share of attention edges kept and the
accuracy, against blocking the same number of edges at random.

Counting follows the anchor: per layer, the edges are the causal triangle over the whole prompt
(`n (n + 1) / 2` query-key pairs, the diagonal included); a blocked edge is a (query, key) pair of that
triangle the pathway masks. `kept_share = kept / (n_layers * n (n + 1) / 2)`; the anchor's 7B pathway
masks 58 % (`masked_share` 0.58). Its random baseline blocks, in every layer, `int(n (n + 1) / 2 *
ratio)` pairs drawn without replacement from the causal pairs whose query and key both lie at or
after the first video token (fresh draws per layer); `ratio` is the pathway's masked share.

The anchor's pathway for LLaVA-NeXT-7B-Video (32 layers) as `keep` triples: cross-frame edges (frame
i's queries to earlier frames' keys) in layers 5..14, video -> question 5..19, question -> last
15..24, last -> last and video -> last nowhere, video -> video 0..19, question -> question 0..24.

    res = pathway(model, inputs, answers, keep=[("video", "question", range(5, 20)),
                                                 ("question", "last", range(15, 25)),
                                                 ("video", "last", [])])
    res.df.groupby("run")[["kept_share", "correct"]].mean()
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

from hooked_av.utils import neg_inf
from patching.engine import checks
from patching.engine.experiment import Experiment, Plot, Report, StudySample
from patching.engine.intervention import Intervention, Part, batch_rows
from patching.engine.metrics import AnswerProb, relative_change
from patching.engine.results import Result
from patching.engine.sweep import forward_rows, samples
from patching.methods.knockout import parse_edge


def _keep_triples(model, keep) -> list[tuple[object, object, list[int]]]:
    """`[(src, dst, layers kept)]` checked: layers inside the model (an empty list: blocked everywhere)."""
    out = []
    for entry in checks.nonempty(keep, "keep"):
        try:
            edge, layers = (entry[0], entry[1]), entry[2]
        except (TypeError, IndexError, KeyError):
            raise ValueError(f"keep holds (src, dst, layers kept) triples, got {entry!r}") from None
        src, dst = parse_edge(edge)
        layers = [] if layers is None else checks.indices(list(layers), model.cfg.n_layers, f"kept layer(s) of {src}->{dst}", "layers")
        out.append((src, dst, layers))
    return out


def blocked_pairs(tm, keep, n_layers: int) -> dict[int, Tensor]:
    """Per layer, bool `[pos, pos]` (query, key): the causal pairs the pathway blocks (every edge of
    `keep` outside its kept layers). `tm` is batch 1. Layers blocking the same edge set share a tensor."""
    tri = torch.ones(tm.seq_len, tm.seq_len, dtype=torch.bool).tril()
    edges = []
    for src, dst, layers in keep:
        s, d = tm.mask(src, nonempty=True)[0], tm.mask(dst, nonempty=True)[0]
        edges.append((d[:, None] & s[None, :] & tri, set(layers)))
    by_set: dict[tuple[int, ...], Tensor] = {}
    out = {}
    for layer in range(n_layers):
        active = tuple(i for i, (_, kept) in enumerate(edges) if layer not in kept)
        if active not in by_set:
            m = torch.zeros_like(tri)
            for i in active:
                m |= edges[i][0]
            by_set[active] = m
        out[layer] = by_set[active]
    return out


def random_pairs(tm, n_block: int, n_layers: int, start: int, seed: int) -> dict[int, Tensor]:
    """Per layer, bool `[pos, pos]`: `n_block` causal (query, key) pairs with query and key >= `start`,
    drawn without replacement, fresh in every layer, from a generator seeded with `seed`."""
    n = tm.seq_len
    q, k = torch.tril_indices(n, n)
    ok = (q >= start) & (k >= start)
    q, k = q[ok], k[ok]
    if n_block > len(q):
        raise ValueError(f"{n_block} random pairs asked for, but only {len(q)} causal pairs lie at or after position {start}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(n_layers):
        pick = torch.randperm(len(q), generator=g)[:n_block]
        m = torch.zeros(n, n, dtype=torch.bool)
        m[q[pick], k[pick]] = True
        out[layer] = m
    return out


def block_pairs(blocked: dict[int, Tensor], op: str = "block_pairs", params: dict | None = None,
                rows: Sequence[int] | None = None) -> Intervention:
    """Block the (query, key) pairs `blocked[layer]` (bool `[pos, pos]`) on `blocks.{l}.attn.hook_attn_mask`
    (the additive mask's large negative, before the softmax)."""
    layers = tuple(sorted(blocked))

    def make(rows):
        def fn(mask: Tensor, hook) -> Tensor:
            b, _, q, k = mask.shape
            m = blocked[hook.layer()]
            if m.shape != (k, k):
                raise ValueError(f"{op}: the pairs cover {m.shape[0]} positions, the attention sees {k} keys")
            on = batch_rows(torch.ones(1, 1, dtype=torch.bool, device=mask.device), b, rows, op)  # [b, 1]
            edge = m.to(mask.device)[k - q:][None, None] & on[:, :, None, None]
            return mask.masked_fill_(edge, neg_inf(mask.dtype))

        return [(f"blocks.{l}.attn.hook_attn_mask", fn) for l in layers]

    iv = Intervention([Part(op, params or {}, make, layers)])
    return iv if rows is None else iv.on_rows(rows)


def pathway(
    model,
    inputs: dict,
    answers,
    keep: Sequence,
    random_baseline: bool = True,
    random_ratio: float | None = None,
    random_from="video",
    seed: int = 0,
    tm=None,
) -> Result:
    """`keep`: `(src, dst, layers)` triples (TokenMap specs or Selections; `layers` where the edge stays
    open, empty for nowhere); each edge is blocked in every other layer, all edges in one forward.
    `random_baseline`: also block random pairs of the same number (`random_ratio`, default the
    pathway's masked share of the sample) after the first position of `random_from` (the anchor's
    first video token), seeded with `seed`.

    One row per (sample, run) with run "pathway" or "random": `edges_total` (causal pairs over all
    layers), `edges_kept`, `kept_share`, `masked_share`, `p_orig`, `p` (answer probability),
    `rel_change` (percent), `pred` (top token), `correct_orig`, `correct` (the answer is the top
    token, the anchor's accuracy).

        keep = [("audio", "question", [0, 1]), ("audio", "last", [1, 2]), ("question", "last", [2, 3])]
        res = pathway(model, inputs, [answer], keep=keep)
        res.df[["run", "kept_share", "p", "correct"]]
    """
    L = model.cfg.n_layers
    triples = _keep_triples(model, keep)
    if random_ratio is not None:
        checks.finite(random_ratio, "random_ratio", minimum=0)
        if random_ratio > 1:
            raise ValueError(f"random_ratio is a share of the edges, in [0, 1]; got {random_ratio}")
    checks.count(seed, "seed", minimum=0)
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    metric.check(model, checks.batch_of(inputs), inputs)
    data = samples(model, inputs, tm)
    plans = []
    for s in data:  # every mask built (and so every group checked) before the first forward
        try:
            blocked = blocked_pairs(s.tm, triples, L)
        except ValueError as e:
            raise ValueError(f"pathway (sample {s.index}): {e}") from None
        tri = s.seq_len * (s.seq_len + 1) // 2
        n_masked = sum(int(blocked[layer].sum()) for layer in range(L))
        runs = [("pathway", blocked, n_masked)]
        if random_baseline:
            start = int(s.tm.positions(random_from, nonempty=True)[0])
            if start == 0:
                raise ValueError(f"random blocking from position 0 could mask every key of a query; {random_from!r} must not start the prompt")
            ratio = n_masked / (L * tri) if random_ratio is None else random_ratio
            n_block = int(tri * ratio)
            rand = random_pairs(s.tm, n_block, L, start, seed)
            runs.append(("random", rand, n_block * L))
        plans.append((s, tri, runs))

    rows = []
    for s, tri, runs in plans:
        with torch.no_grad():
            base = forward_rows(model, s, 1)
            p_orig = float(metric(base, s.index)[0])
            correct_orig = bool(metric.correct(base, s.index)[0])
            for run, blocked, n_masked in runs:
                with model.hooks(fwd_hooks=list(block_pairs(blocked, f"pathway_{run}").check(model, 1))):
                    lg = forward_rows(model, s, 1)
                p = metric(lg, s.index)
                total = L * tri
                rows.append(dict(sample=s.index, run=run, edges_total=total, edges_kept=total - n_masked,
                                 kept_share=(total - n_masked) / total, masked_share=n_masked / total, p_orig=p_orig,
                                 p=float(p[0]), rel_change=float(relative_change(p, p_orig)[0]), pred=int(lg[0].argmax()),
                                 correct_orig=correct_orig, correct=bool(metric.correct(lg, s.index)[0])))
    settings = dict(keep=[[str(a), str(b), list(c)] for a, b, c in triples], random_baseline=random_baseline,
                    random_ratio=random_ratio, random_from=str(random_from), seed=seed, n_layers=L, metric=metric.settings())
    return Result("pathway", pd.DataFrame(rows), settings)


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    return pathway(x.model, x.enc, [x.answer], tm=x.tm, **opts).df


EXPERIMENT = Experiment(
    "pathway", pathway, by=("run",), value="correct", label="accuracy", outcome="binary",
    plot=Plot("bars", series="run"), run=_run, cells=("run",), required=("keep",), paired=("correct", "correct_orig"),
    example={"keep": '[["video", "question", [1, 2]]]'},
    report=Report("Effective pathway: accuracy with the pathway and with random blocking of as many edges"),
    columns=("run", "edges_total", "edges_kept", "kept_share", "masked_share", "p_orig", "p", "rel_change",
             "pred", "correct_orig", "correct"),
)
