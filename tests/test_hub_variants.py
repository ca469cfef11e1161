"""The anchors' remaining variants, each against a reference written from the anchor's code on a planted
case where it and the earlier definition here give other answers: the hub's (`kaistmm/crossmodal-hub`)
sink selections `min_layers` and per layer (`logic/sink.py::get_global_llm_sink_token`,
`get_layer_llm_sink_token`), its `sink_looks_back` MDS direction (`analyze_sink_modality_causal_fast`),
the `object` / `object_random_sink_num` token sets and draws with replacement
(`causal_tracing_modality_sink.py::build_layerlist`), the hub preset's decoding to eos and its mirror's
corrupted prediction (`logic/causal_trace.py`, `preprocess/step1/output2input_*.py`, `utils/logit.py`),
the PAI-style `masking_token` edit (`model/modeling_qwen2_5_omni_low.py`), FastV's attention-mask path
and random baseline (`pkunlp-icler/FastV`, `modeling_llama.py`) and CHAIR's word rules
(`LisaAnne/Hallucination` `utils/chair.py`)."""

import random
from collections import Counter

import pytest
import torch
from test_hub_methods import DIM, PLANT, TAU, planted  # noqa: F401  (the planted sinks fixture)
from test_patching_common import N_LAYERS

from patching.engine import token_sets
from patching.methods.sinks import find_sinks


def _flagged_per_layer(model, inputs, hooks):
    """run_logic per layer (hidden_states[l] = the input of layer l), with the cache for the patterns."""
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(**inputs)
    per_layer = []
    for l in range(N_LAYERS):
        hs = cache[f"blocks.{l}.hook_resid_pre"].float()
        normed = (hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
        per_layer.append(torch.unique(torch.nonzero(normed[:, :, [DIM]].max(-1)[0] > TAU)[:, 1]).tolist())
    return per_layer, cache


def _anchor_mds(cache, layer, sink, video_idx, audio_idx, direction):
    """analyze_sink_modality_causal_fast for one sink at one layer (float64, see test_hub_methods)."""
    attn = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()  # [H, Q, K]
    if direction == "future_looks_sink":
        v_idx, a_idx = [i for i in video_idx if i > sink], [i for i in audio_idx if i > sink]
        v = attn[:, v_idx, sink].mean() if v_idx else torch.tensor(0.0, dtype=torch.float64)
        a = attn[:, a_idx, sink].mean() if a_idx else torch.tensor(0.0, dtype=torch.float64)
    else:  # sink_looks_back
        v_idx, a_idx = [i for i in video_idx if i <= sink], [i for i in audio_idx if i <= sink]
        v = attn[:, sink, v_idx].mean() if v_idx else torch.tensor(0.0, dtype=torch.float64)
        a = attn[:, sink, a_idx].mean() if a_idx else torch.tensor(0.0, dtype=torch.float64)
    return float((v - a) / (v + a + 1e-9))


# ---- sinks ---------------------------------------------------------------------------------------------
def test_min_layers_keeps_every_media_position_flagged_often_enough_as_get_global_llm_sink_token(planted):
    model, inputs, tm, hooks = planted
    per_layer, _ = _flagged_per_layer(model, inputs, hooks)
    video_idx, audio_idx = tm.positions("video").tolist(), tm.positions("audio").tolist()
    freq = Counter(i for idx in per_layer for i in idx)
    ranked = sorted([(i, c) for i, c in freq.items() if c >= 4], key=lambda x: x[1], reverse=True)
    ref = {"video": [i for i, _ in ranked if i in video_idx], "audio": [i for i, _ in ranked if i in audio_idx]}
    with model.hooks(fwd_hooks=hooks):
        res = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, select="min_layers", min_layers=4)
        prompt = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm).df
    df = res.df
    for m in ("video", "audio"):
        assert df[df.modality == m].sort_values("rank").pos.tolist() == ref[m]
    # count 6 (first flagged at layer 0) before 5 before 4, ties in position order: 7 video and 4 audio
    # sinks, where the K = int(38 / 2) cut keeps 11 and 6
    assert ref["video"] == [6, 11, 16, 7, 12, 8, 13] and ref["audio"] == [26, 29, 27, 30]
    assert (prompt.modality == "video").sum() == 11 and (prompt.modality == "audio").sum() == 6
    assert res.settings["min_layers"] == 4
    with model.hooks(fwd_hooks=hooks):  # the hub's 8 of 28 scaled to 6 layers: 2, recorded
        scaled = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, select="min_layers")
    assert scaled.settings["min_layers"] == 2 and set(scaled.df.pos) == {p for p, c in freq.items() if c >= 2 and p != 0}
    with pytest.raises(ValueError, match=r"min_layers=7 can never be reached: sinks are flagged at 6 layers"):
        find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, select="min_layers", min_layers=7)
    with pytest.raises(ValueError, match=r"min_layers=4 applies to select='min_layers' only"):
        find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, min_layers=4)


def test_per_layer_sinks_are_get_layer_llm_sink_tokens_with_that_layers_mds(planted):
    model, inputs, tm, hooks = planted
    per_layer, cache = _flagged_per_layer(model, inputs, hooks)
    video_idx, audio_idx = tm.positions("video").tolist(), tm.positions("audio").tolist()
    with model.hooks(fwd_hooks=hooks):
        res = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, select="layer", layer_limit=4)
    df = res.df
    assert sorted(df.layer.unique()) == [0, 1, 2, 3]  # range(layer_limit)
    for l in range(4):
        for m, idx in (("video", video_idx), ("audio", audio_idx)):
            part = df[(df.layer == l) & (df.modality == m)].sort_values("rank")
            assert part.pos.tolist() == [i for i in per_layer[l] if i in idx]
            for p, score in zip(part.pos, part.mds):
                assert abs(score - _anchor_mds(cache, l, p, video_idx, audio_idx, "future_looks_sink")) < 1e-6
    # video 17 is flagged at layer 4 only, beyond the limit; audio 31 at layer 2 only, a sink of that layer alone
    assert 17 not in df.pos.tolist() and 31 in df[df.layer == 2].pos.tolist()
    assert res.settings["layer_limit"] == 4
    with model.hooks(fwd_hooks=hooks):  # the hub's 23 of 28 scaled to 6 layers: 5
        assert find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, select="layer").settings["layer_limit"] == 5
    with pytest.raises(ValueError, match=r"per-layer sinks"):
        token_sets.sinks(res, "audio")


def test_sink_looks_back_reads_the_sinks_own_row(planted):
    model, inputs, tm, hooks = planted
    _, cache = _flagged_per_layer(model, inputs, hooks)
    video_idx, audio_idx = tm.positions("video").tolist(), tm.positions("audio").tolist()
    with model.hooks(fwd_hooks=hooks):
        back = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, direction="sink_looks_back").df
        future = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm).df
    for p, score in zip(back.pos, back.mds):
        ref = sum(_anchor_mds(cache, l, p, video_idx, audio_idx, "sink_looks_back") for l in range(N_LAYERS)) / N_LAYERS
        assert abs(score - ref) < 1e-6
    # video sinks see no audio before them (audio follows the video): +1 looking back; later audio reads them
    assert ((back[back.modality == "video"].mds - 1).abs() < 1e-6).all()
    assert (future[future.modality == "video"].mds < 0.99).all()
    with pytest.raises(ValueError, match=r"direction must be one of \['future_looks_sink', 'sink_looks_back'\]"):
        find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm, direction="back")


# ---- token sets ------------------------------------------------------------------------------------------
def test_object_sets_and_draws_with_replacement_as_build_layerlist(planted):
    model, inputs, tm, hooks = planted
    with model.hooks(fwd_hooks=hooks):
        res = find_sinks(model, inputs, dims=[DIM], tau=TAU, tm=tm)
    pool = [27, 29, 32]  # the object's audio tokens: fewer than the 6 audio sinks
    sets = token_sets.hub_sets(res, "audio", seed=3, objects=token_sets.objects({0: pool}))
    assert list(sets)[-2:] == ["object", "object_random_sink_num"]
    pos = {k: sorted(s(tm, 0).mask[0].nonzero()[:, 0].tolist()) for k, s in sets.items()}
    assert pos["object"] == pool
    random.seed(3)  # build_layerlist: k_mean = 6 sinks > 3 object tokens -> random.choices(object_token_list, k=k_mean)
    assert pos["object_random_sink_num"] == sorted(set(random.choices(pool, k=6)))
    assert sets["object_random_sink_num"].seed == 3
    # random_sink_num from a pool smaller than the request: the earlier rule refused, the hub draws with replacement
    big = token_sets.random_like(token_sets.TokenSet("big", lambda tm, s: range(8)), "audio", seed=5)
    random.seed(5)
    assert sorted(big(tm, 0).mask[0].nonzero()[:, 0].tolist()) == sorted(set(random.choices(list(range(26, 33)), k=8)))
    random.seed(3)  # a pool at least as large: random.sample, as before
    assert pos["random_sink_num"] == sorted(random.sample(list(range(26, 33)), 6))
    with pytest.raises(ValueError, match=r"2 positions asked from an empty pool 'object'"):
        token_sets.random_like(token_sets.TokenSet("two", lambda tm, s: [1, 2]), token_sets.objects({}))(tm, 0)


def test_audio_blocks_are_the_runs_of_consecutive_audio_positions():
    from test_patching_common import interleaved_inputs, tiny_pair, token_map

    _, model = tiny_pair()
    tm = token_map(model, interleaved_inputs())
    audio = tm.positions("audio").tolist()
    runs = token_sets.continuous_runs(audio)
    assert len(runs) == 2 and [p for a, b in runs for p in range(a, b + 1)] == audio  # get_continuous_ranges
    assert token_sets.audio_blocks([1])(tm, 0).mask[0].nonzero()[:, 0].tolist() == list(range(runs[1][0], runs[1][1] + 1))
    with pytest.raises(ValueError, match=r"block\(s\) \[2\] do not exist in sample 0, which has 2 runs"):
        token_sets.audio_blocks([0, 2])(tm, 0)


# ---- causal tracing: decoding to eos and the corrupted run's generated word ----------------------------
class _SpacedWords:
    """The toy's tokenizer where a word after a space is another token (as a BPE's "Ġdark"): " dark"
    encodes to `spaced[dark]`; everything else as the toy's."""

    def __init__(self, tok, spaced):
        self.tok, self.spaced = tok, spaced
        self.eos_token_id = tok.eos_token_id

    def encode(self, text, add_special_tokens=False):
        ids = self.tok.encode(text.strip(), add_special_tokens=False)
        return [self.spaced.get(ids[0], ids[0])] + ids[1:] if text.startswith(" ") and ids else ids

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def test_hub_preset_decodes_to_eos_and_scores_the_corrupted_runs_generated_word(toy_model, monkeypatch):
    from test_hub_methods import _greedy_probs

    from hooked_av import toy
    from patching.engine.corrupt import zero_modality
    from patching.methods import causal_tracing as tracing
    from patching.methods.causal_tracing import causal_tracing

    cap = 6  # the hub's 1024 new tokens, shortened: each run decodes to its own eos or to the cap
    monkeypatch.setattr(tracing, "MAX_NEW_TOKENS", cap)

    model = toy_model
    inputs = toy.make_batch(1, seed=3, tokenizer=model.tokenizer, kinds=("visual",)).inputs
    tm, n_layers = model.token_map(inputs), model.cfg.n_layers
    bad = model.encode(**zero_modality(inputs, "video"))
    video = tm.positions("video")
    names = [f"blocks.{l}.ln1.hook_normalized" for l in range(n_layers)]
    with torch.no_grad():
        top2 = model(**inputs)[0, -1].topk(2).indices.tolist()
        _, clean = model.run_with_cache(**inputs, names_filter=names)
        corrupt_tokens = model.generate(**zero_modality(inputs, "video"), max_new_tokens=4)[0].tolist()
    # the toy never emits <|im_end|>: let the corrupted run's second new token stand for the end token
    eos = corrupt_tokens[1]
    assert eos not in corrupt_tokens[:1]
    corrupt_p = _greedy_probs(model, bad, lambda n: [], cap)
    second = int(corrupt_p[0].topk(2).indices[1])  # " word" is this token here: the corrupted run's runner-up
    original = model.tokenizer
    model.tokenizer = _SpacedWords(original, {corrupt_tokens[0]: second})
    try:
        res = causal_tracing(model, inputs, answers=[top2], corrupt="video", tokens=["video"], preset="hub",
                             eos_token_id=eos, tm=tm, progress=False)
        top = causal_tracing(model, inputs, answers=[top2], corrupt="video", tokens=["video"], preset="hub",
                             eos_token_id=eos, corrupt_pred="top", steps=8, tm=tm, progress=False).df
    finally:
        model.tokenizer = original
    assert res.settings["steps"] == "eos" and res.settings["corrupt_pred"] == "generated"

    def restore(layers):
        def hooks(n):
            def fn(x, hook):
                x = x.clone()
                x[:, video] = clean[hook.name][:, video]
                return x
            return [(f"blocks.{l}.ln1.hook_normalized", fn) for l in layers]
        return hooks

    word = [corrupt_tokens[0], second]  # max_prob_for_word(text_output): first sub-token with and without a space

    def to_eos(p):  # generate's logits: the steps up to and including the one that emits eos
        greedy = p.argmax(-1).tolist()
        return p[: greedy.index(eos) + 1 if eos in greedy else cap]

    corrupt_eos = to_eos(corrupt_p)
    assert len(corrupt_eos) == 2
    corrupt_8 = _greedy_probs(model, bad, lambda n: [], 8)
    for (_, row), (_, old) in zip(res.df.iterrows(), top.iterrows()):
        restored_p = _greedy_probs(model, bad, restore(range(row.layer, n_layers)), 8)
        restored_eos = to_eos(restored_p[:cap])
        ie = float(restored_eos[:, top2].max() - corrupt_eos[:, top2].max()) * 100
        mirror = float(corrupt_eos[:, word].max() - restored_eos[:, word].max()) * 100
        assert abs(row.indirect_effect - ie) < 1e-3 and abs(row.ie_corrupt_pred - mirror) < 1e-3
        # the earlier definitions: 8 fixed steps, the corrupted run's top token alone
        old_mirror = float(corrupt_8[:, [corrupt_tokens[0]]].max() - restored_p[:, [corrupt_tokens[0]]].max()) * 100
        assert abs(old.ie_corrupt_pred - old_mirror) < 1e-3
    assert (res.df.ie_corrupt_pred - top.ie_corrupt_pred).abs().max() > 1.0
    print("mirror, generated word to eos:", res.df.ie_corrupt_pred.round(2).tolist(),
          "top token, 8 steps:", top.ie_corrupt_pred.round(2).tolist())
    with pytest.raises(ValueError, match=r"corrupt_pred chooses the corrupted run's own prediction"):
        causal_tracing(model, inputs, corrupt="video", preset="hub", corrupt_pred="top", corrupt_answers=[3], tm=tm)
    with pytest.raises(ValueError, match=r"steps must be a number of decoding steps or 'eos'"):
        causal_tracing(model, inputs, corrupt="video", steps="end", tm=tm)


# ---- the PAI-style masking_token edit --------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep():
    """An 8-layer tiny Thinker: the hub's edit acts at `layer_idx > 5`."""
    from omni_helpers import tiny_hf_thinker
    from test_patching_common import av_inputs, token_map

    from hooked_av import HookedQwen2_5Omni

    model = HookedQwen2_5Omni.from_hf(tiny_hf_thinker(seed=1, num_hidden_layers=8))
    inputs = av_inputs(6)
    return model, inputs, token_map(model, inputs)


def _anchor_pai(input_ids, masking_token, alpha=0.2):
    """modeling_qwen2_5_omni_low.py's commented block with use_pai on: after the mask is added, at
    layer_idx > 5, scores[:, :, text_start_idx:, masking_token] += |.| * alpha on the prompt, row -1 on a
    decoding step; text_start_idx = max(audio_idx.max(), video_idx.max()) + 1 from the input ids."""
    from omni_helpers import AUDIO, VIDEO

    ids = input_ids[0]
    text_start = max(int((ids == AUDIO).nonzero().max()), int((ids == VIDEO).nonzero().max())) + 1

    def fn(scores, hook):
        if hook.layer() <= 5:
            return scores
        scores = scores.clone()
        rows = slice(-1, None) if scores.shape[2] == 1 else slice(text_start, None)
        scores[:, :, rows, masking_token] = scores[:, :, rows, masking_token].abs() * alpha + scores[:, :, rows, masking_token]
        return scores

    return [(f"blocks.{l}.attn.hook_attn_scores", fn) for l in range(8)], text_start


def test_pai_steer_is_the_hubs_masking_token_edit_on_prompt_and_generation(deep):
    from hooked_av.inputs import Selection
    from patching.engine.hooks import pai_steer, steer

    model, inputs, tm = deep
    masking = tm.positions("video")[[0, 3, 5]].tolist() + tm.positions("audio")[[1]].tolist()
    sel = torch.zeros(1, tm.seq_len, dtype=torch.bool)
    sel[0, masking] = True
    alpha = 20.0  # the hub's 0.2 moves this random model's logits by ~5e-5 only; the rule is the same
    ref_hooks, text_start = _anchor_pai(inputs["input_ids"], masking, alpha)
    iv = pai_steer(tm, Selection(sel, "sinks"), layers=range(6, 8), alpha=alpha)
    with torch.no_grad():
        ref = model.run_with_hooks(**inputs, fwd_hooks=ref_hooks)
        ours = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
        plain = model(**inputs)
        last_only = model.run_with_hooks(**inputs, fwd_hooks=steer(tm, "last", Selection(sel, "sinks"), alpha, range(6, 8)))
        with model.hooks(fwd_hooks=ref_hooks):
            ref_gen = model.generate(**inputs, max_new_tokens=4)
        with model.hooks(fwd_hooks=iv):
            gen = model.generate(**inputs, max_new_tokens=4)
    print("PAI effect", float((ours - plain).abs().max()), "ours - anchor", float((ours - ref).abs().max()))
    assert (ours - ref).abs().max() < 1e-5 and torch.equal(gen, ref_gen)
    # every query after the media is steered, not the last one alone: the question's positions change too
    assert (ours - plain)[0, text_start:-1].abs().max() > 1e-3
    assert (last_only - plain)[0, text_start:-1].abs().max() < 1e-6 and (ours - last_only)[0, -1].abs().max() > 1e-4
    assert "pai_steer(src=sinks, dst=after media, alpha=20.0" in str(iv)
    assert "alpha=0.2" in str(pai_steer(tm, "video", [6]))  # the hub's default
    first = iv.pairs()[0][1].first_query
    assert first == text_start


def test_pai_steer_composes_and_sweeps_from_its_first_query(deep):
    from patching.engine.hooks import block_attention, pai_steer
    from patching.engine.intervention import Intervention
    from patching.engine.sweep import run_rows, samples

    model, inputs, tm = deep
    s = samples(model, inputs, tm)[0]
    ivs = [pai_steer(s.tm, "video", [6, 7], alpha=20.0), pai_steer(s.tm, "audio", [7], alpha=20.0)
           + block_attention(s.tm, "audio", "last", [5]), pai_steer(s.tm, "audio|video", [6], alpha=20.0)]
    stats: dict = {}
    fast = run_rows(model, s, ivs, progress=False, stats=stats)
    whole = run_rows(model, s, ivs, progress=False, incremental=False)
    plain = run_rows(model, s, [Intervention()], progress=False)
    assert (fast - whole).abs().max() < 1e-5 and (fast - plain).abs().amax(-1).min() > 1e-4
    # the clean run's keys and values up to the first query after the media are reused, from block 5 on
    assert stats["incremental"] and stats["layer_positions"] < stats["layer_positions_full"] / 2
    print("sweep", stats)
    with pytest.raises(ValueError, match=r"hold no media token"):
        from test_patching_common import token_map
        from omni_helpers import Builder, batch

        pai_steer(token_map(model, batch(Builder(3).text(4).end())), "all", [6])


# ---- FastV: the attention-mask path and the random baseline ----------------------------------------------
def _anchor_fastv_mask(model, s, k, r, n_new):
    """modeling_llama.py's `use_fast_v` without `fast_v_inplace`, decoding with a KV cache: each forward
    ranks the image (here media) tokens by its newest query's head-mean attention at layer K-1
    (`topk(ATTENTION_RANK)`) and masks the rest as keys from layer K on. The cache is emulated by
    whole-sequence forwards in which each query row keeps the set chosen when it was the newest (the
    keys and values the cache holds were computed under that set)."""
    media = s.tm.positions("audio|video")
    rank = round(len(media) * (1 - r))
    n, sets, logits = s.seq_len, {}, []
    embeds, pos = s.embeds, s.position_ids

    def grab(pattern, hook):
        newest = pattern[0, :, -1].float().mean(0)
        keep = torch.ones(pattern.shape[-1], dtype=torch.bool)
        keep[media] = False
        keep[media[newest[media].topk(rank).indices]] = True
        q = pattern.shape[-1] - 1
        for row in ([q] if q >= n else range(n)):  # the prefill's rows all take the last prompt row's set
            sets[row] = keep

    def mask(t, hook):
        t = t.clone()
        for row in range(t.shape[2]):
            t[:, :, row, :][:, :, ~torch.cat([sets[row], sets[row].new_ones(t.shape[-1] - len(sets[row]))])] = torch.finfo(t.dtype).min
        return t

    hooks = [(f"blocks.{k - 1}.attn.hook_pattern", grab)] + [(f"blocks.{l}.attn.hook_attn_mask", mask) for l in range(k, N_LAYERS)]
    with torch.no_grad():
        for _ in range(n_new):
            lg = model.run_with_hooks(inputs_embeds=embeds, position_ids=pos, fwd_hooks=hooks)[0, -1]
            logits.append(lg)
            embeds = torch.cat([embeds, model.embed(lg.argmax().view(1, 1))], 1)
            pos = torch.cat([pos, (pos.max() + 1).view(1, 1, 1).expand(3, 1, 1)], 2)
    return torch.stack(logits), sets[n - 1]


def test_fastv_mask_path_decodes_with_a_cache_that_re_ranks_at_every_step():
    from test_patching_common import av_inputs, tiny_pair, token_map

    from patching.methods.fastv import fastv, fastv_keep, masked_generate, pruned_forward
    from patching.engine.sweep import samples

    _, model = tiny_pair()
    inputs = av_inputs(6)
    tm = token_map(model, inputs)
    s = samples(model, inputs, tm)[0]
    k, r, n_new = 2, 0.5, 5
    media = s.tm.mask("audio|video")[0]
    ref_logits, ref_keep = _anchor_fastv_mask(model, s, k, r, n_new)
    logits, keep, tokens = masked_generate(model, s, k, r, media, n_new)
    assert torch.equal(keep, ref_keep) and tokens == ref_logits.argmax(-1).tolist()
    assert (logits - ref_logits).abs().max() < 1e-5
    # the physical path (the anchor's fast_v_inplace, no cache: every position re-ranked at every step)
    embeds, pos, physical = s.embeds, s.position_ids, []
    with torch.no_grad():
        for t in range(n_new):
            lg, _ = pruned_forward(model, embeds, pos, k, lambda a: fastv_keep(a, torch.cat([media, media.new_zeros(t)]), r), True)
            physical.append(lg[0])
            embeds = torch.cat([embeds, model.embed(torch.tensor([[tokens[t]]]))], 1)  # the same tokens, to compare logits
            pos = torch.cat([pos, (pos.max() + 1).view(1, 1, 1).expand(3, 1, 1)], 2)
    physical = torch.stack(physical)
    assert (physical[0] - logits[0]).abs().max() < 1e-5  # one prefill, two paths
    gap = (physical[1:] - logits[1:]).abs().max()
    print("mask path vs physical, decoding steps:", float(gap))
    assert gap > 1e-4
    res = fastv(model, inputs, [int(ref_logits[0].argmax())], k=k, r=r, max_new_tokens=n_new, repeats=1, masked=True,
                tm=tm, progress=False).df.set_index("method")
    assert res.loc["fastv (mask)", "generated"] == " ".join(map(str, tokens))
    assert res.loc["fastv (mask)", "n_dropped"] == res.loc["fastv", "n_dropped"] and res.loc["fastv (mask)", "flops_saved"] == 0
    assert abs(res.loc["fastv (mask)", "prob"] - res.loc["fastv", "prob"]) < 1e-5


def test_fastv_random_baseline_keeps_as_many_tokens_shuffled_as_the_anchor():
    from test_patching_common import av_inputs, tiny_pair, token_map

    from hooked_av.inputs import Selection
    from patching.engine.hooks import discard
    from patching.engine.sweep import forward_rows, samples
    from patching.methods.fastv import fastv

    _, model = tiny_pair()
    inputs = av_inputs(6, 8)
    tm = token_map(model, inputs)
    with torch.no_grad():
        answers = model(**inputs)[:, -1].argmax(-1).tolist()
    res = fastv(model, inputs, answers, k=2, r=0.75, max_new_tokens=0, repeats=1, random_drop=True, seed=4, tm=tm,
                progress=False)
    assert res.settings["seed"] == 4
    for s in samples(model, inputs, tm):
        media = s.tm.positions("audio|video").tolist()
        rank = round(len(media) * 0.25)
        flags = [1] * rank + [0] * (len(media) - rank)  # the anchor's rand_image_attention_mask
        random.seed(4 + s.index)
        random.shuffle(flags)
        dropped = torch.zeros(1, s.seq_len, dtype=torch.bool)
        dropped[0, [p for p, f in zip(media, flags) if not f]] = True
        with torch.no_grad(), model.hooks(fwd_hooks=discard(s.tm, Selection(dropped, "random"), 2, N_LAYERS)):
            ref = forward_rows(model, s, 1)[0].softmax(-1)[answers[s.index]]
        row = res.df[(res.df["sample"] == s.index)].set_index("method")
        assert row.loc["random", "n_dropped"] == row.loc["fastv", "n_dropped"] == len(media) - rank
        print("random vs anchor", abs(row.loc["random", "prob"] - float(ref)), "random vs fastv",
              abs(row.loc["random", "prob"] - row.loc["fastv", "prob"]))
        assert abs(row.loc["random", "prob"] - float(ref)) < 1e-7  # p ~ 5e-3
        assert abs(row.loc["random", "prob"] - row.loc["fastv", "prob"]) > 1e-5  # another set than FastV's ranked one


# ---- CHAIR's reading of captions --------------------------------------------------------------------------
CAPTIONS = [  # planted where utils/chair.py's rules decide: (caption, the objects its caption_to_words gives)
    ("Two puppies sleep on the couches beside a hot dog.", ["dog", "couch", "hot dog"]),  # plural, synonym, two words
    ("A baby elephant near a toilet seat, and a man's knives.", ["elephant", "toilet", "person", "knife"]),
    ("The women ride buses past a bus and wine glasses.", ["person", "bus", "wine glass"]),  # "bus" -> "bu"
    ("A cheesecake, an iPhone and two motor bikes on a dining table.", ["dining table"]),  # the table's quirks
    ("People with skis and a passenger train; the seat is empty.", ["person", "skis", "train", "chair"]),
    ("Cookies, mice and doggies.", ["mouse"]),  # -ie words keep their s; mouse via [m|l]ice
]


def test_chair_reads_captions_as_utils_chair_with_its_synonyms_and_singular_forms():
    from patching.datasets.coco_objects import CocoObjects, singularize
    from patching.methods.hallucination import ObjectMatcher, chair

    matcher = CocoObjects()
    assert len(matcher.objects) == 80 and matcher.inverse["puppy"] == "dog" and "motor bike" not in matcher.inverse
    for caption, objects in CAPTIONS:
        assert matcher(caption) == objects, caption
    assert [singularize(w) for w in ("glasses", "glass", "geese", "ponies", "oxen", "scissors", "luggage")] == \
        ["glass", "glas", "goose", "pony", "ox", "scissors", "luggage"]
    # CHAIR over the captions, with the anchor's compute_chair arithmetic on its labels
    labels = [["dog"], ["elephant", "toilet"], ["person"], ["dining table"], ["person", "train"], []]
    df = chair([c for c, _ in CAPTIONS], labels, matcher)
    bad = [[o for o in objs if o not in set(lab)] for (_, objs), lab in zip(CAPTIONS, labels)]
    assert df.hallucinated.tolist() == bad
    assert df.n_hallucinated.sum() / df.n_mentions.sum() == sum(map(len, bad)) / sum(len(o) for _, o in CAPTIONS)
    assert df.hallucinated_caption.tolist() == [True, True, True, False, True, True]
    # the earlier matcher with the same names and no singular forms or two-word rules counts otherwise
    plain = ObjectMatcher({line[0]: line[1:] for line in ([o, *[k for k, v in matcher.inverse.items() if v == o and k != o]]
                                                          for o in matcher.objects)})
    assert plain(CAPTIONS[0][0]) != CAPTIONS[0][1] and chair([CAPTIONS[0][0]], [["dog"]], plain).n_mentions[0] == 1


def test_tokens_are_nltks_word_tokens():
    nltk = pytest.importorskip("nltk")  # NLTK's Treebank tokenizer needs no data; its sentence model is not shipped
    from nltk.tokenize import NLTKWordTokenizer

    from patching.datasets.coco_objects import tokenize

    for caption, _ in CAPTIONS + [("a dog's bowl, two cats' toys; it isn't 1,000 u.s. mother-in-law's (rain).", [])]:
        sentences = [x + ("." if i < caption.count(". ") else "") for i, x in enumerate(caption.lower().split(". "))]
        ref = [t for sent in sentences for t in NLTKWordTokenizer().tokenize(sent)]
        assert tokenize(caption) == ref, (caption, nltk.__version__)
