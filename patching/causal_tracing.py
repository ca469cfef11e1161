"""Causal tracing (ROME, Meng et al. 2022; the cross-modal-hub paper's variant).

Corrupt a token group's input embeddings (`hook_embed`) with Gaussian noise of `noise_scale` x the
std of those embeddings (ROME: 3x, `n_noise` = 10 draws), or zero them (`mode="zero"`), or pass a
corrupted input outright (`corrupted=`, e.g. `patching.corrupt.zero_modality(inputs, "video")`: black
frames or silence at the media level, same layout). Then
restore the clean state of a token set at one site — the residual (`resid`, `hook_resid_pre`) or the
attention input (`attn_in`, `ln1.hook_normalized`: only what attention reads changes, as the hub
paper did) — at every layer of a window centred on each layer (or all layers at once, `window=None`).
Indirect effect = p_restored(answer) - p_corrupt(answer), averaged over noise draws; the same for the
corrupted run's own prediction (`ie_corrupt_pred`, the mirror).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from patching import checks
from patching.activation_patching import cache_sample, check_same_layout
from patching.hooks import ablate, add_noise, patch_from_cache, site_name
from patching.intervention import Intervention
from patching.knockout import window_layers
from patching.metrics import AnswerProb
from patching.results import Result
from patching.sweep import forward_rows, run_rows, samples

RESTORE_SITES = {"resid": "resid_pre", "attn_in": "attn_in", "attn_out": "attn_out", "mlp_out": "mlp_out"}


def causal_tracing(
    model,
    inputs: dict,
    answers=None,
    corrupt="audio",
    mode: str = "noise",
    corrupted: dict | None = None,
    restore: Sequence[str] = ("resid", "attn_in"),
    tokens: Sequence | None = None,
    window: int | None = 1,
    centres: Sequence[int] | None = None,
    n_noise: int = 10,
    noise_scale: float = 3.0,
    noise_std: float | None = None,
    seed: int = 0,
    tm=None,
    batch_size: int | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
) -> Result:
    """`answers`: correct token id per sample, or one for all (default: the clean top token). `corrupt`: the TokenMap
    spec corrupted (noise/zero modes). `tokens`: specs of the token sets to restore (default
    `[corrupt]`, ROME's subject tokens). `window`: layers per restoration (1 = single layer; None =
    all layers at once). One row per (sample, site, tokens, centre layer)."""
    if mode not in ("noise", "zero", "inputs"):
        raise ValueError(f"mode must be 'noise', 'zero' or 'inputs' (with corrupted=), got {mode!r}")
    if (mode == "inputs") != (corrupted is not None):
        raise ValueError("pass corrupted= exactly when mode='inputs'")
    restore = checks.nonempty(restore, "restore")
    unknown = [r for r in restore if r not in RESTORE_SITES]
    if unknown:
        raise ValueError(f"restore site(s) {unknown} unknown; choose from {list(RESTORE_SITES)}")
    sets = [corrupt] if tokens is None else checks.nonempty(tokens, "tokens", none_ok=True)
    checks.count(n_noise, "n_noise")
    checks.finite(noise_scale, "noise_scale", minimum=0)
    if noise_std is not None:
        checks.finite(noise_std, "noise_std", minimum=0)
    L = model.cfg.n_layers
    centres = checks.layers(model, centres, "centres")
    windows = [(None, range(L))] if window is None else [(c, window_layers(c, window, L)) for c in centres]
    if answers is not None:
        AnswerProb(answers).check(model, checks.batch_of(inputs))
    if corrupted is not None and checks.batch_of(corrupted) != checks.batch_of(inputs):
        raise ValueError(f"inputs hold {checks.batch_of(inputs)} samples, corrupted {checks.batch_of(corrupted)}; pair them one to one")
    clean = samples(model, inputs, tm)
    for s in clean:  # every token set of every sample selects something, before the first forward
        for spec in sets + ([] if mode == "inputs" else [corrupt]):
            s.tm.mask(spec, nonempty=True)
    bad_ones = samples(model, corrupted) if corrupted is not None else [None] * len(clean)
    rows = []
    for s, c in zip(clean, bad_ones):
        if c is not None:
            check_same_layout(s, c)
        target = c or s
        sels = [s.tm.select(t) for t in sets]
        names = sorted({site_name(RESTORE_SITES[r], l) for r in restore for l in range(L)})
        cache = cache_sample(model, s, names)
        with torch.no_grad():
            lc = forward_rows(model, s, 1)
        metric = AnswerProb(lc.argmax(-1)) if answers is None else AnswerProb(answers)
        idx = 0 if answers is None else s.index
        p_clean = float(metric(lc, idx)[0])
        if mode == "noise":
            where = s.tm.select(corrupt)
            std = noise_std if noise_std is not None else noise_scale * float(s.embeds[0, where.mask[0].to(s.embeds.device)].float().std())
            corruptions = [add_noise("hook_embed", where, std, seed=seed + i) for i in range(n_noise)]
        elif mode == "zero":
            corruptions = [ablate("hook_embed", "zero", positions=s.tm.select(corrupt))]
        else:
            corruptions = [Intervention()]
        base = run_rows(model, target, corruptions, batch_size=batch_size, max_batch_tokens=max_batch_tokens, progress=False)
        answer = int(metric._pick(metric.answer, idx, 1, "cpu")[0])
        preds = base.argmax(-1).tolist()  # the corrupted prediction of each draw
        cand = sorted({answer, *preds})
        col = {t: i for i, t in enumerate(cand)}
        probs_corrupt = base.float().softmax(-1)[:, cand].cpu()  # [draws, cand]
        cells, ivs = [], []
        for r in restore:
            for sel in sels:
                for centre, layers in windows:
                    patch = patch_from_cache(cache, [site_name(RESTORE_SITES[r], l) for l in layers], sel)
                    for k, corr in enumerate(corruptions):
                        cells.append((r, sel.label, centre, layers.start, layers.stop - 1, k))
                        ivs.append(corr + patch)
        probs = run_rows(model, target, ivs, batch_size=batch_size, max_batch_tokens=max_batch_tokens, progress=progress,
                         desc=f"tracing sample {s.index}", reduce=lambda lg: lg.float().softmax(-1)[:, cand].cpu())
        per: dict = {}
        for cell, pr in zip(cells, probs):
            per.setdefault(cell[:5], []).append((cell[5], pr))
        for (r, label, centre, lo, hi), vals in per.items():
            n = len(vals)
            ie = sum(float(pr[col[answer]] - probs_corrupt[k, col[answer]]) for k, pr in vals) / n
            ie_wrong = sum(float(pr[col[preds[k]]] - probs_corrupt[k, col[preds[k]]]) for k, pr in vals) / n
            rows.append(dict(sample=s.index, site=r, tokens=label, layer=-1 if centre is None else centre,
                             window_start=lo, window_end=hi, p_clean=p_clean,
                             p_corrupt=float(probs_corrupt[:, col[answer]].mean()),
                             p_restored=sum(float(pr[col[answer]]) for _, pr in vals) / n, indirect_effect=ie,
                             ie_corrupt_pred=ie_wrong, correct=bool(metric.correct(lc, idx)[0])))
    settings = dict(corrupt=str(corrupt), mode=mode, restore=restore, tokens=[str(t) for t in sets],
                    window=window, n_noise=n_noise if mode == "noise" else 1, noise_scale=noise_scale, noise_std=noise_std, seed=seed)
    return Result("causal_tracing", pd.DataFrame(rows), settings)
