"""nnsight in both directions: our models wrapped by nnsight (values and edits in a trace equal
run_with_cache and hooks), and the patching library on stock HF models through nnsight (equal to our
model on Qwen2.5-Omni, and to HF with hand-built 4D masks on Qwen3-Omni, which we do not reimplement)."""

import sys

import pytest
import torch
from test_patching_common import CHAT, N_LAYERS, av_inputs, tiny_pair, token_map

from hooked_av.core.masks import neg_inf
from patching.engine.hooks import ablate, block_attention, patch_from_cache

torch.set_num_threads(1)
nnsight = pytest.importorskip("nnsight", reason="nnsight is an optional extra: pip install hooked-av[nnsight]")

from hooked_av.interop.nnsight import wrap  # noqa: E402
from patching.backends.nnsight_hf import NNsightHF, hf_token_map  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def padded():
    return av_inputs(6, 7)  # two rows, left-padded


# ---- our models inside nnsight ---------------------------------------------------------------------
def test_values_saved_in_a_trace_equal_run_with_cache_exactly(pair, padded):
    _, model = pair
    names = ["audio_encoder.blocks.1.hook_resid_post", "hook_audio_embeds", "vision_encoder.blocks.0.attn.hook_pattern",
             "vision_encoder.blocks.2.hook_mlp_out", "hook_video_embeds", "hook_embed", "blocks.0.hook_resid_pre"]
    for l in range(N_LAYERS):  # a trace asks for values in the order the model makes them
        names += {1: ["blocks.1.ln1.hook_scale"], 2: ["blocks.2.attn.hook_attn_scores", "blocks.2.attn.hook_pattern"],
                  4: ["blocks.4.attn.hook_pattern"]}.get(l, []) + [f"blocks.{l}.hook_resid_post"]
    conditional = [n for n in names if n.endswith(("hook_pattern", "hook_attn_scores", "hook_scale"))]
    av = wrap(model)
    saved = {}  # filled inside the trace: a dict built there would not outlive it
    with torch.no_grad():
        with av.trace(**padded, hooked=conditional):
            for n in names:
                saved[n] = av.get(n).output.save()
            logits = av.output.save()
        paths = [b.attn.last_path for b in model.blocks]
        ref_logits, cache = model.run_with_cache(**padded, names_filter=names)
    assert paths == ["fast", "fast", "exact", "fast", "exact", "fast"]  # only the layers whose pattern is read
    assert not any(model.hook_dict[n].has_hooks() for n in model.hook_dict)  # nothing stays attached
    for n in names:
        assert torch.equal(saved[n], cache[n]), n
    assert torch.equal(logits, ref_logits)


def test_reading_a_pattern_the_trace_did_not_name_says_what_to_pass(pair):
    _, model = pair
    av = wrap(model)
    with pytest.raises(Exception, match=r"hooked='blocks\.3\.attn\.hook_pattern'"):
        with torch.no_grad(), av.trace(**av_inputs()):
            av.blocks[3].attn.hook_pattern.output.save()
    with pytest.raises(KeyError, match="does not exist"):
        av.trace(**av_inputs(), hooked="blocks.3.attn.hook_patern")


def test_a_flag_gated_point_reads_in_a_trace_while_its_flag_is_on_and_says_which_flag_while_off(pair, padded):
    """`hook_q_input` (TransformerLens's split inputs) runs only under `set_use_split_qkv_input(True)`: read in a
    trace it equals run_with_cache's; while off, reading it says which flag to turn on."""
    _, model = pair
    av = wrap(model)
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            with av.trace(**padded):
                got = av.blocks[2].hook_q_input.output.save()
            _, cache = model.run_with_cache(**padded, names_filter="blocks.2.hook_q_input")
    finally:
        model.set_use_split_qkv_input(False)
    assert torch.equal(got, cache["blocks.2.hook_q_input"])
    with pytest.raises(Exception, match=r"set_use_split_qkv_input\(True\)"):
        with torch.no_grad(), av.trace(**padded):
            av.blocks[2].hook_q_input.output.save()
    assert "blocks.2.hook_q_input" not in __import__("hooked_av.interop.nnsight", fromlist=["x"]).hooked_points(
        model, lambda n: n.startswith("blocks.2."))  # a filter skips a point whose flag is off


def test_knockout_set_in_a_trace_equals_block_attention_as_a_hook(pair, padded):
    """A padded batch shares one mask across layers: the in-place edit of layer 1's mask must stay in layer 1."""
    _, model = pair
    tm = token_map(model, padded)
    edge = (tm.mask("last")[:, None, :, None] & tm.mask("audio")[:, None, None, :])
    for layers in ([1], range(1, 4)):
        av = wrap(model)
        with torch.no_grad():
            with av.trace(**padded):
                for l in layers:
                    av.blocks[l].attn.hook_attn_mask.output.masked_fill_(edge, neg_inf(torch.float32))
                logits = av.output.save()
            ref = model.run_with_hooks(**padded, fwd_hooks=block_attention(tm, "audio", "last", layers))
            clean = model(**padded)
        assert (logits - ref).abs().max() < 1e-6
        assert (logits[:, -1] - clean[:, -1]).abs().max() > 1e-3


def test_residual_patched_in_a_trace_equals_patch_from_cache(pair):
    _, model = pair
    clean, corrupt = av_inputs(6), av_inputs(16)  # same layout, other text and media
    tm = token_map(model, corrupt)
    site = "blocks.2.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter=site)
        ref = model.run_with_hooks(**corrupt, fwd_hooks=patch_from_cache(cache, [site], tm.select("audio|last")))
        where = tm.mask("audio|last")[0]
        av = wrap(model)
        with av.trace(**corrupt):
            av.blocks[2].hook_resid_pre.output[:, where] = cache[site][:, where]
            logits = av.output.save()
        base = model(**corrupt)
    assert (logits - ref).abs().max() < 1e-6
    assert (logits - base).abs().max() > 1e-3


# ---- stock HF Qwen2.5-Omni through the nnsight backend, against our model ---------------------------
READ = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.3.hook_resid_pre", "blocks.3.ln1.hook_normalized",
        "blocks.3.hook_attn_out", "blocks.3.hook_mlp_out", "blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_backend_knockout_and_readouts_equal_ours_on_qwen2_5_omni(pair, padded, attn):
    hf, model = pair
    hf.set_attn_implementation(attn)
    be = NNsightHF(hf)
    tm = be.token_map(padded, chat=CHAT)
    ours_tm = token_map(model, padded)
    assert torch.equal(tm.group, ours_tm.group) and torch.equal(tm.item, ours_tm.item)
    iv = block_attention(tm, "audio", "last", range(1, 4)) + block_attention(tm, "video", "question", [4])
    with torch.no_grad():
        logits, cache = be.run(padded, iv, read=READ + ["blocks.2.attn.hook_attn_mask"])
        with model.hooks(fwd_hooks=iv):
            ref, ref_cache = model.run_with_cache(**padded, names_filter=READ + ["blocks.2.attn.hook_attn_mask"])
        clean, _ = be.run(padded)
    real = padded["attention_mask"].bool()
    assert (logits - ref[:, -1]).abs().max() < 1e-5
    assert (logits - clean).abs().max() > 1e-3
    for n in READ:  # padding positions hold nothing meaningful in either model
        assert (cache[n][real] - ref_cache[n][real]).abs().max() < 1e-5, n
    assert torch.equal(cache["blocks.2.attn.hook_attn_mask"], ref_cache["blocks.2.attn.hook_attn_mask"].expand(2, 1, -1, -1))


def test_hf_backend_activation_patching_and_ablation_equal_ours(pair):
    hf, model = pair
    be = NNsightHF(hf)
    clean, corrupt = av_inputs(6), av_inputs(16)
    tm = be.token_map(corrupt, chat=CHAT)
    sites = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_pre"]
    with torch.no_grad():
        _, hf_cache = be.run(clean, read=sites)
        _, our_cache = model.run_with_cache(**clean, names_filter=sites)
        for iv_of in (lambda c: patch_from_cache(c, sites[:1], tm.select("audio")),
                      lambda c: patch_from_cache(c, sites[1:], tm.select("last")),
                      lambda c: ablate(sites, "mean", tm.select("video"), reference=c)):
            logits, _ = be.run(corrupt, iv_of(hf_cache))
            ref = model.run_with_hooks(**corrupt, fwd_hooks=iv_of(our_cache))
            base = model(**corrupt)
            assert (logits - ref[:, -1]).abs().max() < 1e-5
            assert (logits - base[:, -1]).abs().max() > 1e-4


def test_hf_backend_refuses_what_it_cannot_do(pair):
    hf, model = pair
    be = NNsightHF(hf)
    with pytest.raises(KeyError, match="not a site"):
        be.run(av_inputs(), read=["blocks.1.hook_resid_mid"])
    with pytest.raises(ValueError, match="out of range"):
        be.run(av_inputs(), block_attention(be.token_map(av_inputs()), "audio", "last", [N_LAYERS]))
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hf.get_decoder().config, "_attn_implementation", "flash_attention_2")
            NNsightHF(hf)
    with pytest.raises(ValueError, match="no audio/image/video_token_id"):
        hf_token_map(av_inputs(), hf.config.text_config)


# ---- stock HF Qwen3-Omni (no reimplementation): against HF with a hand-built 4D mask -----------------
IMG, VS, VE = 251, 255, 256


def _tiny_qwen3_omni():
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, deepstack_visual_indexes=[0, 1], num_position_embeddings=16),
        audio_config=dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, output_dim=64),
        image_token_id=IMG, audio_token_id=250, video_token_id=252, audio_start_token_id=253, user_token_id=302,
    )
    cfg.vision_start_token_id = VS  # read by get_rope_index, not a declared field
    cfg.vision_end_token_id = VE  # names it for the token map (a real checkpoint's tokenizer marks it special)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1 if p.abs().sum() == p.numel() else 0, 0.1)
    h, w = 4, 4
    ids = [300, 302, 5, 6, VS] + [IMG] * (h * w // 4) + [VE, 7, 8, 9, 301]
    inputs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                  pixel_values=torch.randn(h * w, 3 * 2 * 16 * 16), image_grid_thw=torch.tensor([[1, h, w]]))
    return model, inputs


def test_hf_backend_knockout_on_qwen3_omni_equals_hf_with_a_hand_built_4d_mask():
    hf, inputs = _tiny_qwen3_omni()
    ids = inputs["input_ids"][0]
    s, window = len(ids), range(1, 3)
    blocked = torch.zeros(1, 1, s, s).masked_fill_(torch.ones(s, s, dtype=torch.bool).triu(1), neg_inf(torch.float32))
    blocked[0, 0, s - 1, ids == IMG] = neg_inf(torch.float32)  # the last position may not read the image

    def pre(module, args, kwargs):
        return args, {**kwargs, "attention_mask": blocked}

    layers = hf.get_decoder().layers
    handles = [layers[i].register_forward_pre_hook(pre, with_kwargs=True) for i in window]
    try:
        with torch.no_grad():
            oracle = hf(**inputs).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    be = NNsightHF(hf)
    tm = be.token_map(inputs, chat=CHAT)
    assert tm.names(0)[4:11] == ["template"] + ["image"] * 4 + ["template", "question"]
    with torch.no_grad():
        logits, _ = be.run(inputs, block_attention(tm, "image", "last", window))
        clean = hf(**inputs).logits[:, -1]
    assert (logits - oracle).abs().max() < 1e-5
    assert (logits - clean).abs().max() > 1e-4


# ---- without nnsight ---------------------------------------------------------------------------------
def test_without_nnsight_the_packages_import_and_the_backends_say_what_to_install(monkeypatch, pair):
    from hooked_av.interop import nnsight as interop

    monkeypatch.setitem(sys.modules, "nnsight", None)  # `import nnsight` now raises ImportError
    interop._envoy_class.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install hooked-av\[nnsight\]"):
            wrap(pair[1])
        with pytest.raises(ImportError, match=r"pip install hooked-av\[nnsight\]"):
            NNsightHF(pair[0])
    finally:
        interop._envoy_class.cache_clear()
    for name in [m for m in sys.modules if m.split(".")[0] in ("hooked_av", "patching")]:
        monkeypatch.delitem(sys.modules, name)  # import both packages afresh, without nnsight (restored after)
    import hooked_av  # noqa: F401  (these imports raise if either package imports nnsight when imported)
    import patching  # noqa: F401
    import patching.backends.nnsight_hf as fresh

    assert fresh.NNsightHF is not NNsightHF  # a fresh import, not the cached module
    with pytest.raises(ImportError, match=r"pip install hooked-av\[nnsight\]"):
        fresh.NNsightHF(pair[0])


def test_expert_hook_points_built_on_first_lookup_are_envoys_of_a_wrapped_qwen3_model():
    """Qwen3-Omni builds its per-expert hook points lazily; a wrap made before any lookup must still show them,
    and an expert's output saved in a trace equals run_with_cache's."""
    from qwen3_omni_helpers import batch, text, tiny_hf

    from hooked_av import HookedQwen3Omni

    model = HookedQwen3Omni.from_hf(tiny_hf(seed=3))
    av = wrap(model)
    name = next(n for n in model.hook_dict if n.endswith("experts.0.hook_out"))
    ids, mask = batch([text(9, seed=1)])
    with torch.no_grad(), av.trace(input_ids=ids, attention_mask=mask):  # before anything looked the name up
        saved = av.get(name).output.save()
    _, cache = model.run_with_cache(input_ids=ids, attention_mask=mask, names_filter=[name])
    assert torch.equal(saved, cache[name])


def test_hf_backend_takes_hook_pairs_as_our_models_do_and_refuses_other_things(pair):
    # be.run(inputs, [(name, fn)]) failed with "'list' object has no attribute 'check'"
    hf, model = pair
    be = NNsightHF(hf)
    inputs = av_inputs(6)
    site = "blocks.1.hook_resid_post"

    def zero_last(t, hook):
        t = t.clone()
        t[:, -1] = 0
        return t

    with torch.no_grad():
        got, _ = be.run(inputs, [(site, zero_last)])
        ours = model.run_with_hooks(**inputs, fwd_hooks=[(site, zero_last)])[:, -1]
        assert (got - ours).abs().max() < 1e-5 and (got - model(**inputs)[:, -1]).abs().max() > 1e-4
    for bad, message in (([("blocks.1.hook_resid_mid", zero_last)], "not a site"), ([(site,)], "list of \\(hook_name, fn\\)"),
                         ((site, zero_last), "list of \\(hook_name, fn\\)"), ("blocks.1", "must be an Intervention")):
        with pytest.raises((KeyError, TypeError), match=message):
            be.run(inputs, bad)


@pytest.mark.parametrize("value, message", [
    (torch.zeros(1, 2, 3), r"has shape \(1, 2, 3\); it must have the shape of the activation it replaces, \(2, \d+, \d+\)"),
    ("broadcast", r"has shape \(1, \d+, \d+\); it must have the shape"),
    ("int", r"is torch.int64 on cpu; it must be torch.float32 on cpu"),
    (5, r"is int; set a tensor of shape"),
])
def test_a_value_of_another_shape_or_dtype_set_in_a_trace_is_refused_naming_the_point(pair, padded, value, message):
    # a [1, pos, d] value broadcast silently over the batch; an int tensor ran on; a scalar failed in torch
    from hooked_av.core.base import HookShapeError

    _, model = pair
    av = wrap(model)
    shape = (2, padded["input_ids"].shape[1], model.cfg.d_model)
    value = {"broadcast": torch.zeros(1, *shape[1:]), "int": torch.zeros(shape, dtype=torch.long)}.get(value, value) \
        if isinstance(value, str) else value
    with pytest.raises(HookShapeError, match=r"the value set on blocks.1.hook_resid_post.output in the trace " + message):
        with torch.no_grad(), av.trace(**padded):
            av.blocks[1].hook_resid_post.output = value
            av.output.save()
    with torch.no_grad(), av.trace(**padded):  # the right shape is taken
        av.blocks[1].hook_resid_post.output = torch.zeros(shape)
        out = av.output.save()
    with torch.no_grad():
        ref = model.run_with_hooks(**padded, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: torch.zeros_like(t))])
    assert torch.equal(out, ref)
