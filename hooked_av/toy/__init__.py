"""The embedded, trained toy audio-visual model (Qwen2.5-Omni Thinker architecture, ~1M parameters)
and the synthetic task it was trained on.

    model = hooked_av.toy.load()                      # HookedQwen2_5Omni, tokenizer at model.tokenizer
    bank = hooked_av.toy.make_clips(500, seed=123)    # fresh clips (the training run used seeds 0 and 1)
    batch = hooked_av.toy.collate(bank, hooked_av.toy.draw_samples(bank, 64, seed=7), model.tokenizer)
    acc = (model(**batch.inputs)[:, -1].argmax(-1) == batch.answers).float().mean()

Retrain with `python -m hooked_av.toy.train`: one command runs the shipped weights' three stages
(2200 steps at lr 2e-3, then 1500 at 1e-3 and 1500 at 5e-4, each continuing the last). The shipped
weights came from those stages on one thread (25 minutes on shared cores; held-out accuracy 1.00 on
every kind, `weights/train_report.json`). Training is sensitive to thread count and seed: a rerun
on two threads (21.9 minutes) ended at visual 0.76, auditory 1.00, audio-visual 1.00, two-clip 0.84.
"""

from __future__ import annotations

from pathlib import Path
from types import MethodType

import torch

from hooked_av.toy.clips import ClipBank, make_clips
from hooked_av.toy.data import Batch, Sample, collate, draw_samples, prompt_text
from hooked_av.toy.prepare import prepare
from hooked_av.toy.tokenizer import build_tokenizer, token_ids
from hooked_av.toy.vocab import KINDS

__all__ = [
    "Batch", "ClipBank", "KINDS", "Sample", "TOYS", "build_tokenizer", "collate", "draw_samples", "load", "make_batch",
    "make_clips", "prompt_text", "token_ids", "weights_dir",
]

# the shipped toys, name -> weights folder: the same task and data, two trained models (docs/toy.md).
# "toy": 4 layers, the media read straight at the answer position; "toy-flow": 8 layers, trained so
# the question's words gather from the media and the last position reads the question
# (`train.RECIPES` holds how each was trained)
TOYS = {"toy": "weights", "toy-flow": "weights_flow"}


def weights_dir(name: str = "toy") -> Path:
    """The package-data folder of the shipped toy `name` (`TOYS`): config.json, model.safetensors,
    tokenizer files and train_report.json."""
    if name not in TOYS:
        raise ValueError(f"no shipped toy named {name!r}; the toys are {list(TOYS)}")
    return Path(__file__).resolve().parent / TOYS[name]


def load(name: str = "toy", dtype: torch.dtype = torch.float32, device=None):
    """The shipped toy `name` (`TOYS`: "toy" or "toy-flow") as a `HookedQwen2_5Omni` (eval mode), its
    tokenizer at `model.tokenizer` and `model.prepare` building the toy's training format from media
    (`toy.prepare.prepare`)."""
    from hooked_av.families.qwen2_5_omni import HookedQwen2_5Omni

    if not isinstance(name, str):  # toy.load(torch.float64) meant dtype=
        raise TypeError(f"toy.load's first argument is the toy's name ({list(TOYS)}), got {name!r}; pass dtype= by keyword")
    folder = weights_dir(name)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no trained toy model in {folder}; the package data is missing (reinstall hooked-av) "
            f"or train one with `python -m hooked_av.toy.train --toy {name}`"
        )
    model = HookedQwen2_5Omni.from_pretrained(folder, dtype=dtype, device=device)
    if model.tokenizer is None:
        raise FileNotFoundError(f"{folder} has no tokenizer files; retrain with `python -m hooked_av.toy.train --toy {name}`")
    model.prepare = MethodType(prepare, model)  # the toy's own format, not Omni's prompt (toy/prepare.py)
    return model


def make_batch(n: int, seed: int, tokenizer, n_clips: int = 400, kinds: tuple[str, ...] = KINDS) -> Batch:
    """`n` fresh samples over a fresh bank of `n_clips` clips, both deterministic in `seed`."""
    bank = make_clips(n_clips, seed=seed)
    return collate(bank, draw_samples(bank, n, seed=seed + 1, kinds=kinds), tokenizer)
