"""Logit lens per modality: unembed `ln_final(resid)` at every layer, averaged over a token group's
positions (docs/methods.md). One forward with the residual stream cached; the towers run once."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from hooked_av.inputs.token_map import GROUPS
from patching import checks
from patching.activation_patching import cache_sample, site_names
from patching.metrics import AnswerProb
from patching.results import Result
from patching.sweep import samples


def logit_lens(
    model,
    inputs: dict,
    answers=None,
    groups: Sequence | None = None,
    site: str = "resid_post",
    tm=None,
) -> Result:
    """One row per (sample, layer, group): `prob` (mean over the group's positions of p(answer) from
    `unembed(ln_final(resid))`), `rank` (mean rank of the answer, 0 = top), `top_token` (argmax of the
    mean log-probabilities). `answers` default: the final top token of each sample."""
    L = model.cfg.n_layers
    names = site_names(model, [site], range(L))
    if answers is not None:
        (answers if isinstance(answers, AnswerProb) else AnswerProb(answers)).check(model, checks.batch_of(inputs))
    if groups is not None:
        groups = checks.nonempty(groups, "groups", none_ok=True)
    rows = []
    for s in samples(model, inputs, tm):
        cache = cache_sample(model, s, names)
        with torch.no_grad():
            final = model.unembed(model.ln_final(cache[names[-1]][:, -1])) if site == "resid_post" else None
        if answers is None:
            if final is None:
                raise ValueError("pass answers= when the site is not resid_post")
            answer, idx = AnswerProb(final.argmax(-1)), 0
        else:
            answer, idx = (answers if isinstance(answers, AnswerProb) else AnswerProb(answers)), s.index
        tok = int(answer._pick(answer.answer, idx, 1, "cpu")[0])
        specs = groups if groups is not None else [g for g in GROUPS if g != "padding" and bool(s.tm.select(g).mask.any())]
        for spec in specs:
            sel = s.tm.select(spec)
            where = sel.mask[0].to(s.embeds.device)
            if not bool(where.any()):
                s.tm.positions(sel)
            for layer, name in enumerate(names):
                with torch.no_grad():
                    logp = model.unembed(model.ln_final(cache[name][0, where])).float().log_softmax(-1)  # [n, vocab]
                p = logp[:, tok].exp()
                rank = (logp > logp[:, tok : tok + 1]).sum(-1).float()
                rows.append(dict(sample=s.index, layer=layer, group=sel.label, n_tokens=int(where.sum()), answer=tok,
                                 prob=float(p.mean()), rank=float(rank.mean()), top_token=int(logp.mean(0).argmax())))
    return Result("logit_lens", pd.DataFrame(rows), dict(site=site, groups=None if groups is None else [str(g) for g in groups]))
