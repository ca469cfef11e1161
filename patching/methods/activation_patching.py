"""Activation patching: write one run's activations into another at a (site, layer, positions[, head])
and measure the metric, normalised `(m_patched - m_corrupt) / (m_clean - m_corrupt)` (1 = as clean,
0 = as corrupted). Direction "clean->corrupted" (denoising, the default) patches clean states into the
corrupted run; "corrupted->clean" (noising) the reverse.

Sites: `resid_pre`, `resid_mid`, `resid_post`, `attn_out`, `mlp_out`, `attn_in` (ln1 output) and `head`
(one head of `hook_z`). Positions: `"groups"` (one cell per token group present), `"each"` (one cell
per position), or a list of TokenMap specs.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import pandas as pd
import torch

from hooked_av.inputs.token_map import GROUPS
from hooked_av.utils import SITES, layer_of
from patching.engine import checks
from patching.engine.experiment import Experiment, Plot
from patching.engine.hooks import patch_from_cache, site_name
from patching.engine.metrics import AnswerProb, Metric
from patching.engine.results import Result
from patching.engine.sweep import Sample, forward_rows, run_rows, sample_maps, samples


def check_same_layout(a: Sample, b: Sample, what: str = "clean and corrupted") -> None:
    """Patching position p of one run into position p of another needs the same token layout."""
    check_same_maps(a.tm, b.tm, a.index, what)


def check_same_maps(a, b, index: int, what: str = "clean and corrupted") -> None:
    """`check_same_layout` on two batch-1 TokenMaps (sample `index`), before any tower runs."""
    if a.seq_len != b.seq_len:
        raise ValueError(f"{what} inputs differ in length ({a.seq_len} vs {b.seq_len} tokens, sample {index}); "
                         "patching needs the same layout: corrupt content (tokens, pixels, noise), not the layout")
    if not torch.equal(a.group, b.group):
        at = int((a.group != b.group).nonzero()[0, 1])
        raise ValueError(f"{what} inputs have different token groups at position {at} (sample {index}: "
                         f"{a.names()[at]} vs {b.names()[at]}); patching needs the same layout")


def position_units(tm, positions) -> list[tuple[str, int, object]]:
    """(label, pos or -1, selection-or-positions) cells for a batch-1 TokenMap."""
    if positions == "each":
        return [(tm.names()[p], p, [p]) for p in range(tm.seq_len)]
    if positions == "groups":
        specs = [g for g in GROUPS if g != "padding" and bool(tm.select(g).mask.any())]
    elif positions == "all":
        specs = ["all"]
    else:
        specs = [positions] if isinstance(positions, str) else list(positions)
    out = []
    for spec in specs:
        sel = tm.select(spec)
        if not bool(sel.mask.any()):
            tm.positions(sel)  # raises the TokenMap's clear "selects no position" error
        out.append((sel.label, -1, sel))
    return out


def pair_samples(model, clean: dict, corrupted: dict, tm_clean=None, tm_corrupted=None):
    """Clean and corrupted samples, their layouts checked one to one before any tower runs."""
    ma, mb = sample_maps(model, clean, tm_clean), sample_maps(model, corrupted, tm_corrupted)
    if len(ma) != len(mb):
        raise ValueError(f"clean has {len(ma)} samples, corrupted {len(mb)}; pair them one to one")
    for i, (x, y) in enumerate(zip(ma, mb)):
        check_same_maps(x, y, i)
    return samples(model, clean, tm_clean), samples(model, corrupted, tm_corrupted)


def site_names(model, sites: Sequence[str], layers: Sequence[int]) -> list[str]:
    """The hook names of `sites` (short names of `patching.engine.hooks.SITES` or full hook names) at `layers`,
    checked against the model before anything runs."""
    names = []
    for site in sites:
        if site not in SITES and "." not in site and site not in model.hook_dict:
            close = difflib.get_close_matches(site, list(SITES), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"site {site!r} is neither a site name ({', '.join(SITES)}) nor a hook name{hint}")
        for layer in layers:
            names.append(site_name(site, layer))
            model.check_hook_name(names[-1])
    return names


def cache_sample(model, sample: Sample, names: Sequence[str]) -> dict:
    """Activations of `names` for one sample (batch 1), detached, from the model's layer loop with the
    sample's injections (DeepStack) applied."""
    cache: dict = {}

    def keep(t, hook):
        cache[hook.name] = t.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep) for n in dict.fromkeys(names)]):
        model.run_language_model(**sample.lm_inputs(1), return_type=None)
    return {n: cache[n] for n in names}


def activation_patching(
    model,
    clean: dict,
    corrupted: dict,
    metric: Metric | None = None,
    sites: Sequence[str] = ("resid_pre",),
    layers: Sequence[int] | None = None,
    positions="groups",
    heads: Sequence[int] | None = None,
    direction: str = "clean->corrupted",
    tm_clean=None,
    tm_corrupted=None,
    batch_size: int | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
) -> Result:
    """One row per (sample, site, layer, position unit[, head]) with `metric`, `m_clean`, `m_corrupt`
    and `normalised` (NaN where clean and corrupted give the same metric). `metric` defaults to the
    probability of the clean run's top token.

        res = activation_patching(model, clean, corrupted, AnswerProb([answer]), layers=[0, 2], progress=False)
        res.df[["layer", "tokens", "normalised"]]
    """
    if direction not in ("clean->corrupted", "corrupted->clean"):
        raise ValueError(f"direction must be 'clean->corrupted' or 'corrupted->clean', got {direction!r}")
    sites = checks.nonempty(sites, "sites")
    hook_names = [s for s in sites if s not in SITES]
    if hook_names and layers is not None:  # a hook name is one layer's: layers= would relabel the same patch
        raise ValueError(f"layers= applies to site names ({', '.join(SITES)}); the hook name(s) {hook_names} name their "
                         "own layer: drop layers= or pass site names")
    layers = checks.layers(model, layers)
    if not isinstance(positions, str):
        positions = checks.nonempty(positions, "positions")
    heads = list(range(model.cfg.n_heads)) if heads is None else checks.heads(model, checks.nonempty(heads, "heads", none_ok=True))
    if metric is not None:
        metric.check(model, checks.batch_of(clean), clean)
    names = sorted(set(site_names(model, sites, layers)))  # a hook name once, whatever `layers`
    cl, co = pair_samples(model, clean, corrupted, tm_clean, tm_corrupted)
    rows = []
    for a, b in zip(cl, co):
        with torch.no_grad():
            lc, lx = forward_rows(model, a, 1), forward_rows(model, b, 1)
        m = metric or AnswerProb(lc.argmax(-1))
        idx = a.index if metric is not None else 0
        m_clean, m_corrupt = float(m(lc, idx)[0]), float(m(lx, idx)[0])
        source, target = (a, b) if direction == "clean->corrupted" else (b, a)
        cache = cache_sample(model, source, names)
        cells, ivs = [], []
        for site in sites:
            for layer in layers if site in SITES else [(layer_of(site) or (-1,))[0]]:  # a hook name: its own block
                name = site_name(site, layer)
                for label, pos, where in position_units(target.tm, positions):
                    for h in (heads if site == "head" else [None]):
                        cells.append((site, layer, h, pos, label))
                        ivs.append(patch_from_cache(cache, name, where, heads=None if h is None else [h]))
        vals = run_rows(model, target, ivs, reduce=lambda lg, i=idx, m=m: m(lg, i), batch_size=batch_size,
                        max_batch_tokens=max_batch_tokens, progress=progress, desc=f"patching sample {a.index}")
        gap = m_clean - m_corrupt
        for (site, layer, h, pos, label), v in zip(cells, vals.tolist()):
            norm = (v - m_corrupt) / gap if abs(gap) > 1e-12 else float("nan")
            rows.append(dict(sample=a.index, site=site, layer=layer, head=-1 if h is None else h, pos=pos, tokens=label,
                             metric=v, m_clean=m_clean, m_corrupt=m_corrupt, normalised=norm))
    settings = dict(sites=list(sites), layers=layers, positions=positions if isinstance(positions, str) else list(map(str, positions)),
                    direction=direction, metric=None if metric is None else metric.settings())
    return Result("activation_patching", pd.DataFrame(rows), settings)


# ---- the record ---------------------------------------------------------------------------------
EXPERIMENT = Experiment(
    "activation_patching", activation_patching, by=("site", "layer", "pos"), value="normalised", label="normalised metric",
    plot=Plot("traced", x="layer", series="tokens", panel="site", xlabel="layer"),
)
