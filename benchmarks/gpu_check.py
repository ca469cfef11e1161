"""The real-scale check for an accelerator machine (issues 12 and 25): one command, one markdown table per model.

    benchmarks/gpu_check.sh [--lengths 4096,16384,32768] [--families ...] [--qwen3-layers auto] [--out FILE]
    benchmarks/gpu_check.sh --tiny      tiny configs of all three families on the CPU (lengths 512,1024): checks the script

Models, random weights, no download: Qwen2.5-Omni-7B's Thinker (8.93B parameters: HF's default Thinker config with
the 7B's 1,280-wide vision tower), Qwen3-Omni-30B-A3B's
Thinker (the released text dimensions: 2,048 wide, 32 / 4 heads of 128, 128 experts with 8 active; `--qwen3-layers`
of its 48 layers, `auto`: as many as fit, see `qwen3_layers`) and video-SALMONN 2+ 7B (its language model is
Qwen2.5-VL-7B's: 3,584 wide, 28 layers, 28 / 4 heads). Each is built on the meta device and materialised in bf16
on cuda (float32 on the CPU with --tiny), the HF reference and the hooked model sharing one copy of the weights
(checked). The input at each length is a clip's token layout (benchmarks/run_all.py `synthetic_sample`: video and
audio in alternating chunks, a question, the last token) given to the language model as embeddings; the towers
never run (harvest aside).

Rows per length (those that do not apply to a family say so in its table): HF sdpa language-model forward with
`use_cache=False` and the hooked forward (last logits; the note gives their largest logit difference);
`attention_rows` of the last query and of the last 64 queries (every layer and head); `group_attention_mass`
(every layer); the six-edge x every-centre knockout sweep (`run_rows`, window 9; the note gives the sweep
engine's planned cost in forwards); HF eager with `output_attentions=True` (an out-of-memory error is caught,
recorded as OOM with the first length that ran out, and memory freed); the nnsight HF backend, one cell per call
(a different edge each call; it wraps a twin HF model over the same weights, so the HF rows time a model nnsight
never touched); greedy generation of `--new-tokens` tokens with a KV cache, plain and under a knockout
(block_attention video -> last at every step; the note splits prefill and decode). Then, on the Qwen2.5-Omni model,
benchmarks/harvest_check.py's table (harvest at one layer: throughput, disk per million media tokens).

Method: each row's contenders run after one warm-up call each, then `--rounds` (>= 5) rounds calling each once,
the order rotated every round (benchmarks/run_all.py's interleaving); seconds from torch.cuda.synchronize to
torch.cuda.synchronize; min and median; `/ forward` = the row's median / the hooked forward's median at that length
(its own row, same process); peak = torch.cuda.max_memory_allocated (reset before every call) above what was
allocated just before the call (the loaded models and the inputs), the largest over the rounds. Every call runs
under torch.no_grad. Time: `--budget` seconds for the whole run, shared between the models (SHARES) and, within a
model, between its lengths in proportion to a forward's FLOPs (`patching.engine.cost.forward_flops`); before a row
runs, and again after its warm-up, the time its rounds need is estimated, and a row that would not fit is skipped
with the estimate printed (as is every row after a length's time is spent): nothing is left out silently.
`--tiny` runs one torch thread (tiny matrices gain nothing from more, and lose much on a shared CPU).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

T0 = time.perf_counter()  # the budget counts from here: imports included

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import synthetic_sample  # noqa: E402

FAMILIES = ("qwen2_5_omni", "qwen3_omni", "video_salmonn2")
TITLES = {"qwen2_5_omni": "Qwen2.5-Omni-7B Thinker", "qwen3_omni": "Qwen3-Omni-30B-A3B Thinker",
          "video_salmonn2": "video-SALMONN 2+ 7B (Qwen2.5-VL-7B language model)"}
# the share of the run's time each part gets, of what is left when it starts (unused time passes on)
SHARES = {"qwen2_5_omni": 0.40, "harvest": 0.06, "qwen3_omni": 0.31, "video_salmonn2": 0.23}
QWEN3_RELEASED_LAYERS = 48
WINDOW = 9

HF = "HF sdpa forward, use_cache=False"
FWD = "hooked_av forward"
ROWS1 = "attention_rows, last query"
ROWS64 = "attention_rows, last 64 queries"
MASS = "group_attention_mass"
SWEEP = "knockout sweep (run_rows)"
EAGER = "HF eager, output_attentions=True"
NNSIGHT = "nnsight HF backend, one cell"
GEN = "generate, plain"
GEN_KO = "generate under a knockout"
ROWS = (HF, FWD, ROWS1, ROWS64, MASS, SWEEP, EAGER, NNSIGHT, GEN, GEN_KO)
# rows measured together (interleaved), in the order they run: the ones that matter most first
GROUPS = ((HF, FWD), (ROWS1, ROWS64), (MASS,), (SWEEP,), (EAGER,), (NNSIGHT,), (GEN, GEN_KO))
# a call's cost in forwards, guessed before its warm-up has been timed (to skip a row that cannot fit)
PRIOR = {HF: 1, FWD: 1, ROWS1: 1, ROWS64: 1, MASS: 1.5, SWEEP: 2, EAGER: 2, NNSIGHT: 2, GEN: 1.5, GEN_KO: 2}
BUDGET_NOTE = "the 8-minute budget of one H100 run goes to the rows above"


# ---- time --------------------------------------------------------------------------------------------------------

class Budget:
    """`seconds` from the moment it is made (or `start`); `clock` is injectable for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter, start: float | None = None):
        self.seconds, self.clock = float(seconds), clock
        self.start = clock() if start is None else start

    @property
    def spent(self) -> float:
        return self.clock() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.spent

    def part(self, weight: float, rest: float) -> "Budget":
        """A new budget of `weight / (weight + rest)` of the time left (none when it is spent)."""
        return Budget(max(self.left, 0.0) * weight / (weight + rest), self.clock)


class Device:
    """Timed calls on one device: synchronised, under torch.no_grad, peak memory above the call's start,
    an out-of-memory error caught (and the memory it left freed)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def call(self, fn: Callable[[], object]) -> tuple[float | None, int | None, str | None]:
        """(seconds, peak bytes above the allocation at the call's start or None on the CPU, None) or
        (None, None, the out-of-memory message)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        error = None
        t = time.perf_counter()
        try:
            with torch.no_grad():
                fn()
            self.sync()
        except Exception as e:  # the traceback (and the tensors its frames hold) is dropped here
            if not out_of_memory(e):
                raise
            error = (str(e).strip().splitlines() or ["out of memory"])[0][:160]
        t = time.perf_counter() - t
        if error is not None:
            self.free()
            return None, None, error
        return t, (torch.cuda.max_memory_allocated() - base) if self.cuda else None, None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def out_of_memory(e: BaseException | None) -> bool:
    """Whether `e` is torch's out-of-memory error or was raised from one (a library may wrap it)."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass
class Cell:
    """One row at one length: its timed rounds, or why it has none (`status`: "OOM", "skipped: ...",
    "left out: ...")."""

    row: str
    times: list = field(default_factory=list)
    peak: int | None = None
    status: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure_group(contenders: dict[str, Callable[[], object]], rounds: int, budget: Budget, dev: Device,
                  forward_s: float | None = None, prior: dict | None = None) -> dict[str, Cell]:
    """Warm-up calls, then `rounds` rounds calling every contender once, the order rotated by one each round.
    Skipped with the reason when `budget` is spent, when `prior` (forwards a call) x `forward_s` x (rounds + 1)
    exceeds what is left before the warm-up, or when `rounds` x the warm-ups' seconds exceeds it after them.
    A contender that runs out of memory is "OOM" (the others go on)."""
    cells = {k: Cell(k) for k in contenders}
    prior = PRIOR if prior is None else prior

    def skip(reason: str) -> dict[str, Cell]:
        for c in cells.values():
            if not c.status:
                c.status = "skipped: " + reason
        return cells

    if budget.left <= 0:
        return skip(f"this length's {budget.seconds:.0f} s were spent ({budget.spent:.0f} s)")
    if forward_s is not None:
        guess = sum(prior.get(k, 1) for k in contenders) * forward_s * (rounds + 1)
        if guess > budget.left:
            return skip(f"{rounds} rounds and a warm-up would take about {guess:.0f} s (about "
                        f"{sum(prior.get(k, 1) for k in contenders):g} forwards of {forward_s:.3g} s a round); "
                        f"{budget.left:.0f} s of this length's {budget.seconds:.0f} s were left")
    warm = {}
    for k, fn in contenders.items():
        t, _, error = dev.call(fn)
        if error is not None:
            cells[k].status, cells[k].note = "OOM", f"out of memory in the warm-up: {error}"
        else:
            warm[k] = t
    need = rounds * sum(warm.values())
    if warm and need > budget.left:
        return skip(f"{rounds} rounds would take about {need:.0f} s (warm-up {sum(warm.values()):.3g} s); "
                    f"{max(budget.left, 0):.0f} s of this length's {budget.seconds:.0f} s were left")
    live = list(warm)
    for r in range(rounds if live else 0):
        for k in live[r % len(live):] + live[: r % len(live)]:
            if cells[k].status:
                continue
            t, peak, error = dev.call(contenders[k])
            if error is not None:
                cells[k].status, cells[k].note = "OOM", f"out of memory in round {r + 1}: {error}"
                continue
            cells[k].times.append(t)
            if peak is not None:
                cells[k].peak = max(peak, cells[k].peak or 0)
    return cells


# ---- models --------------------------------------------------------------------------------------------------------

def randomise(module: torch.nn.Module, device) -> None:
    """Random weights of a plausible scale in place (matrices N(0, 0.02), norms 1, biases 0), and the rotary
    inverse frequencies `to_empty` left unset."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if "norm" in name or "ln" in name else 0.0)
    reset_rotary(module, device)


def reset_rotary(module: torch.nn.Module, device) -> None:
    """The rotary inverse frequencies of HF's rotary modules, which `to_empty` (or an empty buffer) left unset."""
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "inv_freq") and hasattr(m, "compute_default_rope_parameters") and hasattr(m, "config"):
                inv, _ = m.compute_default_rope_parameters(m.config, device=device)
                m.inv_freq.copy_(inv)
                if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
                    m.original_inv_freq.copy_(inv)


def twin(hf, cls, cfg, dtype, device):
    """A second HF model object over the same weight tensors (assigned, not copied): the nnsight backend replaces
    every module's `forward` with its own wrapper for good, so it gets this one, and the HF rows time a model
    nnsight never touched."""
    t = on_meta(cls, cfg, dtype)
    t.load_state_dict(hf.state_dict(), strict=True, assign=True)
    for m in t.modules():  # non-persistent buffers (rotary frequencies, tower tables) are not in the state dict
        for name, buf in list(m._buffers.items()):
            if buf is not None and buf.is_meta:
                m._buffers[name] = torch.empty_like(buf, device=device)
    reset_rotary(t, device)
    return t.eval()


def on_meta(cls, cfg, dtype):
    with torch.device("meta"):
        return cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def qwen2_5_config(tiny: bool):
    """HF's default Thinker config, the 7B Thinker's (docs/models.md: 8.93B parameters) once its vision tower is
    made 1,280 wide, or a tiny one; with the vision start / end ids the harvest's clip layout reads."""
    from transformers import Qwen2_5OmniThinkerConfig

    cfg = Qwen2_5OmniThinkerConfig(vision_config=dict(hidden_size=1280))  # HF's default tower is 3,584 wide, the 7B's 1,280
    if tiny:
        cfg = Qwen2_5OmniThinkerConfig(
            text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                     "mrope_section": [2, 3, 3]}),
            audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64),
            vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                               fullatt_block_indexes=[0]))
    cfg.vision_start_token_id, cfg.vision_end_token_id = 151652, 151653
    return cfg


def qwen3_config(tiny: bool, layers: int):
    """Qwen3-Omni-30B-A3B's Thinker with `layers` text layers (docs/models.md section 4: the released sizes;
    the towers are the class defaults, equal to the released ones, projecting to 2,048), or a tiny one."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_interleaved": True}
    if tiny:
        text = dict(vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    mlp_only_layers=[1], rope_parameters=dict(rope, mrope_section=[4, 2, 2]))
        towers = dict(audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                        d_model=16, output_dim=32, n_window=50, n_window_infer=200,
                                        downsample_hidden_size=8, max_source_positions=200),
                      vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=16,
                                         temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=32,
                                         num_position_embeddings=16, deepstack_visual_indexes=[0]))
    else:
        text = dict(vocab_size=152064, hidden_size=2048, intermediate_size=768, num_hidden_layers=layers,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                    moe_intermediate_size=768, mlp_only_layers=[], decoder_sparse_step=1, norm_topk_prob=True,
                    max_position_embeddings=65536, rope_parameters=dict(rope, mrope_section=[24, 20, 20]))
        towers = dict(audio_config=dict(output_dim=2048), vision_config=dict(out_hidden_size=2048))
    cfg = Qwen3OmniMoeThinkerConfig(text_config=dict(text, rms_norm_eps=1e-6), **towers, position_id_per_seconds=13,
                                    audio_token_id=151675, image_token_id=151655, video_token_id=151656,
                                    audio_start_token_id=151669)
    cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.audio_end_token_id = 151652, 151653, 151670
    return cfg


def salmonn_config(tiny: bool) -> dict:
    """config.json as video-SALMONN 2+'s repository writes it (tests/salmonn_helpers.py `salmonn_config`): a
    Qwen2.5-VL config with flat text fields plus `audio_config` (Whisper, with `qformer_config`). Real: the 7B's
    language model (Qwen2.5-VL-7B: docs/models.md), Qwen2.5-VL's vision tower, whisper-large-v3 and the Q-Former's
    code defaults; tiny: the tests' sizes."""
    from transformers import Qwen2_5_VLConfig

    if tiny:
        text = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=[2, 3, 3])
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[0])
        whisper = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32)
        qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    else:
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24])
        vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        whisper = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120)
        qformer = dict(hidden_size=3072, num_hidden_layers=2, num_attention_heads=12, intermediate_size=12288)
    section = text.pop("mrope_section")
    vl = Qwen2_5_VLConfig(
        text_config=dict(text, rms_norm_eps=1e-6, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}),
        vision_config=dict(vision, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False)
    d = vl.to_dict()
    flat = d.pop("text_config")
    d.update({k: v for k, v in flat.items() if k not in ("model_type", "architectures", "dtype")})
    rope = d.pop("rope_parameters")
    d["rope_theta"], d["rope_scaling"] = rope["rope_theta"], {"type": "mrope", "mrope_section": rope["mrope_section"]}
    d["architectures"], d["audio_token_id"] = ["video_SALMONN2_plus"], 151665
    d["audio_config"] = dict(
        whisper, num_mel_bins=128, max_source_positions=1500, encoder_layerdrop=0.0, second_per_window=0.5,
        second_stride=0.5, qformer_config=dict(qformer, encoder_width=whisper["d_model"], cross_attention_freq=1,
                                               layer_norm_eps=1e-12, query_length=1, add_cross_attention=True,
                                               hidden_act="gelu", out_hidden_size=text["hidden_size"]))
    return d


@dataclass
class Built:
    """A family's hooked model and its HF reference sharing the weights: `decoder` (the HF text decoder, called
    with embeddings), `head` (its unembedding), `hf` (the whole HF model, for eager attention; None where transformers
    has no class for the family), `nnsight_hf` (a twin of `hf` over the same tensors, for the nnsight backend)."""

    model: object
    decoder: object
    head: object
    hf: object | None
    note: str
    nnsight_hf: object | None = None  # `twin(hf)`, for the nnsight backend
    backend: object | None = None


def build_family(family: str, tiny: bool, device: str, dtype, qwen3_layers: int = QWEN3_RELEASED_LAYERS,
                 nnsight: bool = False) -> Built:
    """The family's HF model built on the meta device, materialised on `device` in `dtype` with random weights
    (`randomise`), and the hooked model made from the same tensors (no copy: checked); with `nnsight`, a twin HF
    model over them too (`twin`)."""
    if family == "qwen2_5_omni":
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Cls

        from hooked_av import HookedQwen2_5Omni as Hooked
        cfg = qwen2_5_config(tiny)
    elif family == "qwen3_omni":
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerForConditionalGeneration as Cls,
        )

        from hooked_av import HookedQwen3Omni as Hooked
        cfg = qwen3_config(tiny, 3 if tiny else qwen3_layers)
    elif family == "video_salmonn2":
        return build_salmonn(tiny, device, dtype)
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    hf = on_meta(Cls, cfg, dtype).to_empty(device=device).eval()
    randomise(hf, device)
    model = Hooked.from_hf(hf, device=device).eval()
    decoder, head = hf.get_decoder(), hf.get_output_embeddings()
    other = twin(hf, Cls, cfg, dtype, device) if nnsight else None
    return Built(model, decoder, head, hf, shared_note(model, decoder, head, other), other)


def build_salmonn(tiny: bool, device: str, dtype) -> Built:
    """video-SALMONN 2+ has no transformers class: the HF reference is its language model, Qwen2.5-VL's text model
    and an lm_head, built on the meta device and materialised; the hooked model is loaded from those tensors
    (the checkpoint's `model.*` / `lm_head.weight` keys) and from random tower weights given under its own
    parameter names (the key converter passes a name it does not know through unchanged, and the loader takes it)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from hooked_av import HookedVideoSALMONN2
    from hooked_av.families.video_salmonn2.weights import convert_key, split_config

    config = salmonn_config(tiny)
    text_cfg = split_config(config)[0].text_config
    decoder = on_meta(Qwen2_5_VLTextModel, text_cfg, dtype)
    with torch.device("meta"):
        head = torch.nn.Linear(text_cfg.hidden_size, text_cfg.vocab_size, bias=False, dtype=dtype)
    decoder, head = decoder.to_empty(device=device).eval(), head.to_empty(device=device)
    pair = torch.nn.ModuleDict({"model": decoder, "lm_head": head})
    randomise(pair, device)
    lm = [("model." + k, v) for k, v in decoder.state_dict().items()] + [("lm_head.weight", head.weight.detach())]
    covered = {name for k, v in lm for name, _ in (convert_key(k, v) or [])}
    meta = HookedVideoSALMONN2.from_config(config, dtype=dtype, device="meta")
    towers = [(n, torch.empty(p.shape, dtype=dtype, device=device)) for n, p in meta.named_parameters() if n not in covered]
    randomise(torch.nn.ParameterDict({n.replace(".", "_"): torch.nn.Parameter(t) for n, t in towers}), device)
    del meta
    model = HookedVideoSALMONN2._build_and_load(config, lm + towers, "random weights", dtype, device, {}).eval()
    return Built(model, decoder, head, None, shared_note(model, decoder, head))


def shared_note(model, decoder, head, other=None) -> str:
    """Whether the hooked model, the HF reference (and its twin for nnsight) hold one copy of the weights."""
    same = (model.embed.weight.data_ptr() == decoder.get_input_embeddings().weight.data_ptr()
            and model.unembed.weight.data_ptr() == head.weight.data_ptr()
            and (other is None or weight_bytes(torch.nn.ModuleList([model, other])) == weight_bytes(model)))
    who = "HF, hooked_av and the nnsight backend's HF twin" if other is not None else "HF and hooked_av"
    return f"{who} share the weight tensors" if same else f"{who} hold separate copies of the weights"


def weight_bytes(module) -> int:
    """Bytes of the distinct parameter storages of `module` (shared tensors once)."""
    seen = {}
    for p in module.parameters():
        seen[p.untyped_storage().data_ptr() if p.device.type != "meta" else id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def qwen3_layers(longest: int, free_bytes: int, margin: float = 4 * 2**30) -> tuple[int, str]:
    """The most text layers (at most the released 48) of Qwen3-Omni-30B-A3B's Thinker whose bf16 weights (counted on
    the meta device: towers, embeddings, N layers; one copy, HF and hooked_av share it) plus the largest row's
    activations at `longest` tokens plus `margin` fit `free_bytes`. The largest row is `attention_rows` of the
    last 64 queries: its output, [layers, 1, heads, 64, tokens] in bf16, held twice while the layers are stacked,
    plus one layer's fp32 softmax. The other rows hold less at 48 layers and 32,768 tokens: a forward 2.3 GiB
    (`patching.engine.cost.run_bytes`), the sweep 11.4 GiB as its plan counts it in fp32 (`plan_sweep(...).stats`),
    `group_attention_mass` a few GiB (a block of `block_rows`, 64, query rows at a time). Returns (layers, the reckoning)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    one, two = (weight_bytes(on_meta(Qwen3OmniMoeThinkerForConditionalGeneration, qwen3_config(False, n), torch.bfloat16))
                for n in (1, 2))
    per_layer, fixed = two - one, 2 * one - two
    heads = 32

    def activations(n: int) -> float:
        return 2 * n * heads * 64 * longest * 2 + heads * 64 * longest * 4

    n = QWEN3_RELEASED_LAYERS
    while n > 1 and fixed + n * per_layer + activations(n) + margin > free_bytes:
        n -= 1
    gib = 2**30
    return n, (f"{n} of {QWEN3_RELEASED_LAYERS} layers: weights {(fixed + n * per_layer) / gib:.1f} GiB ({fixed / gib:.1f} "
               f"towers and embeddings + {per_layer / gib:.2f} a layer) + attention_rows' 64 queries at {longest:,} tokens "
               f"{activations(n) / gib:.1f} GiB + {margin / gib:.0f} GiB margin <= {free_bytes / gib:.1f} GiB free")


# ---- one family ----------------------------------------------------------------------------------------------------

LEFT_OUT = {
    "qwen3_omni": {
        EAGER: "left out: output_attentions keeps every layer's heads x tokens^2 pattern, {eager}, beside the "
               "weights (the Qwen2.5-Omni table shows where HF eager runs out)",
        NNSIGHT: f"left out: the backend's per-cell cost is measured on Qwen2.5-Omni-7B; {BUDGET_NOTE}",
        GEN: f"left out: generation is the template's code for every family (measured on Qwen2.5-Omni-7B); {BUDGET_NOTE}",
        GEN_KO: f"left out: as the plain generation; {BUDGET_NOTE}",
    },
    "video_salmonn2": {
        EAGER: "left out: the language model has Qwen2.5-Omni-7B's dimensions and HF attention code, and that table "
               f"has this row; {BUDGET_NOTE}",
        NNSIGHT: "left out: video-SALMONN 2+ is not a transformers class, and the nnsight backend wraps a stock HF model",
        GEN: f"left out: generation is the template's code for every family (measured on Qwen2.5-Omni-7B); {BUDGET_NOTE}",
        GEN_KO: f"left out: as the plain generation; {BUDGET_NOTE}",
    },
}


def run_length(b: Built, n: int, args, budget: Budget, dev: Device, left_out: dict) -> list[Cell]:
    """Every row at `n` tokens."""
    from hooked_av.viz.attention_mass import DEFAULT_GROUPS, group_attention_mass
    from patching.engine.hooks import block_attention
    from patching.engine.sweep import forward_rows, run_rows
    from patching.methods.knockout import default_edges, window_layers

    model, L = b.model, b.model.cfg.n_layers
    device, dtype = model.cfg.device, model.cfg.dtype
    s = synthetic_sample(model, n)
    s.embeds = s.embeds.to(device, dtype) * 0.05
    s.position_ids = s.position_ids.to(device)
    inputs = {"inputs_embeds": s.embeds, "position_ids": s.position_ids}
    edges = default_edges(s.tm)
    cells_ko = [block_attention(s.tm, src, dst, window_layers(c, WINDOW, L)) for src, dst in edges for c in range(L)]
    middle = window_layers(L // 2, WINDOW, L)
    knockout = block_attention(s.tm, "video", "last", middle)

    def hf_forward():
        h = b.decoder(inputs_embeds=s.embeds, position_ids=s.position_ids, use_cache=False).last_hidden_state
        return b.head(h[:, -1])

    def eager():
        if args.oom_at == n:  # the test's way into the out-of-memory path (--oom-at)
            raise torch.cuda.OutOfMemoryError(f"simulated by --oom-at {n}")
        b.hf.set_attn_implementation("eager")
        try:
            out = b.decoder(inputs_embeds=s.embeds, position_ids=s.position_ids, use_cache=False, output_attentions=True)
        finally:
            b.hf.set_attn_implementation("sdpa")
        if out.attentions is None or len(out.attentions) != L:
            raise RuntimeError(f"HF eager returned {0 if out.attentions is None else len(out.attentions)} attention "
                               f"patterns for {L} layers: output_attentions was not honoured")
        return b.head(out.last_hidden_state[:, -1])

    turn = [0]
    nn_cells = [block_attention(s.tm, src, dst, middle) for src, dst in edges]

    def nnsight_cell():
        if b.backend is None:
            from patching.backends.nnsight_hf import NNsightHF

            b.backend = NNsightHF(b.nnsight_hf)
        turn[0] += 1
        return b.backend.run(inputs, list(nn_cells[(turn[0] - 1) % len(nn_cells)]))[0]

    split: dict[str, list] = {GEN: [], GEN_KO: []}

    def generate(name: str, hooks: list):
        def run():
            t0 = time.perf_counter()
            inner = model.run_language_model  # the first call is the prefill: its end splits prefill from decode
            done = []

            def timed(*a, **k):
                out = inner(*a, **k)
                if not done:
                    dev.sync()
                    done.append(time.perf_counter())
                return out

            model.run_language_model = timed
            try:
                with model.hooks(fwd_hooks=hooks):
                    new = model.generate(inputs_embeds=s.embeds, position_ids=s.position_ids,
                                         max_new_tokens=args.new_tokens, return_type="tokens")
            finally:
                del model.run_language_model
            dev.sync()
            split[name].append((done[0] - t0, time.perf_counter() - done[0], new.shape[1]))
        return run

    contenders = {
        HF: hf_forward, FWD: lambda: forward_rows(model, s, 1),
        ROWS1: lambda: model.attention_rows(inputs, [n - 1]),
        ROWS64: lambda: model.attention_rows(inputs, list(range(n - 64, n))),
        MASS: lambda: group_attention_mass(model, inputs, s.tm),
        SWEEP: lambda: run_rows(model, s, cells_ko, progress=False),
        EAGER: eager, NNSIGHT: nnsight_cell,
        GEN: generate(GEN, []), GEN_KO: generate(GEN_KO, list(knockout)),
    }
    out: dict[str, Cell] = {}
    forward_s = None
    for group in GROUPS:
        run = {k: contenders[k] for k in group if k not in left_out}
        for k in group:
            if k in left_out:
                out[k] = Cell(k, status=left_out[k])
        if not run:
            continue
        print(f"  {n:,} tokens: {', '.join(run)} ({budget.left:.0f} s left)", file=sys.stderr, flush=True)
        got = measure_group(run, args.rounds, budget, dev, forward_s)
        out.update(got)
        if FWD in got and got[FWD].times:
            forward_s = args.forward_at[n] = got[FWD].median
    dev.free()
    # notes: what each row did, from the measured runs and the sweep's own plan
    if out[HF].times and out[FWD].times:
        with torch.no_grad():
            ref, ours = hf_forward().float(), forward_rows(model, s, 1).float()
        out[HF].note = (f"max abs diff of the last logits vs hooked_av: {(ref - ours).abs().max().item():.3g} "
                        f"(largest abs logit {ref.abs().max().item():.3g})")
    if out[SWEEP].times:
        from patching.engine.sweep import plan_sweep

        st = plan_sweep(model, n, cells_ko).stats(model.cfg)
        out[SWEEP].note = (f"{len(cells_ko)} cells ({len(edges)} edges x {L} centres, window {WINDOW}); / forward: the "
                           f"sweep's cost in forwards, planned "
                           f"{st['forwards']:.2f} forwards by FLOPs (floor {st['flops_floor'] / st['flops_forward']:.2f}), "
                           f"{st['chunks']} chunks")
    if out[MASS].times:
        groups = [g for g in DEFAULT_GROUPS if bool(s.tm.mask(g).any())]
        out[MASS].note = f"{len(groups)} groups ({', '.join(groups)}) x {L} layers, every head"
    if out[EAGER].times:
        out[EAGER].note = f"attentions of all {L} layers returned"
    if out[NNSIGHT].times:
        out[NNSIGHT].note = (f"/ forward: forwards per cell; a different cell each call ({len(nn_cells)} edges at centre "
                             f"{L // 2}, window {WINDOW}); "
                             "the backend runs the whole Thinker forward (logits at every position), on a twin HF "
                             "model over the same weights")
    for name in (GEN, GEN_KO):
        timed = split[name][1:]  # the warm-up call's split is left out
        if out[name].times and timed:
            prefill = sorted(t for t, _, _ in timed)[len(timed) // 2]
            decode = sorted(t for _, t, _ in timed)[len(timed) // 2]
            new = timed[0][2]
            what = "" if name == GEN else f"block_attention video -> last in layers {middle.start}-{middle.stop - 1}; "
            out[name].note = (f"{what}{new} new tokens (greedy, KV cache): {new / out[name].median:.1f} tokens/s in all; "
                              f"prefill {prefill:.3g} s, decode {new / decode:.1f} tokens/s (medians)")
    return [out[k] for k in ROWS]


def family_table(family: str, args, budget: Budget, dev: Device, device: str, dtype) -> tuple[list[str], object]:
    """The family's section: heading, what was run, the table (every row at every length) and the first
    out-of-memory length of each row that ran out. Returns (lines, the hooked model for the harvest or None)."""
    from patching.engine.cost import forward_flops

    built_at = budget.spent
    layers_note = ""
    n_q3 = QWEN3_RELEASED_LAYERS
    if family == "qwen3_omni" and not args.tiny:
        if args.qwen3_layers == "auto":
            free = torch.cuda.mem_get_info()[0] if dev.cuda else 0
            n_q3, layers_note = qwen3_layers(max(args.lengths), free)
        else:
            n_q3 = int(args.qwen3_layers)
            layers_note = f"{n_q3} of {QWEN3_RELEASED_LAYERS} layers (--qwen3-layers {n_q3})"
    no_nnsight = importlib.util.find_spec("nnsight") is None
    try:
        b = build_family(family, args.tiny, device, dtype, n_q3,
                         nnsight=NNSIGHT not in LEFT_OUT.get(family, {}) and not no_nnsight)
    except Exception as e:
        if not out_of_memory(e):
            raise
        error = str(e).strip().splitlines()[0][:160]
        dev.free()
        return [f"### {TITLES[family]}: not measured", "", f"Building it ran out of memory ({layers_note or 'its weights'}): "
                f"{error}. Every row is left out.", ""], None
    c = b.model.cfg
    held = torch.cuda.memory_allocated() if dev.cuda else weight_bytes(b.model)
    built_s = budget.spent - built_at
    fmt = dict(eager="")
    if family in LEFT_OUT and EAGER in LEFT_OUT[family]:
        n0 = min(args.lengths)
        fmt["eager"] = (f"{c.n_layers} x {c.n_heads} x {n0:,}^2 x {c.dtype.itemsize} B = "
                        f"{c.n_layers * c.n_heads * n0 * n0 * c.dtype.itemsize / 2**30:.1f} GiB at {n0:,} tokens")
    left_out = {k: v.format(**fmt) for k, v in LEFT_OUT.get(family, {}).items()}
    if no_nnsight:
        left_out.setdefault(NNSIGHT, "left out: nnsight is not installed here (pip install 'hooked-av[nnsight]')")
    weights = [forward_flops(c, n) + forward_flops(c, 1024) for n in args.lengths]  # + a fixed cost per call
    rows: dict[int, list[Cell]] = {}
    for i, n in enumerate(args.lengths):
        part = budget.part(weights[i], sum(weights[i + 1:]))
        rows[n] = run_length(b, n, args, part, dev, left_out)
    where = ("the CPU, float32 (--tiny: tiny configs; the numbers check the script, not the toolkit)" if args.tiny else
             f"{torch.cuda.get_device_name()}, {str(dtype).removeprefix('torch.')}")
    dims = (f"language model {c.d_model:,} wide, {c.n_layers} layers"
            + (f" ({layers_note})" if layers_note else "")
            + f", {c.n_heads} / {c.n_key_value_heads} heads of {c.d_head}"
            + (f", {c.recipe.moe.n_experts} experts with {c.recipe.moe.top_k} active" if c.recipe.moe else "")
            + f", vocabulary {c.d_vocab:,}")
    lines = [f"### {TITLES[family]}: {dims}", "",
             f"{where}; random weights built on the meta device and materialised there; {b.note}: "
             f"{held / 2**30:.2f} GiB on the device; built in {built_s:.0f} s. A synthetic clip's layout at each length, "
             f"the language model from embeddings; min and median of {args.rounds} rounds after a warm-up (seconds, "
             "synchronised); `/ forward`: the median over the hooked_av forward's at that length; peak: "
             "max_memory_allocated above the allocation before the call, GiB. "
             f"This model's time: {budget.seconds:.0f} s, {budget.spent:.0f} s used.", "",
             "| tokens | row | min s | median s | / forward | peak GiB | peak / forward's | note |",
             "|---|---|---|---|---|---|---|---|"]
    first_oom: dict[str, int] = {}
    for n in args.lengths:
        fwd = next(x for x in rows[n] if x.row == FWD)
        for x in rows[n]:
            lines.append(table_row(n, x, fwd))
            if x.status == "OOM":
                first_oom.setdefault(x.row, n)
    lines.append("")
    for row, n in first_oom.items():
        lines.append(f"- {row}: first out of memory at {n:,} tokens.")
    if EAGER not in left_out and EAGER not in first_oom:
        ran = [n for n in args.lengths if next(x for x in rows[n] if x.row == EAGER).times]
        lines.append(f"- {EAGER}: did not run out of memory at any length it ran "
                     f"({', '.join(f'{n:,}' for n in ran) or 'none'}).")
    if lines[-1]:
        lines.append("")
    keep = b.model if family == "qwen2_5_omni" else None
    del b
    return lines, keep


def table_row(n: int, x: Cell, fwd: Cell) -> str:
    note = x.note.replace("|", "/")
    if x.status == "OOM":
        return f"| {n:,} | {x.row} | OOM | OOM | - | - | - | {note} |"
    if x.status:
        return f"| {n:,} | {x.row} | - | - | - | - | - | {x.status.replace('|', '/')} |"
    ratio = f"{x.median / fwd.median:.2f}x" if fwd.times else "-"
    peak = "-" if x.peak is None else f"{x.peak / 2**30:.2f}"
    peak_ratio = f"{x.peak / fwd.peak:.2f}x" if x.peak is not None and fwd.peak else "-"
    return f"| {n:,} | {x.row} | {min(x.times):.4f} | {x.median:.4f} | {ratio} | {peak} | {peak_ratio} | {note} |"


def harvest_section(model, args, budget: Budget, dev: Device) -> list[str]:
    """benchmarks/harvest_check.py's table on the Qwen2.5-Omni model built here (skipped, said, if its time is short)."""
    from harvest_check import harvest_table
    from patching.engine.cost import forward_flops

    tokens, clips = (512, 2) if args.tiny else (4096, 8)
    head = ["### Harvest at one layer (issue 22), on the Qwen2.5-Omni model above", ""]
    if model is None:
        return head + ["Skipped: the Qwen2.5-Omni model could not be built.", ""]
    if budget.left <= 0:
        return head + [f"Skipped: its {budget.seconds:.0f} s were spent before it started.", ""]
    fwd = args.forward_at
    if fwd:  # (clips + 1) x (a forward with towers + the harvest), guessed as 3 forwards of the language model
        n, t = min(fwd.items())
        guess = (clips + 1) * 3 * t * forward_flops(model.cfg, tokens) / forward_flops(model.cfg, n)
        if guess > budget.left:
            return head + [f"Skipped: {clips + 1} clips would take about {guess:.0f} s; {budget.left:.0f} s of its "
                           f"{budget.seconds:.0f} s were left.", ""]
    what = ("tiny config on the CPU (--tiny)" if args.tiny else f"7B-architecture Thinker, {torch.cuda.get_device_name()}")
    try:
        lines = harvest_table(model, qwen2_5_config(args.tiny), tokens, clips, None, what)
    except Exception as e:
        if not out_of_memory(e):
            raise
        lines = [f"Out of memory: {str(e).strip().splitlines()[0][:160]}"]
    dev.free()
    return head + lines + [""]


# ---- the run -------------------------------------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs of every family on the CPU, to check the script")
    ap.add_argument("--lengths", default=None, help="comma-separated token counts (default 4096,16384,32768; 512,1024 with --tiny)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)} (default all)")
    ap.add_argument("--qwen3-layers", default="auto",
                    help=f"Qwen3-Omni text layers, 1..{QWEN3_RELEASED_LAYERS}, or auto (default): as many as fit the free device memory")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (>= 5)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens each generation row makes (default 16)")
    ap.add_argument("--budget", type=float, default=440.0,
                    help="seconds for the whole run (default 440: under 8 minutes with some slack)")
    ap.add_argument("--out", default=None, help="also write the tables to this markdown file")
    ap.add_argument("--oom-at", type=int, default=None, help=argparse.SUPPRESS)  # tests: a simulated OOM in the eager row
    a = ap.parse_args(argv)
    given = a.lengths or ("512,1024" if a.tiny else "4096,16384,32768")
    try:
        a.lengths = sorted({int(v) for v in given.split(",")})  # ascending: "first out of memory" reads in order
    except ValueError:
        ap.error(f"--lengths {given!r}: give comma-separated token counts, e.g. 4096,16384,32768")
    if min(a.lengths) < 512:
        ap.error(f"--lengths {a.lengths}: every length must be >= 512 tokens (the clip layout needs video, audio, a "
                 "question and 64 queries to read)")
    a.families = [f.strip() for f in a.families.split(",") if f.strip()]
    bad = [f for f in a.families if f not in FAMILIES]
    if bad or not a.families:
        ap.error(f"--families {bad or a.families}: use one or more of {', '.join(FAMILIES)}")
    if a.qwen3_layers != "auto" and not (a.qwen3_layers.isdigit() and 1 <= int(a.qwen3_layers) <= QWEN3_RELEASED_LAYERS):
        ap.error(f"--qwen3-layers {a.qwen3_layers!r}: give 1..{QWEN3_RELEASED_LAYERS} or auto")
    if a.qwen3_layers != "auto" and (a.tiny or "qwen3_omni" not in a.families):
        ap.error(f"--qwen3-layers {a.qwen3_layers} does not apply " + ("with --tiny (its Qwen3-Omni config has 3 layers)"
                 if a.tiny else "without qwen3_omni in --families") + ": leave it out")
    if a.rounds < 5:
        ap.error(f"--rounds must be >= 5 for a min and a median worth reading, got {a.rounds}")
    if a.new_tokens < 1:
        ap.error(f"--new-tokens must be >= 1, got {a.new_tokens}")
    if not 0 < a.budget <= MAX_BUDGET:  # gpu_check.sh kills the run at 470 s, mid-table
        ap.error(f"--budget must be in (0, {MAX_BUDGET:.0f}] seconds (gpu_check.sh stops the run at 470 s), got {a.budget}")
    return a


MAX_BUDGET = 460.0  # seconds: under gpu_check.sh's `timeout 470`, with the tables' writing after it


def main(argv=None) -> list[str]:
    args = parse(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_check.sh: no CUDA device here; run it on an accelerator machine, or pass --tiny to check it on the CPU")
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:  # tiny matrices gain nothing from threads, and on a shared CPU they lose much to contention
        torch.set_num_threads(1)
    dev = Device(device)
    total = Budget(args.budget, start=T0)
    import transformers

    where = "the CPU (--tiny)" if args.tiny else torch.cuda.get_device_name()
    out = [f"## GPU check: {where}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
           f"`benchmarks/gpu_check.sh {' '.join(sys.argv[1:] if argv is None else argv)}`; torch {torch.__version__}, "
           f"transformers {transformers.__version__}; lengths {', '.join(f'{n:,}' for n in args.lengths)}; "
           f"{args.rounds} rounds; time budget {args.budget:.0f} s.", ""]
    emit(out, args)
    parts = [f for f in FAMILIES if f in args.families]
    if "qwen2_5_omni" in parts:
        parts.insert(1, "harvest")
    keep = None  # the Qwen2.5-Omni model, for the harvest that follows it
    for i, part in enumerate(parts):
        budget = total.part(SHARES[part], sum(SHARES[p] for p in parts[i + 1:]))
        print(f"{part}: {budget.seconds:.0f} s", file=sys.stderr, flush=True)
        if part == "harvest":
            lines = harvest_section(keep, args, budget, dev)
            keep = None
        else:
            args.forward_at = {}  # the hooked forward's median per length, for the harvest's estimate
            lines, keep = family_table(part, args, budget, dev, device, dtype)
        dev.free()
        out += lines
        emit(lines, args, out)
    tail = [f"Took {total.spent:.0f} s of the {args.budget:.0f} s budget.", ""]
    out += tail
    emit(tail, args, out)
    return out


def emit(lines: list[str], args, everything: list[str] | None = None) -> None:
    """Print `lines` now (a run cut short still shows what it measured) and rewrite --out with all so far."""
    print("\n".join(lines), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(everything if everything is not None else lines) + "\n")


if __name__ == "__main__":
    main()
