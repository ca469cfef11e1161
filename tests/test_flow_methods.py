"""The information-flow methods as their anchors define them, each against a small independent
implementation of the anchor's definition written here (from Map the Flow, FastV, VisAttnSink and
TransformerLens), on planted examples where a plausible other definition gives different numbers."""

import pandas as pd
import pytest
import torch
from test_patching_common import N_LAYERS
from test_patching_experiments import setup  # noqa: F401  (the tiny model, two left-padded AV prompts, their top tokens)

from hooked_av.inputs import Selection
from patching.methods.dla import dla
from patching.methods.fastv import fastv, pruned_forward
from patching.engine.hooks import block_attention, discard
from patching.methods.knockout import knockout, knockout_accuracy, styled_window
from patching.methods.logit_lens import logit_lens
from patching.methods.pathway import pathway
from patching.engine.sweep import forward_rows, samples
from patching.methods.var import var

torch.set_num_threads(1)


# ---- knockout: window styles, own prediction, accuracy, heads ---------------------------------------------
def _anchor_layerlist(layer, window, num_layers, style):
    """Map the Flow, analysis/information_flow_analysis.py, the `layerlist` of each --window_style."""
    if style == "center":
        return [x for x in range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))]
    if style == "inverse":
        inner = [x for x in range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))]
        return [x for x in range(num_layers) if x not in inner]
    if style == "top_down":
        return [x for x in range(layer, num_layers)]
    return [x for x in range(0, layer + 1)]


@pytest.mark.parametrize("n_layers, window", [(28, 9), (6, 3), (32, 4)])
def test_window_styles_are_map_the_flows_layer_lists(n_layers, window):
    for style in ("center", "inverse", "top_down", "bottom_up"):
        k = window if style in ("center", "inverse") else None
        for layer in range(n_layers):
            assert styled_window(layer, k, n_layers, style) == _anchor_layerlist(layer, window, n_layers, style)
    # the styles disagree: the same layer gives four different sets
    sets = {s: tuple(styled_window(10, 9 if s in ("centre", "inverse") else None, 28, s)) for s in ("centre", "inverse", "top_down", "bottom_up")}
    assert len(set(sets.values())) == 4 and sets["inverse"] == tuple(x for x in range(28) if not 6 <= x <= 14)
    with pytest.raises(ValueError, match="inverse of the 9-layer window around layer 2 is empty"):
        styled_window(2, 9, 6, "inverse")
    with pytest.raises(ValueError, match="takes no window size; pass window=None"):
        styled_window(2, 9, 6, "top_down")


def test_the_default_window_fits_the_models_depth_and_a_whole_model_window_warns(toy_model):
    import warnings

    from hooked_av import toy
    from patching.methods.knockout import default_window

    assert [default_window(n) for n in (1, 4, 8, 16, 17, 18, 28, 36)] == [1, 1, 2, 4, 4, 9, 9, 9]
    batch = toy.make_batch(2, seed=3, tokenizer=toy_model.tokenizer)
    # the toy's 4 layers: the anchors' 9 would knock the edge out in every layer at every centre (a flat curve)
    res = knockout(toy_model, batch.inputs, batch.answers.tolist(), edges=["audio->last"], progress=False)
    df = res.df
    assert (df.window_start == df.layer).all() and (df.window_end == df.layer).all() and (df.window == 1).all()
    assert res.settings["window"] == 1 and res.settings["window_rule"] == "default for 4 layers"
    title = res.plot().axes[0].get_title()
    assert "1-layer centre window (default for 4 layers) at each layer" in title
    with pytest.warns(UserWarning, match=r"a 9-layer knockout window covers every layer of this 4-layer model at centre\(s\) \[0, 1, 2, 3\]"):
        knockout(toy_model, batch.inputs, batch.answers.tolist(), edges=["audio->last"], window=9, progress=False)
    with pytest.warns(UserWarning, match=r"at centre\(s\) \[2\]"):  # 4 layers centred on 2: 0..3, the whole model
        knockout(toy_model, batch.inputs, batch.answers.tolist(), edges=["audio->last"], window=4, centres=[1, 2], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a window that never covers the whole model, or a top-down one: no warning
        knockout(toy_model, batch.inputs, batch.answers.tolist(), edges=["audio->last"], window=3, centres=[1], progress=False)
        top = knockout(toy_model, batch.inputs, batch.answers.tolist(), edges=["audio->last"], window_style="top_down", progress=False)
    assert (top.df.window == -1).all() and top.settings["window"] is None and top.settings["window_rule"] == "none"


def test_knockout_scores_the_models_own_token_beside_the_gold_one_and_map_the_flows_accuracy(setup):
    model, inputs, tm, top = setup
    first = knockout(model, inputs, top, edges=["video->last"], window_style="top_down", tm=tm, progress=False).df
    flips = first[(first["sample"] == 1) & (first.pred_blocked != first.pred)]
    assert len(flips) > 0, "the planted example needs a knockout that changes sample 1's answer"
    gold = torch.tensor([int(top[0]), int(flips.pred_blocked.iloc[0])])  # sample 1: gold != own prediction
    res = knockout(model, inputs, gold, edges=["video->last", "question->last"], window_style="top_down", tm=tm, progress=False)
    df = res.df
    # independent: one forward per cell through the model's own forward, both tokens read off the logits
    with torch.no_grad():
        plain = model(**inputs)[:, -1].softmax(-1)
    for _, r in df.iterrows():
        iv = block_attention(tm, r["src"], r["dst"], list(range(r["layer"], N_LAYERS)))
        with torch.no_grad():
            p = model.run_with_hooks(**inputs, fwd_hooks=iv)[r["sample"], -1].softmax(-1)
        s, g, own = r["sample"], int(gold[r["sample"]]), int(top[r["sample"]])
        assert r["pred"] == own and abs(r["p_pred_blocked"] - float(p[own])) < 1e-5 and abs(r["p_blocked"] - float(p[g])) < 1e-5
        assert abs(r["rel_change_pred"] - (float(p[own]) - float(plain[s, own])) / float(plain[s, own]) * 100) < 1e-3
        assert r["pred_blocked"] == int(p.argmax()) and r["correct_blocked"] == (int(p.argmax()) == g)
    one = df[df["sample"] == 1]
    assert not one.correct.any() and (one.rel_change - one.rel_change_pred).abs().min() > 1e-3  # the two metrics differ
    # Map the Flow's accuracy: knocked-out samples are the baseline-correct ones, over all samples
    records = df.to_dict("records")
    n = 2
    for mode in ("correct", "all"):
        acc = knockout_accuracy(res, mode).df
        for _, a in acc.iterrows():
            cell = [x for x in records if x["edge"] == a["edge"] and x["layer"] == a["layer"]]
            hits = sum(1 for x in cell if x["pred_blocked"] == int(gold[x["sample"]]) and (mode == "all" or x["pred"] == int(gold[x["sample"]])))
            assert a["accuracy"] == pytest.approx(hits / n * 100)
        assert (acc.accuracy_base == 50.0).all()
    by = {m: knockout_accuracy(res, m).df.set_index(["edge", "layer"]).accuracy for m in ("correct", "all")}
    assert (by["all"] - by["correct"]).max() == pytest.approx(50.0)  # the planted flip counts only in "all"


def test_head_level_knockout(setup):
    model, inputs, tm, top = setup
    kw = dict(edges=["video->last", "audio->question"], window=3, centres=[1, 4], tm=tm, progress=False)
    every = knockout(model, inputs, top, **kw).df
    assert (knockout(model, inputs, top, heads=list(range(model.cfg.n_heads)), **kw).df.p_blocked - every.p_blocked).abs().max() < 1e-5
    one = knockout(model, inputs, top, heads=[1], **kw).df
    assert (one.p_blocked - every.p_blocked).abs().max() > 1e-4  # one head is not all heads

    def renormalise_without(src, dst, head):
        """Reference: softmax over the remaining keys = the head's row with the edge zeroed, renormalised."""
        s, d = tm.mask(src), tm.mask(dst)

        def fn(pattern, hook):
            q = pattern.shape[2]
            edge = d[:, -q:, None] & s[:, None, :]
            out = pattern.clone()
            out[:, head] = out[:, head].masked_fill(edge, 0)
            return out / out.sum(-1, keepdim=True)

        return fn

    for _, r in one.iterrows():
        layers = styled_window(r["layer"], 3, N_LAYERS)
        hooks = [(f"blocks.{l}.attn.hook_pattern", renormalise_without(r["src"], r["dst"], 1)) for l in layers]
        with torch.no_grad():
            p = model.run_with_hooks(**inputs, fwd_hooks=hooks)[r["sample"], -1].softmax(-1)[top[r["sample"]]]
        assert abs(float(p) - r["p_blocked"]) < 1e-5


# ---- effective pathway -------------------------------------------------------------------------------------
def _anchor_count(n, n_layers, block_mappings):
    """Map the Flow's effective_pathway_analysis.py: per layer a tril mask, blocked (query, key) set to 0
    for every mapping whose blocked layers hold the layer; count the 1s (kept) and n(n+1)/2 per layer."""
    base = kept = 0
    for layer in range(n_layers):
        m = torch.ones(n, n).tril()
        for keys, queries, layers in block_mappings:
            if layer in layers:
                m[queries[:, None], keys[None, :]] = 0
        base += n * (n + 1) // 2
        kept += int((m == 1).sum())
    return kept, base


def test_pathway_counts_and_blocks_as_map_the_flow_and_its_random_baseline_has_the_same_size(setup):
    model, inputs, tm, top = setup
    keep = [("video", "question", range(1, 4)), ("audio|video", "question", [2, 3]), ("question", "last", range(3, 6)),
            ("video", "last", [])]
    res = pathway(model, inputs, top, keep, seed=3, tm=tm)
    df = res.df
    assert list(df.run) == ["pathway", "random"] * 2
    for s in samples(model, inputs, tm):
        pos = {g: s.tm.positions(g) for g in ("video", "audio|video", "question", "last")}
        mappings = [(pos[a], pos[b], [x for x in range(N_LAYERS) if x not in set(kept)]) for a, b, kept in keep]
        kept, base = _anchor_count(s.seq_len, N_LAYERS, mappings)
        row = df[(df["sample"] == s.index) & (df.run == "pathway")].iloc[0]
        assert (row.edges_kept, row.edges_total) == (kept, base)
        # planted: video->question and audio|video->question overlap; counting each edge's pairs twice differs
        naive = base - sum(len(q) * len(k) * len(b) for k, q, b in mappings)
        assert naive < kept
        # the one-run pathway equals the sum of per-edge knockouts in their blocked layers
        iv = sum((block_attention(s.tm, a, b, [x for x in range(N_LAYERS) if x not in set(k)]) for a, b, k in keep if len(set(k)) < N_LAYERS),
                 start=block_attention(s.tm, "video", "last", range(N_LAYERS)))
        with torch.no_grad(), model.hooks(fwd_hooks=list(iv)):
            p = forward_rows(model, s, 1).softmax(-1)[0, top[s.index]]
        assert abs(float(p) - row.p) < 1e-5 and row.correct_orig
        rnd = df[(df["sample"] == s.index) & (df.run == "random")].iloc[0]
        n_block = int(s.seq_len * (s.seq_len + 1) // 2 * row.masked_share)
        assert rnd.edges_kept == base - n_block * N_LAYERS and abs(rnd.masked_share - row.masked_share) < N_LAYERS / base
    again = pathway(model, inputs, top, keep, seed=3, tm=tm).df
    other = pathway(model, inputs, top, keep, seed=4, tm=tm).df
    assert (again.p - df.p).abs().max() == 0 and (other[other.run == "random"].p.values != df[df.run == "random"].p.values).any()


def test_random_pairs_lie_in_the_causal_triangle_after_the_first_video_token(setup):
    from patching.methods.pathway import random_pairs

    model, inputs, tm, _ = setup
    s = samples(model, inputs, tm)[0]
    start = int(s.tm.positions("video")[0])
    pairs = random_pairs(s.tm, 50, N_LAYERS, start, seed=0)
    for m in pairs.values():
        q, k = m.nonzero().T
        assert len(q) == 50 and (k <= q).all() and (q >= start).all() and (k >= start).all()
    assert not torch.equal(pairs[0], pairs[1])  # fresh draws per layer, as the anchor


# ---- FastV -------------------------------------------------------------------------------------------------
def _anchor_fastv_keep(model, s, k, r, media="audio|video"):
    """FastV (llava-hf modeling_llama.py): the last token's head-mean attention at layer k-1 over the
    media tokens, top round(n (1 - r)), plus every other position."""
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs_embeds=s.embeds, position_ids=s.position_ids, return_type=None,
                                        names_filter=[f"blocks.{k - 1}.attn.hook_pattern", f"blocks.{k}.attn.hook_pattern"])
    media_pos = s.tm.positions(media)
    sets = []
    for layer in (k - 1, k):
        avg = cache[f"blocks.{layer}.attn.hook_pattern"][0].mean(0)[-1]
        top = media_pos[avg[media_pos].topk(round(len(media_pos) * (1 - r))).indices]
        keep = torch.ones(s.seq_len, dtype=torch.bool)
        keep[media_pos] = False
        keep[top] = True
        sets.append(keep)
    return sets


@pytest.mark.parametrize("k, r", [(2, 0.5), (3, 0.75)])
def test_fastv_keeps_the_anchors_tokens_and_equals_mask_based_dropping_from_layer_k(setup, k, r):
    model, inputs, tm, top = setup
    for s in samples(model, inputs, tm):
        ref_keep, keep_by_layer_k = _anchor_fastv_keep(model, s, k, r)
        assert not torch.equal(ref_keep, keep_by_layer_k)  # planted: ranking at layer k instead of k-1 differs
        from patching.methods.fastv import fastv_keep

        with torch.no_grad():
            logits, keep = pruned_forward(model, s.embeds, s.position_ids, k,
                                          lambda a: fastv_keep(a, s.tm.mask("audio|video")[0], r), rank=True)
            assert torch.equal(keep.cpu(), ref_keep)
            with model.hooks(fwd_hooks=discard(s.tm, Selection(~ref_keep[None], "dropped"), k, N_LAYERS)):
                masked = forward_rows(model, s, 1)
        assert (logits - masked).abs().max() < 1e-5


def test_fastv_reports_accuracy_flops_and_latency_beside_whole_modality_discarding(setup):
    model, inputs, tm, top = setup
    res = fastv(model, inputs, top, k=2, r=0.5, max_new_tokens=3, repeats=1, tm=tm, progress=False)
    df = res.df
    assert list(df[df["sample"] == 0].method) == ["full", "fastv", "discard audio", "discard video"]
    for s in samples(model, inputs, tm):
        d = df[df["sample"] == s.index].set_index("method")
        n_media = int(s.tm.count("audio|video")[0])
        assert d.loc["fastv", "n_dropped"] == n_media - round(n_media * 0.5)
        assert d.loc["discard audio", "n_dropped"] == int(s.tm.count("audio")[0])
        assert d.loc["full", "flops_saved"] == 0 and (d.flops_saved.drop("full") > 0).all()
        # the full method's greedy tokens are the model's own greedy decoding
        with torch.no_grad():
            own = model.greedy_decode(s.embeds, s.position_ids, None, None, 3, None)[0].tolist()
        assert d.loc["full", "generated"] == " ".join(map(str, own))
        assert d.loc["full", "correct"] and (d.gen_seconds > 0).all() and (d.seconds > 0).all()
    with pytest.raises(ValueError, match="k must be >= 1"):
        fastv(model, inputs, top, k=0, tm=tm)
    with pytest.raises(ValueError, match=r"r is the share of media tokens dropped, in \[0, 1\]"):
        fastv(model, inputs, top, r=1.5, tm=tm)


# ---- VAR ---------------------------------------------------------------------------------------------------
def _anchor_var(attention_map, im_mask, sink_idx, after_media, p, rho, summ):
    """VisAttnSink's HeadFork.run_logic + VARProcessor.attn_redist on one row's [1, H, Q, K] map, with the
    media positions `im_mask` (the anchor's contiguous image range generalised to a mask)."""
    attention_map = attention_map.clone()
    media_idx = im_mask.nonzero()[:, 0]
    vis = sink_idx[im_mask[sink_idx]]
    text = sink_idx[~im_mask[sink_idx]]
    if len(vis) == 0:
        return attention_map
    image_attn = attention_map[:, :, :, media_idx]
    portion = attention_map[:, :, :, vis].sum(-1) / torch.sum(image_attn + 1e-6, dim=-1)
    summation = image_attn.sum(-1)
    coord = torch.nonzero((portion <= rho) & (summation >= summ))
    for h in range(attention_map.shape[1]):
        qc = coord[coord[:, 1] == h][:, 2]
        qc = qc[qc >= after_media]
        if not len(qc):
            continue
        sel = attention_map[0, h, qc, :].clone()
        copied = sel.clone()
        sel[:, text] *= p
        sel[:, vis] *= p
        budget = copied[:, vis].sum(1) * (1 - p) + copied[:, text].sum(1) * (1 - p)
        copied[:, vis] *= 0
        ratios = copied[:, media_idx] / copied[:, media_idx].sum(1, keepdim=True)
        sel[:, media_idx] += budget.view(-1, 1) * ratios
        attention_map[0, h, qc, :] = sel
    return attention_map


def test_var_redistributes_as_visattnsink_in_image_centric_heads_only(setup):
    model, inputs, tm, top = setup
    s = samples(model, inputs, tm)[1]
    layer = 2
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs_embeds=s.embeds, position_ids=s.position_ids, return_type=None,
                                        names_filter=[f"blocks.{layer}.attn.hook_pattern"])
    plain = cache[f"blocks.{layer}.attn.hook_pattern"]
    media = s.tm.mask("audio|video")[0]
    media_pos = media.nonzero()[:, 0]
    # planted sinks: the two media tokens the last query attends to most, and the first text token
    most = media_pos[plain[0].mean(0)[-1, media_pos].topk(2).indices]
    sinks = torch.zeros(s.seq_len, dtype=torch.bool)
    sinks[most] = True
    sinks[0] = True
    after = int(media_pos.max()) + 1
    # planted threshold: the median media mass of the queries after the media, so half the heads qualify
    mass = plain[0][:, after:][..., media_pos].sum(-1)
    p, rho, summ = 0.6, 0.5, float(mass.median())
    ref = _anchor_var(plain, media, sinks.nonzero()[:, 0], after, p, rho, summ)
    changed = (ref - plain).abs().amax(-1)[0]  # [H, Q]
    assert 0 < int((changed > 0).sum()) < changed[:, after:].numel()  # some (head, query) qualify, not all
    seen = {}
    iv = var(s.tm, sinks, [layer], media="audio|video", p=p, rho=rho, summ=summ)
    with torch.no_grad(), model.hooks(fwd_hooks=list(iv) + [(f"blocks.{layer}.attn.hook_pattern", lambda a, hook: seen.setdefault("p", a.clone()))]):
        logits = forward_rows(model, s, 1)
    assert (seen["p"] - ref).abs().max() < 1e-6
    assert (seen["p"].sum(-1) - 1).abs().max() < 1e-5  # mass moved, not made
    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", lambda a, hook: ref.to(a.dtype))]):
        assert (forward_rows(model, s, 1) - logits).abs().max() < 1e-5
    # composable: with a knockout on top, and with nothing after the media left alone
    both = iv + block_attention(s.tm, "audio", "last", [4])
    with torch.no_grad(), model.hooks(fwd_hooks=list(both)):
        assert (forward_rows(model, s, 1) - logits).abs().max() > 1e-6
    with pytest.raises(ValueError, match="no sink lies among the media tokens"):
        var(s.tm, s.tm.select("question"), [layer], media="audio|video")
    with pytest.raises(ValueError, match=r"p scales the attention to sinks and must be in \[0, 1\]"):
        var(s.tm, sinks, [layer], p=1.5)


# ---- direct logit attribution by source group ------------------------------------------------------------
def test_dla_by_source_group_sums_to_each_heads_logit_attribution(setup):
    model, inputs, tm, top = setup
    df = dla(model, inputs, tm=tm).df
    H = model.cfg.n_heads
    assert len(df) == 2 * N_LAYERS * H * 5 and set(df.group) == {"template", "question", "audio", "video", "last"}
    for s in samples(model, inputs, tm):
        with torch.no_grad():
            logits, cache = model.run_with_cache(inputs_embeds=s.embeds, position_ids=s.position_ids)
            tok = int(logits[0, -1].argmax())
            heads = cache.stack_head_results(layer=-1, pos_slice=-1)  # [L*H, 1, d]
            ref = cache.logit_attrs(heads, tokens=tok, pos_slice=-1)[:, 0].view(N_LAYERS, H)
            # reference for one group: the head outputs from the audio keys only, through TransformerLens
            a = s.tm.mask("audio")[0]
            rep = H // model.cfg.n_key_value_heads
            z_audio = torch.stack([torch.einsum("hk,khd->hd", cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1][:, a],
                                                cache[f"blocks.{l}.attn.hook_v"][0].repeat_interleave(rep, 1)[a])
                                   for l in range(N_LAYERS)])  # [L, H, d_head]
            out = torch.einsum("lhd,lhdm->lhm", z_audio, torch.stack([b.attn.W_O for b in model.blocks]))
            ref_audio = cache.logit_attrs(out.reshape(N_LAYERS * H, 1, -1), tokens=tok, pos_slice=-1)[:, 0].view(N_LAYERS, H)
        mine = df[df["sample"] == s.index]
        total = mine.groupby(["layer", "head"]).dla.sum().values.reshape(N_LAYERS, H)
        assert (torch.tensor(total) - ref).abs().max() < 1e-4
        audio = mine[mine.group == "audio"].dla.values.reshape(N_LAYERS, H)
        assert (torch.tensor(audio) - ref_audio).abs().max() < 1e-4
        assert (torch.tensor(audio) - ref).abs().max() > 1e-3  # planted: one group is not the whole head
    with pytest.raises(ValueError, match="overlaps an earlier group"):
        dla(model, inputs, groups=["audio|video", "video"], tm=tm)
    part = dla(model, inputs, groups=["audio"], layers=[1], tm=tm).df
    assert set(part.group) == {"audio", "rest"}


# ---- logit lens, Map the Flow's variant --------------------------------------------------------------------
def test_map_the_flow_logit_lens_projects_layer_inputs_with_the_input_embedding(setup):
    model, inputs, tm, top = setup
    mtf = logit_lens(model, inputs, top, groups=["last", "audio"], tm=tm, lens="map_the_flow").df
    std = logit_lens(model, inputs, top, groups=["last", "audio"], tm=tm).df
    E = model.embed.weight
    for s in samples(model, inputs, tm):
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs_embeds=s.embeds, position_ids=s.position_ids)
        for layer in range(N_LAYERS):
            # the anchor: input of layer l (output of l-1) for l < L-1, the final normed output for the last
            hs = cache[f"blocks.{layer}.hook_resid_pre"][0] if layer < N_LAYERS - 1 else model.ln_final(cache[f"blocks.{layer}.hook_resid_post"][0])
            with torch.no_grad():
                probs = torch.softmax(hs @ E.T, -1)
            for group in ("last", "audio"):
                where = s.tm.mask(group)[0]
                got = mtf[(mtf["sample"] == s.index) & (mtf.layer == layer) & (mtf.group == group)].prob.item()
                assert abs(got - float(probs[where, top[s.index]].mean())) < 1e-6
    assert (mtf.prob.values - std.prob.values).__abs__().max() > 1e-4  # planted: the two lenses differ
    with pytest.raises(ValueError, match="map_the_flow lens reads its own sites"):
        logit_lens(model, inputs, top, tm=tm, lens="map_the_flow", site="resid_mid")
    with pytest.raises(ValueError, match="lens must be one of"):
        logit_lens(model, inputs, top, tm=tm, lens="tuned")


def test_knockout_accuracy_counts_only_the_samples_that_have_the_edge():
    # a sample without an edge's groups has no row for it: it used to count in the denominator (an image-only
    # sample halved the accuracy of every audio edge)
    from patching.engine.results import Result

    rows = [dict(sample=0, edge="audio->last", layer=0, correct=True, correct_blocked=True),
            dict(sample=0, edge="question->last", layer=0, correct=True, correct_blocked=False),
            dict(sample=1, edge="question->last", layer=0, correct=True, correct_blocked=True)]
    acc = knockout_accuracy(Result("knockout", pd.DataFrame(rows), {})).df.set_index("edge")
    assert acc.loc["audio->last", "accuracy"] == 100.0 and acc.loc["audio->last", "n_samples"] == 1
    assert acc.loc["question->last", "accuracy"] == 50.0 and acc.loc["question->last", "n_samples"] == 2
    assert (acc.accuracy_base == 100.0).all()
