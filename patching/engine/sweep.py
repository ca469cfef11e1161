"""The sweep engine: encode once, then run many interventions as rows of few forwards.

`samples(model, inputs)` runs the towers once and splits the batch into one `Sample` per prompt with its
left padding trimmed (padding is masked anyway, so trimming changes nothing but the cost).
`run_rows(model, sample, interventions)` repeats the sample's embeddings along the batch, puts
intervention i on row i (`iv.on_rows(i)`), and runs chunks that fit `max_batch_tokens`, returning the
last position's logits (or what `reduce` makes of them) per intervention; where the interventions name
the first position they edit (attention edits, activation edits at positions) it recomputes only the
positions from there on, in the blocks from the first hooked one on, against one clean forward's keys,
values and residuals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from hooked_av.utils import layer_of
from patching.engine import checks
from patching.engine.hooks import run_from
from patching.engine.intervention import Intervention


@dataclass
class Sample:
    """One prompt ready for sweeps: what the family's `encode` gives the language model, trimmed to the
    real positions: `embeds` `[1, pos, d_model]`, `position_ids` `[3, 1, pos]`, `injections` (per layer
    `[1, pos, d_model]` or None; DeepStack's features), `tm` a batch-1 TokenMap of the same positions,
    `index` its row in the caller's batch.

        sample: Sample = samples(model, inputs)[0]  # the towers ran once: embeds [1, pos, d_model]
        logits = model.run_language_model(**sample.lm_inputs(2), logits_at="last")  # two copies along the batch
        sample.tm.describe()
    """

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


def _token_map_of(model, inputs: dict, tm=None):
    """`tm` (default `model.token_map(inputs)`), checked against the inputs' `[batch, pos]` before any tower runs."""
    if tm is None:
        tm = model.token_map(inputs)
    ref = inputs.get("inputs_embeds", inputs.get("input_ids"))
    if ref is not None and (tm.batch != ref.shape[0] or tm.seq_len != ref.shape[1]):
        raise ValueError(f"the TokenMap is [{tm.batch}, {tm.seq_len}] but the inputs are {list(ref.shape[:2])}; "
                         "build it from the same inputs")
    return tm


def sample_maps(model, inputs: dict, tm=None) -> list:
    """The batch-1 TokenMaps the `samples` of `inputs` will carry (left padding trimmed), without running the
    towers: for checking a sweep's arguments against every sample before any forward."""
    tm = _token_map_of(model, inputs, tm)
    mask = inputs.get("attention_mask")
    return [slice_token_map(tm, i, None if mask is None else mask[i].bool()) for i in range(tm.batch)]


def samples(model, inputs: dict, tm=None) -> list[Sample]:
    """Encode once (towers run here, never again in the sweep) and split into trimmed samples.
    `tm` defaults to `model.token_map(inputs)`; a map of other inputs is refused before the towers run.

        sample = samples(model, inputs)[0]  # the towers run here, once
        run_rows(model, sample, [discard(sample.tm, "audio", 2)], progress=False).shape  # [1, vocab]
    """
    tm = _token_map_of(model, inputs, tm)
    enc = encode(model, inputs)
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
    """`batch_size` if given, else as many rows of `seq_len` positions as fit `max_batch_tokens` (at least 1).
    `run_rows` fills chunks in order of first edited position: exactly `batch_size` rows each where given;
    else as many as fit, ending a chunk before a row whose own suffix is less than half the chunk's."""
    if batch_size is not None:
        return checks.count(batch_size, "batch_size")
    return max(1, checks.count(max_batch_tokens, "max_batch_tokens") // max(seq_len, 1))


def forward_rows(model, sample: Sample, n: int) -> Tensor:
    """Last-position logits `[n, vocab]` of `n` copies of the sample under the active hooks."""
    return model.run_language_model(**sample.lm_inputs(n), logits_at="last")[:, -1]


def first_query(iv: Intervention) -> int | None:
    """The first position `iv` can change, when every hook it installs says so (`first_query`, set by
    `patching.engine.hooks`' attention edits, the first dst query at or after the first src key of its row
    (`hooks.first_seeing`: an earlier query sees no edited key), and its activation edits, the first edited
    position, each of which also runs on a suffix of the prompt); None otherwise. Attention is causal,
    so nothing before that position changes, in any layer."""
    firsts = []
    for name, fn in iv:
        first = getattr(fn, "first_query", None)
        if first is None or not isinstance(name, str):  # a name filter may match anything
            return None
        firsts.append(first)
    return min(firsts) if firsts else None


def first_layer(iv: Intervention) -> int:
    """The first block any hook of `iv` sits in (`blocks.{l}.`...); 0 where a hook is outside the blocks
    (the embedding, a name filter). Nothing before that block's `hook_resid_pre` changes."""
    return min(((layer_of(name) or (0,))[0] if isinstance(name, str) else 0 for name, _ in iv), default=0)


def ambient_hooks(model) -> bool:
    """Whether a hook is already active on the language model (the caller's `model.hooks()`): a sweep then
    runs whole forwards, since such a hook may index positions and cannot be told where a suffix starts."""
    points = [model.hook_embed, *model.ln_final.modules(), *model.unembed.modules(), *model.blocks.modules()]
    return any(isinstance(m, HookPoint) and m.has_hooks() for m in points)


@dataclass
class CleanRun:
    """What a sweep's cells reuse from one clean forward of a sample: every layer's rotated keys and values
    `kv[l]` `[1, pos, kv_heads, d]`, and the residual entering block l from position `resid_from[l]` on,
    `resid[l]` `[1, pos - resid_from[l], d_model]`, for the layers where cells start."""

    kv: list
    resid: dict
    resid_from: dict

    def residual(self, sample: "Sample", layer: int, start: int) -> Tensor:
        """The clean residual entering block `layer` at positions `start..` (the embeddings at layer 0)."""
        if layer == 0:
            return sample.embeds[:, start:]
        return self.resid[layer][:, start - self.resid_from[layer]:]


def clean_run(model, sample: Sample, resid_from: dict[int, int] | None = None) -> CleanRun:
    """One clean forward of the sample keeping every layer's keys and values and, for each `layer: start`
    of `resid_from` (layer > 0), the residual entering that block from position `start` on."""
    slots = model.empty_kv_caches()
    resid_from = {l: s for l, s in (resid_from or {}).items() if l > 0}
    resid: dict[int, Tensor] = {}

    def keeper(layer: int, start: int):
        def keep(x, hook):
            resid[layer] = x[:, start:].clone()

        return keep

    with model.hooks(fwd_hooks=[(f"blocks.{l}.hook_resid_pre", keeper(l, s)) for l, s in resid_from.items()]):
        model.run_language_model(**sample.lm_inputs(1), kv_caches=slots, return_type=None)
    return CleanRun([(s.k, s.v) for s in slots], resid, resid_from)


def forward_suffix(model, sample: Sample, clean: CleanRun, start: int, n: int, layer: int = 0) -> Tensor:
    """Last-position logits `[n, vocab]` of `n` copies of the sample under the active hooks, recomputing only
    positions `start..` of blocks `layer..` against the clean run's keys and values of the prefix and its
    residual entering block `layer` (masks `[n, 1, pos - start, pos]`)."""
    x = clean.residual(sample, layer, start)
    slots = model.prefix_kv_caches(clean.kv, start, n, from_layer=layer)
    inj = sample.injections and [None if t is None else t[:, start:].expand(n, -1, -1) for t in sample.injections]
    with run_from(start):
        return model.run_language_model(x.expand(n, -1, -1).contiguous(), sample.position_ids[:, :, start:].expand(-1, n, -1),
                                        kv_caches=slots, injections=inj, start_layer=layer, logits_at="last")[:, -1]


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
    incremental: bool = True,
    stats: dict | None = None,
) -> Tensor:
    """Run `interventions[i]` on row i of chunked forwards of repeated copies of `sample`. Returns
    `reduce(last_logits)` stacked over interventions (default: the logits, `[n, vocab]`).

    Recompute only what changes: when every intervention names the first position it edits (`patching.engine.hooks`'
    knockout, head knockout, scaled attention, mask discarding, and patching, ablation and noise at
    positions of position-major sites), one clean forward keeps each layer's keys and values and the
    residual entering the blocks where rows start, and each chunk recomputes only the positions from its
    rows' first edited position on, in the blocks from its rows' first edited block on (attention is
    causal: nothing earlier changes; nothing changes before the first hooked block). Rows edited from
    position 0 of block 0 run whole in it where the sweep still does less work than whole forwards would.
    Anything else (a hook of another origin, a hook already active on the model, edits that leave nothing
    to save) runs whole forwards, as does `incremental=False`. `stats`, if given, receives `positions` (the
    positions run, summed over rows and the clean forward), `layer_positions` (positions x blocks run),
    their whole-forward counterparts `positions_full` and `layer_positions_full`, and `incremental`.

        sample = samples(model, inputs)[0]
        ivs = [block_attention(sample.tm, "audio", "last", [layer]) for layer in range(model.cfg.n_layers)]
        run_rows(model, sample, ivs, reduce=AnswerProb([answer]), progress=False)  # [n_layers]: p(answer) per knocked-out layer
    """
    seq, n_layers = sample.seq_len, len(model.blocks)
    starts = [first_query(iv) for iv in interventions] if incremental else [None] * len(interventions)
    # a cell that edits no prompt query (only generated ones) still reads the last position: run it from there
    starts = [None if st is None else min(st, seq - 1) for st in starts]
    layers = [first_layer(iv) for iv in interventions]
    work = [None if st is None else (seq - st) * (n_layers - l) for st, l in zip(starts, layers)]
    # worth it while the clean forward plus the cells' parts do less work than whole forwards would
    use = (bool(interventions) and all(w is not None for w in work) and not ambient_hooks(model)
           and seq * n_layers + sum(work) < seq * n_layers * len(interventions))
    if not use:
        starts, layers = [0] * len(interventions), [0] * len(interventions)
    order = sorted(range(len(interventions)), key=lambda i: (starts[i], layers[i]))  # similar parts share a chunk
    # a row holds every position's keys and values (recomputed or the clean prefix's), so rows are
    # budgeted by the whole length in both ways of running
    most, chunks, i = rows_per_forward(seq, batch_size, max_batch_tokens), [], 0
    while i < len(order):
        chunk, st, ly = [order[i]], starts[order[i]], layers[order[i]]
        while len(chunk) < most and i + len(chunk) < len(order):
            j = order[i + len(chunk)]
            own = (seq - starts[j]) * (n_layers - layers[j])
            # a row joins where the chunk's part is at most twice its own (exactly `batch_size` where given)
            if batch_size is None and (seq - st) * (n_layers - min(ly, layers[j])) > 2 * own:
                break
            chunk.append(j)
            ly = min(ly, layers[j])
        chunks.append((chunk, st, ly))
        i += len(chunk)
    resid_from: dict[int, int] = {}
    for _, st, ly in chunks:
        resid_from[ly] = min(st, resid_from.get(ly, seq))
    plans = []  # every chunk's hooks, checked before the first forward
    for chunk, st, ly in chunks:
        combined = sum((interventions[j].on_rows(r) for r, j in enumerate(chunk)), Intervention())
        plans.append((chunk, list(combined.check(model, batch=len(chunk), seq_len=seq)), st, ly))
    outs: list = [None] * len(interventions)
    done = done_layers = 0
    bar = tqdm(total=len(interventions), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        clean = clean_run(model, sample, resid_from) if use else None
        for n_plan in range(len(plans)):
            (chunk, hooks, start, layer), plans[n_plan] = plans[n_plan], None  # free each chunk's edge masks after use
            with model.hooks(fwd_hooks=hooks):
                logits = (forward_suffix(model, sample, clean, start, len(chunk), layer) if use
                          else forward_rows(model, sample, len(chunk)))
            vals = reduce(logits) if reduce else logits
            for j, v in zip(chunk, vals):
                outs[j] = v
            done += len(chunk) * (seq - start)
            done_layers += len(chunk) * (seq - start) * (n_layers - layer)
            bar.update(len(chunk))
    bar.close()
    if stats is not None:
        stats.update(positions=done + (seq if use else 0), positions_full=seq * len(interventions),
                     layer_positions=done_layers + (seq * n_layers if use else 0),
                     layer_positions_full=seq * n_layers * len(interventions), incremental=use)
    return torch.stack(outs) if outs else torch.empty(0)
