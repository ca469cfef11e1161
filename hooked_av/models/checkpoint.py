"""Reading checkpoints without running their code: safetensors first, `torch.load(weights_only=True)`
for old `.bin` files, never `trust_remote_code`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config, weights, tokenizer files only)."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"{str(p)!r} is a file; pass the checkpoint folder that holds config.json")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=WEIGHT_PATTERNS))
    except Exception as e:  # offline, unknown repo, no permission
        raise OSError(
            f"could not find a local folder {str(name_or_path)!r} nor download it from the hub ({e}); "
            "pass the path of a folder with config.json and *.safetensors"
        ) from e


def read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{folder} has no config.json; is it a HF checkpoint folder?")
    return json.loads(f.read_text())


def weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not found:
        raise FileNotFoundError(f"{folder} holds no *.safetensors or *.bin weights")
    return found


def iter_tensors(files: Iterable[Path]) -> Iterable[tuple[str, Tensor]]:
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    yield k, st.get_tensor(k)
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True).items()


def apply_key_table(table, rest: str, t: Tensor) -> list[tuple[str, Tensor]] | None:
    """The first `(regex, replacement)` of `table` that matches the whole of `rest` renames it; None
    when nothing matches."""
    for pattern, target in table:
        if re.fullmatch(pattern, rest):
            return [(re.sub(f"^{pattern}$", target, rest), t)]
    return None


def load_converted(
    model: nn.Module,
    tensors: Iterable[tuple[str, Tensor]],
    convert: Callable[[str, Tensor], list[tuple[str, Tensor]] | None],
    source: str,
    dtype: torch.dtype | None = None,
    optional: Callable[[str], bool] = lambda name: False,
) -> None:
    """Map every source tensor to our names with `convert` (None = a key we ignore on purpose, e.g.
    the Talker's), check nothing is missing or unexpected, then assign the tensors to `model`
    (which may live on the meta device)."""
    ours = dict(model.named_parameters())
    state: dict[str, Tensor] = {}
    unexpected = []
    for key, t in tensors:
        mapped = convert(key, t)
        if mapped is None:
            continue
        for name, value in mapped:
            if name not in ours:
                unexpected.append(f"{key} (as {name})" if name != key else key)
                continue
            if tuple(value.shape) != tuple(ours[name].shape):
                raise ValueError(
                    f"{source}: weight {key!r} has shape {tuple(value.shape)} but the configuration "
                    f"expects {tuple(ours[name].shape)} for {name!r}; does config.json belong to these weights?"
                )
            state[name] = value
    missing = [n for n in ours if n not in state and not optional(n)]
    if unexpected:
        raise ValueError(
            f"{source}: {len(unexpected)} unexpected weight(s), e.g. {unexpected[:5]}; "
            "this checkpoint does not match the architecture (wrong model family or config?)"
        )
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} weight(s) missing, e.g. {missing[:5]}; "
            "the checkpoint is incomplete (an interrupted download or a missing shard?)"
        )
    for name in ours:
        if name not in state:  # optional, e.g. a tied unembedding
            continue
        value = state[name]
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        _assign(model, name, nn.Parameter(value, requires_grad=False))


def _assign(model: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, param)


def build_and_load(make: Callable[[], nn.Module], tensors, convert, source: str, dtype, device) -> nn.Module:
    """Construct a model on the meta device with `make()`, fill it from checkpoint `tensors`, tie the
    unembedding to the embedding when the configuration says so (the checkpoint then may lack
    it), move it to `device` and switch to eval mode."""
    with torch.device("meta"):
        model = make()
    tied = model.cfg.tie_word_embeddings
    load_converted(model, tensors, convert, source, dtype, optional=lambda n: tied and n == "unembed.weight")
    if tied:
        model.unembed.weight = model.embed.weight
    return model.to(device or "cpu").eval()


def load_tokenizer(folder: Path):
    """The tokenizer saved in a checkpoint folder, or None when there is none (never remote code)."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
