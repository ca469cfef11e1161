"""Layers as users give them, checked in one place: every read-out, intervention and experiment that
takes layers calls `layer_list`, so the same mistake gets the same message everywhere.

    layer_list(None, 28)          # [0, 1, ..., 27]
    layer_list(range(4, 13), 28)  # [4, ..., 12]
    layer_list([30], 28)          # ValueError: layer(s) [30] out of range; the model has 28 layers (0..27) ...
"""

from __future__ import annotations

import operator


def layer_list(values, n: int | None = None, what: str = "layer(s)") -> list[int]:
    """`values` (None = every one of the model's `n` layers; an int, a range or a sequence of ints) as a
    list. Refused: None without `n`, non-integers (bools too), an empty list, negative layers (layers
    count from 0: -1 is not the last one) and, when the depth `n` is known, layers >= n."""
    if values is None:
        if n is None:
            raise ValueError(f"{what}: None means every layer, which needs the model's depth; name the layers")
        return list(range(n))
    items = [values] if isinstance(values, int) else list(values)
    out = []
    for v in items:
        if isinstance(v, bool):
            raise ValueError(f"{what} must be integers, got {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what} must be integers, got {v!r}") from None
    depth = "" if n is None else f" {n} layers (0..{n - 1})"
    if not out:
        raise ValueError(f"{what} is empty, so nothing would be run; name at least one of the model's{depth or ' layers'}")
    negative = [v for v in out if v < 0]
    if negative:
        raise ValueError(f"{what}: negative layer(s) {negative}; layers count from 0"
                         + (f": name at least one of the model's{depth}" if n is not None else ""))
    bad = [v for v in out if n is not None and v >= n]
    if bad:
        raise ValueError(f"{what} {bad} out of range; the model has{depth}: name at least one of the model's layers in that range")
    return out
