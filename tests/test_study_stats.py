"""Study statistics: means, counts, intervals and paired tests per cell against a naive computation
(the seeded bootstrap for continuous values, Wilson for 0/1 ones, the sign test and McNemar's written
out, Holm over the cells); fewer than 5 samples get no interval; a cell with no correct sample is NaN
with n 0 in the "correct" subset, never the average of all; figures and the HTML report are written
from a study folder."""

import json
from math import comb

import numpy as np
import pandas as pd
import pytest

from patching.datasets.manifest import Row
from patching.apps.study.runner import write_part
from patching.engine.stats import bootstrap_ci
from patching.apps.study.stats import Study
from patching.figures.plots import wilson


def _study(tmp_path):
    """Twelve samples over two kinds: kind "a" has 8 (7 correct), kind "b" 4, none correct."""
    rng = np.random.default_rng(3)
    out = tmp_path / "study"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"model": "m", "experiments": ["accuracy", "knockout", "discarding"]}))
    truth, disc_truth = [], []
    for i in range(12):
        row = Row(index=i, id=f"s{i}", question="q", answer="a", answer_text="a")
        kind, correct = ("a", i != 1) if i < 8 else ("b", False)
        front = {"id": row.id, "kind": kind, "sample_correct": correct}
        ko = pd.DataFrame([{**front, "edge": e, "layer": l, "rel_change": float(rng.normal()), "correct": correct,
                            "correct_blocked": correct and l != 1} for e in ("x->y", "z->y") for l in range(3)])
        disc = pd.DataFrame([{**front, "group": "audio", "from_layer": l, "correct": bool(rng.integers(2)) and l > 0,
                              "correct_full": True, "flops_saved": 0.5 - l / 10} for l in range(3)])
        write_part(out, "knockout", row, ko)
        write_part(out, "discarding", row, disc)
        write_part(out, "accuracy", row, pd.DataFrame([{**front, "prediction": "a", "chance": 0.25}]))
        truth.append(ko)
        disc_truth.append(disc)
    return out, pd.concat(truth, ignore_index=True), pd.concat(disc_truth, ignore_index=True)


def _sign_p(v, floor):
    up, down = sum(x > floor for x in v), sum(x < -floor for x in v)
    n = up + down
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(up, down) + 1)) / 2 ** n) if n else 1.0


def _holm(p):
    p = np.asarray(p, dtype=float)
    order, m, out, running = np.argsort(p), len(p), np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_summary_matches_a_naive_computation(tmp_path):
    out, ko, disc = _study(tmp_path)
    summary = Study(out).summary("knockout")
    s = summary.set_index(["kind", "edge", "layer", "subset"])
    for kind in ("a", "b"):
        for edge in ("x->y", "z->y"):
            for layer in range(3):
                for subset in ("correct", "all"):
                    vals = [r.rel_change for r in ko.itertuples()
                            if r.kind == kind and r.edge == edge and r.layer == layer and (subset == "all" or r.sample_correct)]
                    got = s.loc[(kind, edge, layer, subset)]
                    assert got.n_samples == len(vals)
                    if len(vals) < 5:  # kind b: 4 samples, none correct: no interval, no test, and nothing averaged in its place
                        assert np.isnan(got.ci_low) and np.isnan(got.ci_high) and np.isnan(got.p_value)
                        assert got.interval == "none" and got.note == "n < 5"
                        assert (np.isnan(got["mean"]) if not vals else got["mean"] == pytest.approx(np.mean(vals)))
                        continue
                    assert got["mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-12)
                    rng = np.random.default_rng(0)  # the documented draw: [1000, n] indices from seed 0
                    means = sorted(sum(vals[j] for j in rng.integers(0, len(vals), len(vals))) / len(vals) for _ in range(1000))
                    assert got.interval == "bootstrap"
                    assert (got.ci_low, got.ci_high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
                    assert got.ci_low <= got["mean"] <= got.ci_high
                    assert got.test == "sign test" and got.p_value == pytest.approx(_sign_p(vals, 1e-3))
    for subset, part in summary.groupby("subset"):  # Holm over the cells of one figure: every tested cell of the subset
        tested = part.p_value.notna()
        assert part.p_holm[tested].to_numpy() == pytest.approx(_holm(part.p_value[tested]))
    acc = Study(out).summary("accuracy").set_index("kind")
    assert acc.loc["a", "mean"] == 0.875 and acc.loc["b", "mean"] == 0.0 and set(acc.subset) == {"all"}
    assert (acc.loc["a", "ci_low"], acc.loc["a", "ci_high"]) == pytest.approx(wilson(7, 8, z=1.959964), abs=1e-5)
    assert acc.loc["a", "interval"] == "Wilson" and acc.loc["b", "interval"] == "none"
    d = Study(out).summary("discarding").set_index(["kind", "from_layer", "subset"])
    for layer in range(3):
        part = disc[(disc.kind == "a") & (disc.from_layer == layer)]
        got = d.loc[("a", layer, "all")]
        lost = int((part.correct_full & ~part.correct).sum())
        naive = min(1.0, 2 * sum(comb(lost, i) for i in range(1)) / 2 ** lost) if lost else 1.0
        assert got.test == "McNemar" and got.p_value == pytest.approx(naive)
        assert (got.ci_low, got.ci_high) == pytest.approx(wilson(int(part.correct.sum()), len(part), z=1.959964), abs=1e-5)


def test_bootstrap_edges():
    assert np.isnan(bootstrap_ci([])[0]) and bootstrap_ci([2.0]) == (2.0, 2.0)
    assert bootstrap_ci([0.0, 1.0], seed=1) == bootstrap_ci([0.0, 1.0], seed=1)


def test_figures_and_report_from_a_study_folder(tmp_path):
    from patching.apps.study.report import write_report

    out, _, _ = _study(tmp_path)
    path = write_report(out)
    html = path.read_text()
    assert path == out / "report.html" and html.count("<img src=\"data:image/png;base64,") == 3
    assert "http" not in html.replace("http-equiv", "")  # self-contained
    assert {p.name for p in (out / "figures").glob("*.png")} == {"knockout.png", "knockout_accuracy.png", "discarding.png"}
    both = write_report([out, out], tmp_path / "compare" / "compare.html")
    assert both.read_text().count("<img") == 3
    with pytest.raises(ValueError, match="give the report's path"):
        write_report([out, out])


def test_the_knockout_figure_draws_the_summary_means_bands_and_every_sample(tmp_path):
    from patching.apps.study.figures import figure

    out, _, _ = _study(tmp_path)
    fig = figure(out, "knockout")
    ax_a, ax_b = fig.axes  # one panel per kind
    s = Study(out).summary("knockout", by=["kind", "edge", "layer"])
    s = s[(s.subset == "correct") & (s.kind == "a")]
    means = {line.get_label(): line for line in ax_a.get_lines() if line.get_label() in ("x->y", "z->y")}
    assert set(means) == {"x->y", "z->y"}
    bands = ax_a.collections
    for (edge, line), band in zip(means.items(), bands):
        ref = s[s.edge == edge].sort_values("layer")
        np.testing.assert_allclose(line.get_ydata(), ref["mean"], atol=1e-12)  # the table's statistic
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(ref.ci_low.min()) and ys.max() == pytest.approx(ref.ci_high.max())
    faint = [line for line in ax_a.get_lines() if line.get_label() == "_sample"]
    assert len(faint) == 2 * 7  # every correct sample of kind a, per edge
    assert "n=7" in ax_a.get_legend().get_title().get_text()
    assert all(float(t).is_integer() for t in ax_a.get_xticks())
    assert "no sample is answered correctly" in " ".join(t.get_text() for t in ax_b.texts)  # said, not averaged over all


def test_a_knockout_curve_that_never_drops_beyond_the_floor_has_no_lowest_point():
    from patching.apps.study.report import lowest_points

    def cells(edge, means):
        return [dict(model="m", kind="a", edge=edge, layer=layer, mean=m, floor=1e-3, note="") for layer, m in enumerate(means)]

    # "x": noise within the floor and a rise; before, its "lowest point" was whichever layer's noise was lowest
    summary = pd.DataFrame(cells("x->y", [2e-4, -4e-4, 3.0, 0.0]) + cells("z->y", [0.0, -60.0, -2e-4, -80.0]))
    low = lowest_points(summary).set_index("edge")
    assert low.loc["x->y", "layer"] == "" and low.loc["x->y", "note"] == "no drop at any layer"
    assert low.loc["z->y", "layer"] == 3 and low.loc["z->y", "mean"] == -80.0 and low.loc["z->y", "note"] == ""
