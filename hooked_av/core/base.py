"""`HookedAVModel`: the TransformerLens root module every model family subclasses."""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from hooked_av.core.devices import as_device
from hooked_av.core.hook_names import sae_site
from hooked_av.core.sae import SAESplicing
from hooked_av.core.hook_names import flag_of, position_major
from hooked_av.core.tl_compat import AVActivationCache, TransformerLensCompat


class HookShapeError(ValueError):
    """A hook function returned something other than a tensor of the shape, dtype and device it received."""


class HookNotEnabledError(ValueError, AssertionError):
    """A hook point that runs only while a TransformerLens flag is on was named while it is off (an
    AssertionError too, as TransformerLens raises one)."""


class HookedAVModel(SAESplicing, TransformerLensCompat, HookedRootModule):
    """Base class: hook names (and `names_filter`s) checked before any work, hook functions checked
    for the shape, dtype and device they return, an `ActivationCache` that knows which activations
    are batch-major returned by `run_with_cache`, SAEs spliced as SAELens splices them (`add_sae`,
    `hooked_av.core.sae`). Subclasses build their modules, then call `self.setup()`."""

    def blocks_count(self) -> int:
        return len(getattr(self, "blocks", []))

    # ---- hook names -------------------------------------------------------------------------
    def _unknown_hook_message(self, name: str) -> str:
        site = sae_site(name)
        if site is not None and site not in self.acts_to_saes:
            spliced = sorted(self.acts_to_saes) or "no hook"
            return (f"hook {name!r} does not exist: no SAE is spliced at {site!r} (SAEs are spliced at {spliced}); "
                    "splice one there first (model.add_sae(sae) or `with model.saes(sae):`)")
        m = re.match(r"^(?:(\w+)\.)?blocks\.(\d+)\.", name)
        if m:
            prefix = m.group(1)
            owner = getattr(self, prefix, None) if prefix else self
            n = len(getattr(owner, "blocks", [])) if owner is not None else 0
            layer = int(m.group(2))
            if owner is not None and layer >= n:
                where = f"{prefix}." if prefix else ""
                return (
                    f"hook {name!r} does not exist; the {where or 'language model '}has {n} blocks "
                    f"(0..{n - 1})"
                )
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
        hint = f"; did you mean {close}?" if close else "; see model.hook_dict for every name"
        return f"hook {name!r} does not exist{hint}"

    def check_hook_name(self, name: str | Callable) -> None:
        """A name must exist and a filter function must match at least one hook point: either
        mistake would otherwise run the model untouched (or cache nothing) without a word."""
        if isinstance(name, str):
            if name not in self.hook_dict:
                raise KeyError(self._unknown_hook_message(name))
            flag = flag_of(name)
            if not self.hook_enabled(name):
                raise HookNotEnabledError(f"hook {name!r} runs only while cfg.{flag} is on (it would never fire): call "
                                          f"model.set_{flag}(True) first")
        elif callable(name):
            if not any(name(n) for n in self.hook_dict):
                raise KeyError(
                    f"the filter function {getattr(name, '__name__', name)!r} matches no hook point; "
                    "see model.hook_dict for every name"
                )
        else:
            raise TypeError(f"a hook name must be a string or a filter function, got {type(name).__name__}")

    def check_names_filter(self, names_filter) -> None:
        """`run_with_cache`'s `names_filter` (None, a name, a list of names or a filter function)."""
        if names_filter is None:
            return
        for name in [names_filter] if isinstance(names_filter, str) or callable(names_filter) else names_filter:
            self.check_hook_name(name)

    @staticmethod
    def _shape_checked(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def checked(tensor: Tensor, hook: HookPoint):
            out = fn(tensor, hook=hook)
            if out is not None and isinstance(tensor, Tensor):
                who = f"hook function {getattr(fn, '__name__', fn)!r} on {hook.name!r}"
                if not isinstance(out, Tensor):
                    raise HookShapeError(
                        f"{who} returned {type(out).__name__}; return a tensor of shape {tuple(tensor.shape)} or None"
                    )
                if out.shape != tensor.shape:
                    raise HookShapeError(
                        f"{who} returned shape {tuple(out.shape)}; it must return the shape it received, "
                        f"{tuple(tensor.shape)} (or None to keep the activation)"
                    )
                # the next op would silently cast (a bool mask, a truncated int residual) or fail far away
                if out.dtype != tensor.dtype or out.device != tensor.device:
                    got = [f"dtype {out.dtype}"] * (out.dtype != tensor.dtype) + [f"device {out.device}"] * (out.device != tensor.device)
                    raise HookShapeError(
                        f"{who} returned {' and '.join(got)}; it must return the dtype and device it received, "
                        f"{tensor.dtype} on {tensor.device} (return `new.to(tensor)`, or None to keep the activation)"
                    )
            return out

        return checked

    def _enable_hook(self, name, hook, dir):
        self.check_hook_name(name)
        super()._enable_hook(name, self._shaped(hook, dir), dir)

    def _shaped(self, hook, dir):
        return self._shaped_bwd(hook) if dir == "bwd" else self._shape_checked(hook)

    @staticmethod
    def _shaped_bwd(fn: Callable) -> Callable:
        return fn  # gradients arrive as tuples in some torch versions; TransformerLens unwraps them

    def check_and_add_hook(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        super().check_and_add_hook(
            hook_point, hook_point_name, self._shaped(hook, dir), dir=dir, is_permanent=is_permanent,
            level=level, prepend=prepend,
        )

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        self.check_hook_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    @contextmanager
    def hooks(self, fwd_hooks=[], bwd_hooks=[], reset_hooks_end=True, clear_contexts=False):
        # read once (a generator is empty the second time), then validate every name before adding
        # any, so a typo adds nothing and leaks nothing
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        for name, _ in fwd_hooks + bwd_hooks:
            self.check_hook_name(name)
        with super().hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as m:
            yield m

    def hook_enabled(self, name: str) -> bool:
        """Whether hook point `name` can run: False for a flag-gated point (`hook_result`, `hook_q_input`, ...)
        whose flag is off."""
        flag = flag_of(name)
        return not flag or bool(getattr(self.cfg, flag, False))

    def get_caching_hooks(self, names_filter=None, *args, **kwargs):
        self.check_names_filter(names_filter)
        cache, fwd, bwd = super().get_caching_hooks(names_filter, *args, **kwargs)
        # a filter function (or none: everything) leaves out the points whose flag is off; they never run
        return cache, [h for h in fwd if self.hook_enabled(h[0])], [h for h in bwd if self.hook_enabled(h[0])]

    def add_caching_hooks(self, names_filter=None, *args, **kwargs):
        self.check_names_filter(names_filter)
        return super().add_caching_hooks(names_filter, *args, **kwargs)

    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, pos_slice=None, **kwargs: Any):
        """Run the model and return `(output, cache)`; the cache is a TransformerLens `ActivationCache`
        (its analysis methods read `model.cfg`, `model.blocks`, `model.ln_final`) that slices and
        drops the batch dimension of the language model's activations only (see `AVActivationCache`).
        `incl_bwd=True` (TransformerLens's) backpropagates the output, which must be one number
        (`return_type="loss"`), and caches every point's gradient as `name + "_grad"`, with gradients enabled
        even inside `torch.no_grad()`. `pos_slice` keeps those positions of the language model's prompt
        positions (`[batch, pos, ...]` activations; the query axis of patterns, scores and masks); the towers'
        activations are kept whole. `device`: where the cache is kept (checked before the run: one that does
        not exist here, or "meta", whose tensors hold no values, is refused).

            loss, cache = model.run_with_cache("what colour is the shape ?", return_type="loss", incl_bwd=True)
            cache["blocks.0.hook_resid_pre_grad"]          # d loss / d resid_pre, [batch, pos, d_model]
        """
        if kwargs.get("device") is not None:
            kwargs["device"] = as_device(kwargs["device"])
            if kwargs["device"].type == "meta":
                raise ValueError("run_with_cache(device='meta') would keep a cache of tensors without values; name a "
                                 "device that holds data ('cpu', 'cuda', ...) or leave device out (each activation "
                                 "stays where it was computed)")
        if remove_batch_dim:
            first = next((t for t in (*model_args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                          if isinstance(t, Tensor)), None)
            if first is not None and first.shape[0] != 1:
                raise ValueError(f"remove_batch_dim=True needs a batch of 1, got {first.shape[0]}; "
                                 "run one sample or keep the batch dimension")
        if incl_bwd and (kwargs.get("return_type") != "loss" or kwargs.get("loss_per_token")):
            raise ValueError("incl_bwd=True backpropagates the model's output, which must be one number: pass "
                             "return_type='loss' (or run_with_hooks with bwd_hooks and call backward on your own metric)")
        with torch.enable_grad() if incl_bwd else contextlib.nullcontext():
            out, cache_dict = super().run_with_cache(*model_args, incl_bwd=incl_bwd, **kwargs)
        if pos_slice is not None:
            cache_dict = {k: slice_positions(k, v, pos_slice) for k, v in cache_dict.items()}
        cache = AVActivationCache(cache_dict, self)
        if remove_batch_dim:
            cache.remove_batch_dim()
        return (out, cache) if return_cache_object else (out, cache.cache_dict)

    @contextmanager
    def frozen(self):
        """Inside, no parameter requires grad (each is restored on exit, even after an error): a backward then
        reaches activations alone (backward hooks, an input that requires grad) and builds no graph for the
        weights, as the library's gradient methods need (`patching.attribution_patching`).

            with model.frozen(), torch.enable_grad():
                ...
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        try:
            for p in trainable:
                p.requires_grad_(False)
            yield self
        finally:
            for p in trainable:
                p.requires_grad_(True)

    # ---- device / dtype ---------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)  # .to(), .cuda(), .half(), ...
        self.sync_cfg()
        return out

    def sync_cfg(self) -> None:
        """`cfg.device` and `cfg.dtype` as the model's own (TransformerLens code reads `cfg.device`)."""
        cfg = getattr(self, "cfg", None)
        if cfg is not None and next(self.parameters(), None) is not None:
            cfg.device, cfg.dtype = self.device, self.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device for a model placed by a device map, else the
        device of the weights."""
        if getattr(self, "hf_device_map", None) is not None:
            from hooked_av.core.placement import execution_device

            return execution_device(self.embed) or execution_device(self.blocks[0])
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def slice_positions(name: str, t: Tensor, pos_slice) -> Tensor:
    """A cached activation with TransformerLens's `pos_slice` applied to its prompt positions: dim 1 of the
    language model's position-major points, the query axis (dim 2) of its patterns, scores and masks; the
    towers' and experts' activations unchanged."""
    try:
        from transformer_lens.utilities import Slice
    except ImportError:  # pragma: no cover - older layouts
        from transformer_lens.utils import Slice
    base = name.removesuffix("_grad")
    if not base.startswith(("hook_embed", "blocks.", "ln_final.")) or ".mlp.experts." in base:
        return t
    return Slice.unwrap(pos_slice).apply(t, dim=1 if position_major(base) else 2)
