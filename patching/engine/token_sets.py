"""Token sets to restore or edit, named as the hub paper names them (`kaistmm/crossmodal-hub`,
`causal_tracing_modality_sink.py::build_layerlist`, replace modes all / sink / cross_modal_sink /
uni_modal_sink / random_sink_num): all media of a modality, its sinks, its cross-modal sinks, its
unimodal sinks, and a seeded random set of the same size from the same modality.

A `TokenSet` is resolved per sample (`tokens(tm, sample)` -> `Selection` over that sample's
positions), so one set serves every sample of a batch; `causal_tracing(tokens=[...])` takes them
beside TokenMap specs ("audio", "video[1]").

    res = find_sinks(model, inputs)
    sets = hub_sets(res, "audio")          # {"all": ..., "sink": ..., "cross_modal_sink": ..., ...}
    causal_tracing(model, inputs, tokens=list(sets.values()), ...)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hooked_av.inputs import Selection

KINDS = ("sink", "cross_modal_sink", "unimodal_sink")


@dataclass(frozen=True)
class TokenSet:
    """`label` names the set in results; `positions(tm, sample)` gives the positions (ints, in the
    sample's own coordinates: without its padding, as `patching.engine.sweep.samples` trims it) of sample
    `sample`, whose batch-1 TokenMap is `tm`."""

    label: str
    positions: Callable

    def __call__(self, tm, sample: int) -> Selection:
        """The set in sample `sample` as a batch-1 `Selection` over `tm`'s positions."""
        pos = [int(p) for p in self.positions(tm, sample)]
        bad = [p for p in pos if not 0 <= p < tm.seq_len]
        if bad:
            raise ValueError(f"token set {self.label!r}: positions {bad} do not exist in sample {sample} "
                             f"({tm.seq_len} positions); build the set from the same inputs")
        mask = torch.zeros(1, tm.seq_len, dtype=torch.bool)
        mask[0, pos] = True
        return Selection(mask, self.label)

    def __str__(self) -> str:
        return self.label


def media(modality: str) -> TokenSet:
    """All tokens of `modality` ("audio", "video", "image"; the hub's `all`)."""
    return TokenSet(modality, lambda tm, sample: tm.positions(modality, nonempty=False).tolist())


def sinks(result, modality: str, kind: str = "sink") -> TokenSet:
    """The sinks of `modality` in a `find_sinks` result: `kind` "sink" (all of them), "cross_modal_sink"
    or "unimodal_sink"."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    df = result.df[result.df.modality == modality]
    if kind != "sink":
        df = df[df.cross_modal == (kind == "cross_modal_sink")]
    by_sample = {int(s): part.pos.astype(int).tolist() for s, part in df.groupby("sample")}
    return TokenSet(f"{kind}({modality})", lambda tm, sample: by_sample.get(sample, []))


def random_like(reference: TokenSet, pool: str, seed: int = 0) -> TokenSet:
    """As many positions of `pool` as `reference` holds in each sample, drawn without replacement
    with Python's `random.Random(seed).sample` over the pool's ascending positions (the hub's
    `random.sample(base_indices, k)` with a fixed seed)."""

    def draw(tm, sample):
        k = len(reference.positions(tm, sample))
        choices = tm.positions(pool, nonempty=False).tolist()
        if k > len(choices):
            raise ValueError(f"random set like {reference.label!r}: {k} positions asked from {len(choices)} "
                             f"{pool!r} positions in sample {sample}; choose a larger pool")
        return random.Random(seed + sample).sample(choices, k)

    return TokenSet(f"random({pool}, like {reference.label}, seed {seed})", draw)


def hub_sets(result, modality: str, seed: int = 0) -> dict[str, TokenSet]:
    """The hub's five sets for `modality`: all, sink, cross_modal_sink, unimodal_sink and
    random_sink_num (a random set of the modality as large as its sinks)."""
    out = {"all": media(modality), **{k: sinks(result, modality, k) for k in KINDS}}
    out["random_sink_num"] = random_like(out["sink"], modality, seed)
    return out


def resolve(spec, tm, sample: int) -> Selection:
    """A TokenMap spec, `Selection` or `TokenSet` as a `Selection` over sample `sample`'s `tm`."""
    return spec(tm, sample) if isinstance(spec, TokenSet) else tm.select(spec)
