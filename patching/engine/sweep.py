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
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from hooked_av.utils import layer_of
from patching.engine import checks, cost
from patching.engine.hooks import run_from
from patching.engine.intervention import Intervention


@dataclass
class Sample:
    """One prompt ready for sweeps: what the family's `encode` gives the language model, trimmed to the
    real positions: `embeds` `[1, pos, d_model]`, `position_ids` `[3, 1, pos]`, `injections` (per layer
    `[1, pos, d_model]` or None; DeepStack's features), `tm` a batch-1 TokenMap of the same positions,
    `index` its row in the caller's batch, `encoded_under` the hooks that were active on what `encode` runs
    (towers, their output points) when it was encoded (`encode_hooks`): their edits are in `embeds`.

        sample: Sample = samples(model, inputs)[0]  # the towers ran once: embeds [1, pos, d_model]
        logits = model.run_language_model(**sample.lm_inputs(2), logits_at="last")  # two copies along the batch
        sample.tm.describe()
    """

    embeds: Tensor
    position_ids: Tensor
    tm: object
    index: int
    injections: list | None = None
    encoded_under: frozenset = frozenset()

    @property
    def seq_len(self) -> int:
        return self.embeds.shape[1]

    def lm_inputs(self, n: int = 1) -> dict:
        """`run_language_model` keyword arguments for `n` copies of the sample along the batch."""
        inj = None if self.injections is None else [None if t is None else t.expand(n, -1, -1) for t in self.injections]
        return dict(inputs_embeds=self.embeds.expand(n, -1, -1).contiguous(),
                    position_ids=self.position_ids.expand(-1, n, -1), injections=inj)


_ENCODED_UNDER: dict[int, frozenset] = {}  # id(inputs_embeds) -> the encode_hooks active when `encode` made it


def encode(model, inputs: dict) -> dict:
    """`model.encode(**inputs)` unless `inputs` already holds `inputs_embeds` (then returned as is). The hooks
    active on what `encode` runs (`encode_hooks`) are remembered with the embeddings, so `samples` of the
    result knows which tower edits they hold."""
    if "inputs_embeds" in inputs:
        return inputs
    under = encode_hooks(model)
    with torch.no_grad():
        enc = model.encode(**inputs)
    key = id(enc["inputs_embeds"])
    _ENCODED_UNDER[key] = under
    weakref.finalize(enc["inputs_embeds"], _ENCODED_UNDER.pop, key, None)
    return enc


def _language_model_parts(model) -> tuple:
    return (model.hook_embed, model.blocks, model.ln_final, model.unembed)


def in_language_model(model, name: str) -> bool:
    """Whether hook `name` sits in the language model a sweep runs (`hook_embed`, `blocks.*`, `ln_final.*`,
    `unembed.*`). The towers, their output points (`hook_audio_embeds`, `hook_image_embeds`,
    `hook_video_embeds`) and the token embedding run in `encode`, before a sweep, never in it."""
    top = getattr(model, name.split(".")[0], None)
    return any(top is m for m in _language_model_parts(model))


def encode_hooks(model) -> frozenset:
    """The hooks now active on what `encode` runs and a sweep does not (every tower module and hook point,
    the towers' output points, the token embedding), as `(module name, hook id)` pairs."""
    lm = _language_model_parts(model)
    out = set()
    for top, mod in model.named_children():
        if not any(mod is m for m in lm):
            for name, m in mod.named_modules(prefix=top):
                out |= {(name, k) for k in (*m._forward_hooks, *m._forward_pre_hooks)}
    return frozenset(out)


HOW_TO_EDIT_TOWERS = ("a sweep runs the language model on embeddings the towers made in `samples` (`model.encode`) "
                      "and never runs them again, so the edit would be lost: encode under the hook and sweep the encoded "
                      "sample, `with model.hooks(fwd_hooks=[(name, fn)]): s = samples(model, inputs)[0]`, then "
                      "`run_rows(model, s, ...)` (or run whole forwards: `model.run_with_hooks(**inputs, fwd_hooks=...)`)")


def check_language_model_hooks(model, interventions: Sequence, sample: "Sample | None" = None) -> None:
    """Refuse, before any forward, an intervention with a hook outside the language model (a tower, a tower's
    output, the token embedding; a name filter matching one) and such a hook active on the model that the
    sample was not encoded under: a sweep never runs those modules, so the edit would silently do nothing."""
    for i, iv in enumerate(interventions):
        for name, _ in iv:
            if isinstance(name, str):
                model.check_hook_name(name)
                outside = [] if in_language_model(model, name) else [name]
            else:  # a name filter: the points it matches outside the language model
                outside = [n for n in model.hook_dict if not in_language_model(model, n) and name(n)]
            if outside:
                raise ValueError(f"intervention {i} ({iv!r}) hooks {outside[:3]}, outside the language model; "
                                 + HOW_TO_EDIT_TOWERS)
    new = encode_hooks(model) - (sample.encoded_under if sample is not None else frozenset())
    if new:
        raise ValueError(f"hook(s) active on {sorted({n for n, _ in new})[:3]}, outside the language model, were not "
                         "active when the sample was encoded; " + HOW_TO_EDIT_TOWERS + "; hooks active while "
                         "`samples` encodes are in the sample and may stay active")


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
    active = encode_hooks(model)
    if "inputs_embeds" in inputs:  # encoded before: under the hooks `encode` remembered (none known otherwise)
        under = _ENCODED_UNDER.get(id(inputs["inputs_embeds"]), frozenset())
        if active - under:
            raise ValueError(f"hook(s) are active on {sorted({n for n, _ in active - under})[:3]}, which `encode` runs, "
                             "but the inputs were encoded without them (`inputs_embeds`), so they would do nothing: "
                             "pass the raw inputs (input_ids and media) to `samples` under those hooks")
    else:
        under = active
    enc = encode(model, inputs)
    embeds, pos, mask = enc["inputs_embeds"].detach(), enc["position_ids"], enc.get("attention_mask")  # no graph from here
    if pos is None:
        raise ValueError("the encoded inputs carry no position_ids; pass model.encode's output")
    if tm.batch != embeds.shape[0] or tm.seq_len != embeds.shape[1]:
        raise ValueError(f"the TokenMap is [{tm.batch}, {tm.seq_len}] but the inputs are {list(embeds.shape[:2])}; build it from the same inputs")
    out = []
    for i in range(embeds.shape[0]):
        keep = torch.ones(embeds.shape[1], dtype=torch.bool, device=embeds.device) if mask is None else mask[i].bool()
        inj = enc.get("injections")
        if inj is not None:
            inj = [None if t is None else t.detach()[i : i + 1, keep] for t in inj]
        out.append(Sample(embeds.detach()[i : i + 1, keep], pos[:, i : i + 1, keep], slice_token_map(tm, i, keep), i, inj,
                          under))
    return out


def rows_per_forward(seq_len: int, batch_size: int | None, max_batch_tokens: int) -> int:
    """`batch_size` if given, else as many rows of `seq_len` positions as fit `max_batch_tokens` (at least 1).
    `run_rows` fills chunks in order of first edited position: exactly `batch_size` rows each where given;
    else as many as fit, ending a chunk before a row whose own suffix is less than half the chunk's."""
    if batch_size is not None:
        return checks.count(batch_size, "batch_size")
    return max(1, checks.count(max_batch_tokens, "max_batch_tokens") // max(seq_len, 1))


def forward_rows(model, sample: Sample, n: int, return_type: str = "logits") -> Tensor:
    """Last-position logits `[n, vocab]` of `n` copies of the sample under the active hooks (`return_type="resid"`:
    the final residual after `ln_final`, `[n, d_model]`, for the caller to unembed); no graph."""
    with torch.no_grad():
        return model.run_language_model(**sample.lm_inputs(n), logits_at="last", return_type=return_type)[:, -1]


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


def forward_suffix(model, sample: Sample, clean: CleanRun, start: int, n: int, layer: int = 0,
                   return_type: str = "logits") -> Tensor:
    """Last-position logits `[n, vocab]` of `n` copies of the sample under the active hooks, recomputing only
    positions `start..` of blocks `layer..` against the clean run's keys and values of the prefix (read once for
    every row: `Attention.after_prefix`) and its residual entering block `layer` (masks
    `[n, 1, pos - start, pos]`); `return_type="resid"`: the final residual after `ln_final`, `[n, d_model]`."""
    x = clean.residual(sample, layer, start)
    slots = model.prefix_kv_caches(clean.kv, start, n, from_layer=layer, grow=False,
                                   fold=cost.folds(n, sample.seq_len - start, start))
    inj = sample.injections and [None if t is None else t[:, start:].expand(n, -1, -1) for t in sample.injections]
    with run_from(start):
        return model.run_language_model(x.expand(n, -1, -1).contiguous(), sample.position_ids[:, :, start:].expand(-1, n, -1),
                                        kv_caches=slots, injections=inj, start_layer=layer, logits_at="last",
                                        return_type=return_type)[:, -1]


UNEMBED_ROWS = 256  # a sweep unembeds its rows' last positions this many at a time (logits [rows, vocab])


@dataclass
class SweepPlan:
    """How `run_rows` runs a sweep of `len(starts)` interventions on a prompt of `seq` positions, decided
    before any forward (`plan_rows`): `incremental` (one clean forward, then suffixes) or whole forwards;
    `chunks`, each `(rows, start, layer)`: the interventions sharing a forward (one per batch row), the
    first position and the first block it recomputes; `materialised[i]`: the blocks where intervention i's
    hooks materialise the attention mask (their queries then read every key of the run); `exact[i]`: the
    blocks whose scores or pattern it hooks (run on the exact path, where rows never fold over a prefix)."""

    seq: int
    n_layers: int
    incremental: bool
    chunks: list
    materialised: list
    exact: list

    def stats(self, cfg) -> dict:
        """What the sweep does, counted: `positions` (positions run, summed over rows and the clean forward),
        `layer_positions` (positions x blocks), their whole-forward counterparts `positions_full` and
        `layer_positions_full`, `incremental`, FLOPs (`patching.engine.cost`): `flops` (as run: a recomputed
        suffix reads every key, or the prefix and every row's own keys where its rows fold; a whole forward the
        keys up to each query unless its mask is materialised), `flops_floor` (the same positions and blocks,
        each query reading only the keys up to itself), `flops_forward` (one plain forward reading the last
        logits), `flops_full` (a whole forward per intervention), `forwards` (`flops / flops_forward`: the
        sweep's cost in forwards); `chunks` (the forwards after the clean one) and `peak_bytes` (`cost.run_bytes`
        of the widest forward, plus the clean keys, values and residuals the chunks read; weights not counted)."""
        seq, L = self.seq, self.n_layers
        n = sum(len(rows) for rows, _, _ in self.chunks)
        done = sum(len(rows) * (seq - st) for rows, st, _ in self.chunks)
        done_layers = sum(len(rows) * (seq - st) * (L - ly) for rows, st, ly in self.chunks)
        flops = floor = 0.0
        widest = cost.run_bytes(cfg, 1, seq, seq, mask=False) if self.incremental else 0
        for rows, st, ly in self.chunks:
            mat = set().union(*(self.materialised[j] for j in rows))
            exact = set().union(*(self.exact[j] for j in rows))  # a layer on the exact path never folds
            q = len(rows) * (seq - st)
            for l in range(ly, L):
                if self.incremental:
                    how = "all" if l in exact else "suffix"
                else:  # a layer whose mask, scores or pattern are hooked reads every key; the rest run causal
                    how = "all" if l in mat else "causal"
                flops += cost.block_flops(cfg, l, q, cost.keys_read(seq, st, how, len(rows)))
            flops += cost.unembed_flops(cfg, len(rows))
            floor += cost.run_flops(cfg, seq, st, ly, len(rows))
            widest = max(widest, self.chunk_bytes(cfg, len(rows), st, bool(mat or exact)))
        clean = cost.run_flops(cfg, seq, read=0) if self.incremental else 0.0
        held = 0
        if self.incremental:  # every layer's keys and values, and the residuals entering the chunks' first blocks
            held = 4 * seq * (2 * L * cfg.n_key_value_heads * cfg.d_head
                              + cfg.d_model * len({ly for _, _, ly in self.chunks if ly > 0}))
        fwd = cost.forward_flops(cfg, seq)
        return dict(positions=done + (seq if self.incremental else 0), positions_full=seq * n,
                    layer_positions=done_layers + (seq * L if self.incremental else 0), layer_positions_full=seq * L * n,
                    incremental=self.incremental, flops=flops + clean, flops_floor=floor + clean, flops_forward=fwd,
                    flops_full=fwd * n, forwards=(flops + clean) / fwd, chunks=len(self.chunks), peak_bytes=widest + held)

    def chunk_bytes(self, cfg, rows: int, start: int, materialised: bool = True) -> int:
        """`cost.run_bytes` of a chunk of `rows` rows from `start` on, run as this plan runs it."""
        if not self.incremental:
            return cost.run_bytes(cfg, rows, self.seq, self.seq, mask=materialised)
        m = self.seq - start
        return cost.run_bytes(cfg, rows, m, self.seq, fold=cost.folds(rows, m, start))


def plan_rows(cfg, seq: int, starts: Sequence[int | None], layers: Sequence[int], *, batch_size: int | None = None,
              max_batch_tokens: int = 16384, materialised: Sequence[set] | None = None,
              exact: Sequence[set] | None = None, incremental: bool = True) -> SweepPlan:
    """The chunks `run_rows` runs for interventions whose first changed position is `starts[i]` (None: not
    known, so whole forwards) and first hooked block `layers[i]`, on a prompt of `seq` positions of a model
    of config `cfg`; no forward runs.

    Incremental where every start is known and one clean forward plus the cells' parts (positions x blocks)
    do less than whole forwards would. Rows sorted by (start, block) share a chunk while the chunk's part is
    at most twice a row's own, and, without `batch_size` (exactly that many rows a chunk), while the chunk's
    tensors (`cost.run_bytes`: its recomputed positions against every key) fit what `max_batch_tokens`
    allows a whole forward of the prompt (`rows_per_forward` rows of `seq` positions with a materialised
    mask): a chunk of short suffixes holds many rows.

        plan = plan_rows(model.cfg, 4096, starts=[4090] * 48, layers=[0] * 48)
        plan.stats(model.cfg)["forwards"]  # the sweep's cost in forwards (FLOPs), before running it
    """
    n, L = len(starts), cfg.n_layers
    materialised = [set(range(L)) for _ in range(n)] if materialised is None else [set(m) for m in materialised]
    exact = [set() for _ in range(n)] if exact is None else [set(e) for e in exact]
    starts = [None if st is None else min(st, seq - 1) for st in starts] if incremental else [None] * n
    work = [None if st is None else (seq - st) * (L - l) for st, l in zip(starts, layers)]
    use = bool(n) and all(w is not None for w in work) and seq * L + sum(work) < seq * L * n
    if use:
        layers = list(layers)
    else:
        starts, layers = [0] * n, [0] * n
    order = sorted(range(n), key=lambda i: (starts[i], layers[i]))  # similar parts share a chunk
    whole = rows_per_forward(seq, batch_size, max_batch_tokens)
    plan = SweepPlan(seq, L, use, [], materialised, exact)
    budget = cost.run_bytes(cfg, whole, seq, seq)  # whole forwards of the rows max_batch_tokens allows, mask materialised
    chunks, i = plan.chunks, 0
    while i < len(order):
        chunk, st, ly = [order[i]], starts[order[i]], layers[order[i]]
        while i + len(chunk) < len(order):
            j = order[i + len(chunk)]
            if batch_size is not None:
                if len(chunk) >= batch_size:
                    break
            else:
                own = (seq - starts[j]) * (L - layers[j])
                # a row joins where the chunk's part is at most twice its own and the chunk still fits
                if (seq - st) * (L - min(ly, layers[j])) > 2 * own:
                    break
                if len(chunk) >= whole and (not use or plan.chunk_bytes(cfg, len(chunk) + 1, st) > budget):
                    break
            chunk.append(j)
            ly = min(ly, layers[j])
        chunks.append((chunk, st, ly))
        i += len(chunk)
    return plan


def attention_layers(iv: Intervention, n_layers: int) -> tuple[set[int], set[int]]:
    """`(materialised, exact)`: the blocks where `iv`'s hooks make the attention mask materialise (a hooked
    mask, scores or pattern; every block for a name filter, which may match any) and those whose scores or
    pattern it hooks (the exact path)."""
    mat: set[int] = set()
    exact: set[int] = set()
    for name, _ in iv:
        if not isinstance(name, str):
            mat |= set(range(n_layers))
        elif layer_of(name) and name.endswith(("hook_attn_mask", "hook_attn_scores", "hook_pattern")):
            mat.add(layer_of(name)[0])
            if not name.endswith("hook_attn_mask"):
                exact.add(layer_of(name)[0])
    return mat, exact


def plan_sweep(model, seq: int, interventions: Sequence[Intervention], *, batch_size: int | None = None,
               max_batch_tokens: int = 16384, incremental: bool = True) -> SweepPlan:
    """The plan `run_rows(model, sample, interventions, ...)` follows on a sample of `seq` positions, without
    running anything (the model's config and its active hooks are read, never its weights: a model built on
    the meta device plans as well).

        ivs = [block_attention(sample.tm, "audio", "last", [layer]) for layer in range(model.cfg.n_layers)]
        plan = plan_sweep(model, sample.seq_len, ivs)
        plan.stats(model.cfg)["forwards"], len(plan.chunks)  # the sweep's cost in forwards, before it runs
    """
    starts = [first_query(iv) for iv in interventions] if incremental and not ambient_hooks(model) else [None] * len(interventions)
    kinds = [attention_layers(iv, model.cfg.n_layers) for iv in interventions]
    return plan_rows(model.cfg, seq, starts, [first_layer(iv) for iv in interventions], batch_size=batch_size,
                     max_batch_tokens=max_batch_tokens, materialised=[m for m, _ in kinds], exact=[e for _, e in kinds],
                     incremental=incremental)


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
    knockout, head knockout, scaled attention, steering, mask discarding: the first dst query that sees a
    src key; patching, ablation and noise at positions of position-major sites), one clean forward keeps
    each layer's keys and values and the residual entering the blocks where rows start, and each chunk
    recomputes only the positions from its rows' first edited position on, in the blocks from its rows'
    first edited block on (attention is causal: nothing earlier changes; nothing changes before the first
    hooked block). Rows edited from position 0 of block 0 run whole in it where the sweep still does less
    work than whole forwards would. Anything else (a hook of another origin, a hook already active on the
    model, edits that leave nothing to save) runs whole forwards, as does `incremental=False`. A hook outside
    the language model (a tower, `hook_audio_embeds`, ...), in an intervention or active on the model but not
    while `samples` encoded, is refused before any forward: the towers ran in `samples` and never run here. Chunks as
    `plan_rows` packs them (`plan_sweep` gives the plan without running). `stats`, if given, receives
    `SweepPlan.stats`: positions and positions x blocks run, FLOPs as run and at the causal floor, the
    sweep's cost in forwards, its chunks and their peak bytes.

        sample = samples(model, inputs)[0]
        ivs = [block_attention(sample.tm, "audio", "last", [layer]) for layer in range(model.cfg.n_layers)]
        run_rows(model, sample, ivs, reduce=AnswerProb([answer]), progress=False)  # [n_layers]: p(answer) per knocked-out layer
    """
    bad = [(i, type(iv).__name__) for i, iv in enumerate(interventions) if not isinstance(iv, Intervention)]
    if bad:
        raise TypeError(f"run_rows puts intervention i on batch row i, which takes Intervention objects (they know their "
                        f"rows); got {bad[:3]} (index, type): build them with patching.engine.hooks (block_attention, "
                        "ablate, patch_from_cache, ...), or run (name, fn) pairs whole with model.run_with_hooks")
    check_language_model_hooks(model, interventions, sample)
    seq = sample.seq_len
    plan = plan_sweep(model, seq, interventions, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                      incremental=incremental)
    use = plan.incremental
    resid_from: dict[int, int] = {}
    for _, st, ly in plan.chunks:
        resid_from[ly] = min(st, resid_from.get(ly, seq))
    plans = []  # every chunk's hooks, checked before the first forward
    for chunk, st, ly in plan.chunks:
        combined = sum((interventions[j].on_rows(r) for r, j in enumerate(chunk)), Intervention())
        plans.append((chunk, list(combined.check(model, batch=len(chunk), seq_len=seq)), st, ly))
    outs: list = [None] * len(interventions)
    pending: list = []  # (rows, final residuals): unembedded together, so the unembedding's weight is read once
    bar = tqdm(total=len(interventions), desc=desc, disable=not progress, leave=False)

    def flush():
        rows = [j for chunk, _ in pending for j in chunk]
        logits = model.unembed(torch.cat([r for _, r in pending]))
        vals = reduce(logits) if reduce else logits
        for j, v in zip(rows, vals):
            outs[j] = v
        bar.update(len(rows))
        pending.clear()

    with torch.no_grad():
        clean = clean_run(model, sample, resid_from) if use else None
        for n_plan in range(len(plans)):
            (chunk, hooks, start, layer), plans[n_plan] = plans[n_plan], None  # free each chunk's edge masks after use
            with model.hooks(fwd_hooks=hooks):
                resid = (forward_suffix(model, sample, clean, start, len(chunk), layer, return_type="resid") if use
                         else forward_rows(model, sample, len(chunk), return_type="resid"))
            pending.append((chunk, resid))
            if sum(len(c) for c, _ in pending) >= UNEMBED_ROWS:
                flush()
        if pending:
            flush()
    bar.close()
    if stats is not None:
        stats.update(plan.stats(model.cfg))
    return torch.stack(outs) if outs else torch.empty(0)
