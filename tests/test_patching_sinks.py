"""Sink dimensions are found from the model's activations, sinks are the media tokens that carry
them, and the modality dominance score equals the one computed from cached patterns."""

import pytest
import torch
from omni_helpers import IM_END, IM_START, USER, geometries, tiny_hf_thinker

from hooked_av import HookedQwen2_5Omni
from hooked_av.inputs.chat import ChatTokens
from patching.methods.sinks import find_sinks, sink_dimensions

CHAT = ChatTokens(IM_START, IM_END, None, {"user": (USER,)})
DIM = 7


@pytest.fixture(scope="module")
def setup():
    model = HookedQwen2_5Omni.from_hf(tiny_hf_thinker(seed=8))
    inputs, _ = geometries()["audio_in_video"]  # interleaved: every sink has later audio and video
    inputs = {**inputs, "use_audio_in_video": True}
    tm = model.token_map(inputs, chat=CHAT)
    audio, video = tm.positions("audio"), tm.positions("video")
    planted = [int(audio[1]), int(video[2]), int(video[5])]

    def plant(x, hook):  # a massive activation in one dimension at three media tokens
        x = x.clone()
        x[0, planted, DIM] = 400.0
        return x

    return model, inputs, tm, planted, plant


def test_sink_dimension_is_found_and_the_planted_tokens_are_the_sinks(setup):
    model, inputs, tm, planted, plant = setup
    with model.hooks(fwd_hooks=[("hook_embed", plant)]):
        assert sink_dimensions(model, inputs, ratio=100, tm=tm) == [DIM]
        res = find_sinks(model, inputs, tau=5.0, k_divide=2, tm=tm)
    df = res.df
    assert sorted(df.pos.tolist()) == sorted(planted)
    assert set(df[df.pos == planted[0]].modality) == {"audio"}
    assert (df.layers_flagged == model.cfg.n_layers).all()
    with pytest.raises(ValueError, match="no massive activations"):
        find_sinks(model, inputs, tau=5.0, tm=tm)  # without the plant this random model has none


def test_mds_equals_the_score_from_cached_patterns_and_splits_at_the_median(setup):
    model, inputs, tm, planted, plant = setup
    with model.hooks(fwd_hooks=[("hook_embed", plant)]):
        res = find_sinks(model, inputs, dims=[DIM], tau=5.0, tm=tm)
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("attn.hook_pattern") and n.startswith("blocks."))
    video, audio = tm.mask("video")[0], tm.mask("audio")[0]
    for p in planted:
        later = torch.arange(video.shape[0]) > p
        scores = []
        for l in range(model.cfg.n_layers):
            pat = cache[f"blocks.{l}.attn.hook_pattern"][0].mean(0)
            v, a = pat[video & later, p].mean(), pat[audio & later, p].mean()
            scores.append((v - a) / (v + a))
        assert abs(res.df.set_index("pos").loc[p, "mds"] - torch.stack(scores).mean().item()) < 1e-5
    vids = res.df[res.df.modality == "video"]
    assert vids.cross_modal.sum() == 1 and vids.loc[vids.cross_modal, "mds"].item() == vids.mds.min()
    assert res.plot() is not None
