"""Attention sinks among media tokens and which of them are cross-modal ("Probing Cross-modal
Information Hubs", Jung et al.; visual sinks: Kang et al.; massive activations: Sun et al. 2024).

1. `sink_dimensions`: the model's massive-activation dimensions, found, not hard-coded: the
   dimensions whose largest |hidden state| (residual stream entering each layer) is at least
   `ratio` x the median |hidden state| of all dimensions.
2. `find_sinks`: a token is a sink at a layer when `max_d |h / rms(h)|[d] > tau` over the sink
   dimensions (the RMS-normalised residual entering the layer, without the norm's weight); per
   modality keep the `n_tokens / k_divide` positions flagged at the most layers.
3. Modality dominance score per sink: `v` = mean attention to it from later video tokens, `a` = from
   later audio tokens (head-averaged), `MDS = (v - a) / (v + a)` averaged over layers; audio sinks
   above their modality's median MDS (attended by video) and video sinks below it are cross-modal.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from patching import checks
from patching.results import Result
from patching.sweep import samples


def _resid_inputs(model, sample, layers) -> dict[int, torch.Tensor]:
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(
            inputs_embeds=sample.embeds, position_ids=sample.position_ids, names_filter=names, return_type=None
        )
    return {l: cache[f"blocks.{l}.hook_resid_pre"][0].float() for l in layers}  # [pos, d]


def sink_dimensions(model, inputs: dict, ratio: float = 100.0, layers: Sequence[int] | None = None, tm=None) -> list[int]:
    """Dimensions of massive activations over the samples of `inputs` (sorted by magnitude)."""
    layers = checks.layers(model, layers)
    checks.finite(ratio, "ratio", minimum=0)
    peak = torch.zeros(model.cfg.d_model)
    medians = []
    for s in samples(model, inputs, tm):
        for h in _resid_inputs(model, s, layers).values():
            peak = torch.maximum(peak, h.abs().amax(0).cpu())
            medians.append(h.abs().median().cpu())
    median = torch.stack(medians).median()
    dims = (peak >= ratio * median).nonzero()[:, 0]
    return dims[peak[dims].argsort(descending=True)].tolist()


def find_sinks(
    model,
    inputs: dict,
    dims: Sequence[int] | None = None,
    tau: float = 20.0,
    k_divide: int = 2,
    modalities: Sequence[str] = ("audio", "video"),
    layers: Sequence[int] | None = None,
    ratio: float = 100.0,
    tm=None,
) -> Result:
    """Sinks per sample and modality, with their MDS and whether they are cross-modal. `dims`:
    sink dimensions (default `sink_dimensions(model, inputs, ratio)`); `tau`: threshold on the
    RMS-normalised residual; keep `n_tokens // k_divide` most often flagged positions per modality."""
    checks.count(k_divide, "k_divide")
    checks.finite(tau, "tau")
    modalities = checks.nonempty(modalities, "modalities")
    layers = checks.layers(model, layers)
    if dims is not None:  # negative dims would silently count from the end
        dims = checks.indices(checks.nonempty(dims, "dims", none_ok=True), model.cfg.d_model, "dims", "dimensions")
    dims = sink_dimensions(model, inputs, ratio, layers, tm) if dims is None else dims
    if not dims:
        raise ValueError(
            f"no dimension reaches {ratio}x the median |activation|: this model shows no massive activations "
            "here; pass dims= explicitly or a lower ratio="
        )
    rows = []
    for s in samples(model, inputs, tm):
        resid = _resid_inputs(model, s, layers)
        flagged = torch.zeros(s.seq_len)
        for h in resid.values():
            normed = h / h.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt()
            flagged += (normed[:, dims].abs().amax(-1) > tau).float().cpu()
        masks = {m: s.tm.mask(m)[0].cpu() for m in modalities}
        patterns = _patterns(model, s, layers)
        for m in modalities:
            pos = masks[m].nonzero()[:, 0]
            if len(pos) == 0:
                continue
            k = max(1, len(pos) // k_divide)
            counts = flagged[pos]
            keep = pos[counts.argsort(descending=True, stable=True)[:k]]
            keep = keep[flagged[keep] > 0]
            for p in keep.tolist():
                v, a = _mean_attention_from(patterns, p, masks.get("video"), masks.get("audio"))
                mds = ((v - a) / (v + a)).nanmean().item() if len(v) else float("nan")
                rows.append(dict(sample=s.index, modality=m, pos=p, layers_flagged=int(flagged[p]), mds=mds))
    df = pd.DataFrame(rows, columns=["sample", "modality", "pos", "layers_flagged", "mds"])
    df["cross_modal"] = False
    for (sample, m), part in df.groupby(["sample", "modality"]):
        median = part.mds.median()
        df.loc[part.index, "cross_modal"] = part.mds > median if m == "audio" else part.mds < median
    settings = dict(dims=dims, tau=tau, k_divide=k_divide, modalities=list(modalities), layers=layers, ratio=ratio)
    return Result("sinks", df, settings)


def _patterns(model, sample, layers) -> list[torch.Tensor]:
    """Head-averaged patterns `[q, k]` per layer (reduced in the hook: no `[heads, q, k]` kept)."""
    out = {}

    def keep(pattern, hook):
        out[hook.layer()] = pattern[0].float().mean(0).cpu()

    with torch.no_grad():
        model.run_with_hooks(
            inputs_embeds=sample.embeds, position_ids=sample.position_ids, return_type=None,
            fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", keep) for l in layers],
        )
    return [out[l] for l in layers]


def _mean_attention_from(patterns, p: int, video: torch.Tensor | None, audio: torch.Tensor | None):
    """Per layer: mean attention to position `p` from later video tokens (`v`) and later audio tokens (`a`)."""
    later = torch.arange(patterns[0].shape[0]) > p
    v_rows = (video & later) if video is not None else torch.zeros_like(later)
    a_rows = (audio & later) if audio is not None else torch.zeros_like(later)
    if not v_rows.any() or not a_rows.any():
        return torch.empty(0), torch.empty(0)
    v = torch.stack([pat[v_rows, p].mean() for pat in patterns])
    a = torch.stack([pat[a_rows, p].mean() for pat in patterns])
    return v, a
