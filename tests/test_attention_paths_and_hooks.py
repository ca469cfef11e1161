"""The fast/exact attention rule, edits before the softmax, and hook hygiene."""

import pytest
import torch
from omni_helpers import geometries, tiny_hf_thinker

from hooked_av import HookedQwen2_5Omni
from hooked_av.core.base import HookShapeError
from hooked_av.core.masks import neg_inf

GEOMETRIES = geometries()


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_thinker(seed=1)
    return hf, HookedQwen2_5Omni.from_hf(hf)


def _paths(model):
    return [b.attn.last_path for b in model.blocks]


def test_fast_and_exact_paths_give_the_same_logits(pair):
    _, model = pair
    inputs, av = GEOMETRIES["padded_batch"]
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        fast = model(**inputs)
        assert _paths(model) == ["fast"] * model.cfg.n_layers
        every = [(f"blocks.{i}.attn.hook_pattern", lambda t, hook: None) for i in range(model.cfg.n_layers)]
        exact = model.run_with_hooks(**inputs, fwd_hooks=every)
        assert _paths(model) == ["exact"] * model.cfg.n_layers
    assert (fast[real] - exact[real]).abs().max() < 1e-5


def test_hooking_one_pattern_makes_only_that_layer_exact(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["image_only"]
    with torch.no_grad():
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: None)])
    assert _paths(model) == ["fast", "exact", "fast"]
    assert [b.attn.last_path for b in model.vision_encoder.blocks] == ["fast"] * len(model.vision_encoder.blocks)


def test_mask_edit_changes_the_output_on_the_fast_path(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["audio_only"]

    def cut_last_from_all(mask, hook):
        mask[:, :, -1, :-1] = neg_inf(mask.dtype)
        return mask

    with torch.no_grad():
        clean = model(**inputs)
        cut = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.attn.hook_attn_mask", cut_last_from_all)])
        assert _paths(model) == ["fast"] * model.cfg.n_layers
        again = model(**inputs)
    assert (clean[0, -1] - cut[0, -1]).abs().max() > 1e-3
    assert torch.equal(clean[0, :-1], cut[0, :-1])  # only the edited query changed
    assert torch.equal(clean, again)  # in-place edits in a hook did not leak into later runs


def test_blocking_one_query_from_one_key_equals_hf_with_a_4d_mask(pair):
    hf, model = pair
    inputs, av = GEOMETRIES["audio_and_video_blocks"]
    ids = inputs["input_ids"]
    q, k = ids.shape[1] - 1, int((ids[0] == model.ids.video).nonzero()[0])
    s = ids.shape[1]
    mask4d = torch.zeros(1, 1, s, s)
    mask4d.masked_fill_(torch.ones(s, s, dtype=torch.bool).triu(1), neg_inf(torch.float32))
    mask4d[0, 0, q, k] = neg_inf(torch.float32)
    enc_pos = model.encode(**inputs)["position_ids"]

    def block(mask, hook):
        mask[:, :, q, k] = neg_inf(mask.dtype)
        return mask

    with torch.no_grad():
        ref = hf(**{**inputs, "attention_mask": mask4d}, position_ids=enc_pos).logits
        ours = model.run_with_hooks(**inputs, fwd_hooks=[(f"blocks.{i}.attn.hook_attn_mask", block) for i in range(model.cfg.n_layers)])
        clean = model(**inputs)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours[0, -1] - clean[0, -1]).abs().max() > 1e-4


def test_pattern_edit_takes_effect(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["text_only"]

    def attend_to_self(pattern, hook):
        return torch.eye(pattern.shape[-1]).expand_as(pattern).clone()

    with torch.no_grad():
        clean = model(**inputs)
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", attend_to_self)]):
            edited, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("blocks.0.attn.hook_"))
    assert (clean - edited).abs().max() > 1e-4
    # independent check: attending only to yourself makes z equal to v at every position
    v = cache["blocks.0.attn.hook_v"].repeat_interleave(model.cfg.n_heads // model.cfg.n_key_value_heads, dim=2)
    assert (cache["blocks.0.attn.hook_z"] - v).abs().max() < 1e-6


def test_unknown_hook_name_is_a_clear_error_and_adds_nothing(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["text_only"]
    good = ("blocks.0.hook_resid_post", lambda t, hook: t * 0)
    with pytest.raises(KeyError, match=r"blocks\.40\.attn\.hook_pattern' does not exist; the language model has 3 blocks \(0\.\.2\)"):
        model.run_with_hooks(**inputs, fwd_hooks=[good, ("blocks.40.attn.hook_pattern", lambda t, hook: None)])
    with pytest.raises(KeyError, match="did you mean"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_pots", lambda t, hook: None)])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_hook_returning_a_wrong_shape_is_a_clear_error_and_hooks_do_not_leak(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["text_only"]
    with pytest.raises(HookShapeError, match=r"returned shape \(1, 3\).*must return the shape it received"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, hook: t[:, :3, 0])])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())
    with torch.no_grad():
        clean = model(**inputs)
        again = model(**inputs)
    assert torch.equal(clean, again)


def test_placeholder_count_mismatch_is_caught_before_the_towers_run(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["audio_only"]
    bad = dict(inputs)
    bad["input_ids"] = inputs["input_ids"].clone()
    bad["input_ids"][0, (inputs["input_ids"][0] == model.ids.audio).nonzero()[0]] = 5
    calls = []
    model.audio_encoder.hook_out.add_hook(lambda t, hook: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"the prompt has \d+ <\|AUDIO\|> tokens but the audio input makes \d+"):
            model(**bad)
    finally:
        model.reset_hooks()
    assert calls == []
    with pytest.raises(TypeError, match="unexpected argument"):
        model(**inputs, pixel_value=torch.zeros(1))


def test_generate_with_kv_cache_equals_full_recompute(pair):
    _, model = pair
    inputs, _ = GEOMETRIES["padded_batch"]
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=4)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        enc = model.encode(**inputs)
        embeds, pos = enc["inputs_embeds"], enc["position_ids"]
        for step in range(4):
            logits = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask)
            nxt = logits[:, -1].argmax(-1)
            assert torch.equal(nxt, new[:, step])
            embeds = torch.cat([embeds, model.embed(nxt[:, None])], 1)
            nxt_pos = (pos.amax(dim=2, keepdim=True).amax(dim=0, keepdim=True) + 1).expand(3, -1, 1)
            pos = torch.cat([pos, nxt_pos], 2)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)


def test_towers_run_one_row_per_frame_and_per_chunk_with_window_structure(pair):
    """Vision hooks are [frames, patches, d]; a window block's pattern is zero across 56-px windows,
    a full block's is not; audio hooks are [chunks, 20 ms frames, d] with the short last chunk's
    padding never attended to."""
    _, model = pair
    inputs, _ = GEOMETRIES["video_only"]  # grid (2, 8, 12): 2 frames of 96 patches, 2x3 windows of 4x4 patches
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("vision_encoder.blocks."))
    window, full = cache["vision_encoder.blocks.0.attn.hook_pattern"], cache["vision_encoder.blocks.1.attn.hook_pattern"]
    assert cache["vision_encoder.blocks.0.hook_resid_post"].shape == (2, 96, 32)
    assert window.shape == (12, 2, 16, 16) and full.shape == (2, 2, 96, 96)  # window blocks: a row per window
    window = model.vision_encoder.window_rows(inputs["video_grid_thw"]).to_frame_pattern(window)
    hw, win = model.vision_encoder.frame_layout(8, 12)
    assert win.unique().numel() == 6
    across = win[:, None] != win[None, :]
    assert window[..., across].abs().max() == 0
    assert full[..., across].min() > 0
    assert torch.allclose(window.sum(-1), torch.ones(2, 2, 96))

    audio, _ = GEOMETRIES["audio_only"]  # 45 mel frames: chunks of 20, 20, 5 -> 10, 10, 3 frames after the conv
    with torch.no_grad():
        _, cache = model.run_with_cache(**audio, names_filter=lambda n: n.startswith("audio_encoder.blocks.0"))
    pattern = cache["audio_encoder.blocks.0.attn.hook_pattern"]
    assert cache["audio_encoder.blocks.0.hook_resid_pre"].shape == (3, 10, 32)
    assert pattern[2, :, :, 3:].abs().max() == 0  # padding keys of the short chunk
    assert pattern[:2].min() > 0


def test_audio_in_video_layout_with_the_wrong_flag_is_a_clear_error(pair):
    _, model = pair
    inputs, av = GEOMETRIES["audio_in_video"]
    assert av
    with pytest.raises(ValueError, match="do not follow the layout for use_audio_in_video=False"):
        model(**inputs, use_audio_in_video=False)
