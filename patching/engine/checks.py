"""Argument checks shared by the experiments, interventions and metrics. Each returns the checked value
or raises a ValueError naming the value, the valid range and what to do. Callers run them before any
forward: a zero count, an empty list or a NaN would otherwise return an empty or silently wrong result."""

from __future__ import annotations

import operator

import torch

from hooked_av.utils import layer_list


def count(value, what: str, minimum: int = 1, unit: str = "") -> int:
    """An integer count (repeats, noise draws, a window of layers) that must be >= `minimum`."""
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{what} must be >= {minimum}{unit}, got {n}")
    return n


def finite(value, what: str, minimum: float | None = None):
    """A number or tensor of numbers that must be finite (and >= `minimum` when given): NaN and inf
    pass through softmaxes and argmaxes as a knockout or token 0 instead of an error."""
    bound = "" if minimum is None else f" >= {minimum:g}"
    try:
        t = torch.as_tensor(value).detach().double()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} must be a finite number{bound}, got {value!r}") from None
    bad = ~torch.isfinite(t) if minimum is None else ~torch.isfinite(t) | (t < minimum)
    if bool(bad.any()):
        got = value if t.dim() == 0 else f"{t[bad].tolist()} in {tuple(t.shape)}"
        raise ValueError(f"{what} must be a finite number{bound}, got {got}")
    return value


def nonempty(items, what: str, none_ok: bool = False) -> list:
    """A list (or one name or number, made a list) that must hold at least one item; `none_ok`: the
    caller takes None for its default."""
    out = [items] if isinstance(items, (str, int)) else list(items)
    if not out:
        default = " (or None for the default)" if none_ok else ""
        raise ValueError(f"{what} is empty, so nothing would be run or measured; give at least one{default}")
    return out


def indices(values, n: int, what: str, unit: str, valid: str | None = None) -> list[int]:
    """Integers in [0, n): token ids (n = d_vocab), heads, dimensions, layers. Negative values are
    refused rather than counted from the end."""
    out = []
    for v in values:
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what} must be integers, got {v!r}") from None
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range; {valid or f'the model has {n} {unit} (0..{n - 1})'}")
    return out


def layers(model, values, name: str = "layers", each: str = "layer(s)") -> list[int]:
    """Layers of the language model: None = all, else a non-empty list in [0, n_layers)
    (`hooked_av.utils.layer_list`, the one layer check)."""
    return layer_list(values, model.cfg.n_layers, each if values is None or len(list(values)) else name)


def heads(model, values, what: str = "head(s)") -> list[int]:
    """Query heads in [0, n_heads)."""
    return indices(values, model.cfg.n_heads, what, "heads")


def token_ids(model, values, what: str = "token id(s)") -> list[int]:
    """Token ids in [0, d_vocab)."""
    return indices(values, model.cfg.d_vocab, what, "token ids")


def batch_of(inputs: dict) -> int:
    """The number of prompts in model inputs, read without running anything."""
    for key in ("inputs_embeds", "input_ids"):
        if key in inputs:
            return int(inputs[key].shape[0])
    raise ValueError(f"model inputs need input_ids or inputs_embeds, got keys {sorted(inputs)}")
