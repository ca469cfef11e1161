"""A store of harvested activations: one folder of fixed-size shards, each a safetensors file of
activations (one `[n_tokens, d]` tensor per hook name) and a parquet table of the same tokens' metadata
(one row per token, in the same order), plus `store.json` (what was harvested and how).

    DIR/store.json                       {"version", "hooks", "d": {hook: width}, "dtype", "shard_tokens", "settings"}
    DIR/shards/r{rank}-{k:05d}.safetensors   {hook: [n_tokens, d]}
    DIR/shards/r{rank}-{k:05d}.parquet       one row per token: `id` (the sample), `row` (its manifest index),
                                             `pos`, `group`, `item`, `modality`, `t_start`, `t_end` (seconds),
                                             `frame`, `patch_row`, `patch_col`, `chunk`, and any other column the
                                             harvester adds (e.g. `expert_l{l}`)
    DIR/samples/r{rank}-{k:05d}.parquet      one row per sample of that shard, when the writer was given one
                                             (`add(..., sample=)`: the harvest's media paths, question, ...);
                                             written before the shard's token parquet

A sample's tokens are never split across shards: a shard closes when the next sample would take it past
`shard_tokens` (a sample larger than that gets a shard of its own), so a shard whose parquet exists is
whole, and the samples in complete shards are done (`done_ids`): a resumed harvest skips them and a crash
loses at most the shards in flight. The token parquet is written after the safetensors (and the sample
table) and is the shard's done mark; each is written to a temporary name and renamed. Each rank of a data-parallel harvest writes its
own shards (`r{rank}-...`); the store is the union.

    writer = StoreWriter("runs/acts", {"blocks.2.hook_resid_post": 128}, shard_tokens=65536)
    writer.add({"blocks.2.hook_resid_post": acts}, meta)      # one sample: acts [n, 128], meta n rows
    writer.close()
    store = ActivationStore("runs/acts")
    for batch in store.batches("blocks.2.hook_resid_post", 4096, groups=["audio", "video"]):
        ...                                                   # [<= 4096, 128] float32, shuffled
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

VERSION = 1
META_COLUMNS = ("id", "row", "pos", "group", "item", "modality", "t_start", "t_end", "frame", "patch_row",
                "patch_col", "chunk")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_claim(folder, info: dict, whole: bool = False) -> None:
    """Refuse a `folder` that cannot take a store with `info` (store.json's fields, or some of them): a
    file, an unreadable store.json, or a store whose value of a key of `info` differs (`whole`: of any key,
    one only store.json has included). A folder without store.json passes (a writer claims it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; give a folder for the store")
    path = folder / "store.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete the folder or harvest into another") from None
    info = json.loads(json.dumps(info, default=str))
    diff = sorted(k for k in set(info) | (set(old) if whole else set()) if old.get(k) != info.get(k))
    if "settings" in diff and isinstance(old.get("settings"), dict) and isinstance(info.get("settings"), dict):
        a, b = old["settings"], info["settings"]  # name the settings that differ, not the whole record
        old = old | {f"settings.{k}": a.get(k) for k in set(a) | set(b)}
        info = info | {f"settings.{k}": b.get(k) for k in set(a) | set(b)}
        diff = sorted(set(diff) - {"settings"} | {f"settings.{k}" for k in set(a) | set(b) if a.get(k) != b.get(k)})
    if diff:
        raise ValueError(f"{folder} holds a store harvested with other settings ({', '.join(diff)} differ: "
                         f"{ {k: old.get(k) for k in diff} } there, { {k: info.get(k) for k in diff} } now); "
                         "use another folder, or the same settings to resume")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class StoreWriter:
    """Writes shards of at most `shard_tokens` tokens (whole samples) for `hooks` `{name: width}` into
    `folder`, as rank `rank`; `settings` (JSON-able: model, manifest, groups, ...) go into store.json
    and must equal an existing store's (a store is one harvest). Activations are kept as `dtype`."""

    def __init__(self, folder, hooks: dict[str, int], shard_tokens: int = 65536, dtype: str = "float32",
                 settings: dict | None = None, rank: int = 0):
        if not hooks:
            raise ValueError("a store needs at least one hook name")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: a store keeps one of {list(DTYPES)}")
        if int(shard_tokens) < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder, self.hooks, self.dtype, self.rank = Path(folder), dict(hooks), dtype, int(rank)
        self.shard_tokens = int(shard_tokens)
        info = {"version": VERSION, "hooks": list(self.hooks), "d": self.hooks, "dtype": dtype,
                "shard_tokens": self.shard_tokens, "settings": json.loads(json.dumps(settings or {}, default=str))}
        self._claim(info)
        (self.folder / "shards").mkdir(parents=True, exist_ok=True)
        mine = sorted((self.folder / "shards").glob(f"r{self.rank}-*.parquet"))
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in mine), default=-1)
        self._acts: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        self._meta: list[pd.DataFrame] = []
        self._samples: list[dict] = []
        self._n = 0

    def _claim(self, info: dict) -> None:
        path = self.folder / "store.json"
        check_claim(self.folder, info, whole=True)
        if path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda p: p.write_text(json.dumps(info, indent=2)))

    def add(self, acts: dict[str, Tensor], meta: pd.DataFrame, sample: dict | None = None) -> None:
        """One sample's tokens: `acts[hook]` `[n, width]` for every hook of the store, `meta` n rows with at
        least the `META_COLUMNS`; `sample`: the sample's row of the store's sample table (`id`, and anything
        JSON-able: media paths, question, ...), kept even when the sample has no token."""
        n = len(meta)
        missing = [c for c in META_COLUMNS if c not in meta.columns]
        if missing:
            raise ValueError(f"token metadata lacks column(s) {missing}")
        if set(acts) != set(self.hooks):
            raise ValueError(f"activations for {sorted(acts)}, but the store holds {sorted(self.hooks)}")
        for h, t in acts.items():
            if tuple(t.shape) != (n, self.hooks[h]):
                raise ValueError(f"{h}: activations {tuple(t.shape)} for {n} tokens of width {self.hooks[h]}")
        if sample is not None and "id" not in sample:
            raise ValueError(f"a sample's row needs its 'id'; got columns {sorted(sample)}")
        if self._meta and self._n + n > self.shard_tokens:
            self.flush()
        for h, t in acts.items():
            self._acts[h].append(t.detach().to("cpu", DTYPES[self.dtype]))
        self._meta.append(meta.reset_index(drop=True))
        if sample is not None:
            self._samples.append(dict(sample))
        self._n += n
        if self._n >= self.shard_tokens:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered samples as one shard (nothing when the buffer is empty); returns its parquet."""
        if not self._meta:
            return None
        from safetensors.torch import save_file

        stem = self.folder / "shards" / f"r{self.rank}-{self._next:05d}"
        tensors = {h: torch.cat(ts).contiguous() for h, ts in self._acts.items()}
        _atomic(stem.with_suffix(".safetensors"), lambda p: save_file(tensors, str(p)))
        if self._samples:
            (self.folder / "samples").mkdir(exist_ok=True)
            table = pd.DataFrame(self._samples)
            _atomic(self.folder / "samples" / f"{stem.name}.parquet", lambda p: table.to_parquet(p, index=False))
        meta = pd.concat(self._meta, ignore_index=True)
        _atomic(stem.with_suffix(".parquet"), lambda p: meta.to_parquet(p, index=False))  # the shard's done mark
        self._acts = {h: [] for h in self.hooks}
        self._meta, self._samples, self._n = [], [], 0
        self._next += 1
        return stem.with_suffix(".parquet")

    def close(self) -> None:
        self.flush()


class ActivationStore:
    """A harvested store (complete shards only; see the module)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / "store.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} is not an activation store (no store.json); harvest one first "
                                    "(hooked-av harvest ... --out FOLDER)")
        info = json.loads(path.read_text())
        if info.get("version") != VERSION:
            raise ValueError(f"{path}: store version {info.get('version')}, this hooked_av reads version {VERSION}")
        self.info = info
        self.hooks: list[str] = info["hooks"]
        self.d: dict[str, int] = info["d"]
        self.settings: dict = info.get("settings", {})
        self.shards = [p.with_suffix("") for p in sorted((self.folder / "shards").glob("*.parquet"))]
        self._meta: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.folder)!r}, hooks {self.hooks}, {len(self.shards)} shards, {self.n_tokens} tokens)"

    def _check_hook(self, hook: str) -> str:
        if hook not in self.hooks:
            raise KeyError(f"the store holds {self.hooks}, not {hook!r}")
        return hook

    def metadata(self) -> pd.DataFrame:
        """Every token's metadata row, shard by shard, with `shard` and `index` (the row in its shard)."""
        if self._meta is None:
            parts = [pd.read_parquet(s.with_suffix(".parquet")).assign(shard=k, index=lambda d: np.arange(len(d)))
                     for k, s in enumerate(self.shards)]
            self._meta = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*META_COLUMNS, "shard", "index"])
        return self._meta

    @property
    def n_tokens(self) -> int:
        return len(self.metadata())

    def samples(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The sample table of the complete shards (one row per sample written with `add(..., sample=)`:
        a harvest's `id`, `row`, `n_tokens`, media paths, question, ...), `columns` only when given."""
        parts = [pd.read_parquet(p, columns=None if columns is None else list(columns))
                 for s in self.shards for p in [self.folder / "samples" / f"{s.name}.parquet"] if p.is_file()]
        if not parts:
            return pd.DataFrame(columns=list(columns or ["id"]))
        out = pd.concat(parts, ignore_index=True)
        for c in out.columns[out.dtypes == object]:  # a column all None in one shard reads back as NaN after concat
            out[c] = out[c].astype(object).where(out[c].notna(), None)
        return out

    def done_ids(self) -> set[str]:
        """The samples whose tokens are in complete shards (and those of the sample table: a sample with no
        token in the harvested groups is done too)."""
        return set(self.metadata()["id"].astype(str)) | set(self.samples(["id"])["id"].astype(str))

    def shard(self, k: int, hook: str) -> Tensor:
        """`[n_tokens of shard k, d]` activations of `hook`."""
        from safetensors import safe_open

        with safe_open(str(self.shards[k].with_suffix(".safetensors")), "pt") as f:
            return f.get_tensor(self._check_hook(hook))

    def activations(self, hook: str, rows: pd.DataFrame | None = None) -> Tensor:
        """Activations `[len(rows), d]` of the metadata `rows` (a slice of `metadata()`; default every token),
        in their order, read shard by shard."""
        rows = self.metadata() if rows is None else rows
        out = torch.empty(len(rows), self.d[self._check_hook(hook)], dtype=DTYPES[self.info["dtype"]])
        order = np.arange(len(rows))
        for k, part in rows.assign(_at=order).groupby("shard", sort=True):
            out[part["_at"].to_numpy()] = self.shard(int(k), hook)[part["index"].to_numpy()]
        return out

    def select(self, groups: Sequence[str] | None = None, ids: Sequence[str] | None = None) -> pd.DataFrame:
        """The metadata rows of tokens in `groups` (TokenMap groups or modalities) of samples `ids`."""
        meta = self.metadata()
        keep = np.ones(len(meta), dtype=bool)
        if groups is not None:
            groups = [groups] if isinstance(groups, str) else list(groups)
            known = set(meta["group"]) | set(meta["modality"].dropna())
            unknown = [g for g in groups if g not in known]
            if unknown:
                raise ValueError(f"group(s) {unknown} are not in this store; it holds {sorted(set(meta['group']))}")
            keep &= meta["group"].isin(groups).to_numpy() | meta["modality"].isin(groups).to_numpy()
        if ids is not None:
            keep &= meta["id"].astype(str).isin([str(i) for i in ids]).to_numpy()
        return meta[keep]

    def batches(self, hook: str, batch_size: int, groups: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                shuffle: bool = True, seed: int = 0, buffer_shards: int = 4, loop: bool = False) -> Iterator[Tensor]:
        """Float32 batches `[<= batch_size, d]` of `hook`'s activations of the selected tokens; memory is
        bounded by `buffer_shards` shards (shuffled within that buffer and in shard order, seeded);
        `loop`: start again at the end (an endless provider for a trainer)."""
        self._check_hook(hook)
        rows = self.select(groups, ids)
        if not len(rows):
            raise ValueError(f"no token of the store is in groups={groups} ids={ids}")
        rng = np.random.default_rng(seed)
        by_shard = {int(k): part["index"].to_numpy() for k, part in rows.groupby("shard", sort=True)}
        while True:
            order = list(by_shard)
            if shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), buffer_shards):
                buf = torch.cat([self.shard(k, hook)[by_shard[k]] for k in order[start:start + buffer_shards]]).float()
                idx = torch.from_numpy(rng.permutation(len(buf))) if shuffle else torch.arange(len(buf))
                for b in range(0, len(buf), batch_size):
                    yield buf[idx[b:b + batch_size]]
            if not loop:
                return
