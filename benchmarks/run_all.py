"""`make bench`: every speed figure of the toolkit as a ratio measured in this run, written to docs/benchmarks.md.

    .venv/bin/python benchmarks/run_all.py [--rounds 5] [--threads 1] [--sizes 1024,2048,4096,8192,16384]
                                            [--out docs/benchmarks.md] [--quick]
    .venv/bin/python benchmarks/run_all.py --harvest-only [--harvest-clips 2]   # the harvest table alone, printed

Model: random weights of the real Qwen2.5-Omni Thinker architecture at docs/peers.md's benchmark size (text
512 wide, 8 layers, 8 query / 2 key-value heads, Qwen2.5's 152,064-token vocabulary; towers 256 wide, 4
layers); one video with its audio track (use_audio_in_video) and a question. Method: torch threads set
explicitly; in each table the contenders run interleaved, the order rotated every round, after one warm-up
call each; min and median over `--rounds` (>= 5) of process CPU time and of wall time, each divided by the
table's baseline measured in the same rounds; the machine's load average before and after. The toolkit's own
entry points (sweeps, patching, discarding, read-outs) run with autograd on, as users call them (the weights
require grad): the notes say how many tensors each saved for a backward ("no graph": none); plain forwards run
under torch.no_grad. Like is compared
with like: rows from processor outputs (towers included) against HF's Thinker from the same outputs, rows from
`encode()` outputs against the language model alone, the harvest (issue 22: towers, blocks up to the hooked one,
shards written) against plain forwards of the same clips from processor outputs, as a throughput ratio. The scaling table runs each (operation, size) in a fresh
subprocess (one timed call after a warm-up on 128 tokens; peak memory = the rise of the process's peak RSS, reset
through /proc/self/clear_refs after loading, over what the loaded model and inputs already held, with glibc's mmap
threshold fixed at 128 KiB so that it counts tensors, not heap fragmentation; Linux only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 8


def config(n_layers: int = LAYERS):
    """The benchmark-size Thinker config (docs/peers.md)."""
    from transformers import Qwen2_5OmniThinkerConfig

    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=512, intermediate_size=1536, num_hidden_layers=n_layers,
            num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        ),
        audio_config=dict(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024, output_dim=512),
        vision_config=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=512, out_hidden_size=512,
                           fullatt_block_indexes=[3]),
    )
    cfg.vision_start_token_id, cfg.vision_end_token_id = 151652, 151653
    return cfg


def clip_inputs(tokens: int, cfg) -> dict:
    """Processor-style inputs of a video (2 x 28 x 28 patches per second) with its audio track, in
    Qwen2.5-Omni's 2-second chunk order, and a 20-token question: about `tokens` tokens."""
    from hooked_av.families.qwen2_5_omni.layout import chunk_bounds, video_temporal_ids

    seconds = max(1, tokens // (196 + 25))
    t, h, w = seconds, 28, 28
    frames = seconds * 100
    n_audio = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    v_chunks = chunk_bounds(video_temporal_ids(t, 1.0, 25).repeat_interleave(h * w // 4), 50, 0)
    a_chunks = chunk_bounds(torch.arange(n_audio), 50, 0)
    body = []
    for j in range(max(len(v_chunks), len(a_chunks))):  # video chunk j, then audio chunk j
        if j < len(v_chunks):
            body += [cfg.video_token_id] * (v_chunks[j][1] - v_chunks[j][0])
        if j < len(a_chunks):
            body += [cfg.audio_token_id] * (a_chunks[j][1] - a_chunks[j][0])
    ids = [151644, 872, 198, 151652, 151647] + body + [151648, 151653] + list(range(1000, 1020)) + [151645]
    return {
        "input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "input_features": torch.randn(1, 128, frames), "feature_attention_mask": torch.ones(1, frames, dtype=torch.long),
        "pixel_values_videos": torch.randn(t * h * w, 1176), "video_grid_thw": torch.tensor([[t, h, w]]),
        "video_second_per_grid": torch.tensor([1.0]), "use_audio_in_video": True,
    }


def synthetic_sample(model, n: int):
    """A batch-1 `Sample` of `n` positions with a clip's token layout (video and audio in alternating
    chunks of 200 and 50, a 20-token question, the last token), random embeddings and text positions:
    the language model's input without running towers at long lengths."""
    from hooked_av.inputs.token_map import TokenMapBuilder
    from patching.engine.sweep import Sample

    g = torch.Generator().manual_seed(n)
    tb = TokenMapBuilder(1, n)
    tb.set(0, list(range(3)), "template")
    p, item = 3, 0
    while p < n - 25:
        for group, size in (("video", 200), ("audio", 50)):
            end = min(p + size, n - 25)
            tb.set(0, list(range(p, end)), group, item=0)
            p = end
        item += 1
    tb.set(0, list(range(n - 25, n - 4)), "question")
    tb.set(0, list(range(n - 4, n - 1)), "template")
    tb.set(0, [n - 1], "last")
    embeds = torch.randn(1, n, model.cfg.d_model, generator=g) * 0.5
    pos = torch.arange(n).view(1, 1, n).expand(3, 1, n)
    return Sample(embeds, pos, tb.build(), 0)


# ---- timing ---------------------------------------------------------------------------------------------------

def measure(contenders: dict, rounds: int, library: dict | None = None) -> dict:
    """`{name: (cpu seconds list, wall seconds list)}`: one warm-up call each, then `rounds` rounds calling
    each once, the order rotated by one every round (drift in clock, cache or load hits every one alike).
    Plain forwards run under `torch.no_grad`; contenders named in `library` (the toolkit's own entry points)
    run with autograd on, as a user calls them (the weights require grad), so a graph one of them built would
    cost its time here, and `library[name]` gets the tensors it saved for a backward in its warm-up call."""
    names, library = list(contenders), {} if library is None else library

    def call(k):
        if k in library:
            return contenders[k]()
        with torch.no_grad():
            return contenders[k]()

    for k in names:
        if k in library:
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
                call(k)
            library[k] = len(saved)
        else:
            call(k)
    out = {k: ([], []) for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            c, w = time.process_time(), time.perf_counter()
            call(k)
            out[k][0].append(time.process_time() - c)
            out[k][1].append(time.perf_counter() - w)
    return out


def graph_notes(library: dict, notes: dict | None = None) -> dict:
    """The notes column with each library row's graph count ("no graph" where it saved nothing)."""
    out = dict(notes or {})
    for k, n in library.items():
        said = "no graph" if n == 0 else f"graph: {n:,} tensors saved for a backward"
        out[k] = f"{out[k]}; {said}" if k in out else said
    return out


def ratio_rows(times: dict, base: str, note: dict | None = None) -> list[str]:
    """Markdown rows: median ms (CPU), then min and median ratios to `base` in CPU and wall time."""
    bc, bw = times[base]
    rows = []
    for k, (c, w) in times.items():
        rows.append(f"| {k} | {statistics.median(c) * 1e3:,.0f} | {min(c) / min(bc):.2f}x | {statistics.median(c) / statistics.median(bc):.2f}x"
                    f" | {min(w) / min(bw):.2f}x | {statistics.median(w) / statistics.median(bw):.2f}x |"
                    + (f" {note[k]} |" if note and k in note else " |"))
    return rows


HEAD = ("| | CPU ms (median) | CPU min / base | CPU median / base | wall min / base | wall median / base | |\n"
        "|---|---|---|---|---|---|---|")


# ---- the tables -----------------------------------------------------------------------------------------------

def main_tables(args) -> list[str]:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from hooked_av import HookedQwen2_5Omni
    from patching.methods.activation_patching import activation_patching
    from patching.methods.attribution import attribution_patching
    from patching.backends.nnsight_hf import NNsightHF
    from patching.methods.discarding import physical_forward
    from patching.engine.hooks import block_attention
    from patching.methods.knockout import default_edges, knockout, window_layers
    from patching.engine.metrics import AnswerProb
    from patching.engine.sweep import forward_rows, run_rows, samples

    torch.manual_seed(0)
    cfg = config()
    hf = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    ours = HookedQwen2_5Omni.from_hf(hf)
    x = clip_inputs(args.tokens, cfg)
    tm = ours.token_map(x)
    enc = ours.encode(**x)
    s = samples(ours, enc, tm)[0]
    n, L = s.seq_len, LAYERS
    resid = [f"blocks.{l}.hook_resid_post" for l in range(L)]
    out = [f"One clip of {n:,} tokens ({int(tm.mask('video').sum()):,} video, {int(tm.mask('audio').sum()):,} audio), "
           f"{L} layers.", ""]

    def eager():
        hf.set_attn_implementation("eager")
        try:
            hf(**x, output_attentions=True, output_hidden_states=True)
        finally:
            hf.set_attn_implementation("sdpa")

    a = {"HF sdpa forward": lambda: hf(**x),
         "hooked_av forward, nothing hooked": lambda: ours(**x),
         "hooked_av run_with_cache, residuals": lambda: ours.run_with_cache(**x, names_filter=resid),
         "hooked_av run_with_cache, every LM pattern + residuals": lambda: ours.run_with_cache(
             **x, names_filter=lambda h: h.startswith("blocks.") and h.endswith(("hook_pattern", "hook_resid_post"))),
         "hooked_av attention_rows, last token, every layer and head": lambda: ours.attention_rows(x, "last", tm=tm),
         "HF eager, output_attentions + hidden states": eager}
    out += ["### From processor outputs (towers included), against HF's Thinker with sdpa", "", HEAD]
    lib_a = {"hooked_av attention_rows, last token, every layer and head": None}
    times = measure(a, args.rounds, lib_a)
    out += [*ratio_rows(times, "HF sdpa forward", graph_notes(lib_a)), ""]

    edges = default_edges(s.tm)
    cells = [block_attention(s.tm, src, dst, window_layers(c, 9, L)) for src, dst in edges for c in range(L)]
    answer = int(forward_rows(ours, s, 1)[0].argmax())
    bad = dict(enc, inputs_embeds=enc["inputs_embeds"].clone())
    q = tm.mask("question")
    bad["inputs_embeds"][q] += torch.randn_like(bad["inputs_embeds"][q])
    metric = AnswerProb(answer)

    def per_cell():
        for iv in cells:
            with ours.hooks(fwd_hooks=list(iv)):
                forward_rows(ours, s, 1)

    def hf_lm():
        h = hf.model(inputs_embeds=s.embeds, position_ids=s.position_ids).last_hidden_state
        return hf.lm_head(h[:, -1:])

    from patching.methods.discarding import forward_flops

    d = int(s.tm.mask("audio|video").sum())
    flops = 1 - forward_flops(ours, n, n - d, L // 2) / forward_flops(ours, n)
    stats: dict = {}
    run_rows(ours, s, cells, progress=False, stats=stats)
    b = {"hooked_av language model forward, last logits": lambda: forward_rows(ours, s, 1),
         "HF sdpa language model forward, last logits": hf_lm,
         f"knockout sweep ({len(cells)} cells), recompute what changes": lambda: run_rows(ours, s, cells, progress=False),
         f"knockout sweep ({len(cells)} cells), batched whole rows": lambda: run_rows(ours, s, cells, progress=False, incremental=False),
         f"knockout sweep ({len(cells)} cells), one forward per cell": per_cell,
         f"physical discarding of audio+video from layer {L // 2}": lambda: physical_forward(ours, s, "audio|video", L // 2),
         "attribution patching, resid_pre x every layer x each position": lambda: attribution_patching(
             ours, enc, bad, metric, sites=("resid_pre",), tm_clean=tm, tm_corrupted=tm),
         "exact activation patching, resid_pre x every layer x each token group": lambda: activation_patching(
             ours, enc, bad, metric, sites=("resid_pre",), positions="groups", tm_clean=tm, tm_corrupted=tm, progress=False)}
    notes = {f"knockout sweep ({len(cells)} cells), recompute what changes":
             f"{stats['layer_positions'] / (n * L):.1f} forwards' work (positions x blocks) of {stats['positions_full'] / n:.0f}",
             f"physical discarding of audio+video from layer {L // 2}": f"FLOPs saved {flops:.0%}"}
    out += [f"### From `encode()` outputs (the language model alone), against one hooked_av forward reading the last "
            f"logits ({len(edges)} edges x {L} window centres, window 9)", "", HEAD]
    lib_b = {k: None for k in b if k != "HF sdpa language model forward, last logits"}
    times = measure(b, args.rounds, lib_b)
    out += [*ratio_rows(times, "hooked_av language model forward, last logits", graph_notes(lib_b, notes)), ""]

    out += sae_table(ours, s, args.rounds)

    be = NNsightHF(hf)
    sub = [block_attention(tm, src, dst, window_layers(c, 9, L)) for src, dst in edges for c in (L // 2,)]

    def nn_cells():
        for iv in sub:
            be.run(x, iv)

    def ours_cells():
        for iv in sub:
            ours.run_with_hooks(**x, fwd_hooks=iv)

    c = {"hooked_av run_with_hooks, one forward per cell": ours_cells,
         "nnsight HF backend (sdpa), one traced forward per cell": nn_cells,
         "HF sdpa forward per cell, no intervention (floor)": lambda: [hf(**x) for _ in sub],
         "hooked_av knockout(): towers once, recompute what changes": lambda: knockout(
             ours, x, [answer], edges=edges, centres=[L // 2], tm=tm, progress=False)}
    out += [f"### The same knockout sweep through nnsight ({len(sub)} cells: {len(edges)} edges x the middle centre, from "
            "processor outputs), against hooked_av one forward per cell", "", HEAD]
    lib_c = {"hooked_av knockout(): towers once, recompute what changes": None}
    times = measure(c, args.rounds, lib_c)
    out += [*ratio_rows(times, "hooked_av run_with_hooks, one forward per cell", graph_notes(lib_c)), ""]
    return out


def sae_table(model, s, rounds: int, width_factor: int = 8, k: int = 64) -> list[str]:
    """A TopK SAE of `width_factor` x d_model features (SAELens's `TopKSAE`, random weights) spliced at the middle
    block's `hook_resid_post` with its error term, against the plain language-model forward (last logits);
    each spliced contender splices and takes the SAE out inside its call (`model.saes`), which is counted."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from patching.engine.features import ablate_features
    from patching.engine.sweep import forward_rows

    L, d = model.cfg.n_layers, model.cfg.d_model
    hook = f"blocks.{L // 2}.hook_resid_post"
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=width_factor * d, k=k, metadata=SAEMetadata(hook_name=hook))).eval()
    point = f"{hook}.hook_sae_acts_post"
    ablation = list(ablate_features(hook, [0], positions=s.tm.select("audio")))

    def spliced(fn):
        def run():
            with model.saes(sae, use_error_term=True):
                return fn()
        return run

    t = {"language model forward, last logits": lambda: forward_rows(model, s, 1),
         "SAE spliced (error term kept), nothing hooked": spliced(lambda: forward_rows(model, s, 1)),
         "SAE spliced, features cached (run_with_cache)": spliced(lambda: model.run_with_cache(
             **s.lm_inputs(1), names_filter=point, logits_at="last")),
         "SAE spliced, one feature ablated on the audio (ablate_features)": spliced(lambda: model.run_with_hooks(
             **s.lm_inputs(1), fwd_hooks=ablation, logits_at="last"))}
    with torch.no_grad():
        _, cache = model.run_with_cache(**s.lm_inputs(1), names_filter=hook)
    c0 = time.process_time()
    for _ in range(20):
        with model.saes(sae, use_error_term=True):
            pass
    splice_ms = (time.process_time() - c0) / 20 * 1e3
    return [f"### An SAE spliced into the language model (`model.add_sae`; target: a spliced forward at most 1.2x a plain "
            f"one): SAELens TopK, {width_factor * d:,} features (k={k}) at `{hook}`; splicing and taking it out "
            f"(counted in each spliced row) costs {splice_ms:.1f} ms CPU", "", HEAD,
            *ratio_rows(measure(t, rounds), "language model forward, last logits"), ""]


def harvest_table(args) -> list[str]:
    """Harvest throughput (`patching.apps.harvest`: towers once, blocks up to the hooked one, the media tokens'
    activations and metadata written as store shards) against plain forwards (last logits) of the same clips."""
    import shutil
    import tempfile

    from hooked_av import HookedQwen2_5Omni
    from patching.apps.harvest import harvest_inputs
    from patching.datasets.activations import StoreWriter

    torch.manual_seed(0)
    cfg = config()
    model = HookedQwen2_5Omni.from_config(cfg).eval()
    clips = [clip_inputs(args.tokens, cfg) for _ in range(args.harvest_clips)]
    n_media = sum(int(model.token_map(x).mask("media").sum()) for x in clips)
    folders: list[str] = []

    def plain():
        for x in clips:
            model(**x, logits_at="last")

    def harvest_at(hook):
        def run():
            folders.append(tempfile.mkdtemp(prefix="bench-harvest-"))
            writer = None
            for i, x in enumerate(clips):
                (acts, meta), = harvest_inputs(model, x, [hook], "media")
                meta.insert(0, "row", i)
                meta.insert(0, "id", f"clip{i}")
                writer = writer or StoreWriter(folders[-1], {hook: acts[hook].shape[1]}, shard_tokens=4096)
                writer.add(acts, meta, {"id": f"clip{i}", "row": i, "n_tokens": len(meta)})
            writer.close()
        return run

    last, mid = f"blocks.{LAYERS - 1}.hook_resid_post", f"blocks.{LAYERS // 2 - 1}.hook_resid_post"
    runs = {"plain forward, last logits (every block, towers)": plain,
            f"harvest {last} (every block runs; no final norm, no unembedding)": harvest_at(last),
            f"harvest {mid} (half the blocks run)": harvest_at(mid)}
    times = measure(runs, args.rounds)
    disk = sum(f.stat().st_size for f in Path(folders[-1]).rglob("*") if f.is_file())
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
    base = "plain forward, last logits (every block, towers)"
    bc, bw = times[base]
    out = [f"### Harvest throughput ({len(clips)} clips of {clips[0]['input_ids'].shape[1]:,} tokens, {n_media:,} media "
           f"tokens in all; float32 store, {cfg.text_config.hidden_size} wide), against plain forwards of the same clips", "",
           "Throughput ratio = the plain forwards' time / the harvest's (>= 1: the harvest is as fast as forwards; the "
           "target is >= 0.90x). Both from processor outputs (towers included, media decoding not); the harvest writes "
           "its shards to a temporary folder inside the timed call.", "",
           "| | media tokens / s (median wall) | throughput / forward, CPU min | CPU median | wall min | wall median |",
           "|---|---|---|---|---|---|"]
    for k, (c, w) in times.items():
        out.append(f"| {k} | {n_media / statistics.median(w):,.0f} | {min(bc) / min(c):.2f}x | "
                   f"{statistics.median(bc) / statistics.median(c):.2f}x | {min(bw) / min(w):.2f}x | "
                   f"{statistics.median(bw) / statistics.median(w):.2f}x |")
    out += ["", f"Disk: {disk / n_media * 1e6 / 2**30:,.2f} GiB per million media tokens at one hook "
            f"({cfg.text_config.hidden_size} x 4 bytes of activations, {(disk / n_media) - cfg.text_config.hidden_size * 4:,.0f} "
            "bytes of metadata and files per token).", ""]
    return out


OPS = ("hf_sdpa", "forward", "attention_rows", "sweep", "patterns")


def scale_one(op: str, n: int, threads: int, layers: int) -> dict:
    """One (operation, size) in this process: seconds (wall and CPU) and the peak RSS rise (bytes)."""
    torch.set_num_threads(threads)
    from hooked_av import HookedQwen2_5Omni
    from patching.engine.hooks import block_attention
    from patching.methods.knockout import default_edges, window_layers
    from patching.engine.sweep import forward_rows, run_rows

    torch.manual_seed(0)
    cfg = config(layers)
    if op == "hf_sdpa":
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        hf = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    model = HookedQwen2_5Omni.from_config(cfg)

    def run(s):
        if op == "hf_sdpa":
            return hf.lm_head(hf.model(inputs_embeds=s.embeds, position_ids=s.position_ids).last_hidden_state[:, -1:])
        if op == "forward":
            return forward_rows(model, s, 1)
        if op == "attention_rows":
            return model.attention_rows({"inputs_embeds": s.embeds, "position_ids": s.position_ids}, [s.seq_len - 1])
        if op == "patterns":
            return model.run_with_cache(inputs_embeds=s.embeds, position_ids=s.position_ids, return_type=None,
                                        names_filter=lambda h: h.endswith("hook_pattern") and h.startswith("blocks."))
        cells = [block_attention(s.tm, a, b, window_layers(c, 9, layers)) for a, b in default_edges(s.tm) for c in range(layers)]
        return run_rows(model, s, cells, progress=False)

    with torch.no_grad():
        run(synthetic_sample(model, 128))  # warm-up
        s = synthetic_sample(model, n)
        before = rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS (Linux)
        c, w = time.process_time(), time.perf_counter()
        run(s)
        c, w = time.process_time() - c, time.perf_counter() - w
    return {"op": op, "n": n, "wall": w, "cpu": c, "peak": rss("VmHWM") - before}


def rss(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (the peak since the last reset) of this process, bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def scaling_table(args) -> list[str]:
    res: dict = {}
    for n in args.sizes:
        for op in OPS:
            if op == "patterns" and n > args.patterns_max:
                continue
            cmd = [sys.executable, __file__, "--scale-one", op, str(n), "--threads", str(args.threads),
                   "--scale-layers", str(LAYERS if n <= args.full_depth_max else args.long_layers)]
            # glibc's mmap threshold fixed at 128 KiB: every tensor above it is its own mapping, so the peak RSS
            # counts what the tensors hold, not the heap fragmentation of its dynamic threshold (which put
            # attention_rows' peak at 1.57x a forward's at 4k tokens with 1.01x of it in tensors)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            got = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if got.returncode:
                raise SystemExit(f"scaling {op} at {n} tokens failed:\n{got.stderr[-3000:]}")
            res[op, n] = json.loads(got.stdout.strip().splitlines()[-1])
            print(f"  scaling {op} {n}: {res[op, n]['cpu']:.2f} s CPU, {res[op, n]['peak'] / 2**20:,.0f} MiB", flush=True)
    gib = 2**20
    out = ["### Scaling with length (language model from embeddings, a synthetic clip layout; each cell a fresh process)",
           "", "Seconds are CPU seconds of one call; memory is the rise of the peak RSS over the loaded model and "
           "inputs (MiB; glibc's mmap threshold fixed at 128 KiB, so it counts tensors, not heap fragmentation). `sweep`: the six-edge x every-centre knockout sweep (a centre per layer, window 9), "
           "recompute what changes. `patterns`: run_with_cache of every LM pattern (only up to "
           f"{args.patterns_max:,} tokens: it grows with tokens squared). "
           + (f"Every size runs the model's {LAYERS} layers." if args.full_depth_max >= max(args.sizes) else
              f"Up to {args.full_depth_max:,} tokens the model has its {LAYERS} layers; above, the same width with "
              f"{args.long_layers} layers (scaled down: ratios to the forward of the same model still read as they do "
              "at full depth; absolute seconds do not)."), "",
           "| tokens | HF sdpa s | forward s | forward / HF | attention_rows s | rows / forward (time) | rows / forward (peak memory) | sweep s | sweep / forward | patterns s | forward MiB | rows MiB | patterns MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        f, r, sw, h = res["forward", n], res["attention_rows", n], res["sweep", n], res["hf_sdpa", n]
        p = res.get(("patterns", n))
        out.append(f"| {n:,} | {h['cpu']:.2f} | {f['cpu']:.2f} | {f['cpu'] / h['cpu']:.2f}x | {r['cpu']:.2f} | "
                   f"{r['cpu'] / f['cpu']:.2f}x | {r['peak'] / max(f['peak'], 1):.2f}x | {sw['cpu']:.2f} | "
                   f"{sw['cpu'] / f['cpu']:.2f}x | {'-' if p is None else format(p['cpu'], '.2f')} | "
                   f"{f['peak'] / gib:,.0f} | {r['peak'] / gib:,.0f} | {'-' if p is None else format(p['peak'] / gib, ',.0f')} |")
    return out


GPU_HEADING = "## GPU check"


def gpu_section(path: Path) -> str:
    """The section of an existing docs/benchmarks.md from its `## GPU check` heading to the next `## ` heading or
    the end ("" when there is none): benchmarks/gpu_check.sh's tables, pasted from an accelerator run, which this
    run cannot measure and so keeps, unchanged, after its own tables."""
    if not path.exists():
        return ""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(GPU_HEADING)), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n" + "\n".join(lines[start:end]).rstrip("\n") + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=300, help="about this many tokens in the main tables' clip")
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384")
    ap.add_argument("--patterns-max", type=int, default=1024)
    ap.add_argument("--full-depth-max", type=int, default=16384, help="longest size run at the full 8 layers")
    ap.add_argument("--long-layers", type=int, default=2, help="layers of the model above --full-depth-max")
    ap.add_argument("--scale-layers", type=int, default=LAYERS, help=argparse.SUPPRESS)
    ap.add_argument("--harvest-clips", type=int, default=8, help="clips in the harvest table")
    ap.add_argument("--harvest-only", action="store_true", help="print the harvest table only (writes no file)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--scale-one", nargs=2, metavar=("OP", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scale_one:
        print(json.dumps(scale_one(args.scale_one[0], int(args.scale_one[1]), args.threads, args.scale_layers)))
        return
    if args.rounds < 5:
        raise SystemExit(f"--rounds must be >= 5 for a min and a median worth reading, got {args.rounds}")
    args.sizes = [int(v) for v in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    if args.harvest_only:
        print("\n".join(harvest_table(args)))
        return
    t0, load0 = time.time(), os.getloadavg()
    body = main_tables(args)
    body += harvest_table(args)
    print("\n".join(body), flush=True)
    body += scaling_table(args)
    load1 = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    kept = gpu_section(Path(args.out))
    head = ["# Benchmarks", "", "Written by `make bench` (benchmarks/run_all.py); every figure is a ratio measured in the "
            "run that wrote this file. Method: see the script's docstring."
            + (" The last section, `GPU check`, is benchmarks/gpu_check.sh's, pasted from an accelerator run; "
               "`make bench` keeps it as it is." if kept else ""), "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; took {(time.time() - t0) / 60:.1f} min",
            f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; torch {torch.__version__}",
            f"- torch threads: {torch.get_num_threads()}; rounds: {args.rounds} (min and median), contenders interleaved, order rotated",
            f"- load average (1, 5, 15 min) before: {', '.join(f'{v:.1f}' for v in load0)}; after: "
            f"{', '.join(f'{v:.1f}' for v in load1)}"
            + (" (above the core count: other processes shared the cores, read the CPU columns)"
               if max(*load0, *load1) > (os.cpu_count() or 1) else " (at most the core count)"),
            ""]
    Path(args.out).write_text("\n".join(head + body) + "\n" + kept)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
