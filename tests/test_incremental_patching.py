"""Activation edits through the sweep engine's recompute-what-changes path: patching from a cache,
ablation (zero, mean, resample) and noise at positions run only from their first edited position on
and equal the whole recomputation (fp32, 1e-5) on activation patching's geometries (one prompt, and
both samples of a left-padded batch), every site kind (residuals, attention and MLP outputs, the
attention input, single heads of hook_z, keys, hook_embed) and the Qwen3 recipe, whose DeepStack
injections reach the cached activations and the recomputed suffix; edits from position 0, at positions counted
from the end or at sites whose dim 1 is not the positions run whole forwards."""

from __future__ import annotations

import pytest
import torch
from test_layer_loop import setup as qwen3_setup  # noqa: F401  (fixture)
from test_layer_loop import token_map as qwen3_token_map
from test_patching_common import av_inputs, tiny_pair, token_map

from patching.methods.activation_patching import cache_sample, pair_samples, position_units
from patching.engine.hooks import ablate, add_noise, patch_from_cache, site_name
from patching.engine.sweep import run_rows, samples

torch.set_num_threads(1)
TOL = 1e-5
SITES = ("resid_pre", "attn_out", "mlp_out", "attn_in", "resid_post")


@pytest.fixture(scope="module")
def model():
    return tiny_pair()[1]


def corrupted_pair(model, inputs):
    """Clean samples and corrupted ones (the last two question tokens of every row changed, same layout)."""
    tm = token_map(model, inputs)
    bad = {**inputs, "input_ids": inputs["input_ids"].clone()}
    for row in range(tm.batch):
        q = tm.mask("question")[row].nonzero()[-2:, 0]
        bad["input_ids"][row, q] = (bad["input_ids"][row, q] + 37) % 200
    return pair_samples(model, inputs, bad, tm, token_map(model, bad))


def both_ways(model, s, ivs):
    stats = {}
    fast = run_rows(model, s, ivs, progress=False, stats=stats, batch_size=6)
    full = run_rows(model, s, ivs, progress=False, incremental=False, batch_size=6)
    return fast, full, stats


@pytest.mark.parametrize("geometry", ["one prompt", "left-padded batch"])
def test_patching_at_positions_equals_the_whole_recomputation(model, geometry):
    inputs = av_inputs() if geometry == "one prompt" else av_inputs(6, 7)
    for clean, bad in zip(*corrupted_pair(model, inputs)):
        names = [site_name(s, l) for s in SITES for l in (0, 3)] + ["blocks.2.attn.hook_z", "blocks.4.attn.hook_rot_k"]
        cache = cache_sample(model, clean, names)
        units = position_units(bad.tm, "each")[1:] + position_units(bad.tm, "groups")
        ivs = [patch_from_cache(cache, n, where) for n in names[:-2] for _, _, where in units[::3]]
        ivs += [patch_from_cache(cache, "blocks.2.attn.hook_z", where, heads=[h]) for _, _, where in units[::5] for h in (0, 3)]
        ivs += [patch_from_cache(cache, "blocks.4.attn.hook_rot_k", where) for _, _, where in units[::5]]
        fast, full, stats = both_ways(model, bad, ivs)
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        assert stats["incremental"] and stats["positions"] < stats["positions_full"] * 0.7
        # the patches move the logits (the comparison is not between two unpatched runs)
        plain = run_rows(model, bad, [ablate(["blocks.5.hook_resid_post"], positions=[0])], progress=False)
        assert (full - plain).abs().amax(-1).max() > 1e-3


def test_a_patch_at_position_p_recomputes_from_p(model):
    inputs = av_inputs()
    clean, bad = (x[0] for x in corrupted_pair(model, inputs))
    cache = cache_sample(model, clean, ["blocks.1.hook_resid_pre"])
    p = bad.seq_len - 7
    stats = {}
    run_rows(model, bad, [patch_from_cache(cache, "blocks.1.hook_resid_pre", [p])] * 2, progress=False, stats=stats)
    assert stats["positions"] == bad.seq_len + 2 * 7


def test_a_patch_from_position_0_runs_whole_inside_the_sweep(model):
    inputs = av_inputs()
    clean, bad = (x[0] for x in corrupted_pair(model, inputs))
    cache = cache_sample(model, clean, ["blocks.1.hook_resid_pre"])
    n = bad.seq_len
    ivs = [patch_from_cache(cache, "blocks.1.hook_resid_pre", [p]) for p in (0, n - 3, n - 2, n - 1)]
    stats = {}
    fast = run_rows(model, bad, ivs, progress=False, stats=stats)
    torch.testing.assert_close(fast, run_rows(model, bad, ivs, progress=False, incremental=False), atol=TOL, rtol=0)
    # the clean forward, position 0 whole, then chunks [n-3, n-2] (3 positions each) and [n-1]
    assert stats["incremental"] and stats["positions"] == n + n + 2 * 3 + 1
    # ... in blocks 1.. only: the clean forward's n x L, then (n + 2 x 3 + 1) x (L - 1)
    L = model.cfg.n_layers
    assert stats["layer_positions"] == n * L + (n + 2 * 3 + 1) * (L - 1)
    # one late cell beside one edited from position 0 of block 0 saves nothing: whole forwards
    cache = cache_sample(model, clean, ["blocks.0.hook_resid_pre"])
    ivs = [patch_from_cache(cache, "blocks.0.hook_resid_pre", [p]) for p in (0, n - 1)]
    run_rows(model, bad, ivs, progress=False, stats=stats)
    assert not stats["incremental"] and stats["positions"] == 2 * n


def test_ablation_and_noise_at_positions(model):
    inputs = av_inputs(6, 7)
    data = samples(model, inputs, token_map(model, inputs))
    ref = {"blocks.2.hook_resid_mid": cache_sample(model, data[1], ["blocks.2.hook_resid_mid"])["blocks.2.hook_resid_mid"]}
    for s in data:
        ref_s = {k: v[:, -s.seq_len:] for k, v in ref.items()}  # a layout of this sample's length
        audio = s.tm.select("audio")
        ivs = [ablate(["blocks.2.hook_resid_mid"], mode, positions=audio, reference=ref_s) for mode in ("zero", "mean", "resample")]
        ivs += [ablate(["blocks.1.attn.hook_z"], positions=[s.seq_len - 3], heads=[1]),
                add_noise("hook_embed", audio, 0.5, seed=3), add_noise("blocks.3.hook_resid_pre", [s.seq_len - 2], 2.0)]
        fast, full, stats = both_ways(model, s, ivs)
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        assert stats["incremental"]


@pytest.mark.parametrize("edit", ["all positions", "counted from the end", "not position-major"])
def test_what_cannot_start_later_runs_whole_forwards(model, edit):
    inputs = av_inputs()
    s = samples(model, inputs, token_map(model, inputs))[0]
    iv = {"all positions": ablate(["blocks.2.hook_resid_post"]),
          "counted from the end": ablate(["blocks.2.hook_resid_post"], positions=[-2]),
          "not position-major": ablate(["ln_final.hook_normalized"], positions=[s.seq_len - 1])}[edit]
    fast, full, stats = both_ways(model, s, [iv])
    assert not stats["incremental"] and stats["positions"] == s.seq_len
    assert torch.equal(fast, full)


def test_the_qwen3_recipe_keeps_its_injections(qwen3_setup):  # noqa: F811
    model, kw, visual = qwen3_setup
    for s in samples(model, kw, qwen3_token_map(kw["attention_mask"], visual)):
        name = "blocks.2.hook_resid_post"
        got = cache_sample(model, s, [name])[name]
        seen = {}
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, lambda t, hook: seen.update(t=t))]):
            model.run_language_model(**s.lm_inputs(1), return_type=None)
        assert torch.equal(got, seen["t"])
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, lambda t, hook: seen.update(t=t))]):
            model.run_language_model(s.embeds, s.position_ids, return_type=None)
        assert (got - seen["t"]).abs().max() > 1e-3  # the injections reached the cache
        video = s.tm.select("video")
        ivs = [patch_from_cache({name: got * 0.5}, name, video), add_noise("hook_embed", video, 1.0),
               ablate(["blocks.1.hook_resid_pre"], positions=[s.seq_len - 2])]
        fast, full, stats = both_ways(model, s, ivs)
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        assert stats["incremental"]


def test_a_full_hook_name_site_is_patched_once_at_its_own_layer(model):
    # layers= used to repeat the same patch of the hook under every layer label
    from patching.methods.activation_patching import activation_patching
    from patching.engine.metrics import AnswerProb

    inputs = av_inputs()
    bad = {**inputs, "input_ids": inputs["input_ids"].clone()}
    q = token_map(model, inputs).mask("question")[0].nonzero()[-2:, 0]
    bad["input_ids"][0, q] = (bad["input_ids"][0, q] + 37) % 200
    kw = dict(metric=AnswerProb(5), positions="groups", progress=False)
    by_name = activation_patching(model, inputs, bad, sites=["blocks.2.hook_resid_pre"], **kw).df
    by_site = activation_patching(model, inputs, bad, sites=["resid_pre"], layers=[2], **kw).df
    assert set(by_name.layer) == {2} and len(by_name) == len(by_site)
    assert (by_name.metric.to_numpy() == by_site.metric.to_numpy()).all()
    with pytest.raises(ValueError, match="name their own layer"):
        activation_patching(model, inputs, bad, sites=["blocks.2.hook_resid_pre"], layers=[0, 2], **kw)
