"""Attention sinks among media tokens and which of them are cross-modal ("Probing Cross-modal
Information Hubs", Jung et al., `kaistmm/crossmodal-hub` `logic/sink.py` and
`causal_tracing_modality_sink.py`; visual sinks: Kang et al.; massive activations: Sun et al. 2024).

1. `sink_dimensions`: the model's massive-activation dimensions, found, not hard-coded (the hub
   hard-codes 458 and 2570 for the 7B Thinker): the dimensions whose largest |hidden state|
   (residual stream entering each layer) is at least `ratio` x the median |hidden state|.
2. `find_sinks`: a position is flagged at a layer when `max_d |h / rms(h)|[d] > tau` over the sink
   dimensions (the RMS-normalised residual entering the layer, without the norm's weight). The hub's
   rule (`select="prompt"`, default): rank every flagged position of the prompt by the number of
   layers that flag it (ties in first-flagged order, as `Counter.most_common`), keep the first
   `K = int(prompt_len / k_divide)`, then intersect with each modality. The per-modality rule
   (`select="modality"`) keeps the `n_modality_tokens // k_divide` most flagged of each modality.
3. Modality dominance score per sink and layer: `v` = mean attention to it from later video tokens,
   `a` = from later audio tokens (head-averaged), `MDS = (v - a) / (v + a + 1e-9)`, averaged over
   layers. The hub counts a mean over no later tokens as 0 (`empty="zero"`, so MDS = +-1);
   `empty="nan"` makes the whole score NaN instead. `direction="sink_looks_back"` (the other branch of
   the hub's `analyze_sink_modality_causal_fast`) reads the sink's own row instead: `v` = its mean
   attention to video keys at or before it, `a` to audio keys. Cross-modal sinks: the hub sorts each modality's
   sinks by MDS (stable, in rank order) and takes the upper ceil(n/2) for audio sinks (attended by
   video), the lower ceil(n/2) for video sinks (`split="rank"`); `split="median"` takes those strictly
   above (audio) / below (video) the median.

The hub's other selections (`logic/sink.py`): `select="min_layers"` (`get_global_llm_sink_token`):
every media position flagged at `min_layers` layers or more, most flagged first, no K cut;
`select="layer"` (`get_layer_llm_sink_token`): the flagged positions of each layer below
`layer_limit` on their own, one row per (layer, sink), its MDS that layer's only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import pandas as pd
import torch

from patching.engine import checks
from patching.engine.experiment import Experiment, Plot, Report, StudySample
from patching.engine.results import Result
from patching.engine.sweep import samples

MDS_EPS = 1e-9  # the hub's denominator guard, `(v - a) / (v + a + 1e-9)`
# of the hub's 28 layers: get_global_llm_sink_token(min_layers=8), get_layer_llm_sink_token(layer_limit=23)
HUB_DEPTH, HUB_MIN_LAYERS, HUB_LAYER_LIMIT = 28, 8, 23
SELECT = ("prompt", "modality", "min_layers", "layer")
DIRECTIONS = ("future_looks_sink", "sink_looks_back")
CROSS_MODAL_FROM = {"audio": "video", "video": "audio"}  # an audio sink is cross-modal when video reads it


def _resid_inputs(model, sample, layers) -> dict[int, torch.Tensor]:
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(
            inputs_embeds=sample.embeds, position_ids=sample.position_ids, names_filter=names, return_type=None
        )
    return {l: cache[f"blocks.{l}.hook_resid_pre"][0].float() for l in layers}  # [pos, d]


class NoSinkDimensions(ValueError):
    """No dimension reaches `ratio` x the median |activation|; `largest` is the largest ratio found."""

    def __init__(self, ratio: float, largest: float):
        self.ratio, self.largest = ratio, largest
        super().__init__(f"no dimension reaches {ratio:g}x the median |activation| (the largest here is {largest:.3g}x): this "
                         f"model shows no massive activations at that ratio; pass a ratio= below {largest:.3g}, or dims=")


def _peaks(model, inputs: dict, layers, tm) -> tuple[torch.Tensor, torch.Tensor]:
    """(peak |h| per dimension `[d_model]`, median |h|) over the residual entering `layers`."""
    peak = torch.zeros(model.cfg.d_model)
    medians = []
    for s in samples(model, inputs, tm):
        for h in _resid_inputs(model, s, layers).values():
            peak = torch.maximum(peak, h.abs().amax(0).cpu())
            medians.append(h.abs().median().cpu())
    return peak, torch.stack(medians).median()


def sink_dimensions(model, inputs: dict, ratio: float = 100.0, layers: Sequence[int] | None = None, tm=None) -> list[int]:
    """Dimensions of massive activations over the samples of `inputs` (sorted by magnitude).

        sink_dimensions(model, inputs, ratio=10)  # the toy shows none at the default ratio of 100
    """
    layers = checks.layers(model, layers)
    checks.finite(ratio, "ratio", minimum=0)
    peak, median = _peaks(model, inputs, layers, tm)
    dims = (peak >= ratio * median).nonzero()[:, 0]
    return dims[peak[dims].argsort(descending=True)].tolist()


def flags(resid: dict[int, torch.Tensor], dims: Sequence[int], tau: float, eps: float) -> torch.Tensor:
    """bool `[layers, pos]`: `max_d |h / rms(h)|[d] > tau` over `dims`, for each `[pos, d_model]`
    residual of `resid` (RMSNorm without its weight)."""
    out = []
    for h in resid.values():
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out.append((normed[:, list(dims)].abs().amax(-1) > tau).cpu())
    return torch.stack(out)


def rank_flagged(flagged: torch.Tensor) -> list[int]:
    """Flagged positions ordered as the hub's `Counter(...).most_common()` orders them: by the number
    of layers that flag them (descending), ties by first appearance (earliest flagging layer, then
    position). `flagged`: bool `[layers, pos]`."""
    counts = flagged.sum(0)
    first = torch.where(flagged.any(0), flagged.float().argmax(0), flagged.shape[0])
    pos = counts.nonzero()[:, 0].tolist()
    return sorted(pos, key=lambda p: (-int(counts[p]), int(first[p]), p))


def hub_scaled(value: int, n_layers: int) -> int:
    """A layer count of the hub's 28-layer Thinker (`min_layers` 8, `layer_limit` 23) as the same share
    of `n_layers` (rounded, at least 1): 8 -> 8 of 28, 1 of 4."""
    return max(1, round(value * n_layers / HUB_DEPTH))


def find_sinks(
    model,
    inputs: dict,
    dims: Sequence[int] | None = None,
    tau: float = 25.0,
    k_divide: int = 2,
    modalities: Sequence[str] = ("audio", "video"),
    layers: Sequence[int] | None = None,
    ratio: float = 100.0,
    select: str = "prompt",
    empty: str = "zero",
    split: str = "rank",
    min_layers: int | None = None,
    layer_limit: int | None = None,
    direction: str = "future_looks_sink",
    tm=None,
) -> Result:
    """Sinks per sample and modality, with their MDS and whether they are cross-modal; one row per
    sink: `sample`, `modality`, `pos` (position in the sample without its padding), `rank` (0 = most
    often flagged), `layers_flagged`, `mds`, `cross_modal` (and `layer` with `select="layer"`). A sample
    without a sink has no row; the settings say per sample how many sinks it has and the largest
    `|h / rms(h)|` at the sink dimensions (`n_sinks`, `max_normalised`: what tau this model reaches there).

    `dims`: sink dimensions (default `sink_dimensions(model, inputs, ratio)`). `tau`: threshold on
    the RMS-normalised residual (hub 25; Kang et al. 20); it must be below sqrt(d_model), the largest
    value one dimension can reach. `select`: "prompt" (hub, `K = int(prompt_len / k_divide)` over the
    whole prompt, then the media), "modality" (`n_modality // k_divide` per modality), "min_layers"
    (the hub's `get_global_llm_sink_token`: flagged at >= `min_layers` layers, default its 8 of 28
    scaled to the layers looked at) or "layer" (its `get_layer_llm_sink_token`: each layer below
    `layer_limit`, default its 23 of 28 scaled to the model, on its own; rank in position order,
    MDS and the cross-modal split per layer). `empty`: "zero" (hub: a mean over no later tokens is
    0) or "nan". `split`: "rank" (hub: ceil(n/2) by rank) or "median" (strictly above / below the
    median). `direction`: "future_looks_sink" (hub default: later video / audio queries reading the
    sink) or "sink_looks_back" (the sink's row over video / audio keys at or before it). `layers`:
    where sinks are flagged and MDS is averaged (default all, as the hub's 28 of 28).

        res = find_sinks(model, inputs, ratio=8, tau=2.5)  # tau below sqrt(d_model): the toy is 128 wide
        res.df[["modality", "pos", "layers_flagged", "mds", "cross_modal"]]
    """
    checks.count(k_divide, "k_divide")
    checks.finite(tau, "tau")
    for name, value, valid in (("select", select, SELECT), ("empty", empty, ("zero", "nan")),
                               ("split", split, ("rank", "median")), ("direction", direction, DIRECTIONS)):
        if value not in valid:
            raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
    for name, value, used in (("min_layers", min_layers, "min_layers"), ("layer_limit", layer_limit, "layer")):
        if value is not None and select != used:
            raise ValueError(f"{name}={value} applies to select={used!r} only (select is {select!r}); drop it or "
                             f"pass select={used!r}")
    modalities = checks.nonempty(modalities, "modalities")
    if split == "rank":
        odd = [m for m in modalities if m not in CROSS_MODAL_FROM]
        if odd:
            raise ValueError(f"modalities {odd} have no cross-modal direction (the hub's MDS splits audio and video "
                             f"sinks); use modalities from {list(CROSS_MODAL_FROM)}")
    layers = checks.layers(model, layers)
    n_layers = model.cfg.n_layers
    if select == "min_layers":
        min_layers = hub_scaled(HUB_MIN_LAYERS, len(layers)) if min_layers is None else min_layers
        checks.count(min_layers, "min_layers", unit=" layer")
        if min_layers > len(layers):
            raise ValueError(f"min_layers={min_layers} can never be reached: sinks are flagged at {len(layers)} "
                             f"layers; pass min_layers <= {len(layers)}")
    if select == "layer":
        layer_limit = hub_scaled(HUB_LAYER_LIMIT, n_layers) if layer_limit is None else layer_limit
        checks.count(layer_limit, "layer_limit", unit=" layer")
        if layer_limit > n_layers:
            raise ValueError(f"layer_limit={layer_limit} exceeds the model's {n_layers} layers; pass 1..{n_layers}")
        if not any(l < layer_limit for l in layers):
            raise ValueError(f"no layer of {layers} is below layer_limit={layer_limit}; raise it or choose lower layers")
    if dims is not None:  # negative dims would silently count from the end
        dims = checks.indices(checks.nonempty(dims, "dims", none_ok=True), model.cfg.d_model, "dims", "dimensions")
    check_tau(tau, model.cfg.d_model)
    if dims is None:
        checks.finite(ratio, "ratio", minimum=0)
        peak, median = _peaks(model, inputs, layers, tm)
        found = (peak >= ratio * median).nonzero()[:, 0]
        dims = found[peak[found].argsort(descending=True)].tolist()
        if not dims:
            raise NoSinkDimensions(ratio, float(peak.max() / median))
    rows, per_sample = [], []
    for s in samples(model, inputs, tm):
        resid = _resid_inputs(model, s, layers)
        flagged = flags(resid, dims, tau, model.cfg.eps)  # [layers, pos]
        count = flagged.sum(0)
        masks = {m: s.tm.mask(m)[0].cpu() for m in {*modalities, "video", "audio"}}
        if select == "layer":
            kept = _keep_per_layer(flagged, layers, layer_limit, masks, modalities)
        else:
            kept = _keep(flagged, masks, modalities, select, k_divide, min_layers)
            kept = {m: [(None, p) for p in ps] for m, ps in kept.items()}
        per_sample.append(dict(sample=s.index, n_sinks=sum(map(len, kept.values())), n_flagged=int(flagged.any(0).sum()),
                               max_normalised=max_normalised(resid, dims, model.cfg.eps)))
        if not any(kept.values()):
            continue
        patterns = _patterns(model, s, layers)
        for m in modalities:
            for rank, (layer, p) in enumerate(kept[m]):
                v, a = _mean_attention_from(patterns, p, masks["video"], masks["audio"], empty, direction)
                if layer is not None and len(v):
                    v, a = v[layers.index(layer)][None], a[layers.index(layer)][None]
                mds = ((v - a) / (v + a + MDS_EPS)).nanmean().item() if len(v) else float("nan")
                row = dict(sample=s.index, modality=m, pos=p, rank=rank, layers_flagged=int(count[p]), mds=mds)
                rows.append(row if layer is None else {**row, "layer": layer})
    per_layer = select == "layer"
    columns = ["sample", "modality", *(["layer"] if per_layer else []), "pos", "rank", "layers_flagged", "mds"]
    df = pd.DataFrame(rows, columns=columns)
    df["cross_modal"] = False
    groups = ["sample", "layer", "modality"] if per_layer else ["sample", "modality"]
    for key, part in df.groupby(groups):
        df.loc[part.index, "cross_modal"] = cross_modal(part.mds.tolist(), key[-1], split)
    settings = dict(dims=dims, tau=tau, k_divide=k_divide, modalities=list(modalities), layers=layers, ratio=ratio,
                    select=select, empty=empty, split=split, min_layers=min_layers, layer_limit=layer_limit,
                    direction=direction, per_sample=per_sample)
    return Result("sinks", df, settings)


def check_tau(tau: float, d_model: int) -> None:
    """Refuse a tau that `|h / rms(h)|` can never exceed: one dimension holds at most all of the
    squared norm, so it is at most sqrt(d_model)."""
    limit = math.sqrt(d_model)
    if tau >= limit:
        raise ValueError(
            f"tau={tau:g} can never be exceeded: |h / rms(h)| is at most sqrt(d_model) = {limit:.2f} for this model "
            f"(d_model {d_model}; the hub's 25 and Kang et al.'s 20 are for d_model 3584, whose bound is 59.87); pass a "
            f"tau below {limit:.2f} (the ratio= of the sink dimensions is checked on the first sample)"
        )


def max_normalised(resid: dict[int, torch.Tensor], dims: Sequence[int], eps: float) -> float:
    """The largest `|h / rms(h)|` at `dims` over the layers and positions of `resid` (what `flags`
    compares with tau)."""
    out = 0.0
    for h in resid.values():
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = max(out, float(normed[:, list(dims)].abs().max()))
    return out


def _keep(flagged, masks, modalities, select, k_divide, min_layers=None) -> dict[str, list[int]]:
    """Kept sink positions per modality, in rank order."""
    ranked = rank_flagged(flagged)
    if select == "prompt":
        top = ranked[: int(flagged.shape[1] / k_divide)]
        return {m: [p for p in top if masks[m][p]] for m in modalities}
    count = flagged.sum(0)
    if select == "min_layers":  # get_global_llm_sink_token: count >= min_layers, a stable sort by count
        return {m: [p for p in ranked if masks[m][p] and int(count[p]) >= min_layers] for m in modalities}
    out = {}
    for m in modalities:  # the earlier rule: most flagged first, ties by position
        k = max(1, int(masks[m].sum()) // k_divide)
        out[m] = sorted((p for p in ranked if masks[m][p]), key=lambda p: (-int(count[p]), p))[:k]
    return out


def _keep_per_layer(flagged, layers, layer_limit, masks, modalities) -> dict[str, list[tuple[int, int]]]:
    """`(layer, pos)` per modality: the positions flagged at each layer below `layer_limit`, in layer
    then position order (get_layer_llm_sink_token's `torch.unique` per layer)."""
    out = {m: [] for m in modalities}
    for i, l in enumerate(layers):
        if l >= layer_limit:
            continue
        for p in flagged[i].nonzero()[:, 0].tolist():
            for m in modalities:
                if masks[m][p]:
                    out[m].append((l, p))
    return out


def cross_modal(mds: Sequence[float], modality: str, split: str = "rank") -> list[bool]:
    """Which of one modality's sinks (MDS in rank order) are cross-modal. "rank" (the hub's
    `build_layerlist`): a stable sort by MDS, ascending for audio and descending for video, and the
    last ceil(n/2); NaN scores sort as the hub's `sorted` leaves them (not at all: refused).
    "median": MDS strictly above (audio) / below (video) the median."""
    t = torch.tensor(mds, dtype=torch.float64)
    n = len(mds)
    if split == "median":
        med = t.nanmedian() if n else t
        return (t > med if modality == "audio" else t < med).tolist()
    if bool(t.isnan().any()):
        raise ValueError(f"{int(t.isnan().sum())} {modality} sink(s) have a NaN MDS, which has no rank; use "
                         "empty='zero' (the hub's) or split='median'")
    order = sorted(range(n), key=lambda i: mds[i] if modality == "audio" else -mds[i])
    out = [False] * n
    for i in order[n // 2:]:
        out[i] = True
    return out


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


def _mean_attention_from(patterns, p: int, video: torch.Tensor, audio: torch.Tensor, empty: str = "zero",
                         direction: str = "future_looks_sink"):
    """Per layer `[layers]`: mean attention to position `p` from later video tokens (`v`) and later
    audio tokens (`a`) (`direction="future_looks_sink"`), or from `p`'s own row to video / audio keys at
    or before it (`"sink_looks_back"`), float64: the hub's float32 `(0 - a) / (0 + a + 1e-9)` rounds to
    -1 or one ulp above it by chance, which then decides its rank split; in float64 the 1e-9 orders such
    sinks by `a`. A mean over no tokens is 0 (`empty="zero"`, the hub's) or makes both empty (`"nan"`:
    no score)."""
    idx = torch.arange(patterns[0].shape[0])
    side = idx > p if direction == "future_looks_sink" else idx <= p
    v_rows, a_rows = video & side, audio & side
    if empty == "nan" and (not v_rows.any() or not a_rows.any()):
        return torch.empty(0), torch.empty(0)

    def mean(rows):
        if direction == "future_looks_sink":
            return torch.stack([pat[rows, p].mean() if rows.any() else pat.new_zeros(()) for pat in patterns]).double()
        return torch.stack([pat[p, rows].mean() if rows.any() else pat.new_zeros(()) for pat in patterns]).double()

    return mean(v_rows), mean(a_rows)


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    """A study's sinks of one sample: its sinks, each row with the sample's `n_sinks`; a sample
    without a sink is one row with `n_sinks` 0 and `why` (no NaN cell is averaged from it). No sink
    dimension at `ratio` is refused on the run's first sample (the setting is wrong for this model,
    and the error gives the largest ratio found) and is a row that says so on a later one."""
    try:
        res = find_sinks(x.model, x.enc, tm=x.tm, **opts)
    except NoSinkDimensions as e:
        if x.first:
            raise ValueError(f"sinks, on the first sample: {e}") from None
        return _no_sink(str(e), float("nan"))
    if len(res.df):
        return res.df.assign(n_sinks=len(res.df), why="")
    (info,) = res.settings["per_sample"]
    st = res.settings
    why = (f"no position exceeds tau={st['tau']:g} at the sink dimensions {st['dims']} (the largest |h / rms(h)| there is "
           f"{info['max_normalised']:.3g})" if not info["n_flagged"] else
           f"{info['n_flagged']} position(s) exceed tau={st['tau']:g}, none of them among the {st['modalities']} tokens kept "
           f"(select={st['select']!r}, k_divide={st['k_divide']})")
    return _no_sink(why, info["max_normalised"])


def _no_sink(why: str, largest: float) -> pd.DataFrame:
    return pd.DataFrame([dict(sample=0, modality=None, pos=-1, rank=-1, layers_flagged=0, mds=float("nan"), cross_modal=False,
                              n_sinks=0, why=f"no sink: {why}", max_normalised=largest)])


def _with_sinks(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of sinks found (a sample without one has a row that says so, not a cell)."""
    return df[df["n_sinks"] > 0] if "n_sinks" in df.columns else df


def check_settings(opts: dict, cfg, who: str = "sinks") -> None:
    """`find_sinks`' tau (given in `opts`, else its default) against the model's width, before its weights
    load (`check_tau`); the error starts with `who` (the option that holds them, e.g. "var.sinks")."""
    if cfg is not None:
        tau = opts.get("tau", inspect.signature(find_sinks).parameters["tau"].default)
        try:
            check_tau(checks.finite(tau, "tau"), cfg.d_model)
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None


def _check(opts: dict, window, cfg=None) -> None:
    check_settings(opts, cfg)


EXPERIMENT = Experiment(
    "sinks", find_sinks, by=("modality", "cross_modal"), value="mds", label="MDS (video - audio) / (video + audio)",
    plot=Plot("scatter", x="pos", xlabel="position"), run=_run, cells=("modality", "cross_modal"), check=_check,
    summary_rows=_with_sinks, report=Report("Attention sinks: modality dominance score"),
    columns=("modality", "layer", "pos", "rank", "layers_flagged", "mds", "cross_modal", "n_sinks", "why", "max_normalised"),
)
