"""`make bench`: every speed figure of the toolkit as a ratio measured in this run, written to docs/benchmarks.md.

    .venv/bin/python benchmarks/run_all.py [--rounds 5] [--threads 1] [--sizes 1024,2048,4096,8192,16384]
                                            [--out docs/benchmarks.md]
    .venv/bin/python benchmarks/run_all.py --harvest-only [--harvest-clips 2]   # the harvest table alone, printed
    .venv/bin/python benchmarks/run_all.py --only limits   # issue 25's limit tables alone, printed (main, harvest,
                                                           # limits, scaling: any of them, comma-separated)

Model: random weights of the real Qwen2.5-Omni Thinker architecture at docs/peers.md's benchmark size (text
512 wide, 8 layers, 8 query / 2 key-value heads, Qwen2.5's 152,064-token vocabulary; towers 256 wide, 4
layers); one video with its audio track (use_audio_in_video) and a question. Method: torch threads set
explicitly; in each table the contenders run interleaved, the order rotated every round, after one warm-up
call each; min and median over `--rounds` (>= 5) of process CPU time and of wall time, each divided by the
table's baseline measured in the same rounds; the machine and its load average before and after each table. The toolkit's own
entry points (sweeps, patching, discarding, read-outs) run with autograd on, as users call them (the weights
require grad): the notes say how many tensors each saved for a backward ("no graph": none); plain forwards run
under torch.no_grad. Like is compared
with like: rows from processor outputs (towers included) against HF's Thinker from the same outputs, rows from
`encode()` outputs against the language model alone, the harvest (issue 22: towers, blocks up to the hooked one,
shards written) against plain forwards of the same clips from processor outputs, as a throughput ratio. The scaling table runs each (operation, size) in a fresh
subprocess (one timed call after a warm-up on 128 tokens; peak memory = the rise of the process's peak RSS, reset
through /proc/self/clear_refs after loading, over what the loaded model and inputs already held, with glibc's mmap
threshold fixed at 128 KiB so that it counts tensors, not heap fragmentation; Linux only). Issue 25's limit tables:
the sweep on two token maps of the main clip (the Qwen chat map, and all text `question`); `group_attention_mass`
against a forward of one layer at 7B head geometry and at width 1024; the sweep against its FLOP floor, with HF's
forward and a knockout cell as a 4D float mask; their long inputs warm up on 512 tokens (`--mass-7b-sizes`,
`--mass-1024-sizes`, `--floor-sizes`, `--floor-layers`, `--hf-mask-max` size them; a size left out is a row that
says so).
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


def config(n_layers: int = LAYERS, width: int = 512, heads: int = 8, kv_heads: int = 2, d_mlp: int = 1536,
           vocab: int = 152064):
    """The benchmark-size Thinker config (docs/peers.md); the text model's geometry can be changed (the limit
    tables' one-layer 7B and width-1024 layers), the towers stay at the benchmark size. The rotary sections
    split the head's half-dimension as Qwen2.5-Omni's do (1/4 time, 3/8 height, 3/8 width)."""
    from transformers import Qwen2_5OmniThinkerConfig

    half = width // heads // 2
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=width, intermediate_size=d_mlp, num_hidden_layers=n_layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [half // 4, (half - half // 4) // 2, (half - half // 4) // 2]},
        ),
        audio_config=dict(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024, output_dim=width),
        vision_config=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=512, out_hidden_size=width,
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

def measure(contenders: dict, rounds: int, library: dict | None = None, warmup: dict | None = None) -> dict:
    """`{name: (cpu seconds list, wall seconds list)}`: one warm-up call each, then `rounds` rounds calling
    each once, the order rotated by one every round (drift in clock, cache or load hits every one alike).
    Plain forwards run under `torch.no_grad`; contenders named in `library` (the toolkit's own entry points)
    run with autograd on, as a user calls them (the weights require grad), so a graph one of them built would
    cost its time here, and `library[name]` gets the tensors it saved for a backward in its warm-up call.
    `warmup[name]`, where given, is called for the warm-up instead (the same call on a short input: the long
    limit tables would otherwise spend a sixth of their time warming up)."""
    names, library, warmup = list(contenders), {} if library is None else library, warmup or {}

    def call(k, fns=contenders):
        if k in library:
            return fns[k]()
        with torch.no_grad():
            return fns[k]()

    for k in names:
        fns = warmup if k in warmup else contenders
        if k in library:
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
                call(k, fns)
            library[k] = len(saved)
        else:
            call(k, fns)
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


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_note(before: tuple, after: tuple) -> str:
    """The line each table carries: the machine and its load average (1, 5, 15 min) before and after the table."""
    cores = os.cpu_count() or 1
    said = (f"above the core count: other processes shared the {cores} cores, read the CPU columns"
            if max(*before, *after) > cores else "at most the core count")
    return (f"Machine: {cpu_name()}, {cores} cores, torch threads {torch.get_num_threads()}; load average (1, 5, 15 min) "
            f"before this table {', '.join(f'{v:.1f}' for v in before)}, after {', '.join(f'{v:.1f}' for v in after)} ({said}).")


def loaded(fn):
    """`(fn(), load_note)`: `fn` run between two readings of the load average."""
    before = os.getloadavg()
    got = fn()
    return got, load_note(before, os.getloadavg())


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
    out += ["### From processor outputs (towers included), against HF's Thinker with sdpa", ""]
    lib_a = {"hooked_av attention_rows, last token, every layer and head": None}
    times, load = loaded(lambda: measure(a, args.rounds, lib_a))
    out += [load, "", HEAD, *ratio_rows(times, "HF sdpa forward", graph_notes(lib_a)), ""]

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
            f"logits ({len(edges)} edges x {L} window centres, window 9)", ""]
    lib_b = {k: None for k in b if k != "HF sdpa language model forward, last logits"}
    times, load = loaded(lambda: measure(b, args.rounds, lib_b))
    out += [load, "", HEAD, *ratio_rows(times, "hooked_av language model forward, last logits", graph_notes(lib_b, notes)), ""]

    out += sae_table(ours, s, args.rounds)

    be = NNsightHF(hf)
    sub = [block_attention(tm, src, dst, window_layers(c, 9, L)) for src, dst in edges for c in (L // 2,)]

    def nn_cells():
        for iv in sub:
            be.run(x, iv)

    def ours_cells():
        for iv in sub:
            ours.run_with_hooks(**x, fwd_hooks=iv)

    assert list(window_layers(L // 2, 9, L)) == list(range(L))  # the middle centre's window is every layer: one 4D mask
    masks = [hf_cell_mask(tm, src, dst) for src, dst in edges]
    pos = enc["position_ids"]
    check_hf_cell(lambda: hf(**{**x, "attention_mask": masks[0]}, position_ids=pos).logits[:, -1],
                  lambda: ours.run_with_hooks(**x, fwd_hooks=sub[0])[:, -1])
    mask_row = "HF sdpa forward per cell, the cell's knockout as a 4D float mask"
    c = {"hooked_av run_with_hooks, one forward per cell": ours_cells,
         "nnsight HF backend (sdpa), one traced forward per cell": nn_cells,
         "HF sdpa forward per cell, no intervention (floor)": lambda: [hf(**x) for _ in sub],
         mask_row: lambda: [hf(**{**x, "attention_mask": m}, position_ids=pos) for m in masks],
         "hooked_av knockout(): towers once, recompute what changes": lambda: knockout(
             ours, x, [answer], edges=edges, centres=[L // 2], tm=tm, progress=False)}
    out += [f"### The same knockout sweep through nnsight ({len(sub)} cells: {len(edges)} edges x the middle centre, from "
            "processor outputs), against hooked_av one forward per cell", ""]
    lib_c = {"hooked_av knockout(): towers once, recompute what changes": None}
    times, load = loaded(lambda: measure(c, args.rounds, lib_c))
    notes = graph_notes(lib_c, {mask_row: mask_note(times, mask_row, "HF sdpa forward per cell, no intervention (floor)")
                                + f" (at {n:,} tokens, where attention is a small part of the forward)"})
    out += [load, "", HEAD, *ratio_rows(times, "hooked_av run_with_hooks, one forward per cell", notes), ""]
    return out


def hf_cell_mask(tm, src: str, dst: str) -> torch.Tensor:
    """A knockout cell at every layer as HF takes it: the causal 4D additive float mask `[1, 1, n, n]` with the
    `dst` queries cut off the `src` keys (tests/test_interventions.py checks the same mask against the hooks)."""
    from hooked_av.core.masks import neg_inf

    n, inf = tm.seq_len, neg_inf(torch.float32)
    m = torch.zeros(1, 1, n, n).masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), inf)
    m[0, 0][tm.mask(dst)[0][:, None] & tm.mask(src)[0][None, :]] = inf
    return m


def check_hf_cell(hf_cell, ours_cell, atol: float = 1e-3) -> None:
    """The HF 4D-mask row times a real cell: its last logits equal the hooked_av cell's (fp32)."""
    with torch.no_grad():
        diff = float((hf_cell() - ours_cell()).abs().max())
    if diff > atol:
        raise SystemExit(f"HF with the cell's 4D mask differs from the hooked_av cell by {diff:.2e} (> {atol}): "
                         "the row would not time the same cell")


def mask_note(times: dict, row: str, base: str) -> str:
    """The 4D-mask row's cost in HF's own forwards (CPU min and median ratios to `base`, same rounds)."""
    (c, _), (bc, _) = times[row], times[base]
    return (f"{min(c) / min(bc):.2f}x / {statistics.median(c) / statistics.median(bc):.2f}x HF's plain sdpa forward "
            "(CPU min / median): the float mask rules out the causal kernel, every query reads every key")


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
    times, load = loaded(lambda: measure(t, rounds))
    return [f"### An SAE spliced into the language model (`model.add_sae`; target: a spliced forward at most 1.2x a plain "
            f"one): SAELens TopK, {width_factor * d:,} features (k={k}) at `{hook}`; splicing and taking it out "
            f"(counted in each spliced row) costs {splice_ms:.1f} ms CPU", "", load, "", HEAD,
            *ratio_rows(times, "language model forward, last logits"), ""]


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
    times, load = loaded(lambda: measure(runs, args.rounds))
    disk = sum(f.stat().st_size for f in Path(folders[-1]).rglob("*") if f.is_file())
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
    base = "plain forward, last logits (every block, towers)"
    bc, bw = times[base]
    out = [f"### Harvest throughput ({len(clips)} clips of {clips[0]['input_ids'].shape[1]:,} tokens, {n_media:,} media "
           f"tokens in all; float32 store, {cfg.text_config.hidden_size} wide), against plain forwards of the same clips", "",
           load, "",
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


# ---- issue 25's limits -----------------------------------------------------------------------------------------

WARM = 512  # tokens of the short input the long limit tables warm up on


def sweep_counts(stats: dict, seq: int) -> str:
    """A sweep's counts (`SweepPlan.stats`): positions recomputed, FLOPs as run and at the causal floor in
    forwards' FLOPs, chunks."""
    fwd, clean = stats["flops_forward"], seq if stats["incremental"] else 0
    return (f"{stats['positions'] - clean:,} positions recomputed" + (" after the clean forward" if clean else " (whole forwards)")
            + f"; {stats['flops'] / fwd:.3f} forwards by FLOPs as run, floor {stats['flops_floor'] / fwd:.3f}; "
            f"{stats['chunks']} chunks")


def start_rule_table(args) -> list[str]:
    """Limit 1: the sweep's cost does not depend on how the text is grouped. The six-edge x every-centre knockout
    sweep of the benchmark clip on the Qwen chat map and on the map of a model whose config names no chat
    vocabulary (all text `question`, from position 0), in forwards measured in the same rounds, with the
    sweep's own counts and what the previous start rule (a cell starts at its first dst query) would run."""
    from hooked_av import HookedQwen2_5Omni
    from hooked_av.inputs.chat import QWEN2_5_CHAT, QWEN2_5_VOCAB
    from patching.engine.hooks import block_attention
    from patching.engine.sweep import attention_layers, first_layer, forward_rows, plan_rows, plan_sweep, run_rows, samples
    from patching.methods.knockout import default_edges, window_layers

    torch.manual_seed(0)
    cfg = config(vocab=QWEN2_5_VOCAB - 1)  # one token short of Qwen2.5's vocabulary: token_map finds no chat ids
    model = HookedQwen2_5Omni.from_config(cfg).eval()
    x = clip_inputs(args.tokens, cfg)
    enc = model.encode(**x)
    L = model.cfg.n_layers
    maps = {"Qwen chat map": model.token_map(x, chat=QWEN2_5_CHAT), "all text question": model.token_map(x)}
    raw = maps["all text question"]
    if not bool(raw.mask("question")[0, 0]) or bool(raw.mask("system").any()):
        raise SystemExit("the map without chat ids should hold all text as question from position 0")
    q0 = int(maps["Qwen chat map"].mask("question")[0].nonzero()[0, 0])
    runs, notes, lib = {}, {}, {}
    for name, tm in maps.items():
        s = samples(model, enc, tm)[0]
        n = s.seq_len
        edges = default_edges(tm)
        cells = [block_attention(tm, src, dst, window_layers(c, 9, L)) for src, dst in edges for c in range(L)]
        stats = plan_sweep(model, n, cells).stats(model.cfg)
        kinds = [attention_layers(iv, L) for iv in cells]
        old = plan_rows(model.cfg, n, [int(tm.select(dst).mask[0].nonzero()[0, 0]) for src, dst in edges for _ in range(L)],
                        [first_layer(iv) for iv in cells], materialised=[m for m, _ in kinds],
                        exact=[e for _, e in kinds]).stats(model.cfg)
        row = f"knockout sweep ({len(cells)} cells), {name}"
        if not runs:
            runs["hooked_av language model forward, last logits"] = lambda s=s: forward_rows(model, s, 1)
        runs[row] = lambda s=s, cells=cells: run_rows(model, s, cells, progress=False)
        lib[row] = None
        notes[row] = (f"{sweep_counts(stats, n)}; the previous start rule (a cell starts at its first dst query) would run "
                      f"{old['positions'] - n:,} positions, {old['flops'] / old['flops_forward']:.2f} forwards by FLOPs")
    times, load = loaded(lambda: measure(runs, args.rounds, lib))
    return ["### Limit 1 (issue 25): the sweep's cost does not depend on how the text is grouped", "",
            f"The six-edge x every-centre knockout sweep (window 9, recompute what changes) of the benchmark clip ({n:,} "
            f"tokens, {L} layers) on two token maps of the same prompt: Qwen's chat ids (`question` is the user's words, "
            f"from position {q0}) and none (all text `question`, from position 0, as for a checkpoint whose tokenizer is "
            f"not a Qwen chat vocabulary: the config here has one token fewer than Qwen2.5's vocabulary, so `token_map` "
            "finds no chat ids, as tests/test_sweep_start_rule.py's family cases do). Target: the second costs about "
            "what the first does (not 15-21 forwards). The counts are the sweep's own `SweepPlan.stats` (FLOPs: "
            "`patching.engine.cost`); the previous rule's are `plan_rows` given each cell's first dst query.", "",
            load, "", HEAD, *ratio_rows(times, "hooked_av language model forward, last logits", graph_notes(lib, notes)), ""]


MASS_SIZES = (4096, 8192, 16384)


def mass_table(args) -> list[str]:
    """Limit 2: `group_attention_mass` against one forward (the same `model(..., return_type=None)` it rides on)
    of one layer at 7B head geometry and at width 1024, from embeddings with a clip's token layout."""
    from hooked_av import HookedQwen2_5Omni
    from hooked_av.viz import group_attention_mass
    from patching.engine.cost import forward_flops

    geometries = [
        ("7B: width 3,584, 28 query / 4 kv heads of 128, MLP 18,944", dict(width=3584, heads=28, kv_heads=4, d_mlp=18944),
         args.mass_7b_sizes, {4096: "1.25x", 8192: "1.47x", 16384: "1.88x"}, "--mass-7b-sizes"),
        ("width 1,024, 8 query / 2 kv heads of 128, MLP 3,072 (3x, as the benchmark model)",
         dict(width=1024, heads=8, kv_heads=2, d_mlp=3072),
         args.mass_1024_sizes, {4096: "1.70x"}, "--mass-1024-sizes")]
    before = os.getloadavg()
    rows = []
    for label, geo, sizes, previous, flag in geometries:
        torch.manual_seed(0)
        model = HookedQwen2_5Omni.from_config(config(1, vocab=2048, **geo)).eval()
        w = synthetic_sample(model, WARM)
        wx = {"inputs_embeds": w.embeds, "position_ids": w.position_ids}
        ran: dict = {}
        for n in sorted(set(sizes)):
            s = synthetic_sample(model, n)
            x = {"inputs_embeds": s.embeds, "position_ids": s.position_ids}
            runs = {"forward": lambda: model(**x, return_type=None), "mass": lambda: group_attention_mass(model, x, s.tm)}
            warm = {"forward": lambda: model(**wx, return_type=None), "mass": lambda: group_attention_mass(model, wx, w.tm)}
            lib = {"mass": None}
            ran[n] = measure(runs, args.rounds, lib, warm), lib["mass"]
            print(f"  group mass {label} {n}: {statistics.median(ran[n][0]['mass'][0]) / statistics.median(ran[n][0]['forward'][0]):.2f}x",
                  flush=True)
        for n in sorted(set(MASS_SIZES) | set(sizes)):
            prev = previous.get(n, "-")
            if n not in ran:
                got = next(iter(ran.items()), None)
                est = ("" if got is None else f"; a forward here would take about "
                       f"{statistics.median(got[1][0]['forward'][0]) * forward_flops(model.cfg, n) / forward_flops(model.cfg, got[0]):,.0f} s "
                       f"CPU (the {got[0]:,}-token row scaled by FLOPs), {2 * args.rounds} such calls with the mass")
                rows.append(f"| {label} | {n:,} | not run | | | | | | {prev} | left out of `make bench`'s ~25 minutes{est}; "
                            f"`{flag} {','.join(str(v) for v in MASS_SIZES)}` runs it |")
                continue
            (times, saved) = ran[n]
            (fc, fw), (mc, mw) = times["forward"], times["mass"]
            rows.append(f"| {label} | {n:,} | {statistics.median(fc):,.2f} | {statistics.median(mc):,.2f} | "
                        f"{min(mc) / min(fc):.2f}x | {statistics.median(mc) / statistics.median(fc):.2f}x | "
                        f"{min(mw) / min(fw):.2f}x | {statistics.median(mw) / statistics.median(fw):.2f}x | {prev} | "
                        + ("no graph" if saved == 0 else f"graph: {saved:,} tensors saved") + " |")
    load = load_note(before, os.getloadavg())
    return ["### Limit 2 (issue 25): `group_attention_mass` against one forward", "",
            "One layer (the language model from embeddings, a synthetic clip layout: video and audio in alternating "
            "chunks of 200 and 50, a question, the last token; every group x group mass of the layer), against the "
            "same forward without the read-out (`model(..., return_type=None)`, what the read-out rides on), in the "
            f"same rounds; warm-up on {WARM} tokens. Target: at most 1.2x a forward at 16k tokens. Previous "
            "implementation (the SDPA plus every block of rows recomputed over every key), as reported, not measured "
            "here: at 7B geometry by issue 25 (one layer; its MLP width not stated), at width 1,024 by commit f1629d1 "
            "(4k tokens, 1 thread, machine loaded).", "",
            load, "",
            "| one layer | tokens | forward CPU s (median) | mass CPU s (median) | mass / forward, CPU min | CPU median | "
            "wall min | wall median | previous (reported) | |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def floor_table(args) -> list[str]:
    """Limit 3: the six-edge x every-centre knockout sweep against its FLOP floor, and a knockout cell as HF takes
    it (a 4D float mask) against HF's plain forward, from embeddings with a clip's token layout."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from hooked_av import HookedQwen2_5Omni
    from patching.engine.hooks import block_attention
    from patching.engine.sweep import forward_rows, plan_sweep, run_rows
    from patching.methods.knockout import default_edges, window_layers

    torch.manual_seed(0)
    L = args.floor_layers
    hf = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config(L), attn_implementation="sdpa").eval()
    model = HookedQwen2_5Omni.from_hf(hf)

    def hf_lm(s, mask=None):
        h = hf.model(inputs_embeds=s.embeds, position_ids=s.position_ids, attention_mask=mask).last_hidden_state
        return hf.lm_head(h[:, -1:])

    def sweep_cells(s):
        return [block_attention(s.tm, a, b, window_layers(c, 9, L)) for a, b in default_edges(s.tm) for c in range(L)]

    w = synthetic_sample(model, WARM)
    w_cells = sweep_cells(w)
    (src, dst), = default_edges(w.tm)[:1]
    if list(window_layers(0, 9, L)) != list(range(L)):
        raise SystemExit(f"--floor-layers {L}: the HF 4D-mask row needs a window of 9 to cover every layer (at most 5 layers)")
    w_mask = hf_cell_mask(w.tm, src, dst)
    check_hf_cell(lambda: hf_lm(w, w_mask)[:, -1], lambda: model.run_with_hooks(
        inputs_embeds=w.embeds, position_ids=w.position_ids, fwd_hooks=w_cells[0], logits_at="last")[:, -1])
    before = os.getloadavg()
    out, summary = [], []
    base = "hooked_av language model forward, last logits"
    for n in args.floor_sizes:
        s = synthetic_sample(model, n)
        cells = sweep_cells(s)
        stats = plan_sweep(model, n, cells).stats(model.cfg)
        row = f"knockout sweep ({len(cells)} cells), recompute what changes"
        runs = {base: lambda s=s: forward_rows(model, s, 1), row: lambda s=s, c=cells: run_rows(model, s, c, progress=False)}
        warm = {base: lambda: forward_rows(model, w, 1), row: lambda: run_rows(model, w, w_cells, progress=False)}
        hf_rows = n <= args.hf_mask_max
        hf_base, mask_row = "HF sdpa language model forward, last logits", f"HF sdpa, one knockout cell ({src} -> {dst}) as a 4D float mask"
        if hf_rows:
            m = hf_cell_mask(s.tm, src, dst)
            runs[hf_base], runs[mask_row] = (lambda s=s: hf_lm(s)), (lambda s=s, m=m: hf_lm(s, m))
            warm[hf_base], warm[mask_row] = (lambda: hf_lm(w)), (lambda: hf_lm(w, w_mask))
        lib = {row: None}
        times, load = loaded(lambda: measure(runs, args.rounds, lib, warm))
        notes = {row: sweep_counts(stats, n)}
        if hf_rows:
            notes[mask_row] = mask_note(times, mask_row, hf_base)
        out += [f"#### {n:,} tokens, {L} layers", "", load, "", HEAD,
                *ratio_rows(times, base, graph_notes(lib, notes)), ""]
        (sc, sw), (fc, fw) = times[row], times[base]
        floor = stats["flops_floor"] / stats["flops_forward"]
        summary.append(f"| {n:,} | {L} | {len(cells)} | {min(sc) / min(fc):.3f}x | {statistics.median(sc) / statistics.median(fc):.3f}x | "
                       f"{min(sw) / min(fw):.3f}x | {stats['flops'] / stats['flops_forward']:.3f} | {floor:.3f} | "
                       f"{min(sc) / min(fc) / floor:.3f} | {statistics.median(sc) / statistics.median(fc) / floor:.3f} | {stats['chunks']} |")
        print(f"  floor {n}: sweep {statistics.median(sc) / statistics.median(fc):.3f} forwards, floor {floor:.3f}", flush=True)
    load = load_note(before, os.getloadavg())
    deep = (f"the benchmark model's width with {L} layers, not its {LAYERS}: at {LAYERS} layers 5 interleaved rounds of a "
            "16k-token forward and the sweep would add about 7 minutes (5 x the scaling table's one call of each) to "
            "`make bench`'s ~25; the scaling table below gives the 8-layer model's sweep at 4k and 16k by FLOPs beside "
            "one timed call each") if L != LAYERS else f"the benchmark model ({LAYERS} layers)"
    return ["### Limit 3 (issue 25): the sweep against its FLOP floor", "",
            f"The six-edge x every-centre knockout sweep (a centre per layer, window 9, recompute what changes) of a "
            f"synthetic clip layout, from embeddings, on {deep}; against one hooked_av forward reading the last logits, "
            f"in the same rounds (warm-up on {WARM} tokens). By FLOPs: the sweep's own `SweepPlan.stats` "
            "(`patching.engine.cost`): as run, and the floor (the same positions and blocks, each query reading only the "
            "keys up to itself), both in one forward's FLOPs. Target: measured within 10% of the floor (measured / floor "
            f"<= 1.10). Up to {args.hf_mask_max:,} tokens, HF's plain sdpa forward and a knockout cell as HF takes it (a "
            "4D float mask, checked equal to the hooked_av cell) run in the same rounds.", "",
            load, "",
            "| tokens | layers | cells | sweep / forward, CPU min | CPU median | wall min | by FLOPs as run | floor | "
            "measured / floor, CPU min | CPU median | chunks |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *summary, "", *out]


def limits_tables(args) -> list[str]:
    """Issue 25's four limits (the fourth, a 4D-mask cell in HF, is a row of the floor table and of the nnsight one)."""
    return [*start_rule_table(args), *mass_table(args), *floor_table(args)]


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
        return run_rows(model, s, cells, progress=False, stats=stats)

    stats: dict = {}  # the sweep's SweepPlan.stats
    with torch.no_grad():
        run(synthetic_sample(model, 128))  # warm-up
        s = synthetic_sample(model, n)
        before = rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS (Linux)
        c, w = time.process_time(), time.perf_counter()
        run(s)
        c, w = time.process_time() - c, time.perf_counter() - w
    got = {"op": op, "n": n, "wall": w, "cpu": c, "peak": rss("VmHWM") - before}
    if stats:
        got.update(flops=stats["flops"] / stats["flops_forward"], floor=stats["flops_floor"] / stats["flops_forward"])
    return got


def rss(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (the peak since the last reset) of this process, bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def scaling_table(args) -> list[str]:
    res: dict = {}
    before = os.getloadavg()
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
           "recompute what changes; `sweep by FLOPs` and `floor`: its cost in forwards by FLOPs as run and at the causal "
           "floor (`SweepPlan.stats`, `patching.engine.cost`). `patterns`: run_with_cache of every LM pattern (only up to "
           f"{args.patterns_max:,} tokens: it grows with tokens squared). "
           + (f"Every size runs the model's {LAYERS} layers." if args.full_depth_max >= max(args.sizes) else
              f"Up to {args.full_depth_max:,} tokens the model has its {LAYERS} layers; above, the same width with "
              f"{args.long_layers} layers (scaled down: ratios to the forward of the same model still read as they do "
              "at full depth; absolute seconds do not)."), "", load_note(before, os.getloadavg()), "",
           "| tokens | HF sdpa s | forward s | forward / HF | attention_rows s | rows / forward (time) | rows / forward (peak memory) | sweep s | sweep / forward | sweep by FLOPs | floor | patterns s | forward MiB | rows MiB | patterns MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        f, r, sw, h = res["forward", n], res["attention_rows", n], res["sweep", n], res["hf_sdpa", n]
        p = res.get(("patterns", n))
        out.append(f"| {n:,} | {h['cpu']:.2f} | {f['cpu']:.2f} | {f['cpu'] / h['cpu']:.2f}x | {r['cpu']:.2f} | "
                   f"{r['cpu'] / f['cpu']:.2f}x | {r['peak'] / max(f['peak'], 1):.2f}x | {sw['cpu']:.2f} | "
                   f"{sw['cpu'] / f['cpu']:.2f}x | {sw['flops']:.2f} | {sw['floor']:.2f} | {'-' if p is None else format(p['cpu'], '.2f')} | "
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
    ap.add_argument("--only", help="comma-separated sections among main, harvest, limits, scaling: print their "
                                   "markdown only (writes no file), e.g. --only limits")
    ap.add_argument("--mass-7b-sizes", default="4096", help="tokens of the group-mass table at one 7B layer")
    ap.add_argument("--mass-1024-sizes", default="4096,8192,16384", help="tokens of the group-mass table at width 1024")
    ap.add_argument("--floor-sizes", default="4096,16384", help="tokens of the sweep-against-its-floor table")
    ap.add_argument("--floor-layers", type=int, default=2, help="layers of the floor table's model (benchmark width)")
    ap.add_argument("--hf-mask-max", type=int, default=4096,
                    help="longest size of the floor table that also runs HF's forward and a 4D-mask cell")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--scale-one", nargs=2, metavar=("OP", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scale_one:
        print(json.dumps(scale_one(args.scale_one[0], int(args.scale_one[1]), args.threads, args.scale_layers)))
        return
    if args.rounds < 5:
        raise SystemExit(f"--rounds must be >= 5 for a min and a median worth reading, got {args.rounds}")
    for k in ("sizes", "mass_7b_sizes", "mass_1024_sizes", "floor_sizes"):
        setattr(args, k, [int(v) for v in getattr(args, k).split(",") if v])
    sections = ("main", "harvest", "limits", "scaling")
    only = sections if args.only is None else tuple(v.strip() for v in args.only.split(","))
    bad = [v for v in only if v not in sections]
    if bad:
        raise SystemExit(f"--only takes sections among {', '.join(sections)}, got {', '.join(bad)}")
    torch.set_num_threads(args.threads)
    if args.harvest_only:
        print("\n".join(harvest_table(args)))
        return
    t0, load0 = time.time(), os.getloadavg()
    body = []
    for name, fn in (("main", main_tables), ("harvest", harvest_table), ("limits", limits_tables)):
        if name in only:
            body += fn(args)
    print("\n".join(body), flush=True)
    if "scaling" in only:
        scaled = scaling_table(args)
        body += scaled
        if args.only is not None:
            print("\n".join(scaled))
    if args.only is not None:
        print(f"(--only {args.only}: {(time.time() - t0) / 60:.1f} min; no file written)")
        return
    load1 = os.getloadavg()
    cpu = cpu_name()
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
