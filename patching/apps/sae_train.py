"""`hooked-av sae train`: an SAE trained by SAELens's `SAETrainer` on activations of a harvested store
(`patching.datasets.activations.ActivationStore`), fed by the store (not by SAELens's own model runner),
saved in SAELens's on-disk format, evaluated on held-out samples per token group.

    hooked-av sae train --activations runs/acts --out runs/sae --architecture topk --width 512 --k 16 \\
        [--hook HOOK] [--groups media] [--tokens N] [--batch-size 4096] [--lr 3e-4] [--holdout 0.1] [--seed 0]
        [--device cuda] [--model toy --manifest data/toy/manifest.jsonl --eval-samples 64]

The samples (store ids) are split once, seeded: `holdout` of them (at least one) are held out and never
trained on. The SAE (`TopKTrainingSAE`, `JumpReLUTrainingSAE` or `StandardTrainingSAE`, SAELens's defaults
unless set) is trained on the other samples' tokens of `groups` (audio, video, image, text; "media" = the
first three, "all"), `tokens` of them (default: one pass), in batches of exactly `batch_size`, shuffled
within 4 shards at a time (seeded). The folder `out` then holds SAELens's `cfg.json` (metadata: the model,
the hook, the store as `dataset_path`, and ours under `hooked_av`: groups, store settings, split),
`sae_weights.safetensors`, `sparsity.safetensors` (SAELens's log10 feature frequencies over its last
window) and `training.json`: the settings, the held-out ids, and per group the reconstruction statistics
on held-out tokens before and after training (`patching.methods.sae_eval.reconstruction_stats`) and,
with `model` and `manifest`, the loss recovered on held-out manifest rows (a `sae_loss` study in
`out/eval`).

    report = train_sae("runs/acts", "runs/sae", architecture="topk", width=512, k=16)
    report["heldout"]["after"]        # one row per group: explained variance, L0, dead, dense
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from patching.datasets.activations import ActivationStore
from patching.engine import checks
from patching.methods.sae_eval import (
    MEDIA,
    store_stats,
    summarise_loss_recovered,
    token_groups,
)

ARCHITECTURES = ("topk", "jumprelu", "standard")
GROUP_ALIASES = {"media": MEDIA, "all": (*MEDIA, "text")}
OPTION_OF = {"k": "topk", "l1": "standard", "l0": "jumprelu"}  # which architecture each option belongs to


def eval_groups(groups) -> list[str]:
    """`"media"`, `"audio,video"`, `["audio", "text"]`, ... -> evaluation groups (audio, video, image, text)."""
    names = groups.split(",") if isinstance(groups, str) else list(groups)
    out: list[str] = []
    for n in (x.strip() for x in names):
        for g in GROUP_ALIASES.get(n, (n,)):
            if g not in (*MEDIA, "text"):
                raise ValueError(f"group {n!r}: choose from audio, video, image, text, media (audio, video, image) or all")
            out += [g] if g not in out else []
    if not out:
        raise ValueError("groups is empty; give at least one of audio, video, image, text, media, all")
    return out


def split_samples(ids: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """`(train, held_out)` sample ids: a seeded permutation of the sorted ids; the last `ceil(holdout * n)`
    (at least one) are held out. Refused for fewer than two samples or `holdout` outside (0, 1)."""
    ids = sorted({str(i) for i in ids})
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout}")
    if len(ids) < 2:
        raise ValueError(f"the store holds {len(ids)} sample(s); training and holding out need at least 2")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_held = min(len(ids) - 1, max(1, math.ceil(holdout * len(ids))))
    return sorted(order[:-n_held]), sorted(order[-n_held:])


def exact_batches(batches: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of `[<= size, d]` batches into batches of exactly `size` rows (SAELens's trainer counts
    `train_batch_size_samples` per step)."""
    held: list[torch.Tensor] = []
    n = 0
    for t in batches:
        held.append(t)
        n += len(t)
        while n >= size:
            cat = torch.cat(held)
            yield cat[:size]
            rest = cat[size:]
            held, n = ([rest] if len(rest) else []), len(rest)


def training_batches(store: ActivationStore, hook: str, groups: Sequence[str], ids: Sequence[str], batch_size: int,
                     seed: int = 0) -> Iterator[torch.Tensor]:
    """The endless stream SAELens's trainer reads: float32 `[batch_size, d]` activations of `hook` of the tokens of
    evaluation `groups` (audio, video, image, text) of samples `ids`, shuffled (seeded) within 4 shards at a
    time, every selected token once per pass."""
    meta = store.metadata()
    names = sorted(set(meta["group"][np.isin(token_groups(meta), list(groups))].astype(str)))  # the store's names
    return exact_batches(store.batches(hook, batch_size, groups=names, ids=ids, seed=seed, loop=True), batch_size)


def _config(architecture: str, d_in: int, width: int, device: str, metadata, k, l1, l0):
    from sae_lens import (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    common = dict(d_in=d_in, d_sae=width, device=device, metadata=metadata)
    if architecture == "topk":
        return TopKTrainingSAE, TopKTrainingSAEConfig(k=k, **common)
    if architecture == "jumprelu":
        return JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig(**({} if l0 is None else {"l0_coefficient": l0}), **common)
    return StandardTrainingSAE, StandardTrainingSAEConfig(**({} if l1 is None else {"l1_coefficient": l1}), **common)


def _check_options(architecture: str, width: int, k, l1, l0) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: choose from {list(ARCHITECTURES)}")
    checks.count(width, "width", unit=" feature")
    given = {"k": k, "l1": l1, "l0": l0}
    wrong = [f"--{o}" for o, v in given.items() if v is not None and OPTION_OF[o] != architecture]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to a {architecture} SAE "
                         f"(--k is topk's, --l1 standard's, --l0 jumprelu's)")
    if architecture == "topk":
        if k is None:
            raise ValueError("a topk SAE needs --k, the features active per token (e.g. 16)")
        checks.count(k, "k", unit=" feature")
        if k > width:
            raise ValueError(f"k={k} is more than the width {width}")
    for name in ("l1", "l0"):
        if given[name] is not None:
            checks.finite(given[name], name, minimum=0)


def train_sae(activations, out, *, architecture: str = "topk", width: int, k: int | None = None,
              l1: float | None = None, l0: float | None = None, hook: str | None = None, groups="media",
              tokens: int | None = None, batch_size: int = 4096, lr: float = 3e-4, holdout: float = 0.1,
              seed: int = 0, device: str = "cpu", model=None, manifest=None, eval_samples: int = 64,
              template: str = "default", scoring: str = "first_token", progress: bool = True) -> dict:
    """Train, save and evaluate an SAE (see the module); returns the report written to `out/training.json`.
    Everything that can be refused is, before anything trains: the store, the hook, the groups, the
    architecture's options, an `out` that already holds an SAE, a manifest or model without the other.

        report = train_sae(store_dir, tmp / "sae", architecture="topk", width=64, k=4, tokens=2048, batch_size=256)
    """
    from hooked_av.sae import sae_lens

    lens = sae_lens()  # an ImportError that says how to install it, before anything else
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    _check_options(architecture, width, k, l1, l0)
    for name, v in (("batch_size", batch_size), ("eval_samples", eval_samples)):
        checks.count(v, name)
    checks.finite(lr, "lr", minimum=0)
    if (model is None) != (manifest is None):
        raise ValueError("the loss recovered needs both --model and --manifest (held-out rows are run through the model); "
                         "give both, or neither for the reconstruction statistics alone")
    out = Path(out)
    if (out / "cfg.json").exists():
        raise ValueError(f"{out} already holds an SAE (cfg.json); give another --out folder")
    store = ActivationStore(activations)
    if hook is None:
        if len(store.hooks) != 1:
            raise ValueError(f"the store holds several hooks {store.hooks}; choose one with --hook")
        hook = store.hooks[0]
    elif hook not in store.hooks:
        raise ValueError(f"--hook {hook!r}: the store holds {store.hooks}")
    chosen = eval_groups(groups)
    meta = store.metadata()
    labels = token_groups(meta)
    present = sorted(set(labels))
    named = [g.strip() for g in (groups.split(",") if isinstance(groups, str) else groups) if g.strip() not in GROUP_ALIASES]
    missing = [g for g in chosen if g not in present and (g in named or all(c not in present for c in chosen))]
    if missing:  # a group named outright must be there; an alias ("media") takes what the store has
        raise ValueError(f"group(s) {missing}: the store holds no such token; it holds {present}")
    chosen = [g for g in chosen if g in present]
    train_ids, held_ids = split_samples(meta["id"].astype(str), holdout, seed)
    in_train = meta["id"].astype(str).isin(train_ids).to_numpy() & np.isin(labels, chosen)
    n_train = int(in_train.sum())
    if n_train < batch_size:
        raise ValueError(f"{n_train} training tokens in groups {chosen}, fewer than one batch of {batch_size}; "
                         "lower --batch-size or harvest more")
    tokens = n_train if tokens is None else checks.count(tokens, "tokens", minimum=batch_size, unit=f" (one batch is {batch_size})")
    manifest_rows = _heldout_rows(manifest, held_ids, set(meta["id"].astype(str)), eval_samples) if manifest else None

    settings = dict(activations=str(Path(activations).resolve()), hook=hook, groups=chosen, architecture=architecture,
                    width=width, k=k, l1=l1, l0=l0, tokens=tokens, batch_size=batch_size, lr=lr, holdout=holdout,
                    seed=seed, device=str(device))
    metadata = SAEMetadata(
        model_name=store.settings.get("model"), hook_name=hook, hook_head_index=None, dataset_path=settings["activations"],
        context_size=None, prepend_bos=False, model_class_name=store.settings.get("model_class"),
        hooked_av=dict(groups=chosen, store=settings["activations"], store_settings=store.settings,
                       train_samples=len(train_ids), heldout_samples=len(held_ids), train_tokens=n_train,
                       split_seed=seed, holdout=holdout, trained_tokens=tokens))
    torch.manual_seed(seed)
    cls, cfg = _config(architecture, store.d[hook], width, str(device), metadata, k, l1, l0)
    sae = cls(cfg)
    before = store_stats(sae, store, hook, held_ids, chosen)
    batches = training_batches(store, hook, chosen, train_ids, batch_size, seed)
    trainer_cfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=batch_size, lr=lr,
                                   lr_end=lr / 10, device=str(device), logger=LoggingConfig(log_to_wandb=False))
    trainer = lens.SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    sae = trainer.fit()
    sae.eval()
    out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(out)
    from safetensors.torch import save_file

    save_file({"sparsity": trainer.log_feature_sparsity}, str(out / "sparsity.safetensors"))
    inference = lens.SAE.load_from_disk(str(out), device=str(device))
    after = store_stats(inference, store, hook, held_ids, chosen)
    report = dict(settings=settings, sae=str(out.resolve()), steps=trainer.n_training_steps,
                  trained_tokens=trainer.n_training_samples, train_samples=len(train_ids), heldout_ids=held_ids,
                  heldout=dict(before=before.to_dict("records"), after=after.to_dict("records")),
                  versions=dict(sae_lens=lens.__version__, torch=torch.__version__))
    if manifest_rows is not None:
        report["loss_recovered"] = _loss_recovered(model, manifest_rows, out, template, scoring, device, progress)
    (out / "training.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def untrained_sae(folder):
    """The SAE `train_sae` wrote to `folder` as it was before training: the same SAELens training class and
    configuration, initialised after the same `torch.manual_seed(seed)` (so the weights are those its report's
    "before" statistics were measured on), in eval mode: the untrained baseline of the same architecture.

        base = untrained_sae(tmp / "sae")
    """
    folder = Path(folder)
    path = folder / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no training.json: it was not written by `hooked-av sae train`, so how it "
                                "was initialised is unknown")
    s = json.loads(path.read_text())["settings"]
    store = ActivationStore(s["activations"])
    from hooked_av.sae import sae_lens

    sae_lens()
    from sae_lens.saes.sae import SAEMetadata

    trained = json.loads((folder / "cfg.json").read_text())
    metadata = SAEMetadata(**trained.get("metadata", {}))
    torch.manual_seed(s["seed"])
    cls, cfg = _config(s["architecture"], store.d[s["hook"]], s["width"], s["device"], metadata, s["k"], s["l1"], s["l0"])
    return cls(cfg).eval()


def _heldout_rows(manifest, held_ids: list[str], stored: set[str], limit: int):
    """The manifest with only its held-out rows (held out of training, or never in the store), the first `limit`."""
    from patching.datasets.manifest import read_manifest

    m = read_manifest(manifest)
    held = set(held_ids)
    rows = [r for r in m.rows if r.id in held or r.id not in stored][:limit]
    if not rows:
        raise ValueError(f"no row of {manifest} is held out of training (every id was trained on); give a manifest of "
                         "other samples, or a larger --holdout")
    return dataclasses.replace(m, rows=rows)


def _loss_recovered(model, manifest, out: Path, template, scoring, device, progress) -> list[dict]:
    from patching.apps.study.runner import run_study

    study = run_study(model, manifest, ["sae_loss"], out / "eval", template=template, scoring=scoring, device=device,
                      options={"sae_loss": {"sae": str(out.resolve())}}, progress=progress)
    df = pd.read_parquet(study / "sae_loss.parquet")
    return summarise_loss_recovered(df).to_dict("records") if len(df) else []


def table(rows: list[dict], columns: Sequence[str]) -> str:
    """A small text table of report rows."""
    df = pd.DataFrame(rows)
    return df[[c for c in columns if c in df.columns]].to_string(index=False, float_format=lambda v: f"{v:.4g}")


# ---- the command ---------------------------------------------------------------------------------
def register(sae_sub) -> None:
    """Add `train` to the subparsers of `hooked-av sae` (it sets `func`)."""
    tr = sae_sub.add_parser("train", help="train an SAE with SAELens on a store; save it in SAELens's format")
    tr.add_argument("--activations", required=True, help="the activation store folder (hooked-av harvest --out)")
    tr.add_argument("--out", required=True, help="the SAE's folder (must not hold an SAE yet)")
    tr.add_argument("--architecture", required=True, choices=ARCHITECTURES)
    tr.add_argument("--width", type=int, required=True, help="number of features (d_sae)")
    tr.add_argument("--k", type=int, default=None, help="topk: features active per token")
    tr.add_argument("--l1", type=float, default=None, help="standard: the L1 coefficient (SAELens's default 1.0)")
    tr.add_argument("--l0", type=float, default=None, help="jumprelu: the L0 coefficient (SAELens's default 1.0)")
    tr.add_argument("--hook", default=None, help="the store's hook to train on (default: its only one)")
    tr.add_argument("--groups", default="media", help="audio, video, image, text, media or all (comma-separated; default media)")
    tr.add_argument("--tokens", type=int, default=None, help="training tokens (default: one pass over the training samples')")
    tr.add_argument("--batch-size", type=int, default=4096)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--holdout", type=float, default=0.1, help="share of the samples held out for evaluation (default 0.1)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--model", default=None, help="with --manifest: measure the loss recovered on held-out rows")
    tr.add_argument("--manifest", default=None, help="the dataset's manifest (its held-out rows are run)")
    tr.add_argument("--eval-samples", type=int, default=64, help="held-out manifest rows for the loss recovered (default 64)")
    tr.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> None:
    report = train_sae(args.activations, args.out, architecture=args.architecture, width=args.width, k=args.k, l1=args.l1,
                       l0=args.l0, hook=args.hook, groups=args.groups, tokens=args.tokens, batch_size=args.batch_size,
                       lr=args.lr, holdout=args.holdout, seed=args.seed, device=args.device, model=args.model,
                       manifest=args.manifest, eval_samples=args.eval_samples)
    cols = ["group", "n_tokens", "n_samples", "explained_variance", "ev_low", "ev_high", "l0", "dead", "dense"]
    print(f"SAE: {report['sae']} ({report['steps']} steps, {report['trained_tokens']} tokens)")
    print(f"held-out samples: {len(report['heldout_ids'])}; explained variance with 95% bootstrap interval over samples")
    print(table(report["heldout"]["after"], cols))
    if report.get("loss_recovered"):
        print("loss recovered on held-out manifest rows (answer token; 95% bootstrap interval over samples):")
        print(table(report["loss_recovered"], ["group", "n_samples", "ce_clean", "ce_sae", "ce_zero", "loss_recovered",
                                               "lr_low", "lr_high"]))
