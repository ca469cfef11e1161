"""The sweep engine: encode once, then run many interventions as rows of few forwards.

`samples(model, inputs)` runs the towers once and splits the batch into one `Sample` per prompt with its
left padding trimmed (padding is masked anyway, so trimming changes nothing but the cost).
`run_rows(model, sample, interventions)` repeats the sample's embeddings along the batch, puts
intervention i on row i (`iv.on_rows(i)`), and runs chunks that fit `max_batch_tokens`, returning the
last position's logits (or what `reduce` makes of them) per intervention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching import checks
from patching.intervention import Intervention


@dataclass
class Sample:
    """One prompt ready for sweeps: what the family's `encode` gives the language model, trimmed to the
    real positions: `embeds` `[1, pos, d_model]`, `position_ids` `[3, 1, pos]`, `injections` (per layer
    `[1, pos, d_model]` or None; DeepStack's features), `tm` a batch-1 TokenMap of the same positions,
    `index` its row in the caller's batch."""

    embeds: Tensor
    position_ids: Tensor
    tm: object
    index: int
    injections: list | None = None

    @property
    def seq_len(self) -> int:
        return self.embeds.shape[1]

    def lm_inputs(self, n: int = 1) -> dict:
        """`run_language_model` keyword arguments for `n` copies of the sample along the batch."""
        inj = None if self.injections is None else [None if t is None else t.expand(n, -1, -1) for t in self.injections]
        return dict(inputs_embeds=self.embeds.expand(n, -1, -1).contiguous(),
                    position_ids=self.position_ids.expand(-1, n, -1), injections=inj)


def encode(model, inputs: dict) -> dict:
    """`model.encode(**inputs)` unless `inputs` already holds `inputs_embeds` (then returned as is)."""
    if "inputs_embeds" in inputs:
        return inputs
    with torch.no_grad():
        return model.encode(**inputs)


def slice_token_map(tm, row: int, keep: Tensor | None = None):
    """Row `row` of a TokenMap (positions `keep` only) as a batch-1 TokenMap."""
    changes = {}
    for f in dataclasses.fields(tm):
        v = getattr(tm, f.name)
        if isinstance(v, Tensor) and v.dim() == 2 and v.shape[0] == tm.batch:
            v = v[row : row + 1]
            changes[f.name] = v if keep is None else v[:, keep.cpu()]
    return dataclasses.replace(tm, **changes)


def samples(model, inputs: dict, tm=None) -> list[Sample]:
    """Encode once (towers run here, never again in the sweep) and split into trimmed samples.
    `tm` defaults to `model.token_map(inputs)`."""
    enc = encode(model, inputs)
    if tm is None:
        tm = model.token_map(inputs)
    embeds, pos, mask = enc["inputs_embeds"], enc["position_ids"], enc.get("attention_mask")
    if pos is None:
        raise ValueError("the encoded inputs carry no position_ids; pass model.encode's output")
    if tm.batch != embeds.shape[0] or tm.seq_len != embeds.shape[1]:
        raise ValueError(f"the TokenMap is [{tm.batch}, {tm.seq_len}] but the inputs are {list(embeds.shape[:2])}; build it from the same inputs")
    out = []
    for i in range(embeds.shape[0]):
        keep = torch.ones(embeds.shape[1], dtype=torch.bool, device=embeds.device) if mask is None else mask[i].bool()
        inj = enc.get("injections")
        if inj is not None:
            inj = [None if t is None else t[i : i + 1, keep].detach() for t in inj]
        out.append(Sample(embeds[i : i + 1, keep].detach(), pos[:, i : i + 1, keep], slice_token_map(tm, i, keep), i, inj))
    return out


def rows_per_forward(seq_len: int, batch_size: int | None, max_batch_tokens: int) -> int:
    """`batch_size` if given, else as many rows as fit `max_batch_tokens` (at least 1)."""
    if batch_size is not None:
        return checks.count(batch_size, "batch_size")
    return max(1, checks.count(max_batch_tokens, "max_batch_tokens") // max(seq_len, 1))


def forward_rows(model, sample: Sample, n: int) -> Tensor:
    """Last-position logits `[n, vocab]` of `n` copies of the sample under the active hooks."""
    return model.run_language_model(**sample.lm_inputs(n), logits_at="last")[:, -1]


def run_rows(
    model,
    sample: Sample,
    interventions: Sequence[Intervention],
    *,
    reduce: Callable[[Tensor], Tensor] | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
    desc: str = "sweep",
) -> Tensor:
    """Run `interventions[i]` on row i of chunked forwards of repeated copies of `sample`. Returns
    `reduce(last_logits)` stacked over interventions (default: the logits, `[n, vocab]`)."""
    per = rows_per_forward(sample.seq_len, batch_size, max_batch_tokens)
    outs = []
    chunks = range(0, len(interventions), per)
    bar = tqdm(total=len(interventions), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        for start in chunks:
            group = interventions[start : start + per]
            combined = sum((iv.on_rows(j) for j, iv in enumerate(group)), Intervention())
            combined.check(model, batch=len(group))
            with model.hooks(fwd_hooks=list(combined)):
                logits = forward_rows(model, sample, len(group))
            outs.append(reduce(logits) if reduce else logits)
            bar.update(len(group))
    bar.close()
    return torch.cat(outs) if outs else torch.empty(0)
