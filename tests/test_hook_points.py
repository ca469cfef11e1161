"""Hooks do what they say or refuse: every hook point that is hooked runs, every hook passed is
installed, names are checked before any work, hooks cannot corrupt the caller's tensors or the
model's dtype, and the cache knows which activations are batch-major."""

from __future__ import annotations

import pytest
import torch
from omni_helpers import Builder, batch, tiny_hf_thinker
from test_patching_common import CHAT
from torch.overrides import TorchFunctionMode

import salmonn_helpers as H
from hooked_av import HookedQwen2_5Omni, HookedVideoSALMONN2
from hooked_av.core.base import HookShapeError
from hooked_av.core.masks import neg_inf
from patching.methods.activation_patching import activation_patching
from patching.methods.logit_lens import logit_lens


@pytest.fixture(scope="module")
def omni():
    return HookedQwen2_5Omni.from_hf(tiny_hf_thinker(seed=1))


@pytest.fixture(scope="module")
def salmonn(tmp_path_factory):
    return HookedVideoSALMONN2.from_pretrained(H.Reference(seed=0).save(tmp_path_factory.mktemp("salmonn")))


def _text(seed=1):
    return batch(Builder(seed).text(6).end())


def _zero(t, hook):
    return torch.zeros_like(t)


def _no_hooks_left(model):
    return not any(hp.has_hooks() for hp in model.hook_dict.values())


# ---- hooks passed as a generator ---------------------------------------------------------------
def test_hooks_passed_as_a_generator_are_installed(omni):
    inputs = _text()
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_attn_out"]
    with torch.no_grad():
        clean = omni(**inputs)
        listed = omni.run_with_hooks(**inputs, fwd_hooks=[(n, _zero) for n in names])
        generated = omni.run_with_hooks(**inputs, fwd_hooks=((n, _zero) for n in names))
        with omni.hooks(fwd_hooks=((n, _zero) for n in names)):
            in_context = omni(**inputs)
    assert (clean - listed).abs().max() > 1e-2
    assert torch.equal(generated, listed)
    assert torch.equal(in_context, listed)
    assert _no_hooks_left(omni)


# ---- tower mask hooks fire where nothing is padded ---------------------------------------------
MEASURED: dict[str, list[float]] = {}


def _tower_cases():
    omni_audio = lambda: batch(Builder(2).audio(40).text().end())  # two whole 20-frame chunks: no padding
    omni_image = lambda: batch(Builder(4).image(8, 8).text().end())  # one geometry: full blocks unmasked
    salmonn_audio = lambda: H.batch(H.Row(2).text(4).audio(chunks=1).text(3))[0]
    salmonn_video = lambda: H.batch(H.Row(3).text(4).video(2, 4, 8).text(3))[0]
    return {  # model, inputs, mask hook, the mask shape it must see, the tower output it acts on
        "omni_audio_tower": ("omni", omni_audio, "audio_encoder.blocks.1.attn.hook_attn_mask", (2, 1, 10, 10), "hook_audio_embeds"),
        "omni_vision_full_block": ("omni", omni_image, "vision_encoder.blocks.1.attn.hook_attn_mask", (1, 1, 64, 64), "hook_image_embeds"),
        "salmonn_whisper": ("salmonn", salmonn_audio, "audio_encoder.blocks.0.attn.hook_attn_mask", (1, 1, 1500, 1500), "audio_encoder.hook_out"),
        "salmonn_qformer_cross": ("salmonn", salmonn_audio, "audio_qformer.blocks.1.cross_attn.hook_attn_mask", (60, 1, 1, 25), "hook_audio_embeds"),
        "salmonn_vision_full_block": ("salmonn", salmonn_video, "vision_encoder.blocks.1.attn.hook_attn_mask", (2, 1, 32, 32), "hook_video_embeds"),
    }


@pytest.mark.parametrize("case", list(_tower_cases()))
def test_tower_mask_hook_runs_on_a_real_mask_and_its_edit_changes_the_output(case, request):
    family, make, name, shape, out = _tower_cases()[case]
    model, inputs = request.getfixturevalue(family), make()
    seen = []

    def block_first_half_of_keys(mask, hook):
        seen.append((tuple(mask.shape), float(mask.abs().max())))
        mask[..., : mask.shape[-1] // 2] = neg_inf(mask.dtype)
        return mask

    attn_out = name.replace("cross_attn.hook_attn_mask", "hook_cross_attn_out").replace("attn.hook_attn_mask", "hook_attn_out")
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(**inputs, names_filter=[attn_out, out])
        with model.hooks(fwd_hooks=[(name, block_first_half_of_keys)]):
            _, edited = model.run_with_cache(**inputs, names_filter=[attn_out, out])
        again = model(**inputs)
    assert seen == [(shape, 0.0)]  # ran once, on the all-zero mask of "nothing masked"
    MEASURED[case] = [float((clean[n] - edited[n]).abs().max() / clean[n].abs().max()) for n in (attn_out, out)]
    assert MEASURED[case][0] > 1e-2  # that attention's output, relative
    assert MEASURED[case][1] > 5e-4  # the tower's output, relative
    assert torch.equal(clean_logits, again)


def test_qformer_self_attention_mask_hook_runs(salmonn):
    # one query per window: the mask is [windows, 1, 1, 1] and no additive edit can move a softmax over
    # one key, but the hook point must still run
    inputs = H.batch(H.Row(2).text(4).audio(chunks=1).text(3))[0]
    seen = []
    with torch.no_grad():
        salmonn.run_with_hooks(**inputs, fwd_hooks=[("audio_qformer.blocks.0.attn.hook_attn_mask",
                                                     lambda m, hook: seen.append(tuple(m.shape)))])
    assert seen == [(60, 1, 1, 1)]


# ---- in-place edits never reach the caller's inputs_embeds --------------------------------------
def _zero_in_place(t, hook):
    t[:, 1:4] = 0  # returns None: an in-place edit


@pytest.mark.parametrize("name", ["hook_embed", "blocks.0.hook_resid_pre"])
def test_in_place_edit_from_encode_outputs_leaves_them_clean(omni, name):
    enc = omni.encode(**batch(Builder(6).video(2, 4, 8, spg=0.5).text(2).audio(30).end()))
    before = enc["inputs_embeds"].clone()
    with torch.no_grad():
        clean = omni(**enc)
        edited = omni.run_with_hooks(**enc, fwd_hooks=[(name, _zero_in_place)])
        again = omni(**enc)
        gen = omni.generate(inputs_embeds=enc["inputs_embeds"], position_ids=enc["position_ids"],
                            attention_mask=enc["attention_mask"], rope_deltas=enc["rope_deltas"], max_new_tokens=1)
        with omni.hooks(fwd_hooks=[(name, _zero_in_place)]):
            omni.generate(inputs_embeds=enc["inputs_embeds"], position_ids=enc["position_ids"],
                          attention_mask=enc["attention_mask"], rope_deltas=enc["rope_deltas"], max_new_tokens=2)
    assert (clean - edited).abs().max() > 1e-2  # the edit acted on the run it was in
    assert torch.equal(enc["inputs_embeds"], before)
    assert torch.equal(clean, again)
    assert torch.equal(gen[:, 0], clean[:, -1].argmax(-1))
    assert torch.equal(enc["inputs_embeds"], before)


class _CountClones(TorchFunctionMode):
    def __init__(self, of: torch.Tensor):
        super().__init__()
        self.of, self.n = of, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.clone and args and args[0] is self.of:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_the_callers_embeddings_are_copied_once_and_only_when_hooked(omni):
    enc = omni.encode(**_text(3))
    with torch.no_grad():
        with _CountClones(enc["inputs_embeds"]) as plain:
            omni(**enc)
        with _CountClones(enc["inputs_embeds"]) as hooked:
            omni.run_with_hooks(**enc, fwd_hooks=[("hook_embed", _zero_in_place), ("blocks.0.hook_resid_pre", _zero_in_place)])
    assert (plain.n, hooked.n) == (0, 1)


# ---- names checked before any work ------------------------------------------------------------
class _CountForwards:
    def __init__(self, model):
        self.n = 0
        self.handle = model.embed.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize("names_filter", [["blocks.0.hook_resid_pots"], "blocks.0.hook_resid_pots",
                                          ["blocks.0.hook_resid_pre", "blocks.9.hook_resid_pre"]])
def test_run_with_cache_with_a_misspelt_name_fails_before_any_work(omni, names_filter):
    calls = _CountForwards(omni)
    try:
        with pytest.raises(KeyError, match=r"does not exist; (did you mean \['blocks\.0\.hook_resid_post'|the language model has 3 blocks)"):
            omni.run_with_cache(**_text(), names_filter=names_filter)
    finally:
        calls.handle.remove()
    assert calls.n == 0
    assert _no_hooks_left(omni)


def test_filter_function_that_matches_no_hook_is_an_error_everywhere(omni):
    inputs, nothing = _text(), (lambda name: name.endswith("hook_patern"))
    calls = _CountForwards(omni)
    try:
        with pytest.raises(KeyError, match="matches no hook point"):
            omni.run_with_cache(**inputs, names_filter=nothing)
        with pytest.raises(KeyError, match="matches no hook point"):
            omni.run_with_hooks(**inputs, fwd_hooks=[(nothing, _zero)])
        with pytest.raises(KeyError, match="matches no hook point"):
            omni.add_hook(nothing, _zero)
    finally:
        calls.handle.remove()
    assert calls.n == 0
    assert _no_hooks_left(omni)
    with torch.no_grad():  # a filter that matches is still fine
        _, cache = omni.run_with_cache(**inputs, names_filter=lambda name: name.endswith("hook_pattern") and name.startswith("blocks"))
    assert sorted(cache.keys()) == [f"blocks.{l}.attn.hook_pattern" for l in range(3)]


def test_unknown_sites_are_refused_before_any_work(omni):
    inputs = batch(Builder(6).video(2, 4, 8, spg=0.5).text(2).audio(30).end())
    tm = omni.token_map(inputs, chat=CHAT)
    calls = _CountForwards(omni)
    try:
        with pytest.raises(ValueError, match=r"site 'resid_pr' is neither a site name .* did you mean \['resid_pre'"):
            activation_patching(omni, inputs, inputs, sites=("resid_pr",), tm_clean=tm, tm_corrupted=tm, progress=False)
        with pytest.raises(KeyError, match=r"'blocks\.3\.hook_resid_pre' does not exist; the language model has 3 blocks"):
            activation_patching(omni, inputs, inputs, sites=("blocks.3.hook_resid_pre",), tm_clean=tm, tm_corrupted=tm, progress=False)
        with pytest.raises(ValueError, match=r"site 'resid_pots' is neither a site name .* did you mean \['resid_post'"):
            logit_lens(omni, inputs, site="resid_pots", tm=tm)
    finally:
        calls.handle.remove()
    assert calls.n == 0


# ---- a hook returns the dtype and device it received --------------------------------------------
@pytest.mark.parametrize("name, fn, what", [
    ("blocks.0.attn.hook_attn_mask", lambda m, hook: m == 0, "dtype torch.bool"),
    ("blocks.1.hook_resid_pre", lambda t, hook: t.long(), "dtype torch.int64"),
    ("blocks.1.hook_resid_pre", lambda t, hook: t.to("meta"), "device meta"),
])
def test_hook_returning_another_dtype_or_device_is_a_clear_error(omni, name, fn, what):
    with pytest.raises(HookShapeError, match=rf"returned {what}.*must return the dtype and device it received, torch\.float32 on cpu"):
        omni.run_with_hooks(**_text(), fwd_hooks=[(name, fn)])
    assert _no_hooks_left(omni)


# ---- the cache knows which activations are batch-major ----------------------------------------
def test_batch_slice_of_the_cache_leaves_tower_activations_whole(omni):
    # row 1's audio is two chunks: the audio tower's leading size (2) equals the batch size (2)
    inputs = batch(Builder(9).image(4, 4).text(5).end(), Builder(10).audio(40).text(1).end())
    with torch.no_grad():
        _, cache = omni.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_resid_pre"))
    tower, lm = "audio_encoder.blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre"
    assert cache[tower].shape[0] == cache[lm].shape[0] == 2
    one = cache.apply_slice_to_batch_dim(1)
    assert torch.equal(one[lm], cache[lm][1])
    assert torch.equal(one[tower], cache[tower])  # every chunk of the batch, not chunk 1
    first = cache.apply_slice_to_batch_dim([0])
    assert torch.equal(first[lm], cache[lm][:1]) and torch.equal(first[tower], cache[tower])


def test_remove_batch_dim_leaves_a_single_chunk_tower_activation_whole(omni):
    inputs = batch(Builder(2).audio(20).text().end())  # one chunk: the tower's leading size is 1
    with torch.no_grad():
        _, cache = omni.run_with_cache(**inputs, names_filter=lambda n: n.endswith("blocks.0.hook_resid_pre"),
                                       remove_batch_dim=True)
    assert cache.has_batch_dim is False
    assert cache["blocks.0.hook_resid_pre"].dim() == 2
    assert cache["audio_encoder.blocks.0.hook_resid_pre"].shape == (1, 10, 32)


def test_a_batch_with_images_and_videos_caches_every_frame_of_the_vision_tower_once(omni):
    """One tower call per forward: with images and videos in one batch the cache holds the image's
    frame and the video's two (two calls kept only the last call's frames)."""
    from omni_helpers import geometries

    inputs, flag = geometries()["padded_batch"]  # row 0 an image (1 frame), row 1 a video (2 frames)
    calls = []
    omni.add_hook("vision_encoder.hook_patch_embed", lambda t, hook: calls.append(t.shape[0]))
    try:
        _, cache = omni.run_with_cache(**inputs, use_audio_in_video=flag, names_filter=["vision_encoder.hook_patch_embed"])
    finally:
        omni.reset_hooks()
    assert calls == [3] and cache["vision_encoder.hook_patch_embed"].shape[0] == 3
