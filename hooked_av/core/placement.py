"""Placing a loaded model across devices through accelerate, as HF's `from_pretrained(device_map=...)` does:
each language-model block whole on one device (or offloaded to the CPU or disk and brought to its
execution device for its forward), each tower whole on one device. The layer loop
(`MRoPELanguageModel.run_language_model`) moves the residual stream, its mask and rotary angles to each
block's execution device (`model.block_devices`), so hooks, caches, interventions and sweeps see every
activation on the device its block ran on.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from hooked_av.core.devices import as_device

AUTO_MAPS = ("auto", "balanced", "sequential")


def _accelerate():
    try:
        import accelerate
    except ImportError:  # pragma: no cover - accelerate is a dependency; a broken install still says what to do
        raise ImportError("device_map needs accelerate: pip install accelerate") from None
    return accelerate


def _allowed_key(model: nn.Module, key: str) -> bool:
    """A device-map key names the whole model (""), one top-level module or one language-model block."""
    if key == "":
        return True
    if re.fullmatch(r"blocks\.\d+", key):
        return int(key.split(".")[1]) < len(model.blocks)
    return key in dict(model.named_children())


def _check_device(value, key: str):
    """A device-map value that exists on this machine: a GPU index, a device name, "cpu" or "disk"."""
    if value in ("cpu", "disk"):
        return value
    try:
        d = torch.device(f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else value)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type == "meta" or (isinstance(value, int) and value < 0):
        raise ValueError(f"device_map[{key!r}] = {value!r} is not a place for weights; use a GPU index (0, 1, ...), "
                         "'cuda:N', 'cpu' or 'disk'")
    try:
        as_device(d)
    except ValueError as e:
        raise ValueError(f"device_map[{key!r}] = {value!r}: {e}") from None
    return value


def check_device_map(model: nn.Module, device_map: dict) -> dict:
    """The map with its keys and devices checked: every key names the whole model, a top-level module
    (a tower, `embed`, `ln_final`, `unembed`, `blocks`) or one block `blocks.N`; every parameter is placed."""
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"device_map must be one of {list(AUTO_MAPS)} or a non-empty dict of module name -> device, "
                         f"got {device_map!r}")
    bad = [k for k in device_map if not isinstance(k, str) or not _allowed_key(model, k)]
    if bad:
        raise ValueError(
            f"device_map keys {bad[:5]} are not places hooked_av can split at; name the whole model (''), a top-level "
            f"module ({sorted(dict(model.named_children()))}) or one block 'blocks.N' (0..{len(model.blocks) - 1}): "
            "a block or a tower runs whole on one device")
    out = {k: _check_device(v, k) for k, v in device_map.items()}
    keys = sorted(out, key=len, reverse=True)
    unplaced = [n for n, _ in model.named_parameters() if not any(k == "" or n == k or n.startswith(k + ".") for k in keys)]
    if unplaced:
        raise ValueError(f"device_map places no device for {len(unplaced)} weight(s), e.g. {unplaced[:3]}; "
                         "name their modules (or '' for the rest)")
    return out


def whole_module_classes(model: nn.Module) -> list[str]:
    """Class names of the modules that run whole on one device: a language-model block and each tower
    (a top-level module with weights other than the embedding, blocks, final norm and unembedding)."""
    return sorted({type(model.blocks[0]).__name__} | {type(m).__name__ for n, m in model.named_children()
                                                      if n not in ("blocks", "embed", "ln_final", "unembed")
                                                      and any(True for _ in m.parameters())})


def explicit(model: nn.Module, device_map: dict) -> dict:
    """The same placement naming each weighted top-level module or block itself: "" (the rest) expanded,
    `blocks` expanded to `blocks.N`, modules without weights (hook points) left out (accelerate would look
    for their offloaded weights), a module whose weights are all tied to an earlier one's (a tied
    unembedding) placed with it, as accelerate does."""
    def covered(name):
        return any(name == k or name.startswith(k + ".") for k in device_map if k)

    out, placed = {}, {}
    units = [u for n, m in model.named_children()
             for u in ([(f"blocks.{i}", b) for i, b in enumerate(model.blocks)] if n == "blocks" else [(n, m)])]
    for name, mod in units:
        params = list(mod.parameters())
        if not params:
            continue
        if all(id(p) in placed for p in params):  # tied weights (the unembedding) stay with their first module
            out[name] = placed[id(params[0])]
            continue
        key = next((k for k in (name, "blocks") if k in device_map and (k == name or name.startswith(k + "."))), None)
        if key is not None:
            out[name] = device_map[key]
        elif "" in device_map and not covered(name):
            out[name] = device_map[""]
        placed.update({id(p): out.get(name) for p in params})
    return out


def infer_map(model: nn.Module, device_map: str, max_memory: dict | None, dtype) -> dict:
    """accelerate's map for "auto" / "balanced" (memory balanced over the GPUs, as HF) or "sequential",
    with blocks and towers kept whole."""
    acc = _accelerate()
    from accelerate.utils import get_balanced_memory

    no_split = whole_module_classes(model)
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=False)
    return dict(acc.infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype))


def execution_device(module: nn.Module) -> torch.device | None:
    """Where `module` computes: its accelerate hook's execution device, else its first real weight's device."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def dispatch(model: nn.Module, device_map, max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
             dtype=None) -> nn.Module:
    """Place `model` (weights loaded, on the CPU) by `device_map` ("auto", "balanced", "sequential" or a dict
    of module name -> GPU index / "cuda:N" / "cpu" / "disk"); "disk" needs `offload_folder`, in
    which each load writes and reads its own fresh subfolder (removed when the model is freed). Sets
    `model.hf_device_map` (as HF) and `model.block_devices` (each block's execution device, read by the
    layer loop)."""
    acc = _accelerate()
    inferred = isinstance(device_map, str)  # "auto" may or may not need the offload folder it was given
    if isinstance(device_map, str):
        if device_map not in AUTO_MAPS:
            raise ValueError(f"device_map={device_map!r}: use one of {list(AUTO_MAPS)} or a dict of module -> device")
        device_map = infer_map(model, device_map, max_memory, dtype)
    elif max_memory is not None:
        raise ValueError("max_memory applies to device_map='auto' / 'balanced' / 'sequential'; an explicit map places "
                         "every module itself: drop max_memory or pass device_map='auto'")
    device_map = check_device_map(model, device_map)
    asked_disk = "disk" in device_map.values()
    device_map = explicit(model, device_map)
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("the device map offloads weights to 'disk'; pass offload_folder= (a folder for the offloaded "
                         "weights) or give the devices more max_memory")
    if "disk" not in device_map.values():
        if offload_folder is not None and not inferred and not asked_disk:
            raise ValueError("offload_folder is given but the device map offloads nothing to 'disk'; drop it, or "
                             "place some modules on 'disk'")
        offload_folder = None  # nothing goes there (accelerate would look for an index in it)
    else:
        offload_folder = own_offload_dir(model, offload_folder)
    main = next((v for v in device_map.values() if v not in ("cpu", "disk")), "cpu")
    # an offloaded block or tower loads all its weights for its forward: some modules read a child's
    # weight instead of calling it (the vision patch embedding, position tables)
    acc.dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_folder,
                       preload_module_classes=whole_module_classes(model))
    model.hf_device_map = device_map
    model.block_devices = [execution_device(b) for b in model.blocks]
    if any(d is None for d in model.block_devices):
        raise RuntimeError("a block has no execution device after placement; this is a bug: report the device_map")
    return model


def own_offload_dir(model: nn.Module, folder: str | os.PathLike) -> str:
    """A fresh subfolder of `folder` that this load alone writes and reads, removed when `model` is freed (or at
    exit). accelerate trusts an `index.json` already in the folder it is given and writes nothing: a second
    checkpoint placed with the same folder ran its offloaded blocks on the first one's weights."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"offload_folder={str(folder)!r} is a file; name a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        own = tempfile.mkdtemp(prefix="hooked_av-offload-", dir=folder)
    except OSError as e:
        raise ValueError(f"offload_folder={str(folder)!r} cannot hold the offloaded weights ({e.strerror}); "
                         "name a writable folder") from None
    weakref.finalize(model, shutil.rmtree, own, True)
    return own


def _offload_hook(module: nn.Module):
    """The accelerate hook that offloads `module`'s weights (None when they stay resident)."""
    hook = getattr(module, "_hf_hook", None)
    return next((h for h in getattr(hook, "hooks", None) or [hook] if getattr(h, "offload", False)), None)


def offloaded(model: nn.Module) -> list[str]:
    """The names of the model's modules (blocks, towers, ...) whose weights a device map offloaded."""
    if getattr(model, "hf_device_map", None) is None:
        return []
    return [n for n, m in model.named_modules() if _offload_hook(m) is not None]


@contextmanager
def resident(model: nn.Module, *modules: nn.Module) -> Iterator[None]:
    """Inside, the weights of `modules` (a block, a tower, `embed`, ... or any module within one) sit on their
    execution device even where the device map offloaded them (to the CPU or disk); outside, accelerate keeps
    them on the meta device between forwards. A model placed whole, or modules not offloaded: nothing to do.
    For analyses that read weights without calling their module (the weight views, logit lens, DLA)."""
    loaded = []
    if getattr(model, "hf_device_map", None) is not None:
        units = [u for n, m in model.named_children() for u in (list(model.blocks) if n == "blocks" else [m])]
        for mod in modules:
            for unit in units:
                hook = _offload_hook(unit)
                if hook is not None and all(u is not unit for _, u in loaded) and (
                        unit is mod or any(m is mod for m in unit.modules()) or any(m is unit for m in mod.modules())):
                    hook.pre_forward(unit)
                    loaded.append((hook, unit))
    try:
        yield
    finally:
        for hook, unit in reversed(loaded):
            hook.post_forward(unit, None)


def resident_weight(model: nn.Module, module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.<name>`, a copy loaded from the offload store where the device map offloaded it (the tensor
    itself otherwise)."""
    t = getattr(module, name)
    if t is None or t.device.type != "meta" or getattr(model, "hf_device_map", None) is None:
        return t
    with resident(model, module):
        return getattr(module, name).detach().clone()
