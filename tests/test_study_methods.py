"""The study runner runs each method of the anchors (knockout with window styles and heads, the
effective pathway, FastV, VAR, DLA, both logit lenses, causal tracing with the hub and ROME presets
and the hub's token sets, dominance, sinks): for each, the study's rows equal the library function
called directly on the prepared sample, on toy samples; options are refused by name before a model
loads, from Python and from the CLI."""

import functools

import pandas as pd
import pytest
import torch

from hooked_av.toy.dataset import write_toy_dataset
from patching.datasets.manifest import read_manifest
from patching.apps.study.runner import TIMING_COLUMNS, run_study
from patching.datasets.templates import parse_template

torch.set_num_threads(1)
N = 2
SINKS = {"ratio": 10.0, "tau": 2.0}  # the toy is 128 wide: the hub's tau 25 can never be exceeded (sqrt(128) = 11.3)
OPTIONS = {
    "knockout": {"window_style": "top_down", "heads": [1], "centres": [1, 3], "edges": ["audio->last", "video->last"]},
    "pathway": {"keep": [["video", "last", [0, 1]], ["audio", "question", []]]},
    "fastv": {"k": 1, "r": 0.5, "max_new_tokens": 2, "repeats": 1},
    "var": {"sinks": SINKS, "layers": [0, 1, 2]},
    "dla": {},
    "logit_lens": {"lens": ["standard", "map_the_flow"]},
    "causal_tracing": {"preset": "hub", "corrupt": "audio", "steps": 2, "centres": [0, 2],
                       "tokens": ["video", "sink(video)", "random_sink_num(video)"], "sinks": SINKS},
    "sinks": SINKS,
    "dominance": {},
}


@pytest.fixture(scope="module")
def model(toy_model):
    return toy_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy_methods"), n=4, seed=7)


@pytest.fixture(scope="module")
def study(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    return run_study(model, data, list(OPTIONS), out, window=None, limit=N, options=OPTIONS, progress=False)


@pytest.fixture(scope="module")
def prepared(model, data, study):
    rows = read_manifest(data).rows[:N]
    answers = pd.read_parquet(study / "accuracy.parquet").answer_token.astype(int).tolist()
    return [(r, model.prepare(parse_template("default").prompt(r)), a) for r, a in zip(rows, answers)]


def same(study, exp, prepared, call, extra=None):
    """The study's rows of `exp` equal `call(inputs, answer)` per sample (its `sample` column dropped)."""
    got = pd.read_parquet(study / f"{exp}.parquet")
    assert got.id.unique().tolist() == [r.id for r, _, _ in prepared]
    for row, inputs, answer in prepared:
        ref = call(inputs, answer).drop(columns=["sample", *TIMING_COLUMNS], errors="ignore").reset_index(drop=True)
        mine = got[got.id == row.id].reset_index(drop=True)
        assert len(ref) > 0, f"{exp}: the reference has no rows for {row.id}"
        pd.testing.assert_frame_equal(mine[ref.columns], ref, check_exact=False, rtol=1e-5, atol=1e-6)
        if extra:
            extra(mine)
    return got


def test_knockout_with_a_window_style_and_heads(model, study, prepared):
    from patching.methods.knockout import knockout, knockout_accuracy
    from patching.engine.results import Result
    from patching.apps.study.stats import Study

    opts = OPTIONS["knockout"]
    got = same(study, "knockout", prepared, lambda x, a: knockout(model, x, [a], progress=False, **opts).df)
    assert sorted(set(zip(got.layer, got.window_start, got.window_end))) == [(1, 1, 3), (3, 3, 3)]  # top-down: to the last layer
    assert {"rel_change_pred", "correct_blocked"} <= set(got.columns)
    direct = pd.concat([knockout(model, x, [a], progress=False, **opts).df.assign(sample=i) for i, (_, x, a) in enumerate(prepared)])
    ref = knockout_accuracy(Result("knockout", direct)).df
    acc = Study(study).knockout_accuracy(by=[])
    pd.testing.assert_frame_equal(acc[ref.columns], ref)
    assert (acc.n_samples == N).all()


def test_pathway_fastv_and_dla(model, study, prepared):
    from patching.methods.dla import dla
    from patching.methods.fastv import fastv
    from patching.methods.pathway import pathway

    got = same(study, "pathway", prepared, lambda x, a: pathway(model, x, [a], **OPTIONS["pathway"]).df)
    assert set(got.run) == {"pathway", "random"}
    got = same(study, "fastv", prepared, lambda x, a: fastv(model, x, [a], progress=False, **OPTIONS["fastv"]).df)
    assert set(got.method) >= {"full", "fastv"}
    same(study, "dla", prepared, lambda x, a: dla(model, x, [a]).df)


def test_both_logit_lenses(model, study, prepared):
    from patching.methods.logit_lens import logit_lens

    got = same(study, "logit_lens", prepared,
               lambda x, a: pd.concat([logit_lens(model, x, [a], lens=k).df.assign(lens=k) for k in ("standard", "map_the_flow")],
                                      ignore_index=True))
    assert set(got.lens) == {"standard", "map_the_flow"}


def test_sinks_and_dominance(model, study, prepared):
    from patching.methods.dominance import dominance
    from patching.methods.sinks import find_sinks

    got = same(study, "sinks", prepared, lambda x, a: find_sinks(model, x, **SINKS).df)
    assert len(got) > 0
    got = same(study, "dominance", prepared, lambda x, a: dominance(model, x, answers=[a]).reset_index(drop=True))
    assert set(got.label) <= {"video", "audio", "neither"} and (got.absent == "").all()


def test_causal_tracing_hub_preset_with_the_hub_token_sets(model, study, prepared):
    from patching.methods.causal_tracing import causal_tracing
    from patching.methods.dominance import dominance
    from patching.methods.sinks import find_sinks
    from patching.engine.token_sets import hub_sets

    opts = {k: v for k, v in OPTIONS["causal_tracing"].items() if k not in ("sinks", "tokens", "corrupt")}

    def ref(x, a):
        sets = hub_sets(find_sinks(model, x, **SINKS), "video")
        tokens = ["video", sets["sink"], sets["random_sink_num"]]
        tokens = [t for t in tokens if t == "video" or len(t.positions(model.token_map(x), 0))]
        df = causal_tracing(model, x, [a], corrupt="audio", tokens=tokens, progress=False, **opts).df
        return df.assign(corrupted="audio", dominance=dominance(model, x, answers=[a]).label.iloc[0])

    got = same(study, "causal_tracing", prepared, ref)
    assert {"video", "sink(video)"} <= set(got.tokens) and (got.window_end == model.cfg.n_layers - 1).all()  # from each layer to the last


def test_causal_tracing_rome_preset_and_the_cli_options(model, data, tmp_path, prepared):
    from patching.methods.causal_tracing import causal_tracing
    from patching.apps.cli import main

    opts = {"preset": "rome", "restore": ["resid_post"], "tokens": "each:question", "n_noise": 2, "centres": [1]}
    opts_file = tmp_path / "options.json"
    opts_file.write_text('{"causal_tracing": {"preset": "rome", "restore": ["resid_post"], "n_noise": 2}}')
    args = ["study", "--model", "toy", "--manifest", str(data), "--experiment", "causal_tracing", "--limit", "1", "--no-report",
            "--options", str(opts_file), "--option", "causal_tracing.tokens=each:question", "--option", "causal_tracing.centres=[1]",
            "--option", "causal_tracing.corrupt=video", "--out", str(tmp_path / "rome")]
    assert main(args) == 0
    row, x, a = prepared[0]
    ref = causal_tracing(model, x, [a], corrupt="video", progress=False, **opts).df.drop(columns=["sample"])
    got = pd.read_parquet(tmp_path / "rome" / "causal_tracing.parquet")
    pd.testing.assert_frame_equal(got[ref.columns], ref, check_exact=False, rtol=1e-5, atol=1e-6)
    assert got.pos.nunique() == len(model.token_map(x).positions("question"))


def test_var_as_accuracy_under_the_intervention(model, study, prepared):
    from patching.engine.metrics import AnswerProb
    from patching.methods.sinks import find_sinks
    from patching.methods.var import var

    got = pd.read_parquet(study / "var.parquet")
    for row, x, a in prepared:
        tm = model.token_map(x)
        sinks = torch.zeros(1, tm.seq_len, dtype=torch.bool)
        sinks[0, find_sinks(model, x, **SINKS).df.pos.tolist()] = True
        mine = got[got.id == row.id].iloc[0]
        metric = AnswerProb([a])
        with torch.no_grad():
            base = model(**x)[:, -1]
            applies = bool((sinks & tm.mask("audio|video|image")).any())
            lg = model.run_with_hooks(**x, fwd_hooks=list(var(tm, sinks, [0, 1, 2])))[:, -1] if applies else base
        assert mine.applied == applies and mine.n_sinks == int(sinks.sum())
        assert mine.p_orig == pytest.approx(float(metric(base)[0]), abs=1e-5)
        assert mine.p == pytest.approx(float(metric(lg)[0]), abs=1e-5)
        assert (mine.pred, mine.correct) == (int(lg[0].argmax()), int(lg[0].argmax()) == a)
    assert got.applied.any(), "no sample had a media sink: the test would not see VAR act"
    assert (got.p != got.p_orig).any()


def test_unknown_or_missing_options_are_refused_before_a_model_loads(data, tmp_path, monkeypatch, capsys):
    import hooked_av
    from patching.apps.cli import main

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    cases = [
        (["knockout"], {"knockout": {"windw_style": "inverse"}}, r"knockout takes no option\(s\) \['windw_style'\]; its options: \["),
        (["knockout"], {"knockout": {"window": 3}}, r"the study sets itself"),
        (["pathway"], {}, r"pathway needs the option\(s\) \['keep'\]"),
        (["var"], {"var": {"sinks": {"tua": 3}}}, r"var.sinks: find_sinks takes no option\(s\) \['tua'\]"),
        (["sinks"], {"dla": {}}, r"options for \['dla'\], which this study does not run"),
    ]
    for exps, opts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            run_study("toy", data, exps, tmp_path / "out", options=opts, progress=False)
    with pytest.raises(ValueError, match=r"window 9 with window_style 'top_down'.*takes no window size"):
        run_study("toy", data, ["knockout"], tmp_path / "out", window=9, options={"knockout": {"window_style": "top_down"}}, progress=False)
    assert not (tmp_path / "out").exists()
    base = ["study", "--model", "toy", "--manifest", str(data), "--out", str(tmp_path / "cli")]
    assert main(base + ["--experiment", "sinks", "--option", "sinks.taux=3"]) == 2
    assert main(base + ["--experiment", "sinks", "--option", "sinks=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: sinks takes no option(s) ['taux']") and "EXPERIMENT.NAME=VALUE" in err[1]


def test_the_report_draws_every_method_and_says_what_each_table_holds(study):
    from patching.apps.study.report import write_report

    html = write_report(study).read_text()
    pngs = sorted(p.name for p in (study / "figures").glob("*.png"))
    kinds = pd.read_parquet(study / "accuracy.parquet").kind.nunique()
    expected = {"knockout.png", "knockout_accuracy.png", "pathway.png", "fastv.png", "logit_lens.png", "causal_tracing.png",
                "sinks.png"} | ({f"dla_{i}.png" for i in range(kinds)} if kinds > 1 else {"dla.png"})
    assert set(pngs) == expected
    assert html.count("<img") == len(expected)
    var = html[html.index("VAR (visual"):html.index("Direct logit attribution")]
    assert "no figure" in var and "the figure" not in var and "none (plain run)" in var
    assert "Table: the figure" in html[html.index("Effective pathway"):html.index("FastV beside")]


def test_every_column_a_study_writes_is_named_by_its_record(study, data):
    # a study refuses metadata named like a result column before the model loads, from the records' columns:
    # those must name every column the rows hold
    from patching.engine.experiment import get, names

    meta = set(read_manifest(data).meta_columns) | {"id", "sample_correct"}
    for exp in ["accuracy", *OPTIONS]:
        cols = set(pd.read_parquet(study / f"{exp}.parquet").columns) - meta
        assert cols <= set(get(exp).columns), (exp, cols - set(get(exp).columns))
    assert all(get(e).columns for e in names(study=True)), [e for e in names(study=True) if not get(e).columns]


def test_settings_are_checked_against_the_models_config_before_its_weights_load(data, tmp_path, monkeypatch, capsys):
    import hooked_av
    from patching.apps.cli import main

    class Loaded(Exception):
        pass

    def load(*a, **k):
        raise Loaded("the model was loaded")

    monkeypatch.setattr(hooked_av, "load", load)
    # the toy is 128 wide: |h / rms(h)| never exceeds sqrt(128) = 11.31, so the hub's tau 25 finds nothing, ever
    with pytest.raises(ValueError, match=r"sinks: tau=25 can never be exceeded: .* at most sqrt\(d_model\) = 11.31"):
        run_study("toy", data, ["sinks"], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"var.sinks \(not given: find_sinks' defaults.*\): tau=25 can never be exceeded"):
        run_study("toy", data, ["var"], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"causal_tracing.sinks \(not given: find_sinks' defaults, for sink\(video\).*\): tau=25"):
        run_study("toy", data, ["causal_tracing"], tmp_path / "a", options={"causal_tracing": {"tokens": ["sink(video)"]}},
                  progress=False)
    with pytest.raises(ValueError, match=r"var.sinks: tau=12 can never be exceeded"):
        run_study("toy", data, ["var"], tmp_path / "a", options={"var": {"sinks": {"tau": 12}}}, progress=False)
    with pytest.raises(ValueError, match=r"causal_tracing.sinks: tau=25 can never be exceeded"):
        run_study("toy", data, ["causal_tracing"], tmp_path / "a", options={"causal_tracing": {"sinks": {"ratio": 10}}}, progress=False)
    # a window that covers the whole 4-layer model warns before the weights load (then the load happens)
    with pytest.warns(UserWarning, match="a 9-layer knockout window covers every layer of this 4-layer model"), pytest.raises(Loaded):
        run_study("toy", data, ["knockout"], tmp_path / "b", window=9, progress=False)
    with pytest.raises(ValueError, match="the inverse of the 5-layer window around layer 1 is empty in a 4-layer model"):
        run_study("toy", data, ["knockout"], tmp_path / "c", window=5, options={"knockout": {"window_style": "inverse"}},
                  progress=False)
    assert main(["study", "--model", "toy", "--manifest", str(data), "--out", str(tmp_path / "cli"), "--experiment", "sinks"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sinks: tau=25 can never be exceeded") and "pass a tau below 11.31" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists() and not (tmp_path / "cli").exists()


def test_sinks_refuse_an_unreachable_ratio_on_the_first_sample_with_the_largest_found(model, data, tmp_path):
    with pytest.raises(ValueError, match=r"sinks, on the first sample: no dimension reaches 100x the median \|activation\| "
                                         r"\(the largest here is \d+(\.\d)?x\)"):
        run_study(model, data, ["sinks"], tmp_path / "s", limit=N, options={"sinks": {"tau": 3}}, progress=False)
    assert not (tmp_path / "s").exists()  # nothing to resume: the folder is not left behind to refuse the next try


def test_sinks_that_find_nothing_write_a_row_per_sample_and_the_report_is_written(model, data, tmp_path):
    from patching.apps.study.report import write_report
    from patching.apps.study.stats import Study

    # reachable settings under which no token is a sink: 11 is below sqrt(128) but above what the toy reaches there
    out = run_study(model, data, ["sinks", "logit_lens"], tmp_path / "s", limit=N, options={"sinks": {"tau": 11, "ratio": 10}},
                    progress=False)
    rows = pd.read_parquet(out / "sinks.parquet")
    assert len(rows) == N and (rows.n_sinks == 0).all() and rows.modality.isna().all()
    assert rows.why.str.match(r"no sink: no position exceeds tau=11 at the sink dimensions \[.*\] \(the largest \|h / rms\(h\)\| "
                              r"there is \d").all()
    assert (rows.max_normalised < 11).all()
    assert Study(out).summary("sinks").empty  # no cell is averaged from samples without a sink
    html = write_report(out).read_text()
    sinks = html[html.index("Attention sinks"):html.index("Logit lens")]
    assert sinks.count("no position exceeds tau=11") == N  # why, per sample (the figure's panel says there is no sink)
    assert (out / "figures" / "logit_lens.png").is_file()  # the other experiments' sections are written


def test_a_report_says_why_an_experiment_gave_no_rows_sample_by_sample(model, data, tmp_path):
    from patching.apps.study.report import write_report
    from patching.apps.study.stats import Study

    out = run_study(model, data, ["causal_tracing", "logit_lens"], tmp_path / "e", limit=N,
                    options={"causal_tracing": {"tokens": ["image"], "corrupt": "audio"}}, progress=False)
    assert not (out / "causal_tracing.parquet").exists()
    empty = Study(out).empty("causal_tracing")
    assert len(empty) == N and (empty.why == "every token set asked for (['image']) is empty in this sample").all()
    with pytest.raises(ValueError, match=r"no 'causal_tracing' rows yet .* 2 sample\(s\) gave none: every token set"):
        Study(out).frame("causal_tracing")
    html = write_report(out).read_text()
    section = html[html.index("Causal tracing"):html.index("Logit lens")]
    assert "No rows: no sample gave causal_tracing a result" in section and section.count("is empty in this sample") == N
    assert html.count("<img") == 1  # the logit lens' figure


def test_layers_named_in_options_are_checked_against_the_models_depth_before_it_loads(data, tmp_path, monkeypatch):
    import hooked_av

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    cases = [  # the toy has 4 layers (0..3); discarding from 4 discards nothing
        (["knockout"], {"knockout": {"centres": [1, 4]}}, r"knockout.centres \[4\] out of range; the model has 4 layers: 0..3"),
        (["discarding"], {"discarding": {"from_layers": [5]}}, r"discarding.from_layers \[5\] out of range; .*0..4 \(4 = none\)"),
        (["dla"], {"dla": {"layers": [7]}}, r"dla.layers \[7\] out of range"),
        (["var"], {"var": {"layers": [2, 9]}}, r"var.layers \[9\] out of range"),
        (["pathway"], {"pathway": {"keep": [["video", "last", [0, 6]]]}}, r"pathway.keep \[6\] out of range"),
        (["fastv"], {"fastv": {"k": 4}}, r"fastv.k \[4\] out of range; k must be in 1..3"),
        (["fastv"], {"fastv": {"k": 0}}, r"fastv.k \[0\] out of range; k must be in 1..3"),
        (["causal_tracing"], {"causal_tracing": {"centres": [-1]}}, r"causal_tracing.centres \[-1\] out of range"),
    ]
    for exps, opts, msg in cases:
        with pytest.raises(ValueError, match=msg + r".*before its weights load"):
            run_study("toy", data, exps, tmp_path / "out", options=opts, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_study_records_the_dtype_its_model_runs_in_and_refuses_a_contradicting_one(model, data, tmp_path):
    import json

    # the numerical floor of every table depends on the dtype: a loaded float32 model is not run in bfloat16
    with pytest.raises(ValueError, match=r"dtype='bfloat16' applies to a model loaded by name; this model is already loaded "
                                         r"in float32: pass dtype='float32' \(or None\)"):
        run_study(model, data, ["accuracy"], tmp_path / "a", dtype="bfloat16", progress=False)
    out = run_study(model, data, ["accuracy"], tmp_path / "b", dtype=None, limit=1, progress=False)
    assert json.loads((out / "settings.json").read_text())["dtype"] == "float32"  # was "checkpoint": no floor for it


@pytest.mark.parametrize("exp", ["var", "causal_tracing"])
def test_a_later_sample_without_sink_dimensions_is_a_row_that_says_so_not_a_crash(model, data, tmp_path, monkeypatch, exp):
    """VAR and causal tracing over the hub's sink sets run find_sinks on every sample: a setting no sample
    reaches is refused on the first one (as `sinks` does); a later sample without sink dimensions has no sink
    (VAR's row says why; tracing has no rows for the sink sets), and the study goes on."""
    from patching.apps.study import Study
    from patching.methods import sinks as sinks_module

    real, calls = sinks_module.find_sinks, []

    @functools.wraps(real)
    def flaky(m, inputs, **kw):  # the n-th call (one per sample) finds no sink dimension
        calls.append(1)
        if len(calls) == fail_at:
            raise sinks_module.NoSinkDimensions(kw.get("ratio", 100.0), 9.5)
        return real(m, inputs, **kw)

    monkeypatch.setattr(sinks_module, "find_sinks", flaky)
    opts = {exp: OPTIONS[exp]}
    fail_at = 1
    with pytest.raises(ValueError, match=rf"{exp}, on the first sample: no dimension reaches 10x .* \(the largest here is 9.5x\)"):
        run_study(model, data, [exp], tmp_path / "first", options=opts, window=1, progress=False)
    calls.clear()
    fail_at = 2
    run_study(model, data, [exp], tmp_path / "later", limit=3, options=opts, window=1, progress=False)
    df = Study(tmp_path / "later").frame(exp)
    ids = [r.id for r in read_manifest(data).rows[:3]]
    assert sorted(df["id"].unique()) == sorted(ids)  # every sample ran
    second = df[df["id"] == ids[1]]
    if exp == "var":
        assert second["applied"].tolist() == [False] and second["why"].iloc[0].startswith("no sink dimension: no dimension reaches")
        assert (df[df["id"] != ids[1]]["why"].str.startswith("no sink dimension") == False).all()  # noqa: E712
    else:  # the sink sets are empty there; the plain set is traced
        assert set(second["tokens"]) == {"video"}
    assert len(calls) == 3  # find_sinks ran on every sample, the second's failure taken as "no sink"
