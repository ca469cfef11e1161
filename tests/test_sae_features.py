"""Feature interventions (`patching.engine.features`) against a naive oracle that never splices: a hook on the
plain model that writes SAELens's own computation (decode of the edited `encode`, plus the unedited error)
at the edited positions, position by position. Checked for every edit, on token groups and time ranges,
under `model.generate` (prompt positions, generated ones), in `run_rows` sweeps (which recompute only from the
first edited position, and equal whole forwards on every family), composed with the other interventions,
and refused where they cannot apply."""

from __future__ import annotations

import pytest
import torch
from family_cases import NAMES, family
from sae_helpers import random_sae

from hooked_av.toy import make_batch
from patching.engine.corrupt import zero_modality
from patching.engine.features import (
    ablate_features,
    patch_features,
    scale_features,
    steer_features,
)
from patching.engine.hooks import ablate, block_attention
from patching.engine.sweep import run_rows, samples

torch.set_num_threads(1)
TOL = 1e-5
HOOK = "blocks.1.hook_resid_post"


def oracle_hook(sae, where, edit):
    """A hook for the plain model at the SAE's hook: the activation becomes decode(edited) + (x - decode(encode(x))),
    where `edited` is `encode(x)` with `edit` made, one position at a time, where `where(call, positions)` (bool
    `[batch, pos]`) holds."""
    calls = []

    def fn(x, hook):
        mask = where(len(calls), x.shape[1])
        calls.append(x.shape[1])
        f = sae.encode(x)
        edited = f.clone()
        for b in range(x.shape[0]):
            for p in range(x.shape[1]):
                if mask[b, p]:
                    edited[b, p] = edit(f[b, p].clone(), b, p)
        return sae.decode(edited) + (x - sae.decode(f))  # SAELens's splice with the error term, everywhere

    return fn


def _toy_case(toy_model, seed=0, n=2, arch="topk"):
    inputs = make_batch(n, seed=seed, tokenizer=toy_model.tokenizer).inputs
    return inputs, toy_model.token_map(inputs), random_sae(arch, hook=HOOK, d_sae=96, k=8, seed=seed)


def test_every_edit_equals_the_naive_oracle_on_groups_and_time_ranges(toy_model):
    model = toy_model
    inputs, tm, sae = _toy_case(model)
    with torch.no_grad():
        x = model.run_with_cache(**inputs, names_filter=HOOK)[1][HOOK]
        on = sae.encode(x)[tm.mask("audio|video")]  # features active on the media, so that every edit moves something
    feats = (on > 0).sum(0).topk(3).indices.tolist()
    with torch.no_grad(), model.saes(sae, use_error_term=True):
        _, src = model.run_with_cache(**zero_modality(inputs, "video", model=model),  # the same layout, black video
                                      names_filter=f"{HOOK}.hook_sae_acts_post")
    source = src[f"{HOOK}.hook_sae_acts_post"]

    def setting(values):
        def edit(f, b, p):
            f[feats] = values(f[feats], b, p)
            return f
        return edit

    audio = tm.select("audio")
    early = tm.select("audio", time=(0.0, 0.5))  # the first half second of each clip's audio
    assert 0 < int(early.mask.sum()) < int(audio.mask.sum())
    cases = [
        (ablate_features(HOOK, feats, positions=audio), audio.mask, setting(lambda v, b, p: torch.zeros_like(v))),
        (scale_features(HOOK, feats, 3.0, positions=tm.select("video")), tm.mask("video"), setting(lambda v, b, p: 3 * v)),
        (steer_features(HOOK, feats, [1.0, -2.0, 4.0], positions=early), early.mask,
         setting(lambda v, b, p: v + torch.tensor([1.0, -2.0, 4.0]))),
        (patch_features(src, HOOK, feats, positions=tm.select("question|last")), tm.mask("question|last"),
         setting(lambda v, b, p: source[b, p, feats])),
        (steer_features(HOOK, [5], 2.5), torch.ones_like(audio.mask), setting(lambda v, b, p: v)),
    ]
    cases[-1] = (cases[-1][0], cases[-1][1], lambda f, b, p: torch.cat([f[:5], f[5:6] + 2.5, f[6:]]))
    for iv, mask, edit in cases:
        with torch.no_grad():
            want = model.run_with_hooks(**inputs, fwd_hooks=[(HOOK, oracle_hook(sae, lambda c, q: mask, edit))])
            with model.saes(sae, use_error_term=True):
                got = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
            plain = model(**inputs)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        assert (got - plain).abs().max() > 1e-3, iv  # each edit changes the logits


def test_under_generate_prompt_positions_then_generated_tokens_as_asked(toy_model):
    model = toy_model
    inputs, tm, sae = _toy_case(model, seed=1, n=2)
    n = tm.seq_len
    zero = [0, 1, 2, 3, 4, 5]

    def zeroed(f, b, p):
        f[zero] = 0
        return f

    def steered(f, b, p):
        f[7] += 6.0
        return f

    audio = tm.mask("audio")
    cases = [  # (intervention, where the oracle edits: call 0 is the prompt, each later call one new token)
        (ablate_features(HOOK, zero, positions=tm.select("audio")), zeroed,
         lambda c, q: audio if c == 0 else torch.zeros(2, q, dtype=torch.bool)),
        (ablate_features(HOOK, zero, positions=tm.select("audio|last"), generated=True), zeroed,
         lambda c, q: (audio | tm.mask("last")) if c == 0 else torch.ones(2, q, dtype=torch.bool)),
        (steer_features(HOOK, [7], 6.0), steered, lambda c, q: torch.ones(2, q, dtype=torch.bool)),
    ]
    def generate(hooks):
        """The new tokens and the residual after block 2 at every step (prompt, then one per new token)."""
        seen = []
        with model.hooks(fwd_hooks=[*hooks, ("blocks.2.hook_resid_post", lambda t, hook: seen.append(t.clone()))]):
            return model.generate(**inputs, max_new_tokens=4), seen

    with torch.no_grad():
        plain_tokens, plain = generate([])
    for iv, edit, where in cases:
        with torch.no_grad():
            want_tokens, want = generate([(HOOK, oracle_hook(sae, where, edit))])
            with model.saes(sae, use_error_term=True):
                got_tokens, got = generate(iv.check(model))
        assert torch.equal(got_tokens, want_tokens) and len(got) == len(want) > 3, iv  # the prompt, then the steps
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
        assert (got[0] - plain[0]).abs().max() > 1e-3  # the prompt was edited
    assert n == inputs["input_ids"].shape[1]
    # a generated token's own edit: the same prompt edit with and without generated=True differs at the new tokens
    with torch.no_grad(), model.saes(sae, use_error_term=True):
        _, prompt_only = generate(ablate_features(HOOK, zero, positions=tm.select("audio|last")).check(model))
        _, with_new = generate(ablate_features(HOOK, zero, positions=tm.select("audio|last"), generated=True).check(model))
    torch.testing.assert_close(prompt_only[0], with_new[0], atol=0, rtol=0)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(prompt_only[1:], with_new[1:]))


@pytest.mark.parametrize("name", NAMES)
def test_a_feature_sweep_recomputes_what_changes_and_equals_whole_forwards_on_every_family(name):
    model, inputs = family(name)
    d = model.cfg.d_model
    for hook in ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"):  # resid_pre: where a suffix run starts
        sae = random_sae("topk", d_in=d, d_sae=2 * d, hook=hook, k=6)
        with torch.no_grad(), model.saes(sae, use_error_term=True):
            for s in samples(model, inputs):
                groups = [g for g in ("audio", "video", "question", "last") if bool(s.tm.mask(g).any())]
                ivs = [ablate_features(hook, [f], positions=s.tm.select(g)) for g in groups for f in (0, 5)]
                ivs += [steer_features(hook, [2], 3.0, positions=s.tm.select("last")),
                        scale_features(hook, [1, 3], 2.0, positions=s.tm.select(groups[0])) + ablate(
                            ["blocks.0.hook_resid_post"], positions=s.tm.select("last"))]
                stats = {}
                fast = run_rows(model, s, ivs, progress=False, stats=stats)
                full = run_rows(model, s, ivs, progress=False, incremental=False)
                torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
                assert stats["incremental"] and stats["layer_positions"] < stats["layer_positions_full"]
                one = model.run_with_hooks(**s.lm_inputs(1), fwd_hooks=ivs[0].check(model), logits_at="last")[:, -1]
                torch.testing.assert_close(fast[0], one[0], atol=TOL, rtol=0)


def test_feature_edits_compose_print_and_are_refused_where_they_cannot_apply(toy_model):
    model = toy_model
    inputs, tm, sae = _toy_case(model, seed=2, n=1)
    iv = ablate_features(HOOK, [1, 2], positions=tm.select("video")) + block_attention(tm, "audio", "last", [2])
    assert str(iv) == ("Intervention(ablate_features(hook=blocks.1.hook_resid_post, features=[1, 2], positions=video, "
                       "generated=False) + block_attention(src=audio, dst=last, layers=[2]))")
    assert iv.to_dict()[0] == {"op": "ablate_features", "hook": HOOK, "features": [1, 2], "positions": "video", "generated": False}
    with pytest.raises(KeyError, match="no SAE is spliced at 'blocks.1.hook_resid_post'"):
        iv.check(model)
    with model.saes(sae, use_error_term=True):
        iv.check(model)
        with pytest.raises(ValueError, match=r"feature\(s\) \[96\] out of range; the SAE at 'blocks.1.hook_resid_post' has 96 features"):
            ablate_features(HOOK, [96]).check(model)
        s = samples(model, inputs)[0]
        n = s.seq_len
        with pytest.raises(ValueError, match=f"positions over {n} prompt positions, but the run holds {n - 3}"):
            with torch.no_grad(), model.hooks(fwd_hooks=ablate_features(HOOK, [1], positions=tm.select("audio")).check(model)):
                model.run_language_model(s.embeds[:, :-3], s.position_ids[:, :, :-3])
    for call, message in [
        (lambda: ablate_features(HOOK, [1], positions=[3, 4]), "int positions cannot tell"),
        (lambda: ablate_features(HOOK, [1], generated=False), "positions=None edits every position"),
        (lambda: ablate_features(HOOK, []), "features is empty"),
        (lambda: ablate_features(HOOK, [-1]), "features are indices >= 0"),
        (lambda: ablate_features("audio_encoder.blocks.0.hook_resid_post", [1]), "position-major hook"),
        (lambda: scale_features(HOOK, [1], float("nan")), "finite"),
        (lambda: steer_features(HOOK, [1, 2], [1.0, 2.0, 3.0]), "3 numbers for 2 features"),
        (lambda: ablate_features(HOOK, [1], positions=tm.select("image")), "select nothing"),
        (lambda: patch_features({}, HOOK, [1]), "the cache has no"),
    ]:
        with pytest.raises((ValueError, KeyError), match=message):
            call()
    mp = random_sae("matching_pursuit", hook=HOOK, d_sae=96)
    with model.saes(mp, use_error_term=True), pytest.raises(ValueError, match="cannot be edited there"):
        ablate_features(HOOK, [1]).check(model)


def test_sae_features_lists_each_group_s_top_features_and_their_ablation_effect_as_naive_forwards(toy_model):
    from patching.methods.sae_features import sae_features

    model = toy_model
    b = make_batch(2, seed=4, tokenizer=model.tokenizer)
    sae = random_sae("topk", hook=HOOK, d_sae=96, k=8, seed=4)
    res = sae_features(model, b.inputs, b.answers, sae, groups=["audio", "video", "text"], top=3, progress=False)
    tm = model.token_map(b.inputs)
    masks = {"audio": tm.mask("audio"), "video": tm.mask("video"), "text": tm.mask("all") & ~tm.mask("media")}
    with torch.no_grad():
        x = model.run_with_cache(**b.inputs, names_filter=HOOK)[1][HOOK]
        feats = sae.encode(x)
    for i in range(2):
        with torch.no_grad():
            base = model.run_with_hooks(**b.inputs, fwd_hooks=[(HOOK, oracle_hook(sae, lambda c, q: masks["audio"] & False,
                                                                                  lambda f, bb, p: f))])
        p_clean = float(base[i, -1].softmax(-1)[b.answers[i]])
        for g, mask in masks.items():
            total = sum(feats[i, p] for p in range(mask.shape[1]) if mask[i, p])  # naive: position by position
            order = sorted(range(96), key=lambda f: -float(total[f]))[:3]
            rows = res.df[(res.df["sample"] == i) & (res.df["group"] == g)].sort_values("rank")
            assert rows["feature"].tolist() == order and rows["rank"].tolist() == [1, 2, 3]
            assert rows["act_sum"].tolist() == pytest.approx([float(total[f]) for f in order], rel=1e-5)
            assert (rows["n_tokens"] == int(mask[i].sum())).all()
            for f, p_got, clean_got in zip(order, rows["metric"], rows["metric_clean"]):
                def zero_f(v, bb, p, f=f):
                    v[f] = 0
                    return v

                with torch.no_grad():
                    want = model.run_with_hooks(**b.inputs, fwd_hooks=[(HOOK, oracle_hook(sae, lambda c, q: mask, zero_f))])
                assert p_got == pytest.approx(float(want[i, -1].softmax(-1)[b.answers[i]]), abs=1e-5)
                assert clean_got == pytest.approx(p_clean, abs=1e-5)
    assert set(res.df.columns) >= {"rel_change", "correct", "correct_ablated", "frac_active", "act_max"}
    assert res.mean().columns.tolist() == ["group", "rank", "rel_change"]


def test_a_study_takes_the_sae_as_an_option_and_refuses_a_missing_or_wrong_one(tmp_path):
    """The study that runs it from the command line is in tests/test_sae_train.py (harvest, train, study)."""
    from patching.apps.study.cli import parse_options
    from patching.engine.experiment import check_options, get

    sae = random_sae("topk", hook=HOOK, d_sae=96, k=8, seed=5)
    sae.save_model(tmp_path / "sae")
    options = parse_options([f"sae_features.sae={tmp_path / 'sae'}", "sae_features.top=2"])
    assert options == {"sae_features": {"sae": str(tmp_path / "sae"), "top": 2}}
    assert check_options(options, ["sae_features"]) == options
    assert get("sae_features").option_names() == ["groups", "hook", "sae", "top"]
    with pytest.raises(ValueError, match=r"sae_features needs the option\(s\) \['sae'\], e.g. sae_features.sae=runs/sae"):
        check_options({}, ["sae_features"])
    with pytest.raises(ValueError, match="not an SAE folder"):
        check_options({"sae_features": {"sae": str(tmp_path)}}, ["sae_features"])
    with pytest.raises(ValueError, match="sae_features.top must be >= 1"):
        check_options({"sae_features": {"sae": str(tmp_path / "sae"), "top": 0}}, ["sae_features"])
