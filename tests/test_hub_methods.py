"""The cross-modal-hub paper's methods as its code defines them (`kaistmm/crossmodal-hub`): sinks
(`logic/sink.py` run_logic + get_global_sink_token, MDS from `analyze_sink_modality_causal_fast`,
the split of `causal_tracing_modality_sink.py::build_layerlist`), token sets, the hub preset of causal
tracing (`trace_with_patch_memory_optimized`, `utils/logit.py::max_prob_for_word`,
`preprocess/step2/causal_effect.py`), adaptive guidance (`logic/adaptive_guidance_complex.py`),
dominance labels and the hallucination loop. Each reference below is written from the anchor's code
and run on a planted example where the earlier definitions here give other numbers."""

import random
from collections import Counter

import pytest
import torch
from test_patching_common import N_LAYERS, av_inputs, tiny_pair, token_map

from patching.engine import token_sets
from patching.methods.sinks import find_sinks

DIM, TAU = 7, 5.0  # tiny models: |h / rms(h)| <= sqrt(64) = 8, so the hub's 25 cannot be reached
# planted sink layers per position (the prompt: template 0-1, question 2-4, video 6-21, audio 26-32, last 37)
PLANT = {0: range(0, 6)}
PLANT.update({p: range(i % 5, 6) for i, p in enumerate(range(6, 17))})  # 11 video sinks, counts 6..2
PLANT.update({p: range(1 + i % 3, 6) for i, p in enumerate(range(26, 31))})  # 5 audio sinks, counts 5..3
PLANT.update({31: [2], 34: [3], 17: [4], 32: [5]})  # count 1: Counter order is first appearance (layer)


@pytest.fixture(scope="module")
def planted():
    _, model = tiny_pair()
    inputs = av_inputs(6)
    tm = token_map(model, inputs)

    def hook(layer):
        def fn(x, hook):
            x = x.clone()
            for p, layers in PLANT.items():
                x[0, p, DIM] = 400.0 if layer in layers else 0.0
            return x
        return fn

    hooks = [(f"blocks.{l}.hook_resid_pre", hook(l)) for l in range(N_LAYERS)]
    return model, inputs, tm, hooks


def hub_reference(model, inputs, tm, hooks, k_divide=2):
    """get_global_sink_token + collect_layer_stats_fast + build_layerlist, on the hooked model's own
    hidden states (hidden_states[l] = the input of layer l) and patterns."""
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(**inputs)
    video_idx, audio_idx = tm.positions("video").tolist(), tm.positions("audio").tolist()
    per_layer = []
    for l in range(N_LAYERS):
        hs = cache[f"blocks.{l}.hook_resid_pre"].float()
        normed = (hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
        per_layer.append(torch.nonzero(normed[:, :, [DIM]].max(-1)[0] > TAU)[:, 1])
    freq = Counter(torch.cat(per_layer).tolist())
    most_common = freq.most_common(int(inputs["input_ids"].shape[1] / k_divide))
    visual = [i for i, _ in most_common if i in video_idx]
    audio = [i for i, _ in most_common if i in audio_idx]
    mds = {}
    for sink in visual + audio:
        scores = []
        for l in range(N_LAYERS):
            attn = cache[f"blocks.{l}.attn.hook_pattern"][0]  # [H, Q, K]
            v_idx, a_idx = [i for i in video_idx if i > sink], [i for i in audio_idx if i > sink]
            # float64 (the hub's float32 leaves ties to rounding, see patching.methods.sinks._mean_attention_from)
            v = attn[:, v_idx, sink].double().mean() if v_idx else torch.tensor(0.0, dtype=torch.float64)
            a = attn[:, a_idx, sink].double().mean() if a_idx else torch.tensor(0.0, dtype=torch.float64)
            scores.append(((v - a) / (v + a + 1e-9)).item())
        mds[sink] = float(sum(scores) / len(scores))
    cross = {}
    for modality, keys, reverse in (("video", visual, True), ("audio", audio, False)):  # people / sports
        ordered = [t for t, _ in sorted(((t, mds[t]) for t in keys), key=lambda x: x[1], reverse=reverse)]
        cross[modality] = ordered[len(ordered) // 2:]
    return dict(video=visual, audio=audio, mds=mds, cross=cross, counts=freq)


def test_sinks_follow_the_hub_rule_and_differ_from_the_per_modality_rule(planted):
    model, inputs, tm, hooks = planted
    ref = hub_reference(model, inputs, tm, hooks)
    assert set(ref["counts"]) == set(PLANT)  # nothing but the plant is flagged
    with model.hooks(fwd_hooks=hooks):
        hub = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm).df
        old = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, select="modality", empty="nan", split="median").df
    for m in ("video", "audio"):
        part = hub[hub.modality == m].sort_values("rank")
        assert part.pos.tolist() == ref[m]  # the same sinks in the same (most_common) order
        assert sorted(part[part.cross_modal].pos) == sorted(ref["cross"][m])
        for p, score in zip(part.pos, part.mds):
            assert abs(score - ref["mds"][p]) < 1e-6
    # K = int(38 / 2) = 19 of 21 flagged: the count-1 ties go by first flagged layer, so audio 31 (layer 2)
    # is in and video 17 (layer 4) out; 11 video + 6 audio sinks against 8 + 3 per modality
    assert (len(ref["video"]), len(ref["audio"])) == (11, 6) and 31 in ref["audio"] and 17 not in ref["video"]
    assert (hub.modality == "video").sum() == 11 and (hub.modality == "audio").sum() == 6
    assert (old.modality == "video").sum() == 8 and (old.modality == "audio").sum() == 3
    # audio sinks have no later video token: the hub scores them -1 and splits by rank (3 of 6
    # cross-modal, the least flagged); the earlier rule gave NaN and no cross-modal audio sink
    audio = hub[hub.modality == "audio"]
    assert ((audio.mds + 1).abs() < 1e-6).all() and audio.cross_modal.sum() == 3
    assert old[old.modality == "audio"].mds.isna().all() and not old[old.modality == "audio"].cross_modal.any()
    assert hub[hub.modality == "video"].cross_modal.sum() == 6  # ceil(11 / 2)


def test_sinks_refuse_a_tau_no_activation_can_exceed_and_unknown_rules(planted):
    model, inputs, tm, _ = planted
    with pytest.raises(ValueError, match=r"tau=25 can never be exceeded.*sqrt\(d_model\) = 8.00"):
        find_sinks(model, inputs, dims=[DIM], tm=tm)
    with pytest.raises(ValueError, match=r"select must be one of \['prompt', 'modality', 'min_layers', 'layer'\]"):
        find_sinks(model, inputs, dims=[DIM], tau=TAU, select="all", tm=tm)
    with pytest.raises(ValueError, match=r"modalities \['image'\] have no cross-modal direction"):
        find_sinks(model, inputs, dims=[DIM], tau=TAU, modalities=["image"], tm=tm)


def test_token_sets_are_the_hub_replace_modes(planted):
    model, inputs, tm, hooks = planted
    with model.hooks(fwd_hooks=hooks):
        res = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm)
    sets = token_sets.hub_sets(res, "audio", seed=3)
    assert list(sets) == ["all", "sink", "cross_modal_sink", "unimodal_sink", "random_sink_num"]
    pos = {k: sorted(s(tm, 0).mask[0].nonzero()[:, 0].tolist()) for k, s in sets.items()}
    assert pos["all"] == list(range(26, 33))
    assert pos["sink"] == list(range(26, 32))
    assert sorted(pos["cross_modal_sink"] + pos["unimodal_sink"]) == pos["sink"] and len(pos["cross_modal_sink"]) == 3
    random.seed(3)  # the hub's draw: random.seed(seed); random.sample(base_indices, k_mean)
    assert pos["random_sink_num"] == sorted(random.sample(list(range(26, 33)), 6))
    assert sets["cross_modal_sink"].label == "cross_modal_sink(audio)"


# ---- causal tracing, the hub preset -------------------------------------------------------------------
def _greedy_probs(model, enc, hooks, steps):
    """Probabilities `[steps, vocab]` of greedy decoding, the whole sequence recomputed at every step
    (no KV cache); `hooks(n)` edits the first n (prompt) positions only, as the hub's hooks skip decoding."""
    embeds, pos = enc["inputs_embeds"], enc["position_ids"]
    n, out = embeds.shape[1], []
    with torch.no_grad():
        for _ in range(steps):
            p = model.run_with_hooks(inputs_embeds=embeds, position_ids=pos, fwd_hooks=hooks(n))[0, -1].softmax(-1)
            out.append(p)
            tok = p.argmax()
            embeds = torch.cat([embeds, model.embed(tok.view(1, 1))], 1)
            pos = torch.cat([pos, (pos.max() + 1).view(1, 1, 1).expand(3, 1, 1)], 2)
    return torch.stack(out)


def test_hub_preset_of_causal_tracing_equals_the_hubs_loop(toy_model):
    """The toy asked a colour with black frames, its video tokens' attention input restored from
    each layer to the last (the hub's video-corrupted case restores the other modality's sinks; the
    definitions are the same for any set)."""
    from hooked_av import toy
    from patching.methods.causal_tracing import causal_tracing
    from patching.engine.corrupt import zero_modality

    model = toy_model
    inputs = toy.make_batch(1, seed=3, tokenizer=model.tokenizer, kinds=("visual",)).inputs  # black frames flip it
    tm = model.token_map(inputs)
    n_layers = model.cfg.n_layers
    bad = model.encode(**zero_modality(inputs, "video"))
    with torch.no_grad():
        top2 = model(**inputs)[0, -1].topk(2).indices.tolist()
    steps, audio = 3, tm.positions("video")
    names = [f"blocks.{l}.ln1.hook_normalized" for l in range(n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(**inputs, names_filter=names)

    def restore(layers):
        def hooks(n):
            def fn(x, hook):
                x = x.clone()
                x[:, audio] = clean[hook.name][:, audio]  # prompt positions only
                return x
            return [(f"blocks.{l}.ln1.hook_normalized", fn) for l in layers]
        return hooks

    corrupt_p = _greedy_probs(model, bad, lambda n: [], steps)
    pred = int(corrupt_p[0].argmax())  # the corrupted run's own answer
    res = causal_tracing(model, inputs, answers=[top2], corrupt="video", tokens=["video"], preset="hub", steps=steps,
                         tm=tm, progress=False).df
    assert res.window_end.tolist() == [n_layers - 1] * n_layers and res.window_start.tolist() == list(range(n_layers))
    for _, row in res.iterrows():
        restored_p = _greedy_probs(model, bad, restore(range(row.layer, n_layers)), steps)
        rcp, ccp = restored_p[:, top2].max(), corrupt_p[:, top2].max()  # max_prob_for_word: steps x candidates
        ie = float(rcp - ccp) * 100
        mirror = float(corrupt_p[:, pred].max() - restored_p[:, pred].max()) * 100  # causal_effect.py
        assert abs(row.p_restored - float(rcp)) < 1e-5 and abs(row.p_corrupt - float(ccp)) < 1e-5
        assert abs(row.indirect_effect - ie) < 1e-3 and abs(row.ie_corrupt_pred - mirror) < 1e-3
    # the earlier definition (first step of the first candidate, restored sign, x1, a centred window) differs
    old = causal_tracing(model, inputs, answers=[top2[0]], corrupt="video", tokens=["video"],
                         corrupted=zero_modality(inputs, "video"), restore=("attn_in",), tm=tm, progress=False).df
    assert old.window_end.tolist() == list(range(n_layers))
    assert (old.indirect_effect * 100 - res.indirect_effect).abs().max() > 1.0
    print("hub IE", res.indirect_effect.round(3).tolist(), "earlier x100", (old.indirect_effect * 100).round(3).tolist())


def test_answers_as_words_take_both_space_variants_of_the_first_sub_token(planted):
    from patching.methods.causal_tracing import candidates

    model = planted[0]

    class Tok:  # "cat" -> [5, 6], " cat" -> [9]: the first sub-token of each
        def encode(self, text, add_special_tokens=False):
            return {"cat": [5, 6], " cat": [9]}[text]

    model.tokenizer = Tok()
    try:
        assert candidates(model, ["cat", 7, [3, 4]], 3, "answers") == [[5, 9], [7], [3, 4]]
        with pytest.raises(ValueError, match=r"2 answer token ids for 3 samples"):
            candidates(model, ["cat", 7], 3, "answers")
    finally:
        del model.tokenizer


# ---- unimodal dominance ----------------------------------------------------------------------------------
def test_dominance_labels_as_the_hub_selects_its_cases(toy_model):
    from hooked_av import toy
    from patching.engine.corrupt import zero_modality
    from patching.methods.dominance import dominance

    model = toy_model
    batch = toy.make_batch(8, seed=0, tokenizer=model.tokenizer, kinds=("visual", "auditory"))
    df = dominance(model, batch.inputs, answers=batch.answers)
    with torch.no_grad():  # av / a (black frames) / v (silence) answers
        runs = [model(**x)[:, -1].argmax(-1).tolist() for x in
                (batch.inputs, zero_modality(batch.inputs, "video"), zero_modality(batch.inputs, "audio"))]
    for i in range(8):  # the hub's rule, one sample at a time
        av, a, v = (r[i] for r in runs)
        expect = "video" if (av == v and av != a) else "audio" if (av == a and av != v) else "neither"
        assert df.loc[i, "label"] == expect and (df.loc[i, "pred_av"], df.loc[i, "pred_audio_only"], df.loc[i, "pred_video_only"]) == (av, a, v)
    print(df.label.value_counts().to_dict())
    assert df.correct_av.all() and df.label.value_counts().to_dict() == {"neither": 4, "audio": 2, "video": 2}
