"""What the views read from a model: token labels, and the attention of one chosen query over every key
(`QueryAttention`), read through `model.attention_rows` so memory grows with keys, never keys squared."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def token_labels(model, inputs: dict, tm=None, row: int = 0) -> list[str]:
    """`tm.labels(row)` with the text decoded by `model.tokenizer` where the model has one (else `#position`)."""
    tm = model.token_map(inputs) if tm is None else tm
    tok = getattr(model, "tokenizer", None)
    if tok is None or "input_ids" not in inputs:
        return tm.labels(row)
    return tm.labels(row, ids=inputs["input_ids"], tokenizer=tok)


def positions_of(tm, spec, row: int) -> Tensor:
    """Ascending positions of `row` that `spec` names: a TokenMap spec or Selection (padding never), or
    int positions (checked against the row's length and padding)."""
    if isinstance(spec, (int, list, tuple, range, Tensor)) and not (isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], str)):
        pos = torch.as_tensor([spec] if isinstance(spec, int) else list(spec), dtype=torch.long).flatten()
        if not len(pos) or int(pos.min()) < 0 or int(pos.max()) >= tm.seq_len:
            raise ValueError(f"positions {pos.tolist()}: name at least one position in 0..{tm.seq_len - 1}")
        if bool(tm.padding[row, pos].any()):
            raise ValueError(f"positions {pos[tm.padding[row, pos]].tolist()} of row {row} are padding; name prompt positions")
        return pos.unique()
    return tm.positions(spec, row=row)


@dataclass
class QueryAttention:
    """The attention of one query of row `row` over every key, per layer and head.

    weights: float32 `[layers, heads, keys]` on the CPU (keys = the row's positions; a row sums to 1);
    layers / heads: the model's indices of the first two axes; query: the query's label (a spec that
    names several positions is averaged over them: `n_queries`); tm: the TokenMap of the inputs."""

    weights: Tensor
    layers: list[int]
    heads: list[int]
    query: str
    tm: object
    row: int = 0
    n_queries: int = 1

    def __post_init__(self):
        L, H, K = self.weights.shape
        if (L, H, K) != (len(self.layers), len(self.heads), self.tm.seq_len):
            raise ValueError(f"weights {tuple(self.weights.shape)} do not match {len(self.layers)} layers, "
                             f"{len(self.heads)} heads and the map's {self.tm.seq_len} positions")

    def mean_heads(self, heads=None) -> Tensor:
        """`[layers, keys]`: the mean over `heads` (model indices; default every head read)."""
        if heads is None:
            return self.weights.mean(1)
        idx = [self.heads.index(h) for h in _check_subset(heads, self.heads, "heads")]
        return self.weights[:, idx].mean(1)

    def head_label(self, heads=None) -> str:
        chosen = self.heads if heads is None else list(heads)
        return f"mean of {len(chosen)} heads" if len(chosen) > 1 else f"head {chosen[0]}"


def _check_subset(wanted, have, what: str) -> list[int]:
    wanted = [int(x) for x in wanted]
    missing = [x for x in wanted if x not in have]
    if not wanted or missing:
        raise ValueError(f"{what} {missing or '[]'}: choose among the {what} read, {have}")
    return wanted


def query_attention(model, inputs: dict, query="last", layers=None, heads=None, row: int = 0, tm=None) -> QueryAttention:
    """Read the attention of `query` (a TokenMap spec, a Selection or positions of `row`; several positions
    are averaged) over every key, in `layers` (default all) and `heads` (default all), under the active
    hooks, through `model.attention_rows` (no `[keys, keys]` matrix is made)."""
    tm = model.token_map(inputs) if tm is None else tm
    pos = positions_of(tm, query, row)
    rows = model.attention_rows(inputs, queries=pos, layers=layers, heads=heads, tm=tm)  # [L, b, H, r, K]
    n = model.cfg.n_layers if layers is None else None
    label = query if isinstance(query, str) else getattr(query, "label", f"positions {pos.tolist()}")
    return QueryAttention(
        rows[:, row].float().mean(2).cpu(), list(range(n)) if n else [int(l) for l in layers],
        list(range(model.cfg.n_heads)) if heads is None else [int(h) for h in heads], str(label), tm, row, len(pos),
    )
