"""The language-model loss of a forward (`return_type="loss" | "both"`): next-token cross-entropy over the
labelled positions, as HF's `ForCausalLMLoss` computes it (logits in fp32, labels shifted left by one,
-100 ignored, the mean over labelled targets), or per token as TransformerLens's `loss_per_token`.

    loss = lm_loss(logits, labels)                       # scalar, nats per labelled token
    per_token = lm_loss(logits, labels, per_token=True)  # [batch, pos - 1], 0 where nothing is scored
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # HF's ignore_index: a label no loss reads
RETURN_TYPES = ("logits", "loss", "both", "resid", None)  # what a family's forward returns


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


def check_loss_options(return_type, labels, tokens, loss_per_token, loss_fn, logits_at) -> bool:
    """Whether the forward computes a loss; what applies only to a loss is refused without one."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}")
    loss = return_type in ("loss", "both")
    if not loss:
        given = [k for k, v in dict(labels=labels, tokens=tokens, loss_fn=loss_fn).items() if v is not None]
        given += ["loss_per_token"] * bool(loss_per_token)
        if given:
            raise ValueError(f"{given} apply only to a loss: pass return_type='loss' or 'both'")
        return False
    if logits_at is not None:
        raise ValueError("a loss reads every position's logits; logits_at does not apply with return_type "
                         f"{return_type!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(logits, labels), got {type(loss_fn).__name__}")
    if loss_fn is not None and loss_per_token:
        raise ValueError("loss_per_token does not apply with loss_fn: your loss_fn decides what it returns")
    return True


def check_labels(labels, like: Tensor) -> Tensor:
    """HF's labels `[batch, pos]` (ids, -100 where not scored) for a batch shaped like `like`."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or tuple(labels.shape) != tuple(like.shape[:2]):
        raise ValueError(f"labels must be integer ids [batch, pos] = {list(like.shape[:2])} (-100 where not scored), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    return labels.long()
