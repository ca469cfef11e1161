"""What an SAE's features do for the answer: per sample and token group, the top features (by their total
activation over the group's tokens) and the effect on the answer of ablating each of them on that group
(`patching.engine.features.ablate_features`, the SAE's error term kept, every cell one row of a
`run_rows` sweep that recomputes from the group's first token on).

Rows: `sample`, `group`, `rank` (1 = the most active), `feature`, `act_sum` / `act_mean` / `act_max` (over
the group's tokens, the feature's activation units), `frac_active` (share of the group's tokens where it
fires), `n_tokens`, `metric` (p(answer) with it ablated), `metric_clean` (with the SAE spliced, nothing
ablated: the plain forward to float rounding), `change` and `rel_change` (%), `correct` (the answer is the
top token with the SAE spliced) and `correct_ablated`.

    res = sae_features(model, inputs, [answer], sae="runs/sae", groups=["audio", "video"], top=5)
    res.mean()          # mean relative change of p(answer) by group and rank
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from patching.engine import checks
from patching.engine.experiment import Experiment, Plot, Report, StudySample
from patching.engine.features import ablate_features, token_group
from patching.engine.metrics import AnswerProb, relative_change
from patching.engine.results import Result
from patching.engine.sweep import run_rows, sample_maps, samples
from patching.methods.sae_eval import hook_of, sae_of


def sae_features(model, inputs: dict, answers, sae, groups: Sequence[str] = ("audio", "video"), top: int = 5,
                 hook: str | None = None, tm=None, progress: bool = True) -> Result:
    """For every sample and group (`token_group` names: audio, video, image, media, text, or a TokenMap spec):
    the `top` features of `sae` (an SAELens SAE or its folder, spliced at `hook`, default the one its metadata
    names, with its error term) by total activation over the group's tokens (features that never fire there
    are not listed), and p(answer) with each ablated on the group's tokens. See the module for the columns.

        res = sae_features(model, inputs, [answer], sae, groups=["audio"], top=2, progress=False)
        res.df[["group", "rank", "feature", "act_sum", "rel_change"]]
    """
    sae = sae_of(model, sae)
    hook = hook_of(sae, hook)
    groups = checks.nonempty(groups, "groups")
    top = checks.count(top, "top", unit=" feature")
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    metric.check(model, checks.batch_of(inputs), inputs)
    for m in sample_maps(model, inputs, tm):  # every group name checked before the towers run
        for g in groups:
            token_group(m, g)
    point = f"{hook}.hook_sae_acts_post"
    rows = []
    with model.saes(sae, hook_name=hook, use_error_term=True):
        ablate_features(hook, [0]).check(model)  # an SAE whose features cannot be edited is refused here
        for s in samples(model, inputs, tm):
            with torch.no_grad():
                logits, cache = model.run_with_cache(**s.lm_inputs(1), names_filter=point, logits_at="last")
                clean = logits[:, -1]
            feats = cache[point][0]
            p_clean, ok_clean = float(metric(clean, s.index)[0]), bool(metric.correct(clean, s.index)[0])
            cells, ivs = [], []
            for g in groups:
                where = token_group(s.tm, g)
                mask = where.mask[0].to(feats.device)
                if not bool(mask.any()):
                    continue
                acts = feats[mask]
                total = acts.sum(0)
                order = total.argsort(descending=True)[:top]
                for rank, f in enumerate(order.tolist(), start=1):
                    if float(total[f]) <= 0:
                        break
                    col = acts[:, f]
                    cells.append(dict(sample=s.index, group=g, rank=rank, feature=f, act_sum=float(total[f]),
                                      act_mean=float(col.mean()), act_max=float(col.max()),
                                      frac_active=float((col > 0).float().mean()), n_tokens=int(mask.sum())))
                    ivs.append(ablate_features(hook, [f], positions=where))
            if not ivs:
                continue
            with torch.no_grad():
                got = run_rows(model, s, ivs, progress=progress, desc="sae features")
            p = metric(got, s.index)
            ok = metric.correct(got, s.index)
            for cell, pv, okv in zip(cells, p.tolist(), ok.tolist()):
                rows.append({**cell, "metric": pv, "metric_clean": p_clean, "change": pv - p_clean,
                             "rel_change": float(relative_change(torch.tensor(pv), torch.tensor(p_clean))),
                             "correct": ok_clean, "correct_ablated": bool(okv)})
    return Result("sae_features", pd.DataFrame(rows), dict(hook=hook, groups=list(groups), top=top, d_sae=sae.cfg.d_sae,
                                                           architecture=sae.cfg.architecture(), metric=metric.settings()))


def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    opts = dict(opts)
    return sae_features(x.model, x.enc, [x.answer], opts.pop("sae"), tm=x.tm, progress=False, **opts).df


def _check(opts: dict, window) -> None:
    folder = Path(str(opts.get("sae")))
    if not (folder / "cfg.json").is_file():
        raise ValueError(f"sae_features.sae={folder}: not an SAE folder (no cfg.json); give the folder `hooked-av sae "
                         "train --out` or SAELens's save_model wrote")
    checks.count(opts.get("top", 5), "sae_features.top", unit=" feature")


EXPERIMENT = Experiment(
    "sae_features", sae_features, by=("group", "rank"), value="rel_change",
    label="relative change of p(answer) (%)", correct_only=True,
    plot=Plot("lines", x="rank", series="group", xlabel="rank of the feature on its group (1 = most active)"),
    run=_run, cells=("group", "rank"), required=("sae",), example={"sae": "runs/sae"}, check=_check,
    report=Report("SAE features: relative change of p(answer) when each group's top features are ablated (%)"),
    columns=("group", "rank", "feature", "act_sum", "act_mean", "act_max", "frac_active", "n_tokens", "metric",
             "metric_clean", "change", "rel_change", "correct", "correct_ablated"),
)
