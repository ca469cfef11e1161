"""Harvest at one 7B layer (issue 22's gpu_check row): throughput and disk size per million media tokens.

    benchmarks/harvest_check.py            a 7B-architecture Qwen2.5-Omni Thinker (HF's default Thinker config,
                                           towers included) with random weights in bf16 on cuda; clips of about
                                           4,096 tokens (video with its audio track, benchmarks/run_all.py
                                           clip_inputs: random pixels and mel features), hook blocks.14.hook_resid_post
    benchmarks/harvest_check.py --tiny     a tiny config on the CPU in float32 (proves the script runs)

Called by benchmarks/gpu_check.sh (one line). Per clip the harvest runs what `hooked-av harvest` runs
(`patching.apps.harvest.harvest_inputs`: the towers once, the blocks up to the hooked one, the media tokens'
activations and metadata into store shards, `StoreWriter`, in the model's dtype); the plain forward is
`model(**clip, logits_at="last")` of the same clips. After one warm-up clip each, every clip is timed
(synchronised); throughput is media tokens / total seconds; disk is the store's bytes (activations, token
metadata, sample table) per million media tokens; peak memory above the loaded model
(torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import clip_inputs  # noqa: E402


def build(tiny: bool, device: str, dtype: torch.dtype):
    """The Thinker config (HF's defaults are the 7B Thinker's) and a hooked model with random weights of a
    plausible scale, built on the meta device and materialised on `device` (as gpu_check.sh does)."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from hooked_av import HookedQwen2_5Omni

    cfg = Qwen2_5OmniThinkerConfig()
    if tiny:
        cfg = Qwen2_5OmniThinkerConfig(
            text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                     "mrope_section": [2, 3, 3]}),
            audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64),
            vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                               fullatt_block_indexes=[0]))
    cfg.vision_start_token_id, cfg.vision_end_token_id = 151652, 151653
    with torch.device("meta"):
        hf = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    hf = hf.to_empty(device=device).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if "norm" in name or "ln" in name else 0.0)
        for m in hf.modules():  # to_empty leaves buffers unset: the rotary inverse frequencies again
            if hasattr(m, "inv_freq") and hasattr(m, "compute_default_rope_parameters"):
                inv, _ = m.compute_default_rope_parameters(m.config, device=device)
                m.inv_freq.copy_(inv)
                m.original_inv_freq.copy_(inv)
    model = HookedQwen2_5Omni.from_hf(hf, device=device).eval()
    del hf
    return cfg, model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="harvest_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU, to check the script itself")
    ap.add_argument("--tokens", type=int, default=None, help="about this many tokens per clip (default 4096; 512 with --tiny)")
    ap.add_argument("--clips", type=int, default=None, help="timed clips (default 8; 2 with --tiny)")
    ap.add_argument("--layer", type=int, default=None, help="the hooked block (default the middle one)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default bfloat16 (float32 with --tiny)")
    a = ap.parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("harvest_check.py: no CUDA device here; run it on an accelerator machine, or pass --tiny to check it on the CPU")
    device = "cpu" if a.tiny else "cuda"
    dtype = getattr(torch, a.dtype or ("float32" if a.tiny else "bfloat16"))
    n_tokens, n_clips = a.tokens or (512 if a.tiny else 4096), a.clips or (2 if a.tiny else 8)

    from patching.apps.harvest import harvest_inputs
    from patching.datasets.activations import StoreWriter

    cfg, model = build(a.tiny, device, dtype)
    L = model.cfg.n_layers
    layer = L // 2 if a.layer is None else a.layer
    hook = f"blocks.{layer}.hook_resid_post"
    torch.manual_seed(1)
    clips = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in clip_inputs(n_tokens, cfg).items()}
             for _ in range(n_clips + 1)]  # the first is the warm-up
    media = [int(model.token_map(x).mask("media").sum()) for x in clips]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    folder = Path(tempfile.mkdtemp(prefix="harvest-check-"))
    try:
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        writer, seconds = None, {"forward": 0.0, "harvest": 0.0}
        with torch.no_grad():
            for i, x in enumerate(clips):
                sync()
                t = time.perf_counter()
                model(**x, logits_at="last")
                sync()
                forward = time.perf_counter() - t
                t = time.perf_counter()
                (acts, meta), = harvest_inputs(model, x, [hook], "media")
                meta.insert(0, "row", i)
                meta.insert(0, "id", f"clip{i}")
                writer = writer or StoreWriter(folder, {hook: acts[hook].shape[1]}, shard_tokens=65536,
                                               dtype=str(dtype).removeprefix("torch."))
                writer.add(acts, meta, {"id": f"clip{i}", "row": i, "n_tokens": len(meta)})
                if i == len(clips) - 1:
                    writer.close()
                sync()
                if i:  # clip 0 warms both up
                    seconds["forward"] += forward
                    seconds["harvest"] += time.perf_counter() - t
        peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f}" if device == "cuda" else "-"
        disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    timed = sum(media[1:])
    what = "tiny config on the CPU (--tiny)" if a.tiny else f"7B-architecture Thinker, {torch.cuda.get_device_name()}"
    print(f"\nHarvest at one layer: {what}, {str(dtype).removeprefix('torch.')}; {hook} of {L} blocks; {n_clips} timed "
          f"clips of {clips[0]['input_ids'].shape[1]:,} tokens ({timed:,} media tokens) after a warm-up clip\n")
    print("| | media tokens / s | / plain forward | disk GiB per million media tokens | peak GiB above the model |")
    print("|---|---|---|---|---|")
    print(f"| plain forward, last logits (towers, every block) | {timed / seconds['forward']:,.0f} | 1.00x | - | - |")
    print(f"| harvest {hook} (towers, blocks 0..{layer}, shards written) | {timed / seconds['harvest']:,.0f} | "
          f"{seconds['forward'] / seconds['harvest']:.2f}x | {disk / sum(media) * 1e6 / 2**30:.2f} | {peak} |")


if __name__ == "__main__":
    main()
