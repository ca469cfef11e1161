"""Shared tiny fixtures for the patching tests (no tests here): a 6-layer random Thinker, its hooked
twin, and hand-built audio-visual prompts with their TokenMaps."""

import torch
from omni_helpers import IM_END, IM_START, USER, Builder, batch, tiny_hf_thinker

from hooked_av import HookedQwen2_5Omni
from hooked_av.inputs.chat import ChatTokens

N_LAYERS = 6
CHAT = ChatTokens(IM_START, IM_END, None, {"user": (USER,)})


def tiny_pair(seed: int = 1):
    hf = tiny_hf_thinker(seed=seed, num_hidden_layers=N_LAYERS)
    return hf, HookedQwen2_5Omni.from_hf(hf)


def av_inputs(seed: int = 6, *rows_seeds):
    """One (or more) video + question + audio prompts, left-padded when lengths differ."""
    seeds = (seed,) + rows_seeds
    builders = [Builder(s).video(2, 4, 8, spg=0.5).text(2 + i).audio(30).end() for i, s in enumerate(seeds)]
    return batch(*builders)


def interleaved_inputs(seed: int = 11):
    """Two audio-visual items in one prompt."""
    return batch(Builder(seed).video(1, 4, 4).audio(20).text(2).video(1, 4, 4).audio(20).end())


def token_map(model, inputs):
    return model.token_map(inputs, chat=CHAT)


def no_grad_logits(model, **kw):
    with torch.no_grad():
        return model(**kw)
