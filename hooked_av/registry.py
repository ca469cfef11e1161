"""`hooked_av.load(name_or_path)`: any supported model from a hub id, a local checkpoint folder or
a shipped toy ("toy", "toy-flow"), its family picked from config.json (`hooked_av.families.FAMILIES`, each with `matches`, read at each
call: a family registered after import is found)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hooked_av.core import checkpoint
from hooked_av import families



def _toy(name_or_path) -> str | None:
    """The shipped toy's name when `name_or_path` names one, else None."""
    from hooked_av.toy import TOYS

    return str(name_or_path) if str(name_or_path) in TOYS else None


def folder(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint folder: a shipped toy's for its name ("toy", "toy-flow"), else a local folder or a
    downloaded hub id."""
    if _toy(name_or_path):
        from hooked_av import toy

        return toy.weights_dir(_toy(name_or_path))
    return checkpoint.resolve(name_or_path)


def family(config: dict, name_or_path: str | os.PathLike = "this checkpoint"):
    """The family package whose `matches(config)` holds; none is a ValueError listing the known ones."""
    found = [f for f in families.FAMILIES if f.matches(config)]
    if not found:
        how = "; ".join(f"{f.NAME}: {f.RECOGNISED_BY}" for f in families.FAMILIES)
        raise ValueError(
            f"{name_or_path}: model_type {config.get('model_type')!r} is not a supported family ({how}); pass a "
            "checkpoint of one of them"
        )
    return found[0]


def load(name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device=None, **kwargs):
    """The hooked model of a hub id, a local folder or a shipped toy ("toy", "toy-flow":
    `hooked_av.toy.load`), by its config's family; `kwargs` go to the family's `from_pretrained`
    (e.g. SALMONN's `position_mode`)."""
    if _toy(name_or_path):
        from hooked_av import toy

        if kwargs:
            raise ValueError(f"the toy model takes no {sorted(kwargs)}; it is loaded as trained")
        return toy.load(_toy(name_or_path), dtype=dtype, device=device)
    fam = family(checkpoint.read_config(folder(name_or_path)), name_or_path)
    return fam.MODEL.from_pretrained(name_or_path, dtype=dtype, device=device, **kwargs)


def inspect(name_or_path: str | os.PathLike):
    """`(family, tokenizer)` of a hub id, a local folder or a shipped toy, read from config.json and the
    tokenizer files without loading any weight: an unsupported checkpoint is refused here, before a
    caller spends a load on it; the tokenizer is None where the folder holds none.

        family, tokenizer = inspect("toy")
    """
    where = folder(name_or_path)
    return family(checkpoint.read_config(where), name_or_path), checkpoint.load_tokenizer(where)


def config(name_or_path: str | os.PathLike):
    """The `HookedAVConfig` (`model.cfg`: layers, widths, heads) of a hub id, a local folder or "toy",
    read from config.json and built on the meta device: no weight is read or allocated, so a caller can
    check settings against the model's shape before it spends a load.

        config("toy").n_layers  # 4
    """
    where = folder(name_or_path)
    fam = family(checkpoint.read_config(where), name_or_path)
    return fam.MODEL.from_config(fam.MODEL.read_checkpoint_config(where), device="meta").cfg


def skeleton(name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, **options):
    """The model of a hub id, a local folder or a shipped toy built on the meta device from its config, with its
    tokenizer and checkpoint folder, reading no weight: what needs no weight works (`cfg`, `prepare`,
    `token_map`, parameter counts), a forward does not. What a study's plan counts with before it loads.

        model = skeleton("toy")
        model.cfg.n_layers, sum(p.numel() for p in model.parameters())
    """
    where = folder(name_or_path)
    fam = family(checkpoint.read_config(where), name_or_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = fam.MODEL.from_config(fam.MODEL.read_checkpoint_config(where), dtype=dtype, device="meta", **options)
    model.tokenizer, model.checkpoint_folder = checkpoint.load_tokenizer(where), where
    if _toy(name_or_path):
        from types import MethodType

        from hooked_av.toy import prepare

        model.prepare = MethodType(prepare, model)  # the toy's own format, as toy.load sets it
    return model
