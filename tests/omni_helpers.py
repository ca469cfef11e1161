"""Tiny random Qwen2.5-Omni Thinkers and hand-built inputs for every input geometry.

Token ids are deliberately not the real ones (a 320-word vocabulary): the model must read them from
the configuration. The audio tower uses 20-frame chunks (n_window 10) and the vision tower 56-px
windows so that chunking and several windows are exercised at tiny sizes.
"""

from __future__ import annotations

import torch

AUDIO, IMAGE, VIDEO = 250, 251, 252
AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = 253, 254, 255, 256
IM_START, IM_END, USER = 300, 301, 302
N_MELS = 16
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_thinker_config(**text_overrides):
    from transformers import Qwen2_5OmniThinkerConfig

    text = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
    )
    text.update(text_overrides)
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=text,
        audio_config=dict(
            num_mel_bins=N_MELS, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
            n_window=10, output_dim=64, max_source_positions=1500,
        ),
        vision_config=dict(
            depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1], in_channels=3,
        ),
        audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO,
        audio_start_token_id=AUDIO_BOS, audio_end_token_id=AUDIO_EOS, user_token_id=USER,
        position_id_per_seconds=25, seconds_per_chunk=2,
    )
    cfg.vision_start_token_id = VISION_BOS  # read by get_rope_index but not a declared field
    cfg.vision_end_token_id = VISION_EOS
    return cfg


def tiny_hf_thinker(seed: int = 0, **text_overrides):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_thinker_config(**text_overrides)
    cfg._attn_implementation = "eager"
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init leaves some weights at 0/1; make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0, 0.05)
    return model


def audio_tokens(frames: int) -> int:
    from hooked_av.families.qwen2_5_omni.layout import audio_token_counts

    return audio_token_counts([frames])[0]


def _text(rng, n):
    return torch.randint(0, 200, (n,), generator=rng).tolist()


class Builder:
    """Builds one prompt row and its media, in the processor's token layout."""

    def __init__(self, seed: int = 0):
        self.rng = torch.Generator().manual_seed(seed)
        self.ids: list[int] = [IM_START, USER] + _text(self.rng, 3)
        self.features: list[torch.Tensor] = []
        self.images: list[tuple[torch.Tensor, tuple[int, int, int]]] = []
        self.videos: list[tuple[torch.Tensor, tuple[int, int, int], float]] = []

    def text(self, n: int = 4):
        self.ids += _text(self.rng, n)
        return self

    def audio(self, frames: int):
        self.features.append(torch.randn(N_MELS, frames, generator=self.rng))
        self.ids += [AUDIO_BOS] + [AUDIO] * audio_tokens(frames) + [AUDIO_EOS]
        return self

    def _pixels(self, t, h, w):
        return torch.randn(t * h * w, PATCH_DIM, generator=self.rng)

    def image(self, h: int, w: int):
        self.images.append((self._pixels(1, h, w), (1, h, w)))
        self.ids += [VISION_BOS] + [IMAGE] * (h * w // 4) + [VISION_EOS]
        return self

    def video(self, t: int, h: int, w: int, spg: float = 1.0):
        self.videos.append((self._pixels(t, h, w), (t, h, w), spg))
        self.ids += [VISION_BOS] + [VIDEO] * (t * h * w // 4) + [VISION_EOS]
        return self

    def audio_in_video(self, t: int, h: int, w: int, frames: int, spg: float = 1.0):
        """`<vision_bos><audio_bos>` then video/audio chunks of 2 s (50 temporal ids) interleaved."""
        from hooked_av.families.qwen2_5_omni.layout import av_chunk_runs, video_temporal_ids

        self.videos.append((self._pixels(t, h, w), (t, h, w), spg))
        self.features.append(torch.randn(N_MELS, frames, generator=self.rng))
        per_frame = h * w // 4
        t_ids = video_temporal_ids(t, spg, 25).repeat_interleave(per_frame)
        body = []
        for kind, _, begin, end in av_chunk_runs(t_ids, audio_tokens(frames), 50):
            body += [VIDEO if kind == "video" else AUDIO] * (end - begin)
        self.ids += [VISION_BOS, AUDIO_BOS] + body + [AUDIO_EOS, VISION_EOS]
        return self

    def end(self, n: int = 3):
        self.ids += _text(self.rng, n) + [IM_END]
        return self


def batch(*rows: Builder, pad_id: int = 0) -> dict:
    """Processor-style inputs for the rows, left-padded."""
    n = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r.ids) :] = torch.tensor(r.ids)
        mask[i, n - len(r.ids) :] = 1
    out: dict = {"input_ids": ids, "attention_mask": mask}
    feats = [f for r in rows for f in r.features]
    if feats:
        longest = max(f.shape[1] for f in feats)
        padded = torch.zeros(len(feats), N_MELS, longest + 7)  # extra padding, as the processor pads to 30 s
        fmask = torch.zeros(len(feats), longest + 7, dtype=torch.long)
        for i, f in enumerate(feats):
            padded[i, :, : f.shape[1]] = f
            fmask[i, : f.shape[1]] = 1
        out["input_features"], out["feature_attention_mask"] = padded, fmask
    images = [im for r in rows for im in r.images]
    if images:
        out["pixel_values"] = torch.cat([p for p, _ in images])
        out["image_grid_thw"] = torch.tensor([g for _, g in images])
    videos = [v for r in rows for v in r.videos]
    if videos:
        out["pixel_values_videos"] = torch.cat([p for p, _, _ in videos])
        out["video_grid_thw"] = torch.tensor([g for _, g, _ in videos])
        out["video_second_per_grid"] = torch.tensor([s for _, _, s in videos])
    return out


def geometries() -> dict[str, tuple[dict, bool]]:
    """name -> (inputs, use_audio_in_video) covering every input geometry."""
    B = Builder
    return {
        "text_only": (batch(B(1).text(6).end()), False),
        "audio_only": (batch(B(2).audio(45).text().end()), False),  # 3 chunks of 20 frames, last short
        "video_only": (batch(B(3).video(2, 8, 12, spg=1.0).text().end()), False),
        "image_only": (batch(B(4).image(8, 8).text().end()), False),
        "two_images": (batch(B(5).image(4, 6).text(2).image(8, 4).end()), False),
        "audio_and_video_blocks": (batch(B(6).video(2, 4, 8, spg=0.5).text(2).audio(30).end()), False),
        "audio_in_video": (batch(B(7).audio_in_video(3, 4, 4, frames=500, spg=1.0).text().end()), True),
        # wide video, short audio: the closing ids come from the last (audio) chunk, below the block max
        "audio_in_video_eos_quirk": (batch(B(8).audio_in_video(1, 2, 40, frames=40, spg=1.0).text().end()), True),
        "padded_batch": (batch(B(9).image(4, 4).text(5).end(), B(10).audio(40).text(1).video(2, 4, 4, spg=2.0).end()), False),
    }
