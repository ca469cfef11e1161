"""What an SAE's features do over a harvested store: per feature, how often it fires, how high, and on
which modality its activation mass falls; for the features a view shows, the top-activating tokens and
the histogram of the activations where it fires. Two streaming passes over the store's shards, a chunk
of tokens at a time (memory: one chunk's `[tokens, d_sae]` features, never the store):

    pass 1, every feature:  n_firing (activation > 0), max, mass per modality (sum of activations)
    pass 2, shown features: the top-k tokens (ties: the earlier token in store order), and counts of the
                            firing activations in `bins` equal bins over (0, max] per modality

    stats = feature_stats(sae, "runs/acts", top_k=8)
    stats.table            # one row per feature (all d_sae): frequency, max, shares, group
    stats.top              # the shown features' top tokens with their metadata
    stats.counts[f]["audio"], stats.edges[f]

A feature's group is the modality that holds at least `threshold` of its activation mass, else "mixed";
"dead" if it never fires in the store. The share is of mass, so it carries the store's base rates (a
store with 5x more audio than video tokens gives a feature firing alike on both an audio share of 0.83).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from patching.datasets.activations import ActivationStore

MODALITIES = ("audio", "video", "image", "text")  # the harvest's modality column
N_FEATURES = 24  # features shown when none are named
CHUNK_ELEMENTS = 1 << 24  # features per encoded chunk (tokens x d_sae): 64 MB in float32


@dataclass
class FeatureStats:
    """The numbers behind a feature view. `table`: one row per feature (`feature`, `n_firing`,
    `frequency` = n_firing / n_tokens, `max`, `mean_firing` (mean activation where it fires), `mass`
    (sum of activations), `share_{modality}` (of the mass; NaN for a dead feature), `group`);
    `features`: the shown ones; `top`: their top tokens (`feature`, `rank` from 0, `activation`,
    `token`: the index in store order, then the token's metadata); `edges[f]` `[bins + 1]` and
    `counts[f][m]` `[bins]` (m a modality or "all"): the histogram of f's firing activations."""

    hook: str
    n_tokens: int
    n_samples: int
    tokens: dict[str, int]  # tokens per modality in the store
    threshold: float
    table: pd.DataFrame
    features: list[int]
    top: pd.DataFrame
    edges: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


def feature_stats(sae, store, hook: str | None = None, *, features=None, n_features: int | None = None, top_k: int = 8,
                  bins: int = 30, threshold: float = 0.8, progress: bool = False) -> FeatureStats:
    """Stream `store` (an `ActivationStore` or its folder) through `sae` (a `sae_lens.SAE`, or anything
    with `encode(x [n, d_in]) -> [n, d_sae]` and `cfg.d_sae`) at `hook` (default: the SAE's
    `cfg.metadata.hook_name`, else the store's only hook) and return a `FeatureStats`. `features`: the
    feature indices to show, else the `n_features` (default 24) alive features of largest activation mass;
    `top_k` tokens each; `bins` histogram bins; `threshold` in (0.5, 1]: the mass share that names a
    feature's modality.

        out = harvest(model, manifest, ["blocks.1.hook_resid_post"], tmp / "acts", groups="media", progress=False)
        from sae_lens import StandardSAE, StandardSAEConfig
        stats = feature_stats(StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=16)), out, top_k=3)
        stats.table[["feature", "frequency", "max", "share_audio", "share_video", "group"]]
    """
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    hook = resolve_hook(sae, store, hook)
    d_sae = int(sae.cfg.d_sae)
    if features is not None and n_features is not None:
        raise ValueError(f"features={features!r} names the features to show and n_features={n_features!r} asks for the "
                         "largest ones: give one of them")
    n_features = N_FEATURES if n_features is None else n_features
    for value, name in ((top_k, "top_k"), (bins, "bins"), (n_features, "n_features")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(threshold, (int, float)) and 0.5 < threshold <= 1):
        raise ValueError(f"threshold must be a mass share in (0.5, 1] (one modality at most can hold it), got {threshold!r}")
    if features is not None:
        features = [features] if isinstance(features, (int, np.integer)) else list(features)
        bad = [f for f in features if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < d_sae]
        if bad or not features:
            raise ValueError(f"features {bad or features} are not feature indices of this SAE (0..{d_sae - 1})")
        if len(set(features)) != len(features):
            raise ValueError(f"features {features} name a feature twice")
        features = [int(f) for f in features]
    if not store.shards:
        raise ValueError(f"{store.folder} holds no complete shard; harvest into it first")

    sizes = [_n_rows(s) for s in store.shards]
    offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    n_tokens = int(sum(sizes))
    n_firing = torch.zeros(d_sae, dtype=torch.int64)
    peak = torch.zeros(d_sae)
    mass = {m: torch.zeros(d_sae, dtype=torch.float64) for m in MODALITIES}
    tokens = dict.fromkeys(MODALITIES, 0)
    for _, acts, mods in _chunks(sae, store, hook, progress, "features (pass 1)"):
        pos = acts.clamp(min=0)
        n_firing += (pos > 0).sum(0)
        peak = torch.maximum(peak, pos.max(0).values)
        for m in MODALITIES:
            sel = torch.from_numpy(mods == m)
            if bool(sel.any()):
                mass[m] += pos[sel].sum(0, dtype=torch.float64)
                tokens[m] += int(sel.sum())
    table = _table(n_firing, peak, mass, n_tokens, threshold)
    if features is None:
        alive = table[table["n_firing"] > 0]
        features = alive.sort_values(["mass", "feature"], ascending=[False, True])["feature"].head(n_features).tolist()
        if not features:
            warnings.warn(f"no feature of the SAE fires on any of the {n_tokens} tokens at {hook}", stacklevel=2)

    edges = {f: np.linspace(0.0, float(peak[f]), bins + 1) for f in features if float(peak[f]) > 0}
    counts = {f: {m: np.zeros(bins, dtype=np.int64) for m in ("all", *MODALITIES)} for f in edges}
    best = {f: (np.zeros(0, np.float32), np.zeros(0, np.int64)) for f in features}
    cols = torch.tensor(features, dtype=torch.long)
    for first, acts, mods in _chunks(sae, store, hook, progress and bool(features), "features (pass 2)"):
        sub = acts[:, cols].numpy()
        index = first + np.arange(len(sub))
        for j, f in enumerate(features):
            v = sub[:, j]
            if f in edges:
                fire = v > 0
                vv = np.minimum(v, edges[f][-1])  # the same encode gives the same max; never drop one past it
                counts[f]["all"] += np.histogram(vv[fire], edges[f])[0]
                for m in MODALITIES:
                    counts[f][m] += np.histogram(vv[fire & (mods == m)], edges[f])[0]
            best[f] = _merge_top(best[f], v, index, top_k)
    top = _top_rows(store, best, offsets, sizes)
    n_samples = len(store.samples(["id"])) or int(store.metadata()["id"].nunique())
    return FeatureStats(hook, n_tokens, n_samples, tokens, float(threshold), table, list(features), top, edges, counts)


def _chunks(sae, store: ActivationStore, hook: str, progress: bool, desc: str):
    """`(first, features [m, d_sae] float32 on the CPU, modality [m])` per chunk of tokens in store order
    (`first`: the chunk's first token's index in that order); a shard is read a chunk at a time
    (`safe_open(...).get_slice`)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    p = next(iter(sae.parameters()), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    step = max(1, CHUNK_ELEMENTS // int(sae.cfg.d_sae))
    first = 0
    for k in tqdm(range(len(store.shards)), desc=desc, unit="shard", disable=not progress):
        stem = store.shards[k]
        mods = pd.read_parquet(stem.with_suffix(".parquet"), columns=["modality"])["modality"].to_numpy()
        unknown = sorted(set(mods) - set(MODALITIES))
        if unknown:
            raise ValueError(f"{stem}.parquet has modality value(s) {unknown}; a harvest writes {list(MODALITIES)}")
        with safe_open(str(stem.with_suffix(".safetensors")), "pt") as fh:
            part = fh.get_slice(hook)
            n = part.get_shape()[0]
            if n != len(mods):
                raise ValueError(f"{stem}: {n} activations of {hook} for {len(mods)} metadata rows; the shard is damaged")
            for a in range(0, n, step):
                x = part[a:a + step].to(device=device, dtype=dtype)
                with torch.no_grad():
                    f = sae.encode(x).float().cpu()
                yield first + a, f, mods[a:a + step]
        first += n


def _merge_top(best: tuple[np.ndarray, np.ndarray], v: np.ndarray, index: np.ndarray, k: int):
    """The `k` largest firing values of `best` and `v` (ties: the smaller store index), as (values, index)."""
    fire = v > 0
    if fire.sum() > k:  # only values at or above the chunk's k-th largest can enter
        kth = np.partition(v[fire], -k)[-k]
        fire &= v >= kth
    vals = np.concatenate([best[0], v[fire]])
    idx = np.concatenate([best[1], index[fire]])
    order = np.lexsort((idx, -vals.astype(np.float64)))[:k]
    return vals[order], idx[order]


def _top_rows(store: ActivationStore, best: dict, offsets: np.ndarray, sizes: list[int]) -> pd.DataFrame:
    """The top tokens' rows: feature, rank, activation, token, then their metadata (read shard by shard)."""
    rows = [dict(feature=f, rank=r, activation=float(v), token=int(i)) for f, (vals, idx) in best.items()
            for r, (v, i) in enumerate(zip(vals, idx))]
    if not rows:
        return pd.DataFrame(columns=["feature", "rank", "activation", "token", "shard", "index"])
    top = pd.DataFrame(rows)
    top["shard"] = np.searchsorted(offsets, top["token"].to_numpy(), side="right") - 1
    top["index"] = top["token"].to_numpy() - offsets[top["shard"].to_numpy()]
    parts = []
    for k, part in top.groupby("shard", sort=True):
        meta = pd.read_parquet(store.shards[int(k)].with_suffix(".parquet"))
        parts.append(pd.concat([part.reset_index(drop=True), meta.iloc[part["index"].to_numpy()].reset_index(drop=True)], axis=1))
    return pd.concat(parts, ignore_index=True).sort_values(["feature", "rank"], key=_feature_order(list(best))).reset_index(drop=True)


def _feature_order(features: list[int]):
    place = {f: i for i, f in enumerate(features)}
    return lambda col: col.map(place) if col.name == "feature" else col


def _table(n_firing, peak, mass, n_tokens: int, threshold: float) -> pd.DataFrame:
    total = sum(mass.values())
    n = n_firing.numpy()
    table = pd.DataFrame({"feature": np.arange(len(n)), "n_firing": n, "frequency": n / max(n_tokens, 1),
                          "max": peak.numpy().astype(np.float64), "mass": total.numpy()})
    table["mean_firing"] = np.where(n > 0, table["mass"] / np.maximum(n, 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        for m in MODALITIES:
            table[f"share_{m}"] = np.where(n > 0, mass[m].numpy() / total.numpy(), math.nan)
    shares = table[[f"share_{m}" for m in MODALITIES]].to_numpy()
    lead = np.nan_to_num(shares, nan=-1).argmax(1)
    table["group"] = np.where(n == 0, "dead", np.where(shares[np.arange(len(n)), lead] >= threshold,
                                                       np.asarray(MODALITIES)[lead], "mixed"))
    return table


def resolve_hook(sae, store: ActivationStore, hook: str | None) -> str:
    """The store's hook the SAE reads: `hook`, else the SAE's `cfg.metadata.hook_name`, else the store's only
    hook; refused when the store lacks it or its width is not the SAE's `d_in`."""
    named = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
    if not hasattr(sae, "encode") or not hasattr(getattr(sae, "cfg", None), "d_sae"):
        raise TypeError(f"sae must be a sae_lens.SAE (encode(x) and cfg.d_sae); got {type(sae).__name__}")
    if hook is None:
        if named is not None:
            hook = named
        elif len(store.hooks) == 1:
            hook = store.hooks[0]
        else:
            raise ValueError(f"the SAE names no hook (cfg.metadata.hook_name) and the store holds {store.hooks}; pass hook=")
    elif named is not None and named != hook:
        warnings.warn(f"hook={hook!r} is read although the SAE was trained at {named!r} (cfg.metadata.hook_name)",
                      stacklevel=3)
    if hook not in store.hooks:
        raise ValueError(f"the store {store.folder} holds {store.hooks}, not {hook!r}"
                         + (" (the SAE's cfg.metadata.hook_name)" if hook == named else "")
                         + "; harvest that hook, or pass hook= one of the store's")
    d_in = getattr(sae.cfg, "d_in", None)
    if d_in is not None and int(d_in) != int(store.d[hook]):
        raise ValueError(f"the SAE reads d_in={d_in} but {hook} in the store is {store.d[hook]} wide; use the SAE "
                         "trained on this model's hook")
    return hook


def _n_rows(stem: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(stem.with_suffix(".parquet")).metadata.num_rows
