"""The main job (`make demo` / `hooked-av demo`), run as a user runs a study on a real dataset.

Steps: write the toy task as media files and a manifest (`hooked_av.toy.dataset`) -> a study of
accuracy over every sample -> a study of physical discarding of the media from each layer over every
sample -> a study of attention knockout (every question kind: auditory vs visual, and the two-clip
samples' cross-item edges) over the first `n_flow` samples per kind's worth -> the feature level: a sparse
autoencoder trained with SAELens on the media tokens of clips written as files, the features of each planted
attribute and what ablating them does (`patching.apps.demo_features`) -> one self-contained report,
`runs/demo/report.html`, with the studies' figures and the attention mass between token groups of
one batch. The same commands run on a real model and dataset: `hooked-av study --model ... --manifest ...`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hooked_av.viz import Report, group_attention_mass, plot_attention_mass  # noqa: E402
from patching.apps.demo_features import features_section  # noqa: E402


def run_demo(out_dir: str | Path = "runs/demo", n_eval: int = 200, n_flow: int = 16, window: int | None = None, seed: int = 2024,
             n_features: int = 1500, feature_steps: int = 1500, flow_model: str = "toy-flow") -> Path:
    """`n_eval` samples for accuracy and discarding (cheap: one forward per layer; with the media discarded
    early the model answers one word per question, so accuracy there is the share of samples whose answer is
    that word, which a few samples per kind estimate badly); knockout on the first `n_flow` x (number of
    question kinds) of them, with a `window`-layer window (None: `knockout.default_window`, 2 for 8 layers). The flow sections run on the shipped toy
    `flow_model` (default "toy-flow": 8 layers, deep enough for a pathway, docs/toy.md); the feature level on
    the 4-layer "toy" (docs/features.md). `n_features`: toy rows written for the feature level (about 0.6 x
    that many distinct clips), `feature_steps` the SAE's training steps."""
    from hooked_av import load, toy
    from hooked_av.toy.dataset import write_toy_dataset
    from patching.apps.study import Study, read_manifest, run_study
    from patching.apps.study.figures import figure
    from patching.apps.study.report import lowest_points

    t0 = time.perf_counter()
    out = Path(out_dir)
    manifest = read_manifest(write_toy_dataset(out / "data", n=n_eval, seed=seed))
    t_data = time.perf_counter() - t0
    model = load(flow_model)
    print(f"{flow_model} model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model.cfg.n_layers} layers; "
          f"{len(manifest)} samples written to {out / 'data'} in {t_data:.1f} s")

    t1 = time.perf_counter()
    run_study(flow_model, manifest, ["accuracy"], out / "accuracy", progress=False)  # by name: the report names it
    acc = Study(out / "accuracy")
    t2 = time.perf_counter()
    run_study(flow_model, manifest, ["discarding"], out / "discarding", options={"discarding": {"repeats": 1}}, progress=False)
    disc = Study(out / "discarding")
    t_disc = time.perf_counter()
    n_flow_total = min(len(manifest), n_flow * len(toy.KINDS))
    run_study(flow_model, manifest, ["knockout"], out / "flow", limit=n_flow_total, window=window)
    flow = Study(out / "flow")
    t3 = time.perf_counter()
    acc_table = acc.summary("accuracy", by=["kind"])[["kind", "n_samples", "mean", "ci_low", "ci_high", "interval"]]
    chance = acc.frame("accuracy").groupby("kind", sort=False)["chance"].mean()
    acc_table = acc_table.assign(chance=acc_table["kind"].map(chance))
    print("accuracy per question kind (from the files):\n" + acc_table.round(3).to_string(index=False))
    throughput = dict(accuracy=len(manifest) / (t2 - t1), discarding=len(manifest) / (t_disc - t2),
                      flow=n_flow_total / (t3 - t_disc))
    print(f"throughput: accuracy {throughput['accuracy']:.1f} samples/s; discarding {throughput['discarding']:.1f} "
          f"samples/s; knockout {throughput['flow']:.1f} samples/s")
    disc_table = _discarding_table(disc, manifest)
    print("discarding the media from layer L on: accuracy per question kind (all samples; chance: a uniform guess):\n"
          + disc_table.to_string(index=False))

    ko = flow.frame("knockout")
    used_window = int(ko["window"].iloc[0])  # what the study ran: the given window or the library's default
    summary = flow.summary("knockout", by=["kind", "edge", "layer"])
    lowest = lowest_points(summary[summary.subset == "correct"])
    print("knockout: lowest point of each mean curve, relative change of p(answer) in % (correct samples):\n"
          + lowest.pivot(index="edge", columns="kind", values="mean").round(1).to_string())
    lowest_table = lowest.assign(cell=[_cell(*r) for r in zip(lowest["mean"], lowest.ci_low, lowest.ci_high, lowest.layer,
                                                              lowest.p_holm, lowest.note)])
    lowest_table = lowest_table.pivot(index="edge", columns="kind", values="cell").fillna("(no such edge)").reset_index()
    lowest_table.columns.name = None
    n_correct = summary[summary.subset == "correct"].groupby("kind").n_samples.max()

    batch = toy.make_batch(max(4, n_flow), seed=seed + 5, tokenizer=model.tokenizer)
    mass = group_attention_mass(model, batch.inputs, model.token_map(batch.inputs))
    two_clip = next(r for r in manifest.rows if r.items)
    from patching.datasets.templates import parse_template

    layout = model.token_map(model.prepare(parse_template("default").prompt(two_clip))).describe()

    report = Report("hooked_av demo: information flow and features in the toy audio-visual models, run as studies")
    report.text(f"Flow sections: the shipped toy {flow_model!r}, a Qwen2.5-Omni Thinker architecture of {model.cfg.n_layers} layers "
                "trained on a synthetic task (docs/toy.md: how it was trained, and what was planted), read from "
                f"{len(manifest)} samples written as files ({out / 'data' / 'manifest.jsonl'}); knockout window {used_window}"
                f"{'' if window is not None else ' (the default for its depth)'}; "
                f"run time {time.perf_counter() - t0:.0f} s; throughput {throughput['accuracy']:.1f} samples/s (accuracy), "
                f"{throughput['discarding']:.1f} samples/s (discarding), {throughput['flow']:.1f} samples/s (knockout).")
    report.heading("Accuracy per question kind (Wilson 95 % intervals)").figure(_accuracy_figure(acc_table)).table(acc_table)
    report.text("Table: accuracy over all samples of each kind, n_samples, the Wilson score 95 % interval (ci_low, "
                "ci_high; none for n < 5) and the chance level (the mean of 1 / number of answer words over the samples).")
    report.heading("Attention knockout: relative change of p(answer) (%), correctly answered samples")
    report.figure(figure(flow, "knockout"))
    report.text("Table: the lowest point of each mean curve above: mean [95 % interval] over the correctly answered "
                "samples (percentile bootstrap, or Wilson of the share where every sample is at 0 or at one level), the "
                "layer where it is lowest, and the exact sign test against the plain run with Holm's correction over "
                "the figure's cells (p_holm; * below 0.05); 'no drop' where no layer's mean falls below minus the "
                "numerical floor (0.001 %), 'n < 5' where no interval is given (n per kind: "
                + ", ".join(f"{k} {n}" for k, n in n_correct.items()) + ").").table(lowest_table)
    report.heading("Discarding audio + video tokens from layer L on: accuracy and FLOPs saved").figure(figure(disc, "discarding"))
    report.text("Table: accuracy per question kind with the media discarded from layer L on, over every sample "
                "(all samples, Wilson score 95 % intervals), beside chance (a uniform guess over each sample's answer "
                "words, averaged over the samples). Discarded early, the model answers one word per question, so "
                "its accuracy is the share of samples whose answer is that word: near chance, and noisy on few "
                "samples.").table(disc_table)
    report.heading("Token layout of one two_clip sample").pre(layout)
    report.heading("Attention mass between token groups, per layer")
    report.text(f"Mean over heads, over the query positions of each group and over n={batch.inputs['input_ids'].shape[0]} toy samples of every "
                "question kind pooled (drawn in memory, toy.make_batch); each row sums to 1 over the groups attended.")
    report.figure(plot_attention_mass(mass))
    t4 = time.perf_counter()
    features = out / "features"
    if features.exists():  # the demo's own folder: the proof writes a new one each run
        shutil.rmtree(features)
    proof = features_section(report, features, n_rows=n_features, steps=feature_steps, per_value=16, n_ablation=600)
    print(f"features ({time.perf_counter() - t4:.0f} s): best single feature per planted value, held-out AUROC "
          f"(n={proof.settings['n_heldout']} clips; untrained SAE beside it):\n"
          + proof.table[["attribute", "value", "auroc", "baseline_auroc", "set_auroc", "modality"]].round(3).to_string(index=False))
    path = report.save(out / "report.html")
    ko.to_csv(out / "knockout.csv", index=False)
    disc.frame("discarding").to_csv(out / "discarding.csv", index=False)
    print(f"\nreport: {path.resolve()}  ({time.perf_counter() - t0:.0f} s)")
    return path


def _discarding_table(study, manifest):
    """Per question kind and first discarded layer: n, accuracy [Wilson 95 %] over all samples, and chance."""
    from hooked_av.toy import vocab

    s = study.summary("discarding", by=["kind", "from_layer"], subsets=("all",))
    chance = {}
    for r in manifest.rows:
        chance.setdefault(r.meta["kind"], []).append(vocab.chance(r.meta["kind"], r.meta["question_name"]))
    table = s.assign(accuracy=[f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in zip(s["mean"], s.ci_low, s.ci_high)])
    table = table.pivot(index="from_layer", columns="kind", values="accuracy")
    table.loc["chance"] = {k: f"{sum(v) / len(v):.2f}" for k, v in chance.items()}
    n = s.groupby("kind").n_samples.max()
    table.columns = [f"{k} (n={n[k]})" for k in table.columns]
    return table.reset_index().rename(columns={"from_layer": "from layer"})


def _cell(mean: float, lo: float, hi: float, layer, p_holm: float = float("nan"), note: str = "") -> str:
    """`mean [lo, hi] at layer L (p_holm)`, one decimal; a curve within the numerical floor at every
    layer says "no effect" instead of naming an arbitrary layer; fewer than 5 samples: no interval."""
    r = lambda v: f"{round(v, 1) + 0.0:.1f}"  # noqa: E731  (+ 0.0: no "-0.0")
    if note == "no drop at any layer":
        return "no drop (within the floor)"
    if note == "n < 5":
        return f"{r(mean)} at layer {int(layer)} (n < 5: no interval, no test)"
    star = "*" if p_holm < 0.05 else ""
    return f"{r(mean)} [{r(lo)}, {r(hi)}] at layer {int(layer)} (p_holm {p_holm:.2g}{star})"


def _accuracy_figure(table):
    fig, ax = plt.subplots(figsize=(5, 3))
    err = [(table["mean"] - table.ci_low).clip(lower=0).fillna(0), (table.ci_high - table["mean"]).clip(lower=0).fillna(0)]
    ax.bar([f"{k}\nn={n}" for k, n in zip(table["kind"], table.n_samples)], table["mean"], yerr=err, capsize=3)
    for i, c in enumerate(table["chance"]):  # each kind's chance level over its bar
        ax.hlines(c, i - 0.4, i + 0.4, colors="black", linestyles=":", label="chance" if i == 0 else None)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title="accuracy from the files\nerror bars: Wilson 95% CI; dotted: chance")
    ax.title.set_fontsize("small")
    return fig

