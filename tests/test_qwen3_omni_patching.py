"""The patching library on Qwen3-Omni, unchanged: knockout equal to HF's Thinker with a hand-built 4D mask,
physical discarding equal to mask discarding with DeepStack's injections carried, the sweeps (knockout,
activation patching, causal tracing, logit lens, sinks) running with numbers that must hold; and the
mixture-of-experts read-outs: expert ablation equal to HF with the experts silenced, routing counts equal to
a naive loop over the cached router choices."""

from __future__ import annotations

import pytest
import torch
from qwen3_omni_helpers import model_inputs, tiny_hf

from hooked_av import HookedQwen3Omni
from hooked_av.core.masks import neg_inf
from patching.methods.experts import ablate_experts
from patching.engine.hooks import block_attention, discard

torch.set_num_threads(1)
TOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf()
    return hf, HookedQwen3Omni.from_hf(hf)


@pytest.fixture(scope="module")
def batch_inputs():
    """Row 0: video, question, audio; row 1: an image; left padded (DeepStack injections in both rows)."""
    inputs, _ = model_inputs("left_padded")
    return inputs


def hf_run(hf, inputs, pre=None, layers=()):
    """HF's logits, with `pre(module, args, kwargs)` as a forward pre-hook on the experts or attention of
    `layers` (name, index) pairs."""
    from operator import attrgetter

    handles = [attrgetter(part)(hf.model.language_model.layers[i]).register_forward_pre_hook(pre, with_kwargs=True)
               for part, i in layers]
    try:
        with torch.no_grad():
            return hf(**inputs).logits
    finally:
        for h in handles:
            h.remove()


# ---- knockout against HF with a hand-built 4D mask --------------------------------------------------------
def test_knockout_equals_hf_with_a_hand_built_4d_mask(pair, batch_inputs):
    hf, ours = pair
    tm = ours.token_map(batch_inputs)
    window = [1, 2]
    real = batch_inputs["attention_mask"].bool()
    b, s = real.shape
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & real[:, None, :]
    src, dst = tm.mask("audio|video|image"), tm.mask("last")
    allowed &= ~(dst[:, :, None] & src[:, None, :])
    mask4d = torch.zeros(b, 1, s, s).masked_fill(~allowed[:, None], neg_inf(torch.float32))

    def pre(module, args, kwargs):
        kwargs["attention_mask"] = mask4d
        return args, kwargs

    ref = hf_run(hf, batch_inputs, pre, [("self_attn", i) for i in window])
    iv = block_attention(tm, "audio|video|image", "last", window)
    with torch.no_grad():
        got = ours.run_with_hooks(**batch_inputs, fwd_hooks=iv.check(ours))
        clean = ours(**batch_inputs)
    assert (got[real] - ref[real]).abs().max() <= TOL
    assert (got[:, -1] - clean[:, -1]).abs().max() > 1e-3  # the knockout changed the answer's logits


def test_knockout_sweep_runs_with_probabilities_and_changes(pair, batch_inputs):
    from patching.methods.knockout import knockout

    _, ours = pair
    with torch.no_grad():
        answers = ours(**batch_inputs)[:, -1].argmax(-1).tolist()
    res = knockout(ours, batch_inputs, answers, edges=[("audio|video|image", "last"), ("question", "question")],
                   window=1, progress=False)
    df = res.df
    assert len(df) == 2 * 2 * ours.cfg.n_layers  # samples x edges x centres
    assert df.p_orig.between(0, 1).all() and df.p_blocked.between(0, 1).all()
    assert (df[df.edge.str.startswith("audio")].rel_change.abs() > 0).any()


# ---- discarding: physical removal = the mask that hides the same tokens -----------------------------------
def test_physical_discarding_equals_mask_discarding_with_injections_carried(pair, batch_inputs):
    from patching.methods.discarding import physical_forward
    from patching.engine.sweep import samples

    _, ours = pair
    for sample in samples(ours, batch_inputs):
        group = "video" if bool(sample.tm.mask("video").any()) else "image"
        assert sample.injections is not None and all(t is not None for t in sample.injections)
        for from_layer in (1, 2):  # DeepStack adds after blocks 0 and 1: the discarded tokens carry it before
            with torch.no_grad():
                phys = physical_forward(ours, sample, group, from_layer)
                masked = ours.run_with_hooks(**sample.lm_inputs(1), return_type="logits", logits_at="last",
                                             fwd_hooks=discard(sample.tm, group, from_layer))[:, -1]
                full = ours.run_language_model(**sample.lm_inputs(1), logits_at="last")[:, -1]
            assert (phys - masked).abs().max() <= TOL, (sample.index, from_layer)
            assert (phys - full).abs().max() > 1e-4  # discarding did something


# ---- activation patching, causal tracing, logit lens, sinks ----------------------------------------------
def test_clean_into_clean_patching_leaves_the_metric_unchanged(pair, batch_inputs):
    from patching.methods.activation_patching import activation_patching

    _, ours = pair
    with torch.no_grad():
        answers = ours(**batch_inputs)[:, -1].argmax(-1)
    from patching.engine.metrics import LogitDiff

    metric = LogitDiff(answers.tolist(), ((answers + 1) % ours.cfg.d_vocab).tolist())
    res = activation_patching(ours, batch_inputs, batch_inputs, metric, sites=("resid_pre", "mlp_out"),
                              layers=[0, 2], progress=False)
    df = res.df
    assert len(df) > 0 and ((df.metric - df.m_clean).abs() <= 1e-4).all()
    assert ((df.m_clean - df.m_corrupt).abs() <= 1e-4).all()


def test_causal_tracing_logit_lens_and_sinks_run_with_consistent_numbers(pair, batch_inputs):
    from patching.methods.causal_tracing import causal_tracing
    from patching.methods.logit_lens import logit_lens
    from patching.methods.sinks import find_sinks

    _, ours = pair
    inputs, _ = model_inputs("video")
    with torch.no_grad():
        final = torch.softmax(ours(**inputs)[:, -1], -1)
    answer = int(final.argmax())
    res = causal_tracing(ours, inputs, [answer], corrupt="video", n_noise=2, window=1, progress=False)
    assert len(res.df) > 0 and res.df.select_dtypes("number").notna().all().all()
    lens = logit_lens(ours, inputs, [answer]).df
    last = lens[(lens.layer == ours.cfg.n_layers - 1) & (lens.group == "last")]
    assert float(last.prob.iloc[0]) == pytest.approx(float(final[0, answer]), abs=1e-5)  # the lens ends at the model
    assert int(last["rank"].iloc[0]) == 0
    sinks = find_sinks(ours, batch_inputs, ratio=2.0, tau=2.0)
    assert sinks.df is not None


# ---- expert ablation -------------------------------------------------------------------------------------
def _hf_silence(experts, where=None):
    """A pre-hook on HF's experts module zeroing the router weight of `experts` (at `where`, bool [batch*pos])."""
    def pre(module, args, kwargs):
        hidden, index, weights = (list(args) + [None] * 3)[:3]
        index = kwargs.get("top_k_index", index)
        weights = kwargs.get("top_k_weights", weights).clone()
        hit = torch.isin(index, torch.tensor(experts))
        if where is not None:
            hit &= where[:, None]
        weights[hit] = 0
        if "top_k_weights" in kwargs:
            kwargs["top_k_weights"] = weights
            return args, kwargs
        return (hidden, index, weights), kwargs

    return pre


def test_expert_ablation_equals_hf_with_the_experts_down_proj_zeroed(pair, batch_inputs):
    hf, ours = pair
    experts, layers = [1, 3], [0, 2]
    ablated = tiny_hf()
    with torch.no_grad():
        for l in layers:
            for e in experts:
                ablated.model.language_model.layers[l].mlp.experts.down_proj[e].zero_()
        ref = ablated(**batch_inputs).logits
        got = ours.run_with_hooks(**batch_inputs, fwd_hooks=ablate_experts(layers, experts).check(ours))
        clean = ours(**batch_inputs)
    real = batch_inputs["attention_mask"].bool()
    assert (got[real] - ref[real]).abs().max() <= TOL
    assert (got[real] - clean[real]).abs().max() > 1e-3


def test_expert_ablation_at_positions_and_rows_equals_hf_with_those_routes_silenced(pair, batch_inputs):
    hf, ours = pair
    tm = ours.token_map(batch_inputs)
    media = tm.mask("audio|video|image")
    real = batch_inputs["attention_mask"].bool()
    outs = []
    for rows, where in ((None, media), ([1], media & torch.tensor([[False], [True]]))):
        iv = ablate_experts(2, [0, 2], positions=tm.select("audio|video|image"), rows=rows)
        ref = hf_run(hf, batch_inputs, _hf_silence([0, 2], where.flatten()), [("mlp.experts", 2)])
        with torch.no_grad():
            got = ours.run_with_hooks(**batch_inputs, fwd_hooks=iv.check(ours))
        assert (got[real] - ref[real]).abs().max() <= TOL, rows
        outs.append(got)
    with torch.no_grad():
        everywhere = ours.run_with_hooks(**batch_inputs, fwd_hooks=ablate_experts(2, [0, 2]))
    assert (outs[0][real] - everywhere[real]).abs().max() > 1e-4  # positions matter
    assert torch.equal(outs[1][1], outs[0][1]) and (outs[1][0] - outs[0][0]).abs().max() > 1e-4  # so do rows
    assert "ablate_experts(layers=[2], experts=[0, 2]" in str(iv) and "rows=[1]" in str(iv)


def test_expert_ablation_refuses_what_it_cannot_do(pair, batch_inputs):
    _, ours = pair
    with pytest.raises(KeyError, match=r"blocks.2.mlp.experts.4.hook_out' does not exist"):
        ablate_experts(2, [4]).check(ours)  # 4 experts: 0..3
    with pytest.raises(KeyError, match=r"blocks.1.mlp.experts.0.hook_out' does not exist"):
        ablate_experts(1, [0]).check(ours)  # layer 1 is dense
    with pytest.raises(ValueError, match="experts is empty"):
        ablate_experts(2, [])
    with pytest.raises(ValueError, match="negative layer"):
        ablate_experts(-1, [0])


# ---- routing read-out ------------------------------------------------------------------------------------
def test_routing_counts_equal_a_naive_loop_over_cached_choices(pair, batch_inputs, tmp_path):
    from hooked_av.viz.routing import plot_routing, routing_counts, routing_report, top_experts

    _, ours = pair
    df = routing_counts(ours, batch_inputs)
    tm = ours.token_map(batch_inputs)
    names = tm.names(0), tm.names(1)
    _, cache = ours.run_with_cache(**batch_inputs, names_filter=lambda n: n.endswith("hook_router_choice"))
    naive = {}
    for l in (0, 2):
        choice = cache[f"blocks.{l}.mlp.hook_router_choice"]
        for row in range(2):
            for p, g in enumerate(names[row]):
                if batch_inputs["attention_mask"][row, p] and g in ("audio", "video", "image", "question"):
                    for e in choice[row, p].tolist():
                        naive[(l, g, e)] = naive.get((l, g, e), 0) + 1
    assert sorted(df.group.unique()) == ["audio", "image", "question", "video"] and sorted(df.layer.unique()) == [0, 2]
    got = {(r.layer, r.group, r.expert): r["count"] for _, r in df.iterrows() if r["count"]}
    assert got == naive
    k = ours.cfg.experts_per_token
    assert (df.groupby(["layer", "group"]).share.sum().round(6) == 1).all()
    assert (df.groupby(["layer", "group"])["count"].sum() == df.groupby(["layer", "group"]).tokens.first() * k).all()
    top = top_experts(df, n=2)
    assert len(top) == 2 * 4 * 2 and (top.groupby(["layer", "group"]).share.apply(lambda s: s.is_monotonic_decreasing)).all()
    assert plot_routing(df) is not None
    page = routing_report(df, tmp_path / "routing.html")
    assert page.stat().st_size > 5000 and "data:image/png;base64" in page.read_text()
    with pytest.raises(ValueError, match="name sparse layers"):
        routing_counts(ours, batch_inputs, layers=[1])


def test_fastv_runs_on_visual_inputs_with_deepstack_injections(pair):
    # DeepStack lists injections for its own layers only; FastV's layer loop indexed them per block (IndexError)
    from patching.methods.fastv import fastv

    _, model = pair
    inputs, _ = model_inputs("video")
    with torch.no_grad():
        probs = model(**inputs, logits_at="last")[:, -1].softmax(-1)
    answer = int(probs[0].argmax())
    df = fastv(model, inputs, [answer], k=1, r=0.5, media="video", max_new_tokens=1, repeats=1, progress=False).df
    assert list(df["method"]) == ["full", "fastv", "discard video"]
    assert abs(float(df.loc[df.method == "full", "prob"].iloc[0]) - float(probs[0, answer])) < 1e-5
    kept_all = fastv(model, inputs, [answer], k=1, r=0.0, media="video", max_new_tokens=1, repeats=1, progress=False).df
    fast = kept_all[kept_all.method == "fastv"].iloc[0]
    assert fast["n_dropped"] == 0 and abs(float(fast["prob"]) - float(probs[0, answer])) < 1e-5
