"""Benchmark (issue 5): a six-edge x all-layer knockout sweep batched vs one forward per cell, and
physical discarding of audio+video from L = n_layers // 2 vs the full forward. Random weights; sizes
are arguments. Run: `.venv/bin/python benchmarks/bench_patching.py [--layers 12 --d-model 256 --device cpu]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--frames", type=int, default=4, help="video frames (x 4x8 patches / 4 tokens each)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from omni_helpers import IM_END, IM_START, USER, Builder, batch, tiny_thinker_config

    from hooked_av import HookedQwen2_5Omni
    from hooked_av.inputs.chat import ChatTokens
    from patching.discarding import forward_flops, physical_forward
    from patching.hooks import block_attention
    from patching.knockout import DEFAULT_EDGES, window_layers
    from patching.sweep import forward_rows, run_rows, samples

    torch.manual_seed(0)
    heads = a.d_model // 16  # head_dim 16 keeps the tiny config's M-RoPE sections
    cfg = tiny_thinker_config(num_hidden_layers=a.layers, hidden_size=a.d_model, intermediate_size=4 * a.d_model,
                              num_attention_heads=heads, num_key_value_heads=heads // 2)
    cfg.audio_config.output_dim = cfg.vision_config.out_hidden_size = a.d_model
    model = HookedQwen2_5Omni.from_config(cfg, device=a.device)
    inputs = batch(Builder(1).video(a.frames, 8, 16).text(8).audio(400).text(6).end())
    inputs = {k: v.to(a.device) for k, v in inputs.items()}
    tm = model.token_map(inputs, chat=ChatTokens(IM_START, IM_END, None, {"user": (USER,)}))
    s = samples(model, inputs, tm)[0]
    L = model.cfg.n_layers
    ivs = [block_attention(s.tm, src, dst, window_layers(c, 9, L)) for src, dst in DEFAULT_EDGES for c in range(L)]
    print(f"{L} layers, d_model {a.d_model}, {s.seq_len} tokens, {len(ivs)} knockout cells, device {a.device}")

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    run_rows(model, s, ivs[:2], progress=False)  # warm-up
    sync(); t = time.perf_counter()
    run_rows(model, s, ivs, batch_size=a.batch_size, progress=False)
    sync(); t_batched = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for iv in ivs:
            with model.hooks(fwd_hooks=list(iv)):
                forward_rows(model, s, 1)
    sync(); t_loop = time.perf_counter() - t
    print(f"knockout sweep: batched {t_batched:.2f} s, one forward per cell {t_loop:.2f} s, speed-up x{t_loop / t_batched:.1f}")

    half = L // 2
    with torch.no_grad():
        for _ in range(2):
            forward_rows(model, s, 1), physical_forward(model, s, "audio|video", half)
        sync(); t = time.perf_counter()
        for _ in range(5):
            forward_rows(model, s, 1)
        sync(); t_full = (time.perf_counter() - t) / 5
        t = time.perf_counter()
        for _ in range(5):
            physical_forward(model, s, "audio|video", half)
        sync(); t_disc = (time.perf_counter() - t) / 5
    n, d = s.seq_len, int(s.tm.mask("audio|video").sum())
    saved = 1 - forward_flops(model, n, n - d, half) / forward_flops(model, n)
    print(f"discarding audio+video ({d}/{n} tokens) from L={half}: {t_disc * 1e3:.1f} ms vs full {t_full * 1e3:.1f} ms, "
          f"time saved {1 - t_disc / t_full:.0%}, FLOPs saved {saved:.0%}")


if __name__ == "__main__":
    main()
