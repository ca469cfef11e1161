"""The study runner: results stream per sample, an interrupted run resumed ends with the
same rows as an uninterrupted one, other settings into the same folder are refused, a bad manifest
is refused before a model loads, and the toy's accuracy from its files is its accuracy in memory."""

import pandas as pd
import pytest
import torch

from hooked_av import toy
from hooked_av.toy.dataset import write_toy_dataset
from patching.apps.study import runner
from patching.datasets.manifest import ManifestError, read_manifest
from patching.apps.study.runner import TIMING_COLUMNS, run_study

torch.set_num_threads(1)
EXPERIMENTS = ["knockout", "discarding"]
OPTIONS = {"discarding": {"repeats": 1}}


@pytest.fixture(scope="module")
def model(toy_model):
    return toy_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy_data"), n=8, seed=11)


@pytest.fixture(scope="module")
def full_run(model, data, tmp_path_factory):
    return run_study(model, data, EXPERIMENTS, tmp_path_factory.mktemp("full"), window=1, options=OPTIONS, progress=False)


def frames(out):
    return {e: pd.read_parquet(out / f"{e}.parquet").drop(columns=list(TIMING_COLUMNS), errors="ignore")
            for e in ["accuracy"] + EXPERIMENTS}


def test_one_row_per_sample_and_cell_with_id_metadata_and_correctness(model, data, full_run):
    man = read_manifest(data)
    got = frames(full_run)
    assert got["accuracy"]["id"].tolist() == [r.id for r in man.rows]
    assert got["accuracy"]["kind"].tolist() == [r.meta["kind"] for r in man.rows]
    ko = got["knockout"]
    # one row per (sample, edge, centre); the edges of each sample as the library chooses them
    for r in man.rows:
        part = ko[ko.id == r.id]
        n_edges = part.edge.nunique()
        assert len(part) == n_edges * model.cfg.n_layers and n_edges >= 6
        assert set(part.sample_correct) == {bool(got["accuracy"].set_index("id").sample_correct[r.id])}
    disc = got["discarding"]
    assert len(disc) == len(man.rows) * (model.cfg.n_layers + 1) and set(disc.group) == {"audio|video"}
    assert list(ko.columns[:6]) == ["id", "kind", "question_name", "dataset", "n_options", "sample_correct"]
    # each sample's chance level, 1 / its question's answer words (the toy's vocab.chance), for accuracy figures
    from hooked_av.toy import vocab

    assert got["accuracy"].chance.tolist() == pytest.approx([vocab.chance(r.meta["kind"], r.meta["question_name"]) for r in man.rows])


def test_resume_after_a_crash_equals_an_uninterrupted_run(model, data, full_run, tmp_path, monkeypatch):
    import dataclasses

    from patching.engine import experiment

    calls = {"n": 0}
    record = experiment.get("discarding")
    real = record.run

    def crash_on_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setitem(experiment._REGISTRY, "discarding", dataclasses.replace(record, run=crash_on_fourth))
    with pytest.raises(KeyboardInterrupt):
        run_study(model, data, EXPERIMENTS, tmp_path, window=1, options=OPTIONS, progress=False)
    assert len(list((tmp_path / "parts" / "accuracy").glob("*.parquet"))) == 3  # the sample in flight is lost
    assert len(list((tmp_path / "parts" / "knockout").glob("*.parquet"))) == 4  # ... though its knockout part was written
    monkeypatch.setitem(experiment._REGISTRY, "discarding", record)
    seen = []
    monkeypatch.setattr(runner, "run_sample", lambda m, row, *a, **k: seen.append(row.id) or real_run_sample(m, row, *a, **k))
    run_study(model, data, EXPERIMENTS, tmp_path, window=1, options=OPTIONS, progress=False)
    assert seen == [f"toy-{k:05d}" for k in range(3, 8)]  # done ids skipped
    resumed, whole = frames(tmp_path), frames(full_run)
    for e in whole:
        pd.testing.assert_frame_equal(resumed[e], whole[e], check_exact=True)


real_run_sample = runner.run_sample


def test_other_settings_into_the_same_folder_are_refused(model, data, full_run):
    with pytest.raises(ValueError, match=r"other settings \(window differ: \{'window': 1\} there, \{'window': 2\} now\)"):
        run_study(model, data, EXPERIMENTS, full_run, window=2, options=OPTIONS, progress=False)
    with pytest.raises(ValueError, match=r"experiments, options differ"):
        run_study(model, data, ["knockout"], full_run, window=1, progress=False)
    # a smaller limit into a finished folder used to be a silent no-op (the folder kept every sample)
    with pytest.raises(ValueError, match=r"already holds \d+ finished sample\(s\) beyond this run's first 1"):
        run_study(model, data, EXPERIMENTS, full_run, window=1, options=OPTIONS, limit=1, progress=False)
    run_study(model, data, EXPERIMENTS, full_run, window=1, options=OPTIONS, progress=False)  # the same run resumes


def test_a_bad_manifest_is_refused_before_any_model_loads(data, tmp_path, monkeypatch):
    import hooked_av

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().replace("clip0", "nope0"))
    with pytest.raises(ManifestError, match=r"does not exist"):
        run_study("toy", bad, ["knockout"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) \['knockouts'\]"):
        run_study("toy", data, ["knockouts"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_toy_accuracy_from_files_is_at_least_095_per_kind(model, tmp_path):
    out = run_study(model, write_toy_dataset(tmp_path / "d", n=24, seed=5), ["accuracy"], tmp_path / "acc", progress=False)
    acc = pd.read_parquet(out / "accuracy.parquet")
    per_kind = acc.groupby("kind").sample_correct.agg(["mean", "size"])
    print(per_kind)
    assert set(per_kind.index) == set(toy.KINDS) and (per_kind["size"] >= 3).all()
    assert (per_kind["mean"] >= 0.95).all()


def test_the_cli_writes_toy_data_runs_a_study_and_reports_a_bad_manifest_in_one_line(tmp_path, capsys):
    from patching.apps.cli import main

    assert main(["toy-data", str(tmp_path / "d"), "--n", "3", "--seed", "4"]) == 0
    manifest = tmp_path / "d" / "manifest.jsonl"
    assert len(read_manifest(manifest)) == 3
    args = ["study", "--model", "toy", "--manifest", str(manifest), "--experiment", "knockout", "--window", "1", "--limit", "2"]
    assert main(args + ["--out", str(tmp_path / "s")]) == 0
    assert pd.read_parquet(tmp_path / "s" / "knockout.parquet").id.unique().tolist() == ["toy-00000", "toy-00001"]
    assert (tmp_path / "s" / "report.html").is_file() and "report:" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q", "answer": "a", "video": "none.mp4"}\n{"id": "x"}\n')
    assert main(["study", "--model", "toy", "--manifest", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: manifest") and "4 problem(s)" in err[0]


def test_study_rows_equal_the_library_called_on_the_prepared_sample(model, data, tmp_path):
    from patching.methods.discarding import discarding
    from patching.methods.knockout import knockout
    from patching.datasets.templates import parse_template

    out = run_study(model, data, EXPERIMENTS, tmp_path, window=9, limit=1, options=OPTIONS, progress=False)
    row = read_manifest(data).rows[0]
    inputs = model.prepare(parse_template("default").prompt(row))
    answer = int(pd.read_parquet(out / "accuracy.parquet").answer_token[0])
    ref = knockout(model, inputs, [answer], window=9, progress=False).df.drop(columns=["sample"])
    got = pd.read_parquet(out / "knockout.parquet")
    pd.testing.assert_frame_equal(got[ref.columns], ref, check_exact=True)
    assert (got.window_end - got.window_start + 1).eq(model.cfg.n_layers).all()  # a 9-layer window covers all 4
    ref = discarding(model, inputs, [answer], group="audio|video", repeats=1, progress=False).df.drop(columns=["sample", *TIMING_COLUMNS], errors="ignore")
    got = pd.read_parquet(out / "discarding.parquet")
    pd.testing.assert_frame_equal(got[ref.columns], ref, check_exact=True)
