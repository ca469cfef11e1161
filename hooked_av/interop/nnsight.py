"""Our models inside nnsight: every hook point is a module whose `.output` a trace reads, saves and sets.

    from hooked_av.interop.nnsight import wrap
    av = wrap(model)                                   # an nnsight.NNsight of the HookedAVModel
    with torch.no_grad(), av.trace(**inputs, hooked="blocks.3.attn.hook_pattern"):
        pattern = av.blocks[3].attn.hook_pattern.output.save()            # [batch, head, q, k]
        av.blocks[1].attn.hook_attn_mask.output[:, :, -1, audio] = neg     # a knockout, before the softmax
        logits = av.output.save()

Some hook points only run when hooked, as in TransformerLens: `hook_pattern` and `hook_attn_scores`
exist on the exact attention path only, `hook_scale` is computed only when watched, `hook_attn_mask` is
materialised only where a mask is needed. nnsight cannot tell the model in advance what a trace will
read, so a trace names those points in `hooked=` (names, a list, or a filter function); the wrapper
attaches a no-op TransformerLens hook to each for the duration of the run, so the model takes exactly
the path `run_with_cache` takes for them. Every `attn.hook_attn_mask`, `hook_embed` and
`blocks.0.hook_resid_pre` are always hooked this way: each layer's mask point then sees its own copy
(an in-place edit stays in its layer, as with `run_with_hooks`) and an in-place edit of the embeddings
never reaches the caller's `encode()` outputs. Reading a conditional point a trace did not name is an
error that says what to pass.

nnsight is optional (`pip install hooked-av[nnsight]`); `require_nnsight` is the one place that says so.
"""

from __future__ import annotations

import functools
import re

from torch import Tensor

from hooked_av.core.hook_names import conditional, flag_of

INSTALL = "pip install hooked-av[nnsight]"
ALWAYS_HOOKED = ("hook_embed", "blocks.0.hook_resid_pre")
# points computed only when hooked: the exact attention path, the RMS denominator, the per-head result



def require_nnsight():
    """The `nnsight` module, or an ImportError that says how to install it."""
    try:
        import nnsight
    except ImportError as e:
        raise ImportError(f"this needs nnsight (>=0.8,<0.9), which is not installed; run `{INSTALL}`") from e
    return nnsight


def _observe(tensor, hook):
    return None  # a no-op hook: its presence makes a conditional point run


def hooked_points(model, hooked=None) -> list[str]:
    """The hook names a trace attaches no-op hooks to: every `attn.hook_attn_mask`, `hook_embed`,
    `blocks.0.hook_resid_pre`, and the names or filter function `hooked` (checked against the model)."""
    model.check_names_filter(hooked)
    if hooked is None:
        chosen = []
    elif callable(hooked):
        chosen = [n for n in model.hook_dict if hooked(n) and model.hook_enabled(n)]  # flag-gated points off: never run
    else:
        chosen = [hooked] if isinstance(hooked, str) else list(hooked)
    always = [n for n in model.hook_dict if n.endswith("attn.hook_attn_mask") or n in ALWAYS_HOOKED]
    return list(dict.fromkeys(always + chosen))


def wrap(model):
    """`model` (a `HookedAVModel`) as an `nnsight.NNsight` whose `trace(*inputs, hooked=None, **kwargs)`
    passes processor / `prepare` / `encode` outputs to `model.forward` unchanged. Attributes fall
    through to the model (`av.token_map(inputs)`, `av.cfg`). Hook points a model builds on first lookup
    (Qwen3-Omni's per-expert `mlp.experts.{e}.hook_in/hook_out`) are built here, since nnsight sees the
    module tree as it is when wrapped. A model whose device map offloads weights (to the CPU or disk) is
    refused: nnsight's interleaving and accelerate's offload hooks do not run together (place it on
    devices only)."""
    from hooked_av.core.placement import offloaded

    if offloaded(model):
        raise ValueError(f"wrap() of a model whose device map offloads {offloaded(model)[:3]} is not supported: "
                         "nnsight's interleaving and accelerate's offload hooks do not run together; load it with a "
                         "device_map / max_memory that keeps every module on a device (or use run_with_hooks)")
    hook_dict = getattr(model, "hook_dict", {})
    for name in list(hook_dict):
        hook_dict[name]
    envoy = _envoy_class()(model)
    _check_set_values(envoy.interleaver, {f"{envoy.path}.{n}.output": n for n in hook_dict})
    return envoy


def _check_set_values(interleaver, points: dict[str, str]) -> None:
    """Make the trace refuse a value set on a hook point's `.output` that is not a tensor of the shape, dtype and
    device it replaces (as `run_with_hooks` refuses such a hook's return), naming the point: a broadcastable
    shape or another dtype would run on, silently or failing far from the line that set it."""
    from hooked_av.core.base import HookShapeError

    handle = interleaver.handle

    def checked(provider, value):
        out = handle(provider, value)
        name = points.get(provider)
        if name is not None and out is not value and isinstance(value, Tensor):
            what = f"the value set on {name}.output in the trace"
            if not isinstance(out, Tensor):
                raise HookShapeError(f"{what} is {type(out).__name__}; set a tensor of shape {tuple(value.shape)}")
            if out.shape != value.shape:
                raise HookShapeError(f"{what} has shape {tuple(out.shape)}; it must have the shape of the activation "
                                     f"it replaces, {tuple(value.shape)} (or edit .output in place)")
            if out.dtype != value.dtype or out.device != value.device:
                raise HookShapeError(f"{what} is {out.dtype} on {out.device}; it must be {value.dtype} on {value.device}, "
                                     "as the activation it replaces (set `new.to(old)`)")
        return out

    interleaver.handle = checked


@functools.cache
def _envoy_class():
    nnsight = require_nnsight()
    from nnsight.intervention.interleaver import OutOfOrderError

    class HookedNNsight(nnsight.NNsight):
        """`NNsight` for a `HookedAVModel`: conditional hook points named in `hooked=` run."""

        def trace(self, *args, hooked=None, **kwargs):
            names = hooked_points(self._module, hooked)  # checked here, before the block runs
            return super().trace(*args, fn=functools.partial(self._run_hooked, names), **kwargs)

        def _run_hooked(self, names, *args, **kwargs):
            with self._module.hooks(fwd_hooks=[(n, _observe) for n in names]):
                return self._module(*args, **kwargs)

        def interleave(self, fn, *args, **kwargs):
            try:
                return super().interleave(fn, *args, **kwargs)
            except OutOfOrderError as e:
                m = re.search(r"'model\.(\S+?)\.(output|input|inputs)\.i\d+'", str(e))
                name = m.group(1) if m else None
                if name is None or not conditional(name) or name not in self._module.hook_dict:
                    raise
                flag = flag_of(name)
                if flag:
                    raise OutOfOrderError(f"{name!r} did not run in this trace: it runs only while cfg.{flag} is on; "
                                          f"call model.set_{flag}(True) first (nnsight said: {e})") from e
                raise OutOfOrderError(
                    f"{name!r} did not run in this trace: it is computed only when hooked (patterns and scores "
                    f"on the exact attention path). Pass hooked={name!r} (or a list / filter function) to trace(); "
                    f"nnsight said: {e}"
                ) from e

    return HookedNNsight
