"""Logit lens per modality: project the residual stream at every layer onto the vocabulary, averaged
over a token group's positions (docs/methods.md). One forward with the residual stream cached; the
towers run once.

Two lenses: `standard` (nostalgebraist; TransformerLens's `cache.logit_lens`): `unembed(ln_final(h))`
at `site` of every layer; `map_the_flow` (Kim et al., `byminji/map-the-flow`,
`analysis/causal_intervention_tools.py`, `_logit_lens_set_proj_hooks`): `h @ W_E^T` with the *input*
embedding matrix and no final norm, where h is the input of layer l (`hook_resid_pre`) for l < L-1
and, for the last layer, the final normed state `ln_final(resid_post[L-1])`."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from hooked_av.inputs.token_map import GROUPS
from hooked_av.utils import resident_weight
from patching.engine import checks, cost
from patching.engine.experiment import Cost, Experiment, Plot, Report, StudySample
from patching.engine.metrics import AnswerProb
from patching.engine.results import Result
from patching.engine.sweep import sample_maps, samples
from patching.methods.activation_patching import cache_sample, site_names


def logit_lens(
    model,
    inputs: dict,
    answers=None,
    groups: Sequence | None = None,
    site: str | None = None,
    tm=None,
    lens: str = "standard",
) -> Result:
    """One row per (sample, layer, group): `prob` (mean over the group's positions of p(answer) under
    the lens), `rank` (mean rank of the answer, 0 = top), `top_token` (argmax of the mean
    log-probabilities). `answers` default: the final top token of each sample. `lens`: "standard"
    (`unembed(ln_final(h))` at `site`, default "resid_post") or "map_the_flow" (input embedding
    matrix, no final norm, at the anchor's own sites; a `site` is refused there).

        res = logit_lens(model, inputs, [answer], groups=["audio", "question", "last"])
        res.df.pivot(index="layer", columns="group", values="prob")
    """
    L = model.cfg.n_layers
    if lens not in LENSES:
        raise ValueError(f"lens must be one of {list(LENSES)}, got {lens!r}")
    if lens == "map_the_flow":
        if site is not None:
            raise ValueError("the map_the_flow lens reads its own sites (each layer's input, the final normed state "
                             f"for the last layer); pass site=None, got {site!r}")
        names = site_names(model, ["resid_pre"], range(L - 1)) + site_names(model, ["resid_post"], [L - 1])
    else:
        site = "resid_post" if site is None else site
        names = site_names(model, [site], range(L))
    project = _projection(model, lens, L)
    if answers is not None:
        answers = (answers if isinstance(answers, AnswerProb) else AnswerProb(answers)).check(model, checks.batch_of(inputs), inputs)
    if groups is not None:
        groups = checks.nonempty(groups, "groups", none_ok=True)
    rows = []
    for s in samples(model, inputs, tm):
        cache = cache_sample(model, s, names)
        with torch.no_grad():
            final = model.unembed(model.ln_final(cache[names[-1]][:, -1])) if names[-1].endswith("hook_resid_post") else None
        if answers is None:
            if final is None:
                raise ValueError("pass answers= when the site is not resid_post")
            answer, idx = AnswerProb(final.argmax(-1)), 0
        else:
            answer, idx = answers, s.index
        tok = int(answer._pick(answer.answer, idx, 1, "cpu")[0])
        specs = groups if groups is not None else [g for g in GROUPS if g != "padding" and bool(s.tm.select(g).mask.any())]
        for spec in specs:
            sel = s.tm.select(spec)
            where = sel.mask[0].to(s.embeds.device)
            if not bool(where.any()):
                s.tm.positions(sel)
            for layer, name in enumerate(names):
                with torch.no_grad():
                    logp = project(cache[name][0, where], layer).float().log_softmax(-1)  # [n, vocab]
                p = logp[:, tok].exp()
                rank = (logp > logp[:, tok : tok + 1]).sum(-1).float()
                rows.append(dict(sample=s.index, layer=layer, group=sel.label, n_tokens=int(where.sum()), answer=tok,
                                 prob=float(p.mean()), rank=float(rank.mean()), top_token=int(logp.mean(0).argmax())))
    return Result("logit_lens", pd.DataFrame(rows), dict(site=site, lens=lens, groups=None if groups is None else [str(g) for g in groups]))


LENSES = ("standard", "map_the_flow")


def _projection(model, lens: str, n_layers: int):
    """`fn(h [n, d_model], layer) -> logits [n, vocab]` of the lens."""
    if lens == "standard":
        return lambda h, layer: model.unembed(model.ln_final(h))
    embed = resident_weight(model, model.embed)  # [vocab, d_model]: the input embedding matrix, as the anchor projects

    def project(h, layer):
        return (model.ln_final(h) if layer == n_layers - 1 else h) @ embed.T

    return project


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    """A study's logit lens of one sample; `lens` may be a list, one run each, told apart by a `lens` column."""
    lenses = opts.pop("lens", "standard")
    lenses = [lenses] if isinstance(lenses, str) else checks.nonempty(lenses, "lens")
    return pd.concat([logit_lens(x.model, x.enc, [x.answer], tm=x.tm, lens=lens, **opts).df.assign(lens=lens)
                      for lens in lenses], ignore_index=True)


def _plan(x: StudySample, opts: dict) -> Cost:
    """Per lens: one forward keeping the residuals, then every read position projected onto the vocabulary
    at every layer (and, for the standard lens at resid_post, the last position's final logits)."""
    c, model = x.model.cfg, x.model
    tm = sample_maps(model, x.inputs, x.tm)[0]
    n = tm.seq_len
    lenses = opts.get("lens", "standard")
    groups = opts.get("groups")
    specs = groups if groups is not None else [g for g in GROUPS if g != "padding" and bool(tm.select(g).mask.any())]
    sizes = [int(tm.select(spec).mask.sum()) for spec in specs]
    read = sum(sizes)
    flops = 0.0
    for lens in [lenses] if isinstance(lenses, str) else lenses:
        final = lens == "map_the_flow" or opts.get("site") in (None, "resid_post")
        flops += cost.run_flops(c, n, read=0) + cost.unembed_flops(c, read * c.n_layers + final)
    return Cost(flops, flops / cost.forward_flops(c, n), cost.run_bytes(c, 1, n, n, mask=False) + 8 * max(sizes) * c.d_vocab)


EXPERIMENT = Experiment(
    "logit_lens", logit_lens, by=("group", "layer"), value="prob", label="p(answer)",
    plot=Plot("lines", x="layer", series="group", xlabel="layer"), run=_run, plan=_plan, cells=("lens", "group", "layer"), unit="probability",
    report=Report("Logit lens: p(answer) per token group and layer", split=("lens",)),
    columns=("layer", "group", "n_tokens", "answer", "prob", "rank", "top_token", "lens"),
)
