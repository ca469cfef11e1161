"""`Intervention`: a list of `(hook_name, fn)` pairs that is also data.

It iterates as the pairs, so `model.run_with_hooks(..., fwd_hooks=iv)` and `model.hooks(fwd_hooks=iv)`
take it as is; `a + b` composes; `print(iv)` and `iv.to_dict()` say what it does (saved with results);
`iv.on_rows([3])` re-targets every part at batch row 3, which is how sweeps put one intervention per
row of a single forward.

Row rule used by every part: a per-position tensor it holds (a TokenMap mask, a cache entry) has batch 1
(broadcast to the rows it acts on) or the batch of the run (row r of it acts on row r of the run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hooked_av.utils import layer_list as checked_layers
from patching.engine import checks

HookFn = Callable[[Tensor, object], "Tensor | None"]


@dataclass(frozen=True)
class Part:
    """One primitive edit: `op` and JSON-able `params` describe it; `make(rows)` builds its
    `(hook_name, fn)` pairs acting on batch rows `rows` (None: every row); `layers` and `heads` are the
    blocks and query heads it touches (checked against the model before a run)."""

    op: str
    params: dict
    make: Callable[[Sequence[int] | None], list[tuple[str, HookFn]]] = field(repr=False, compare=False)
    layers: tuple[int, ...] = ()
    rows: tuple[int, ...] | None = None
    heads: tuple[int, ...] = ()
    seq_len: int | None = None  # the positions of the TokenMap it was built on, where it was built on one
    check: Callable[[object], None] | None = field(default=None, repr=False, compare=False)  # check(model): raises

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        rows = "" if self.rows is None else f" rows={list(self.rows)}"
        return f"{self.op}({args}){rows}"


class Intervention:
    """An ordered sum of `Part`s. Iterating yields `(hook_name, fn)` pairs.

        iv = block_attention(tm, "audio", "last", [1, 2]) + scale_attention(tm, "last", "video", 2.0, [3])
        print(iv)  # Intervention(block_attention(src=audio, dst=last, layers=[1, 2]) + scale_attention(...))
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """

    def __init__(self, parts: Sequence[Part] = ()):
        self.parts: tuple[Part, ...] = tuple(parts)
        self._pairs: list[tuple[str, HookFn]] | None = None

    # ---- as hooks ---------------------------------------------------------------------------
    def pairs(self) -> list[tuple[str, HookFn]]:
        if self._pairs is None:
            self._pairs = [pair for p in self.parts for pair in p.make(p.rows)]
        return self._pairs

    def __iter__(self) -> Iterator[tuple[str, HookFn]]:
        return iter(self.pairs())

    def __len__(self) -> int:
        return len(self.pairs())

    @property
    def hook_names(self) -> list[str]:
        return [name for name, _ in self.pairs()]

    # ---- as data ----------------------------------------------------------------------------
    def __add__(self, other: "Intervention") -> "Intervention":
        if not isinstance(other, Intervention):
            return NotImplemented
        return Intervention(self.parts + other.parts)

    def __radd__(self, other):
        if other == 0 or other is None:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def on_rows(self, rows: Sequence[int] | int) -> "Intervention":
        """The same edits acting only on batch rows `rows` of a run."""
        rows = (rows,) if isinstance(rows, int) else tuple(int(r) for r in rows)
        return Intervention([dataclasses.replace(p, rows=rows) for p in self.parts])

    def to_dict(self) -> list[dict]:
        return [{"op": p.op, **p.params, **({} if p.rows is None else {"rows": list(p.rows)})} for p in self.parts]

    def __repr__(self) -> str:
        if not self.parts:
            return "Intervention(nothing)"
        return "Intervention(" + " + ".join(p.describe() for p in self.parts) + ")"

    __str__ = __repr__

    # ---- validation -------------------------------------------------------------------------
    def check(self, model, batch: int | None = None, seq_len: int | None = None) -> "Intervention":
        """Raise a clear error for a layer or head the model does not have, a hook name it does not
        know, a row outside a run of `batch` rows, a part built on a TokenMap of other than `seq_len`
        positions (the prompt it will run on), or what a part's own `check` refuses (a feature the SAE
        spliced there lacks)."""
        for p in self.parts:
            if seq_len is not None and p.seq_len is not None and p.seq_len != seq_len:
                raise ValueError(f"{p.describe()}: built on a TokenMap of {p.seq_len} positions, but the prompt it runs "
                                 f"on has {seq_len}; build it from that prompt's map (a sweep's sample.tm)")
            checked_layers(p.layers, model.cfg.n_layers, f"{p.describe()}: layer(s)") if p.layers else None
            checks.heads(model, p.heads, f"{p.describe()}: head(s)")
            if p.check is not None:
                p.check(model)
            if batch is not None and p.rows is not None:
                bad_rows = [r for r in p.rows if not 0 <= r < batch]
                if bad_rows:
                    raise ValueError(f"{p.describe()}: row(s) {bad_rows} out of range for a batch of {batch}")
        for name in self.hook_names:
            model.check_hook_name(name)
        return self


NOTHING = Intervention()


def layer_list(layers, what: str) -> tuple[int, ...]:
    """An int, a range or a list of layers -> tuple, checked by `hooked_av.utils.layer_list` (the depth is
    checked against the model by `Intervention.check`)."""
    return tuple(checked_layers(layers, None, f"{what}: layer(s)"))


def batch_rows(held: Tensor, batch: int, rows: Sequence[int] | None, what: str) -> Tensor:
    """Align a per-row tensor `held` `[b_held, ...]` to a run of `batch` rows, zeroing (False / 0)
    every row outside `rows`. Returns `[batch, ...]`."""
    b = held.shape[0]
    if b == 1:
        out = held.expand(batch, *held.shape[1:])
    elif b == batch:
        out = held
    else:
        raise ValueError(
            f"{what} holds {b} rows but the run has {batch}; build it from a batch-1 TokenMap/cache "
            "(broadcast) or from one with the run's batch"
        )
    if rows is None:
        return out
    bad = [r for r in rows if not 0 <= r < batch]
    if bad:
        raise ValueError(f"{what}: row(s) {bad} out of range for a batch of {batch}")
    keep = torch.zeros(batch, dtype=torch.bool, device=held.device)
    keep[list(rows)] = True
    return out * keep.view(-1, *([1] * (held.dim() - 1))).to(out.dtype)
