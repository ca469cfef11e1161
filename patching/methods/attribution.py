"""Attribution patching (Nanda 2023; Syed et al. 2023): the first-order estimate of patching clean into
corrupted at every site at once, `(a_clean - a_corrupt) . dM/da` with the gradient taken in the
corrupted run, read by backward hooks at the sites (TransformerLens's `bwd_hooks`), with the weights
frozen so the backward reaches the activations alone. Cost per sample: one clean forward (cache) and one
corrupted forward + backward.
Use it to choose where to run exact `activation_patching`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from patching.engine import checks
from patching.engine.experiment import Experiment, Plot
from patching.engine.hooks import site_name
from patching.engine.metrics import AnswerProb, Metric
from patching.engine.results import Result
from patching.engine.sweep import forward_rows
from patching.methods.activation_patching import (
    cache_sample,
    pair_samples,
    position_units,
)


def attribution_patching(
    model,
    clean: dict,
    corrupted: dict,
    metric: Metric | None = None,
    sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    layers: Sequence[int] | None = None,
    positions="each",
    tm_clean=None,
    tm_corrupted=None,
) -> Result:
    """One row per (sample, site, layer, position unit[, head for site "head"]) with `attribution`,
    the estimated `m_patched - m_corrupt` (metric units), summed over the unit's positions.

        res = attribution_patching(model, clean, corrupted, AnswerLogProb([answer]), sites=["resid_pre"], positions="groups")
        res.df.sort_values("attribution").tail(3)  # log p: p's gradient vanishes where the corruption drives p to ~0
    """
    layers = checks.layers(model, layers)
    sites = checks.nonempty(sites, "sites")
    if not isinstance(positions, str):
        positions = checks.nonempty(positions, "positions")
    if metric is not None:
        metric.check(model, checks.batch_of(clean), clean)
    cl, co = pair_samples(model, clean, corrupted, tm_clean, tm_corrupted)
    names = {(s, l): site_name(s, l) for s in sites for l in layers}
    rows = []
    for a, b in zip(cl, co):
        clean_cache = cache_sample(model, a, sorted(set(names.values())))
        with torch.no_grad():
            lc = forward_rows(model, a, 1)
        m = metric or AnswerProb(lc.argmax(-1))
        idx = a.index if metric is not None else 0
        acts: dict = {}
        grads: dict = {}

        def keep(t, hook):
            acts[hook.name] = t.detach()

        def grad(g, hook):  # d metric / d activation, as the backward passes the hook point
            grads[hook.name] = g.detach()

        points = sorted(set(names.values()))
        with torch.enable_grad(), model.frozen(), model.hooks(fwd_hooks=[(n, keep) for n in points],
                                                             bwd_hooks=[(n, grad) for n in points]):
            kw = b.lm_inputs(1)  # the sample's injections (DeepStack) too
            x = kw.pop("inputs_embeds").detach().clone().requires_grad_(True)  # the graph's one leaf (weights frozen)
            resid = model.run_language_model(x, **kw, return_type="resid", logits_at="last")
            value = m(model.unembed(resid[:, -1]), idx).sum()
            torch.autograd.grad(value, x)  # runs the backward hooks; no weight gradient is made or kept
        units = position_units(b.tm, positions)
        for (site, layer), name in names.items():
            g = grads.get(name)  # none where the metric does not depend on the site
            if g is None:
                g = torch.zeros_like(acts[name])
            per_pos = ((clean_cache[name] - acts[name]) * g)[0]  # [pos, d] or [pos, h, d_head]
            per_pos = per_pos.sum(-1)  # [pos] or [pos, h]
            for label, pos, where in units:
                sel = torch.zeros(b.seq_len, dtype=torch.bool)
                if hasattr(where, "mask"):
                    sel = where.mask[0]
                else:
                    sel[where] = True
                total = per_pos[sel.to(per_pos.device)].sum(0)
                for h, v in (enumerate(total.tolist()) if site == "head" else [(-1, float(total))]):
                    rows.append(dict(sample=a.index, site=site, layer=layer, head=h, pos=pos, tokens=label, attribution=v))
    settings = dict(sites=list(sites), layers=layers, positions=positions if isinstance(positions, str) else list(map(str, positions)),
                    metric=None if metric is None else metric.settings(), gradient="corrupted run")
    return Result("attribution", pd.DataFrame(rows), settings)


# ---- the record ---------------------------------------------------------------------------------
EXPERIMENT = Experiment(
    "attribution", attribution_patching, by=("site", "layer", "pos"), value="attribution", label="attribution",
    plot=Plot("traced", x="layer", series="tokens", panel="site", xlabel="layer"),
)
