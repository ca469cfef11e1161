"""The experiment registry: a new experiment is one new file (its function and its `Experiment` record)
plus one registration line, and every reader of the registry takes it with no other edit: `Result.mean`
and `Result.plot`, the study runner (options checked by name before the model loads), `Study.summary`,
the study figure and the report. Also: the records that ship agree with what the readers used to keep in
tables of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import standin_experiment
from hooked_av.toy.dataset import write_toy_dataset
from patching import Result, Study, run_study, write_report
from patching.engine import experiment


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(experiment, "_REGISTRY", dict(experiment._REGISTRY))  # taken out again after the test
    experiment.register(standin_experiment.EXPERIMENT)  # the one registration line
    return standin_experiment.EXPERIMENT


@pytest.fixture(scope="module")
def model(toy_model):
    return toy_model


def test_a_new_experiment_is_one_file_and_one_registration(registered, model, tmp_path):
    data = write_toy_dataset(tmp_path / "data", n=3, seed=5)
    with pytest.raises(ValueError, match=r"residual_norm takes no option\(s\) \['window'\]; its options: \['groups', 'layers'\]"):
        run_study(model, data, ["residual_norm"], tmp_path / "bad", options={"residual_norm": {"window": 2}}, progress=False)
    out = run_study(model, data, ["residual_norm"], tmp_path / "study", options={"residual_norm": {"layers": [0, 2]}},
                    progress=False)
    rows = Study(out).frame("residual_norm")
    assert set(rows["layer"]) == {0, 2} and set(rows["group"]) == {"audio", "video"} and rows["id"].nunique() == 3

    summary = Study(out).summary("residual_norm", by=["group", "layer"])
    cell = summary[(summary.subset == "all") & (summary.group == "video") & (summary.layer == 2)]
    naive = rows[(rows.group == "video") & (rows.layer == 2)]["norm"]
    assert len(cell) == 1 and int(cell.n_samples.iloc[0]) == 3
    assert cell["mean"].iloc[0] == pytest.approx(naive.mean(), rel=1e-12)

    res = Result("residual_norm", rows.assign(sample=rows["id"].factorize()[0]))
    means = res.mean()  # the record's grouping and value
    assert list(means.columns) == ["group", "layer", "norm"] and len(means) == 4
    ax = res.plot().axes[0]
    assert [line.get_label() for line in ax.get_lines()[:2]] == ["audio", "video"] and ax.get_ylabel() == "mean residual norm"

    html = write_report(out).read_text()
    assert "Residual norm per token group and layer" in html and (Path(out) / "figures" / "residual_norm.png").is_file()

    # what it took: the file below and the registration line in the fixture, nothing else
    source = Path(standin_experiment.__file__)
    assert len([p for p in source.parent.glob("*.py")]) == 1 and len(source.read_text().splitlines()) < 60


def test_an_unregistered_kind_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"no experiment kind 'residual_norm'; known kinds: \[.*'knockout'"):
        experiment.get("residual_norm")
    with pytest.raises(ValueError, match="no figure for a 'residual_norm' result"):
        Result("residual_norm", __import__("pandas").DataFrame({"layer": [0], "norm": [1.0]})).plot()


def test_a_name_registered_twice_is_refused(registered):
    import dataclasses

    with pytest.raises(ValueError, match="already registered"):
        experiment.register(dataclasses.replace(registered, value="other"))


def test_the_shipped_records_say_what_the_readers_used_to_keep_in_tables():
    # the defaults Result, the figures, the study statistics and the report kept before the registry
    by = {"knockout": ("edge", "layer"), "causal_tracing": ("site", "tokens", "layer"), "logit_lens": ("group", "layer"),
          "discarding": ("from_layer",), "activation_patching": ("site", "layer", "pos"),
          "attribution": ("site", "layer", "pos"), "sinks": ("modality", "cross_modal"), "pathway": ("run",),
          "fastv": ("method",), "dla": ("layer", "head", "group"), "knockout_accuracy": ("edge", "layer"),
          "hallucination": ("condition",)}
    study = {"accuracy": ("sample_correct", ()), "knockout": ("rel_change", ("edge", "layer")),
             "discarding": ("correct", ("group", "from_layer")),
             "causal_tracing": ("indirect_effect", ("corrupted", "site", "tokens", "layer", "pos")),
             "logit_lens": ("prob", ("lens", "group", "layer")), "sinks": ("mds", ("modality", "cross_modal")),
             "pathway": ("correct", ("run",)), "fastv": ("correct", ("method",)), "var": ("correct", ("intervention",)),
             "dla": ("dla", ("group", "layer", "head")), "dominance": ("share", ("label",))}
    assert {k: experiment.get(k).by for k in by} == by
    assert {k: (experiment.get(k).summary_value, experiment.get(k).cells) for k in study} == study
    assert [k for k in experiment.names() if experiment.get(k).correct_only] == ["knockout", "causal_tracing", "sae_features"]
    assert experiment.names(study=True) == ["accuracy", "knockout", "discarding", "causal_tracing", "sinks", "logit_lens",
                                            "pathway", "fastv", "var", "dla", "dominance", "sae_features", "sae_loss"]
    assert experiment.get("discarding").value == "metric" and experiment.get("discarding").summary_value == "correct"
    assert np.isin(["pathway", "fastv", "var", "accuracy", "dominance"],
                   [k for k in experiment.names() if experiment.get(k).outcome == "binary"]).all()
