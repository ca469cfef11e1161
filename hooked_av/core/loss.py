"""The language-model loss of a forward (`return_type="loss" | "both"`): next-token cross-entropy over the
labelled positions, as HF's `ForCausalLMLoss` computes it (logits in fp32, labels shifted left by one,
-100 ignored, the mean over labelled targets), or per token as TransformerLens's `loss_per_token`.

    loss = lm_loss(logits, labels)                       # scalar, nats per labelled token
    per_token = lm_loss(logits, labels, per_token=True)  # [batch, pos - 1], 0 where nothing is scored
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # HF's ignore_index: a label no loss reads


class Output(NamedTuple):
    """`return_type="both"`: `(logits, loss)`, as TransformerLens's `HookedTransformer.Output`."""

    logits: Tensor
    loss: Tensor


def lm_loss(logits: Tensor, labels: Tensor, per_token: bool = False, loss_fn: Callable | None = None) -> Tensor:
    """logits `[batch, pos, vocab]`, labels `[batch, pos]` (HF's: the token at each position, -100 where not
    scored; position t is predicted by position t - 1). Returns the mean cross-entropy over scored targets
    (nats), or `[batch, pos - 1]` per target position with `per_token` (0 where not scored). `loss_fn(logits,
    labels)`, when given, replaces the cross-entropy and receives both unshifted (HF's `loss_function`)."""
    if loss_fn is not None:
        return loss_fn(logits, labels)
    shifted = labels[:, 1:].to(logits.device)
    if not bool((shifted != IGNORE).any()):
        raise ValueError("no position is labelled (every label is -100): there is nothing to score")
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    if per_token:
        return F.cross_entropy(flat, shifted.reshape(-1), ignore_index=IGNORE, reduction="none").view(shifted.shape)
    return F.cross_entropy(flat, shifted.reshape(-1), ignore_index=IGNORE)
