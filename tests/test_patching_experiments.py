"""The experiments: batched sweeps equal one forward per intervention, physical discarding equals
mask-based discarding, causal tracing's fixed points, logit lens against the final logits, results I/O."""

import time

import pytest
import torch
from test_patching_common import N_LAYERS, av_inputs, interleaved_inputs, tiny_pair, token_map

from patching.methods.causal_tracing import causal_tracing
from patching.methods.discarding import discarding, forward_flops, physical_forward
from patching.engine.hooks import block_attention, discard
from patching.methods.knockout import default_edges, knockout, window_layers
from patching.methods.logit_lens import logit_lens
from patching.engine.results import Result
from patching.engine.sweep import forward_rows, samples


@pytest.fixture(scope="module")
def setup():
    _, model = tiny_pair()
    inputs = av_inputs(6, 8)  # two samples, left-padded
    tm = token_map(model, inputs)
    with torch.no_grad():
        answers = model(**inputs)[:, -1].argmax(-1)
    return model, inputs, tm, answers


def test_window_is_centred_and_clipped_as_methods_md():
    assert list(window_layers(0, 9, 28)) == list(range(0, 5))
    assert list(window_layers(10, 9, 28)) == list(range(6, 15))
    assert list(window_layers(27, 9, 28)) == list(range(23, 28))
    assert list(window_layers(5, 4, 28)) == list(range(3, 7))


def test_default_edges_are_the_six_plus_per_clip_and_cross_clip_edges(setup):
    model, _, tm, _ = setup
    six = [("audio", "question"), ("video", "question"), ("audio", "last"), ("video", "last"), ("question", "last"), ("last", "last")]
    assert default_edges(samples(model, av_inputs(), tm=token_map(model, av_inputs()))[0].tm) == six
    inter = interleaved_inputs()  # clip 0: video block, audio block; text; clip 1: video block, audio block
    assert default_edges(token_map(model, inter)) == six + [
        ("item[0]", "question"), ("item[0]", "last"), ("item[1]", "question"), ("item[1]", "last"), ("item[0]", "item[1]")]


def test_batched_knockout_sweep_equals_one_forward_per_cell(setup):
    model, inputs, tm, answers = setup
    t = time.perf_counter()
    batched = knockout(model, inputs, answers, window=3, tm=tm, batch_size=64, progress=False).df
    t_batched = time.perf_counter() - t
    assert len(batched) == 2 * 6 * N_LAYERS
    # independent loop: the full padded batch, one knockout per forward, through the model's own forward
    t = time.perf_counter()
    for _, r in batched.iterrows():
        iv = block_attention(tm, r["src"], r["dst"], window_layers(r["layer"], 3, N_LAYERS))
        with torch.no_grad():
            p = model.run_with_hooks(**inputs, fwd_hooks=iv)[r["sample"], -1].softmax(-1)[answers[r["sample"]]]
        assert abs(float(p) - r["p_blocked"]) < 1e-5
    t_loop = time.perf_counter() - t
    print(f"knockout sweep: batched {t_batched:.2f}s, one per forward {t_loop:.2f}s, x{t_loop / t_batched:.1f}")
    assert batched.correct.all()  # answers are the model's own top tokens
    assert batched.p_orig.gt(0).all() and batched.rel_change.abs().max() > 1.0
    m = Result("knockout", batched).mean()
    assert set(m.columns) == {"edge", "layer", "rel_change"} and len(m) == 6 * N_LAYERS


def test_knockout_rejects_an_absent_group_and_a_bad_centre(setup):
    model, inputs, tm, answers = setup
    with pytest.raises(ValueError, match=r"knockout edge image->last \(sample 0\).*'image' selects no position"):
        knockout(model, inputs, answers, edges=["image->last"], tm=tm, progress=False)
    with pytest.raises(ValueError, match=rf"centre\(s\) \[{N_LAYERS}\] out of range"):
        knockout(model, inputs, answers, centres=[N_LAYERS], tm=tm, progress=False)


@pytest.mark.parametrize("from_layer", [0, 2, N_LAYERS - 1])
def test_physical_discarding_equals_mask_based_discarding(setup, from_layer):
    model, inputs, tm, _ = setup
    s = samples(model, inputs, tm)[1]
    with torch.no_grad():
        phys = physical_forward(model, s, "audio|video", from_layer)
        with model.hooks(fwd_hooks=discard(s.tm, "audio|video", from_layer)):
            masked = forward_rows(model, s, 1)
        full = forward_rows(model, s, 1)
    assert (phys - masked).abs().max() < 1e-5
    assert (phys - full).abs().max() > 1e-4


def test_discarding_reports_metric_flops_and_time(setup):
    model, inputs, tm, answers = setup
    df = discarding(model, inputs, answers, "audio|video", from_layers=[0, N_LAYERS // 2, N_LAYERS], tm=tm, repeats=1, progress=False).df
    last = df[df.from_layer == N_LAYERS]
    assert (last.metric - last.metric_full).abs().max() < 1e-5 and last.flops_saved.abs().max() < 1e-12
    n, kept = int(df.n_tokens.iloc[0]), int(df.n_tokens.iloc[0] - df.n_discarded.iloc[0])
    c = model.cfg
    per_layer = lambda m: 2 * (m * (c.d_model * (c.n_heads + 2 * c.n_key_value_heads) * c.d_head + c.n_heads * c.d_head * c.d_model + 3 * c.d_model * c.d_mlp) + c.n_heads * c.d_head * m * (m + 1))  # noqa: E731
    assert forward_flops(model, n, kept, 0) == pytest.approx(N_LAYERS * per_layer(kept) + 2 * c.d_model * c.d_vocab)
    assert df[df.from_layer == 0].flops_saved.iloc[0] > 0.3
    assert set(df.columns) >= {"seconds", "time_saved", "correct", "flops"}


def test_causal_tracing_restoring_everything_recovers_clean_and_earlier_tokens_give_zero(setup):
    model, inputs, tm, answers = setup
    res = causal_tracing(model, inputs, answers, corrupt="audio", restore=("resid", "attn_in"),
                         tokens=["audio", "all", "video"], window=1, n_noise=3, tm=tm, progress=False)
    df = res.df
    assert len(df) == 2 * 2 * 3 * N_LAYERS
    assert (df.p_clean - df.p_corrupt).abs().min() > 3e-5  # the noise moved p(answer) (a tiny random model)
    resid0_all = df[(df.site == "resid") & (df.tokens == "all") & (df.layer == 0)]
    assert ((resid0_all.p_restored - resid0_all.p_clean).abs() < 1e-8).all()  # everything clean again
    assert (resid0_all.indirect_effect - (resid0_all.p_clean - resid0_all.p_corrupt)).abs().max() < 1e-8
    # video tokens precede the audio: their states are the same in both runs, restoring them does nothing
    assert int(tm.positions("video", row=0)[-1]) < int(tm.positions("audio", row=0)[0])
    assert df[df.tokens == "video"].indirect_effect.abs().max() < 1e-8
    # the noise is drawn once per seed: the same corruption in any batch layout
    again = causal_tracing(model, inputs, answers, corrupt="audio", restore=("resid",), tokens=["audio"], window=1,
                           n_noise=3, tm=tm, batch_size=1, progress=False).df
    a = df[(df.site == "resid") & (df.tokens == "audio")].reset_index(drop=True)
    assert (a.indirect_effect - again.indirect_effect).abs().max() < 1e-8


def test_causal_tracing_by_zeroing_and_by_window(setup):
    model, inputs, tm, answers = setup
    df = causal_tracing(model, inputs, answers, corrupt="video", mode="zero", restore=("attn_in",), tokens=["video"],
                        window=None, tm=tm, progress=False).df
    assert len(df) == 2 and (df.window_start == 0).all() and (df.window_end == N_LAYERS - 1).all()
    # the video tokens' attention input restored at every layer: what attention reads is clean everywhere,
    # but the residual of the video tokens stays zeroed, so the effect is partial and positive
    assert ((df.p_restored - df.p_corrupt) * (df.p_clean - df.p_corrupt) >= -1e-6).all()


def test_logit_lens_last_layer_at_last_token_is_the_model_output(setup):
    model, inputs, tm, answers = setup
    df = logit_lens(model, inputs, answers, tm=tm).df
    last = df[(df.group == "last") & (df.layer == N_LAYERS - 1)]
    with torch.no_grad():
        p = model(**inputs)[:, -1].softmax(-1).gather(-1, answers[:, None])[:, 0]
    assert torch.allclose(torch.tensor(last.prob.values, dtype=torch.float), p, atol=1e-5)
    assert (last["rank"] == 0).all()
    assert set(df.group) == {"template", "question", "audio", "video", "last"}


def test_result_saves_loads_and_plots(setup, tmp_path):
    model, inputs, tm, answers = setup
    res = knockout(model, inputs, answers, edges=["audio->last", "question->last"], centres=[0, 3], window=3, tm=tm, progress=False)
    for suffix in (".parquet", ".csv"):
        path = res.save(tmp_path / f"ko{suffix}")
        back = Result.load(path)
        assert back.kind == "knockout" and back.settings["window"] == 3 and len(back.df) == len(res.df)
        assert abs(back.df.rel_change.sum() - res.df.rel_change.sum()) < 1e-6
    fig = res.plot()
    fig.savefig(tmp_path / "ko.png")  # a Figure, for every kind
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()[:2]] == ["audio->last", "question->last"]
    assert ax.get_xlabel() == "layer"
