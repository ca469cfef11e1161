"""Token discarding from layer L on, done physically: blocks 0..L-1 run on the full sequence, then the
group's positions are cut out of the hidden states and blocks L.. run on the shorter sequence with the
remaining tokens' own position ids (so their rotary angles are unchanged). Equivalent, for the kept
tokens, to mask-based discarding (`hooks.discard`); unlike it, it saves compute, which this module
counts (FLOPs, analytic) and measures (wall time).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.engine import checks, cost
from patching.engine.experiment import Cost, Experiment, Plot, Report, StudySample
from patching.engine.metrics import AnswerProb
from patching.engine.results import Result
from patching.engine.sweep import Sample, sample_maps, samples


def _dropped(tm, group) -> Tensor:
    """bool `[batch, pos]`: the group's positions in every row (never the last position)."""
    drop = tm.mask(group, nonempty=True)
    if bool(drop[:, -1].any()):
        raise ValueError(f"{group!r} includes the last position, whose logits are the answer; discard something else")
    return drop


def physical_forward(model, sample: Sample, group, from_layer: int) -> Tensor:
    """Last-position logits `[1, vocab]` with `group` (TokenMap spec) removed from layer `from_layer`
    on, through the model's own layer loop (`run_language_model(discard=...)`, injections included).
    The last position may not be in the group.

        sample = samples(model, inputs)[0]
        logits = physical_forward(model, sample, "audio", from_layer=2)  # [1, vocab]
        logits.softmax(-1)[0, answer]
    """
    L = model.cfg.n_layers
    if not 0 <= from_layer <= L:
        raise ValueError(f"from_layer {from_layer} out of range; the model has {L} layers (0..{L}, {L} = discard nothing)")
    drop = _dropped(sample.tm, group)[0].to(sample.embeds.device)
    with torch.no_grad():  # a measurement: no graph
        return model.run_language_model(**sample.lm_inputs(1), discard=(drop, from_layer), logits_at="last")[:, -1]


def forward_flops(model, n_tokens: int, n_kept: int | None = None, from_layer: int | None = None) -> float:
    """Multiply-adds x 2 of a causal forward of `n_tokens` through the language model (projections,
    attention scores and values, MLP, a sparse layer's router and top-k experts; the last position's
    unembedding), with only `n_kept` tokens from `from_layer` on when given (`patching.engine.cost`).
    Norms and rotary are ignored (O(n d))."""
    c = model.cfg
    cut = c.n_layers if from_layer is None else from_layer
    kept = n_tokens if n_kept is None else n_kept
    causal = [cost.keys_read(n, 0) for n in (n_tokens, kept)]
    return (sum(cost.block_flops(c, l, n_tokens, causal[0]) for l in range(cut))
            + sum(cost.block_flops(c, l, kept, causal[1]) for l in range(cut, c.n_layers)) + cost.unembed_flops(c, 1))


def median_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Outputs and median wall times (s) of the `fns`: one untimed warm-up call each, then `repeats`
    rounds calling each once in turn, so a drift in clock or cache affects every one alike."""

    def timed(fn):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    outs = {k: fn() for k, fn in fns.items()}
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn)[1])
    return outs, {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def discarding(
    model,
    inputs: dict,
    answers,
    group="audio|video",
    from_layers: Sequence[int] | None = None,
    tm=None,
    repeats: int = 3,
    progress: bool = True,
) -> Result:
    """For every sample and every L in `from_layers` (default 0..n_layers): the answer's probability
    and correctness with `group` physically discarded from L on, FLOPs (full vs discarded) and median
    wall time over `repeats` forwards (seconds). The full forward is `physical_forward` from
    L = n_layers (nothing discarded): the same code, warmed up and timed in turn with the others, so
    its row has `time_saved` 0.

        res = discarding(model, inputs, [answer], group="audio", from_layers=[1, 3], repeats=1, progress=False)
        res.df[["from_layer", "metric", "correct", "flops_saved"]]
    """
    L = model.cfg.n_layers
    from_layers = list(range(L + 1)) if from_layers is None else checks.indices(
        checks.nonempty(from_layers, "from_layers", none_ok=True), L + 1, "from_layer(s)", "layers", valid=f"valid: 0..{L} ({L} = discard nothing)")
    checks.count(repeats, "repeats")
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    metric.check(model, checks.batch_of(inputs), inputs)
    tm = model.token_map(inputs) if tm is None else tm
    n_drop = _dropped(tm, group).sum(-1).tolist()  # every sample, before any forward
    data = samples(model, inputs, tm)
    layers = [L] + [x for x in dict.fromkeys(from_layers) if x != L]  # the full forward first
    rows = []
    for s, dropped in zip(tqdm(data, desc="discarding", disable=not progress, leave=False), n_drop):
        n = s.seq_len
        with torch.no_grad():
            fns = {x: (lambda x=x: physical_forward(model, s, group, x)) for x in layers}
            logits, seconds = median_times(fns, repeats)
        p_full, f_full = float(metric(logits[L], s.index)[0]), forward_flops(model, n)
        correct_full = bool(metric.correct(logits[L], s.index)[0])
        for layer in from_layers:
            f = forward_flops(model, n, n - dropped, layer)
            rows.append(dict(sample=s.index, from_layer=layer, group=str(group), n_tokens=n, n_discarded=dropped,
                             metric=float(metric(logits[layer], s.index)[0]), metric_full=p_full,
                             correct=bool(metric.correct(logits[layer], s.index)[0]), correct_full=correct_full,
                             flops=f, flops_full=f_full,
                             flops_saved=1 - f / f_full, seconds=seconds[layer], seconds_full=seconds[L],
                             time_saved=1 - seconds[layer] / seconds[L]))
    return Result("discarding", pd.DataFrame(rows), dict(group=str(group), from_layers=from_layers, repeats=repeats,
                                                          metric=metric.settings()))


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    """A study's discarding of one sample; `group` defaults to the sample's media."""
    opts.setdefault("group", _media(x.tm))
    return discarding(x.model, x.enc, [x.answer], tm=x.tm, progress=False, **opts).df


def _media(tm) -> str:
    return "|".join(g for g in ("audio", "video", "image") if bool(tm.select(g).mask.any()))


def _plan(x: StudySample, opts: dict) -> Cost:
    """What `_run` costs on one sample: each from-layer's physical forward (the full one included), once to
    warm up and `repeats` times timed."""
    model, L = x.model, x.model.cfg.n_layers
    tm = sample_maps(model, x.inputs, x.tm)[0]
    n, dropped = tm.seq_len, int(_dropped(tm, opts.get("group", _media(tm))).sum())
    from_layers = opts.get("from_layers")
    layers = [L] + [v for v in dict.fromkeys(range(L + 1) if from_layers is None else from_layers) if v != L]
    flops = (opts.get("repeats", 3) + 1) * sum(forward_flops(model, n, n - dropped, v) for v in layers)
    return Cost(flops, flops / forward_flops(model, n), cost.run_bytes(model.cfg, 1, n, n, mask=False))


EXPERIMENT = Experiment(
    "discarding", discarding, by=("from_layer",), value="metric", label="p(answer)",
    plot=Plot("lines", x="from_layer", series="group", xlabel="discarded from layer (n_layers = nothing)"),
    run=_run, plan=_plan, cells=("group", "from_layer"), study_value="correct",  # a study reports the accuracy with the group discarded
    outcome="binary", paired=("correct", "correct_full"), unit="probability",
    report=Report("Discarding the media from layer L on: accuracy and FLOPs saved", samples=False,
                  twin=("flops_saved", "FLOPs saved (fraction, dashed)"), ylabel="accuracy (all samples)", ylim=(-0.05, 1.05)),
    columns=("from_layer", "group", "n_tokens", "n_discarded", "metric", "metric_full", "correct", "correct_full", "flops",
             "flops_full", "flops_saved", "seconds", "seconds_full", "time_saved"),
)
