"""Benchmark (issue 16): the same knockout sweep (default edges x every centre layer, window 9) through
the nnsight backend on the stock HF Qwen2.5-Omni Thinker and through hooked_av, random weights.

Contenders, all one forward per cell from processor outputs unless said: HF sdpa with no intervention
(the floor), the nnsight HF backend (sdpa), hooked_av `run_with_hooks`, and hooked_av's batched
`knockout()` (towers once, cells as batch rows). Rounds are interleaved with the order rotated, after a
warm-up; the table gives min and median over the rounds as ratios to hooked_av per cell, measured in
the same run. Run: `.venv/bin/python benchmarks/bench_nnsight.py [--layers 8 --d-model 128 --rounds 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--frames", type=int, default=2, help="video frames (x 4x8 patches / 4 tokens each)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.rounds < 5:
        raise SystemExit(f"--rounds must be >= 5 for a min and a median worth reading, got {a.rounds}")
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from omni_helpers import IM_END, IM_START, USER, Builder, batch, tiny_thinker_config
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from hooked_av import HookedQwen2_5Omni
    from hooked_av.inputs.chat import ChatTokens
    from patching.backends.nnsight_hf import NNsightHF
    from patching.hooks import block_attention
    from patching.knockout import default_edges, knockout, window_layers

    heads = a.d_model // 16  # head_dim 16 keeps the tiny config's M-RoPE sections
    torch.manual_seed(0)
    cfg = tiny_thinker_config(num_hidden_layers=a.layers, hidden_size=a.d_model, intermediate_size=4 * a.d_model,
                              num_attention_heads=heads, num_key_value_heads=heads // 2)
    cfg.audio_config.output_dim = cfg.vision_config.out_hidden_size = a.d_model
    cfg._attn_implementation = "sdpa"
    hf = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    model = HookedQwen2_5Omni.from_hf(hf)
    inputs = batch(Builder(1).video(a.frames, 8, 16).text(8).audio(200).text(6).end())
    chat = ChatTokens(IM_START, IM_END, None, {"user": (USER,)})
    be = NNsightHF(hf)
    tm = be.token_map(inputs, chat=chat)
    L = a.layers
    edges = default_edges(tm)
    ivs = [block_attention(tm, s, d, window_layers(c, 9, L)) for s, d in edges for c in range(L)]
    answer = int(model(**inputs)[0, -1].argmax())
    print(f"{L} layers, d_model {a.d_model}, {tm.seq_len} tokens, {len(ivs)} knockout cells "
          f"({len(edges)} edges x {L} centres), {a.threads} torch thread(s), {a.rounds} rounds")

    def hf_plain():
        for _ in ivs:
            hf(**inputs)

    def nnsight_backend():
        for iv in ivs:
            be.run(inputs, iv)

    def ours_per_cell():
        for iv in ivs:
            model.run_with_hooks(**inputs, fwd_hooks=iv)

    def ours_batched():
        knockout(model, inputs, [answer], edges=edges, tm=model.token_map(inputs, chat=chat), progress=False)

    runs = {"HF sdpa forward, no intervention": hf_plain, "nnsight HF backend, per cell": nnsight_backend,
            "hooked_av run_with_hooks, per cell": ours_per_cell, "hooked_av knockout(), batched rows": ours_batched}
    times = {k: [] for k in runs}
    names = list(runs)
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for r in range(a.rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t)
    base = "hooked_av run_with_hooks, per cell"
    b_min, b_med = min(times[base]), statistics.median(times[base])
    print(f"\n| sweep of {len(ivs)} cells | min / hooked_av per cell | median / hooked_av per cell |")
    print("|---|---|---|")
    for k in names:
        print(f"| {k} | {min(times[k]) / b_min:.2f}x | {statistics.median(times[k]) / b_med:.2f}x |")


if __name__ == "__main__":
    main()
