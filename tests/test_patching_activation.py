"""Activation patching's fixed points and attribution patching against exact patching."""

import pandas as pd
import pytest
import torch
from test_patching_common import N_LAYERS, av_inputs, tiny_pair, token_map

from patching.methods.activation_patching import activation_patching
from patching.methods.attribution import attribution_patching
from patching.engine.metrics import LogitDiff


@pytest.fixture(scope="module")
def setup():
    _, model = tiny_pair()
    clean = av_inputs()
    tm = token_map(model, clean)
    corrupted = {**clean, "input_ids": clean["input_ids"].clone()}
    q = tm.positions("question")[-2:]  # the last two question tokens, same layout
    corrupted["input_ids"][0, q] = (corrupted["input_ids"][0, q] + 37) % 200
    with torch.no_grad():
        lc, lx = model(**clean)[0, -1], model(**corrupted)[0, -1]
    wrong = int(lx.argmax()) if int(lx.argmax()) != int(lc.argmax()) else int(lc.topk(2).indices[1])
    metric = LogitDiff(int(lc.argmax()), wrong)
    return model, clean, corrupted, tm, metric, q


def test_clean_into_clean_leaves_the_output_unchanged(setup):
    model, clean, _, tm, metric, _ = setup
    res = activation_patching(model, clean, clean, metric, sites=("resid_pre", "attn_out", "mlp_out", "head"),
                              positions="groups", tm_clean=tm, tm_corrupted=tm, progress=False)
    assert len(res.df) == (3 * N_LAYERS + N_LAYERS * model.cfg.n_heads) * 5  # 5 groups present
    assert (res.df["metric"] - res.df["m_clean"]).abs().max() < 1e-4
    assert res.df["normalised"].isna().all()  # nothing to normalise against


def test_patching_all_of_resid_pre_0_restores_clean_and_untouched_positions_give_zero(setup):
    model, clean, corrupted, tm, metric, q = setup
    res = activation_patching(model, clean, corrupted, metric, sites=("resid_pre",), positions="each",
                              tm_clean=tm, tm_corrupted=tm, progress=False)
    df = res.df
    assert abs(df.m_clean.iloc[0] - df.m_corrupt.iloc[0]) > 5e-3
    allpos = activation_patching(model, clean, corrupted, metric, sites=("resid_pre",), layers=[0], positions="all",
                                 tm_clean=tm, tm_corrupted=tm, progress=False).df
    assert abs(allpos.normalised.iloc[0] - 1) < 1e-3
    before = df[df.pos < int(q.min())]  # states before the corrupted tokens are equal in both runs
    assert before.normalised.abs().max() < 1e-3
    at = df[(df.layer == 0) & df.pos.isin(q.tolist())]  # the two corrupted tokens at layer 0 carry it all
    assert abs(at.normalised.sum() - 1) < 0.35 and at.normalised.max() > 0.1
    ax = res.plot().axes[0]
    assert ax.get_xlabel() == "position"


def test_mismatched_layouts_are_a_clear_error(setup):
    model, clean, _, _, metric, _ = setup
    other = av_inputs(7)  # a different question length -> a different layout
    other["input_ids"] = other["input_ids"][:, 1:]
    other["attention_mask"] = other["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match="differ in length|different token groups"):
        activation_patching(model, clean, other, metric, tm_clean=token_map(model, clean),
                            tm_corrupted=token_map(model, other), progress=False)


def test_attribution_agrees_with_exact_patching_in_sign_and_rank(setup):
    model, clean, _, tm, _, _ = setup
    corrupted = {**clean, "input_ids": clean["input_ids"].clone()}
    first = tm.positions("question")[0]  # an early token: many (layer, position) sites carry its effect
    corrupted["input_ids"][0, first] = (corrupted["input_ids"][0, first] + 37) % 200
    with torch.no_grad():
        lc, lx = model(**clean)[0, -1], model(**corrupted)[0, -1]
    wrong = int(lx.argmax()) if int(lx.argmax()) != int(lc.argmax()) else int(lc.topk(2).indices[1])
    metric = LogitDiff(int(lc.argmax()), wrong)
    kw = dict(sites=("resid_pre",), positions="each", tm_clean=tm, tm_corrupted=tm)
    exact = activation_patching(model, clean, corrupted, metric, progress=False, **kw).df
    approx = attribution_patching(model, clean, corrupted, metric, **kw).df
    j = exact.merge(approx, on=["sample", "site", "layer", "pos"])
    j["effect"] = j.metric - j.m_corrupt
    moved = j[j.effect.abs() > 1e-4]  # positions before the corruption have no effect in either
    assert len(moved) >= 10 * N_LAYERS
    rho = moved.effect.rank().corr(moved.attribution.rank())
    sign = (torch.tensor(moved.effect.values).sign() == torch.tensor(moved.attribution.values).sign()).float().mean()
    print(f"spearman {rho:.3f}, sign agreement {float(sign):.3f} over {len(moved)} sites")
    assert rho > 0.8 and float(sign) > 0.8
    assert (j[j.effect.abs() <= 1e-6].attribution.abs() < 1e-5).all()
    assert isinstance(exact, pd.DataFrame)


def test_attribution_read_by_backward_hooks_equals_autograd_on_the_sites_and_leaves_no_weight_gradient(setup):
    """The previous implementation, written out: the corrupted run's activations at the sites kept by forward
    hooks, `torch.autograd.grad` of the metric on them, `(clean - corrupted) . grad` per position. Attribution
    patching now reads the gradient through backward hooks with the weights frozen: the same numbers."""
    from patching.methods.activation_patching import cache_sample, pair_samples

    model, clean, corrupted, tm, metric, _ = setup
    sites = {"resid_pre": "blocks.{l}.hook_resid_pre", "mlp_out": "blocks.{l}.hook_mlp_out", "head": "blocks.{l}.attn.hook_z"}
    res = attribution_patching(model, clean, corrupted, metric, sites=tuple(sites), positions="each",
                               tm_clean=tm, tm_corrupted=tm)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    (a,), (b,) = pair_samples(model, clean, corrupted, tm, tm)
    names = [t.format(l=l) for t in sites.values() for l in range(N_LAYERS)]
    clean_cache = cache_sample(model, a, names)
    acts = {}
    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, lambda t, hook: acts.__setitem__(hook.name, t)) for n in names]):
        kw = b.lm_inputs(1)
        x = kw.pop("inputs_embeds").detach().clone().requires_grad_(True)
        value = metric(model.unembed(model.run_language_model(x, **kw, return_type="resid", logits_at="last")[:, -1]), 0).sum()
        grads = dict(zip(names, torch.autograd.grad(value, [acts[n] for n in names])))
    df = res.df.set_index(["site", "layer", "head", "pos"])["attribution"]
    for site, t in sites.items():
        for l in range(N_LAYERS):
            n = t.format(l=l)
            per = ((clean_cache[n] - acts[n].detach()) * grads[n])[0].sum(-1)  # [pos] or [pos, heads]
            for p in range(per.shape[0]):
                for h, v in (enumerate(per[p].tolist()) if site == "head" else [(-1, float(per[p]))]):
                    assert abs(df[(site, l, h, p)] - v) < 1e-6, (site, l, h, p)
