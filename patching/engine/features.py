"""Feature interventions: edits of the features of an SAE spliced at a hook (`model.add_sae`), on chosen
token positions, as composable `Intervention`s.

Each edits `{hook}.hook_sae_acts_post` (the features, `[batch, pos, d_sae]`) of the SAE spliced at `hook`:
`ablate_features` (to 0), `scale_features` (times a factor), `steer_features` (plus a value, in the
feature's activation units: the output moves by value x its decoder row) and `patch_features` (the
values of another run's cache). With the SAE's error term kept (`use_error_term=True`) the rest of the
activation is kept, so only the edit changes the forward.

Positions: None (every position of every run: the prompt's and, under `model.generate`, each generated
token's), a `Selection` (`tm.select("audio")`, `tm.select("video", item=1)`, `tm.select("audio", time=(1.0,
2.5))`) or a bool mask `[batch | 1, pos]` over the prompt's positions. Tokens `model.generate` appends
are edited where `generated=True` (a Selection or mask covers the prompt only). In a sweep
(`patching.engine.sweep.run_rows`) an edit at positions recomputes from its first edited position on.

    with model.saes(sae, use_error_term=True):
        iv = ablate_features(hook, [12, 40], positions=tm.select("audio")) + block_attention(tm, "video", "last", [3])
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hooked_av.inputs import Selection
from hooked_av.utils import layer_of, position_major
from patching.engine import checks
from patching.engine.hooks import _OFFSET, _starting, positions_label
from patching.engine.intervention import Intervention, Part, batch_rows

FEATURES = "hook_sae_acts_post"
UNHOOKED = ("matching_pursuit",)  # SAELens architectures whose encode fires no point


def token_group(tm, name) -> Selection:
    """The positions of a token group: "text" (every position that is neither media nor padding: system,
    template, question, ... and the last), or any TokenMap spec ("audio", "video", "media", "video[1]", ...).

        token_group(tm, "text").mask.sum()       # the prompt's text tokens
    """
    if name == "text":
        return Selection((tm.select("all") - tm.select("media")).mask, "text")
    return tm.select(name)


def _features(features, what: str) -> list[int]:
    out = checks.nonempty(features, f"{what}: features")
    return checks.indices(out, 1 << 62, f"{what}: feature(s)", "features", valid="features are indices >= 0")


def _prompt_mask(positions, what: str) -> Tensor | None:
    """bool `[b | 1, pos]` over the prompt, or None for every position."""
    if positions is None:
        return None
    t = torch.as_tensor(getattr(positions, "mask", positions))
    if t.dtype != torch.bool:
        raise ValueError(f"{what}: positions must be None (every position), a Selection (tm.select(...)) or a bool mask "
                         f"[batch, pos] over the prompt; got {t.dtype} values (int positions cannot tell the prompt's "
                         "length under model.generate: pass tm.select(...) or a mask)")
    return t if t.dim() == 2 else t[None]


def _feature_edit(op: str, hook: str, features, positions, generated, params: dict, edit, rows) -> Intervention:
    """The shared body: `edit(cols [b, q, f], feature index, start) -> new cols` at `hook`'s features."""
    if not isinstance(hook, str) or not position_major(hook):
        raise ValueError(f"{op}: hook must be the name of a position-major hook an SAE is spliced at (e.g. "
                         f"'blocks.2.hook_resid_post'), got {hook!r}")
    feats = _features(features, op)
    mask = _prompt_mask(positions, op)
    if generated is None:
        generated = mask is None
    elif mask is None and not generated:
        raise ValueError(f"{op}: positions=None edits every position, the generated ones included; pass tm.select('all') "
                         "for the prompt's positions only")
    generated = bool(generated)
    point = f"{hook}.{FEATURES}"
    params = {"hook": hook, "features": feats, **params, "positions": positions_label(positions, op),
              "generated": generated}
    n = None if mask is None else mask.shape[-1]

    def make(rows_):
        index = torch.tensor(feats)

        def fn(act: Tensor, hook) -> Tensor | None:
            b, q = act.shape[:2]
            start = _OFFSET.get()
            if mask is None:
                where = torch.ones(1, q, dtype=torch.bool, device=act.device)
            elif start + q == n:
                where = mask.to(act.device)[:, start:]
            elif start == 0 and q == 1 and n > 1:  # a step of model.generate: a token after the prompt
                if not generated:
                    return None
                where = torch.ones(1, 1, dtype=torch.bool, device=act.device)
            else:
                raise ValueError(f"{op} at {point}: positions over {n} prompt positions, but the run holds "
                                 f"{start + q}; build them from the map of the prompt that runs (a sweep's sample.tm)")
            where = batch_rows(where, b, rows_, op)[..., None]
            if not bool(where.any()):
                return None
            idx = index.to(act.device)
            cols = act[..., idx]
            out = act.clone()
            out[..., idx] = torch.where(where, edit(cols, idx, start), cols)
            return out

        return [(point, _starting(fn, None if mask is None else mask, point))]

    def check(model) -> None:
        sae = model.acts_to_saes.get(hook)
        if sae is None:
            model.check_hook_name(point)  # raises: no SAE is spliced there
        if sae.cfg.architecture() in UNHOOKED:
            raise ValueError(f"{op}: the {sae.cfg.architecture()} SAE at {hook!r} computes its features without passing "
                             f"them through {FEATURES} (SAELens's encode), so they cannot be edited there")
        checks.indices(feats, sae.cfg.d_sae, f"{op}: feature(s)", "features",
                       valid=f"the SAE at {hook!r} has {sae.cfg.d_sae} features (0..{sae.cfg.d_sae - 1})")

    iv = Intervention([Part(op, params, make, layer_of(hook), seq_len=n, check=check)])
    return iv if rows is None else iv.on_rows(rows)


def ablate_features(hook: str, features, positions=None, generated: bool | None = None,
                    rows: Sequence[int] | None = None) -> Intervention:
    """Set `features` of the SAE spliced at `hook` to 0 at `positions` (see the module: None, a Selection
    or a bool mask; `generated`: also on tokens `model.generate` appends).

        with model.saes(sae, use_error_term=True):
            iv = ablate_features(sae.cfg.metadata.hook_name, [0, 1], positions=tm.select("audio"))
            logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    return _feature_edit("ablate_features", hook, features, positions, generated, {},
                         lambda cols, idx, start: torch.zeros_like(cols), rows)


def scale_features(hook: str, features, factor: float, positions=None, generated: bool | None = None,
                   rows: Sequence[int] | None = None) -> Intervention:
    """Multiply `features` of the SAE spliced at `hook` by `factor` at `positions` (factor 0 ablates them).

        with model.saes(sae, use_error_term=True):
            iv = scale_features(sae.cfg.metadata.hook_name, [3], 4.0, positions=tm.select("video"))
            logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    checks.finite(factor, "scale_features: factor")
    return _feature_edit("scale_features", hook, features, positions, generated, {"factor": float(factor)},
                         lambda cols, idx, start: cols * factor, rows)


def steer_features(hook: str, features, value, positions=None, generated: bool | None = None,
                   rows: Sequence[int] | None = None) -> Intervention:
    """Add `value` (one number, or one per feature; the features' activation units) to `features` of the
    SAE spliced at `hook` at `positions`: with the error term kept, the activation moves by value x the
    feature's decoder row (its direction, `sae.W_dec[f]`, scaled by its norm where the SAE rescales).

        with model.saes(sae, use_error_term=True):
            iv = steer_features(sae.cfg.metadata.hook_name, [5], 8.0)   # every position, generated tokens too
            with model.hooks(fwd_hooks=iv.check(model)):
                new = model.generate(**inputs, max_new_tokens=2)
    """
    feats = checks.nonempty(features, "steer_features: features")
    v = torch.as_tensor(value, dtype=torch.float64).flatten()
    if v.numel() not in (1, len(feats)):
        raise ValueError(f"steer_features: value holds {v.numel()} numbers for {len(feats)} features; give one, or one per feature")
    checks.finite(v, "steer_features: value")
    shown = float(v[0]) if v.numel() == 1 else v.tolist()
    return _feature_edit("steer_features", hook, feats, positions, generated, {"value": shown},
                         lambda cols, idx, start: cols + v.to(cols.device, cols.dtype), rows)


def patch_features(cache, hook: str, features, positions=None, rows: Sequence[int] | None = None) -> Intervention:
    """Write `features` of the SAE spliced at `hook` from `cache` (an ActivationCache or dict holding
    `{hook}.hook_sae_acts_post` of a source run, batch 1 or the run's batch, the same prompt layout) at
    `positions` (None: every prompt position; generated tokens have no source and are left alone): the
    source's feature values at the same positions.

        with model.saes(sae, use_error_term=True):
            _, src = model.run_with_cache(**inputs)
            logits = model.run_with_hooks(**corrupted, fwd_hooks=patch_features(src, sae.cfg.metadata.hook_name, [0, 1]).check(model))
    """
    point = f"{hook}.{FEATURES}"
    if point not in cache:
        raise KeyError(f"patch_features: the cache has no {point!r}; run the source with the SAE spliced and cache it "
                       "(model.run_with_cache with the SAE spliced at that hook)")
    source = cache[point]
    if positions is None:  # the source's positions: a generated token has none to patch from
        positions = Selection(torch.ones(1, source.shape[1], dtype=torch.bool), "all")

    def edit(cols: Tensor, idx: Tensor, start: int) -> Tensor:
        src = source.to(cols.device, cols.dtype)
        if src.shape[1] != start + cols.shape[1] or src.shape[0] not in (1, cols.shape[0]):
            raise ValueError(f"patch_features at {point}: cached {tuple(src.shape)} does not match the run's "
                             f"{(cols.shape[0], start + cols.shape[1])} rows and positions; the source and the run must "
                             "share their layout")
        return src[:, start:][..., idx]

    return _feature_edit("patch_features", hook, features, positions, False, {}, edit, rows)
