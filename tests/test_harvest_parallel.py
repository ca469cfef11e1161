"""Data-parallel harvests: two CPU ranks (gloo, one thread each) take rows r, r + 2, ..., each writes its own
shards, and the store (their union of tokens, activations, metadata and sample table) equals a single
process's exactly, with and without a token budget (where the ranks agree on the sample that reaches it)."""

import os
import socket

import torch
import torch.multiprocessing as mp
from test_harvest import HOOKS, assert_stores_equal

from hooked_av import toy
from hooked_av.toy.dataset import write_toy_dataset
from patching.apps.harvest import harvest
from patching.datasets.activations import ActivationStore

torch.set_num_threads(1)


def _rank(rank, world, port, model, manifest, runs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for out, max_tokens in runs:
        harvest(model, manifest, HOOKS, out, groups="media,question", shard_tokens=70, max_tokens=max_tokens, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process_with_and_without_a_token_budget(tmp_path):
    manifest = write_toy_dataset(tmp_path / "data", n=5, seed=21)
    model = toy.load()
    one = harvest(model, manifest, HOOKS, tmp_path / "one", groups="media,question", shard_tokens=70, progress=False)
    sizes = ActivationStore(one).samples().sort_values("row")["n_tokens"].tolist()
    budget = sum(sizes[:2]) + 1  # reached inside row 2 (rank 0's): row 3, rank 1's in the same round, is dropped
    runs = [(tmp_path / "two", None), (tmp_path / "two_budget", budget)]
    # fork: the ranks inherit the imported modules and the loaded model (as tests/test_study_parallel.py)
    mp.start_processes(_rank, args=(2, _free_port(), model, manifest, runs), nprocs=2, join=True, start_method="fork")
    assert_stores_equal(tmp_path / "two", one)
    shards = [s.name for s in ActivationStore(tmp_path / "two").shards]
    assert {s.split("-")[0] for s in shards} == {"r0", "r1"}  # each rank wrote its own
    budget_one = harvest(model, manifest, HOOKS, tmp_path / "one_budget", groups="media,question", shard_tokens=70,
                         max_tokens=budget, progress=False)
    assert sorted(ActivationStore(budget_one).samples()["row"]) == [0, 1, 2]
    assert_stores_equal(tmp_path / "two_budget", budget_one)
