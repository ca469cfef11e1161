"""A study's progress bar across ranks: under torchrun each rank runs its own share, so rank 0's bar counts
every rank's finished samples. Each rank writes its count to `ranks/progress<r>.json` after each sample;
rank 0 sums the files from a background thread (the ranks' shares differ on a resumed run, so a collective
per sample would hang) and once more after the ranks meet. The samples already done when the run starts are
summed once over the ranks (one all_reduce, every rank takes part).

    bar = Progress(out, rank, world, total=len(rows), done=len(mine) - len(todo), enabled=True, group=group)
    bar.advance()  # after each of this rank's samples
    bar.close()    # after the ranks' barrier: the final count of every rank
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

POLL_SECONDS = 0.5


class Progress:
    """`total`: the samples of the whole run (every rank's); `done`: this rank's samples already done."""

    def __init__(self, out: Path, rank: int, world: int, total: int, done: int, enabled: bool, group=None, device=None):
        from tqdm.auto import tqdm

        self.folder, self.rank, self.world, self.finished = Path(out) / "ranks", rank, world, 0
        if world > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write()  # before the all_reduce: after it, every rank's file is this run's
        self.initial = done
        if group:
            t = torch.tensor([done], dtype=torch.long, device=device if device is not None and device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(t)
            self.initial = int(t.item())
        self.bar = tqdm(total=total, initial=self.initial, unit="sample", desc="study", disable=not enabled or rank != 0,
                        dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = None
        if world > 1 and rank == 0 and enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _path(self, rank: int) -> Path:
        return self.folder / f"progress{rank}.json"

    def _write(self) -> None:
        path = self._path(self.rank)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"finished": self.finished}))
        os.replace(tmp, path)

    def count(self) -> int:
        """The samples done: those done at the start plus every rank's finished ones (this rank's alone when
        there is one)."""
        if self.world == 1:
            return self.initial + self.finished
        n = self.initial
        for r in range(self.world):
            try:
                n += int(json.loads(self._path(r).read_text())["finished"])
            except (OSError, ValueError, KeyError):  # not written yet, or mid-replace on a filesystem without atomic rename
                pass
        return n

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._show()

    def _show(self) -> None:
        n = self.count()
        if n != self.bar.n:
            self.bar.n = n
            self.bar.refresh()

    def advance(self) -> None:
        self.finished += 1
        if self.world > 1:
            self._write()
        if self._thread is None:
            self.bar.update()

    def close(self) -> None:
        """After the ranks' barrier: every rank's file holds its final count."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._show()
        self.bar.close()
