#!/usr/bin/env bash
# The long-clip check for an accelerator machine (issue 12), one table, no download:
#   benchmarks/gpu_check.sh            a 7B-architecture Qwen2.5-Omni Thinker (HF's default Thinker config:
#                                      text 3584 wide, 28 layers, 28 / 4 heads) with random weights, built on the
#                                      meta device and materialised in bf16 on cuda; a 16k-token clip
#   benchmarks/gpu_check.sh --tiny     the same script on a tiny config, 512 tokens, on the CPU (proves it runs)
# Rows: HF sdpa language model forward, hooked_av forward, attention_rows of the last token over every layer
# and head, the six-edge x every-centre knockout sweep (window 9, recompute what changes); seconds (median of 3
# after a warm-up, synchronised) and peak memory above the loaded model (torch.cuda.max_memory_allocated).
# The clip is the language model's input with a clip's token layout (benchmarks/run_all.py synthetic_sample):
# random embeddings, video and audio in alternating chunks, a question and the last token; the towers do not run.
# Then benchmarks/harvest_check.py's table (harvest at one 7B layer: throughput, disk per million media tokens).
# Meant to finish in well under 8 minutes on one H100/H200-class GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
timeout 480 "$PY" - "$@" <<'EOF'
import argparse, statistics, sys, time

import torch

sys.path.insert(0, "benchmarks")
from run_all import synthetic_sample  # noqa: E402

ap = argparse.ArgumentParser(prog="gpu_check.sh")
ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU, to check the script itself")
ap.add_argument("--tokens", type=int, default=None, help="default 16384 (512 with --tiny)")
a = ap.parse_args()
if not a.tiny and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; run it on an accelerator machine, or pass --tiny to check it on the CPU")
device = "cpu" if a.tiny else "cuda"
dtype = torch.float32 if a.tiny else torch.bfloat16
n = a.tokens or (512 if a.tiny else 16384)

from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration  # noqa: E402

from hooked_av import HookedQwen2_5Omni  # noqa: E402
from patching.engine.hooks import block_attention  # noqa: E402
from patching.methods.knockout import default_edges, window_layers  # noqa: E402
from patching.engine.sweep import forward_rows, run_rows  # noqa: E402

cfg = Qwen2_5OmniThinkerConfig()  # HF's defaults are the 7B Thinker's
if a.tiny:
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "mrope_section": [2, 3, 3]}),
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           fullatt_block_indexes=[0]))
cfg._attn_implementation = "sdpa"
with torch.device("meta"):
    hf = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
hf = hf.to_empty(device=device).eval()
torch.manual_seed(0)
with torch.no_grad():
    for name, p in hf.named_parameters():  # random weights of a plausible scale
        if p.dim() > 1:
            p.normal_(0, 0.02)
        else:
            p.fill_(1.0 if "norm" in name or "ln" in name else 0.0)
    for m in hf.modules():  # to_empty leaves buffers unset: the rotary inverse frequencies again
        if hasattr(m, "inv_freq") and hasattr(m, "compute_default_rope_parameters"):
            inv, _ = m.compute_default_rope_parameters(m.config, device=device)
            m.inv_freq.copy_(inv)
            m.original_inv_freq.copy_(inv)
model = HookedQwen2_5Omni.from_hf(hf, device=device)
L = model.cfg.n_layers
s = synthetic_sample(model, n)
s.embeds = s.embeds.to(device, dtype) * 0.05
s.position_ids = s.position_ids.to(device)
cells = [block_attention(s.tm, src, dst, window_layers(c, 9, L)) for src, dst in default_edges(s.tm) for c in range(L)]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def hf_forward():
    h = hf.model(inputs_embeds=s.embeds, position_ids=s.position_ids).last_hidden_state
    return hf.lm_head(h[:, -1:])


ops = {"HF sdpa forward (last logits)": hf_forward,
       "hooked_av forward (last logits)": lambda: forward_rows(model, s, 1),
       "hooked_av attention_rows, last token, every layer and head": lambda: model.attention_rows(
           {"inputs_embeds": s.embeds, "position_ids": s.position_ids}, [n - 1]),
       f"hooked_av knockout sweep, {len(cells)} cells, recompute what changes": lambda: run_rows(model, s, cells, progress=False)}
rows = {}
with torch.no_grad():
    for name, fn in ops.items():
        fn()  # warm-up
        sync()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else float("nan")
        rows[name] = (statistics.median(times), peak)
        print(f"  {name}: {rows[name][0]:.3f} s", file=sys.stderr, flush=True)
what = "tiny config on the CPU (--tiny)" if a.tiny else f"7B-architecture Thinker, bf16, {torch.cuda.get_device_name()}"
weights = (torch.cuda.memory_allocated() / 2**30) if device == "cuda" else sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
print(f"\n{what}; {n:,} tokens, {L} layers; both models loaded ({weights:.1f} GiB); median of 3 after a warm-up\n")
fwd_t, fwd_m = rows["hooked_av forward (last logits)"]
print("| | seconds | / hooked_av forward | peak GiB above the loaded models | / forward's peak |")
print("|---|---|---|---|---|")
for name, (t, m) in rows.items():
    print(f"| {name} | {t:.3f} | {t / fwd_t:.2f}x | {m:.2f} | {m / fwd_m:.2f}x |")
EOF
timeout 300 "$PY" benchmarks/harvest_check.py "$@"  # issue 22: harvest throughput and disk per million media tokens at one 7B layer
