"""SAEs spliced into a model's hook points, as SAELens's `HookedSAETransformer.add_sae` splices them, so an
SAELens SAE (trained here or by anyone, any architecture) reads and writes our models' activations.

`model.add_sae(sae, hook_name=None, use_error_term=None)` puts `SAESplice` where the hook point `hook` was.
Hooks on `hook` itself still see the activation as the model made it (what the SAE reads); after them
the SAE runs and its points fire, named as SAELens names them, `[..., d_in]` or `[..., d_sae]` over the
hook's leading axes (`[batch, pos, ...]` in the language model):

    {hook}.hook_sae_input       what the SAE reads, in its dtype (a `hook_z` SAE's heads flattened)
    {hook}.hook_sae_acts_pre    the encoder's pre-activations            [..., d_sae]
    {hook}.hook_sae_acts_post   the features                             [..., d_sae]
    {hook}.hook_sae_recons      the reconstruction                       [..., d_in]
    {hook}.hook_sae_error       with the error term: the activation minus the reconstruction of the
                                unedited features (computed without the hooks above, as SAELens does)
    {hook}.hook_sae_output      what flows on, in the activation's dtype: the reconstruction (+ the error)

With the error term kept the model computes what it computes without the SAE (to float rounding) until a
hook edits a feature; without it the reconstruction replaces the activation. The SAE's weights are not
the model's parameters (`model.state_dict()`, `model.to()` leave them alone): put the SAE on the
activations' device yourself (`sae.to(device)`). SAELens is imported only here, when an SAE is used:
`pip install 'hooked-av[sae]'`.

    sae = load_sae("runs/sae")                                  # SAELens's folder: cfg.json + sae_weights.safetensors
    with model.saes(sae, use_error_term=True):
        logits, cache = model.run_with_cache(**inputs)          # cache[f"{hook}.hook_sae_acts_post"]: [batch, pos, d_sae]
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.hook_names import SAE_POINTS, conditional, sae_site

INSTALL = "pip install 'hooked-av[sae]' (sae-lens>=6.54,<7)"
_ENCODER_POINTS = SAE_POINTS[:4]  # the SAE's own points, fired inside its encode and decode
_OFF = nn.Identity()
# hooks whose activations are [..., d_model] (the others are checked on the first forward)
_D_MODEL = re.compile(r"(?:hook_embed|blocks\.\d+\.(?:hook_resid_(?:pre|mid|post)|hook_attn_out|hook_mlp_out|hook_injection|"
                      r"ln[12]\.hook_normalized)|ln_final\.hook_normalized)")
_SPLICED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()  # SAE -> where it is spliced


def sae_lens():
    """The `sae_lens` module, or an ImportError that says how to install it."""
    try:
        import sae_lens as module
    except ImportError as e:
        raise ImportError(f"SAEs need SAELens, which is not installed: {INSTALL}") from e
    return module


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | None = None):
    """An SAE in SAELens's on-disk format (a folder with `cfg.json` and `sae_weights.safetensors`, as SAELens's
    `save_model` / `save_inference_model` and `hooked-av sae train` write it; any architecture SAELens
    registers), loaded by `sae_lens.SAE.load_from_disk` onto `device` (in `dtype`, default the config's).

        sae = load_sae("runs/sae")     # sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such SAE folder; give the folder SAELens (or `hooked-av sae train --out`) wrote")
    missing = [f for f in ("cfg.json", "sae_weights.safetensors") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an SAE in SAELens's format: it lacks {missing}")
    return sae_lens().SAE.load_from_disk(str(folder), device=str(device), dtype=dtype)


class SAESplice(HookPoint):
    """The hook point of an activation with an SAE spliced after it (see the module). Its own hooks fire
    first, on the activation as the model made it; then the SAE's points. `sae`: the SAELens SAE;
    `original`: the plain hook point it replaced (put back by `model.reset_saes`)."""

    def __init__(self, original: HookPoint, sae, use_error_term: bool):
        super().__init__()
        # not submodules: the SAE's weights are not the model's, and its points are named after this one
        self.__dict__["sae"], self.__dict__["original"] = sae, original
        for name in _ENCODER_POINTS:
            setattr(self, name, getattr(sae, name))
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.use_error_term = bool(use_error_term)

    def __call__(self, x: Tensor) -> Tensor:
        return self.splice(super().__call__(x))  # this point's hooks, then the SAE

    def points(self) -> list[HookPoint]:
        return [self, *(getattr(self, n) for n in SAE_POINTS)]

    def splice(self, x: Tensor) -> Tensor:
        sae = self.sae
        if x.device != sae.device:
            raise ValueError(f"the SAE at {self.name!r} is on {sae.device} but the activation is on {x.device}; "
                             f"move it there (sae.to({str(x.device)!r})) before the forward")
        if x.shape[-1] != sae.cfg.d_in and sae.cfg.reshape_activations != "hook_z":
            raise ValueError(f"the SAE at {self.name!r} reads d_in={sae.cfg.d_in} but the activation is {tuple(x.shape)}; "
                             "splice it at a hook of that width")
        if not self.use_error_term:
            return self.hook_sae_output(sae.decode(sae.encode(x))).to(x.dtype)
        # the error is the unedited reconstruction's (SAELens's), so an edited feature is not undone by it; it is
        # recomputed only as far as hooks may have changed something: from the input where the input or the
        # pre-activations are hooked or a hook edited the features in place, from the features as they entered
        # their point where a hook replaced them or the reconstruction is hooked, not at all where every hook left
        # them as they were (caching)
        seen: dict = {}
        early = self.hook_sae_input.has_hooks(dir="fwd") or self.hook_sae_acts_pre.has_hooks(dir="fwd")
        point = self.hook_sae_acts_post
        handles = [] if early or not point.has_hooks(dir="fwd") else [
            point.register_forward_pre_hook(lambda m, args: seen.update(inp=args[0], version=args[0]._version)),
            point.register_forward_hook(lambda m, args, result: seen.update(out=result))]
        try:
            out = sae.decode(sae.encode(x))
        finally:
            for h in handles:
                h.remove()
        recons = self.hook_sae_recons.has_hooks(dir="fwd")
        with torch.no_grad():
            if early or ("inp" in seen and seen["inp"]._version != seen["version"]) or ("inp" not in seen and recons):
                with _points_off(sae):
                    clean = sae.decode(sae.encode(x))
            elif "inp" in seen and (seen["out"] is not seen["inp"] or recons):
                with _points_off(sae):
                    clean = sae.decode(seen["inp"])
            else:
                clean = out  # the same computation: nothing changed what it computes
            error = self.hook_sae_error(x - clean)
        return self.hook_sae_output(out + error).to(x.dtype)

    def __repr__(self) -> str:
        return (f"SAESplice({self.name!r}, {self.sae.cfg.architecture()} d_in={self.sae.cfg.d_in} "
                f"d_sae={self.sae.cfg.d_sae}, use_error_term={self.use_error_term})")


@contextmanager
def _points_off(sae) -> Iterator[None]:
    """The SAE's encoder and decoder points as identities (SAELens's `_disable_hooks`)."""
    kept = {n: getattr(sae, n) for n in _ENCODER_POINTS}
    try:
        for n in kept:
            setattr(sae, n, _OFF)
        yield
    finally:
        for n, point in kept.items():
            setattr(sae, n, point)


class SAESplicing:
    """SAELens's `HookedSAETransformer` API on a `HookedAVModel`: `add_sae`, `reset_saes`, `saes` (a context),
    `acts_to_saes`, `run_with_saes`, `run_with_cache_with_saes`."""

    def _splices(self) -> dict[str, SAESplice]:
        return self.__dict__.setdefault("_sae_splices", {})

    @property
    def acts_to_saes(self) -> dict:
        """`{hook name: SAE}` of the SAEs spliced now."""
        return {name: s.sae for name, s in self._splices().items()}

    def add_sae(self, sae, hook_name: str | None = None, use_error_term: bool | None = None):
        """Splice `sae` (an SAELens SAE, or the folder of one: `load_sae`) at `hook_name` (default the hook its
        metadata names, `sae.cfg.metadata.hook_name`), replacing any SAE already there, as SAELens's
        `HookedSAETransformer.add_sae` does. `use_error_term`: keep the reconstruction's error, so the
        forward is the plain one until a feature is edited (None: the SAE's own `use_error_term`, False
        unless set). Refused before anything changes: a hook the model lacks, a conditional point (masks,
        scores, patterns), another SAE's point, a transcoder, a per-head SAE, a width or device that does
        not match, an SAE spliced elsewhere, and a hook point that has hooks on it.

            model.add_sae(sae, use_error_term=True)            # at sae.cfg.metadata.hook_name
            model.reset_saes()
        """
        lens = sae_lens()
        if isinstance(sae, (str, os.PathLike)):
            sae = load_sae(sae, device=self.device)
        if not isinstance(sae, lens.SAE):
            raise TypeError(f"add_sae takes an SAELens SAE (sae_lens.SAE) or the folder of one, got {type(sae).__name__}")
        meta = sae.cfg.metadata
        hook = hook_name if hook_name is not None else meta.hook_name
        if not hook:
            raise ValueError("the SAE's metadata names no hook (cfg.metadata.hook_name); pass hook_name=")
        if meta.hook_name_out is not None and meta.hook_name_out != meta.hook_name:
            raise ValueError(f"a transcoder ({meta.hook_name} -> {meta.hook_name_out}) cannot be spliced here; "
                             "splice SAEs, which read and write one hook")
        if meta.hook_head_index is not None:
            raise ValueError(f"the SAE reads head {meta.hook_head_index} of {meta.hook_name} only; per-head SAEs are not "
                             "supported (train one on the whole hook_z)")
        self.check_hook_name(hook)
        if sae_site(hook) is not None:
            raise ValueError(f"{hook!r} is a point of the SAE spliced at {sae_site(hook)!r}; splice at a model hook")
        if conditional(hook):
            raise ValueError(f"{hook!r} is computed only when hooked (masks, scores, patterns, norm scales); splice SAEs "
                             "at activations the forward always computes (e.g. blocks.{l}.hook_resid_post)")
        where = _SPLICED.get(sae)
        if where is not None and not (where == hook and self._splices().get(hook) is not None
                                      and self._splices()[hook].sae is sae):
            raise ValueError(f"this SAE is already spliced at {where!r}; splice a copy (copy.deepcopy(sae)) or reset it first")
        current = self._splices().get(hook)
        point = current.original if current is not None else self.hook_dict[hook]
        if point.has_hooks() or (current is not None and any(p.has_hooks() for p in current.points())):
            raise ValueError(f"{hook!r} has hooks on it; splice SAEs before adding hooks there (or model.reset_hooks())")
        width = self.cfg.d_model if _D_MODEL.fullmatch(hook) else None
        if width is not None and sae.cfg.d_in != width:
            raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but {hook!r} holds d_model={width}")
        here = self._device_at(hook)
        if here is not None and here != sae.device:
            raise ValueError(f"the SAE is on {sae.device} but {hook!r} runs on {here}; move it there (sae.to({str(here)!r}))")
        if current is not None:
            self._unsplice(hook)
        splice = SAESplice(point, sae, sae.use_error_term if use_error_term is None else use_error_term)
        self._place(hook, splice)
        self._splices()[hook] = splice
        _SPLICED[sae] = hook
        self.setup()
        return self

    def reset_saes(self, hook_names: str | Sequence[str] | None = None) -> None:
        """Take out the SAEs at `hook_names` (default every one), putting the plain hook points back; the hooks
        on their points go with them. A name without an SAE is refused.

            model.reset_saes()                      # model.acts_to_saes == {}
        """
        names = list(self._splices()) if hook_names is None else [hook_names] if isinstance(hook_names, str) else list(hook_names)
        absent = [n for n in names if n not in self._splices()]
        if absent:
            raise KeyError(f"no SAE is spliced at {absent}; SAEs are spliced at {sorted(self._splices()) or 'no hook'}")
        for name in names:
            self._unsplice(name)
        self.setup()

    @contextmanager
    def saes(self, saes=(), hook_name: str | None = None, use_error_term: bool | None = None,
             reset_saes_end: bool = True):
        """Splice `saes` (one SAE or a list, each at its metadata's hook; `hook_name` for a single SAE) inside
        the block; on leaving it (an exception included) take them out and put back the SAEs they replaced.

            with model.saes(sae, use_error_term=True):
                logits = model(**inputs)
        """
        lens = sae_lens()
        many = [saes] if isinstance(saes, (lens.SAE, str, os.PathLike)) else list(saes)
        if hook_name is not None and len(many) != 1:
            raise ValueError(f"hook_name names the hook of one SAE; {len(many)} given (each uses its metadata's hook)")
        before: list[tuple[str, SAESplice | None]] = []
        try:
            for sae in many:
                sae = load_sae(sae, device=self.device) if isinstance(sae, (str, os.PathLike)) else sae
                hook = hook_name or getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
                prev = self._splices().get(hook) if hook else None
                self.add_sae(sae, hook_name=hook_name, use_error_term=use_error_term)
                before.append((hook, prev))
            yield self
        finally:
            if reset_saes_end:
                for hook, prev in reversed(before):
                    if hook in self._splices():
                        self._unsplice(hook)
                    if prev is not None:
                        self._place(hook, prev)
                        self._splices()[hook] = prev
                        _SPLICED[prev.sae] = hook
                self.setup()

    def run_with_saes(self, *args, saes=(), use_error_term: bool | None = None, **kwargs):
        """`model(*args, **kwargs)` with `saes` spliced for this forward only (SAELens's name).

            logits = model.run_with_saes(**inputs, saes=[sae], use_error_term=False)
        """
        with self.saes(saes, use_error_term=use_error_term):
            return self(*args, **kwargs)

    def run_with_cache_with_saes(self, *args, saes=(), use_error_term: bool | None = None, **kwargs):
        """`model.run_with_cache(*args, **kwargs)` with `saes` spliced for this forward only (SAELens's name).

            logits, cache = model.run_with_cache_with_saes(**inputs, saes=[sae], use_error_term=True)
        """
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_cache(*args, **kwargs)

    # ---- placing ---------------------------------------------------------------------------------
    def _place(self, hook: str, module: nn.Module) -> None:
        parent, _, leaf = hook.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, module)

    def _unsplice(self, hook: str) -> None:
        splice = self._splices().pop(hook)
        for point in splice.points():
            point.remove_hooks("both", including_permanent=True)
        for name in _ENCODER_POINTS:  # the SAE's own points get their own names back
            getattr(splice.sae, name).name = name
        self._place(hook, splice.original)
        _SPLICED.pop(splice.sae, None)

    def _device_at(self, hook: str) -> torch.device | None:
        """The device of the weights nearest above `hook` (None where they are offloaded or absent)."""
        parent = hook.rpartition(".")[0]
        while True:
            module = self.get_submodule(parent) if parent else self
            p = next(module.parameters(), None)
            if p is not None:
                return None if p.device.type == "meta" else p.device
            if not parent:
                return None
            parent = parent.rpartition(".")[0]
