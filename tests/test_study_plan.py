"""`hooked-av study --plan`: what a study will cost, from the config and the media without loading a weight,
equal to what the experiments then do. On the toy and on a tiny random Qwen2.5-Omni checkpoint: the tokens per
sample are the loaded model's; each planned experiment's forwards per sample equal the FLOPs its `run` calls
(FlopCounterMode and every attention call, tests/test_sweep_cost.py) over a plain forward's, exactly for the
sweep (knockout, the sweep engine's own plan), discarding, the logit lens and accuracy, within 0.5 % for DLA
(its per-head readout products); the CLI prints it without reading a weight file and refuses a plan that does
not fit the device before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from media_helpers import tiny_tokenizer, write_mp4
from omni_helpers import tiny_hf_thinker
from test_sweep_cost import counted_flops

from hooked_av.toy.dataset import write_toy_dataset
from patching.apps.cli import main
from patching.apps.study.plan import plan_study
from patching.datasets.manifest import read_manifest
from patching.datasets.templates import parse_template
from patching.engine import cost
from patching.engine.experiment import StudySample, get
from patching.engine.sweep import encode

EXACT = ("knockout", "discarding", "logit_lens")
OPTIONS = {"discarding": {"repeats": 1, "from_layers": [1, 2]}, "logit_lens": {"lens": ["standard", "map_the_flow"]}}


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("plan_toy"), n=2, seed=5)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan_ckpt")
    tiny_hf_thinker(seed=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    clip = write_mp4(d / "clip.mp4", seconds=2.0, fps=10)
    (d / "manifest.jsonl").write_text(json.dumps({"id": "a", "video": clip.name, "question": "What makes the sound?",
                                                  "answer": "dog"}) + "\n")
    return d


def measured_forwards(model, manifest, exp, window):
    """Per sample: the FLOPs `exp`'s study run calls over a plain forward's, and the sample's tokens."""
    out = []
    for row in read_manifest(manifest).rows:
        inputs = model.prepare(parse_template("default").prompt(row))
        tm = model.token_map(inputs)
        x = StudySample(model, inputs, encode(model, inputs), tm, 3, window)
        with counted_flops() as counted:
            if exp == "accuracy":
                with torch.no_grad():
                    model(**x.enc, logits_at="last")
            else:
                get(exp).run(x, json.loads(json.dumps(OPTIONS.get(exp, {}))))
        out.append((counted["flops"] / cost.forward_flops(model.cfg, tm.seq_len), tm.seq_len))
    return out


def check_plan_against_runs(model, name, manifest, experiments, window):
    plan = plan_study(name, manifest, experiments, window=window, options={k: v for k, v in OPTIONS.items() if k in experiments},
                      measure=False)
    assert plan.unplanned == []
    for exp in ["accuracy", *experiments]:
        got = measured_forwards(model, manifest, exp, window)
        assert plan.samples.tokens.tolist() == [n for _, n in got]
        rel = 5e-3 if exp == "dla" else 1e-9
        assert plan.samples[exp].tolist() == pytest.approx([f for f, _ in got], rel=rel), exp
    return plan


def test_the_plan_counts_what_the_toy_study_does(toy_model, toy_data):
    plan = check_plan_against_runs(toy_model, "toy", toy_data, ["knockout", "discarding", "dla", "logit_lens"], 1)
    assert plan.weights_bytes == sum(p.numel() * 4 for p in toy_model.parameters())
    assert plan.samples.knockout.min() > 1  # a sweep: more than the plain forward


def test_the_plan_counts_what_a_tiny_random_checkpoint_study_does(tiny_folder):
    import hooked_av

    model = hooked_av.load(tiny_folder)
    check_plan_against_runs(model, tiny_folder, tiny_folder / "manifest.jsonl", ["knockout", "discarding"], 1)


def test_the_cli_plans_without_reading_a_weight_and_refuses_what_does_not_fit(tiny_folder, monkeypatch, capsys):
    from hooked_av.core import checkpoint

    def no_weights(*a, **k):
        raise AssertionError("a plan read a weight file")

    monkeypatch.setattr(checkpoint, "iter_tensors", no_weights)
    args = ["study", "--model", str(tiny_folder), "--manifest", str(tiny_folder / "manifest.jsonl"), "--experiment",
            "knockout", "--experiment", "sinks", "--window", "1", "--out", str(tiny_folder / "never"), "--plan"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "tokens per sample:" in text and "knockout: min" in text and "sinks: not counted" in text
    assert "memory per device (cpu): weights" in text and "GFLOP/s measured on the last block" in text
    assert main(args + ["--memory", "0.0001"]) == 2
    err = capsys.readouterr().err
    assert "the study needs" in err and "but the device has 0.1 MiB" in err
    assert not (tiny_folder / "never").exists()
