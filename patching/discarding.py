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

from hooked_av.core.masks import additive, causal_allowed
from hooked_av.core.rope import apply_rotary, mrope_cos_sin
from patching.metrics import AnswerProb
from patching.results import Result
from patching.sweep import Sample, forward_rows, samples


def _run_blocks(model, x: Tensor, position_ids: Tensor, blocks) -> Tensor:
    """Causal forward of `blocks` on x `[b, pos, d]` with M-RoPE ids `[3, b, pos]` (no padding)."""
    c = model.cfg
    cos, sin = mrope_cos_sin(position_ids, c.d_head, c.rope_theta, c.mrope_section, x.dtype)
    b, s = x.shape[:2]
    # an explicit mask keeps the exact path (hooked scores/pattern) causal; SDPA uses its causal kernel
    mask = additive(causal_allowed(None, s, s, b, x.device), x.dtype)
    for block in blocks:
        x = block(x, mask=mask, rotary=lambda q, k: apply_rotary(q, k, cos, sin), causal=True)
    return x


def physical_forward(model, sample: Sample, group, from_layer: int) -> Tensor:
    """Last-position logits `[1, vocab]` with `group` (TokenMap spec) removed from layer `from_layer`
    on. The last position may not be in the group."""
    L = model.cfg.n_layers
    if not 0 <= from_layer <= L:
        raise ValueError(f"from_layer {from_layer} out of range; the model has {L} layers (0..{L}, {L} = discard nothing)")
    drop = sample.tm.mask(group, nonempty=True)[0].to(sample.embeds.device)
    if bool(drop[-1]):
        raise ValueError(f"{group!r} includes the last position, whose logits are the answer; discard something else")
    keep = ~drop
    x = model.hook_embed(sample.embeds)
    x = _run_blocks(model, x, sample.position_ids, model.blocks[:from_layer])
    x = _run_blocks(model, x[:, keep], sample.position_ids[:, :, keep], model.blocks[from_layer:])
    return model.unembed(model.ln_final(x[:, -1]))


def forward_flops(model, n_tokens: int, n_kept: int | None = None, from_layer: int | None = None) -> float:
    """Multiply-adds x 2 of a causal forward of `n_tokens` through the language model (projections,
    attention scores and values, MLP; the last position's unembedding), with only `n_kept` tokens
    from `from_layer` on when given. Norms and rotary are ignored (O(n d))."""
    c = model.cfg
    dq, dkv = c.n_heads * c.d_head, c.n_key_value_heads * c.d_head
    mlp = (3 if getattr(c, "gated_mlp", True) else 2) * c.d_model * c.d_mlp

    def layer(n: int) -> float:
        dense = n * (c.d_model * (dq + 2 * dkv) + dq * c.d_model + mlp)
        attn = 2 * dq * n * (n + 1) / 2  # QK^T and PV over the causal triangle
        return 2 * (dense + attn)

    L = c.n_layers
    cut = L if from_layer is None else from_layer
    kept = n_tokens if n_kept is None else n_kept
    return cut * layer(n_tokens) + (L - cut) * layer(kept) + 2 * c.d_model * c.d_vocab


def _timed(fn, repeats: int) -> tuple[Tensor, float]:
    out, times = None, []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, sorted(times)[len(times) // 2]


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
    wall time over `repeats` forwards (seconds). L = n_layers is the full forward."""
    from tqdm.auto import tqdm

    L = model.cfg.n_layers
    from_layers = list(range(L + 1)) if from_layers is None else [int(x) for x in from_layers]
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    rows = []
    for s in samples(model, inputs, tm):
        n, n_drop = s.seq_len, int(s.tm.mask(group, nonempty=True).sum())
        with torch.no_grad():
            full, t_full = _timed(lambda: forward_rows(model, s, 1), repeats)
            p_full = float(metric(full, s.index)[0])
            for layer in tqdm(from_layers, desc=f"discarding sample {s.index}", disable=not progress, leave=False):
                logits, t = _timed(lambda: physical_forward(model, s, group, layer), repeats)
                f_full, f = forward_flops(model, n), forward_flops(model, n, n - n_drop, layer)
                rows.append(dict(sample=s.index, from_layer=layer, group=str(group), n_tokens=n, n_discarded=n_drop,
                                 metric=float(metric(logits, s.index)[0]), metric_full=p_full,
                                 correct=bool(metric.correct(logits, s.index)[0]), flops=f, flops_full=f_full,
                                 flops_saved=1 - f / f_full, seconds=t, seconds_full=t_full, time_saved=1 - t / t_full))
    return Result("discarding", pd.DataFrame(rows), dict(group=str(group), from_layers=from_layers, repeats=repeats,
                                                          metric=metric.settings()))
