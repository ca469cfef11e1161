"""Data-parallel studies: two CPU ranks (gloo, one thread each) shard the samples, each
streams its own parts, and the merged results equal a single-process run's exactly."""

import json
import os
import socket

import pandas as pd
import torch
import torch.multiprocessing as mp

from hooked_av import toy
from hooked_av.toy.dataset import write_toy_dataset
from patching.apps.study.runner import TIMING_COLUMNS, run_study

torch.set_num_threads(1)
EXPERIMENTS = ["knockout"]
OPTIONS = {}


def _rank(rank, world, port, model, manifest, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run_study(model, manifest, EXPERIMENTS, out, window=1, options=OPTIONS, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    manifest = write_toy_dataset(tmp_path / "data", n=4, seed=21)
    model = toy.load()
    # fork: the ranks inherit the imported modules and the loaded model (a spawned rank spends ~7 s of
    # CPU importing torch, and building the model costs seconds more); each still runs run_study alone
    mp.start_processes(_rank, args=(2, _free_port(), model, manifest, tmp_path / "two"), nprocs=2, join=True, start_method="fork")
    run_study(model, manifest, EXPERIMENTS, tmp_path / "one", window=1, options=OPTIONS, progress=False)
    for e in ["accuracy"] + EXPERIMENTS:
        two = pd.read_parquet(tmp_path / "two" / f"{e}.parquet").drop(columns=list(TIMING_COLUMNS), errors="ignore")
        one = pd.read_parquet(tmp_path / "one" / f"{e}.parquet").drop(columns=list(TIMING_COLUMNS), errors="ignore")
        pd.testing.assert_frame_equal(two, one, check_exact=True)
    ids = [f"toy-{k:05d}" for k in range(4)]
    assert pd.read_parquet(tmp_path / "two" / "accuracy.parquet").id.tolist() == ids
    ran = [json.loads((tmp_path / "two" / "ranks" / f"rank{r}.json").read_text())["ids"] for r in range(2)]
    assert ran == [ids[0::2], ids[1::2]]  # each rank ran its own shard only


class RecordingBar:
    """tqdm's stand-in in the forked ranks: rank 0's bar writes the counts it showed to a file on close."""

    file = None

    def __init__(self, total=None, initial=0, disable=False, **kw):
        self.total, self.n, self.disable, self.shown = total, initial, disable, [initial]

    def update(self, k=1):
        self.n += k
        self.shown.append(self.n)

    def refresh(self):
        self.shown.append(self.n)

    def close(self):
        if not self.disable:
            self.file.write_text(json.dumps({"total": self.total, "shown": self.shown}))


def _rank_with_bar(rank, world, port, model, manifest, out, limit):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run_study(model, manifest, ["accuracy"], out, limit=limit, progress=True)


def test_rank_zeros_bar_counts_every_ranks_samples(tmp_path, monkeypatch):
    # under torchrun the bar showed rank 0's share only (2 of 5 here)
    import tqdm.auto

    manifest = write_toy_dataset(tmp_path / "data", n=5, seed=21)
    model = toy.load()
    RecordingBar.file = tmp_path / "bar.json"
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    mp.start_processes(_rank_with_bar, args=(2, _free_port(), model, manifest, tmp_path / "two", 3), nprocs=2, join=True,
                       start_method="fork")
    bar = json.loads(RecordingBar.file.read_text())
    assert bar["total"] == 3 and bar["shown"][0] == 0 and bar["shown"][-1] == 3
    # resumed with two more samples: the bar starts from every rank's done samples
    mp.start_processes(_rank_with_bar, args=(2, _free_port(), model, manifest, tmp_path / "two", 5), nprocs=2, join=True,
                       start_method="fork")
    bar = json.loads(RecordingBar.file.read_text())
    assert bar["total"] == 5 and bar["shown"][0] == 3 and bar["shown"][-1] == 5
