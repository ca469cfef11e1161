"""How good an SAE is, per token group (audio, video, image, text): on activations, explained variance, L0,
dead and dense features (`reconstruction_stats`); on the model, the loss recovered when it is spliced in
(`loss_recovered`, also a study experiment, `sae_loss`).

Definitions (docs/features.md, "Training"):
- explained variance: `1 - sum_t |x_t - x^_t|^2 / sum_t |x_t - mean(x)|^2` over the group's tokens (SAELens's
  trainer's `metrics/explained_variance`, the mean taken over the group); interval: percentile bootstrap
  over samples (`patching.engine.stats`, 1000 resamples, seed 0), tokens of a sample resampled together.
- L0: active features (activation > 0) per token, averaged over the group's tokens.
- dead: features active on none of the group's tokens; dense: active on more than `dense` (0.1) of them.
- loss recovered: `(CE_zero - CE_sae) / (CE_zero - CE_clean)`, CE the cross-entropy of the scored answer
  token at the last position, means over samples; `CE_sae` with the group's activations replaced by the
  SAE's reconstruction (the rest untouched: the error term kept off the group), `CE_zero` with them
  zero-ablated at the SAE's hook, `CE_clean` the plain forward. 1: the reconstruction loses nothing the
  answer needs; 0: as bad as removing the activation. Interval: the same bootstrap, the ratio recomputed
  per resample. Undefined (NaN) where zero-ablating the group does not raise the loss.

    stats = reconstruction_stats(sae, acts, groups=meta["group"], samples=meta["id"])   # one row per group
    res = loss_recovered(model, sae, inputs, [answer], groups=["audio", "video", "text"])
    summarise_loss_recovered(res.df)                                                  # one row per group
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from patching.engine import checks
from patching.engine.experiment import Experiment, Plot, Report, StudySample
from patching.engine.features import token_group
from patching.engine.hooks import ablate
from patching.engine.metrics import AnswerLogProb
from patching.engine.results import Result
from patching.engine.stats import N_BOOT, SEED
from patching.engine.sweep import forward_rows, run_rows, sample_maps, samples

MEDIA = ("audio", "video", "image")
DENSE = 0.1  # a feature active on more than this share of a group's tokens is dense


def token_groups(meta: pd.DataFrame) -> np.ndarray:
    """The evaluation group of each token of a store's metadata: its modality where it is a media token
    (audio, video, image), else "text"."""
    mod = meta["modality"].where(meta["modality"].isin(MEDIA), meta["group"])
    return np.where(mod.isin(MEDIA), mod, "text").astype(object)


def _boot_index(n: int, seed: int = SEED, n_boot: int = N_BOOT) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _ratio_ci(num: np.ndarray, den: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of sum(num) / sum(den) over samples resampled with replacement."""
    if len(num) < 2:
        return float("nan"), float("nan")
    idx = _boot_index(len(num))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num[idx].sum(1) / den[idx].sum(1)
    r = r[np.isfinite(r)]
    if not len(r):
        return float("nan"), float("nan")
    lo, hi = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


@torch.no_grad()
def reconstruction_stats(sae, acts: Tensor, groups: Sequence[str], samples: Sequence, dense: float = DENSE,
                         batch_size: int = 8192) -> pd.DataFrame:
    """Per group of tokens (and "all"): `n_tokens`, `n_samples`, `explained_variance` with its 95 % interval
    (`ev_low`, `ev_high`), `l0`, `dead`, `dense` (counts of features) and `mse` (mean squared error per
    token and dimension), of `sae` (an SAELens SAE) on `acts` `[n, d_in]`; `groups` and `samples` label each
    row (the sample sets the bootstrap's unit). See the module for the definitions.

        reconstruction_stats(sae, torch.randn(6, sae.cfg.d_in), ["audio"] * 3 + ["text"] * 3, [0, 0, 1, 1, 2, 2])
    """
    checks.finite(dense, "dense", minimum=0)
    acts = torch.as_tensor(acts)
    groups, samples = np.asarray(groups, dtype=object), np.asarray(samples, dtype=object)
    if acts.dim() != 2 or acts.shape[1] != sae.cfg.d_in:
        raise ValueError(f"activations {tuple(acts.shape)}: the SAE reads [n, {sae.cfg.d_in}]")
    if not (len(groups) == len(samples) == len(acts)) or not len(acts):
        raise ValueError(f"{len(acts)} activations, {len(groups)} group labels and {len(samples)} sample labels: "
                         "give one of each per token (and at least one token)")
    err = torch.empty(len(acts), dtype=torch.float64)
    active = torch.empty(len(acts), sae.cfg.d_sae, dtype=torch.bool)
    for b in range(0, len(acts), batch_size):
        x = acts[b:b + batch_size].to(sae.device, sae.dtype)
        f = sae.encode(x)
        err[b:b + batch_size] = (sae.decode(f) - x).double().pow(2).sum(-1).cpu()
        active[b:b + batch_size] = (f > 0).cpu()
    rows = []
    for g in [*dict.fromkeys(groups), "all"]:
        keep = np.ones(len(acts), dtype=bool) if g == "all" else groups == g
        x = acts[torch.from_numpy(keep)].double()
        dev = (x - x.mean(0)).pow(2).sum(-1).numpy()
        e = err[torch.from_numpy(keep)].numpy()
        ids = samples[keep]
        _, inverse = np.unique(ids.astype(str), return_inverse=True)
        per_err, per_dev = np.bincount(inverse, e), np.bincount(inverse, dev)
        lo, hi = _ratio_ci(per_err, per_dev)
        on = active[torch.from_numpy(keep)]
        share = on.float().mean(0)
        rows.append(dict(group=g, n_tokens=int(keep.sum()), n_samples=len(per_err),
                         explained_variance=float(1 - e.sum() / dev.sum()) if dev.sum() > 0 else float("nan"),
                         ev_low=1 - hi, ev_high=1 - lo, l0=float(on.sum(-1).float().mean()),
                         dead=int((share == 0).sum()), dense=int((share > dense).sum()),
                         mse=float(e.mean() / sae.cfg.d_in)))
    return pd.DataFrame(rows)


def store_stats(sae, store, hook: str, ids: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                dense: float = DENSE) -> pd.DataFrame:
    """`reconstruction_stats` on the tokens of samples `ids` (None: all) of an `ActivationStore`, restricted to
    tokens of `groups` (evaluation groups: audio, video, image, text; None: all), grouped by `token_groups`.

        store_stats(sae, store, "blocks.1.hook_resid_post", ids=["s3", "s7"])
    """
    meta = store.select(None, ids)
    labels = token_groups(meta)
    if groups is not None:
        keep = np.isin(labels, list(groups))
        meta, labels = meta[keep], labels[keep]
    if not len(meta):
        raise ValueError(f"no token of samples {ids} in groups {groups} is in the store")
    return reconstruction_stats(sae, store.activations(hook, meta).float(), labels, meta["id"].to_numpy(), dense)


# ---- loss recovered ------------------------------------------------------------------------------
def hook_of(sae, hook: str | None) -> str:
    """`hook`, else the hook the SAE's metadata names; neither is refused."""
    hook = hook or sae.cfg.metadata.hook_name
    if not hook:
        raise ValueError("the SAE's metadata names no hook; pass hook=")
    return hook


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str, mtime: float):
    from hooked_av.sae import load_sae

    return load_sae(path, device=device)


def sae_of(model, sae):
    """An SAE object from an SAE or the folder of one (loaded once per folder and device, on the model's
    device: a study reads the same folder for every sample)."""
    if isinstance(sae, (str, os.PathLike)):
        folder = Path(sae)
        if not (folder / "cfg.json").is_file():
            raise FileNotFoundError(f"{folder} is not an SAE folder (no cfg.json); give the folder `hooked-av sae train "
                                    "--out` or SAELens's save_model wrote")
        return _load(str(folder.resolve()), str(model.device), (folder / "sae_weights.safetensors").stat().st_mtime)
    return sae


def loss_recovered(model, sae, inputs: dict, answers, groups: Sequence[str] = ("audio", "video", "text"),
                   hook: str | None = None, tm=None, progress: bool = True) -> Result:
    """Per sample and group (`patching.engine.features.token_group` names: audio, video, image, media, text,
    all): the answer token's cross-entropy (nats) of the plain forward (`ce_clean`), with the group's
    activations at `hook` (default the SAE's) replaced by the SAE's reconstruction (`ce_sae`) and zero-ablated
    (`ce_zero`), and `n_tokens`. A group a sample lacks gives no row. `sae`: an SAELens SAE or its folder.
    `summarise_loss_recovered(res.df)` gives the loss recovered per group with its interval.

        res = loss_recovered(model, sae, inputs, [answer], groups=["audio", "video"], progress=False)
        res.df[["group", "ce_clean", "ce_sae", "ce_zero"]]
    """
    sae = sae_of(model, sae)
    hook = hook_of(sae, hook)
    groups = checks.nonempty(groups, "groups")
    metric = AnswerLogProb(answers)
    metric.check(model, checks.batch_of(inputs), inputs)
    for m in sample_maps(model, inputs, tm):  # every group name checked before the towers run
        for g in groups:
            token_group(m, g)
    rows = []
    for s in samples(model, inputs, tm):
        with torch.no_grad():
            clean = -float(metric(forward_rows(model, s, 1), s.index)[0])
        present = [g for g in groups if bool(token_group(s.tm, g).mask.any())]
        ivs = []
        for g in present:
            where = token_group(s.tm, g)
            ivs += [ablate([f"{hook}.hook_sae_error"], "zero", positions=where),  # the reconstruction alone there
                    ablate([hook], "zero", positions=where)]  # the activation zeroed (the SAE maps 0 + error to 0)
        if not ivs:
            continue
        with torch.no_grad(), model.saes(sae, hook_name=hook, use_error_term=True):
            got = -run_rows(model, s, ivs, reduce=lambda lg: metric(lg, s.index), progress=progress, desc="loss recovered")
        for i, g in enumerate(present):
            rows.append(dict(sample=s.index, group=g, n_tokens=int(token_group(s.tm, g).mask.sum()), ce_clean=clean,
                             ce_sae=float(got[2 * i]), ce_zero=float(got[2 * i + 1])))
    return Result("sae_loss", pd.DataFrame(rows), dict(hook=hook, groups=list(groups), d_sae=sae.cfg.d_sae,
                                                       architecture=sae.cfg.architecture()))


def summarise_loss_recovered(df: pd.DataFrame) -> pd.DataFrame:
    """Per group: `n_samples`, the mean cross-entropies, `loss_recovered` = (mean ce_zero - mean ce_sae) / (mean
    ce_zero - mean ce_clean) and its 95 % percentile-bootstrap interval over samples (`lr_low`, `lr_high`).

        summarise_loss_recovered(loss_recovered(model, sae, inputs, [answer], progress=False).df)
    """
    rows = []
    for g, part in df.groupby("group", sort=False):
        num = (part["ce_zero"] - part["ce_sae"]).to_numpy(float)
        den = (part["ce_zero"] - part["ce_clean"]).to_numpy(float)
        lo, hi = _ratio_ci(num, den)
        lr = num.sum() / den.sum() if den.sum() > 0 else float("nan")
        rows.append(dict(group=g, n_samples=len(part), ce_clean=part["ce_clean"].mean(), ce_sae=part["ce_sae"].mean(),
                         ce_zero=part["ce_zero"].mean(), loss_recovered=lr,
                         lr_low=lo if den.sum() > 0 else float("nan"), lr_high=hi if den.sum() > 0 else float("nan")))
    return pd.DataFrame(rows)


def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    opts = dict(opts)
    return loss_recovered(x.model, opts.pop("sae"), x.enc, [x.answer], tm=x.tm, progress=False, **opts).df


def _check(opts: dict, window) -> None:
    folder = Path(str(opts.get("sae")))
    if not (folder / "cfg.json").is_file():
        raise ValueError(f"sae_loss.sae={folder}: not an SAE folder (no cfg.json); give the folder `hooked-av sae train "
                         "--out` or SAELens's save_model wrote")


EXPERIMENT = Experiment(
    "sae_loss", loss_recovered, by=("group",), value="ce_sae", label="cross-entropy of the answer with the SAE (nats)",
    plot=Plot("bars", series="group"), run=_run, cells=("group",), required=("sae",), example={"sae": "runs/sae"},
    check=_check, report=Report("SAE spliced per token group: cross-entropy of the answer (nats)", samples=False),
    columns=("group", "n_tokens", "ce_clean", "ce_sae", "ce_zero"),
)
