"""Speed of HookedQwen2_5Omni against HF's Thinker, measured in the same run, printed as ratios.

    .venv/bin/python benchmarks/bench_forward.py [--tokens 1500] [--repeats 3] [--device cpu]

Random weights of the real architecture at docs/peers.md's benchmark size (text hidden 512, 8 layers,
8/2 heads; towers width 256, 4 layers), one video with its audio track (use_audio_in_video) and a
question. Each row is the median of `--repeats` runs after a warm-up; the ratio is against HF sdpa.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def config(n_layers: int = 8):
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=512, intermediate_size=1536, num_hidden_layers=n_layers,
            num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        ),
        audio_config=dict(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024, output_dim=512),
        vision_config=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=512, out_hidden_size=512, fullatt_block_indexes=[3]),
    )


def inputs(tokens: int, cfg):
    """A video (grid 2 x 28 x 28 per second of video) with its audio, sized to about `tokens`."""
    from hooked_av.families.qwen2_5_omni.layout import chunk_bounds, video_temporal_ids

    seconds = max(1, tokens // (196 + 25))
    t, h, w = seconds, 28, 28
    frames = seconds * 100
    n_audio = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    tc = cfg
    v_ids = video_temporal_ids(t, 1.0, 25).repeat_interleave(h * w // 4)
    v_chunks = chunk_bounds(v_ids, 50, 0)
    a_chunks = chunk_bounds(torch.arange(n_audio), 50, 0)
    body = []
    for j in range(max(len(v_chunks), len(a_chunks))):  # video chunk j, then audio chunk j
        if j < len(v_chunks):
            body += [tc.video_token_id] * (v_chunks[j][1] - v_chunks[j][0])
        if j < len(a_chunks):
            body += [tc.audio_token_id] * (a_chunks[j][1] - a_chunks[j][0])
    ids = [151644, 872, 198, 151652, 151647] + body + [151648, 151653] + list(range(1000, 1020)) + [151645]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "input_features": torch.randn(1, 128, frames),
        "feature_attention_mask": torch.ones(1, frames, dtype=torch.long),
        "pixel_values_videos": torch.randn(t * h * w, 1176),
        "video_grid_thw": torch.tensor([[t, h, w]]),
        "video_second_per_grid": torch.tensor([1.0]),
    }


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from hooked_av import HookedQwen2_5Omni

    torch.manual_seed(0)
    cfg = config(args.layers)
    cfg.vision_start_token_id, cfg.vision_end_token_id = 151652, 151653
    hf = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval().to(args.device)
    ours = HookedQwen2_5Omni.from_hf(hf, device=args.device)
    x = {k: v.to(args.device) for k, v in inputs(args.tokens, cfg).items()}
    n = x["input_ids"].shape[1]
    resid = [f"blocks.{l}.hook_resid_post" for l in range(args.layers)]

    rows = {}
    with torch.no_grad():
        rows["HF sdpa forward"] = timed(lambda: hf(**x, use_audio_in_video=True), args.repeats)
        hf.set_attn_implementation("eager")
        rows["HF eager + all attentions/hidden states"] = timed(
            lambda: hf(**x, use_audio_in_video=True, output_attentions=True, output_hidden_states=True), args.repeats
        )
        hf.set_attn_implementation("sdpa")
        rows["hooked_av forward (nothing hooked)"] = timed(lambda: ours(**x, use_audio_in_video=True), args.repeats)
        rows["hooked_av run_with_cache (residuals)"] = timed(
            lambda: ours.run_with_cache(**x, use_audio_in_video=True, names_filter=resid), args.repeats
        )
        rows["hooked_av run_with_cache (LM patterns + residuals)"] = timed(
            lambda: ours.run_with_cache(
                **x, use_audio_in_video=True,
                names_filter=lambda h: h.startswith("blocks.") and h.endswith(("hook_pattern", "hook_resid_post")),
            ),
            args.repeats,
        )
        enc = ours.encode(**x, use_audio_in_video=True)
        rows["hooked_av forward from encode() (towers skipped)"] = timed(lambda: ours(**enc), args.repeats)
        rows["hooked_av knockout via hook_attn_mask, all layers"] = timed(
            lambda: ours.run_with_hooks(
                **enc,
                fwd_hooks=[(lambda h: h.endswith("attn.hook_attn_mask") and h.startswith("blocks."), _cut_last)],
            ),
            args.repeats,
        )
    base = rows["HF sdpa forward"]
    print(f"{n} tokens, {args.layers} layers, device {args.device}, torch threads {torch.get_num_threads()}")
    for name, t in rows.items():
        print(f"{name:52s} {t * 1000:9.1f} ms   {t / base:5.2f}x of HF sdpa")


def _cut_last(mask, hook):
    from hooked_av.core.masks import neg_inf

    mask[:, :, -1, :-1] = neg_inf(mask.dtype)
    return mask


if __name__ == "__main__":
    main()
