"""HookedVideoSALMONN2 against a reference assembled from stock HF parts (tests/salmonn_helpers.py),
loaded through a checkpoint written in the repository's key layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import salmonn_helpers as H
from hooked_av import HookedVideoSALMONN2

TOL = 1e-4
MEASURED: dict[str, float] = {}


def _av():
    return [H.Row(1).text(4).video_with_audio(3, 4, 8, chunks=1, spg=0.5).text(3)]


def _padded():
    return [
        H.Row(4).text(2).video_with_audio(2, 4, 4, chunks=1, spg=1.0).text(2),
        H.Row(5).text(6).video_with_audio(3, 4, 8, chunks=2, spg=1.0).text(4),
    ]


# name -> (rows, position mode, whether the seconds per grid step are passed)
GEOMETRIES = {
    "video_audio_interleaved-inference": (_av, "inference", False),
    "video_audio_interleaved-training": (_av, "training", True),
    "audio_only-inference": (lambda: [H.Row(2).text(4).audio(chunks=2).text(3)], "inference", False),
    "audio_only-training": (lambda: [H.Row(2).text(4).audio(chunks=2).text(3)], "training", False),
    "video_only-inference": (lambda: [H.Row(3).text(4).video(2, 4, 8).text(3)], "inference", False),
    "padded_batch_of_two-inference": (_padded, "inference", False),
    "padded_batch_of_two-training": (_padded, "training", True),
}


@pytest.fixture(scope="module")
def ref():
    return H.Reference(seed=0)


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory):
    return ref.save(tmp_path_factory.mktemp("salmonn_repo_layout"))


@pytest.fixture(scope="module")
def model(ckpt):
    return HookedVideoSALMONN2.from_pretrained(ckpt)


def _inputs(name):
    rows, mode, spg = GEOMETRIES[name]
    return H.batch(*rows(), mode=mode, spg_given=spg), mode


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_logits_match_reference_built_from_hf_parts(model, ref, name):
    (inputs, ref_pos), mode = _inputs(name)
    with torch.no_grad():
        enc = model.encode(**inputs, position_mode=mode)
        ours = model(**enc)
        theirs = ref(inputs, ref_pos).logits
    assert enc["position_mode"] == mode
    assert torch.equal(enc["position_ids"], ref_pos)
    real = inputs["attention_mask"].bool()  # padding rows are not compared: nobody reads them
    diff = (ours - theirs).abs()[real].max().item()
    MEASURED[name] = diff
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_position_modes_differ_as_documented(model):
    """Row: 4 text, <|vision_start|> (id 4), then steps of 8 video tokens + audio (1, 1, 58), spg 0.5."""
    (inputs, _), _ = _inputs("video_audio_interleaved-inference")
    block = 5  # first token after <|vision_start|>
    inf, _ = model.position_ids(inputs["input_ids"], inputs["attention_mask"], None, inputs["video_grid_thw"], None, "inference")
    tr, _ = model.position_ids(inputs["input_ids"], inputs["attention_mask"], None, inputs["video_grid_thw"], [0.5], "training")
    assert model.position_mode == "inference"
    # inference: the 9th block token (audio of step 0) takes grid slot 8 = step 1 -> temporal 2 * 1 s * 1
    assert inf[:, 0, block + 8].tolist() == [block + 2, block, block]
    # training: it is audio token 0 at (k, 0, k) + start; step 1's video sits at temporal 1 (0.5 s)
    assert tr[:, 0, block + 8].tolist() == [block, block, block]
    assert tr[:, 0, block + 9].tolist() == [block + 1, block, block]
    # training: text after the block resumes at the largest temporal id (audio token 59) + 1
    n_block = 3 * 8 + 60
    assert tr[:, 0, block + n_block].tolist() == [block + 60] * 3  # <|vision_end|>
    assert inf[:, 0, block + n_block].tolist() != tr[:, 0, block + n_block].tolist()
    with torch.no_grad():
        a = model(**inputs)
        b = model(**inputs, position_mode="training", video_second_per_grid=torch.tensor([0.5]))
    assert (a - b).abs().max() > 1e-3


def test_position_mode_set_at_load_time_is_used(ckpt):
    trained = HookedVideoSALMONN2.from_pretrained(ckpt, position_mode="training")
    (inputs, ref_pos), _ = _inputs("video_audio_interleaved-training")
    assert trained.position_mode == "training"
    enc = trained.encode(**inputs)
    assert enc["position_mode"] == "training"
    assert torch.equal(enc["position_ids"], ref_pos)


def test_hooked_residuals_and_patterns_equal_reference(model, ref):
    (inputs, ref_pos), mode = _inputs("video_audio_interleaved-training")
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs, position_mode=mode)
        out = ref(inputs, ref_pos, output_hidden_states=True, output_attentions=True)
        audio, whisper, qformer = ref.audio_embeds(inputs["input_features"], output_attentions=True)
        video = torch.cat(list(ref.vl.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output))
    n = model.cfg.n_layers
    for layer in range(n):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], out.attentions[layer], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[n], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["hook_audio_embeds"], audio, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["hook_video_embeds"], video, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["audio_encoder.hook_out"], whisper.last_hidden_state, atol=1e-5, rtol=0)
    # HF 5.x records cross-attention modules under `attentions` too (".attention" matches both): keep self's
    self_patterns = [a for a in qformer.attentions if a.shape[-1] == 1]
    for i in range(len(model.audio_qformer.blocks)):
        torch.testing.assert_close(cache[f"audio_qformer.blocks.{i}.attn.hook_pattern"], self_patterns[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(cache[f"audio_qformer.blocks.{i}.cross_attn.hook_pattern"], qformer.cross_attentions[i], atol=1e-6, rtol=0)


def test_qformer_cross_attention_sums_to_one_over_its_window_of_25_frames(model):
    (inputs, _), _ = _inputs("audio_only-inference")  # 2 chunks of 30 s
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    frames = cache["audio_encoder.hook_out"]  # [2, 1500, d]
    windows = cache["audio_qformer.hook_windows"]
    assert windows.shape == (2 * 60, 25, frames.shape[-1])
    torch.testing.assert_close(windows[60 + 7], frames[1, 7 * 25 : 8 * 25], atol=0, rtol=0)  # chunk 1, window 7
    heads = model.cfg.towers["audio_qformer"]["n_heads"]
    for i in range(len(model.audio_qformer.blocks)):
        p = cache[f"audio_qformer.blocks.{i}.cross_attn.hook_pattern"]
        assert p.shape == (120, heads, 1, 25)
        torch.testing.assert_close(p.sum(-1), torch.ones(120, heads, 1), atol=1e-6, rtol=0)
        assert p.min() > 0  # no frame of the window is masked
    assert cache["hook_audio_embeds"].shape == (120, model.cfg.d_model)


def test_newer_key_layout_and_tied_unembedding_load(model, ref, tmp_path):
    newer = HookedVideoSALMONN2.from_pretrained(ref.save(tmp_path / "newer", newer_layout=True))
    (inputs, _), _ = _inputs("video_only-inference")
    with torch.no_grad():
        assert torch.equal(newer(**inputs), model(**inputs))
    tied = tmp_path / "tied"
    tied.mkdir()
    state = ref.salmonn_state_dict()
    del state["lm_head.weight"]
    save_file(state, str(tied / "model.safetensors"))
    (tied / "config.json").write_text(json.dumps(dict(ref.salmonn_config(), tie_word_embeddings=True)))
    m = HookedVideoSALMONN2.from_pretrained(tied)
    assert m.cfg.tie_word_embeddings and m.unembed.weight is m.embed.weight
    torch.testing.assert_close(m.W_U, state["model.embed_tokens.weight"].T, atol=0, rtol=0)


def test_encode_then_forward_equals_forward_and_generate_is_greedy(model):
    (inputs, _), _ = _inputs("video_only-inference")
    with torch.no_grad():
        enc = model.encode(**inputs)
        assert torch.equal(model(**enc), model(**inputs))
        new = model.generate(**inputs, max_new_tokens=3)
        ids, mask, expect = inputs["input_ids"], inputs["attention_mask"], []
        for _ in range(3):
            nxt = model(**dict(inputs, input_ids=ids, attention_mask=mask))[:, -1].argmax(-1)
            expect.append(nxt)
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, mask[:, :1]], 1)
    assert new.tolist() == torch.stack(expect, 1).tolist()


def test_transformer_lens_logit_lens_ends_at_the_logits(model):
    (inputs, _), _ = _inputs("video_only-inference")
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
        lens = cache.accumulated_resid(layer=None, incl_mid=False, apply_ln=True, pos_slice=-1)
    assert lens.shape[0] == model.cfg.n_layers + 1
    torch.testing.assert_close(lens[-1] @ model.W_U, logits[:, -1], atol=1e-5, rtol=0)


def test_token_map_names_the_interleaved_block(model):
    (inputs, _), _ = _inputs("video_audio_interleaved-training")
    tm = model.token_map(inputs)
    ids = inputs["input_ids"][0]
    assert torch.equal(tm.mask("audio")[0], ids == H.AUDIO)
    assert torch.equal(tm.mask("video")[0], ids == H.VIDEO)
    audio = tm.positions("audio", row=0)
    assert tm.frame[0, audio].tolist() == [0, 1] + [2] * 58  # the grid step each audio token follows
    assert tm.time[0, audio[:3]].tolist() == [0.0, 0.5, 1.0]  # 0.5 s per audio token


# ---- bad input: clear errors, before any tower runs --------------------------------------------
def _count_whisper_runs(model):
    calls = []
    model.add_hook("audio_encoder.hook_conv_out", lambda t, hook: calls.append(1))
    return calls


def test_mel_input_not_3000_frames_per_chunk_is_refused(model):
    (inputs, _), _ = _inputs("audio_only-inference")
    calls = _count_whisper_runs(model)
    try:
        with pytest.raises(ValueError, match=r"exactly 3000 frames per 30 s chunk\), got \(2, 128, 2999\)"):
            model(**dict(inputs, input_features=inputs["input_features"][..., :2999]))
    finally:
        model.reset_hooks()
    assert calls == []


def test_audio_token_count_not_matching_the_audio_is_refused(model):
    (inputs, _), _ = _inputs("audio_only-inference")  # 120 <|audio_pad|> tokens
    calls = _count_whisper_runs(model)
    try:
        with pytest.raises(ValueError, match=r"120 <\|audio_pad\|> tokens but the audio input makes 180 \(3 chunk"):
            model(**dict(inputs, input_features=torch.cat([inputs["input_features"], inputs["input_features"][:1]])))
        with pytest.raises(ValueError, match=r"120 <\|audio_pad\|> placeholder\(s\) but no audio input"):
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        model.reset_hooks()
    assert calls == []


def test_config_without_qformer_config_is_refused(ref, tmp_path):
    config = ref.salmonn_config()
    del config["audio_config"]["qformer_config"]
    with pytest.raises(ValueError, match=r"no audio_config.qformer_config"):
        HookedVideoSALMONN2.from_config(config, device="meta")
    del config["audio_config"]
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no audio_config.qformer_config, so it is not a video-SALMONN 2\+ config"):
        HookedVideoSALMONN2.from_pretrained(tmp_path)


def test_unknown_position_mode_is_refused(model, ckpt):
    (inputs, _), _ = _inputs("video_only-inference")
    with pytest.raises(ValueError, match=r"position_mode 'aligned' is unknown; use one of \('inference', 'training'\)"):
        model(**inputs, position_mode="aligned")
    with pytest.raises(ValueError, match=r"position_mode 'aligned' is unknown"):
        config = json.loads((ckpt / "config.json").read_text())
        HookedVideoSALMONN2.from_config(config, device="meta", position_mode="aligned")


def test_use_audio_in_video_that_disagrees_with_the_layout_is_refused_before_any_tower(model):
    (av, _), _ = _inputs("video_audio_interleaved-inference")
    (video_only, _), _ = _inputs("video_only-inference")
    calls = _count_whisper_runs(model)
    try:
        with pytest.raises(ValueError, match="use_audio_in_video=False but a video block in input_ids interleaves audio"):
            model(**av, use_audio_in_video=False)
        with pytest.raises(ValueError, match="use_audio_in_video=True but a video block in input_ids holds no audio"):
            model(**video_only, use_audio_in_video=True)
        assert calls == []
    finally:
        model.reset_hooks()
    # a flag that agrees with the layout, or none, runs the same forward
    assert torch.equal(model(**av, use_audio_in_video=True), model(**av))


def test_generate_refuses_max_new_tokens_0_before_any_tower(model):
    (inputs, _), _ = _inputs("audio_only-inference")
    calls = _count_whisper_runs(model)
    try:
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            model.generate(**inputs, max_new_tokens=0)
        assert calls == []
    finally:
        model.reset_hooks()


def test_token_map_without_a_tokenizer_reads_qwen2_5_chat_ids_on_a_qwen2_5_vocabulary(model):
    from hooked_av.inputs.chat import QWEN2_5_CHAT, chat_tokens

    assert model.tokenizer is None
    # the tiny vocabulary is not Qwen2.5's: all text is question, as for HookedQwen2_5Omni
    tm = model.token_map(_inputs("audio_only-inference")[0][0])
    assert (tm.count("question").tolist(), tm.count("system").tolist(), tm.count("template").tolist()) == ([6], [0], [2])  # + "last"
    assert chat_tokens(None, None, 152064, 151652) is QWEN2_5_CHAT
    assert chat_tokens(None, None, 320, 151652) is None and chat_tokens(None, None, 152064, 93) is None
