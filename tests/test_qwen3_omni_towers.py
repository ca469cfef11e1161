"""The Qwen3-Omni towers (`encoders.qwen3_omni_audio`, `encoders.qwen3_vl_vision`) against HF's
`Qwen3OmniMoeAudioEncoder` / `Qwen3OmniMoeVisionEncoder` (the Thinker's `audio_tower` and `visual`)
built from a tiny random `Qwen3OmniMoeThinkerConfig`, their weights copied through the key tables:
outputs, DeepStack features and per-block hidden states in fp32 within 1e-5, hook shapes, the
frames -> tokens rule, the real 30B-A3B towers' parameter counts, and clear refusals of bad input.

The tiny audio tower keeps the released `n_window` 50 (1 s chunks: HF's token rule hard-codes 13
tokens per chunk) and takes `n_window_infer` 200 (2 s = 26-token windows), so windows are exercised
with short clips; the position table is 6 x 6 so the 4- and 8-patch grids resample down and up.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from hooked_av.encoders.qwen3_omni_audio import (
    Qwen3OmniAudioEncoder, audio_settings, audio_token_count, convert_audio_key,
)
from hooked_av.encoders.qwen3_vl_vision import Qwen3VisionEncoder, convert_vision_key, vision_settings

torch.set_num_threads(1)
TOL = 1e-5
N_MELS, PATCH_DIM = 16, 3 * 2 * 16 * 16


def thinker_config(**audio):
    from transformers import Qwen3OmniMoeThinkerConfig

    a = dict(num_mel_bins=N_MELS, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
             n_window=50, n_window_infer=200, output_dim=24, downsample_hidden_size=8)
    a.update(audio)
    return Qwen3OmniMoeThinkerConfig(
        audio_config=a,
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=24,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=36,
                           deepstack_visual_indexes=[0, 2]),
        text_config=dict(vocab_size=97, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=12),
    )


def randomise(model: torch.nn.Module) -> None:
    """HF's init leaves biases at 0, norms at 1 and matrices tiny: make every weight matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0, 0.3)
            else:
                p.normal_(0, p[0].numel() ** -0.5 if "pos_embed" not in name else 1.0)


def copy_weights(ours: torch.nn.Module, hf: torch.nn.Module, convert) -> None:
    """Load HF's state dict into ours through `convert`; every key on both sides must be used."""
    state = {}
    for key, t in hf.state_dict().items():
        mapped = convert(key, t)
        assert mapped is not None, f"no row of the key table maps HF key {key!r}"
        state.update(mapped)
    ours.load_state_dict(state, strict=True)


def tower_pair(kind: str, seed: int):
    """(HF's tower, ours with its weights), fp32, eager attention in HF."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling

    hf_class, ours_class, settings, convert = {
        "audio": (hf_modeling.Qwen3OmniMoeAudioEncoder, Qwen3OmniAudioEncoder, audio_settings, convert_audio_key),
        "vision": (hf_modeling.Qwen3OmniMoeVisionEncoder, Qwen3VisionEncoder, vision_settings, convert_vision_key),
    }[kind]
    torch.manual_seed(seed)
    cfg = getattr(thinker_config(), f"{kind}_config")
    cfg._attn_implementation = "eager"
    hf = hf_class._from_config(cfg).eval()
    randomise(hf)
    ours = ours_class(**settings(cfg)).eval()
    copy_weights(ours, hf, convert)
    return hf, ours


@pytest.fixture(scope="module")
def audio_pair():
    return tower_pair("audio", 0)


@pytest.fixture(scope="module")
def vision_pair():
    return tower_pair("vision", 1)


def record_every_hook(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Hooks every HookPoint (which also puts attention on its exact path); returns name -> shape, filled by a forward."""
    seen: dict[str, tuple[int, ...]] = {}
    for name, m in model.named_modules():
        if isinstance(m, HookPoint):
            m.add_hook(lambda x, hook, name=name: seen.__setitem__(name, tuple(x.shape)))
    return seen


def all_hook_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, HookPoint) and not n.endswith("hook_result")}


def test_audio_token_count_equals_hfs_rule():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    n = torch.arange(1, 3001)
    assert torch.equal(audio_token_count(n), _get_feat_extract_output_lengths(n))
    assert [audio_token_count(k) for k in (1, 37, 99, 100, 101, 137, 800)] == [1, 5, 13, 13, 14, 18, 104]


AUDIO_CASES = {  # frames per clip: one chunk, a tail, several windows with a short last one, two clips
    "whole_chunk": [100],
    "short_clip_alone": [37],
    "not_whole_window": [437],
    "two_clips": [250, 37],
    "two_clips_short_first": [37, 530],
}


@pytest.mark.parametrize("name", AUDIO_CASES)
def test_audio_encoder_equals_hf(audio_pair, name):
    hf, ours = audio_pair
    lens = torch.tensor(AUDIO_CASES[name])
    feats = torch.randn(N_MELS, int(lens.sum()), generator=torch.Generator().manual_seed(len(name)))
    with torch.no_grad():
        ref = hf(feats, feature_lens=lens, output_hidden_states=True)
        got = ours(feats, lens)
    assert got.shape == (int(audio_token_count(lens).sum()), 24)
    assert (got - ref.last_hidden_state).abs().max() < TOL


def test_audio_hooks_fire_with_documented_shapes_and_blocks_equal_hf(audio_pair):
    hf, ours = audio_pair
    lens = torch.tensor([437, 37])  # chunks 100 x4, 37, 37; windows 26, 26, 5 and 5 tokens
    feats = torch.randn(N_MELS, 474, generator=torch.Generator().manual_seed(3))
    resid = {}
    for i, block in enumerate(ours.blocks):
        block.hook_resid_post.add_hook(lambda x, hook, i=i: resid.__setitem__(i, x))
    seen = record_every_hook(ours)
    try:
        with torch.no_grad():
            got = ours(feats, lens)
            ref = hf(feats, feature_lens=lens, output_hidden_states=True)
    finally:
        for m in ours.modules():
            if isinstance(m, HookPoint):
                m.remove_hooks()
    assert set(seen) == all_hook_names(ours)
    assert seen["hook_conv_out"] == (6, 13, 32)
    assert seen["blocks.0.hook_resid_pre"] == seen["blocks.1.mlp.hook_post"][:2] + (32,) == (4, 26, 32)
    assert seen["blocks.1.attn.hook_pattern"] == seen["blocks.1.attn.hook_attn_mask"][:1] + (4, 26, 26)
    assert seen["blocks.0.attn.hook_q"] == (4, 26, 4, 8)
    assert seen["ln_post.hook_normalized"] == (62, 32)
    assert seen["hook_out"] == (62, 24)
    assert (got - ref.last_hidden_state).abs().max() < TOL  # the exact (pattern) path
    real = torch.arange(26)[None, :] < torch.tensor([26, 26, 5, 5])[:, None]
    for i in range(2):  # windows in natural order: the real rows back to back are HF's packed states
        assert (resid[i][real] - ref.hidden_states[i + 1]).abs().max() < TOL


def test_short_chunks_are_padded_to_the_calls_longest_as_hf():
    """HF pads a short chunk to the longest chunk of the call and does not mask the padding in the
    convolutions; ours does the same, so a 37-frame clip's tokens depend on its company."""
    _, ours = tower_pair("audio", 2)
    clip, other = torch.randn(N_MELS, 37), torch.randn(N_MELS, 100)
    with torch.no_grad():
        alone = ours(clip, torch.tensor([37]))
        together = ours(torch.cat([other, clip], 1), torch.tensor([100, 37]))[13:]
    assert (alone - together).abs().max() > 1e-4


def image_and_video(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    return torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g), grid


def hf_vision(hf, pixels, grid):
    with torch.no_grad():
        out = hf(pixels, grid_thw=grid, output_hidden_states=True)
    return out.pooler_output, torch.stack(out.deepstack_features), out.hidden_states


VISION_CASES = {"image": [[1, 4, 6]], "video_2_frames": [[2, 6, 4]]}


@pytest.mark.parametrize("name", VISION_CASES)
def test_vision_tokens_and_deepstack_equal_hf(vision_pair, name):
    hf, ours = vision_pair
    pixels, grid = image_and_video(VISION_CASES[name])
    ref_tokens, ref_deep, _ = hf_vision(hf, pixels, grid)
    with torch.no_grad():
        tokens, deep = ours(pixels, grid)
    assert tokens.shape == ref_tokens.shape == (int(grid.prod(-1).sum()) // 4, 24)
    assert deep.shape == (2, *tokens.shape)
    assert (tokens - ref_tokens).abs().max() < TOL
    assert (deep - ref_deep).abs().max() < TOL


def test_image_and_video_of_other_sizes_in_one_call_equal_hfs_two_calls(vision_pair):
    hf, ours = vision_pair
    img, img_grid = image_and_video([[1, 8, 4]], seed=1)
    vid, vid_grid = image_and_video([[2, 4, 4], [1, 2, 10]], seed=2)
    ref_img, ref_vid = hf_vision(hf, img, img_grid), hf_vision(hf, vid, vid_grid)
    seen = record_every_hook(ours)  # every hook of one call, the exact attention path included
    try:
        with torch.no_grad():
            (img_tokens, img_deep), (vid_tokens, vid_deep) = ours.images_and_videos(img, img_grid, vid, vid_grid)
    finally:
        for m in ours.modules():
            if isinstance(m, HookPoint):
                m.remove_hooks()
    for got, ref in ((img_tokens, ref_img[0]), (img_deep, ref_img[1]), (vid_tokens, ref_vid[0]), (vid_deep, ref_vid[1])):
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < TOL
    assert set(seen) == all_hook_names(ours)
    frames, width, n_tokens = 4, 32, (32 + 2 * 16 + 20) // 4  # image 8x4, video 4x4 twice, 2x10
    for name in ("hook_patch_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"):
        assert seen[name] == (frames, width, 32)
    assert seen["blocks.1.attn.hook_pattern"] == seen["blocks.1.attn.hook_attn_mask"][:1] + (2, width, width)
    assert seen["blocks.1.mlp.hook_post"] == (frames, width, 48)
    assert seen["hook_deepstack.0"] == seen["hook_deepstack.1"] == seen["hook_out"] == (n_tokens, 24)
    assert seen["merger_list.0.ln_q.hook_normalized"] == (n_tokens, 128)
    assert seen["merger.ln_q.hook_normalized"] == (4 * n_tokens, 32)


def test_vision_blocks_in_natural_order_equal_hf_hidden_states(vision_pair):
    hf, ours = vision_pair
    pixels, grid = image_and_video([[2, 4, 6]], seed=4)
    _, _, ref_states = hf_vision(hf, pixels, grid)
    resid = {}
    for i, block in enumerate(ours.blocks):
        block.hook_resid_post.add_hook(lambda x, hook, i=i: resid.__setitem__(i, x))
    try:
        with torch.no_grad():
            ours(pixels, grid)
    finally:
        for block in ours.blocks:
            block.hook_resid_post.remove_hooks()
    for i in range(3):
        assert resid[i].shape == (2, 24, 32)
        assert (resid[i].reshape(-1, 32) - ref_states[i + 1]).abs().max() < TOL


def test_real_30b_a3b_tower_parameter_counts_equal_hfs():
    """Class defaults, except the output widths: the released config.json sets the towers'
    `output_dim` / `out_hidden_size` to the Thinker's hidden size 2048 (the class default is 3584)."""
    from transformers import Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoder, Qwen3OmniMoeVisionEncoder,
    )

    cfg = Qwen3OmniMoeThinkerConfig(audio_config=dict(output_dim=2048), vision_config=dict(out_hidden_size=2048))
    with torch.device("meta"):
        counts = [(sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in hf.parameters()))
                  for ours, hf in ((Qwen3OmniAudioEncoder(**audio_settings(cfg.audio_config)),
                                    Qwen3OmniMoeAudioEncoder._from_config(cfg.audio_config)),
                                   (Qwen3VisionEncoder(**vision_settings(cfg.vision_config)),
                                    Qwen3OmniMoeVisionEncoder._from_config(cfg.vision_config)))]
    (audio, hf_audio), (vision, hf_vision_count) = counts
    assert audio == hf_audio and vision == hf_vision_count
    assert audio > 600_000_000 and vision > 500_000_000  # the real towers, not tiny ones


def test_bad_inputs_are_refused_before_any_work(audio_pair, vision_pair):
    _, audio = audio_pair
    _, vision = vision_pair
    with pytest.raises(ValueError, match="feature_lens sum to 90"):
        audio(torch.randn(N_MELS, 100), torch.tensor([50, 40]))
    with pytest.raises(ValueError, match=r"mel features \[16, total_frames\]"):
        audio(torch.randn(8, 100), torch.tensor([100]))
    with pytest.raises(ValueError, match="positive frame counts"):
        audio(torch.randn(N_MELS, 100), torch.tensor([100, 0]))
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        vision(torch.randn(15, PATCH_DIM), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match=r"pixel_values must be \[24, 1536\]"):
        vision(torch.randn(20, PATCH_DIM), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="deepstack_indexes"):
        Qwen3VisionEncoder(d_model=8, n_layers=2, n_heads=2, d_mlp=8, out_dim=8, deepstack_indexes=(0, 2))
    with pytest.raises(ValueError, match="n_window_infer"):
        Qwen3OmniAudioEncoder(num_mel_bins=16, d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_window=50, n_window_infer=50)
    assert convert_audio_key("audio_bos_eos_token.weight", torch.zeros(1)) is None
    assert convert_vision_key("blocks.0.attn.qkv.weight", torch.arange(6.0)[:, None])[2][0] == "blocks.0.attn.v.weight"
