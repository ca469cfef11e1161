"""Sampling as HF's `generate` samples, for `greedy_decode(pick=...)`: HF's own temperature, top-k and top-p
warpers in that order, then `torch.multinomial` of the fp32 softmax, so the same seed gives HF's tokens.

    pick = sampler(True, temperature=0.7, top_k=20, top_p=0.9, seed=0, generator=None)
    new = model.greedy_decode(embeds, position_ids, mask, deltas, 8, None, pick=pick)
"""

from __future__ import annotations

import torch
from torch import Tensor


def sampler(do_sample: bool, temperature, top_k, top_p, seed, generator):
    """`pick(scores [batch, vocab] fp32) -> ids [batch]` sampling as HF's `generate` (its temperature, top-k
    and top-p warpers, in that order, then `torch.multinomial`), or None for greedy decoding."""
    given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                    generator=generator).items() if v is not None}
    if not do_sample:
        if given:
            raise ValueError(f"{sorted(given)} apply only to sampling: pass do_sample=True (or leave them out for "
                             "greedy decoding)")
        return None
    if temperature is not None and (isinstance(temperature, bool) or not float(temperature) > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r} (greedy decoding: do_sample=False)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    warpers = ([TemperatureLogitsWarper(float(temperature))] if temperature is not None and temperature != 1.0 else []) \
        + ([TopKLogitsWarper(top_k)] if top_k is not None else []) \
        + ([TopPLogitsWarper(float(top_p))] if top_p is not None and top_p < 1.0 else [])
    state = {"generator": generator}

    def pick(scores: Tensor) -> Tensor:
        for w in warpers:
            scores = w(None, scores)
        if seed is not None and state["generator"] is None:  # on the logits' device, made at the first step
            state["generator"] = torch.Generator(device=scores.device).manual_seed(seed)
        return torch.multinomial(scores.softmax(-1), num_samples=1, generator=state["generator"]).squeeze(1)

    return pick


def repeat_rows(n: int, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor | None, rope_deltas: Tensor | None,
                injections):
    """Every prompt row repeated n times in place (HF's `num_return_sequences` order: 0, 0, 1, 1, ...)."""
    rep = lambda t, dim=0: None if t is None else t.repeat_interleave(n, dim=dim)  # noqa: E731
    if injections is not None:
        items = injections.items() if isinstance(injections, dict) else enumerate(injections)
        injections = {k: rep(v) for k, v in items}
    return rep(embeds), rep(position_ids, 1), rep(attention_mask), rep(rope_deltas), injections
