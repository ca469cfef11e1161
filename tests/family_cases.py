"""One small model and one media batch per family, for tests that must hold on every family: Qwen2.5-Omni
(a left-padded batch with audio and video), video-SALMONN 2+ (audio-visual and audio-only rows) and
Qwen3-Omni (a left-padded batch: DeepStack, MoE). Random weights, built fresh on each call.

    for name, model, inputs in families(): ...
    model, inputs = family("qwen3_omni")
    model.tokenizer = tokenizer("qwen3_omni")   # for text prompts and prepare
"""

from __future__ import annotations

import salmonn_helpers as H
import torch
from omni_helpers import geometries
from qwen3_omni_helpers import model_inputs, tiny_thinker_config
from test_patching_common import tiny_pair

from hooked_av import HookedQwen3Omni, HookedVideoSALMONN2

NAMES = ("qwen2_5_omni", "video_salmonn2", "qwen3_omni")


def families():
    yield "qwen2_5_omni", tiny_pair()[1], geometries()["padded_batch"][0]
    torch.manual_seed(0)
    salmonn = HookedVideoSALMONN2.from_config(H.Reference(seed=0).salmonn_config())
    inputs, _ = H.batch(H.Row(1).text(4).video_with_audio(3, 4, 8, chunks=1, spg=0.5).text(3),
                        H.Row(2).text(4).audio(chunks=2).text(3))
    yield "video_salmonn2", salmonn, inputs
    torch.manual_seed(0)
    inputs, _ = model_inputs("left_padded")
    yield "qwen3_omni", HookedQwen3Omni.from_config(tiny_thinker_config()), inputs


def family(name: str):
    """`(model, inputs)` of one family."""
    return next((m, i) for n, m, i in families() if n == name)


def tokenizer(name: str):
    """The offline word-level tokenizer over a family's tiny ids ("dog", "cat", "Which", "clip", ... and its chat
    and media tokens), for text prompts and `prepare`."""
    if name == "qwen2_5_omni":
        from media_helpers import tiny_tokenizer
    elif name == "qwen3_omni":
        from qwen3_omni_helpers import tiny_tokenizer
    else:
        from test_salmonn_inputs import salmonn_tokenizer as tiny_tokenizer
    return tiny_tokenizer()
