"""A stand-in experiment, written as a new method file would be (`patching/methods/<name>.py`): its
function and its `Experiment` record. tests/test_experiment_registry.py registers it with one line and
shows every reader of the registry (Result, figures, studies, report) take it with no other edit."""

from __future__ import annotations

import pandas as pd
import torch

from patching.engine import checks
from patching.engine.experiment import Experiment, Plot, Report, StudySample
from patching.engine.results import Result
from patching.engine.sweep import samples


def residual_norms(model, inputs: dict, groups=("audio", "video"), layers=None, tm=None) -> Result:
    """The mean L2 norm of the residual stream entering each layer, per token group: one row per
    (sample, group, layer) with `norm`.

        residual_norms(model, inputs, groups=["video"], layers=[0, 1]).df
    """
    layers = checks.layers(model, layers)
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    rows = []
    for s in samples(model, inputs, tm):
        with torch.no_grad():
            _, cache = model.run_with_cache(**s.lm_inputs(1), names_filter=names, return_type=None)
        for g in groups:
            mask = s.tm.select(g).mask[0]
            if not bool(mask.any()):
                continue
            for l, name in zip(layers, names):
                rows.append(dict(sample=s.index, group=g, layer=l, norm=float(cache[name][0, mask].norm(dim=-1).mean())))
    return Result("residual_norm", pd.DataFrame(rows), dict(groups=list(groups), layers=layers))


def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    return residual_norms(x.model, x.enc, tm=x.tm, **opts).df


EXPERIMENT = Experiment(
    "residual_norm", residual_norms, by=("group", "layer"), value="norm", label="mean residual norm",
    plot=Plot("lines", x="layer", series="group", xlabel="layer"), run=_run, cells=("group", "layer"),
    report=Report("Residual norm per token group and layer"),
)
