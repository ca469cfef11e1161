"""Which SAE features carry the labelled attributes of clips, and what ablating them does to the answers.

`attribute_features` answers, per value of each attribute (a metadata column of the manifest the store was
harvested from, e.g. the toy's `colour`, `note`): which single feature best separates the clips with the
value from the clips without it (AUROC on the training clips), how well it does on held-out clips (AUROC with
a 95 % interval), on which modality it fires (its share of activation mass on audio and video tokens), how
well the best OR of a few features does, and how well a linear probe on the activations themselves does (the
ceiling: the information is in the layer, linearly, when the probe separates it). `baseline=` adds the same
columns for another SAE (the same architecture untrained: random directions can separate an attribute too).
`ablation_accuracy` runs the model with chosen sets of features ablated on token groups and says per sample
whether the answer survives.

Definitions:
- a clip is one item of a sample (`item` in the store's token metadata); its score for a feature is the
  `pool` ("max" or "mean") of the feature's activation over the clip's tokens in `groups`; its label for an
  attribute is the sample's value, or for a sample of several clips the `item`-th of its comma-separated
  values ("red,blue", as `hooked-av toy-data` writes two-clip rows);
- AUROC = U / (n1 n0), U the Mann-Whitney statistic of the positive clips' scores against the negative ones'
  (`scipy.stats.mannwhitneyu`; ties count one half): the probability that a clip with the value scores
  above one without it. Interval: 95 % percentile bootstrap over the held-out clips, positives and negatives
  resampled separately (1000 resamples, seed 0);
- the best feature: the highest training AUROC (ties: the lowest index); held-out clips never choose;
- the OR set: up to `set_size` features chosen greedily on the training clips (from the 32 best), each
  step adding the feature that most raises the training AUROC of the sum of the set's scores, each score
  divided by its maximum over the training clips; it stops when no feature raises it;
- where a feature fires: its share of activation mass per modality over the store and its `modality`
  (audio, video, image at 0.8 of the mass or more, else "mixed"; "dead" if it never fires), as the feature
  page reads them (`patching.datasets.feature_stats`);
- the probe: a logistic regression on the standardised mean activation of the clip's tokens (mean log loss +
  0.01 |w|^2, `scipy.optimize.minimize`), fitted on the training clips; its held-out AUROC.

    table = attribute_features(sae, "runs/acts", ["colour", "note"], heldout=report["heldout_ids"])
    table[["attribute", "value", "feature", "auroc", "auroc_low", "auroc_high", "modality", "set_auroc"]]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from patching.datasets.activations import ActivationStore
from patching.engine import checks
from patching.engine.features import ablate_features, token_group
from patching.engine.metrics import AnswerProb
from patching.engine.stats import N_BOOT, SEED
from patching.engine.sweep import run_rows, sample_maps, samples
from patching.methods.sae_eval import hook_of, sae_of

POOLS = ("max", "mean")
CANDIDATES = 32  # the OR set is chosen among the best features by training AUROC
MEDIA = ("audio", "video", "image")


def auroc(scores, positive) -> np.ndarray:
    """AUROC of each column of `scores` `[n, f]` (or one score per clip `[n]`) for the bool labels `positive`
    `[n]`: Mann-Whitney U / (n1 n0) (`scipy.stats.mannwhitneyu`, ties counted one half). NaN without a
    positive or a negative.

        auroc(np.array([0.1, 0.9, 0.4, 0.8]), np.array([False, True, False, True]))   # 1.0
    """
    from scipy.stats import mannwhitneyu

    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores for {len(y)} labels; give one label per clip")
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return np.full(s.shape[1:], np.nan) if s.ndim > 1 else np.float64(np.nan)
    u = mannwhitneyu(s[y], s[~y], axis=0, method="asymptotic").statistic
    return np.asarray(u, dtype=float) / (n1 * n0)


def auroc_interval(score, positive, n_boot: int = N_BOOT, seed: int = SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC of one score `[n]`: positives and negatives resampled
    separately with replacement (`n_boot` times, `numpy.random.default_rng(seed)`). NaN, NaN without both."""
    s, y = np.asarray(score, dtype=float), np.asarray(positive, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan"), float("nan")
    wins = (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])  # [n1, n0]: U's terms
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, len(pos), (n_boot, len(pos)))
    ineg = rng.integers(0, len(neg), (n_boot, len(neg)))
    # mean over resampled pairs = (counts of each positive) . wins . (counts of each negative) / (n1 n0)
    cp = np.stack([np.bincount(r, minlength=len(pos)) for r in ip])
    cn = np.stack([np.bincount(r, minlength=len(neg)) for r in ineg])
    stats = np.einsum("bi,ij,bj->b", cp, wins, cn) / (len(pos) * len(neg))
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ---- clips of a store ------------------------------------------------------------------------------------
def clip_labels(store: ActivationStore, attributes: Sequence[str], tokens: pd.DataFrame) -> pd.DataFrame:
    """One row per clip (`id`, `item`) of `tokens` with its value of each attribute (text; None where the
    sample has none), read from the store's sample table (`meta`: the manifest's metadata columns)."""
    table = store.samples(["id", "meta"])
    if not len(table) or "meta" not in table:
        raise ValueError(f"{store.folder} has no sample table with metadata; harvest it with `hooked-av harvest` "
                         "from a manifest whose columns name the attributes")
    meta = {str(i): (json.loads(m) if isinstance(m, str) else {}) for i, m in zip(table["id"], table["meta"])}
    have = sorted({k for m in meta.values() for k in m})
    missing = [a for a in attributes if a not in have]
    if missing:
        raise ValueError(f"attribute(s) {missing} are not metadata columns of the store's samples; they have {have}")
    clips = tokens[["id", "item"]].drop_duplicates().astype({"id": str}).reset_index(drop=True)
    n_items = clips.groupby("id")["item"].transform("max") + 1
    for a in attributes:
        values = []
        for i, item, n in zip(clips["id"], clips["item"], n_items):
            v = meta.get(i, {}).get(a)
            if v is None:
                values.append(None)
                continue
            parts = str(v).split(",")
            if len(parts) not in (1, n):
                raise ValueError(f"sample {i!r}: {a}={v!r} has {len(parts)} comma-separated values for {n} clip(s); "
                                 "give one value, or one per clip in prompt order")
            values.append(parts[0 if len(parts) == 1 else item].strip())
        clips[a] = values
    return clips


@torch.no_grad()
def clip_scores(sae, acts: torch.Tensor, tokens: pd.DataFrame, clips: pd.DataFrame, pool: str = "max",
                batch_size: int = 8192) -> np.ndarray:
    """`[n_clips, d_sae]`: each clip's (`clips` rows: `id`, `item`) pooled feature activations over its tokens
    (`tokens` rows with `id` and `item`, in the order of `acts` `[n_tokens, d_in]`)."""
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: choose from {list(POOLS)}")
    key = pd.MultiIndex.from_frame(tokens[["id", "item"]].astype({"id": str}))
    which = pd.MultiIndex.from_frame(clips[["id", "item"]]).get_indexer(key)
    index = torch.from_numpy(which)
    n, d = len(clips), sae.cfg.d_sae
    out = torch.zeros(n, d, dtype=torch.float64) if pool == "mean" else torch.full((n, d), -torch.inf, dtype=torch.float64)
    for b in range(0, len(acts), batch_size):
        f = sae.encode(acts[b:b + batch_size].to(sae.device, sae.dtype)).double().cpu()
        idx = index[b:b + batch_size]
        if pool == "mean":
            out.index_add_(0, idx, f)
        else:
            out.scatter_reduce_(0, idx[:, None].expand_as(f), f, "amax")
    if pool == "mean":
        out /= torch.from_numpy(np.bincount(which, minlength=n)).double()[:, None]
    return out.numpy()


def _or_set(scores: np.ndarray, y: np.ndarray, order: np.ndarray, size: int) -> list[int]:
    """Greedy OR set on training clips (see the module)."""
    scale = scores.max(0)
    scale[scale <= 0] = 1.0
    chosen: list[int] = []
    best, total = -np.inf, np.zeros(len(y))
    for _ in range(size):
        cand = [f for f in order[:CANDIDATES] if f not in chosen]
        if not cand:
            break
        got = auroc(total[:, None] + scores[:, cand] / scale[cand], y)
        k = int(np.nanargmax(got))
        if not got[k] > best + 1e-12:
            break
        best, f = float(got[k]), int(cand[k])
        chosen.append(f)
        total = total + scores[:, f] / scale[f]
    return chosen


def _probe(x_train: np.ndarray, y_train: np.ndarray, x_held: np.ndarray, penalty: float = 1e-2) -> np.ndarray:
    """Held-out scores (logits) of a logistic regression fitted on standardised training features: mean log loss
    + `penalty` |w|^2 (the intercept free), minimised by `scipy.optimize.minimize` (L-BFGS-B)."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    mu, sd = x_train.mean(0), x_train.std(0)
    sd[sd == 0] = 1.0
    x = np.hstack([(x_train - mu) / sd, np.ones((len(x_train), 1))])
    sign = np.where(y_train, 1.0, -1.0)

    def loss(w):
        z = sign * (x @ w)
        reg = np.r_[w[:-1], 0.0]
        grad = -(x * (sign * expit(-z))[:, None]).mean(0) + 2 * penalty * reg
        return -log_expit(z).mean() + penalty * reg @ reg, grad

    w = minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x
    return np.hstack([(x_held - mu) / sd, np.ones((len(x_held), 1))]) @ w


def _describe(scores, where: pd.DataFrame, clips, attr, values, train, held, set_size, top, within) -> list[dict]:
    rows = []
    for v in values:
        y = (clips[attr] == v).to_numpy()
        au = auroc(scores[train], y[train])
        au = np.where(np.isnan(au), 0.5, au)
        order = np.argsort(-au, kind="stable")
        f = int(order[0])
        held_auc = float(auroc(scores[held, f], y[held]))
        lo, hi = auroc_interval(scores[held, f], y[held])
        members = _or_set(scores[train], y[train], order, set_size)
        scale = np.where(scores[train][:, members].max(0) > 0, scores[train][:, members].max(0), 1.0)
        set_score = (scores[held][:, members] / scale).sum(1)
        shares = {c: float(where.at[f, c]) for c in where.columns if c.startswith("share_")}
        split = {}
        if within is not None:  # the best feature's held-out AUROC among the clips of each value of `within`
            other = clips[within].to_numpy()
            for w in sorted(v for v in clips[within][held].dropna().unique()):
                part = held & (other == w)
                split[w] = float(auroc(scores[part, f], y[part]))
        rows.append(dict(feature=f, auroc_train=float(au[f]), auroc=held_auc, auroc_low=lo, auroc_high=hi,
                         **shares, modality=where.at[f, "group"],
                         set_features=members, set_auroc=float(auroc(set_score, y[held])),
                         top_features=[int(t) for t in order[:top]], **({"auroc_within": split} if within else {})))
    return rows


def attribute_features(sae, store, attributes: Sequence[str], heldout: Sequence[str], *, hook: str | None = None,
                       groups: Sequence[str] = ("audio", "video"), pool: str = "max", set_size: int = 4, top: int = 16,
                       baseline=None, probe: bool = True, within: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per attribute and value: how well the SAE's single best feature separates the held-out clips with the
    value from those without it, where it fires, the OR set, the probe (see the module for the definitions).
    `sae`: an SAELens SAE or its folder, reading `hook` (default: its metadata's) of `store` (an
    `ActivationStore` or its folder); `attributes`: metadata columns of the store's samples; `heldout`: sample
    ids whose clips are held out (e.g. `train_sae`'s report["heldout_ids"]); the others train; `groups`: the
    modalities of the tokens a clip's score pools; `top`: how many features by training AUROC to list;
    `within` `{attribute: other attribute}`: also the best feature's held-out AUROC among the clips of each
    value of the other (`auroc_within`, {value: AUROC}): a feature of one value of the attribute that
    separates it within some values of the other only is a conjunction of the two.

    Columns: `attribute`, `value`, `n_train` / `n_train_pos`, `n_heldout` / `n_heldout_pos` (clips),
    `feature`, `auroc_train`, `auroc`, `auroc_low`, `auroc_high` (held-out, 95 % bootstrap), `share_{modality}`,
    `modality`, `set_features`, `set_auroc` (held-out), `top_features`, `auroc_within` (with `within`),
    `probe_auroc` (held-out), and with
    `baseline` the same for it as `baseline_feature`, `baseline_auroc`, `baseline_auroc_low`,
    `baseline_auroc_high`, `baseline_modality`, `baseline_set_auroc`. Values absent from the training or the
    held-out clips get NaN AUROCs there.

        table = attribute_features(sae, acts, ["colour", "note"], heldout=held, probe=False)
    """
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    attributes = checks.nonempty(attributes, "attributes")
    checks.count(set_size, "set_size", unit=" feature")
    checks.count(top, "top", unit=" feature")
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: choose from {list(POOLS)}")
    from patching.datasets.feature_stats import feature_stats, resolve_hook

    sae, baseline = _sae(sae), None if baseline is None else _sae(baseline)
    hook = resolve_hook(sae, store, hook)
    groups = [g for g in checks.nonempty(groups, "groups")]
    bad = [g for g in groups if g not in MEDIA]
    if bad:
        raise ValueError(f"groups {bad}: a clip's score pools media tokens; choose from {list(MEDIA)}")
    tokens = store.select(None)
    tokens = tokens[tokens["modality"].isin(groups).to_numpy() & (tokens["item"] >= 0).to_numpy()]
    if not len(tokens):
        raise ValueError(f"the store holds no token of {groups}; it holds {sorted(set(store.metadata()['modality']))}")
    within = dict(within or {})
    bad = {a: w for a, w in within.items() if a not in attributes or w == a}
    if bad:
        raise ValueError(f"within {bad}: map an attribute of {list(attributes)} to another metadata column")
    clips = clip_labels(store, list(dict.fromkeys([*attributes, *within.values()])), tokens)
    held_ids = {str(i) for i in heldout}
    unknown = sorted(held_ids - set(clips["id"]))
    if unknown:
        raise ValueError(f"held-out id(s) {unknown[:5]} are not samples of the store with {groups} tokens")
    held = clips["id"].isin(held_ids).to_numpy()
    train = ~held
    if not train.any() or not held.any():
        raise ValueError(f"{int(train.sum())} training and {int(held.sum())} held-out clips: both are needed; hold out "
                         "some of the store's samples, not all")
    acts = store.activations(hook, tokens).float()
    tokens = tokens.assign(id=tokens["id"].astype(str))
    settings = dict(hook=hook, pool=pool, groups=list(groups), set_size=set_size, n_train=int(train.sum()),
                    n_heldout=int(held.sum()), n_boot=N_BOOT, seed=SEED)
    results = []
    for name, one in [("", sae)] + ([("baseline_", baseline)] if baseline is not None else []):
        scores = clip_scores(one, acts, tokens, clips, pool)
        stats = feature_stats(one, store, hook, features=[0], top_k=1).table.set_index("feature")
        where = stats[[c for c in stats.columns if c.startswith("share_") and c[6:] in groups] + ["group"]]
        rows = []
        for a in attributes:
            values = sorted(v for v in clips[a].dropna().unique())
            other = (within or {}).get(a)
            for v, desc in zip(values, _describe(scores, where, clips, a, values, train, held, set_size, top, other)):
                y = (clips[a] == v).to_numpy()
                rows.append(dict(attribute=a, value=v, n_train=int((train & clips[a].notna().to_numpy()).sum()),
                                 n_train_pos=int((train & y).sum()),
                                 n_heldout=int((held & clips[a].notna().to_numpy()).sum()), n_heldout_pos=int((held & y).sum()),
                                 **{f"{name}{k}": val for k, val in desc.items()}))
        results.append(pd.DataFrame(rows))
    table = results[0]
    if baseline is not None:
        keep = ["feature", "auroc", "auroc_low", "auroc_high", "modality", "set_auroc"]
        table = table.join(results[1][[f"baseline_{k}" for k in keep]])
    if probe:
        table["probe_auroc"] = _probe_column(acts, tokens, clips, table, train, held)
    table.attrs.update(settings)
    return table


def _probe_column(acts, tokens, clips, table, train, held) -> list[float]:
    """Held-out AUROC of the probe on the clips' mean activations, per row of `table`."""
    key = pd.MultiIndex.from_frame(tokens[["id", "item"]])
    which = torch.from_numpy(pd.MultiIndex.from_frame(clips[["id", "item"]]).get_indexer(key))
    x = torch.zeros(len(clips), acts.shape[1], dtype=torch.float64).index_add_(0, which, acts.double())
    x = (x / torch.bincount(which, minlength=len(clips)).double()[:, None]).numpy()
    out = []
    for a, v in zip(table["attribute"], table["value"]):
        y = (clips[a] == v).to_numpy()
        has = clips[a].notna().to_numpy()
        tr, he = train & has, held & has
        ok = y[tr].any() and (~y[tr]).any()
        out.append(float(auroc(_probe(x[tr], y[tr], x[he]), y[he])) if ok else float("nan"))
    return out


def _sae(sae):
    """An SAE object from an SAE or its folder (loaded on the CPU)."""
    if isinstance(sae, (str, os.PathLike)):
        from hooked_av.sae import load_sae

        return load_sae(sae)
    return sae


def features_of(table: pd.DataFrame, attribute: str, per_value: int) -> list[int]:
    """The features of `attribute`: the union over its values of the `per_value` best by training AUROC
    (`table`: `attribute_features`'s), sorted.

        features_of(table, "colour", 8)
    """
    rows = table[table["attribute"] == attribute]
    if not len(rows):
        raise ValueError(f"attribute {attribute!r} is not in the table; it has {sorted(set(table['attribute']))}")
    top = len(rows["top_features"].iloc[0])
    checks.count(per_value, "per_value", unit=" feature")
    if per_value > top:
        raise ValueError(f"per_value={per_value}: the table lists the {top} best features per value; rerun "
                         f"attribute_features with top >= {per_value}")
    return sorted({int(f) for fs in rows["top_features"] for f in fs[:per_value]})


# ---- ablation ---------------------------------------------------------------------------------------------
def ablation_accuracy(model, inputs: dict, answers, sae, features: Mapping[str, Sequence[int]], groups="media",
                      hook: str | None = None, tm=None, progress: bool = True) -> pd.DataFrame:
    """Per sample and feature set: p(answer) and whether the answer is still the top token with the set's
    features ablated (`ablate_features`, the SAE spliced at `hook` with its error term) on the tokens of
    `groups`: a `token_group` name ("media", "audio", "video", ...) or one per set `{name: group}`.
    `features`: `{name: [feature, ...]}`;
    the row `ablated="none"` is the SAE spliced with nothing ablated (the plain forward to float rounding).
    Rows: `sample`, `ablated`, `n_features`, `p_answer`, `correct`; one `run_rows` sweep per sample.

        ablation_accuracy(model, inputs, [answer], sae, {"two": [0, 1]}, progress=False)
    """
    sae = sae_of(model, sae)
    hook = hook_of(sae, hook)
    sets = {str(k): [int(f) for f in checks.nonempty(v, f"features[{k!r}]")] for k, v in features.items()}
    if not sets or "none" in sets:
        raise ValueError(f"features: give named sets {{name: [feature, ...]}} (not named 'none', the row of the "
                         f"unedited forward); got {list(sets)}")
    where = dict(groups) if isinstance(groups, Mapping) else dict.fromkeys(sets, groups)
    if set(where) != set(sets):
        raise ValueError(f"groups names sets {sorted(where)}; give one group per feature set {sorted(sets)}, or one for all")
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    metric.check(model, checks.batch_of(inputs))
    for m in sample_maps(model, inputs, tm):
        for g in set(where.values()):
            token_group(m, g)  # refused before the towers run
    rows = []
    with model.saes(sae, hook_name=hook, use_error_term=True):
        for fs in sets.values():
            ablate_features(hook, fs).check(model)  # features the SAE lacks, before any forward
        for s in samples(model, inputs, tm):
            ivs = [ablate_features(hook, fs, positions=token_group(s.tm, where[k])) for k, fs in sets.items()]
            with torch.no_grad():
                clean = model.run_language_model(**s.lm_inputs(1), logits_at="last")[:, -1]
                got = torch.cat([clean, run_rows(model, s, ivs, progress=progress, desc="ablation")])
            p, ok = metric(got, s.index), metric.correct(got, s.index)
            for name, fs, pv, okv in zip(["none", *sets], [[], *sets.values()], p.tolist(), ok.tolist()):
                rows.append(dict(sample=s.index, ablated=name, n_features=len(fs), p_answer=pv, correct=bool(okv)))
    return pd.DataFrame(rows)


def accuracy_table(df: pd.DataFrame, by: Sequence[str] = ("ablated",), level: float = 0.95) -> pd.DataFrame:
    """Accuracy per group of `ablation_accuracy` rows (joined with any sample columns to group by): `n`,
    `correct` (count), `accuracy`, and its Wilson score interval (`statsmodels`' `proportion_confint`,
    `acc_low`, `acc_high`).

        accuracy_table(ablation_accuracy(model, inputs, [answer], sae, {"two": [0, 1]}, progress=False))
    """
    from statsmodels.stats.proportion import proportion_confint

    out = df.groupby(list(by), sort=False)["correct"].agg(n="size", correct="sum").reset_index()
    out["accuracy"] = out["correct"] / out["n"]
    lo, hi = proportion_confint(out["correct"], out["n"], alpha=1 - level, method="wilson")
    out["acc_low"], out["acc_high"] = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    return out
