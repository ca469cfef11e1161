"""Media -> model inputs for Qwen2.5-Omni: equal to what HF's Qwen2_5OmniProcessor builds from the
same media and components, runnable on the tiny model, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from media_helpers import OMNI_CHAT_TEMPLATE, moving_frames, sine, write_mp4, write_wav
from omni_helpers import AUDIO

from hooked_av.inputs.media import load_audio, load_video, resample
from hooked_av.families.qwen2_5_omni.layout import audio_token_counts
from hooked_av.families.qwen2_5_omni.processor import hf_processor
from hooked_av.families.qwen2_5_omni.prompt import messages_for, render_chat, token_strings
from hooked_av.inputs.prompt import Item, Prompt

KEYS = ["input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
        "pixel_values_videos", "video_grid_thw", "video_second_per_grid"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return dict(
        mp4=write_mp4(d / "clip.mp4", seconds=3.0), mp4b=write_mp4(d / "clip2.mp4", seconds=2.0, seed=1),
        silent=write_mp4(d / "silent.mp4", seconds=2.0, with_audio=False), wav=write_wav(d / "tone.wav", 1.5, 22050),
        junk=_junk(d / "junk.mp4"), png=_png(d / "img.png"),
    )


def _junk(path):
    path.write_bytes(b"this is not a video" * 50)
    return path


def _png(path):
    from PIL import Image

    Image.fromarray(moving_frames(1, 60, 90, seed=3)[0]).save(path)
    return path


@pytest.fixture(scope="module")
def model(tiny_omni):
    return tiny_omni


def _hf(model, texts, videos=None, audio=None, images=None, av=False, audio_from_video=None):
    proc = hf_processor(model.processor_parts, chat_template=OMNI_CHAT_TEMPLATE)
    kw = dict(load_audio_from_video=True, audio_from_video_indices=audio_from_video) if av else {}
    return proc(text=texts, videos=videos, audio=audio, images=images, padding=True, return_tensors="pt", **kw)


def _assert_same(ours: dict, hf) -> list[str]:
    compared = []
    for k in KEYS:
        assert (k in ours) == (k in hf), k
        if k in ours:
            assert ours[k].shape == hf[k].shape, (k, ours[k].shape, hf[k].shape)
            assert torch.equal(ours[k], torch.as_tensor(hf[k])), k
            compared.append(k)
    return compared


def test_video_file_with_its_audio_track_equals_hf_processor_and_runs(model, media):
    ours = model.prepare("What makes the sound?", video=media["mp4"], return_text=True)
    assert ours["use_audio_in_video"] is True
    v = load_video(media["mp4"], fps=2.0, with_audio=True)
    msgs = messages_for(Prompt("What makes the sound?", video=media["mp4"]), True)
    proc = hf_processor(model.processor_parts, chat_template=OMNI_CHAT_TEMPLATE)
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(msgs, token_strings(model.tokenizer, model.ids))  # the chat template, in Python
    hf = _hf(model, [text], videos=[v.frames], audio=[v.audio.waveform], av=True, audio_from_video=[0])
    assert _assert_same(ours, hf) == ["input_ids", "attention_mask", "input_features", "feature_attention_mask",
                                      "pixel_values_videos", "video_grid_thw", "video_second_per_grid"]
    assert v.frames.shape[0] == 6  # 3 s at 2 fps
    n_audio = audio_token_counts(ours["feature_attention_mask"])
    assert n_audio == [75]  # 3.008 s of AAC audio -> 300 mel frames -> 75 tokens of 40 ms
    inputs = {k: v for k, v in ours.items() if k != "text"}
    logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n in ("hook_audio_embeds", "hook_video_embeds"))
    assert logits.shape == (1, ours["input_ids"].shape[1], 320) and torch.isfinite(logits).all()
    assert int((ours["input_ids"] == AUDIO).sum()) == cache["hook_audio_embeds"].shape[0] == 75
    t, h, w = ours["video_grid_thw"][0].tolist()
    assert cache["hook_video_embeds"].shape[0] == t * h * w // 4 == int((ours["input_ids"] == model.ids.video).sum())


def test_interleaved_items_image_wav_and_left_padded_batch_equal_hf_processor(model, media):
    frames = moving_frames(4, 40, 56, seed=7)  # 2 s at 2 fps, with an explicit 44.1 kHz waveform
    wave = sine(2.0, 44100, 330.0)
    rows = [
        Prompt("Which clip has the dog?", items=[Item(video=media["mp4"], label="Clip 1: "),
                                                 Item(video=frames, audio=(wave, 44100), label="Clip 2: ")]),
        Prompt("What makes the sound?", image=media["png"], audio=media["wav"], system=None, options=["dog", "cat"]),
    ]
    ours = model.prepare(rows, use_audio_in_video=True, return_text=True)
    v0 = load_video(media["mp4"], with_audio=True)
    a1, wav = resample(wave, 44100), load_audio(media["wav"])
    from PIL import Image

    img = np.asarray(Image.open(media["png"]).convert("RGB"))
    hf = _hf(model, ours["text"], videos=[v0.frames, frames], audio=[v0.audio.waveform, a1.waveform, wav.waveform],
             images=[img], av=True, audio_from_video=[0, 1, None])
    assert len(_assert_same(ours, hf)) == 9
    assert ours["attention_mask"][1, 0] == 0 and ours["attention_mask"][0].all()  # left padding
    assert audio_token_counts(ours["feature_attention_mask"]) == [75, 50, 37]
    assert "A. dog\nB. cat" in ours["text"][1] and "You are a helpful assistant." in ours["text"][1]
    inputs = {k: v for k, v in ours.items() if k != "text"}
    logits = model(**inputs)
    assert logits.shape == (2, ours["input_ids"].shape[1], 320) and torch.isfinite(logits).all()


def test_separate_audio_block_when_audio_in_video_is_off_equals_hf(model, media):
    ours = model.prepare("What makes the sound?", video=media["mp4b"], audio=media["wav"], use_audio_in_video=False, return_text=True)
    v = load_video(media["mp4b"])
    hf = _hf(model, ours["text"], videos=[v.frames], audio=[load_audio(media["wav"]).waveform])
    assert len(_assert_same(ours, hf)) == 7
    assert ours["use_audio_in_video"] is False and v.audio is None


def test_waveforms_at_any_rate_are_resampled_to_16k_keeping_pitch():
    for rate in (8000, 44100, 48000):
        a = resample(sine(1.0, rate, 440.0), rate)
        assert abs(len(a.waveform) - 16000) <= 32
        spectrum = np.abs(np.fft.rfft(a.waveform[:16000]))
        assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 1  # 1 Hz bins over 1 s
    stereo = np.stack([sine(0.5, 16000), sine(0.5, 16000)], axis=1)
    assert resample(stereo, 16000).waveform.shape == (8000,)


def test_bad_inputs_raise_clear_errors(model, media):
    with pytest.raises(ValueError, match="has no audio track, but its audio was requested"):
        model.prepare("What makes the sound?", video=media["silent"], use_audio_in_video=True)
    with pytest.raises(ValueError, match="cannot read media file .*junk.mp4"):
        model.prepare("What makes the sound?", video=media["junk"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.prepare("What makes the sound?", audio="/nonexistent/x.wav")
    with pytest.raises(ValueError, match="the question is empty"):
        model.prepare("   ", audio=media["wav"])
    with pytest.raises(ValueError, match=r"must be uint8 \(0-255\); got float32"):
        model.prepare("What?", video=np.zeros((4, 32, 32, 3), np.float32), use_audio_in_video=False)
    with pytest.raises(ValueError, match=r"must be an array \[T, H, W, 3\].*got shape \(4, 32, 32\)"):
        model.prepare("What?", video=np.zeros((4, 32, 32), np.uint8), use_audio_in_video=False)
    with pytest.raises(ValueError, match="this video has no audio but its audio was requested"):
        model.prepare("What?", video=moving_frames(4), use_audio_in_video=True)
    with pytest.raises(ValueError, match="some video items have audio and some do not"):
        model.prepare("What?", items=[Item(video=media["mp4"]), Item(video=media["silent"])])
