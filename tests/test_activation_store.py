"""The activation store (`patching.datasets.activations`): shards hold whole samples and close at the
token budget, what is written reads back exactly (activations and metadata, in any selection), batches
cover each selected token once, a store is one harvest (other settings refused), and a resumed writer
continues after the complete shards."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from patching.datasets.activations import META_COLUMNS, ActivationStore, StoreWriter

HOOK = "blocks.1.hook_resid_post"


def _sample(i: int, n: int, d: int = 8):
    g = torch.Generator().manual_seed(i)
    acts = torch.randn(n, d, generator=g)
    groups = ["audio" if j % 3 == 0 else "video" if j % 3 == 1 else "question" for j in range(n)]
    meta = pd.DataFrame({"id": f"s{i}", "row": i, "pos": np.arange(n), "group": groups,
                         "item": 0, "modality": [g if g != "question" else None for g in groups],
                         "t_start": np.arange(n) * 0.04, "t_end": np.arange(1, n + 1) * 0.04, "frame": -1,
                         "patch_row": -1, "patch_col": -1, "chunk": 0})
    return acts, meta


def _write(folder, sizes, shard_tokens=10, **kw):
    w = StoreWriter(folder, {HOOK: 8}, shard_tokens=shard_tokens, settings={"model": "x"}, **kw)
    for i, n in sizes:
        a, m = _sample(i, n)
        w.add({HOOK: a}, m)
    w.close()
    return w


def test_shards_hold_whole_samples_and_read_back_exactly(tmp_path):
    sizes = [(0, 4), (1, 5), (2, 3), (3, 12), (4, 1)]
    _write(tmp_path, sizes)
    store = ActivationStore(tmp_path)
    per_shard = [list(pd.read_parquet(s.with_suffix(".parquet"))["id"].unique()) for s in store.shards]
    assert per_shard == [["s0", "s1"], ["s2"], ["s3"], ["s4"]]  # 4+5 fit 10; 3 then 12 would not; 12 alone
    assert store.n_tokens == 25 and store.done_ids() == {f"s{i}" for i in range(5)}
    meta = store.metadata()
    assert list(meta.columns[:len(META_COLUMNS)]) == list(META_COLUMNS)
    for i, n in sizes:
        a, m = _sample(i, n)
        rows = meta[meta["id"] == f"s{i}"]
        assert torch.equal(store.activations(HOOK, rows), a)
        pd.testing.assert_frame_equal(rows[list(META_COLUMNS)].reset_index(drop=True), m, check_dtype=False)
    some = store.select(groups=["audio"], ids=["s3", "s1"])
    naive = torch.cat([_sample(i, n)[0][[j for j in range(n) if j % 3 == 0]] for i, n in sizes if i in (1, 3)])
    assert torch.equal(store.activations(HOOK, some), naive)


def test_batches_cover_each_selected_token_once(tmp_path):
    _write(tmp_path, [(i, 7) for i in range(6)], shard_tokens=14)
    store = ActivationStore(tmp_path)
    got = torch.cat(list(store.batches(HOOK, 5, groups=["video"], seed=3, buffer_shards=2)))
    want = store.activations(HOOK, store.select(groups=["video"]))
    assert got.shape == want.shape
    assert torch.equal(got[got[:, 0].argsort()], want[want[:, 0].argsort()])
    again = torch.cat(list(store.batches(HOOK, 5, groups=["video"], seed=3, buffer_shards=2)))
    assert torch.equal(got, again)  # seeded
    endless = store.batches(HOOK, 5, loop=True)
    assert sum(len(next(endless)) for _ in range(20)) > store.n_tokens


def test_a_store_is_one_harvest_and_a_resumed_writer_continues(tmp_path):
    _write(tmp_path, [(0, 4), (1, 9)])
    with pytest.raises(ValueError, match="other settings"):
        StoreWriter(tmp_path, {HOOK: 8}, shard_tokens=10, settings={"model": "y"})
    _write(tmp_path, [(2, 6)])  # the same settings: new shards after the complete ones
    store = ActivationStore(tmp_path)
    assert [s.name for s in store.shards] == ["r0-00000", "r0-00001", "r0-00002"] and store.done_ids() == {"s0", "s1", "s2"}
    # a shard in flight (activations written, its parquet done mark not) is not part of the store
    (tmp_path / "shards" / "r0-00003.safetensors").write_bytes(b"partial")
    assert len(ActivationStore(tmp_path).shards) == 3
    with pytest.raises(ValueError, match=r"store.json is not valid JSON"):
        (tmp_path / "store.json").write_text("{")
        StoreWriter(tmp_path, {HOOK: 8})


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    w = StoreWriter(tmp_path / "s", {HOOK: 8}, shard_tokens=10)
    a, m = _sample(0, 4)
    with pytest.raises(ValueError, match="lacks column"):
        w.add({HOOK: a}, m.drop(columns=["t_start"]))
    with pytest.raises(ValueError, match=r"activations \(4, 7\) for 4 tokens of width 8"):
        w.add({HOOK: a[:, :7]}, m)
    with pytest.raises(ValueError, match="but the store holds"):
        w.add({"other": a}, m)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        StoreWriter(tmp_path / "file", {HOOK: 8})
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore(tmp_path / "nothing")
