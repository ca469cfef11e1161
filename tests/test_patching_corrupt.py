"""Modality zeroing at the media level equals preparing the prompt from black frames / silence."""

import numpy as np
import pytest
import torch
from media_helpers import moving_frames, sine

from patching.methods.causal_tracing import causal_tracing
from patching.engine.corrupt import zero_modality


@pytest.fixture(scope="module")
def model(tiny_omni):
    return tiny_omni


def _prepare(model, frames, wave):
    return model.prepare("What makes the sound?", video=frames, audio=(wave, 16000), use_audio_in_video=False)


def test_zeroing_equals_black_frames_and_silence_through_the_processor(model):
    frames, wave = moving_frames(4, 56, 56, seed=1), sine(2.0, 16000, 330.0).astype(np.float32)
    clean = _prepare(model, frames, wave)
    black = _prepare(model, np.zeros_like(frames), wave)
    silent = _prepare(model, frames, np.zeros_like(wave))
    zv, za = zero_modality(clean, "video"), zero_modality(clean, "audio")
    assert torch.allclose(zv["pixel_values_videos"], black["pixel_values_videos"], atol=1e-5)
    assert torch.equal(zv["input_features"], clean["input_features"])
    real = silent["feature_attention_mask"].bool()
    assert torch.allclose(za["input_features"].transpose(1, 2)[real], silent["input_features"].transpose(1, 2)[real], atol=1e-6)
    assert torch.equal(za["pixel_values_videos"], clean["pixel_values_videos"])
    with pytest.raises(ValueError, match="no image pixels"):
        zero_modality(clean, "image")


def test_causal_tracing_from_zeroed_video_restores_the_clean_answer_when_everything_is_restored(model):
    frames, wave = moving_frames(4, 56, 56, seed=2), sine(2.0, 16000, 440.0).astype(np.float32)
    clean = _prepare(model, frames, wave)
    with torch.no_grad():
        answer = int(model(**clean)[0, -1].argmax())
    res = causal_tracing(model, clean, [answer], mode="inputs", corrupted=zero_modality(clean, "video"),
                         restore=("resid",), tokens=["all"], window=None, progress=False).df
    row = res.iloc[0]
    p_clean = float(model(**clean)[0, -1].softmax(-1)[answer])
    assert abs(row["p_restored"] - p_clean) < 1e-5 and abs(row["p_corrupt"] - p_clean) > 1e-6
