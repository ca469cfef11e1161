"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, `pkunlp-icler/FastV`,
`src/FastV/llava-hf/.../modeling_llama.py`): at layer K, rank the media tokens by the attention the
last token paid them at layer K-1 (averaged over heads), keep the top `round(n_media * (1 - R))`,
and drop the rest physically from the hidden states; the kept tokens keep their position ids and
layers K.. run causally on the shorter sequence. Beside it, for comparison, the full forward and
discarding a whole modality from the same layer (`patching.methods.discarding`'s physical removal).

Defaults follow the anchor: `k=2`, `r=0.5` (their A-OKVQA table, K = 2, R = 50 %; their llava-hf
demo uses K = 3, R = 75 %), `round` for the kept count, ties broken by `topk`. Under generation
the anchor's demo runs without a KV cache (`use_cache=False`), so every step re-ranks with the
newest token as the last one; so does `fastv` here (greedy, exactly `max_new_tokens` steps, no eos,
the demo's `min_new_tokens = max_new_tokens`).

The anchor has two paths (`use_fast_v`): with `fast_v_inplace` (the one above, the latency runs of
`eval_aokvqa_latency_fastv_inplace.sh`) it removes the tokens from the hidden states; without it
("Attention Mask Implementation", `eval_ocrvqa_fastv_token_mask.sh`) every layer from K on masks
the dropped tokens' keys for every query, nothing is removed, and `generate` keeps its KV cache: at
every decoding step layer K-1's attention of the new token re-ranks the media, and the new token's
layers K.. mask the keys outside its own kept set, while the earlier positions' cached keys and values
are those their own forward computed (`masked=True`, the row "fastv (mask)"; its prefill equals the
physical drop's, and it saves no FLOPs). Its random baseline (the `idx == AGG_LAYER == 0` branch: a
`random.shuffle` of `[1] * rank + [0] * (n - rank)` over the image tokens) is `random_drop=True`: the
same number of media tokens kept at random, seeded (`random.Random(seed + sample)`), dropped
physically from the same layer K as FastV (the anchor draws it at K = 0 only, unseeded, afresh at
every cached step; here one draw per sample, kept for every step).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooked_av.utils import neg_inf

from patching.engine import checks
from patching.engine.experiment import Experiment, Plot, Report, StudySample
from patching.engine.metrics import AnswerProb
from patching.engine.results import Result
from patching.engine.sweep import samples
from patching.methods.discarding import forward_flops, median_times

DEFAULT_K = 2
DEFAULT_R = 0.5


def n_kept(n_media: int, r: float) -> int:
    """Media tokens FastV keeps: `round(n_media * (1 - r))` (the anchor's llava-hf `topk` size)."""
    return round(n_media * (1 - r))


def fastv_keep(attn_last: Tensor, media: Tensor, r: float) -> Tensor:
    """bool `[pos]`: every non-media position, and the `n_kept` media positions with the largest
    `attn_last` (`[pos]`, the last query's head-averaged attention at layer K-1)."""
    idx = media.nonzero()[:, 0]
    top = idx[attn_last[idx].topk(n_kept(len(idx), r)).indices]
    keep = ~media.clone()
    keep[top] = True
    return keep


def random_keep(media: Tensor, r: float, seed: int) -> Tensor:
    """bool `[pos]`: every non-media position and `n_kept` media positions chosen as the anchor's random
    baseline chooses them: `[1] * n_kept + [0] * (n_media - n_kept)` shuffled by
    `random.Random(seed).shuffle`, laid over the media positions in ascending order."""
    idx = media.nonzero()[:, 0]
    flags = [1] * n_kept(len(idx), r) + [0] * (len(idx) - n_kept(len(idx), r))
    random.Random(seed).shuffle(flags)
    keep = ~media.clone()
    keep[idx[torch.tensor(flags, dtype=torch.bool)]] = True
    return keep


def masked_generate(model, sample, k: int, r: float, media: Tensor, n_new: int) -> tuple[Tensor, Tensor, list[int]]:
    """FastV's attention-mask path (see the module docstring) on one sample with a KV cache: the logits
    of each forward `[max(n_new, 1), vocab]` (row 0 the prefill's last position), the prefill's kept
    positions (bool `[pos]`) and `n_new` greedy tokens (the first from the prefill). In every forward,
    the newest query's head-averaged attention at layer k-1 ranks the media (`fastv_keep`) and layers
    k.. mask the keys outside that set for every query of the forward. `media`: bool `[pos]` over the
    prompt (generated tokens are never media)."""
    n, state = sample.seq_len, {}

    def grab(pattern, hook):
        state["attn"] = pattern[0, :, -1].float().mean(0)  # [keys]

    def mask(t: Tensor, hook) -> Tensor:
        keys = t.shape[-1]
        m = torch.cat([media.to(t.device), media.new_zeros(keys - n).to(t.device)])
        keep = fastv_keep(state["attn"].to(t.device), m, r)
        state.setdefault("keep", keep[:n].cpu())
        return t.masked_fill(~keep.view(1, 1, 1, keys), neg_inf(t.dtype))

    hooks = [(f"blocks.{k - 1}.attn.hook_pattern", grab)]
    hooks += [(f"blocks.{l}.attn.hook_attn_mask", mask) for l in range(k, model.cfg.n_layers)]
    caches, run = model.empty_kv_caches(), sample.lm_inputs(1)
    embeds, out = run["inputs_embeds"], []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model.run_language_model(**run, kv_caches=caches, logits_at="last")[:, -1]
        every = [logits]
        nxt = int(sample.position_ids.max()) + 1
        for step in range(n_new):
            tok = logits.argmax(-1)
            out.append(int(tok))
            if step + 1 == n_new:
                break
            pos = torch.full((3, 1, 1), nxt + step, dtype=sample.position_ids.dtype, device=embeds.device)
            logits = model.run_language_model(model.embed(tok[:, None]).to(embeds.dtype), pos, None, kv_caches=caches,
                                              logits_at="last")[:, -1]
            every.append(logits)
    return torch.cat(every), state["keep"], out


def pruned_forward(model, embeds: Tensor, position_ids: Tensor, k: int,
                   choose: Callable[[Tensor | None], Tensor], rank: bool,
                   injections: Sequence[Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
    """Last-position logits `[1, vocab]` and the kept positions (bool `[pos]`) of one prompt (batch 1,
    no padding): blocks 0..k-1 on the full sequence, blocks k.. on the positions `choose(attn)` keeps,
    with their own position ids. With `rank`, `attn` is the last query's head-averaged attention at
    layer k-1 (`[pos]`), read on that layer's `hook_pattern` in this same forward; else None.
    (`run_language_model(discard=)` takes its positions before the first block, so FastV, whose
    positions come from layer k-1, runs the blocks itself through `model.attention_inputs`.)
    `injections`: the sample's per-layer residual additions (`Sample.lm_inputs`; DeepStack), cut as the
    positions are."""
    seen: dict = {}

    def grab(pattern, hook):
        seen["attn"] = pattern[0, :, -1].float().mean(0)

    hooks = [(f"blocks.{k - 1}.attn.hook_pattern", grab)] if rank else []
    inject = model.injection_list(injections, embeds)  # one entry per block (DeepStack lists only its own layers)
    with model.hooks(fwd_hooks=hooks):
        x = model.hook_embed(embeds)
        state, keep = model.attention_inputs(x, position_ids, None), None
        for i, block in enumerate(model.blocks):
            if i == k:
                keep = choose(seen.get("attn")).to(x.device)
                x, position_ids = x[:, keep], position_ids[:, :, keep]
                inject = [None if t is None else t[:, keep] for t in inject]
                state = model.attention_inputs(x, position_ids, None)
            x = block(x, injection=inject[i], **state)
    if keep is None:  # k == n_layers: nothing dropped
        keep = choose(seen.get("attn")).to(x.device)
    return model.unembed(model.ln_final(x[:, -1])), keep


def greedy(model, embeds: Tensor, position_ids: Tensor, step: Callable, n_new: int,
           injections: Sequence[Tensor | None] | None = None) -> list[int]:
    """`n_new` greedy tokens without a KV cache: each step runs `step(embeds, position_ids, injections)`
    (-> last logits) on the prompt plus the tokens so far, a new token at the next position on all three
    rows (nothing injected at generated tokens)."""
    out = []
    for _ in range(n_new):
        tok = int(step(embeds, position_ids, injections)[0].argmax())
        out.append(tok)
        nxt = position_ids.amax(-1, keepdim=True) + 1  # [3, 1, 1]
        embeds = torch.cat([embeds, model.embed(torch.tensor([[tok]], device=embeds.device)).to(embeds.dtype)], 1)
        position_ids = torch.cat([position_ids, nxt], -1)
        injections = injections and [None if t is None else torch.cat([t, t.new_zeros(1, 1, t.shape[-1])], 1)
                                     for t in injections]
    return out


def fastv(
    model,
    inputs: dict,
    answers,
    k: int = DEFAULT_K,
    r: float = DEFAULT_R,
    media="audio|video",
    discard: Sequence | None = None,
    max_new_tokens: int = 8,
    repeats: int = 3,
    masked: bool = False,
    random_drop: bool = False,
    seed: int = 0,
    tm=None,
    progress: bool = True,
) -> Result:
    """FastV beside the full forward and whole-modality discarding from layer `k`; with `masked`, also
    the anchor's attention-mask path ("fastv (mask)", KV-cached decoding that re-ranks at every step);
    with `random_drop`, its random baseline of the same size ("random", seeded by `seed + sample`).

    `media`: the tokens FastV ranks (TokenMap spec); `discard`: the groups discarded whole, one row
    each (default: every `|`-part of `media` the sample has). `max_new_tokens` greedy tokens are
    generated per method and timed (0: prefill only). One row per (sample, method) with method
    "full", "fastv", "fastv (mask)", "random" or "discard <group>": `n_tokens`, `n_media`,
    `n_dropped`, `prob` and `correct` (the answer at the prompt's last position), `pred`, `flops` / `flops_saved` (prefill, analytic,
    `discarding.forward_flops`), `seconds` / `time_saved` (prefill, median of `repeats` after a
    warm-up), `generated` (token ids), `gen_flops` / `gen_flops_saved` (every step recomputed, no
    KV cache), `gen_seconds` / `gen_time_saved`.

        res = fastv(model, inputs, [answer], k=2, r=0.5, max_new_tokens=1, repeats=1, progress=False)
        res.df[["method", "n_dropped", "prob", "flops_saved"]]
    """
    L = model.cfg.n_layers
    checks.indices([k], L, "k (the layer FastV prunes at)", "layers", valid=f"k must be in 1..{L - 1}: layer k-1's attention ranks the tokens")
    if k < 1:
        raise ValueError("k must be >= 1: FastV ranks with the attention of layer k-1 (the anchor asserts K > 0)")
    checks.finite(r, "r (the share of media tokens dropped)", minimum=0)
    if r > 1:
        raise ValueError(f"r is the share of media tokens dropped, in [0, 1]; got {r}")
    checks.count(max_new_tokens, "max_new_tokens", minimum=0)
    checks.count(repeats, "repeats")
    checks.count(seed, "seed", minimum=0)
    metric = answers if isinstance(answers, AnswerProb) else AnswerProb(answers)
    metric.check(model, checks.batch_of(inputs), inputs)
    data = samples(model, inputs, tm)
    plans = []
    for s in data:  # every group checked before the first forward
        m = s.tm.mask(media, nonempty=True)[0]
        if bool(m[-1]):
            raise ValueError(f"{media!r} includes the last position, whose logits are the answer; rank something else")
        groups = [g for g in str(media).split("|") if bool(s.tm.mask(g).any())] if discard is None else checks.nonempty(discard, "discard", none_ok=True)
        drops = {g: s.tm.mask(g, nonempty=True)[0] for g in groups}
        for g, d in drops.items():
            if bool(d[-1]):
                raise ValueError(f"discard group {g!r} includes the last position, whose logits are the answer")
        plans.append((s, m, drops))

    rows = []
    for s, m, drops in tqdm(plans, desc="fastv", disable=not progress, leave=False):
        n = s.seq_len

        def method(choose, rank, kk=k):
            def step(embeds, pos, injections):
                extra = embeds.shape[1] - n  # generated tokens are never media
                return pruned_forward(model, embeds, pos, kk, lambda a: choose(a, extra), rank, injections)
            return step

        pad = lambda mask, extra: torch.cat([mask, mask.new_zeros(extra)])  # noqa: E731
        steps = {"full": method(lambda a, e: torch.ones(n + e, dtype=torch.bool), False, L),
                 "fastv": method(lambda a, e: fastv_keep(a, pad(m, e).to(a.device), r), True)}
        if random_drop:
            rand = random_keep(m, r, seed + s.index)
            steps["random"] = method(lambda a, e: torch.cat([rand, rand.new_ones(e)]), False)  # generated tokens kept
        for g, d in drops.items():
            steps[f"discard {g}"] = method(lambda a, e, d=d: ~pad(d, e), False)
        with torch.no_grad():
            kw = s.lm_inputs(1)  # with the sample's injections (DeepStack)
            args = (kw["inputs_embeds"], kw["position_ids"], kw["injections"])
            prefill = {name: (lambda st=st: st(*args)) for name, st in steps.items()}
            generate = {name: (lambda st=st: greedy(model, args[0], args[1], st, max_new_tokens, args[2]))
                        for name, st in steps.items()}
            if masked:
                prefill["fastv (mask)"] = lambda: masked_generate(model, s, k, r, m, 0)[:2]  # ([1, vocab], keep)
                generate["fastv (mask)"] = lambda: masked_generate(model, s, k, r, m, max_new_tokens)[2]
            outs, seconds = median_times(prefill, repeats)
            gen, gen_seconds = ({}, {}) if max_new_tokens == 0 else median_times(generate, repeats)
        f_full = forward_flops(model, n)
        g_full = sum(forward_flops(model, n + t) for t in range(max_new_tokens))
        correct_full = bool(metric.correct(outs["full"][0], s.index)[0])
        for name, (logits, keep) in outs.items():
            dropped = n - int(keep.sum())
            kept = n if name == "fastv (mask)" else n - dropped  # masked keys are still computed
            f = forward_flops(model, n, kept, k)
            gf = sum(forward_flops(model, n + t, kept + t, k) for t in range(max_new_tokens))
            rows.append(dict(sample=s.index, method=name, k=k, r=r, n_tokens=n, n_media=int(m.sum()), n_dropped=dropped,
                             prob=float(metric(logits, s.index)[0]), correct=bool(metric.correct(logits, s.index)[0]),
                             correct_full=correct_full,
                             pred=int(logits[0].argmax()), flops=f, flops_saved=1 - f / f_full, seconds=seconds[name],
                             time_saved=1 - seconds[name] / seconds["full"], generated=" ".join(map(str, gen.get(name, []))),
                             gen_flops=gf, gen_flops_saved=(1 - gf / g_full) if max_new_tokens else 0.0,
                             gen_seconds=gen_seconds.get(name, 0.0),
                             gen_time_saved=(1 - gen_seconds[name] / gen_seconds["full"]) if max_new_tokens else 0.0))
    settings = dict(k=k, r=r, media=str(media), discard=None if discard is None else [str(g) for g in discard],
                    max_new_tokens=max_new_tokens, repeats=repeats, masked=masked, random_drop=random_drop,
                    seed=seed if random_drop else None, metric=metric.settings())
    return Result("fastv", pd.DataFrame(rows), settings)


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    return fastv(x.model, x.enc, [x.answer], tm=x.tm, progress=False, **opts).df


EXPERIMENT = Experiment(
    "fastv", fastv, by=("method",), value="correct", label="accuracy", outcome="binary",
    plot=Plot("points", series="method", xlabel="prefill FLOPs saved (fraction)"), run=_run, cells=("method",),
    paired=("correct", "correct_full"),
    report=Report("FastV beside discarding a whole modality: accuracy against prefill FLOPs saved"),
    columns=("method", "k", "r", "n_tokens", "n_media", "n_dropped", "prob", "correct", "correct_full", "pred", "flops",
             "flops_saved", "seconds", "time_saved", "generated", "gen_flops", "gen_flops_saved", "gen_seconds",
             "gen_time_saved"),
)
