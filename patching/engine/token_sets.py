"""Token sets to restore or edit, named as the hub paper names them (`kaistmm/crossmodal-hub`,
`causal_tracing_modality_sink.py::build_layerlist`, replace modes all / sink / cross_modal_sink /
uni_modal_sink / random_sink_num / object / object_random_sink_num): all media of a modality, its
sinks, its cross-modal sinks, its unimodal sinks, a seeded random set of the same size from the same
modality, the object's tokens (given, or the hub's audio blocks, `logic/object.py`) and a seeded
random set of the sinks' size drawn from them. A random draw larger than its pool is drawn with
replacement, as the hub's `random.choices` (repeats collapse: the set then holds fewer positions).

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
    `sample`, whose batch-1 TokenMap is `tm`. `seed`: the seed of a random set (None otherwise), which
    experiments record in their settings."""

    label: str
    positions: Callable
    seed: int | None = None

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
    if "layer" in result.df.columns:
        raise ValueError("this result holds per-layer sinks (find_sinks(select='layer')): a token set is one set "
                         "per sample; select one layer's rows first (result.df[result.df.layer == l]) or find the "
                         "sinks with another select=")
    df = result.df[result.df.modality == modality]
    if kind != "sink":
        df = df[df.cross_modal == (kind == "cross_modal_sink")]
    by_sample = {int(s): part.pos.astype(int).tolist() for s, part in df.groupby("sample")}
    return TokenSet(f"{kind}({modality})", lambda tm, sample: by_sample.get(sample, []))


def draw(pool: list[int], k: int, rng: random.Random) -> list[int]:
    """The hub's draw of `k` positions from `pool` (`build_layerlist`): `rng.sample` (without
    replacement) when `k <= len(pool)`, else `rng.choices` (with replacement, so repeats)."""
    return rng.sample(pool, k) if k <= len(pool) else rng.choices(pool, k=k)


def random_like(reference: TokenSet, pool, seed: int = 0) -> TokenSet:
    """As many positions of `pool` (a TokenMap spec or a `TokenSet`) as `reference` holds in each
    sample, drawn by `draw` with Python's `random.Random(seed + sample)` over the pool's ascending
    positions (the hub's `random.seed(seed)` then `random.sample(base_indices, k)`, or
    `random.choices(base_indices, k=k)` when k exceeds the pool: with replacement, so the set may
    hold fewer than k positions). An empty pool with k > 0 is refused.

        iv = random_like(sinks(find_sinks(model, inputs, ratio=8, tau=2.5), "audio"), "audio", seed=1)
        iv(tm, 0).mask.sum()  # as many audio positions as audio sinks (at most: drawn with replacement)
    """
    pool_label = pool.label if isinstance(pool, TokenSet) else str(pool)

    def positions(tm, sample):
        k = len(reference.positions(tm, sample))
        choices = sorted({int(p) for p in pool.positions(tm, sample)}) if isinstance(pool, TokenSet) \
            else tm.positions(pool, nonempty=False).tolist()
        if k and not choices:
            raise ValueError(f"random set like {reference.label!r}: {k} positions asked from an empty pool "
                             f"{pool_label!r} in sample {sample}; choose a pool that has positions there")
        return draw(choices, k, random.Random(seed + sample))

    return TokenSet(f"random({pool_label}, like {reference.label}, seed {seed})", positions, seed)


def objects(positions, label: str = "object") -> TokenSet:
    """The object's tokens, given per sample: `positions` maps a sample index to its positions (the
    hub's `object_token_list`: video tokens whose grid cell holds mask pixels, `get_object_token`, or
    the audio blocks that hold the sound, `get_object_token_audio`; see `audio_blocks`) or is a
    function `(tm, sample) -> positions`. A sample it does not name has no object tokens.

        objects({0: [10, 11, 12]})(tm, 0).mask.sum()  # 3 positions of sample 0
    """
    if callable(positions):
        return TokenSet(label, positions)
    table = {int(k): [int(p) for p in v] for k, v in dict(positions).items()}
    return TokenSet(label, lambda tm, sample: table.get(sample, []))


def audio_blocks(blocks, label: str = "object(audio)") -> TokenSet:
    """The hub's audio object tokens (`logic/object.py::get_object_token_audio`): the audio positions
    split into runs of consecutive positions (`utils_common.get_continuous_ranges`: with audio in
    video, one run per chunk between video chunks), and the runs numbered in `blocks` (its
    `important_blocks`, one list per sample: a mapping sample -> block numbers, or one list for every
    sample). A block number the sample lacks is refused.

        audio_blocks([0])(tm, 0).mask.sum()  # the first run of audio positions
    """
    table = dict(blocks) if isinstance(blocks, dict) else None
    every = None if table is not None else [int(b) for b in blocks]

    def positions(tm, sample):
        wanted = every if table is None else [int(b) for b in table.get(sample, [])]
        runs = continuous_runs(tm.positions("audio", nonempty=False).tolist())
        bad = [b for b in wanted if not 0 <= b < len(runs)]
        if bad:
            raise ValueError(f"{label}: block(s) {bad} do not exist in sample {sample}, which has {len(runs)} runs of "
                             f"audio positions (0..{len(runs) - 1})")
        return [p for b in wanted for p in range(runs[b][0], runs[b][1] + 1)]

    return TokenSet(label, positions)


def continuous_runs(positions: list[int]) -> list[tuple[int, int]]:
    """`[(first, last), ...]` of each run of consecutive positions in ascending `positions`."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return [(a, b) for a, b in runs]


def hub_sets(result, modality: str, seed: int = 0, objects: TokenSet | None = None) -> dict[str, TokenSet]:
    """The hub's sets for `modality`: all, sink, cross_modal_sink, unimodal_sink and random_sink_num
    (a random set of the modality as large as its sinks); with `objects` (the object's tokens of this
    modality, `objects` / `audio_blocks`) also object and object_random_sink_num (a random set of the
    object's tokens as large as the sinks).

        sets = hub_sets(find_sinks(model, inputs, ratio=8, tau=2.5), "audio", objects=audio_blocks([0]))
        list(sets)  # all, sink, cross_modal_sink, unimodal_sink, random_sink_num, object, object_random_sink_num
    """
    out = {"all": media(modality), **{k: sinks(result, modality, k) for k in KINDS}}
    out["random_sink_num"] = random_like(out["sink"], modality, seed)
    if objects is not None:
        out["object"] = objects
        out["object_random_sink_num"] = random_like(out["sink"], objects, seed)
    return out


def resolve(spec, tm, sample: int) -> Selection:
    """A TokenMap spec, `Selection` or `TokenSet` as a `Selection` over sample `sample`'s `tm`."""
    return spec(tm, sample) if isinstance(spec, TokenSet) else tm.select(spec)
