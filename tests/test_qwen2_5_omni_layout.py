"""Qwen2.5-Omni input checks: the layout of each video block in input_ids decides
use_audio_in_video (a given flag that disagrees is an error before any tower runs); token_map works
without a tokenizer; generate refuses arguments that cannot be decoded."""

from __future__ import annotations

import pytest
import torch
from omni_helpers import AUDIO, AUDIO_BOS, AUDIO_EOS, VIDEO, VISION_BOS, VISION_EOS, Builder, batch, geometries, tiny_hf_thinker, tiny_thinker_config

from hooked_av import HookedQwen2_5Omni

GEOMETRIES = geometries()
TEMPLATE = {AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS}


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_thinker(seed=3)
    return hf, HookedQwen2_5Omni.from_hf(hf)


def _tower_hooks(model, fired: list):
    names = [n for n in model.hook_dict if n.startswith(("audio_encoder.", "vision_encoder.")) and n.endswith("hook_resid_pre")]
    return [(n, lambda x, hook: fired.append(hook.name)) for n in names]


def _separate_blocks():
    """A video block then a separate audio block: the layout without use_audio_in_video."""
    return batch(Builder(11).video(2, 8, 12).text(2).audio(40).end())


def _two_clips_interleaved():
    return batch(Builder(12).audio_in_video(2, 4, 4, frames=120).text(2).audio_in_video(3, 4, 8, frames=200, spg=0.5).end())


@pytest.mark.parametrize("inputs, given, laid_out", [
    (_separate_blocks(), True, "as video alone"),
    (batch(Builder(3).video(2, 8, 12).text().end()), True, "as video alone"),  # video only, no audio at all
    (GEOMETRIES["audio_in_video"][0], False, "with its audio interleaved"),
    (_two_clips_interleaved(), False, "with its audio interleaved"),
], ids=["separate_blocks_flag_on", "video_only_flag_on", "audio_in_video_flag_off", "two_interleaved_clips_flag_off"])
def test_a_flag_that_disagrees_with_the_layout_is_an_error_before_any_tower(pair, inputs, given, laid_out):
    _, model = pair
    message = (rf"row 0: the media placeholders do not follow the layout for use_audio_in_video={given}: video 0 "
               rf"is laid out {laid_out} .*; pass use_audio_in_video={not given} or leave it out")
    fired = []
    with model.hooks(fwd_hooks=_tower_hooks(model, fired)):
        with pytest.raises(ValueError, match=message):
            model(**inputs, use_audio_in_video=given)
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, use_audio_in_video=given, max_new_tokens=1)
        assert fired == []
        model(**inputs)
    assert fired  # the hooks do see the towers on a good call


@pytest.mark.parametrize("name", ["audio_in_video", "audio_in_video_eos_quirk", "padded_batch", "audio_and_video_blocks"])
def test_an_omitted_flag_follows_the_layout_and_equals_hf_with_the_right_flag(pair, name):
    hf, model = pair
    inputs, av = GEOMETRIES[name]
    with torch.no_grad():
        ref = hf(**inputs, use_audio_in_video=av).logits
        omitted = model(**inputs)
        given = model(**inputs, use_audio_in_video=av)
    real = inputs["attention_mask"].bool()
    assert torch.equal(omitted, given)
    assert (omitted[real] - ref[real]).abs().max().item() < 1e-5


def test_a_left_padded_batch_mixing_both_layouts_takes_each_rows_layout(pair):
    """Row 0 interleaves its clip's audio, row 1 (left-padded) has a separate video and audio block;
    HF needs one flag per call, so each row is checked against HF run alone with its own flag."""
    hf, model = pair
    rows = [Builder(13).audio_in_video(2, 4, 4, frames=120).text().end(), Builder(14).video(2, 4, 8).text(1).audio(40).text(5).end()]
    both = batch(*rows)
    assert both["attention_mask"][1, 0] == 0  # row 1 is padded
    with torch.no_grad():
        out = model(**both)
        for r, (row, av) in enumerate(zip(rows, [True, False])):
            ref = hf(**batch(row), use_audio_in_video=av).logits[0]
            real = both["attention_mask"][r].bool()
            assert (out[r, real] - ref).abs().max().item() < 2e-5, r
    for given, row, video, laid_out in ((True, 1, 1, "as video alone"), (False, 0, 0, "with its audio interleaved")):
        with pytest.raises(ValueError, match=rf"row {row}: .* video {video} is laid out {laid_out}"):
            model(**both, use_audio_in_video=given)


def test_position_ids_check_the_flag_against_the_layout(pair):
    _, model = pair
    inputs = _two_clips_interleaved()
    fam = inputs["feature_attention_mask"]
    args = (inputs["input_ids"], inputs["attention_mask"], None, inputs["video_grid_thw"], fam.sum(1), inputs["video_second_per_grid"])
    with pytest.raises(ValueError, match=r"use_audio_in_video=False: video 0 is laid out with its audio interleaved"):
        model.position_ids(*args, False)
    assert torch.equal(model.position_ids(*args)[0], model.position_ids(*args, True)[0])


def test_shipped_toy_refuses_the_audio_in_video_flag_on_its_separate_blocks():
    """The toy's prompts hold a video block and a separate audio block per clip; the flag used to run
    and move its logits by up to 19.8 (accuracy 1.00 -> 0.89 on 64 held-out samples)."""
    from hooked_av import toy

    model = toy.load()
    b = toy.make_batch(8, seed=123, tokenizer=model.tokenizer)
    with pytest.raises(ValueError, match=r"use_audio_in_video=True: video 0 is laid out as video alone"):
        model(**b.inputs, use_audio_in_video=True)
    with torch.no_grad():
        assert torch.equal(model(**b.inputs), model(**b.inputs, use_audio_in_video=False))


# ---- token_map without a tokenizer -------------------------------------------------------------------
def test_token_map_without_a_tokenizer_on_a_non_qwen_vocabulary_reads_all_text_as_question(pair):
    _, model = pair
    assert model.tokenizer is None and model.cfg.d_vocab == 320
    inputs, _ = GEOMETRIES["padded_batch"]
    tm = model.token_map(inputs)
    kinds = {AUDIO: "audio", VIDEO: "video", model.ids.image: "image"}
    for row, (ids, keep) in enumerate(zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())):
        expected = ["padding" if not k else kinds.get(t, "template" if t in TEMPLATE else "question") for t, k in zip(ids, keep)]
        expected[-1] = "last"
        assert tm.names(row) == expected, row


QWEN = dict(audio=151646, audio_bos=151647, audio_eos=151648, vision_bos=151652, vision_eos=151653, image=151655, video=151656)


def test_token_map_without_a_tokenizer_on_the_qwen_vocabulary_uses_the_qwen_chat_ids():
    cfg = tiny_thinker_config(vocab_size=152064)
    cfg.audio_token_id, cfg.image_token_id, cfg.video_token_id = QWEN["audio"], QWEN["image"], QWEN["video"]
    cfg.audio_start_token_id, cfg.audio_end_token_id = QWEN["audio_bos"], QWEN["audio_eos"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = QWEN["vision_bos"], QWEN["vision_eos"]
    model = HookedQwen2_5Omni.from_config(cfg, device="meta")  # token_map reads ids only
    nl, im_start, im_end = 198, 151644, 151645
    ids = ([im_start, 8948, nl, 5, 6, im_end, nl, im_start, 872, nl, 7, QWEN["vision_bos"]] + [QWEN["video"]] * 4
           + [QWEN["vision_eos"], 8, 9, im_end, nl, im_start, 77091, nl])
    tm = model.token_map({"input_ids": torch.tensor([ids]), "video_grid_thw": torch.tensor([[1, 4, 4]])})
    assert tm.names(0) == (["template"] * 3 + ["system"] * 2 + ["template"] * 5 + ["question", "template"] + ["video"] * 4
                           + ["template", "question", "question"] + ["template"] * 4 + ["last"])


# ---- generate arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), r"max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens=-2), r"max_new_tokens must be >= 1, got -2"),
    (dict(eos_token_id=320), r"eos_token_id \[320\] out of range; the model has 320 token ids \(0\.\.319\)"),
    (dict(eos_token_id=[5, -1]), r"eos_token_id \[-1\] out of range; the model has 320 token ids \(0\.\.319\)"),
])
def test_generate_refuses_arguments_it_cannot_decode_before_any_tower(pair, kwargs, message):
    _, model = pair
    inputs, av = GEOMETRIES["audio_in_video"]
    fired = []
    with model.hooks(fwd_hooks=_tower_hooks(model, fired)):
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, use_audio_in_video=av, **kwargs)
    assert fired == []
    enc = model.encode(**inputs)
    with pytest.raises(ValueError, match=message):  # the shared decoder (both families) checks too
        model.greedy_decode(enc["inputs_embeds"], enc["position_ids"], inputs["attention_mask"], enc["rope_deltas"],
                            kwargs.get("max_new_tokens", 2), kwargs.get("eos_token_id"))
    new = model.generate(**inputs, max_new_tokens=1, eos_token_id=319)
    assert new.shape == (1, 1)


def test_position_ids_say_when_the_ids_hold_more_media_than_the_metadata(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["audio_in_video"]
    with pytest.raises(ValueError, match=r"row 0: the ids hold more audio blocks than the audio metadata describes \(0\)"):
        model.position_ids(inputs["input_ids"], inputs["attention_mask"], None, inputs["video_grid_thw"], None, inputs["video_second_per_grid"])
    with pytest.raises(ValueError, match=r"row 0: the ids hold more video blocks than the video metadata describes \(0\)"):
        model.position_ids(inputs["input_ids"], inputs["attention_mask"])
