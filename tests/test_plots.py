"""Result.plot says what the data say (patching/figures/plots.py): the dimension of interest keeps its own series
or panel, the spread over samples and their count are shown, layer ticks are integers, signed heatmaps
are centred on 0, positions carry the TokenMap's labels, the statistic is named. Structure, not pixels,
on small hand-made frames whose right figure is known."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from hooked_av.inputs import TokenMap  # noqa: E402
from hooked_av.inputs.token_map import GROUPS  # noqa: E402
from hooked_av.viz import plot_attention_mass  # noqa: E402
from patching.figures.plots import position_labels, wilson  # noqa: E402
from patching.engine.results import Result  # noqa: E402

LAYERS = range(4)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def series(ax) -> list:
    """The labelled lines of an axes: one per series (samples are drawn unlabelled, as '_sample')."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def legend_text(ax) -> str:
    leg = ax.get_legend()
    return " ".join([leg.get_title().get_text(), *(t.get_text() for t in leg.get_texts())])


def patching_frame(values: dict, samples=range(4), sites=("resid_pre",)) -> pd.DataFrame:
    """activation_patching rows for positions='groups': {token set: normalised value} in every layer."""
    rows = [dict(sample=s, site=site, layer=layer, head=-1, pos=-1, tokens=t, metric=v, m_clean=1.0, m_corrupt=0.0, normalised=v)
            for s in samples for site in sites for layer in LAYERS for t, v in values.items()]
    return pd.DataFrame(rows)


def test_patching_over_groups_keeps_one_line_per_group():
    # the case: audio restores 0.98, every other group nothing; the mean over groups is a flat 0.33 line
    groups = {"audio": 0.98, "video": 0.0, "question": 0.0}
    ax = Result("activation_patching", patching_frame(groups)).plot()
    lines = series(ax)
    assert [line.get_label() for line in lines] == list(groups)
    for line, v in zip(lines, groups.values()):
        assert np.allclose(line.get_ydata(), v)
    assert "n=4" in legend_text(ax)


def test_patching_sites_are_panels_and_token_sets_lines():
    res = Result("activation_patching", patching_frame({"audio": 1.0, "last": 0.5}, sites=("resid_pre", "attn_out")))
    axes = res.plot()
    assert len(axes) == 2
    assert ["resid_pre" in axes[0].get_title(), "attn_out" in axes[1].get_title()] == [True, True]
    assert all(len(series(a)) == 2 for a in axes)


def test_samples_whose_corruption_changes_nothing_are_left_out_and_said():
    df = patching_frame({"audio": 0.9})
    df.loc[df["sample"] == 3, ["m_corrupt", "normalised"]] = [0.999, -3000.0]  # a gap of 0.001: the ratio explodes
    ax = Result("activation_patching", df).plot()
    assert np.allclose(series(ax)[0].get_ydata(), 0.9)
    assert "1 left out" in ax.get_title() and "n=3" in legend_text(ax)
    with pytest.raises(ValueError, match="min_gap applies"):
        Result("knockout", knockout_frame()).plot(min_gap=0.1)


def test_causal_tracing_keeps_token_sets_apart():
    rows = [dict(sample=s, site=site, tokens=t, layer=layer, indirect_effect=v * (layer == 2), correct=True)
            for s in range(3) for site in ("resid", "attn_in") for t, v in (("audio", 0.8), ("video", -0.1), ("last", 0.0))
            for layer in LAYERS]
    axes = Result("causal_tracing", pd.DataFrame(rows)).plot()
    assert len(axes) == 2
    for a in axes:
        lines = series(a)
        assert [line.get_label() for line in lines] == ["audio", "video", "last"]
        assert lines[0].get_ydata()[2] == pytest.approx(0.8) and lines[1].get_ydata()[2] == pytest.approx(-0.1)
        assert "mean over correct samples" in a.get_title()


def knockout_frame(edges=("audio->last", "video->last"), n=4):
    """Bimodal samples: at layer 1 half of them lose everything (-100 %), half nothing (0 %)."""
    rows = [dict(sample=s, edge=e, layer=layer, rel_change=-100.0 * (layer == 1 and s % 2 == 0 and e == edges[0]), correct=True)
            for s in range(n) for e in edges for layer in LAYERS]
    return pd.DataFrame(rows)


def test_knockout_shows_every_sample_the_band_the_count_and_integer_layers():
    ax = Result("knockout", knockout_frame()).plot()
    assert [line.get_label() for line in series(ax)] == ["audio->last", "video->last"]
    samples = [line for line in ax.get_lines() if line.get_label() == "_sample"]
    assert len(samples) == 2 * 4  # every sample of every edge
    assert sorted({line.get_ydata()[1] for line in samples}) == [-100.0, 0.0]  # both modes visible, not only the mean -50
    assert series(ax)[0].get_ydata()[1] == pytest.approx(-50.0)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    assert "n=4 correct samples" in legend_text(ax)
    assert "mean" in ax.get_title() and "bootstrap 95%" in ax.get_title()
    ax.figure.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_series_with_different_counts_name_theirs():
    df = knockout_frame()
    df.loc[(df["sample"] == 0) & (df["edge"] == "video->last"), "correct"] = False  # not possible in knockout, but a frame may hold it
    df = df[~((df["sample"] == 0) & (df["edge"] == "video->last"))]
    ax = Result("knockout", df).plot()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["audio->last (n=4)", "video->last (n=3)"]


def token_map(groups: list[str]) -> TokenMap:
    g = torch.tensor([[GROUPS.index(x) for x in groups]])
    minus = torch.full_like(g, -1)
    nan = torch.full(g.shape, float("nan"))
    return TokenMap(group=g, item=minus, frame=minus, time=nan, time_end=nan, chunk=minus)


def test_per_position_heatmap_is_centred_on_zero_and_labelled_by_the_token_map():
    layout = ["padding", "system", "audio", "audio", "question", "last"]
    tm = token_map(layout)
    real = layout[1:]  # samples are trimmed of their left padding
    rows = [dict(sample=0, site="resid_pre", layer=layer, head=-1, pos=p, tokens=t, m_clean=1.0, m_corrupt=0.0,
                 normalised=1.0 if t == "audio" and layer == 0 else (-0.2 if t == "last" else 0.0))
            for layer in LAYERS for p, t in enumerate(real)]
    ax = Result("activation_patching", pd.DataFrame(rows)).plot(tm=tm)
    norm = ax.images[0].norm
    assert norm.vcenter == 0 and norm.vmin == -norm.vmax == -1.0  # symmetric: -0.2 is not drawn as pale red
    assert [t.get_text() for t in ax.get_xticklabels()] == position_labels(tm, 0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert ax.get_xlabel() == "position"


def test_per_position_heatmap_refuses_to_average_samples_of_different_layouts():
    rows = [dict(sample=s, site="resid_pre", layer=0, head=-1, pos=p, tokens=t, m_clean=1.0, m_corrupt=0.0, normalised=0.5)
            for s, layout in ((0, ["system", "audio", "last"]), (1, ["system", "audio", "audio", "last"]))
            for p, t in enumerate(layout)]
    res = Result("activation_patching", pd.DataFrame(rows))
    with pytest.raises(ValueError, match="different token layouts .*pass sample="):
        res.plot()
    assert res.plot(sample=1).images[0].get_array().shape == (1, 4)


def test_dla_is_a_layer_by_head_panel_per_group_on_one_centred_scale():
    rows = [dict(sample=s, layer=layer, head=h, group=g, dla=(2.0 if g == "audio" else -0.5) * (h == 1))
            for s in range(2) for layer in LAYERS for h in range(4) for g in ("audio", "question")]
    axes = Result("dla", pd.DataFrame(rows)).plot()
    assert [a.get_title() for a in axes] == ["audio (n=2)", "question (n=2)"]
    norms = [a.images[0].norm for a in axes]
    assert all(n.vcenter == 0 and n.vmax == 2.0 for n in norms)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0", "1", "2", "3"]


def test_knockout_accuracy_lines_per_edge_with_wilson_bands():
    df = pd.DataFrame([dict(edge=e, layer=layer, accuracy=50.0 if e == "audio->last" else 100.0, accuracy_base=100.0)
                       for e in ("audio->last", "video->last") for layer in LAYERS])
    ax = Result("knockout_accuracy", df, dict(n_samples=10, sample_mode="correct")).plot()
    assert [line.get_label() for line in series(ax)] == ["audio->last", "video->last", "no knockout"]
    assert "n=10" in legend_text(ax)
    # the legend sits below the axes, clear of the curves (they span the full height)
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0
    lo, hi = wilson(5, 10)
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(100 * lo) and band.max() == pytest.approx(100 * hi)
    assert (round(lo, 3), round(hi, 3)) == (0.237, 0.763)  # the textbook Wilson interval of 5 / 10
    with pytest.raises(ValueError, match="n_samples"):
        Result("knockout_accuracy", df).plot()


def test_pathway_fastv_and_sinks_count_their_samples():
    pw = pd.DataFrame([dict(sample=s, run=r, kept_share=0.4, correct=(r == "pathway") or s == 0, correct_orig=True)
                       for s in range(5) for r in ("pathway", "random")])
    ax = Result("pathway", pw).plot()
    assert [p.get_height() for p in ax.patches] == pytest.approx([1.0, 0.2])
    assert all("n=5" in t.get_text() for t in ax.get_xticklabels())
    fv = pd.DataFrame([dict(sample=s, method=m, correct=True, flops_saved=f) for s in range(3)
                       for m, f in (("full", 0.0), ("fastv", 0.3), ("discard audio", 0.5))])
    ax = Result("fastv", fv).plot()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full (n=3)", "fastv (n=3)", "discard audio (n=3)"]
    sk = pd.DataFrame(dict(sample=[0, 0, 1], modality=["audio"] * 3, pos=[3, 9, 4], rank=[0, 1, 0], layers_flagged=[4, 2, 4],
                           mds=[0.5, -0.4, 0.6], cross_modal=[True, False, True]))
    ax = Result("sinks", sk).plot()
    assert "2 sinks, n=2" in legend_text(ax)


def test_attention_mass_keeps_custom_groups_in_its_ticks():
    groups = ["question", "audio[0]", "audio[1]", "last"]
    df = pd.DataFrame([dict(layer=0, dst=d, src=s, mass=0.25, n_dst=1, n_src=1) for d in groups for s in groups])
    fig = plot_attention_mass(df)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == groups
    assert [t.get_text() for t in ax.get_yticklabels()] == groups


def test_a_plot_without_sample_lines_does_not_claim_them():
    import matplotlib

    matplotlib.use("Agg")
    df = pd.DataFrame(dict(sample=[0, 1, 0, 1], edge=["a->b"] * 4, layer=[0, 0, 1, 1], rel_change=[0.0, -100.0, -5.0, -5.0],
                           correct=[True] * 4))
    ax = Result("knockout", df).plot(samples=False)
    assert "thin lines" not in ax.get_title() and "bootstrap 95% CI" in ax.get_title()
    assert "thin lines: samples" in Result("knockout", df).plot().get_title()
