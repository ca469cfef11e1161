"""Visual attention redistribution, "VAR" (Kang et al., "See What You Are Told: Visual Attention Sink
in Large Multimodal Models", `seilk/VisAttnSink`, `src/logic/logic.py`: `HeadFork`, `VARProcessor`),
as an `Intervention` on `blocks.{l}.attn.hook_pattern` (after the softmax, on the exact path).

For every (row, head, query) of a layer, with `media` the media tokens and `sinks` the sink tokens:
- the head is media-centric for that query when `sink share = attn(media sinks) / (attn(media) +
  n_media * 1e-6) <= rho` and `media mass = attn(media) >= summ` (the anchor's `portion`, with its
  1e-6 per media token, and `summation`), and the layer has at least one media sink;
- only queries after the last media token are edited (the anchor's prefill rule `im + pa <= q`);
- there, attention to every sink (media or not) is multiplied by `p`, and the removed mass `(1 - p) x
  attn(sinks)` is added to the non-sink media tokens in proportion to their attention.
Row sums are kept. Defaults are the anchor's `A_exps/lv1.5_7b.yml`: p 0.6, rho 0.5, summ 0.2, and
the layers are 2..L-2 (`var_layers`: sinks are selected from layer 2 on, `except_last_layer`).

Sinks are an argument (e.g. `patching.methods.sinks.find_sinks` positions, or the anchor's own rule of
every token whose RMS-normalised hidden state exceeds tau at its sink dimensions, text tokens too).

    iv = var(tm, sinks=tm.select("video") & my_sink_selection, layers=var_layers(model.cfg.n_layers))
    logits = model.run_with_hooks(**inputs, fwd_hooks=iv + block_attention(tm, "audio", "last", [3]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from patching.engine import checks
from patching.engine.experiment import Experiment, Report, StudySample
from patching.engine.intervention import Intervention, Part, batch_rows, layer_list

DEFAULT_P = 0.6
DEFAULT_RHO = 0.5
DEFAULT_SUMM = 0.2
EPS = 1e-6  # the anchor's `torch.sum(image_attn + 1e-6, dim=-1)`


def var_layers(n_layers: int) -> list[int]:
    """The anchor's layers: 2..L-2 (sinks selected from layer 2 on; the last layer excluded)."""
    checks.count(n_layers, "n_layers", minimum=4)
    return list(range(2, n_layers - 1))


def _as_mask(tm, positions, what: str) -> Tensor:
    """A TokenMap spec, a Selection, or bool `[batch|1, pos]` / `[pos]` -> bool `[b, pos]`."""
    if isinstance(positions, str) or hasattr(positions, "label"):
        return tm.select(positions).mask
    t = torch.as_tensor(positions)
    if t.dtype != torch.bool:
        raise ValueError(f"{what}: pass a TokenMap spec, a Selection or a bool mask, got {t.dtype} values")
    t = t if t.dim() == 2 else t[None]
    if t.shape[-1] != tm.seq_len or t.shape[0] not in (1, tm.batch):
        raise ValueError(f"{what}: a mask of shape {tuple(t.shape)} does not fit the TokenMap [{tm.batch}, {tm.seq_len}]")
    return t


def redistribute(pattern: Tensor, media: Tensor, sinks: Tensor, after: Tensor, p: float, rho: float, summ: float) -> Tensor:
    """pattern `[b, h, q, k]`; media, sinks bool `[b, k]`; after bool `[b, q]` (queries that may be
    edited) -> the redistributed pattern (same shape)."""
    pf = pattern.float()
    m, s = media[:, None, None, :].float(), sinks[:, None, None, :].float()
    media_sinks = m * s
    mass = (pf * m).sum(-1)  # [b, h, q]
    share = (pf * media_sinks).sum(-1) / (mass + EPS * m.sum(-1))
    pick = (share <= rho) & (mass >= summ) & after[:, None, :] & (media_sinks.sum(-1) > 0)
    budget = (1 - p) * (pf * s).sum(-1, keepdim=True)  # [b, h, q, 1]
    rest = pf * m * (1 - s)
    ratio = rest / rest.sum(-1, keepdim=True).clamp_min(torch.finfo(pf.dtype).tiny)
    new = pf * (1 - (1 - p) * s) + budget * ratio
    return torch.where(pick[..., None], new, pf).to(pattern.dtype)


def var(tm, sinks, layers, media="audio|video|image", p: float = DEFAULT_P, rho: float = DEFAULT_RHO,
        summ: float = DEFAULT_SUMM, rows: Sequence[int] | None = None) -> Intervention:
    """The VAR edit in `layers` (see the module; `var_layers(n_layers)` gives the anchor's). `sinks`: a
    TokenMap spec, Selection or bool mask of sink positions for every layer, or a mapping layer -> one
    of those (per-layer sinks, as the anchor flags them per layer; `layers` must then be its keys).
    `media`: the tokens whose sinks define media-centric heads and which receive the mass.

        sinks = find_sinks(model, inputs, ratio=8, tau=2.5).df.pos.tolist()
        iv = var(tm, sinks=torch.isin(torch.arange(tm.seq_len), torch.tensor(sinks)), layers=[2])
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    checks.finite(p, "var: p", minimum=0)
    checks.finite(rho, "var: rho", minimum=0)
    checks.finite(summ, "var: summ", minimum=0)
    if p > 1:
        raise ValueError(f"var: p scales the attention to sinks and must be in [0, 1], got {p}")
    layers = layer_list(layers, "var")
    if isinstance(sinks, Mapping):
        missing = sorted(set(layers) - set(sinks))
        if missing:
            raise ValueError(f"var: no sinks given for layer(s) {missing}; the mapping must cover every layer in layers")
        per_layer = {l: _as_mask(tm, sinks[l], f"var: sinks of layer {l}") for l in layers}
    else:
        one = _as_mask(tm, sinks, "var: sinks")
        per_layer = {l: one for l in layers}
    media_m = tm.mask(media, nonempty=True)
    idx = torch.arange(tm.seq_len)
    last_media = torch.where(media_m, idx, -1).amax(-1, keepdim=True)  # [b, 1]
    after = idx[None] > last_media  # [b, pos]
    if not any(bool((v & media_m).any()) for v in per_layer.values()):
        raise ValueError("var: no sink lies among the media tokens in any layer, so no head qualifies and nothing would change")
    label = sinks if isinstance(sinks, str) else getattr(sinks, "label", "mask")
    params = {"media": tm.select(media).label, "sinks": "per layer" if isinstance(sinks, Mapping) else str(label),
              "p": p, "rho": rho, "summ": summ, "layers": list(layers)}

    def make(rows):
        def fn(pattern: Tensor, hook) -> Tensor:
            b, h, q, k = pattern.shape
            if k != tm.seq_len:
                raise ValueError(f"var: the TokenMap has {tm.seq_len} positions, the attention sees {k} keys")
            dev = pattern.device
            s = batch_rows(per_layer[hook.layer()].to(dev), b, None, "var sinks")
            m = batch_rows(media_m.to(dev), b, None, "var media")
            a = batch_rows(after.to(dev), b, rows, "var")[:, k - q:]
            return redistribute(pattern, m, s, a, p, rho, summ)

        return [(f"blocks.{l}.attn.hook_pattern", fn) for l in layers]

    iv = Intervention([Part("var", params, make, layers)])
    return iv if rows is None else iv.on_rows(rows)


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    """p(answer) and the top token with VAR's redistribution at the sinks `find_sinks` finds, at every
    layer of `layers` (default `var_layers`), one forward with the edit. A sample with no sink among
    its media has nothing to redistribute: VAR is the identity there, and its row says `applied=False`."""
    from patching.engine.metrics import AnswerProb, relative_change
    from patching.engine.sweep import forward_rows, samples
    from patching.methods.sinks import NoSinkDimensions, find_sinks

    model = x.model
    sink_opts = opts.pop("sinks", None) or {}
    layers = opts.pop("layers", None) or var_layers(model.cfg.n_layers)
    media = opts.get("media", "audio|video|image")
    why = ""
    try:
        found = find_sinks(model, x.enc, tm=x.tm, **sink_opts).df
    except NoSinkDimensions as e:  # the setting is wrong for this model on the first sample; later, this sample has none
        if x.first:
            raise ValueError(f"var, on the first sample: {e} (set them with var.sinks={{\"ratio\": ...}})") from None
        found, why = pd.DataFrame({"pos": []}), f"no sink dimension: {e}"
    sinks = torch.zeros(1, x.tm.seq_len, dtype=torch.bool)
    sinks[0, found.pos.astype(int).tolist()] = True
    n_media_sinks = int((sinks & x.tm.mask(media)).sum())
    (s,) = samples(model, x.enc, x.tm)
    metric = AnswerProb([x.answer])
    with torch.no_grad():
        base = forward_rows(model, s, 1)
        if n_media_sinks:
            iv = var(x.tm, sinks, layers, **opts).check(model, 1)
            with model.hooks(fwd_hooks=list(iv)):
                lg = forward_rows(model, s, 1)
        else:  # no media sink: no head qualifies, the edit changes nothing
            lg = base
    p_orig, p = metric(base), metric(lg)
    return pd.DataFrame([dict(sample=0, intervention="var", layers=" ".join(map(str, layers)), n_sinks=int(sinks.sum()),
                              n_media_sinks=n_media_sinks, applied=bool(n_media_sinks), p_orig=float(p_orig[0]), p=float(p[0]),
                              rel_change=float(relative_change(p, p_orig)[0]), pred_orig=int(base[0].argmax()),
                              pred=int(lg[0].argmax()), correct_orig=bool(metric.correct(base)[0]),
                              correct=bool(metric.correct(lg)[0]),
                              why=why or ("" if n_media_sinks else "no sink among the media tokens: VAR changes nothing"))])


def _check(opts: dict, window, cfg=None) -> None:
    """Without a `sinks` option every sample runs `find_sinks` with its defaults: check those against the
    model's width before its weights load (a given `sinks` option is checked by the registry)."""
    from patching.methods.sinks import check_settings

    if opts.get("sinks") is None:
        check_settings({}, cfg, "var.sinks (not given: find_sinks' defaults; set them with var.sinks={\"tau\": ...})")


EXPERIMENT = Experiment(
    "var", var, check=_check, by=("intervention",), value="correct", label="accuracy", outcome="binary", run=_run,
    cells=("intervention",), extra_options=frozenset({"sinks", "layers"}), not_options=frozenset({"sinks", "rows"}),
    paired=("correct", "correct_orig"),
    report=Report("VAR (visual attention redistribution): accuracy with and without it", baseline="correct_orig"),
    columns=("intervention", "layers", "n_sinks", "n_media_sinks", "applied", "p_orig", "p", "rel_change",
             "pred_orig", "pred", "correct_orig", "correct", "why"),
)
