"""Composable interventions: each constructor returns an `Intervention` (iterable `(hook_name, fn)` pairs,
`+` to combine, printable, saved with results). Every one takes `rows=` (act on those batch rows only),
so a sweep can hold a different intervention in every row of one forward.

Attention edits act on `blocks.{l}.attn.hook_attn_mask` (the additive mask, before the softmax, on the
SDPA and the exact path alike) or, where they need the scores themselves, on `hook_attn_scores`.
Token sets are TokenMap specs (`"audio"`, `"video[1]"`, `"audio|video"`) or `Selection`s; a spec that
selects nothing in some row is an error raised here, before anything runs.

    iv = block_attention(tm, "audio", "last", range(4, 13)) + scale_attention(tm, "last", "video", 2.0, [10])
    logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import Tensor

from hooked_av.inputs import Selection
from hooked_av.utils import SITES, decoding_from, layer_of, neg_inf, position_major, positions_or_mask
from patching.engine import checks
from patching.engine.intervention import Intervention, Part, batch_rows, layer_list

_OFFSET: ContextVar[int] = ContextVar("patching_hooks_run_from", default=0)


@contextmanager
def run_from(start: int) -> Iterator[None]:
    """Inside, runs are suffixes of their prompt from position `start` on (after cached keys and values,
    as `patching.engine.sweep.forward_suffix` runs them): the activation edits here (`patch_from_cache`, `ablate`,
    `add_noise`) read prompt position p at index `p - start` of the activations they receive."""
    token = _OFFSET.set(int(start))
    try:
        yield
    finally:
        _OFFSET.reset(token)


def _window(positions, act: Tensor, rows, what: str) -> tuple[int, Tensor] | None:
    """`(start, where)`: the prompt position of the activations' first index (see `run_from`) and bool
    `[batch, act positions]`, the edited positions of the run's rows from `start` on; None in a decoding step
    of `model.generate` (`decoding_from`): positions are the prompt's, so activation edits act on the prefill
    and a generated token runs unedited."""
    if decoding_from() is not None:
        return None
    start = _OFFSET.get()
    full = position_mask(positions, act.shape[0], act.shape[1] + start, act.device)
    return start, batch_rows(full, act.shape[0], rows, what)[:, start:]


def _first_position(positions, name: str) -> int | None:
    """The first prompt position an activation edit at `name` touches, or None where a sweep may not
    start later than position 0: a site that is not position-major, or positions counted from the end."""
    if not (isinstance(name, str) and position_major(name)):
        return None
    if positions is None:
        return 0
    t = positions_or_mask(positions, 0, "positions")  # floats and 2-D ints refused before any run
    if t.dtype == torch.bool:
        t = t if t.dim() == 2 else t[None]
        return int(t.any(0).nonzero()[0, 0])
    t = t.flatten().long()
    return None if bool((t < 0).any()) else int(t.min())


def _starting(fn, positions, name: str):
    """`fn` with `first_query` set to the first prompt position it edits at hook `name` (where known,
    see `_first_position`): `patching.engine.sweep.run_rows` recomputes only from there on."""
    first = _first_position(positions, name)
    if first is not None:
        fn.first_query = first
    return fn


def site_name(site: str, layer: int | None = None) -> str:
    """`("resid_pre", 3)` -> `"blocks.3.hook_resid_pre"`; a full hook name passes through."""
    if site in SITES:
        if layer is None:
            raise ValueError(f"site {site!r} needs a layer")
        return SITES[site].format(l=layer)
    return site


def _token_mask(tm, spec, what: str) -> tuple[Tensor, str]:
    """bool `[tm.batch, pos]` of a spec; error if a row selects nothing."""
    sel = tm.select(spec)
    for row in range(tm.batch):
        if not bool(sel.mask[row].any()):
            try:
                tm.mask(sel, nonempty=True)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
    return sel.mask, sel.label


class _Set(NamedTuple):
    """A mask edit's token set: `mask` bool `[tm.batch, pos]` over the TokenMap's positions and
    `generated` bool `[tm.batch]`: whether the positions after the map (tokens `model.generate` appends)
    are in the set, per row."""

    mask: Tensor
    generated: Tensor
    label: str


GENERATED = ("as_last", "by_group")  # how a mask edit's dst treats generated queries (see `_edge_hooks`)


def _token_set(tm, spec, what: str, queries: str | None = None) -> _Set:
    """The set of a spec, with its generated positions: as keys (`queries` None) and as queries under
    `generated="by_group"`, those of `tm.extend(1).select(spec)`, i.e. where the spec names the group
    `generated` (`"generated"`, `"all"`); a `Selection` or bool mask covers the map's positions only and selects no
    generated one. As queries under `generated="as_last"`, a generated query is in the set exactly
    where the row's final prompt position (`last`) is. A row with neither map positions nor generated
    ones is refused (the edit would change nothing there)."""
    sel = tm.select(spec)
    if queries == "as_last":
        gen = (sel.mask & tm.select("last").mask).any(-1)
    elif isinstance(spec, (Selection, Tensor)):  # a mask covers the map's positions only
        gen = torch.zeros(tm.batch, dtype=torch.bool)
    else:
        gen = tm.extend(1).select(spec).mask[:, -1]
    if not bool((sel.mask.any(-1) | gen).all()):
        _token_mask(tm, sel, what)  # raises, naming the row
    return _Set(sel.mask, gen, sel.label)


def position_mask(positions, batch: int, seq: int, device) -> Tensor:
    """positions (None = all; a Selection; bool `[b|1, pos]` or `[pos]`; int positions) -> bool `[b|1, pos]`."""
    if positions is None:
        return torch.ones(1, seq, dtype=torch.bool, device=device)
    if hasattr(positions, "mask") and hasattr(positions, "label"):
        positions = positions.mask
    t = positions_or_mask(positions, seq, "positions").to(device)
    if t.dtype == torch.bool:
        t = t if t.dim() == 2 else t[None]
        if t.shape[-1] != seq:
            raise ValueError(f"a position mask over {t.shape[-1]} positions does not fit activations of {seq} positions; clean and corrupted layouts must match")
        return t
    out = torch.zeros(1, seq, dtype=torch.bool, device=device)
    t = t.flatten().long()
    if len(t) and (int(t.max()) >= seq or int(t.min()) < -seq):
        raise ValueError(f"position(s) {t.tolist()} out of range for {seq} positions")
    out[0, t] = True
    return out


def positions_label(positions, what: str) -> str:
    """The label saved with the intervention; positions that select nothing are refused (a no-op edit)."""
    if positions is None:
        return "all"
    t = torch.as_tensor(positions.mask if hasattr(positions, "mask") else positions)
    if not bool(t.any() if t.dtype == torch.bool else t.numel()):
        raise ValueError(f"{what}: positions select nothing, so the edit would change nothing; pass None for every "
                         "position or at least one position")
    if hasattr(positions, "label"):
        return positions.label
    return f"mask[{int(t.sum())}]" if t.dtype == torch.bool else str(t.flatten().tolist())


def _edge_hooks(tm, src, dst, layers, op, params, edit, what, heads=None, generated: str = "as_last",
                on_scores: bool = False):
    """Shared by the mask edits: `edit(t, edge)` where t is the rows the edit acts on (all, or its `rows`) of
    the layer's additive mask (`hook_attn_mask`) and edge is bool `[rows, 1, q, k]`; `edit` returns the
    edited rows (in place or new). With `heads` (or `on_scores`, for an edit that reads the scores) the
    edit is on `hook_attn_scores` instead (a `[b, 1, q, k]` mask cannot tell heads apart), edge
    `[rows, heads, q, k]` True in those query heads only (`[rows, 1, q, k]` without `heads`); those layers
    run on the exact path. `src`, `dst`: specs, `Selection`s or `_Set`s. The q queries are the last q of
    the k positions: a forward of the whole prompt (k = the map's positions), of a suffix after cached
    keys (`patching.engine.sweep`), or a step of `model.generate` (k = prompt + tokens generated so far, the
    queries after the map). Positions after the map are generated tokens: as keys they are in `src`
    where the spec names the group `generated` (as on `tm.extend(n)`); as queries they are in `dst`
    as `generated` says (see `_token_set`). A run whose queries start inside the map but whose keys
    outrun it, or that is shorter than the map, is refused: the map is not this run's."""
    if generated not in GENERATED:
        raise ValueError(f"{what}: generated must be one of {list(GENERATED)}, got {generated!r}")
    layers = layer_list(layers, what)
    heads = _heads(heads, what)
    s_set = src if isinstance(src, _Set) else _token_set(tm, src, f"{what} src")
    d_set = dst if isinstance(dst, _Set) else _token_set(tm, dst, f"{what} dst", queries=generated)
    params = {"src": s_set.label, "dst": d_set.label, **params, "layers": list(layers),
              **({} if heads is None else {"heads": heads})}
    site = "hook_attn_mask" if heads is None and not on_scores else "hook_attn_scores"
    n = tm.seq_len

    def make(rows):
        cache: dict = {}  # the edge mask of this row set, built once per run shape

        def fn(t: Tensor, hook) -> Tensor:
            b, h, q, k = t.shape
            key = (b, h, q, k, t.device)
            if key not in cache:
                if k < n or (k > n and k - q < n):
                    raise ValueError(f"{what}: the TokenMap has {n} positions, the attention sees {k} keys "
                                     f"({q} queries); build the intervention from the map of the inputs "
                                     "that run (positions after the map count as generated only in a step of "
                                     "model.generate, queries after the cached prompt)")
                s = _spread(s_set, k - n, b, rows, t.device, what)
                d = _spread(d_set, k - n, b, rows, t.device, what)[:, k - q:]
                # the edge over this part's rows only: a sweep puts one intervention per row, so an edge over
                # the whole batch would cost every row's hooks the whole batch's mask (rows squared)
                at = _row_span(rows, b)
                edge = d[at][:, None, :, None] & s[at][:, None, None, :]
                if heads is not None:
                    edge = edge & _head_mask(heads, h, t.device, torch.bool, what).view(1, h, 1, 1)
                cache.clear()
                cache[key] = (at, edge)
            at, edge = cache[key]
            part = t[at]  # a view where the rows are consecutive: an in-place edit acts on t itself
            new = edit(part, edge)
            if new is not part or not isinstance(at, slice):
                if t.requires_grad and torch.is_grad_enabled():
                    t = t.clone()  # the edit's inputs may be saved for backward
                t[at] = new
            return t

        # the first query position the edit changes: a sweep may reuse everything before it (patching.engine.sweep)
        fn.first_query = first_seeing(d_set.mask, s_set.mask)
        return [(f"blocks.{l}.attn.{site}", fn) for l in layers]

    return Intervention([Part(op, params, make, layers, heads=tuple(heads or ()), seq_len=n)])


def _row_span(rows, b: int):
    """The batch rows a part acts on as an index: a slice where they are consecutive (a view), else a list."""
    if rows is None:
        return slice(None)
    rows = sorted(set(int(r) for r in rows))
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return rows


def first_seeing(dst: Tensor, src: Tensor) -> int:
    """The first prompt position at which an edit of the edges src -> dst can change anything: the first
    `dst` query at or after the first `src` key of its row (attention is causal: a query before every
    edited key sees none of them, so its scores, pattern and output are the clean run's; every later
    position is recomputed). dst, src bool `[rows, pos]` over the TokenMap's positions; the map's length
    where no prompt query sees an edited key (generated queries or keys only).

        first_seeing(tm.mask("question"), tm.mask("audio"))  # the first question token after the audio's start
    """
    n = dst.shape[-1]
    idx = torch.arange(n)
    first_key = torch.where(src, idx, n).amin(-1, keepdim=True)  # [rows, 1]; n where the row has no src key
    return int(torch.where(dst & (idx >= first_key), idx, n).amin()) if dst.numel() else n


def _spread(tset: _Set, n_new: int, b: int, rows, device, what: str) -> Tensor:
    """bool `[b, map positions + n_new]`: the set over the run's rows, its generated flag repeated over
    the `n_new` positions after the map."""
    m = torch.cat([tset.mask, tset.generated[:, None].expand(-1, n_new)], dim=1)
    return batch_rows(m.to(device), b, rows, what)


def _knock_out(t: Tensor, edge: Tensor) -> Tensor:
    return t.masked_fill_(edge, neg_inf(t.dtype))


def block_attention(tm, src, dst, layers, rows: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None, generated: str = "as_last") -> Intervention:
    """Knock out the edges src -> dst: `dst` queries may not attend to `src` keys in `layers`
    (additive `neg_inf` on `hook_attn_mask`). `heads`: in those query heads only (Map the Flow's
    head-level knockout): the edges' scores are set to `neg_inf` on `hook_attn_scores` (after the mask,
    before the softmax), so those layers run on the exact path.

    Under `model.generate` (see `_edge_hooks`), keys after the prompt are the group `generated`, and
    `generated` says which generated queries the edit holds for: `"as_last"` (default) treats each one
    as the row's final prompt position, so an edit to `"last"` holds at every newest position (where
    the answer keeps being read); `"by_group"` treats them as `tm.extend(n)` does: only a dst naming
    `"generated"` (or `"all"`) selects them.

        iv = block_attention(tm, "audio", "last", layers=range(1, 3))  # the last position may not read the audio there
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
        logits[0, -1].softmax(-1)[answer]
    """
    iv = _edge_hooks(tm, src, dst, layers, "block_attention", {}, _knock_out, "block_attention", heads, generated)
    return iv if rows is None else iv.on_rows(rows)


def scale_attention(tm, dst, src, factor: float, layers, rows: Sequence[int] | None = None,
                    generated: str = "as_last") -> Intervention:
    """Multiply the unnormalised attention of `dst` queries to `src` keys by `factor` (add `log(factor)`
    to the additive mask before the softmax; factor 0 is a knockout). Under `model.generate`, generated
    keys and queries as in `block_attention` (`generated`: `"as_last"` or `"by_group"`).

        iv = scale_attention(tm, "last", "audio", 0.5, layers=[2, 3])  # halve last -> audio before the softmax
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    checks.finite(factor, "scale_attention: factor", minimum=0)  # inf or NaN would act as a knockout
    delta = math.log(factor) if factor > 0 else None

    def edit(mask, edge):
        if delta is None:
            return _knock_out(mask, edge)
        live = edge & (mask > neg_inf(mask.dtype) / 2)  # masked keys stay masked
        return mask.add_(live.to(mask.dtype) * delta)

    iv = _edge_hooks(tm, src, dst, layers, "scale_attention", {"factor": factor}, edit, "scale_attention",
                     generated=generated)
    return iv if rows is None else iv.on_rows(rows)


def discard(tm, group, from_layer: int, n_layers: int | None = None, rows: Sequence[int] | None = None) -> Intervention:
    """Mask-based discarding: from `from_layer` on, no other token attends to `group`'s keys, as if its
    keys and values were gone (what `discarding.physical_forward` removes). Without `n_layers` the hook
    is a name filter matching every later layer's `hook_attn_mask`. Under `model.generate` a dropped
    position stays dropped for every later query, generated ones included (generated keys are dropped
    only where `group` names `"generated"`), as the same discarding built from `tm.extend(n)`.

        iv = discard(tm, "audio", from_layer=2)  # as if the audio's keys and values were gone from layer 2 on
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    drop = _token_set(tm, group, "discard src")
    rest_mask, rest_label = _token_mask(tm, tm.select("all") - tm.select(group), "discard dst")
    rest = _Set(rest_mask, ~drop.generated, rest_label)  # generated tokens are in "all"
    layers = [from_layer] if n_layers is None else range(from_layer, n_layers)
    inner = _edge_hooks(tm, drop, rest, layers, "block_attention", {}, _knock_out, "discard").parts[0].make
    if n_layers is not None:
        make = inner
    else:

        def make(rows):
            fn = inner(rows)[0][1]

            def later(name: str) -> bool:
                parts = name.split(".")
                return name.endswith("attn.hook_attn_mask") and parts[0] == "blocks" and int(parts[1]) >= from_layer

            return [(later, fn)]

    iv = Intervention([Part("discard", {"group": drop.label, "from_layer": from_layer}, make, (from_layer,),
                            seq_len=tm.seq_len)])
    return iv if rows is None else iv.on_rows(rows)


def steer(tm, dst, src, alpha: float, layers, heads: Sequence[int] | None = None,
          rows: Sequence[int] | None = None, generated: str = "as_last") -> Intervention:
    """PAI-style attention-logit steering toward a token set (docs/methods.md, cross-modal hubs): on
    `hook_attn_scores`, `score[dst -> src] += alpha * |score[dst -> src]|` in `layers` (optionally only
    `heads`); masked keys stay masked. Acts before the softmax; runs those layers on the exact path.
    Under `model.generate`, generated keys and queries as in `block_attention` (`generated`: `"as_last"`
    or `"by_group"`); in a sweep it recomputes from its first `dst` query on, as the mask edits do.

        iv = steer(tm, "last", "audio", alpha=0.5, layers=[3], heads=[0, 1])
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    checks.finite(alpha, "steer: alpha")

    def edit(scores: Tensor, edge: Tensor) -> Tensor:
        live = edge & (scores > neg_inf(scores.dtype) / 2)
        # where, not a product: alpha * |masked score| overflows to inf for |alpha| > 1, and inf * 0 is NaN
        return scores + torch.where(live, alpha * scores.abs(), torch.zeros((), dtype=scores.dtype, device=scores.device))

    iv = _edge_hooks(tm, src, dst, layers, "steer", {"alpha": alpha}, edit, "steer", heads, generated, on_scores=True)
    return iv if rows is None else iv.on_rows(rows)


PAI_ALPHA, PAI_FROM_LAYER = 0.2, 6  # the hub's self.alpha = 0.2 and `self.layer_idx > 5`


def after_media(tm) -> Selection:
    """The positions after each row's last media token (the hub's `text_start_idx = max(audio_idx.max(),
    video_idx.max()) + 1` onward; images count as media here), padding excluded. A row without media is
    refused."""
    media = tm.mask("media")
    pos = torch.arange(media.shape[1])
    last = torch.where(media, pos, -1).amax(-1, keepdim=True)  # [b, 1]
    if bool((last < 0).any()):
        rows = (last[:, 0] < 0).nonzero()[:, 0].tolist()
        raise ValueError(f"row(s) {rows} hold no media token, so nothing comes after the media; give prompts with media")
    return Selection((pos[None] > last) & ~tm.mask("padding"), "after media")


def pai_steer(tm, tokens, layers, alpha: float = PAI_ALPHA, heads: Sequence[int] | None = None,
              rows: Sequence[int] | None = None) -> Intervention:
    """The hub's PAI-style `masking_token` path (`kaistmm/crossmodal-hub`, `model/modeling_qwen2_5_omni_low.py`,
    `Qwen2_5OmniAttention.forward`, written but switched off there by `use_pai=False`): in `layers`
    (the hub's `layer_idx > 5`: `range(6, n_layers)`), every query after the last media token (and each
    generated one, the hub's `generation_mode` branch on row -1) gets `score += alpha * |score|` toward
    the `tokens` keys (TokenMap spec, `Selection`; the hub passes sink positions), before the softmax,
    alpha 0.2 by default. It is `steer(tm, after_media(tm), tokens, alpha, layers)`: composable with
    any other edit, and a sweep (`run_rows`) recomputes it from the first query after the media on
    (`first_query`).

        iv = pai_steer(tm, "audio", layers=[2, 3])  # the hub's layers on a 28-layer model: range(6, 28)
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    dst = after_media(tm)
    iv = steer(tm, dst, tokens, alpha, layers, heads=heads, generated="as_last")
    iv = Intervention([dataclasses.replace(iv.parts[0], op="pai_steer")])  # named as what it is in saved results
    return iv if rows is None else iv.on_rows(rows)


def _write(act: Tensor, where: Tensor, value: Tensor, heads, what: str) -> Tensor:
    """act `[b, pos, ...]`; where bool `[b, pos]`; value broadcastable to act; only `heads` (dim 2) if given."""
    w = where.view(*where.shape, *([1] * (act.dim() - 2))).to(act.dtype)
    if heads is not None:
        w = w * _head_mask(heads, act.shape[2], act.device, act.dtype, what).view(1, 1, -1, *([1] * (act.dim() - 3)))
    return act * (1 - w) + value * w


def _sites(sites, what: str) -> list[str]:
    return checks.nonempty(sites, f"{what}: sites")


def _heads(heads, what: str) -> list[int] | None:
    """None (every head) or a non-empty list (its range is checked against the model by `check`)."""
    return None if heads is None else checks.nonempty(heads, f"{what}: heads", none_ok=True)


def _head_mask(heads, n_heads: int, device, dtype, what: str) -> Tensor:
    """`[n_heads]` with 1 at `heads` (a clear error, not an IndexError, for a head the run lacks)."""
    checks.indices(heads, n_heads, f"{what}: head(s)", "heads", valid=f"the activations have {n_heads} heads (0..{n_heads - 1})")
    keep = torch.zeros(n_heads, dtype=dtype, device=device)
    keep[list(heads)] = 1
    return keep


def patch_from_cache(cache, sites, positions=None, heads: Sequence[int] | None = None,
                     rows: Sequence[int] | None = None) -> Intervention:
    """Write `cache[site]` (an ActivationCache or dict, batch 1 or the run's batch) into the run at
    `positions` (None: all; a Selection, bool mask or int positions) of every site (hook names);
    `heads` restricts a `hook_z` site to those heads. Positions are the prompt's: under `model.generate`
    the edit acts on the prompt's run and the generated tokens run unedited.

        iv = patch_from_cache(cache, ["blocks.2.hook_resid_pre"], positions=tm.select("audio"))  # cache: the clean run's
        logits = model.run_with_hooks(**corrupted, fwd_hooks=iv.check(model))
        logits[0, -1].softmax(-1)[answer]
    """
    names = _sites(sites, "patch_from_cache")
    missing = [n for n in names if n not in cache]
    if missing:
        raise KeyError(f"patch_from_cache: the cache has no {missing}; cache those hooks in the source run")
    heads = _heads(heads, "patch_from_cache")
    params = {"sites": names, "positions": positions_label(positions, "patch_from_cache"), "heads": heads}

    def make(rows):
        def fn(act: Tensor, hook) -> Tensor:
            window = _window(positions, act, rows, "patch_from_cache")
            if window is None:  # a generated token: no prompt position
                return act
            start, where = window
            src = cache[hook.name].to(act.device, act.dtype)
            if src.shape[2:] != act.shape[2:] or src.shape[1] != start + act.shape[1]:
                raise ValueError(f"patch_from_cache at {hook.name}: cached shape {tuple(src.shape)} does not match the run's {tuple(act.shape)}; clean and corrupted layouts must match")
            src = src[:, start:]
            src = src if src.shape[0] in (1, act.shape[0]) else batch_rows(src, act.shape[0], None, "patch_from_cache")
            return _write(act, where, src, heads, f"patch_from_cache at {hook.name}")

        return [(n, _starting(fn, positions, n)) for n in names]

    layers = tuple(sorted({l for n in names for l in layer_of(n)}))
    iv = Intervention([Part("patch_from_cache", params, make, layers, heads=tuple(heads or ()))])
    return iv if rows is None else iv.on_rows(rows)


def ablate(sites, mode: str = "zero", positions=None, reference=None, heads: Sequence[int] | None = None,
           seed: int = 0, rows: Sequence[int] | None = None) -> Intervention:
    """Replace activations at `positions`: `zero`; `mean` (the mean of `reference[site]` over its batch
    rows and positions, one vector per site); `resample` (row `seed`-chosen of `reference[site]`, same
    positions). `reference` is an ActivationCache or dict of the reference runs. Positions (None: all) are the
    prompt's: under `model.generate` the edit acts on the prompt's run and the generated tokens run unedited.

        iv = ablate(["blocks.1.hook_resid_pre"], "zero", positions=tm.select("audio"))
        iv += ablate(["blocks.2.attn.hook_z"], "mean", reference=cache, heads=[0, 1])  # heads 0, 1 at their mean over `cache`
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    if mode not in ("zero", "mean", "resample"):
        raise ValueError(f"ablate: mode must be 'zero', 'mean' or 'resample', got {mode!r}")
    names = _sites(sites, "ablate")
    if mode != "zero" and reference is None:
        raise ValueError(f"ablate(mode={mode!r}) needs reference= (a cache of reference runs)")
    heads = _heads(heads, "ablate")
    params = {"sites": names, "mode": mode, "positions": positions_label(positions, "ablate"), "heads": heads}
    pick = int(torch.randint(0, 1 << 30, (1,), generator=torch.Generator().manual_seed(seed)))

    def value(name: str, act: Tensor, start: int) -> Tensor:
        if mode == "zero":
            return torch.zeros((), dtype=act.dtype, device=act.device)
        ref = reference[name].to(act.device, act.dtype)
        if mode == "mean":
            return ref.mean(dim=(0, 1), keepdim=True)
        if ref.shape[2:] != act.shape[2:] or ref.shape[1] != start + act.shape[1]:
            raise ValueError(f"ablate(resample) at {name}: reference {tuple(ref.shape)} vs run {tuple(act.shape)}; layouts must match")
        return ref[pick % ref.shape[0]][None, start:]

    def make(rows):
        def fn(act: Tensor, hook) -> Tensor:
            window = _window(positions, act, rows, "ablate")
            if window is None:  # a generated token: no prompt position
                return act
            start, where = window
            return _write(act, where, value(hook.name, act, start), heads, f"ablate at {hook.name}")

        return [(n, _starting(fn, positions, n)) for n in names]

    layers = tuple(sorted({l for n in names for l in layer_of(n)}))
    iv = Intervention([Part("ablate", params, make, layers, heads=tuple(heads or ()))])
    return iv if rows is None else iv.on_rows(rows)


def add_noise(site: str, positions, std: float, seed: int = 0, rows: Sequence[int] | None = None) -> Intervention:
    """Add Gaussian noise of `std` (activation units) at `positions` of `site` (ROME's corruption on
    `hook_embed`). The noise is drawn once from `seed` (`[pos, d]`, CPU generator) so the same seed
    gives the same noise in any batch layout. Under `model.generate` the noise is on the prompt's run; the
    generated tokens run without it (they used to get position 0's noise).

        iv = add_noise("hook_embed", tm.select("audio"), std=0.5, seed=0)  # ROME's corruption
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    checks.finite(std, "add_noise: std", minimum=0)
    params = {"site": site, "positions": positions_label(positions, "add_noise"), "std": float(std), "seed": seed}
    drawn: dict = {}

    def make(rows):
        def fn(act: Tensor, hook) -> Tensor:
            window = _window(positions, act, rows, "add_noise")
            if window is None:  # a generated token: no prompt position
                return act
            start, where = window
            shape = (start + act.shape[1], *act.shape[2:])  # the whole prompt's noise, whatever part runs
            if shape not in drawn:
                g = torch.Generator().manual_seed(seed)
                drawn[shape] = torch.randn(shape, generator=g) * std
            noise = drawn[shape][start:].to(act.device, act.dtype)[None]
            return act + noise * where.view(*where.shape, *([1] * (act.dim() - 2))).to(act.dtype)

        return [(site, _starting(fn, positions, site))]

    iv = Intervention([Part("add_noise", params, make, layer_of(site))])
    return iv if rows is None else iv.on_rows(rows)
