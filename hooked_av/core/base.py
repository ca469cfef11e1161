"""`HookedAVModel`: the TransformerLens root module every model family subclasses."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from hooked_av.core.tl_compat import TransformerLensCompat


class HookShapeError(ValueError):
    pass


class HookedAVModel(TransformerLensCompat, HookedRootModule):
    """Base class: hook-name validation, shape-checked hook functions, an `ActivationCache`
    returned by `run_with_cache`. Subclasses build their modules, then call `self.setup()`."""

    def blocks_count(self) -> int:
        return len(getattr(self, "blocks", []))

    # ---- hook names -------------------------------------------------------------------------
    def _unknown_hook_message(self, name: str) -> str:
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
        if isinstance(name, str) and name not in self.hook_dict:
            raise KeyError(self._unknown_hook_message(name))
        if not isinstance(name, str) and not callable(name):
            raise TypeError(f"a hook name must be a string or a filter function, got {type(name).__name__}")

    @staticmethod
    def _shape_checked(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def checked(tensor: Tensor, hook: HookPoint):
            out = fn(tensor, hook=hook)
            if out is not None and isinstance(tensor, Tensor):
                if not isinstance(out, Tensor):
                    raise HookShapeError(
                        f"hook function {getattr(fn, '__name__', fn)!r} on {hook.name!r} returned "
                        f"{type(out).__name__}; return a tensor of shape {tuple(tensor.shape)} or None"
                    )
                if out.shape != tensor.shape:
                    raise HookShapeError(
                        f"hook function {getattr(fn, '__name__', fn)!r} on {hook.name!r} returned shape "
                        f"{tuple(out.shape)}; it must return the shape it received, {tuple(tensor.shape)} "
                        "(or None to keep the activation)"
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
        # validate every name before adding any, so a typo adds nothing and leaks nothing
        for name, _ in list(fwd_hooks) + list(bwd_hooks):
            self.check_hook_name(name)
        with super().hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as m:
            yield m

    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, **kwargs: Any):
        """Run the model and return `(output, cache)`; the cache is a TransformerLens
        `ActivationCache` (its analysis methods read `model.cfg`, `model.blocks`, `model.ln_final`)."""
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        if return_cache_object:
            return out, ActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))
        return out, cache_dict

    # ---- device / dtype ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
