"""Reading checkpoints without running their code: safetensors first, `torch.load(weights_only=True)`
for old `.bin` files, never `trust_remote_code`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from hooked_av.core.devices import as_device, as_dtype  # checkpoint.as_device / as_dtype stay importable
from hooked_av.core.placement import dispatch

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


def read_json(f: Path) -> dict:
    """A JSON object from `f`; a damaged file is an error that names it."""
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the file is damaged or incomplete: download it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f} holds a JSON {type(data).__name__}, not an object; the file is not what its name says")
    return data


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder as a dict (with its `model_type`, when it has one)."""
    f = folder / "config.json"
    if not f.exists():
        held = sorted(p.name for p in folder.iterdir())
        if not held:
            raise FileNotFoundError(
                f"{folder} is an empty folder; pass the checkpoint folder (config.json, the weights and the tokenizer "
                "files) or a hub id"
            )
        raise FileNotFoundError(
            f"{folder} has no config.json (it holds {held[:8]}); pass the checkpoint folder itself, the one with "
            "config.json next to the weights"
        )
    return read_json(f)


def model_type(folder: Path, config: dict, expected: str) -> str:
    """The config's `model_type`; its absence is an error that says what the config should hold."""
    kind = config.get("model_type")
    if not kind:
        raise ValueError(f"{folder / 'config.json'} has no model_type; {expected}. Is it the config of these weights?")
    return kind


def weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map (key -> shard file); the file is damaged: download it again")
            shards = sorted(set(weight_map.values()))
            absent = [s for s in shards if not (folder / s).exists()]
            if absent:
                raise FileNotFoundError(
                    f"{index} lists {len(absent)} shard(s) that are not in {folder}, e.g. {absent[:3]}; "
                    "an interrupted download? download them again"
                )
            return [folder / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not found:
        raise FileNotFoundError(f"{folder} holds no *.safetensors or *.bin weights")
    return found


@contextmanager
def _reading(f: Path):
    """Any failure to read weight file `f` names it."""
    try:
        yield
    except Exception as e:
        raise ValueError(
            f"cannot read weight file {f} ({type(e).__name__}: {e}); the file is damaged, incomplete or not a plain "
            "tensor file: download it again"
        ) from e


def iter_tensors(files: Iterable[Path]) -> Iterable[tuple[str, Tensor]]:
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with _reading(f):
                st = safe_open(str(f), framework="pt")
                keys = list(st.keys())
            for k in keys:
                with _reading(f):
                    t = st.get_tensor(k)
                yield k, t
        else:
            with _reading(f):
                tensors = torch.load(f, map_location="cpu", weights_only=True)
            yield from tensors.items()


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
            if ours[name].is_floating_point() and not value.is_floating_point():
                raise ValueError(
                    f"{source}: weight {key!r} is {value.dtype}, but {name!r} is a floating-point weight; quantised "
                    "checkpoints are not supported: load the original (float16 / bfloat16 / float32) checkpoint"
                )
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
        _assign(model, name, nn.Parameter(value, requires_grad=value.is_floating_point()))  # trainable, as HF and TransformerLens load


def _assign(model: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, param)


def build_and_load(make: Callable[[], nn.Module], tensors, convert, source: str, dtype, device,
                   device_map=None, max_memory=None, offload_folder=None) -> nn.Module:
    """Construct a model on the meta device with `make()`, fill it from checkpoint `tensors`, tie the
    unembedding to the embedding when the configuration says so (the checkpoint then may lack
    it), move it to `device` (or place it by `device_map` through accelerate, see
    `hooked_av.core.placement`) and switch to eval mode. `dtype`, `device` and the placement arguments
    are checked before the first tensor is read (`tensors` may be a lazy `iter_tensors`)."""
    dtype, device = as_dtype(dtype), as_device(device)
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder apply to a device_map; pass device_map='auto' (or a dict)")
    if device_map is not None and device.type != "cpu":
        raise ValueError(f"pass device={device} or device_map={device_map!r}, not both (a device map places every module)")
    with torch.device("meta"):
        model = make()
    tied = model.cfg.tie_word_embeddings
    load_converted(model, tensors, convert, source, dtype, optional=lambda n: tied and n == "unembed.weight")
    if tied:
        model.unembed.weight = model.embed.weight
    if device_map is not None:
        return dispatch(model.eval(), device_map, max_memory, offload_folder, dtype).eval()
    return model.to(device).eval()


def load_tokenizer(folder: Path):
    """The tokenizer saved in a checkpoint folder, or None when there is none (never remote code)."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    how = "load a tokenizer yourself and set model.tokenizer = ... (or pass tokenizer= to prepare / token_map)"
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        if "trust_remote_code" in str(e):  # HF's advice is to run the checkpoint's code: we never do
            raise ValueError(
                f"the tokenizer in {folder} needs custom code, which hooked_av never runs; move its "
                f"tokenizer_config.json aside and {how}"
            ) from None
        raise ValueError(f"cannot load the tokenizer in {folder} ({type(e).__name__}: {e}); {how}") from e
