#!/usr/bin/env bash
# The real-scale check for an accelerator machine (issues 12 and 25): one command, under 8 minutes on one 80 GB
# H100, one markdown table per model on stdout (progress on stderr), no download:
#   benchmarks/gpu_check.sh [--lengths 4096,16384,32768] [--out FILE]
#       Qwen2.5-Omni-7B's Thinker, Qwen3-Omni-30B-A3B's Thinker (--qwen3-layers N of its 48, default auto: as many
#       as fit beside the largest row's activations; all 48 on an 80 GB card) and video-SALMONN 2+ 7B (its language
#       model is Qwen2.5-VL-7B's), random weights built on the meta device and materialised in bf16 on cuda, the HF
#       reference and the hooked model sharing them; at each length a clip's token layout as embeddings.
#       Rows per length: HF sdpa forward (use_cache=False) vs the hooked forward; attention_rows of the last query
#       and of the last 64; group_attention_mass; the six-edge x every-centre knockout sweep in forwards; HF eager
#       with output_attentions (OOM caught: the first length that ran out is reported); the nnsight backend per
#       cell; generation tokens/s, plain and under a knockout. A row that does not apply to a family says why.
#       Then the harvest at one 7B layer (benchmarks/harvest_check.py's table).
#       Min and median of >= 5 interleaved rounds after a warm-up, synchronised; peak GPU memory per row above
#       the loaded models. --budget (default 440 s) is shared out between the models and their lengths; a row
#       that would not fit is skipped with its estimate printed, never silently.
#   benchmarks/gpu_check.sh --tiny     the same on the CPU with tiny configs of all three families (lengths 512,1024):
#                                      tests/test_gpu_check.py runs it, so the script cannot rot
# Options and the method: benchmarks/gpu_check.py (--help). Paste the output into docs/benchmarks.md's "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# long sequences allocate and free large blocks: expandable segments keep fragmentation from causing an early OOM
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
