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
    assert list(ko.columns[:10]) == ["id", "kind", "question_name", "dataset", "n_options", "colour", "brightness", "note",
                                     "instrument", "sample_correct"]
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


def test_a_missing_empty_or_truncated_part_is_recomputed_and_named(model, data, full_run, tmp_path, monkeypatch):
    # deleting one experiment's part of a finished sample left the sample "done" and the merged results
    # without it; a truncated or empty part failed at the merge with a raw ArrowInvalid after all the work
    import shutil
    import warnings

    out = tmp_path / "copy"
    shutil.copytree(full_run, out)
    rows = read_manifest(data).rows
    gone = out / "parts" / "knockout" / runner.part_name(rows[2])
    gone.unlink()
    cut = out / "parts" / "discarding" / runner.part_name(rows[5])
    cut.write_bytes(cut.read_bytes()[:40])
    empty = out / "parts" / "accuracy" / runner.part_name(rows[6])
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"cannot read the result part {cut}.*run the same study again to recompute it"):
        runner.merge(out, ["discarding"])
    seen = []
    monkeypatch.setattr(runner, "run_sample", lambda m, row, tpl, sc, exps, *a, **k: seen.append((row.id, exps))
                        or real_run_sample(m, row, tpl, sc, exps, *a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_study(model, data, EXPERIMENTS, out, window=1, options=OPTIONS, progress=False)
    assert seen == [(rows[2].id, ["knockout"]), (rows[5].id, ["discarding"]), (rows[6].id, ["accuracy"])]
    said = " ".join(str(w.message) for w in caught)
    assert f"{cut} (sample {rows[5].id!r}) is unreadable" in said and f"{empty} (sample {rows[6].id!r}) is empty" in said
    resumed, whole = frames(out), frames(full_run)
    for e in whole:
        pd.testing.assert_frame_equal(resumed[e], whole[e], check_exact=True)


def test_an_experiment_without_rows_for_a_sample_writes_an_empty_part_and_the_sample_is_done(model, data, tmp_path,
                                                                                            monkeypatch):
    import dataclasses

    from patching.engine import experiment

    record = experiment.get("discarding")
    monkeypatch.setitem(experiment._REGISTRY, "discarding", dataclasses.replace(record, run=lambda x, o: pd.DataFrame()))
    run_study(model, data, ["discarding"], tmp_path, limit=2, options=OPTIONS, progress=False)
    assert len(list((tmp_path / "parts" / "discarding").glob("*.parquet"))) == 2
    assert not (tmp_path / "discarding.parquet").exists()  # no rows: nothing merged
    monkeypatch.setattr(runner, "run_sample", lambda *a: pytest.fail("a done sample ran again"))
    run_study(model, data, ["discarding"], tmp_path, limit=2, options=OPTIONS, progress=False)


def test_a_settings_file_that_cannot_be_read_is_named_before_any_model_loads(data, full_run, tmp_path, monkeypatch):
    import shutil

    import hooked_av

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    for text in ('{"model": "toy", "experi', "", "[1, 2]"):
        out = tmp_path / f"s{len(text)}"
        shutil.copytree(full_run, out)
        (out / "settings.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{out / 'settings.json'} cannot be read .*restore it, or use another --out"):
            run_study("toy", data, EXPERIMENTS, out, window=1, options=OPTIONS, progress=False)


def test_an_out_folder_that_is_a_file_is_refused_before_any_work(data, tmp_path, monkeypatch, capsys):
    import hooked_av
    from patching.apps.cli import main

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(runner, "read_manifest", lambda *a, **k: pytest.fail("the manifest was read"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"the output folder '.*/f' is a file; name a folder"):
        run_study("toy", data, ["accuracy"], tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match=r"the output folder '.*/f/sub' lies under .*/f, which is a file"):
        run_study("toy", data, ["accuracy"], tmp_path / "f" / "sub", progress=False)
    assert main(["study", "--model", "toy", "--manifest", str(data), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file; name a folder" in err[0]


@pytest.mark.parametrize("column, experiments", [("layer", ["knockout"]), ("p_orig", ["knockout"]),
                                                 ("flops_saved", ["discarding"]), ("model", ["accuracy"]),
                                                 ("prediction", ["accuracy"])])
def test_metadata_named_like_a_result_column_is_refused_before_the_model_loads(model, data, tmp_path, monkeypatch,
                                                                                column, experiments):
    import json

    import hooked_av

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    bad = data.parent / f"clash_{column}.jsonl"
    bad.write_text("\n".join(json.dumps({**r, column: "x"}) for r in lines) + "\n")
    with pytest.raises(ManifestError, match=rf"column '{column}': '{column}' is (a result column of|a column the study)"):
        run_study("toy", bad, experiments, tmp_path / "out", options=OPTIONS if "discarding" in experiments else None,
                  progress=False)
    if column == "layer":  # a column of an experiment the study does not run is metadata like any other
        out = run_study(model, bad, ["accuracy"], tmp_path / "ok", limit=1, progress=False)
        assert pd.read_parquet(out / "accuracy.parquet").layer.tolist() == ["x"]


def test_words_outside_the_vocabulary_are_refused_before_the_model_loads(data, tmp_path, monkeypatch):
    # the toy's prepare refused them only when the sample came up, after the model had loaded
    import json

    import hooked_av

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    lines[1]["question"] = "what colour is clip one, please ?"
    lines[3]["answer"] = "turquoise"
    bad = data.parent / "vocab.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(ManifestError, match=r"row 2 \(id 'toy-00001'\), column 'question': word\(s\) \['one,', 'please'\] "
                                            r"are not in the model's vocabulary"):
        run_study("toy", bad, ["accuracy"], tmp_path / "out", progress=False)
    lines[1]["question"] = "what colour is clip one ?"
    bad.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(ValueError, match=r"'toy-00003': the answer 'turquoise' starts with a word the tokenizer does not know"):
        run_study("toy", bad, ["accuracy"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_discarding_columns_are_named_by_its_record(data, full_run):
    from patching.engine.experiment import get

    meta = set(read_manifest(data).meta_columns) | {"id", "sample_correct"}
    for exp in EXPERIMENTS:
        assert set(pd.read_parquet(full_run / f"{exp}.parquet").columns) - meta <= set(get(exp).columns)


def test_a_study_under_a_tower_hook_runs_its_sweeps_on_the_edited_towers(model, data, full_run, tmp_path):
    # the study encodes each sample once (under the hook) and its experiments sweep that encoding: allowed,
    # and the edit shows in every experiment's rows
    import torch as _torch

    def zero(t, hook):
        return _torch.zeros_like(t)

    with model.hooks(fwd_hooks=[("hook_video_embeds", zero)]):
        out = run_study(model, data, EXPERIMENTS, tmp_path, window=1, options=OPTIONS, limit=2, progress=False)
    edited, plain = frames(out), frames(full_run)
    assert (edited["accuracy"].p_answer - plain["accuracy"].p_answer[:2]).abs().max() > 1e-3
    ko, ko_plain = edited["knockout"], plain["knockout"][plain["knockout"].id.isin(edited["knockout"].id)]
    assert len(ko) == len(ko_plain) and (ko.p_orig.to_numpy() - ko_plain.p_orig.to_numpy()).__abs__().max() > 1e-3
