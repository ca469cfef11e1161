"""HookedQwen2_5Omni against HF's Qwen2_5OmniThinkerForConditionalGeneration on every input geometry."""

import pytest
import torch
from omni_helpers import geometries, tiny_hf_thinker

from hooked_av import HookedQwen2_5Omni

GEOMETRIES = geometries()


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_thinker(seed=0)
    return hf, HookedQwen2_5Omni.from_hf(hf)


def _hf_run(hf, inputs, av, **kw):
    with torch.no_grad():
        return hf(**inputs, use_audio_in_video=av, **kw)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_logits_match_hf_fp32(pair, name):
    hf, ours = pair
    inputs, av = GEOMETRIES[name]
    ref = _hf_run(hf, inputs, av).logits
    with torch.no_grad():
        out = ours(**inputs, use_audio_in_video=av)
    real = inputs["attention_mask"].bool()  # padding rows are garbage in both models
    assert out.shape == ref.shape
    assert (out[real] - ref[real]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_position_ids_match_hf_get_rope_index(pair, name):
    hf, ours = pair
    inputs, av = GEOMETRIES[name]
    fam = inputs.get("feature_attention_mask")
    ref, ref_deltas = hf.model.get_rope_index(
        inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), inputs["attention_mask"],
        av, None if fam is None else fam.sum(1), inputs.get("video_second_per_grid"),
    )
    pos, deltas = ours.position_ids(
        inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
        None if fam is None else fam.sum(1), inputs.get("video_second_per_grid"), av,
    )
    assert torch.equal(pos, ref)
    if "image_grid_thw" in inputs or "video_grid_thw" in inputs:  # HF's 1D branch has other deltas
        assert torch.equal(deltas.view(-1), ref_deltas.view(-1))


def test_audio_in_video_eos_quirk_positions_go_backwards(pair):
    """HF puts the closing tokens at (max of the last appended chunk) + 1; with a wide video and
    short audio that is below the video block's largest id, so text positions restart lower."""
    _, ours = pair
    inputs, av = GEOMETRIES["audio_in_video_eos_quirk"]
    fam = inputs["feature_attention_mask"]
    pos, _ = ours.position_ids(inputs["input_ids"], inputs["attention_mask"], None, inputs["video_grid_thw"], fam.sum(1), inputs["video_second_per_grid"], av)
    ids = inputs["input_ids"][0]
    block = (ids == ours.ids.video) | (ids == ours.ids.audio)
    eos = (ids == ours.ids.audio_end).nonzero().item()
    assert pos[:, 0, block].max().item() == pos[0, 0, eos].item() + 9  # video width ids reach 19, audio 9
    assert pos[0, 0, eos].item() == pos[0, 0, eos + 1].item()  # audio_eos and vision_eos share an id


def test_residuals_and_patterns_equal_hf_outputs(pair):
    hf, ours = pair
    inputs, av = GEOMETRIES["audio_and_video_blocks"]
    ref = _hf_run(hf, inputs, av, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        logits, cache = ours.run_with_cache(**inputs, use_audio_in_video=av)
    n = ours.cfg.n_layers
    assert len(ref.hidden_states) == n + 1
    assert (cache["hook_embed"] - ref.hidden_states[0]).abs().max() < 1e-6
    for layer in range(n - 1):
        assert (cache[f"blocks.{layer}.hook_resid_post"] - ref.hidden_states[layer + 1]).abs().max() < 1e-5
    # HF's last hidden state is after the final norm
    assert (cache["ln_final.hook_normalized"] - ref.hidden_states[n]).abs().max() < 1e-5
    for layer in range(n):
        assert (cache[f"blocks.{layer}.attn.hook_pattern"] - ref.attentions[layer]).abs().max() < 1e-6


def test_tower_outputs_equal_hf_towers(pair):
    hf, ours = pair
    inputs, _ = GEOMETRIES["audio_and_video_blocks"]
    img_inputs, _ = GEOMETRIES["two_images"]
    with torch.no_grad():
        _, cache = ours.run_with_cache(**inputs, names_filter=lambda n: n.startswith("hook_") and n.endswith("embeds"))
        _, cache_img = ours.run_with_cache(**img_inputs, names_filter="hook_image_embeds")
        ref_audio = hf.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"]).last_hidden_state
        ref_video = torch.cat(hf.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output)
        ref_image = torch.cat(hf.get_image_features(img_inputs["pixel_values"], img_inputs["image_grid_thw"]).pooler_output)
    assert cache["hook_audio_embeds"].shape == ref_audio.shape
    assert (cache["hook_audio_embeds"] - ref_audio).abs().max() < 1e-5
    assert (cache["hook_video_embeds"] - ref_video).abs().max() < 1e-5
    assert (cache_img["hook_image_embeds"] - ref_image).abs().max() < 1e-5


def test_encode_then_forward_from_embeddings_equals_forward(pair):
    _, ours = pair
    inputs, av = GEOMETRIES["padded_batch"]
    with torch.no_grad():
        direct = ours(**inputs, use_audio_in_video=av)
        enc = ours.encode(**inputs, use_audio_in_video=av)
        again = ours(**enc)
    assert enc["position_ids"].shape == (3, *inputs["input_ids"].shape)
    assert torch.equal(direct, again)


def test_bf16_within_hfs_own_bf16_gap(pair):
    hf, ours = pair
    inputs, av = GEOMETRIES["audio_and_video_blocks"]
    ref32 = _hf_run(hf, inputs, av).logits
    hf16 = tiny_hf_thinker(seed=0).to(torch.bfloat16)
    ref16 = _hf_run(hf16, inputs, av).logits.float()
    ours16 = HookedQwen2_5Omni.from_hf(hf, dtype=torch.bfloat16)
    with torch.no_grad():
        out16 = ours16(**inputs, use_audio_in_video=av).float()
    hf_gap = (ref16 - ref32).abs().max().item()
    our_gap = (out16 - ref32).abs().max().item()
    assert hf_gap > 0
    assert our_gap <= 1.5 * hf_gap


def test_text_only_and_media_models_share_one_decoder(pair):
    """Media change the output: zeroing the audio tower's output changes the last logits."""
    _, ours = pair
    inputs, av = GEOMETRIES["audio_only"]
    with torch.no_grad():
        clean = ours(**inputs)
        zeroed = ours.run_with_hooks(**inputs, fwd_hooks=[("hook_audio_embeds", lambda t, hook: torch.zeros_like(t))])
    assert (clean[0, -1] - zeroed[0, -1]).abs().max() > 1e-3
