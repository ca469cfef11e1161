"""What a study will cost, said before it starts and before any weight loads (`hooked-av study ... --plan`, and
the first lines of every study run from the command line).

    plan = plan_study("toy", "data/toy/manifest.jsonl", ["knockout", "discarding"], window=1)
    print(plan.text())          # tokens, forwards per sample per experiment, memory per device, time
    plan.check_fits()           # refuses a study whose widest run cannot fit the device

The model is built on the meta device from its config and tokenizer (`hooked_av.registry.skeleton`): each
sample's media are prepared as the study prepares them and its TokenMap counted; each experiment's record
counts what its `run` will do on that sample (`Experiment.plan`: the sweep engine's own plan for sweeps,
`patching.engine.sweep.plan_sweep`), in FLOPs and in plain forwards of the sample, and the bytes of its widest
run (`patching.engine.cost.run_bytes`). Memory per device = the weights (parameters x dtype) + that widest run
(towers' activations not counted). Time = the study's FLOPs over the rate of a forward measured here: the last
block of the model, materialised alone with random weights, run on `min(median tokens, 1024)` positions (towers
not counted).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from patching.engine import cost
from patching.engine.experiment import Cost, StudySample, check_options, get, study_experiments

MEASURE_TOKENS = 1024  # the measured forward runs at most this many positions


@dataclass
class StudyPlan:
    """A study's plan: `samples`, one row per sample (`id`, `tokens`, then per experiment its forwards; None
    where the experiment's record gives no plan), `flops` per experiment (summed over samples), the device and
    its memory (`device`, `device_bytes`, None where unknown), `weights_bytes`, `peak_bytes` (the widest run of
    any experiment on any sample), and the measured rate (`rate`: FLOP/s of `measured` = (tokens, seconds))."""

    model: str
    family: str
    dtype: str
    samples: pd.DataFrame
    flops: dict
    weights_bytes: int
    peak_bytes: int
    device: str
    device_bytes: int | None
    rate: float | None = None
    measured: tuple | None = None
    unplanned: list = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        """Estimated seconds of the experiments' language-model work on this machine (towers not counted)."""
        return None if self.rate is None else sum(self.flops.values()) / self.rate

    def fits(self) -> bool:
        return self.device_bytes is None or self.weights_bytes + self.peak_bytes <= self.device_bytes

    def check_fits(self) -> None:
        """Refuse, before anything loads, a study whose weights and widest run exceed the device's memory."""
        if not self.fits():
            raise ValueError(
                f"the study needs {_gib(self.weights_bytes + self.peak_bytes)} on {self.device} (weights "
                f"{_gib(self.weights_bytes)} + widest run {_gib(self.peak_bytes)}) but the device has "
                f"{_gib(self.device_bytes)}; use a device with more memory, --dtype bfloat16, fewer tokens per sample, "
                "or a smaller max_batch_tokens (e.g. --option knockout.max_batch_tokens=4096)")

    def text(self) -> str:
        """The plan as lines of text (what `hooked-av study --plan` prints)."""
        df, n = self.samples, len(self.samples)
        tok = df["tokens"]
        lines = [f"plan: {self.model} ({self.family}), {self.dtype} on {self.device}; {n} sample(s); no weight loaded",
                 f"tokens per sample: min {tok.min():,}, median {int(tok.median()):,}, max {tok.max():,}",
                 "forwards per sample (work in FLOPs over a plain forward of the sample; sweeps as the engine plans them):"]
        for exp in self.flops:
            col = df[exp]
            lines.append(f"  {exp}: min {col.min():.2f}, median {col.median():.2f}, max {col.max():.2f}; "
                         f"{_flops(self.flops[exp])} in all")
        for exp in self.unplanned:
            lines.append(f"  {exp}: not counted (its record gives no plan); the time below leaves it out")
        room = "unknown" if self.device_bytes is None else _gib(self.device_bytes)
        lines.append(f"memory per device ({self.device}): weights {_gib(self.weights_bytes)} + widest run "
                     f"{_gib(self.peak_bytes)} = {_gib(self.weights_bytes + self.peak_bytes)} of {room}"
                     + ("" if self.fits() else "  -> DOES NOT FIT"))
        if self.rate is not None:
            t, s = self.measured
            lines.append(f"time on this machine: about {_duration(self.seconds)} of language-model work (towers not "
                         f"counted), at {self.rate / 1e9:,.1f} GFLOP/s measured on the last block at {t:,} tokens "
                         f"({s * 1e3:,.0f} ms)")
        return "\n".join(lines)


def plan_study(model, manifest, experiments=("accuracy",), *, limit: int | None = None, template="default",
               window: int | None = None, options: dict | None = None, device=None, dtype="float32",
               memory: float | None = None, measure: bool = True, progress: bool = False) -> StudyPlan:
    """The plan of `run_study(model, manifest, experiments, ...)` with the same arguments, counted without
    loading a weight (`model`: a name for `hooked_av.load`; a loaded model is used as it is). `memory`: each
    device's memory in GiB (default: what the device reports free: `torch.cuda.mem_get_info`, or the
    machine's available memory for the CPU). `measure`: time one forward of the last block here.

        plan = plan_study("toy", manifest, ["knockout"], window=1, measure=False)  # no weight read
        plan.samples[["id", "tokens", "knockout"]]  # the knockout's cost in plain forwards, per sample
        print(plan.text())
    """
    from hooked_av.registry import skeleton
    from hooked_av.utils import as_device, as_dtype
    from patching.datasets.manifest import Manifest, read_manifest
    from patching.datasets.templates import parse_template

    experiments = study_experiments(experiments)
    options = check_options(options, experiments, window)
    dtype_ = as_dtype(dtype) or torch.float32
    dev = as_device(device)
    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    tpl = parse_template(template)
    rows = manifest.rows[:limit]
    tpl.check(rows)
    name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        model = skeleton(model, dtype_)
    family = type(model).__name__
    records = {e: get(e) for e in experiments if e != "accuracy"}
    unplanned = [e for e, r in records.items() if r.plan is None]
    table, flops, peak = [], {e: 0.0 for e in experiments if e not in unplanned}, 0
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="plan", disable=not progress, leave=False):
        inputs = model.prepare(tpl.prompt(row))
        tm = model.token_map(inputs)
        x = StudySample(model, inputs, None, tm, 0, window)
        n = int((~tm.padding[0]).sum())
        costs = {"accuracy": Cost(cost.forward_flops(model.cfg, n), 1.0, cost.run_bytes(model.cfg, 1, n, n, mask=False))}
        for e, r in records.items():
            if r.plan is not None:
                costs[e] = r.plan(x, dict(options.get(e, {})))
        entry = {"id": row.id, "tokens": n}
        for e in experiments:
            entry[e] = costs[e].forwards if e in costs else None
            if e in costs:
                flops[e] += costs[e].flops
                peak = max(peak, costs[e].peak_bytes)
        table.append(entry)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = StudyPlan(name, family, str(dtype_).removeprefix("torch."), pd.DataFrame(table), flops, weights, peak,
                     str(dev), _device_bytes(dev, memory), unplanned=unplanned)
    if measure and table:
        plan.measured, plan.rate = _measure(model, min(int(statistics.median(e["tokens"] for e in table)), MEASURE_TOKENS),
                                            dev, dtype_)
    return plan


def _device_bytes(dev: torch.device, memory: float | None) -> int | None:
    """The memory a study may use on `dev`: `memory` GiB if given, else what the device reports free."""
    if memory is not None:
        if not memory > 0:
            raise ValueError(f"memory must be a positive number of GiB, got {memory}")
        return int(memory * 2**30)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type == "cpu":
        try:
            line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
            return int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            return None
    return None


def _measure(model, n: int, dev: torch.device, dtype: torch.dtype) -> tuple[tuple[int, float], float]:
    """`((tokens, seconds), FLOP/s)`: the fastest of two timed runs (after a warm-up) of the model's last block,
    final norm and unembedding on `n` random positions, materialised alone with random weights where the model
    has none (a meta-device skeleton), on `dev`."""
    L = model.cfg.n_layers
    parts = [model.blocks[L - 1], model.ln_final, model.unembed]
    if any(p.is_meta for m in parts for p in m.parameters()):
        gen = torch.Generator(device="cpu").manual_seed(0)
        for m in parts:
            m.to_empty(device=dev)
            for pname, p in m.named_parameters():
                with torch.no_grad():
                    if p.dim() > 1:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                    else:
                        p.fill_(1.0 if "weight" in pname else 0.0)
    x = torch.randn(1, n, model.cfg.d_model, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    pos = torch.arange(n, device=dev).view(1, 1, n).expand(3, 1, n)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(3):
            sync()
            t = time.perf_counter()
            model.run_language_model(x, pos, start_layer=L - 1, logits_at="last")
            sync()
            if i:
                times.append(time.perf_counter() - t)
    flops = cost.block_flops(model.cfg, L - 1, n, cost.keys_read(n, 0)) + cost.unembed_flops(model.cfg, 1)
    return (n, min(times)), flops / min(times)


def _flops(f: float) -> str:
    return next(f"{f / 10**k:,.2f} {unit}FLOP" for k, unit in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (0, ""))
                if f >= 10**k or k == 0)


def _gib(b: float) -> str:
    return f"{b / 2**30:,.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.1f} MiB"


def _duration(s: float) -> str:
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min" if s < 7200 else f"{s / 3600:,.1f} h"
