"""Study statistics: means, counts and seeded bootstrap intervals per cell against a naive
computation; a cell with no correct sample is NaN with n 0 in the "correct" subset, never the
average of all; figures and the HTML report are written from a study folder."""

import json

import numpy as np
import pandas as pd
import pytest

from patching.datasets.manifest import Row
from patching.apps.study.runner import write_part
from patching.engine.stats import bootstrap_ci
from patching.apps.study.stats import Study


def _study(tmp_path):
    """Six samples over two kinds; in kind "b" no sample is correct."""
    rng = np.random.default_rng(3)
    out = tmp_path / "study"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"model": "m", "experiments": ["accuracy", "knockout", "discarding"]}))
    truth = []
    for i in range(6):
        row = Row(index=i, id=f"s{i}", question="q", answer="a", answer_text="a")
        kind, correct = ("a", i != 1) if i < 4 else ("b", False)
        front = {"id": row.id, "kind": kind, "sample_correct": correct}
        ko = pd.DataFrame([{**front, "edge": e, "layer": l, "rel_change": float(rng.normal()), "correct": correct,
                            "correct_blocked": correct and l != 1} for e in ("x->y", "z->y") for l in range(3)])
        disc = pd.DataFrame([{**front, "group": "audio", "from_layer": l, "correct": bool(rng.integers(2)), "flops_saved": 0.5 - l / 10}
                             for l in range(3)])
        write_part(out, "knockout", row, ko)
        write_part(out, "discarding", row, disc)
        write_part(out, "accuracy", row, pd.DataFrame([{**front, "prediction": "a"}]))
        truth.append(ko)
    return out, pd.concat(truth, ignore_index=True)


def test_summary_matches_a_naive_computation(tmp_path):
    out, ko = _study(tmp_path)
    s = Study(out).summary("knockout").set_index(["kind", "edge", "layer", "subset"])
    for kind in ("a", "b"):
        for edge in ("x->y", "z->y"):
            for layer in range(3):
                for subset in ("correct", "all"):
                    vals = [r.rel_change for r in ko.itertuples()
                            if r.kind == kind and r.edge == edge and r.layer == layer and (subset == "all" or r.sample_correct)]
                    got = s.loc[(kind, edge, layer, subset)]
                    assert got.n_samples == len(vals)
                    if not vals:  # kind b has no correct sample: nothing is averaged in its place
                        assert np.isnan(got["mean"]) and np.isnan(got.ci_low) and np.isnan(got.ci_high)
                        continue
                    assert got["mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-12)
                    rng = np.random.default_rng(0)  # the documented draw: [1000, n] indices from seed 0
                    means = sorted(sum(vals[j] for j in rng.integers(0, len(vals), len(vals))) / len(vals) for _ in range(1000))
                    assert (got.ci_low, got.ci_high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
                    assert got.ci_low <= got["mean"] <= got.ci_high
    acc = Study(out).summary("accuracy").set_index("kind")
    assert acc.loc["a", "mean"] == 0.75 and acc.loc["b", "mean"] == 0.0 and set(acc.subset) == {"all"}


def test_bootstrap_edges():
    assert np.isnan(bootstrap_ci([])[0]) and bootstrap_ci([2.0]) == (2.0, 2.0)
    assert bootstrap_ci([0.0, 1.0], seed=1) == bootstrap_ci([0.0, 1.0], seed=1)


def test_figures_and_report_from_a_study_folder(tmp_path):
    from patching.apps.study.report import write_report

    out, _ = _study(tmp_path)
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

    out, _ = _study(tmp_path)
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
    assert len(faint) == 2 * 3  # every correct sample of kind a, per edge
    assert "n=3" in ax_a.get_legend().get_title().get_text()
    assert all(float(t).is_integer() for t in ax_a.get_xticks())
    assert "no sample is answered correctly" in " ".join(t.get_text() for t in ax_b.texts)  # said, not averaged over all
