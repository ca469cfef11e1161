"""The feature level proved on the toy (issue 22, part 5), and the demo report's "Features" section.

`toy_feature_proof` runs what a researcher runs on a real dataset, on the toy: clips written as files
(`hooked-av toy-data`, whose rows name every clip's planted attributes), one row per distinct clip harvested
at one layer's media tokens (`harvest`), a TopK SAE trained on the training clips' tokens with SAELens
(`train_sae`, which holds the other clips out), then per attribute value the best single feature on the
training clips measured on the held-out ones, beside the same architecture untrained
(`patching.methods.sae_attributes.attribute_features`), and the accuracy of every single-clip question on
held-out clips with each attribute's features ablated on the media tokens (`ablation_accuracy`). The test
(`tests/test_sae_toy_proof.py`) and the demo call it with their sizes; docs/features.md, "Proof on the toy",
reports a larger run.

    proof = toy_feature_proof("runs/proof", n_rows=600)
    proof.table[["attribute", "value", "auroc", "baseline_auroc", "modality"]]
    proof.accuracy                     # per ablated set and question: accuracy with its Wilson interval
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hooked_av.toy import vocab

# the toy's planted attributes and the modality that carries each (docs/toy.md)
ATTRIBUTES = {"colour": "video", "brightness": "video", "note": "audio", "instrument": "audio"}
# the single-clip questions, by the attribute each reads ("match" reads colour and note)
QUESTIONS = {"colour": "colour", "brightness": "brightness", "height": "note", "note": "note", "instrument": "instrument",
             "match": "colour+note"}
SINGLE_CLIP = ("visual", "auditory", "audiovisual")
# the other attribute of the same modality: a feature of one value that separates it only within some values of
# the other is a conjunction of the two (what the SAE learns where no single feature reaches 0.95)
WITHIN = {"colour": "brightness", "brightness": "colour", "note": "instrument", "instrument": "note"}


@dataclass
class FeatureProof:
    """What `toy_feature_proof` measured: `table` (`attribute_features`, the untrained SAE as baseline),
    `heldout` (explained variance etc. per group on held-out tokens, trained and untrained), `accuracy`
    (per ablated set and question: n, accuracy, Wilson interval), `features` (the ablated sets), `settings`,
    `seconds` (per stage) and the folder."""

    folder: Path
    table: pd.DataFrame
    heldout: pd.DataFrame
    accuracy: pd.DataFrame
    features: dict[str, list[int]]
    settings: dict
    seconds: dict = field(default_factory=dict)

    def chance(self, question: str) -> float:
        """Accuracy of a uniform guess over the question's answer words."""
        kind = next(k for k, qs in vocab.SINGLE_CLIP.items() if question in qs)
        return vocab.chance(kind, question)


def clip_rows(manifest: Path, out: Path) -> Path:
    """A manifest of the single-clip rows of `manifest`, the first row of each distinct clip only (a clip
    repeated across rows would sit in the training and the held-out split at once)."""
    seen, keep = set(), []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        if "video" in row and row["video"] not in seen:
            seen.add(row["video"])
            keep.append(line)
    out.write_text("\n".join(keep) + "\n")
    return out


def toy_feature_proof(out_dir, *, n_rows: int = 600, hook: str = "blocks.0.hook_resid_post", width: int = 256, k: int = 8,
                      steps: int = 1500, batch_size: int = 256, lr: float = 3e-3, holdout: float = 0.3,
                      per_value: int = 8, n_ablation: int | None = None, seed: int = 0, model=None,
                      progress: bool = False) -> FeatureProof:
    """Run the proof into `out_dir` (a new folder): `n_rows` single-clip toy rows written as files (about 0.6
    x `n_rows` distinct clips), the distinct clips harvested at `hook`'s audio and video tokens, a TopK SAE
    (`width`, `k`; `steps` of `batch_size` tokens at `lr`) trained on all but `holdout` of them, the table,
    and the ablation of each attribute's features (`per_value` best per value) on every single-clip row
    (up to `n_ablation`) whose clip was held out. Seeded throughout by `seed`.

        proof = toy_feature_proof(tmp / "proof", n_rows=120, steps=200, n_ablation=24)
    """
    from hooked_av import load
    from hooked_av.toy.dataset import write_toy_dataset
    from patching.apps.harvest import harvest
    from patching.apps.sae_train import train_sae, untrained_sae
    from patching.datasets.manifest import read_manifest
    from patching.datasets.templates import parse_template
    from patching.methods.sae_attributes import ablation_accuracy, accuracy_table, attribute_features, features_of
    from patching.methods.sae_eval import store_stats

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; the proof writes a new folder (data, acts, sae)")
    name = "toy" if model is None else type(model).__name__  # a loaded model is named by its class
    model = load("toy") if model is None else model
    t = {"start": time.perf_counter()}
    manifest = write_toy_dataset(out / "data", n=n_rows, seed=seed, kinds=SINGLE_CLIP)
    clips = clip_rows(manifest, out / "data" / "clips.jsonl")
    t["data"] = time.perf_counter()
    acts = harvest(model, clips, [hook], out / "acts", groups="audio,video", progress=progress)
    t["harvest"] = time.perf_counter()
    report = train_sae(acts, out / "sae", architecture="topk", width=width, k=k, tokens=steps * batch_size,
                       batch_size=batch_size, lr=lr, holdout=holdout, seed=seed, progress=progress)
    t["train"] = time.perf_counter()
    base = untrained_sae(out / "sae")
    held = report["heldout_ids"]
    table = attribute_features(out / "sae", acts, list(ATTRIBUTES), heldout=held, baseline=base, top=max(16, per_value),
                               within=WITHIN)
    from patching.datasets.activations import ActivationStore

    heldout = pd.concat([pd.DataFrame(report["heldout"]["after"]).assign(sae="trained"),
                         store_stats(base, ActivationStore(acts), hook, held, ["audio", "video"]).assign(sae="untrained")])
    t["analysis"] = time.perf_counter()

    # the ablation: every single-clip row (any question) whose clip is held out
    held_clips = {r.video for r in read_manifest(clips).rows if r.id in set(held)}
    rows = [r for r in read_manifest(manifest).rows if r.video in held_clips][:n_ablation]
    tpl = parse_template("default")
    inputs = model.prepare([tpl.prompt(r) for r in rows])
    answers = model.tokenizer.convert_tokens_to_ids([r.answer for r in rows])
    features = {a: features_of(table, a, per_value) for a in ATTRIBUTES}
    # each set on the tokens of the modality its attribute's best features fire on (the table's finding)
    where = {a: table[table["attribute"] == a]["modality"].mode().iloc[0] for a in ATTRIBUTES}
    df = ablation_accuracy(model, inputs, answers, out / "sae", features, groups=where, progress=progress)
    df["question"] = [rows[i].meta["question_name"] for i in df["sample"]]
    df["kind"] = [rows[i].meta["kind"] for i in df["sample"]]
    accuracy = accuracy_table(df, by=["ablated", "question"])
    accuracy["chance"] = [vocab.chance(next(k for k, qs in vocab.SINGLE_CLIP.items() if q in qs), q) for q in accuracy["question"]]
    df.to_csv(out / "ablation.csv", index=False)
    t["ablation"] = time.perf_counter()
    table.to_json(out / "table.json", orient="records", indent=1)
    stages = list(t)
    seconds = {s: t[s] - t[p] for p, s in zip(stages, stages[1:])}
    settings = dict(hook=hook, width=width, k=k, steps=steps, batch_size=batch_size, lr=lr, holdout=holdout,
                    per_value=per_value, seed=seed, n_rows=n_rows, n_clips=int(table.attrs["n_train"] + table.attrs["n_heldout"]),
                    n_train=table.attrs["n_train"], n_heldout=table.attrs["n_heldout"], n_ablation=len(rows),
                    pool=table.attrs["pool"], model=name, n_layers=model.cfg.n_layers)
    settings["ablated_on"] = where
    return FeatureProof(out, table, heldout, accuracy, features, settings, seconds)


# ---- the report section ---------------------------------------------------------------------------------------
def model_name(proof: FeatureProof) -> str:
    """How the report names the model the proof ran on: its depth and, for a shipped toy, its name."""
    return f"{proof.settings['n_layers']}-layer model {proof.settings['model']!r}"


def features_section(report, out_dir, model=None, **sizes) -> FeatureProof:
    """Run `toy_feature_proof` in `out_dir` with `sizes` and add the demo report's "Features" section: the
    table and figure of the best features per attribute value (trained vs untrained, held-out AUROC with
    bootstrap intervals), the explained variance, and the ablation's accuracies (Wilson intervals)."""
    proof = toy_feature_proof(out_dir, model=model, **sizes)
    s = proof.settings
    report.heading("Features: a sparse autoencoder on the media tokens finds the planted attributes")
    report.text(
        f"On the {model_name(proof)}: {s['n_clips']} distinct toy clips written as files, harvested at {s['hook']} (audio and video tokens), a TopK "
        f"SAE of {s['width']} features (k {s['k']}) trained with SAELens on the tokens of {s['n_train']} clips for "
        f"{s['steps']} steps of {s['batch_size']} tokens; {s['n_heldout']} clips held out. Per attribute value, the "
        f"feature with the highest AUROC on the training clips (clip score: the {s['pool']} of the feature over the "
        "clip's media tokens) and its AUROC on the held-out clips, with a 95 % stratified percentile-bootstrap "
        "interval (1000 resamples); the same for the SAE untrained (same architecture and seed); the modality "
        "holding most of the feature's activation; the best OR of up to 4 features; a linear probe on the "
        f"activations (the ceiling). Run time {sum(proof.seconds.values()):.0f} s.")
    report.figure(auroc_figure(proof))
    report.table(auroc_table(proof))
    ev = proof.heldout[proof.heldout["group"] != "text"][["sae", "group", "n_tokens", "n_samples", "explained_variance",
                                                           "ev_low", "ev_high", "l0"]]
    report.text("Held-out explained variance (95 % percentile bootstrap over clips):").table(ev)
    report.text(
        f"Ablating each attribute's features (the {s['per_value']} best per value by training AUROC, "
        f"{', '.join(f'{a} {len(f)}' for a, f in proof.features.items())} features) on the media tokens, the SAE spliced "
        f"with its error term, over {s['n_ablation']} single-clip questions on held-out clips: accuracy per question "
        "with Wilson 95 % intervals; the dashed line is chance.")
    report.figure(ablation_figure(proof))
    report.table(ablation_table(proof))
    report.text(ablation_summary(proof))
    return proof


def ablation_summary(proof: FeatureProof) -> str:
    """One sentence per ablated attribute, from the accuracy table: its own question against the plain run and
    chance, and the largest change on the questions about the same and about the other modality."""
    acc = proof.accuracy.set_index(["ablated", "question"])["accuracy"]
    modality = {q: ATTRIBUTES[a.split("+")[0]] for q, a in QUESTIONS.items() if "+" not in a}
    out = []
    for a in proof.features:
        own = [q for q, r in QUESTIONS.items() if r == a and (a, q) in acc.index]
        same = [q for q in modality if modality[q] == ATTRIBUTES[a] and q not in own and (a, q) in acc.index]
        other = [q for q in modality if modality[q] != ATTRIBUTES[a] and (a, q) in acc.index]
        drop = lambda qs: max((acc["none", q] - acc[a, q] for q in qs), default=float("nan"))  # noqa: E731
        out.append(f"{a}: " + ", ".join(f"{q} {acc['none', q]:.2f} -> {acc[a, q]:.2f} (chance {proof.chance(q):.2f})" for q in own)
                   + f"; largest drop on the other {ATTRIBUTES[a]} questions {drop(same):.2f}, on the questions about "
                   f"the other modality {drop(other):.2f}")
    return ("Summary (accuracy, nothing ablated -> ablated): " + "; ".join(out) + ". Within a modality the features "
            "are partly conjunctions of its two attributes (the table's last column: a value's best feature separates "
            "it within some values of the other attribute only), so ablating one attribute's features also moves "
            "the other's questions there.")


def auroc_table(proof: FeatureProof) -> pd.DataFrame:
    """The table's readable columns: per attribute value, trained and untrained held-out AUROC with intervals."""
    t = proof.table
    fmt = lambda a, lo, hi: f"{a:.3f} [{lo:.3f}, {hi:.3f}]"  # noqa: E731
    return pd.DataFrame({
        "attribute": t["attribute"], "value": t["value"], "n (held-out +/all)": [f"{p}/{n}" for p, n in zip(t["n_heldout_pos"], t["n_heldout"])],
        "feature": t["feature"], "AUROC trained": [fmt(*r) for r in zip(t["auroc"], t["auroc_low"], t["auroc_high"])],
        "fires on": [f"{m} ({100 * t.loc[i, f'share_{m}']:.0f} %)" for i, m in zip(t.index, t["modality"])],
        "AUROC untrained": [fmt(*r) for r in zip(t["baseline_auroc"], t["baseline_auroc_low"], t["baseline_auroc_high"])],
        "OR of <= 4 (trained)": t["set_auroc"].round(3), "linear probe": t["probe_auroc"].round(3),
        "trained feature's AUROC within each value of": [
            f"{WITHIN[a]}: " + ", ".join(f"{w} {v:.2f}" for w, v in d.items()) for a, d in zip(t["attribute"], t["auroc_within"])],
    })


def ablation_table(proof: FeatureProof) -> pd.DataFrame:
    """Accuracy per question (columns) for each ablated set (rows), as 'acc [low, high]'; n per question."""
    a = proof.accuracy
    cell = [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in zip(a["accuracy"], a["acc_low"], a["acc_high"])]
    wide = a.assign(cell=cell).pivot(index="ablated", columns="question", values="cell")
    order = [q for q in QUESTIONS if q in wide.columns]
    wide = wide.reindex(index=["none", *proof.features], columns=order)
    n = a[a["ablated"] == "none"].set_index("question")["n"]
    wide.columns = [f"{q} (n={n[q]}, chance {proof.chance(q):.2f})" for q in order]
    return wide.reset_index()


def auroc_figure(proof: FeatureProof):
    import matplotlib.pyplot as plt

    t = proof.table
    labels = [f"{a}={v}" for a, v in zip(t["attribute"], t["value"])]
    x = np.arange(len(t))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(t)) + 2.5, 3.6))
    for off, col, name, colour in [(-0.2, "", "trained: best feature", "C0"), (0.2, "baseline_", "untrained: best feature", "C7")]:
        v = t[f"{col}auroc"]
        err = [(v - t[f"{col}auroc_low"]).clip(lower=0), (t[f"{col}auroc_high"] - v).clip(lower=0)]
        ax.bar(x + off, v, width=0.38, yerr=err, capsize=2, color=colour, label=name)
    ax.scatter(x - 0.2, t["set_auroc"], marker="_", s=120, color="k", zorder=3, label="trained: OR of <= 4 features")
    ax.axhline(0.95, ls=":", color="C3", lw=1, label="0.95")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0.4, 1.02), ylabel="held-out AUROC",
           title=f"best single SAE feature per attribute value ({proof.settings['hook']})\n"
                 f"n={proof.settings['n_heldout']} held-out clips; bars: 95 % stratified bootstrap")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def ablation_figure(proof: FeatureProof):
    import matplotlib.pyplot as plt

    a = proof.accuracy
    questions = [q for q in QUESTIONS if q in set(a["question"])]
    sets = ["none", *proof.features]
    fig, ax = plt.subplots(figsize=(9.5, 3.4))
    width = 0.8 / len(sets)
    for i, name in enumerate(sets):
        part = a[a["ablated"] == name].set_index("question").reindex(questions)
        xs = np.arange(len(questions)) + (i - (len(sets) - 1) / 2) * width
        err = [(part["accuracy"] - part["acc_low"]).clip(lower=0), (part["acc_high"] - part["accuracy"]).clip(lower=0)]
        ax.bar(xs, part["accuracy"], width=width, yerr=err, capsize=2, label="nothing ablated" if name == "none" else
               f"{name} features ({len(proof.features[name])})", color="0.6" if name == "none" else f"C{i - 1}")
    for j, q in enumerate(questions):
        ax.hlines(proof.chance(q), j - 0.45, j + 0.45, colors="k", linestyles="--", lw=1)
    n = a[a["ablated"] == "none"].set_index("question")["n"]
    ax.set_xticks(np.arange(len(questions)), [f"{q}\n({QUESTIONS[q]}; n={n[q]})" for q in questions], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title="accuracy with one attribute's features ablated on the media tokens\n"
           "held-out clips; bars: Wilson 95 % interval; dashed: chance")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig
