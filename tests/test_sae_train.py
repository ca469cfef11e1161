"""Training SAEs with SAELens's trainer on our activation store (`hooked-av sae train`, `patching.apps.sae_train`)
and evaluating them (`patching.methods.sae_eval`): the trainer sees exactly the training samples' tokens of the
chosen groups; checkpoints are SAELens's format (`SAE.load_from_disk` reads the same weights, the metadata says
what SAELens records and what we add); training lowers the held-out reconstruction error for every
architecture and is reproducible from its seed; the statistics and the loss recovered equal naive
computations; the command refuses what cannot apply before training, and reports the loss recovered on
held-out manifest rows. Stores come from `StoreWriter` on toy activations (tests/sae_helpers.toy_store)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sae_helpers import random_sae, toy_store
from sae_lens import SAE
from safetensors.torch import load_file

from hooked_av.sae import load_sae
from hooked_av.toy import make_batch
from patching.apps.cli import main
from patching.apps.sae_train import split_samples, train_sae, training_batches
from patching.datasets.activations import ActivationStore
from patching.engine.stats import N_BOOT, SEED
from patching.methods.sae_eval import (
    loss_recovered,
    reconstruction_stats,
    summarise_loss_recovered,
    token_groups,
)

torch.set_num_threads(1)
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def store(toy_model, tmp_path_factory):
    return toy_store(toy_model, tmp_path_factory.mktemp("store"), HOOK, n=24)


def test_the_trainer_reads_exactly_the_training_samples_tokens_of_the_chosen_groups(store):
    s = ActivationStore(store)
    meta = s.metadata()
    train, held = split_samples(meta["id"], 0.25, seed=3)
    assert (train, held) == split_samples(list(reversed(meta["id"].tolist())), 0.25, seed=3)  # order-free, seeded
    assert len(held) == 6 and not set(train) & set(held) and set(train) | set(held) == set(meta["id"])
    keep = meta["id"].isin(train) & meta["group"].isin(["audio", "question", "system", "template", "last"])
    want = s.activations(HOOK, meta[keep.to_numpy()])
    batches = training_batches(s, HOOK, ["audio", "text"], train, batch_size=64, seed=1)
    n = len(want)
    got = torch.cat([next(batches) for _ in range(-(-n // 64))])
    assert len(got) % 64 == 0 and all(len(next(batches)) == 64 for _ in range(3))  # exactly the batch size, endlessly
    assert sorted(map(tuple, got[:n].tolist())) == sorted(map(tuple, want.tolist()))  # one pass: every token once
    assert set(meta[token_groups(meta) == "text"]["group"]) == {"system", "template", "question", "last"}


@pytest.mark.parametrize("architecture, options", [("topk", dict(k=8)), ("jumprelu", dict(l0=0.01)),
                                                   ("standard", dict(l1=0.5))])
def test_training_saves_saelens_format_and_lowers_the_heldout_error(store, tmp_path, architecture, options):
    out = tmp_path / "sae"
    report = train_sae(store, out, architecture=architecture, width=96, tokens=128 * 150, batch_size=128, lr=2e-3,
                       holdout=0.25, seed=0, groups="media", **options)
    saved = load_file(str(out / "sae_weights.safetensors"))
    theirs, ours = SAE.load_from_disk(out), load_sae(out)
    assert theirs.cfg.architecture() == architecture and theirs.cfg.d_sae == 96 and theirs.cfg.d_in == 128
    for sae in (theirs, ours):
        assert sae.state_dict().keys() == saved.keys() and all(torch.equal(sae.state_dict()[k], saved[k]) for k in saved)
    cfg = json.loads((out / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["dataset_path"]) == ("toy", HOOK, str(store.resolve()))
    assert meta["training_architecture"] == architecture and meta["hooked_av"]["groups"] == ["audio", "video"]
    assert meta["hooked_av"]["store_settings"]["model"] == "toy" and meta["hooked_av"]["heldout_samples"] == 6
    assert report["steps"] == 150 and report["trained_tokens"] == 150 * 128
    assert set(report["heldout_ids"]) == set(split_samples(ActivationStore(store).metadata()["id"], 0.25, 0)[1])
    before = pd.DataFrame(report["heldout"]["before"]).set_index("group")
    after = pd.DataFrame(report["heldout"]["after"]).set_index("group")
    assert set(after.index) == {"audio", "video", "all"} and after.loc["all", "n_samples"] == 6
    for g in after.index:
        assert after.loc[g, "mse"] < 0.5 * before.loc[g, "mse"], (g, before.loc[g, "mse"], after.loc[g, "mse"])
    assert after.loc["all", "explained_variance"] > 0.5
    assert json.loads((out / "training.json").read_text())["heldout"]["after"] == json.loads(json.dumps(report["heldout"]["after"]))
    assert (out / "sparsity.safetensors").is_file()


def test_training_is_reproducible_from_its_seed(store, tmp_path):
    a = train_sae(store, tmp_path / "a", architecture="topk", width=32, k=4, tokens=64 * 20, batch_size=64, seed=5)
    b = train_sae(store, tmp_path / "b", architecture="topk", width=32, k=4, tokens=64 * 20, batch_size=64, seed=5)
    wa, wb = load_file(str(tmp_path / "a" / "sae_weights.safetensors")), load_file(str(tmp_path / "b" / "sae_weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["heldout"] == b["heldout"]


def test_reconstruction_stats_equal_a_naive_computation():
    g = torch.Generator().manual_seed(0)
    sae = random_sae("topk", d_in=16, d_sae=24, k=3)
    acts = torch.randn(40, 16, generator=g) * 2
    groups = np.array(["audio"] * 15 + ["video"] * 10 + ["text"] * 15, dtype=object)
    samples = np.array([i % 5 for i in range(40)])
    got = reconstruction_stats(sae, acts, groups, samples, dense=0.3).set_index("group")
    with torch.no_grad():
        f = sae.encode(acts)
        err = (sae.decode(f) - acts).double().pow(2).sum(-1).numpy()
    for name in ("audio", "video", "text", "all"):
        rows = [i for i in range(40) if name == "all" or groups[i] == name]
        x = acts[rows].double().numpy()
        dev = ((x - x.mean(0)) ** 2).sum(1)
        ev = 1 - err[rows].sum() / dev.sum()
        fired = f[rows] > 0
        per = {s: [i for i, r in enumerate(rows) if samples[r] == s] for s in sorted(set(samples[rows]))}
        e_s = np.array([err[rows][idx].sum() for idx in per.values()])
        d_s = np.array([dev[idx].sum() for idx in per.values()])
        boots = []
        for draw in np.random.default_rng(SEED).integers(0, len(per), size=(N_BOOT, len(per))):
            boots.append(1 - e_s[draw].sum() / d_s[draw].sum())
        lo, hi = np.percentile(boots, [2.5, 97.5])
        r = got.loc[name]
        assert r["n_tokens"] == len(rows) and r["n_samples"] == len(per)
        assert r["explained_variance"] == pytest.approx(ev, abs=1e-9)
        assert (r["ev_low"], r["ev_high"]) == pytest.approx((lo, hi), abs=1e-9)
        assert r["l0"] == pytest.approx(float(fired.sum(-1).float().mean()))
        assert r["dead"] == int((~fired.any(0)).sum()) and r["dense"] == int((fired.float().mean(0) > 0.3).sum())


def test_loss_recovered_equals_naive_forwards(toy_model):
    model = toy_model
    b = make_batch(3, seed=11, tokenizer=model.tokenizer)
    sae = random_sae("topk", hook=HOOK, d_sae=96, k=8)
    res = loss_recovered(model, sae, b.inputs, b.answers, groups=["audio", "video", "text"], progress=False)
    tm = model.token_map(b.inputs)
    text = tm.mask("all") & ~tm.mask("media")
    masks = {"audio": tm.mask("audio"), "video": tm.mask("video"), "text": text}

    def ce(hook_fn=None):
        with torch.no_grad():
            logits = model.run_with_hooks(**b.inputs, fwd_hooks=[] if hook_fn is None else [(HOOK, hook_fn)])
        return -logits[:, -1].log_softmax(-1).gather(-1, b.answers[:, None])[:, 0]

    clean = ce()
    for g, mask in masks.items():
        recon = ce(lambda x, hook, m=mask: torch.where(m[..., None], sae.decode(sae.encode(x)), x))
        zero = ce(lambda x, hook, m=mask: torch.where(m[..., None], torch.zeros_like(x), x))
        rows = res.df[res.df["group"] == g].set_index("sample")
        for i in range(3):
            if not bool(mask[i].any()):
                assert i not in rows.index
                continue
            assert rows.loc[i, "n_tokens"] == int(mask[i].sum())
            assert rows.loc[i, ["ce_clean", "ce_sae", "ce_zero"]].tolist() == pytest.approx(
                [float(clean[i]), float(recon[i]), float(zero[i])], abs=2e-4, rel=1e-4)
    summary = summarise_loss_recovered(res.df).set_index("group")
    part = res.df[res.df["group"] == "text"]
    want = (part["ce_zero"].mean() - part["ce_sae"].mean()) / (part["ce_zero"].mean() - part["ce_clean"].mean())
    assert summary.loc["text", "loss_recovered"] == pytest.approx(want) and summary.loc["text", "n_samples"] == 3


def test_from_the_command_line_harvest_train_and_study_features_end_to_end(tmp_path, capsys):
    """`hooked-av harvest` -> `hooked-av sae train` (with the loss recovered on the held-out rows) -> `hooked-av study
    --experiment sae_features`, on toy clips from files; and what `sae train` refuses before training."""
    from hooked_av.toy.dataset import write_toy_dataset

    manifest = write_toy_dataset(tmp_path / "data", n=8, seed=1)
    acts, out = tmp_path / "acts", tmp_path / "sae"
    assert main(["harvest", "--model", "toy", "--manifest", str(manifest), "--hook", HOOK, "--groups", "all",
                 "--out", str(acts)]) == 0
    base = ["sae", "train", "--activations", str(acts), "--out", str(out), "--width", "64", "--batch-size", "64",
            "--tokens", str(64 * 40), "--holdout", "0.25"]
    for extra, message in [
        (["--architecture", "jumprelu", "--k", "4"], "--k do(es) not apply to a jumprelu SAE"),
        (["--architecture", "topk"], "a topk SAE needs --k"),
        (["--architecture", "topk", "--k", "99"], "k=99 is more than the width 64"),
        (["--architecture", "standard", "--groups", "image"], "group(s) ['image']: the store holds no such token"),
        (["--architecture", "standard", "--groups", "speech"], "group 'speech': choose from"),
        (["--architecture", "standard", "--hook", "blocks.0.hook_resid_post"], "the store holds"),
        (["--architecture", "standard", "--model", "toy"], "needs both --model and --manifest"),
        (["--architecture", "standard", "--holdout", "1.5"], "holdout must be a fraction"),
    ]:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, message
        assert not out.exists()
    assert main(base + ["--architecture", "topk", "--k", "4", "--groups", "media", "--model", "toy",
                        "--manifest", str(manifest)]) == 0
    printed = capsys.readouterr().out
    assert "explained_variance" in printed and "loss_recovered" in printed
    report = json.loads((out / "training.json").read_text())
    assert len(report["heldout_ids"]) == 2 and report["train_samples"] == 6
    lr = pd.DataFrame(report["loss_recovered"]).set_index("group")
    assert set(lr.index) == {"audio", "video", "text"} and (lr["n_samples"] == 2).all()
    evaluated = pd.read_parquet(out / "eval" / "sae_loss.parquet")
    assert set(evaluated["id"]) == set(report["heldout_ids"])  # the held-out rows only, none trained on
    assert main(base + ["--architecture", "topk", "--k", "4"]) == 2  # the folder holds an SAE now
    assert "already holds an SAE" in capsys.readouterr().err
    study = tmp_path / "features"
    assert main(["study", "--model", "toy", "--manifest", str(manifest), "--experiment", "sae_features", "--limit", "2",
                 "--option", f"sae_features.sae={out}", "--option", "sae_features.top=3", "--out", str(study),
                 "--no-report"]) == 0
    df = pd.read_parquet(study / "sae_features.parquet")
    assert len(df) and df["rank"].max() <= 3 and set(df["group"]) <= {"audio", "video"}
