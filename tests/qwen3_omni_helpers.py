"""Tiny random Qwen3-Omni Thinkers (HF `qwen3_omni_moe`) and hand-built token layouts.

Token ids are deliberately not the real ones (a 128-word vocabulary): the model must read them from the
configuration. 4 experts with top-2, 3 layers (layer 1 dense), DeepStack taps at vision blocks 0 and 1,
13 temporal ids per second as in the released checkpoints, audio chunks of 1 s and attention windows of 2 s.
"""

from __future__ import annotations

import torch

from hooked_av.families.qwen3_omni.layout import audio_token_count

AUDIO, IMAGE, VIDEO = 100, 101, 102
AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = 103, 104, 105, 106
IM_START, IM_END, USER = 110, 111, 112
PER_SECOND = 13
MERGE = 2
N_WINDOW = 50  # HF's position ids count 13 tokens per full chunk, which holds at 50 only


def tiny_text_dict(**over) -> dict:
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16, mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                               "mrope_interleaved": True})
    kw.update(over)
    return kw


def tiny_thinker_config(**text_over):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=tiny_text_dict(**text_over),
        audio_config=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=32, n_window=N_WINDOW, n_window_infer=200,
                          downsample_hidden_size=8, max_source_positions=200),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=MERGE, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        audio_token_id=AUDIO, image_token_id=IMAGE, video_token_id=VIDEO, audio_start_token_id=AUDIO_BOS,
        user_token_id=USER, position_id_per_seconds=PER_SECOND,
    )
    cfg.vision_start_token_id = VISION_BOS  # read by get_rope_index but not a declared Thinker field
    cfg.vision_end_token_id = VISION_EOS
    cfg.audio_end_token_id = AUDIO_EOS
    return cfg


def tiny_hf(seed: int = 0):
    """HF's `Qwen3OmniMoeThinkerForConditionalGeneration` of `tiny_thinker_config` (eager attention) with
    weights drawn so that routing is decisive and every weight matters."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_thinker_config()
    cfg._attn_implementation = "eager"
    hf = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return hf


def hf_rope_index(tc, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                  use_audio_in_video=False, audio_frames=None, second_per_grid=None):
    """HF's own `get_rope_index` (the oracle), called without building a model."""
    from types import SimpleNamespace

    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    cls = Qwen3OmniMoeThinkerForConditionalGeneration
    owner = SimpleNamespace(spatial_merge_size=tc.vision_config.spatial_merge_size, config=tc)
    owner.get_llm_pos_ids_for_vision = lambda *a: cls.get_llm_pos_ids_for_vision(owner, *a)
    return cls.get_rope_index(
        owner, input_ids, image_grid_thw, video_grid_thw, attention_mask, use_audio_in_video, audio_frames,
        second_per_grid)


# ---- token layouts ------------------------------------------------------------------------------------------
def text(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 99, (n,), generator=g).tolist()


def audio_block(n_tokens: int) -> list[int]:
    return [AUDIO_BOS] + [AUDIO] * n_tokens + [AUDIO_EOS]


def vision_block(token: int, grid) -> list[int]:
    t, h, w = grid
    return [VISION_BOS] + [token] * (t * (h // MERGE) * (w // MERGE)) + [VISION_EOS]


def av_block(grid, second_per_grid: float, n_audio: int) -> list[int]:
    from hooked_av.families.qwen3_omni.layout import processor_av_order

    order = processor_av_order(grid, second_per_grid, n_audio, MERGE, PER_SECOND)
    return [VISION_BOS, AUDIO_BOS] + [VIDEO if k == "video" else AUDIO for k in order] + [AUDIO_EOS, VISION_EOS]


def batch(rows: list[list[int]]):
    """Left-padded `input_ids`, `attention_mask` (pad id 0)."""
    n = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---- geometries -----------------------------------------------------------------------------------------
def geometry(name: str):
    """(input_ids, attention_mask, kwargs for both functions: image/video grids, audio frames, spg, av)."""
    img, vid, vid2 = [1, 4, 6], [3, 4, 4], [2, 2, 4]
    fa, fb = 123, 47  # mel frames of two clips (a full chunk, and tails, exercise the conv arithmetic)
    na, nb = (int(audio_token_count(torch.tensor(f), N_WINDOW)) for f in (fa, fb))
    if name == "text":
        ids, mask = batch([text(9)])
        return ids, mask, {}
    if name == "text_padded":
        ids, mask = batch([text(9), text(5, 1)])
        return ids, mask, {}
    if name == "audio":
        ids, mask = batch([text(3) + audio_block(na) + text(4, 1)])
        return ids, mask, dict(audio=[fa])
    if name == "image":
        ids, mask = batch([text(3) + vision_block(IMAGE, img) + text(4, 1)])
        return ids, mask, dict(image=[img])
    if name == "video":  # 2/3 s per grid step: fractional temporal ids
        ids, mask = batch([text(3) + vision_block(VIDEO, vid) + text(4, 1)])
        return ids, mask, dict(video=[vid], spg=[2 / 3])
    if name == "audio_in_video":
        ids, mask = batch([text(3) + av_block(vid, 1.0, na) + text(4, 1)])
        return ids, mask, dict(video=[vid], spg=[1.0], audio=[fa], av=True)
    if name == "two_clips":  # two audio-in-video clips, the second with fractional ids, then an image and audio
        row = (text(2) + av_block(vid, 1.0, na) + text(2, 1) + av_block(vid2, 0.5, nb) + text(1, 2)
               + vision_block(IMAGE, img) + audio_block(nb) + text(3, 3))
        ids, mask = batch([row])
        return ids, mask, dict(video=[vid, vid2], spg=[1.0, 0.5], audio=[fa, fb, fb], image=[img], av=True)
    if name == "left_padded":  # rows of different media, left padded; media consumed in batch order
        r0 = text(2) + vision_block(VIDEO, vid) + text(3, 1) + audio_block(na) + text(2, 2)
        r1 = text(4, 3) + vision_block(IMAGE, img) + text(2, 4)
        ids, mask = batch([r0, r1])
        return ids, mask, dict(video=[vid], spg=[2 / 3], audio=[fa], image=[img])
    raise KeyError(name)


GEOMETRIES = ["text", "text_padded", "audio", "image", "video", "audio_in_video", "two_clips", "left_padded"]


def model_inputs(name: str, n_mels: int = 16, patch_dim: int = 3 * 2 * 16 * 16, seed: int = 0) -> tuple[dict, bool | None]:
    """Full model inputs of a geometry (random mel features and pixels) and its use_audio_in_video."""
    g = torch.Generator().manual_seed(seed)
    ids, mask, kw = geometry(name)
    out = {"input_ids": ids, "attention_mask": mask}
    if "audio" in kw:
        frames = kw["audio"]
        out["input_features"] = torch.randn(len(frames), n_mels, max(frames), generator=g)
        out["feature_attention_mask"] = (torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]).long()
    for kind, pv in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if kind in kw:
            grid = torch.tensor(kw[kind])
            out[f"{kind}_grid_thw"] = grid
            out[pv] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
    if "spg" in kw:
        out["video_second_per_grid"] = torch.tensor(kw["spg"])
    return out, kw.get("av")


# ---- an offline tokenizer and a Qwen3-style chat template over the tiny ids ----------------------------------
# Qwen3's ChatML: no system message unless one is given, media as <|vision_start|><|image_pad|><|vision_end|>,
# <|vision_start|><|video_pad|><|vision_end|>, <|audio_start|><|audio_pad|><|audio_end|>, text as written
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAD = 120
SPECIALS = {"<|audio_pad|>": AUDIO, "<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO, "<|audio_start|>": AUDIO_BOS,
            "<|audio_end|>": AUDIO_EOS, "<|vision_start|>": VISION_BOS, "<|vision_end|>": VISION_EOS,
            "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|endoftext|>": PAD}


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny config's ids, naming its multimodal tokens as
    `Qwen3OmniMoeProcessor` reads them (tests/media_helpers.py's words)."""
    from media_helpers import WORDS
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"user": USER} | SPECIALS
    vocab |= {f"<unused{i}>": i for i in range(128) if i not in set(vocab.values())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    names = dict(image_token="<|image_pad|>", audio_token="<|audio_pad|>", video_token="<|video_pad|>",
                 vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
                 audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   extra_special_tokens=names)
