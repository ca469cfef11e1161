"""Audio and vision towers, each usable by any family (they import `hooked_av.core` only):

- `omni_audio`: the Qwen2.5-Omni audio tower (2 s chunks, pairs pooled; `audio_token_count`,
  25 tokens a second).
- `whisper` + `qformer`: video-SALMONN 2+'s Whisper encoder (30 s chunks) and its window Q-Former
  (2 tokens a second).
- `qwen_vision`: the Qwen2.5-VL vision tower (window blocks as one batch row per (frame, window),
  full-attention blocks per frame), with the pieces a second Qwen tower reuses (`PatchEmbed`, `Merger`,
  `merge_block_coords`, `run_images_and_videos`).
- `qwen3_omni_audio`: the Qwen3-Omni audio encoder (Conv2d on 1 s chunks, 8 s attention windows, no
  pooling; `audio_token_count`, 13 tokens per 1 s chunk at `n_window` 50), with its checkpoint key table.
- `qwen3_vl_vision`: the Qwen3-VL vision tower of Qwen3-Omni (learned positions resampled, LayerNorm
  blocks per frame, DeepStack mergers), with its checkpoint key table.

Each tower owns its frames -> tokens arithmetic; a family's `layout.py` calls it rather than copying it.
"""
