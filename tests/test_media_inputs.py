"""Media -> model inputs on the cases that are easy to get silently wrong: the video timing of
clips sampled below 2 fps, the per-frame pixel cap of long videos, audio too short for one token,
non-finite waveforms, bad sample rates, frames a few pixels high, and prompt text holding special
tokens. Each case gives the reference's number or a clear error."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from media_helpers import OMNI_CHAT_TEMPLATE, moving_frames, sine, write_mp4
from omni_helpers import AUDIO
from test_salmonn_inputs import salmonn_tokenizer

from hooked_av import HookedVideoSALMONN2
from hooked_av.inputs.media import Audio, load_audio, load_video
from hooked_av.families.qwen2_5_omni.processor import assemble_omni_parts, hf_processor
from hooked_av.inputs.prompt import Prompt
import salmonn_helpers as SH


@pytest.fixture(scope="module")
def model(tiny_omni):
    return tiny_omni


@pytest.fixture(scope="module")
def salmonn():
    torch.manual_seed(0)
    m = HookedVideoSALMONN2.from_config(SH.Reference(seed=0).salmonn_config())
    m.tokenizer = salmonn_tokenizer()
    return m


@pytest.fixture(scope="module")
def clip_1fps(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("slow") / "slow.mp4", seconds=6.0, fps=1)


# ---- video timing ---------------------------------------------------------------------------------
def _reference_count(total: int, source_fps: float, fps: float = 2.0) -> tuple[int, float]:
    """qwen-omni-utils' rule, written out: total / source_fps * fps frames, at least 4 and at most
    min(768, total) (both made even), floored to even; the rate actually sampled is n / total * source_fps."""
    lo = math.ceil(4 / 2) * 2
    hi = math.floor(min(768, total) / 2) * 2
    n = math.floor(min(max(total / source_fps * fps, lo), hi, total) / 2) * 2
    return n, n / total * source_fps


@pytest.mark.parametrize("total, source_fps", [(6, 1.0), (30, 10.0), (7, 1.0), (3, 30.0), (10_000, 25.0), (1_000, 2.0)])
def test_frame_count_and_sampled_rate_follow_qwen_omni_utils(total, source_fps):
    from hooked_av.inputs.media import sample_frames

    idx, rate = sample_frames(total, source_fps, 2.0)
    n, want = _reference_count(total, source_fps)
    assert len(idx) == n and rate == want
    assert idx.tolist() == np.linspace(0, total - 1, n).round().astype(int).tolist()


def test_a_video_longer_than_768_frames_at_2fps_reports_the_rate_it_was_sampled_at(tmp_path):
    path = write_mp4(tmp_path / "long.mp4", seconds=400.0, fps=2, with_audio=False)  # 800 frames, 400 s
    v = load_video(path)
    assert v.frames.shape[0] == 768 and v.fps == 768 / 800 * 2  # 1.92 fps, not 2


def test_a_6s_clip_at_1fps_gets_2s_per_grid_step_in_ids_positions_and_token_map(model, clip_1fps):
    ours = model.prepare("What makes the sound?", video=clip_1fps, return_text=True)
    assert load_video(clip_1fps).fps == 1.0
    assert ours["video_second_per_grid"].tolist() == [2.0]  # temporal_patch_size 2 / 1 fps (was 1.0)
    # the HF processor told the real rate (qwen-omni-utils passes it) builds the same inputs
    v = load_video(clip_1fps, with_audio=True)
    proc = hf_processor(model.processor_parts, chat_template=OMNI_CHAT_TEMPLATE)
    hf = proc(text=ours["text"], videos=[v.frames], audio=[v.audio.waveform], padding=True, return_tensors="pt",
              load_audio_from_video=True, audio_from_video_indices=[0], fps=1.0)
    for k in ("input_ids", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        assert torch.equal(ours[k], torch.as_tensor(hf[k])), k
    inputs = {k: x for k, x in ours.items() if k != "text"}
    video = (inputs["input_ids"][0] == model.ids.video).nonzero().flatten()
    t_ids = model.encode(**inputs)["position_ids"][0, 0, video].unique()
    assert (t_ids - t_ids[0]).tolist() == [0, 50, 100]  # 25 ids per second: steps at 0, 2, 4 s (was 0, 25, 50)
    tm = model.token_map(inputs)
    assert tm.time[0, video].unique().tolist() == [0.0, 2.0, 4.0]  # (was 0, 1, 2)
    # audio-in-video: 2 s chunks now hold one grid step each, against 150 audio tokens of 6 s
    assert int((inputs["input_ids"] == AUDIO).sum()) == 150
    assert tm.chunk[0, video].unique().tolist() == [0, 1, 2]


# ---- per-frame pixel cap --------------------------------------------------------------------------
def _reference_resolution(h: int, w: int, n_frames: int, total_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils' video resize: per-frame max = max(min(768*28*28, total / n * 2), int(128*28*28 * 1.05)),
    then smart_resize to multiples of 28 between 128*28*28 and that max."""
    lo, factor = 128 * 28 * 28, 28
    hi = max(min(768 * 28 * 28, total_pixels / n_frames * 2), int(lo * 1.05))
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def test_video_frames_get_the_reference_per_frame_pixel_cap(model):
    from hooked_av.families.qwen2_5_omni.processor import OMNI_VIDEO_TOTAL_PIXELS, video_max_pixels

    assert OMNI_VIDEO_TOTAL_PIXELS == int(128000 * 28 * 28 * 0.9)
    for n in (4, 300, 400, 768):  # the cap binds past 300 frames
        want = int(max(min(768 * 28 * 28, OMNI_VIDEO_TOTAL_PIXELS / n * 2), int(128 * 28 * 28 * 1.05)))
        assert video_max_pixels(model.processor_parts, n) == want
    assert video_max_pixels(model.processor_parts, 768) == 300 * 28 * 28
    # end to end on a small budget, so that 4 frames are enough for the cap to bind
    parts = assemble_omni_parts(model.tokenizer, num_mel_bins=16, chunk_length=30)
    parts.video_total_pixels = 4 * 200 * 28 * 28 // 2  # 200 patches of 28x28 per frame for 4 frames
    for h, w in ((720, 1280), (480, 640), (300, 300)):
        out = model.prepare("What?", video=moving_frames(4, h, w), use_audio_in_video=False, parts=parts)
        rh, rw = _reference_resolution(h, w, 4, parts.video_total_pixels)
        assert out["video_grid_thw"].tolist() == [[2, rh // 14, rw // 14]]
        assert rh * rw <= 200 * 28 * 28 < 768 * 28 * 28  # within the cap, far below the per-frame bound
    model.processor_parts = assemble_omni_parts(model.tokenizer, num_mel_bins=16, chunk_length=30)  # prepare kept `parts`


# ---- audio ----------------------------------------------------------------------------------------
def test_audio_too_short_for_one_token_is_refused(model):
    with pytest.raises(ValueError, match=r"audio item 0 is 320 samples \(20\.0 ms at 16 kHz\).*at least 321 samples"):
        model.prepare("What makes the sound?", audio=(sine(0.02, 16000), 16000))
    ok = model.prepare("What makes the sound?", audio=(sine(321 / 16000, 16000), 16000))
    assert int((ok["input_ids"] == AUDIO).sum()) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_waveforms_are_refused(model, bad):
    wave = sine(1.0, 16000)
    wave[100] = bad
    with pytest.raises(ValueError, match=r"waveform has 1 non-finite sample\(s\) \(NaN or inf\), the first at sample 100"):
        model.prepare("What makes the sound?", audio=(wave, 16000))
    with pytest.raises(ValueError, match="non-finite"):
        load_audio((np.repeat(wave, 3), 48000))
    with pytest.raises(ValueError, match="non-finite"):
        Audio(wave)


@pytest.mark.parametrize("rate", [0, -16000, float("nan"), float("inf")])
def test_a_sample_rate_that_is_not_a_positive_number_is_refused(model, rate):
    with pytest.raises(ValueError, match=rf"sample rate must be a positive, finite number of samples per second; got {rate}"):
        model.prepare("What makes the sound?", audio=(sine(1.0, 16000), rate))


# ---- frame layout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [1, 2, 3, 4])
def test_frames_a_few_pixels_high_are_read_channels_last(model, salmonn, h):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    frames = moving_frames(4, 8, 56)[:, :h]  # [4, h, 56, 3]
    out = model.prepare("What?", video=frames, image=frames[0], use_audio_in_video=False)
    rh, rw = _reference_resolution(h, 56, 4, 1e12)
    assert out["video_grid_thw"].tolist() == [[2, rh // 14, rw // 14]] and rh < rw
    ih, iw = smart_resize(h, 56, 28, 56 * 56, 28 * 28 * 1280)
    assert out["image_grid_thw"].tolist() == [[1, ih // 14, iw // 14]] and ih < iw
    s = salmonn.prepare("What?", video=frames, use_audio_in_video=False)
    assert s["video_grid_thw"][0, 1] < s["video_grid_thw"][0, 2]
    assert int((s["input_ids"] == SH.VIDEO).sum()) == int(s["video_grid_thw"][0].prod()) // 4


# ---- prompt text ----------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["<|AUDIO|>", "<|VIDEO|>", "<|IMAGE|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>"])
def test_omni_text_holding_a_special_token_is_refused_before_tokenizing(model, token):
    audio = (sine(1.0, 16000), 16000)
    with pytest.raises(ValueError, match=r"the question .* contains a media placeholder token or chat-template token \(" + re.escape(repr(token))):
        model.prepare(f"What {token} sound?", audio=audio)
    with pytest.raises(ValueError, match="the label .* contains a media placeholder token"):
        model.prepare(Prompt("What?", items=[dict(audio=audio, label=f"Clip {token}")]))
    with pytest.raises(ValueError, match="option 2 .* contains a media placeholder token"):
        model.prepare("What?", audio=audio, options=["dog", token])
    with pytest.raises(ValueError, match="the system prompt .* contains a media placeholder token"):
        model.prepare("What?", audio=audio, system=f"You are {token}")


def test_salmonn_text_holding_a_chat_token_is_refused(salmonn):
    with pytest.raises(ValueError, match=r"the question 'What <\|im_start\|> sound\?' contains a media placeholder token"):
        salmonn.prepare("What <|im_start|> sound?", audio=(sine(1.0, 16000), 16000))
    with pytest.raises(ValueError, match=r"the system prompt .* contains a media placeholder token .*'<\|im_end\|>'"):
        salmonn.prepare("What?", audio=(sine(1.0, 16000), 16000), system="a<|im_end|>b")
