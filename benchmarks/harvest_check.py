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
    plausible scale, built on the meta device and materialised on `device` (gpu_check.py's `build_family`)."""
    from gpu_check import build_family, qwen2_5_config

    return qwen2_5_config(tiny), build_family("qwen2_5_omni", tiny, device, dtype).model


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

    cfg, model = build(a.tiny, device, dtype)
    what = "tiny config on the CPU (--tiny)" if a.tiny else f"7B-architecture Thinker, {torch.cuda.get_device_name()}"
    print("\n" + "\n".join(harvest_table(model, cfg, n_tokens, n_clips, a.layer, what)))


def harvest_table(model, cfg, n_tokens: int, n_clips: int, layer: int | None = None, what: str = "") -> list[str]:
    """The table's lines for `model` (a hooked Qwen2.5-Omni Thinker of `cfg`, whose config names the vision
    start / end ids, on its device and in its dtype): `n_clips` timed clips of about `n_tokens` tokens after
    a warm-up clip, harvesting `blocks.{layer}.hook_resid_post` (default the middle block).
    benchmarks/gpu_check.py calls it with the model it built."""
    from patching.apps.harvest import harvest_inputs
    from patching.datasets.activations import StoreWriter

    device, dtype = model.cfg.device, model.cfg.dtype
    L = model.cfg.n_layers
    layer = L // 2 if layer is None else layer
    hook = f"blocks.{layer}.hook_resid_post"
    torch.manual_seed(1)
    clips = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in clip_inputs(n_tokens, cfg).items()}
             for _ in range(n_clips + 1)]  # the first is the warm-up
    media = [int(model.token_map(x).mask("media").sum()) for x in clips]
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    folder = Path(tempfile.mkdtemp(prefix="harvest-check-"))
    try:
        base = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
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
        peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f}" if cuda else "-"
        disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    timed = sum(media[1:])
    return [f"Harvest at one layer: {what}, {str(dtype).removeprefix('torch.')}; {hook} of {L} blocks; {n_clips} timed "
            f"clips of {clips[0]['input_ids'].shape[1]:,} tokens ({timed:,} media tokens) after a warm-up clip", "",
            "| | media tokens / s | / plain forward | disk GiB per million media tokens | peak GiB above the model |",
            "|---|---|---|---|---|",
            f"| plain forward, last logits (towers, every block) | {timed / seconds['forward']:,.0f} | 1.00x | - | - |",
            f"| harvest {hook} (towers, blocks 0..{layer}, shards written) | {timed / seconds['harvest']:,.0f} | "
            f"{seconds['forward'] / seconds['harvest']:.2f}x | {disk / sum(media) * 1e6 / 2**30:.2f} | {peak} |"]

if __name__ == "__main__":
    main()
