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
from patching.engine.stats import bootstrap_ci  # noqa: E402
from patching.figures.plots import position_labels, wilson  # noqa: E402
from patching.engine.results import Result  # noqa: E402

LAYERS = range(4)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def panels(fig) -> list:
    """The panels of a figure `Result.plot` returned (its colour bars left out)."""
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


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
    (ax,) = panels(Result("activation_patching", patching_frame(groups)).plot())
    lines = series(ax)
    # video and question restore nothing: one flat line hides the other, and the one legend entry says so
    assert [line.get_label() for line in lines] == ["audio", "video = question (same curve)"]
    assert [line.get_label() for line in ax.get_lines()][:3] == ["audio", "_hidden", "video = question (same curve)"]
    for line, v in zip(lines, groups.values()):
        assert np.allclose(line.get_ydata(), v)
    assert "n=4" in legend_text(ax)


def test_patching_sites_are_panels_and_token_sets_lines():
    res = Result("activation_patching", patching_frame({"audio": 1.0, "last": 0.5}, sites=("resid_pre", "attn_out")))
    axes = panels(res.plot())
    assert len(axes) == 2
    assert ["resid_pre" in axes[0].get_title(), "attn_out" in axes[1].get_title()] == [True, True]
    assert all(len(series(a)) == 2 for a in axes)


def test_samples_whose_corruption_changes_nothing_are_left_out_and_said():
    df = patching_frame({"audio": 0.9})
    df.loc[df["sample"] == 3, ["m_corrupt", "normalised"]] = [0.999, -3000.0]  # a gap of 0.001: the ratio explodes
    (ax,) = panels(Result("activation_patching", df).plot())
    assert np.allclose(series(ax)[0].get_ydata(), 0.9)
    assert "1 left out" in ax.get_title() and "n=3" in legend_text(ax)
    with pytest.raises(ValueError, match="min_gap applies"):
        Result("knockout", knockout_frame()).plot(min_gap=0.1)


def test_causal_tracing_keeps_token_sets_apart():
    rows = [dict(sample=s, site=site, tokens=t, layer=layer, indirect_effect=v * (layer == 2), correct=True)
            for s in range(3) for site in ("resid", "attn_in") for t, v in (("audio", 0.8), ("video", -0.1), ("last", 0.0))
            for layer in LAYERS]
    axes = panels(Result("causal_tracing", pd.DataFrame(rows)).plot())
    assert len(axes) == 2
    for a in axes:
        lines = series(a)
        assert [line.get_label() for line in lines] == ["audio", "video", "last"]
        assert lines[0].get_ydata()[2] == pytest.approx(0.8) and lines[1].get_ydata()[2] == pytest.approx(-0.1)
        assert "mean over correct samples" in a.get_title()


def knockout_frame(edges=("audio->last", "video->last"), n=4, values=None):
    """At layer 1 of the first edge, sample s changes p(answer) by values[s % len(values)] % (default: half of
    the samples lose everything, -100 %, half nothing); every other cell is 0."""
    values = (-100.0, 0.0) if values is None else values
    rows = [dict(sample=s, edge=e, layer=layer, rel_change=values[s % len(values)] if layer == 1 and e == edges[0] else 0.0,
                 correct=True)
            for s in range(n) for e in edges for layer in LAYERS]
    return pd.DataFrame(rows)


def test_knockout_shows_every_sample_the_band_the_count_and_integer_layers():
    values = (-100.0, -37.0, 0.0, -2.0, -61.0, -8.0)
    (ax,) = panels(Result("knockout", knockout_frame(values=values, n=6)).plot())
    assert [line.get_label() for line in series(ax)] == ["audio->last", "video->last"]
    samples = [line for line in ax.get_lines() if line.get_label() == "_sample"]
    assert len(samples) == 6  # every sample of the edge whose values are continuous; the flat edge has none to show
    assert sorted(line.get_ydata()[1] for line in samples) == sorted(values)  # the spread, not only the mean
    assert series(ax)[0].get_ydata()[1] == pytest.approx(np.mean(values))
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][0].get_paths()[0].vertices[:, 1]
    lo, hi = bootstrap_ci(values)  # the seeded percentile bootstrap Study.summary reports
    assert band.min() == pytest.approx(lo) and band.max() == pytest.approx(0.0)
    assert "n=6 correct samples" in legend_text(ax)
    assert "mean" in ax.get_title() and "bootstrap 95% CI" in ax.get_title() and "thin lines: samples" in ax.get_title()
    ax.figure.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_knockout_values_at_two_levels_are_the_share_with_its_wilson_interval_not_zigzag_lines():
    # a confident model's knockout loses all of p(answer) or none: samples zigzag between 0 and -100 around a mean
    # that describes none of them; the share of samples at -100 with its Wilson interval does describe them
    (ax,) = panels(Result("knockout", knockout_frame(n=6)).plot())
    assert not [line for line in ax.get_lines() if line.get_label() == "_sample"]
    assert series(ax)[0].get_ydata()[1] == pytest.approx(-50.0)
    lo, hi = wilson(3, 6, z=1.959964)  # the textbook formula at the 97.5 % normal quantile
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(-100 * hi) and band.max() == pytest.approx(0.0)
    assert "Wilson 95% CI of the share" in ax.get_title() and "thin lines" not in ax.get_title()


def test_series_with_different_counts_name_theirs():
    df = knockout_frame()
    df.loc[(df["sample"] == 0) & (df["edge"] == "video->last"), "correct"] = False  # not possible in knockout, but a frame may hold it
    df = df[~((df["sample"] == 0) & (df["edge"] == "video->last"))]
    (ax,) = panels(Result("knockout", df).plot())
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
    (ax,) = panels(Result("activation_patching", pd.DataFrame(rows)).plot(tm=tm))
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
    assert panels(res.plot(sample=1))[0].images[0].get_array().shape == (1, 4)


def test_dla_is_a_layer_by_head_panel_per_group_on_one_centred_scale():
    rows = [dict(sample=s, layer=layer, head=h, group=g, dla=(2.0 if g == "audio" else -0.5) * (h == 1))
            for s in range(2) for layer in LAYERS for h in range(4) for g in ("audio", "question")]
    axes = panels(Result("dla", pd.DataFrame(rows)).plot())
    assert [a.get_title() for a in axes] == ["audio (n=2)", "question (n=2)"]
    norms = [a.images[0].norm for a in axes]
    assert all(n.vcenter == 0 and n.vmax == 2.0 for n in norms)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0", "1", "2", "3"]


def test_knockout_accuracy_lines_per_edge_with_wilson_bands():
    df = pd.DataFrame([dict(edge=e, layer=layer, accuracy=50.0 if e == "audio->last" else 100.0, accuracy_base=100.0)
                       for e in ("audio->last", "video->last") for layer in LAYERS])
    (ax,) = panels(Result("knockout_accuracy", df, dict(n_samples=10, sample_mode="correct")).plot())
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
    (ax,) = panels(Result("pathway", pw).plot())
    assert [p.get_height() for p in ax.patches] == pytest.approx([1.0, 0.2])
    assert all("n=5" in t.get_text() for t in ax.get_xticklabels())
    fv = pd.DataFrame([dict(sample=s, method=m, correct=True, flops_saved=f) for s in range(3)
                       for m, f in (("full", 0.0), ("fastv", 0.3), ("discard audio", 0.5))])
    (ax,) = panels(Result("fastv", fv).plot())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full (n=3)", "fastv (n=3)", "discard audio (n=3)"]
    sk = pd.DataFrame(dict(sample=[0, 0, 1], modality=["audio"] * 3, pos=[3, 9, 4], rank=[0, 1, 0], layers_flagged=[4, 2, 4],
                           mds=[0.5, -0.4, 0.6], cross_modal=[True, False, True]))
    (ax,) = panels(Result("sinks", sk).plot())
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
    df = pd.DataFrame(dict(sample=[0, 1, 2, 3, 4] * 2, edge=["a->b"] * 10, layer=[0] * 5 + [1] * 5,
                           rel_change=[0.0, -100.0, -40.0, -3.0, -70.0] + [-5.0] * 5, correct=[True] * 10))
    (ax,) = panels(Result("knockout", df).plot(samples=False))
    assert "thin lines" not in ax.get_title() and "bootstrap 95% CI" in ax.get_title()
    assert "thin lines: samples" in panels(Result("knockout", df).plot())[0].get_title()


def test_few_samples_get_an_x_and_no_band_and_significant_cells_a_star():
    # 3 samples: no interval, marked; 10 samples all losing p(answer) at layer 1: the sign test (p = 2 / 2^10) holds after
    # Holm over the figure's 8 cells
    (ax,) = panels(Result("knockout", knockout_frame(values=(-100.0,), n=3)).plot())
    xs = [line for line in ax.get_lines() if line.get_label() == "_small"]
    assert len(xs) == 2 and all(len(line.get_xdata()) == 4 for line in xs)  # every cell of both edges
    assert not [c for c in ax.collections if isinstance(c, PolyCollection) and len(c.get_paths())]
    assert "x: n < 5, no interval" in ax.get_title()
    (ax,) = panels(Result("knockout", knockout_frame(values=(-100.0, -99.0, -97.5, -99.9), n=10)).plot())
    stars = [line for line in ax.get_lines() if line.get_label() == "_significant"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [1] and stars[0].get_ydata()[0] == pytest.approx(-99.18)
    assert "Holm-adjusted p < 0.05 (sign test vs the plain run)" in ax.get_title()


def test_more_than_ten_series_get_distinct_colour_and_line_style_pairs():
    edges = [f"item[{i}]->last" for i in range(13)]
    rows = [dict(sample=s, edge=e, layer=layer, rel_change=-float(i + 1) * (layer == 1) - 0.3 * s, correct=True)
            for s in range(5) for i, e in enumerate(edges) for layer in LAYERS]
    (ax,) = panels(Result("knockout", pd.DataFrame(rows)).plot())
    pairs = [(line.get_color(), line.get_linestyle()) for line in series(ax)]
    assert len(pairs) == 13 and len(set(pairs)) == 13  # the cycle has 10 colours: colour alone would repeat
    assert len({c for c, _ in pairs}) == 10 and {ls for _, ls in pairs} == {"-", "--"}


def test_accuracy_figures_draw_the_chance_level():
    df = pd.DataFrame([dict(edge="audio->last", layer=layer, accuracy=80.0, n_samples=10, accuracy_base=100.0) for layer in LAYERS])
    (ax,) = panels(Result("knockout_accuracy", df, dict(n_samples=10)).plot(chance=0.25))
    chance = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [25.0, 25.0]  # accuracy in percent: chance too
    fv = pd.DataFrame([dict(sample=s, method=m, correct=s != 0 or m == "full", correct_full=True, flops_saved=f)
                       for s in range(6) for m, f in (("full", 0.0), ("fastv", 0.3))])
    (ax,) = panels(Result("fastv", fv).plot(chance=0.5))
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label().startswith("chance")] == [0.5]
    assert ax.get_ylim() == (-0.02, 1.02)  # an accuracy keeps its whole scale
    with pytest.raises(ValueError, match=r"chance is an accuracy as a fraction in \[0, 1\], got 25"):
        Result("fastv", fv).plot(chance=25)


def test_no_axis_zooms_into_the_numerical_floor():
    # causal tracing effects of 1e-6 are float32 noise: on an auto-scaled axis they look like curves
    rows = [dict(sample=s, site="resid", tokens=t, layer=layer, indirect_effect=1e-6 * ((layer + s) % 3 - 1), correct=True)
            for s in range(6) for t in ("audio", "video") for layer in LAYERS]
    (ax,) = panels(Result("causal_tracing", pd.DataFrame(rows)).plot())
    lo, hi = ax.get_ylim()
    assert hi - lo >= 2 * 1000 * 1e-5  # 1000 floors of 1e-5 (probability, float32): noise moves a curve by 0.1 % at most
    assert "|effect| <= 1e-05: no effect" in ax.get_title()
    heat = [dict(sample=0, site="resid_pre", layer=layer, head=-1, pos=p, tokens=t, m_clean=1.0, m_corrupt=0.0,
                 normalised=0.0, indirect_effect=3e-7 * p, correct=True)
            for layer in LAYERS for p, t in enumerate(["system", "audio", "last"])]
    (ax,) = panels(Result("causal_tracing", pd.DataFrame(heat)).plot())
    assert ax.images[0].norm.vmax == pytest.approx(0.01)  # the colour scale too


@pytest.mark.parametrize("kind", ["knockout", "knockout_accuracy", "discarding", "causal_tracing", "sinks", "logit_lens", "pathway",
                                  "fastv", "dla", "activation_patching", "attribution", "sae_features", "sae_loss"])
def test_every_kind_plots_to_a_figure_and_into_given_axes(kind, tmp_path):
    from matplotlib.figure import Figure

    from patching.engine import experiment

    assert sorted(experiment.names(plotted=True)) == sorted(FRAMES)  # a new kind with a figure is added here
    frame, settings = FRAMES[kind]()
    res = Result(kind, frame, settings)
    fig = res.plot()
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / f"{kind}.png")
    n = len(panels(fig))
    given = plt.subplots(1, n, squeeze=False)[1][0]
    drawn = res.plot(ax=given if n > 1 else given[0])
    assert drawn is given[0].figure and given[0].has_data()


def _samples_layers(**cols):
    return pd.DataFrame([dict(sample=s, layer=layer, **{k: v(s, layer) if callable(v) else v for k, v in cols.items()})
                         for s in range(5) for layer in LAYERS])


FRAMES = {
    "knockout": lambda: (knockout_frame(n=5), {}),
    "knockout_accuracy": lambda: (pd.DataFrame([dict(edge="a->b", layer=layer, accuracy=60.0, n_samples=5, accuracy_base=100.0)
                                                for layer in LAYERS]), dict(n_samples=5)),
    "discarding": lambda: (_samples_layers(from_layer=lambda s, l: l, group="audio", metric=lambda s, l: 0.2 * l,
                                           correct=lambda s, l: l > s % 3, correct_full=True).drop(columns="layer"), {}),
    "causal_tracing": lambda: (_samples_layers(site="resid", tokens="audio", indirect_effect=lambda s, l: 0.1 * s,
                                               correct=True), {}),
    "sinks": lambda: (pd.DataFrame(dict(sample=[0, 1], modality=["audio"] * 2, pos=[3, 4], rank=[0, 0], layers_flagged=[2, 2],
                                        mds=[0.5, -0.2], cross_modal=[True, False])), {}),
    "logit_lens": lambda: (_samples_layers(group="audio", prob=lambda s, l: 0.1 * l), {}),
    "pathway": lambda: (pd.DataFrame([dict(sample=s, run=r, kept_share=0.5, correct=s > 0, correct_orig=True)
                                      for s in range(5) for r in ("pathway", "random")]), {}),
    "fastv": lambda: (pd.DataFrame([dict(sample=s, method=m, correct=True, correct_full=True, flops_saved=f)
                                    for s in range(5) for m, f in (("full", 0.0), ("fastv", 0.4))]), {}),
    "dla": lambda: (pd.DataFrame([dict(sample=s, layer=layer, head=h, group="audio", dla=0.1 * h) for s in range(2)
                                  for layer in LAYERS for h in range(2)]), {}),
    "activation_patching": lambda: (patching_frame({"audio": 0.5}), {}),
    "attribution": lambda: (_samples_layers(site="resid_pre", head=-1, pos=-1, tokens="audio", attribution=lambda s, l: 0.1 * l), {}),
    "sae_features": lambda: (pd.DataFrame([dict(sample=s, group=g, rank=r, rel_change=-10.0 * r - s, metric=0.5, metric_clean=0.6,
                                                correct=True) for s in range(5) for g in ("audio", "video") for r in (1, 2, 3)]), {}),
    "sae_loss": lambda: (pd.DataFrame([dict(sample=s, group=g, ce_sae=0.1 + 0.01 * s, ce_clean=0.1, ce_zero=2.0)
                                       for s in range(5) for g in ("audio", "video")]), {}),
}
