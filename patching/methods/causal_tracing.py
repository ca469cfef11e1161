"""Causal tracing (ROME, Meng et al. 2022, `kmeng01/rome` `experiments/causal_trace.py`; the
cross-modal-hub paper's variant, `kaistmm/crossmodal-hub` `causal_tracing_modality_sink.py`,
`logic/causal_trace.py`, `utils/logit.py`, `preprocess/step2/causal_effect.py`).

Corrupt, then restore the clean state of a token set at one site over a window of layers, and read
how much of the answer comes back.

Corruptions (`mode`): `"noise"`, Gaussian noise on `hook_embed` at `corrupt` of std `noise_scale` x
the std of those embeddings, measured per sample (`noise_std="sample"`) or over every sample of the
inputs as ROME measures it over its dataset (`"dataset"`), or given (a number), `n_noise` draws;
`"zero"` (those embeddings zeroed); `"media"` (the hub's: `corrupt`'s frames black or its waveform
silent, `patching.engine.corrupt.zero_modality`); `"inputs"` (`corrupted=` given outright, same layout).

Restore sites (`restore`): `resid` (`hook_resid_pre`), `resid_post` (ROME's block output), `attn_in`
(`ln1.hook_normalized`, the hub's `input_layernorm` output: only what attention reads changes),
`attn_out`, `mlp_out` (ROME's attention / MLP outputs). Windows: `"centre"` (ROME's `window` layers
centred on each layer) or `"top_down"` (the hub's: from each layer to the last); `window` may be a
number per site, `None` = every layer at once (centre) or to the end (top_down).

Metric: the probability of the answer at the last prompt position (`steps=1`), or, as the hub's
`max_prob_for_word`, the largest probability of any of the answer's candidate ids (its first
sub-token with and without a leading space: pass the word as a string) over `steps` greedily
generated steps (the restoration acts on the prompt positions; the decoding steps run from the
KV cache, as the hub's hooks skip one-token steps); `steps="eos"` decodes until every row has
emitted `eos_token_id` (default the tokenizer's), at most 1024 steps: the hub's `model.generate` with
its `thinker_max_new_tokens=1024`. Effects: `indirect_effect = scale * (p_restored - p_corrupt)` of
the answer; the mirror for the corrupted run's own prediction, `ie_corrupt_pred`, is
`scale * (p_corrupt - p_restored)` in the hub's sign (`mirror="corrupt"`) or
`scale * (p_restored - p_corrupt)` (`mirror="restored"`). That prediction (`corrupt_pred`) is the
corrupted run's top token at the last prompt position (`"top"`) or, as the hub takes it
(`preprocess/step1/output2input_*.py`: `corrupt_pred` = the corrupted run's decoded `text_output`,
scored by `max_prob_for_word`), the text the corrupted run generates over the same steps, special
tokens skipped, read as a word: its first sub-token with and without a leading space (`"generated"`).

Presets fill what is left as None: `"rome"` (noise 3 x the dataset's embedding std, 10 draws, every
token on its own, block output per single layer, attention and MLP outputs over 10 centred layers),
`"hub"` (media zeroing, `attn_in`, from each layer to the last, max over the steps up to eos with both
space variants, the corrupted run's generated word for the mirror, its sign, x100 as the hub
reports). Without a preset: noise per sample, `resid` and `attn_in`, single layers, first step, the
restored sign, probability units.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import torch

from hooked_av.inputs import Selection
from patching.engine import checks
from patching.engine.corrupt import zero_media
from patching.engine.experiment import Experiment, Plot, Report, StudySample
from patching.engine.hooks import ablate, add_noise, patch_from_cache, site_name
from patching.engine.intervention import Intervention
from patching.engine.results import Result
from patching.engine.sweep import (
    forward_rows,
    rows_per_forward,
    run_rows,
    sample_maps,
    samples,
)
from patching.engine.token_sets import resolve
from patching.methods.activation_patching import cache_sample, check_same_layout
from patching.methods.knockout import window_layers

RESTORE_SITES = {"resid": "resid_pre", "resid_post": "resid_post", "attn_in": "attn_in", "attn_out": "attn_out",
                 "mlp_out": "mlp_out"}
MODES = ("noise", "zero", "media", "inputs")
MAX_NEW_TOKENS = 1024  # steps="eos": the hub's Qwen2_5OmniForConditionalGeneration.generate(thinker_max_new_tokens=1024)
PRESETS = {
    None: dict(mode="noise", restore=("resid", "attn_in"), window=1, window_style="centre", steps=1,
               mirror="restored", scale=1.0, noise_std="sample", tokens=None, corrupt_pred="top"),
    # ROME: calculate_hidden_flow (samples=10, noise "s3" = 3 x collect_embedding_std over the dataset's
    # subjects), trace_important_states (every token, one layer's block output) and
    # trace_important_window (kind "attn"/"mlp", window=10, centred)
    "rome": dict(mode="noise", restore=("resid_post", "attn_out", "mlp_out"),
                 window={"resid_post": 1, "attn_out": 10, "mlp_out": 10}, window_style="centre", steps=1,
                 mirror="restored", scale=1.0, noise_std="dataset", tokens="each", corrupt_pred="top"),
    # the hub: black frames / silence, input_layernorm outputs from layer 0 over window 50 (to the end),
    # max_prob_for_word over the steps generate decodes (to eos, thinker_max_new_tokens=1024), the
    # corrupted run's generated text as the mirror's word, causal_effect.py's two means x 100
    "hub": dict(mode="media", restore=("attn_in",), window=None, window_style="top_down", steps="eos",
                mirror="corrupt", scale=100.0, noise_std="sample", tokens=None, corrupt_pred="generated"),
}


def causal_tracing(
    model,
    inputs: dict,
    answers=None,
    corrupt="audio",
    mode: str | None = None,
    corrupted: dict | None = None,
    restore: Sequence[str] | None = None,
    tokens: Sequence | str | None = None,
    window: int | dict | None | str = "preset",
    window_style: str | None = None,
    centres: Sequence[int] | None = None,
    n_noise: int = 10,
    noise_scale: float = 3.0,
    noise_std: float | str | None = None,
    steps: int | str | None = None,
    eos_token_id: int | None = None,
    corrupt_answers=None,
    corrupt_pred: str | None = None,
    mirror: str | None = None,
    scale: float | None = None,
    preset: str | None = None,
    seed: int = 0,
    tm=None,
    batch_size: int | None = None,
    max_batch_tokens: int = 16384,
    progress: bool = True,
) -> Result:
    """One row per (sample, site, token set, layer): `p_clean`, `p_corrupt`, `p_restored` (the metric
    of the answer), `indirect_effect`, `ie_corrupt_pred`, `correct`, the window and, for single
    positions (`tokens="each"`), `pos`.

    `answers`: per sample (or one for all) a token id, a list of candidate ids, or a word (needs
    `model.tokenizer`: its first sub-token with and without a leading space); default the clean run's
    top token. `corrupt_answers`: the same for the mirror (default: each corrupted run's own
    prediction, `corrupt_pred` "top" or "generated", see the module docstring). `tokens`: TokenMap
    specs, `Selection`s or `patching.engine.token_sets.TokenSet`s to restore (default `[corrupt]`),
    or `"each"` for every position on its own (ROME's heatmap; see `heatmap`), `"each:<spec>"` for each
    position of a spec (ROME's `token_range`). `window`: layers per restoration, one number or
    `{site: number}`; `centres`: the layers the windows start from (top_down) or centre on. `steps`:
    decoding steps the metric takes the max over (1 = the last prompt position; "eos": until
    `eos_token_id`, at most 1024); `eos_token_id` ends a row's steps. Rows also carry `corrupt_pred`.

        res = causal_tracing(model, inputs, [answer], corrupt="audio", n_noise=2, centres=[0, 2], progress=False)
        res.mean()  # indirect effect per restore site, token set and layer
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    given = dict(mode=mode, restore=restore, window=window, window_style=window_style, steps=steps, mirror=mirror,
                 scale=scale, noise_std=noise_std, tokens=tokens, corrupt_pred=corrupt_pred)
    o = {k: (PRESETS[preset][k] if (v == "preset" if k == "window" else v is None) else v) for k, v in given.items()}
    if corrupted is not None and mode is None:
        o["mode"] = "inputs"
    if o["mode"] not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} (inputs with corrupted=), got {o['mode']!r}")
    if (o["mode"] == "inputs") != (corrupted is not None):
        raise ValueError("pass corrupted= exactly when mode='inputs'")
    restore = checks.nonempty(o["restore"], "restore")
    unknown = [r for r in restore if r not in RESTORE_SITES]
    if unknown:
        raise ValueError(f"restore site(s) {unknown} unknown; choose from {list(RESTORE_SITES)}")
    each = isinstance(o["tokens"], str) and o["tokens"].split(":")[0] == "each"
    token_range = (o["tokens"].split(":", 1)[1] if ":" in o["tokens"] else "all") if each else None
    sets = [corrupt] if o["tokens"] is None or each else checks.nonempty(o["tokens"], "tokens", none_ok=True)
    checks.count(n_noise, "n_noise")
    checks.finite(noise_scale, "noise_scale", minimum=0)
    if isinstance(o["noise_std"], str):
        if o["noise_std"] not in ("sample", "dataset"):
            raise ValueError(f"noise_std must be 'sample', 'dataset' or a number, got {o['noise_std']!r}")
    else:
        checks.finite(o["noise_std"], "noise_std", minimum=0)
    if o["steps"] == "eos":
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "tokenizer", None), "eos_token_id", None)
        if eos_token_id is None:
            raise ValueError("steps='eos' decodes until the end token: pass eos_token_id= (the model has no tokenizer "
                             "to take it from) or a number of steps")
        steps = MAX_NEW_TOKENS
    elif isinstance(o["steps"], str):
        raise ValueError(f"steps must be a number of decoding steps or 'eos', got {o['steps']!r}")
    else:
        steps = checks.count(o["steps"], "steps")
    if o["corrupt_pred"] not in ("top", "generated"):
        raise ValueError(f"corrupt_pred must be 'top' (the corrupted run's top token) or 'generated' (the hub's: the "
                         f"word it generates), got {o['corrupt_pred']!r}")
    if corrupt_pred is not None and corrupt_answers is not None:
        raise ValueError("corrupt_pred chooses the corrupted run's own prediction, which corrupt_answers replaces; "
                         "pass one of them")
    if o["corrupt_pred"] == "generated" and corrupt_answers is None and getattr(model, "tokenizer", None) is None:
        raise ValueError("corrupt_pred='generated' reads the corrupted run's text as a word: it needs model.tokenizer; "
                         "pass corrupt_pred='top' or corrupt_answers=")
    if o["mirror"] not in ("corrupt", "restored"):
        raise ValueError(f"mirror must be 'corrupt' (the hub's p_corrupt - p_restored) or 'restored', got {o['mirror']!r}")
    checks.finite(o["scale"], "scale")
    if eos_token_id is not None:
        checks.token_ids(model, [eos_token_id], "eos_token_id")
    L = model.cfg.n_layers
    centres = checks.layers(model, centres, "centres")
    windows = {r: _windows(o["window"].get(r, 1) if isinstance(o["window"], dict) else o["window"],
                           o["window_style"], centres, L) for r in restore}
    n = checks.batch_of(inputs)
    targets = None if answers is None else candidates(model, answers, n, "answers")
    wrong = None if corrupt_answers is None else candidates(model, corrupt_answers, n, "corrupt_answers")
    if corrupted is not None and checks.batch_of(corrupted) != n:
        raise ValueError(f"inputs hold {n} samples, corrupted {checks.batch_of(corrupted)}; pair them one to one")
    if o["mode"] == "media":
        corrupted = zero_media(model, inputs, corrupt)
    for index, stm in enumerate(sample_maps(model, inputs, tm)):  # every token set selects something, before the towers
        for spec in sets + ([] if o["mode"] in ("inputs", "media") else [corrupt]):
            stm.mask(resolve(spec, stm, index), nonempty=True)
    if corrupted is not None:  # the corrupted run keeps the layout (same map), checked before the towers too
        sample_maps(model, corrupted, tm)
    clean = samples(model, inputs, tm)
    bad_ones = samples(model, corrupted, tm) if corrupted is not None else [None] * len(clean)  # same layout, same map
    std = o["noise_std"]
    if o["mode"] == "noise" and std == "dataset":  # ROME's collect_embedding_std: every corrupted element pooled
        std = noise_scale * float(torch.cat([s.embeds[0, s.tm.mask(corrupt)[0].to(s.embeds.device)].float().flatten()
                                             for s in clean]).std())
    probe = dict(steps=steps, eos=eos_token_id, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    rows = []
    for s, c in zip(clean, bad_ones):
        if c is not None:
            check_same_layout(s, c)
        target = c or s
        units = ([(f"pos {p}", p, _one(s, p)) for p in s.tm.positions(token_range).tolist()] if each
                 else [(None, None, resolve(t, s.tm, s.index)) for t in sets])
        names = sorted({site_name(RESTORE_SITES[r], l) for r in restore for l in range(L)})
        cache = cache_sample(model, s, names)
        if o["mode"] == "noise":
            where = s.tm.select(corrupt)
            sd = std if not isinstance(std, str) else noise_scale * float(s.embeds[0, where.mask[0].to(s.embeds.device)].float().std())
            corruptions = [add_noise("hook_embed", where, sd, seed=seed + i) for i in range(n_noise)]
        elif o["mode"] == "zero":
            corruptions = [ablate("hook_embed", "zero", positions=s.tm.select(corrupt))]
        else:
            corruptions = [Intervention()]
        with torch.no_grad():
            top_clean = int(forward_rows(model, s, 1)[0].argmax())
        answer = [top_clean] if targets is None else targets[s.index]
        if wrong is not None:
            preds, pred_labels = [wrong[s.index]] * len(corruptions), [str(wrong[s.index])] * len(corruptions)
        elif o["corrupt_pred"] == "generated":  # the hub's corrupt_pred: the corrupted run's decoded text
            _, generated = _probe(model, target, corruptions, [0], keep_tokens=True, **probe)
            words = [model.tokenizer.decode(_until(g, eos_token_id), skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False) for g in generated]
            preds, pred_labels = [candidates(model, w, 1, "corrupt_pred")[0] for w in words], words
        else:
            base_top = run_rows(model, target, corruptions, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                progress=False).argmax(-1).tolist()  # each draw's corrupted prediction
            preds, pred_labels = [[t] for t in base_top], [str(t) for t in base_top]
        cand = sorted({*answer, *(t for p in preds for t in p)})
        col = {t: i for i, t in enumerate(cand)}
        a_idx = [col[t] for t in answer]
        p_clean_all = _probe(model, s, [Intervention()], cand, **probe)[0]  # [cand]
        p_corrupt_all = _probe(model, target, corruptions, cand, **probe)  # [draws, cand]
        cells, ivs = [], []
        for r in restore:
            for label, pos, sel in units:
                for centre, layers in windows[r]:
                    patch = patch_from_cache(cache, [site_name(RESTORE_SITES[r], l) for l in layers], sel)
                    for k, corr in enumerate(corruptions):
                        cells.append((r, label or sel.label, pos, centre, layers[0], layers[-1], k))
                        ivs.append(corr + patch)
        probs = _probe(model, target, ivs, cand, progress=progress, desc=f"tracing sample {s.index}", **probe)
        per: dict = {}
        for cell, pr in zip(cells, probs):
            per.setdefault(cell[:6], []).append((cell[6], pr))
        p_corrupt = float(p_corrupt_all[:, a_idx].amax(-1).mean())
        for (r, label, pos, centre, lo, hi), vals in per.items():
            m = len(vals)
            p_restored = sum(float(pr[a_idx].max()) for _, pr in vals) / m
            wrong_restored = [float(pr[[col[t] for t in preds[k]]].max()) for k, pr in vals]
            wrong_corrupt = [float(p_corrupt_all[k, [col[t] for t in preds[k]]].max()) for k, _ in vals]
            mirror_gap = sum(wc - wr for wc, wr in zip(wrong_corrupt, wrong_restored)) / m
            row = dict(sample=s.index, site=r, tokens=label, layer=-1 if centre is None else centre,
                       window_start=lo, window_end=hi, p_clean=float(p_clean_all[a_idx].max()), p_corrupt=p_corrupt,
                       p_restored=p_restored, indirect_effect=o["scale"] * (p_restored - p_corrupt),
                       ie_corrupt_pred=o["scale"] * (mirror_gap if o["mirror"] == "corrupt" else -mirror_gap),
                       corrupt_pred=" | ".join(dict.fromkeys(pred_labels)), correct=top_clean in answer)
            if each:
                row["pos"] = pos
            rows.append(row)
    settings = dict(preset=preset, corrupt=str(corrupt), mode=o["mode"], restore=restore,
                    tokens=o["tokens"] if each else [str(getattr(t, "label", t)) for t in sets], window=o["window"],
                    window_style=o["window_style"], centres=centres, steps=o["steps"], eos_token_id=eos_token_id,
                    corrupt_pred="given" if corrupt_answers is not None else o["corrupt_pred"],
                    token_set_seeds={t.label: t.seed for t in sets if getattr(t, "seed", None) is not None},
                    mirror=o["mirror"], scale=o["scale"], n_noise=n_noise if o["mode"] == "noise" else 1,
                    noise_scale=noise_scale, noise_std=std if o["mode"] == "noise" else None, seed=seed)
    return Result("causal_tracing", pd.DataFrame(rows), settings)


def _windows(k, style, centres, n_layers) -> list[tuple[int | None, list[int]]]:
    """`(centre, layers)` per restoration: ROME's centred window (`knockout.window_layers`), every
    layer at once (`k=None`, centre), or the hub's from the layer to the last (`top_down`, `k` caps
    the length as the hub's `range(l, min(L, l + window))`)."""
    if style not in ("centre", "top_down"):
        raise ValueError(f"window_style must be 'centre' (ROME) or 'top_down' (the hub's: from the layer to the last), got {style!r}")
    if style == "top_down":
        if k is not None:
            checks.count(k, "window", unit=" layer")
        return [(c, list(range(c, n_layers if k is None else min(n_layers, c + k)))) for c in centres]
    if k is None:
        return [(None, list(range(n_layers)))]
    return [(c, list(window_layers(c, k, n_layers))) for c in centres]


def _one(sample, p: int) -> Selection:
    mask = torch.zeros(1, sample.seq_len, dtype=torch.bool)
    mask[0, p] = True
    return Selection(mask, f"pos {p}")


def candidates(model, answers, n: int, what: str) -> list[list[int]]:
    """Candidate ids per sample from ids, id lists or words (`[n][k]`). A word gives its first
    sub-token without and with a leading space (the hub's `max_prob_for_word`)."""
    items = [answers] if isinstance(answers, (str, int)) else list(answers)
    if isinstance(answers, torch.Tensor):
        items = answers.flatten().tolist()
    if len(items) not in (1, n):
        raise ValueError(f"{len(items)} {what.removesuffix('s')} token ids for {n} sample{'s' * (n != 1)}: pass one per "
                         "sample (or one for all)")
    out = []
    for a in items:
        if isinstance(a, str):
            tok = getattr(model, "tokenizer", None)
            if tok is None:
                raise ValueError(f"{what} given as words need model.tokenizer; pass token ids instead")
            ids = [e[0] for e in (tok.encode(a, add_special_tokens=False), tok.encode(" " + a, add_special_tokens=False)) if e]
            if not ids:
                raise ValueError(f"{what}: the word {a!r} encodes to no token")
        else:
            ids = [a] if isinstance(a, int) or (isinstance(a, torch.Tensor) and a.dim() == 0) else list(a)
            ids = checks.nonempty(ids, what)
        out.append(sorted(set(checks.token_ids(model, ids, f"{what.removesuffix('s')} token id(s)"))))
    return out * n if len(out) == 1 else out


def _until(tokens: list[int], eos: int | None) -> list[int]:
    """`tokens` cut after their first `eos`."""
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def _probe(model, sample, interventions, cand: list[int], steps: int = 1, eos: int | None = None,
           batch_size=None, max_batch_tokens=16384, progress=False, desc="tracing", keep_tokens: bool = False):
    """`[rows, cand]`: per intervention, the largest probability of each candidate id over `steps`
    greedy steps (step 1 = the last prompt position). The intervention acts on the prompt's forward;
    later steps run from its KV cache; a row's steps end after it emits `eos`. With `keep_tokens`,
    also each row's greedy tokens (a list per row, up to `steps`; read them with `_until`)."""
    if steps == 1 and not keep_tokens:
        return run_rows(model, sample, interventions, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                        progress=progress, desc=desc, reduce=lambda lg: lg.float().softmax(-1)[:, cand].cpu())
    per = rows_per_forward(sample.seq_len, batch_size, max_batch_tokens)
    out, tokens = [], []
    with torch.no_grad():
        for start in range(0, len(interventions), per):
            group = interventions[start:start + per]
            b = len(group)
            combined = sum((iv.on_rows(j) for j, iv in enumerate(group)), Intervention())
            combined.check(model, batch=b)
            caches = model.empty_kv_caches()
            run = sample.lm_inputs(b)  # the sample's injections (DeepStack) included
            embeds = run["inputs_embeds"]
            with model.hooks(fwd_hooks=list(combined)):
                logits = model.run_language_model(**run, kv_caches=caches, logits_at="last")[:, -1]
            best = logits.float().softmax(-1)[:, cand]
            live = torch.ones(b, dtype=torch.bool, device=logits.device)
            nxt_pos = int(sample.position_ids.max()) + 1
            chosen = [logits.argmax(-1)]
            for step in range(1, steps):
                tok = logits.argmax(-1)
                if eos is not None:
                    live &= tok != eos
                    if not bool(live.any()):
                        break
                pos = torch.full((3, b, 1), nxt_pos + step - 1, dtype=sample.position_ids.dtype, device=embeds.device)
                logits = model.run_language_model(model.embed(tok[:, None]).to(embeds.dtype), pos, None,
                                                  kv_caches=caches, logits_at="last")[:, -1]
                p = logits.float().softmax(-1)[:, cand]
                best = torch.where(live[:, None], torch.maximum(best, p), best)
                chosen.append(logits.argmax(-1))
            out.append(best.cpu())
            tokens += torch.stack(chosen, 1).tolist()
    return (torch.cat(out), tokens) if keep_tokens else torch.cat(out)


def heatmap(result: Result, site: str, sample: int = 0, value: str = "p_restored") -> pd.DataFrame:
    """ROME's per-token heatmap of a `tokens="each"` trace: positions x layers of `value` (ROME plots
    `p_restored` with `p_corrupt` as the colour floor) for one site and sample."""
    df = result.df
    if "pos" not in df.columns:
        raise ValueError("this trace restored token sets, not single positions; run causal_tracing(tokens='each')")
    part = df[(df["site"] == site) & (df["sample"] == sample)]
    if part.empty:
        raise ValueError(f"no rows for site {site!r} and sample {sample}; sites: {sorted(df['site'].unique())}")
    return part.pivot_table(index="pos", columns="layer", values=value)


# ---- the record ---------------------------------------------------------------------------------
MEDIA = ("audio", "video", "image")
TOKEN_SET = re.compile(r"^(all|sink|cross_modal_sink|unimodal_sink|random_sink_num)\((audio|video)\)$")


def _present(tm, groups) -> list[str]:
    return [g for g in groups if bool(tm.select(g).mask.any())]


def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    """A study's causal tracing of one sample, once per corrupted modality (`corrupt`: one or a list,
    default every media modality of the sample). `tokens` takes TokenMap specs and the hub's token sets
    by name, `all(m)`, `sink(m)`, `cross_modal_sink(m)`, `unimodal_sink(m)`, `random_sink_num(m)`
    (`patching.engine.token_sets.hub_sets`, from `find_sinks(**sinks)` with the `sinks` option; the
    random set's seed is the tracing's `seed`). A token set that is empty in a sample gives that sample
    no rows for it. Every row carries the sample's `dominance` label (`patching.methods.dominance`)."""
    from patching.methods.dominance import label_of

    corrupt = opts.pop("corrupt", None) or _present(x.tm, MEDIA)
    corrupt = [corrupt] if isinstance(corrupt, str) else checks.nonempty(corrupt, "corrupt")
    sink_opts = opts.pop("sinks", None) or {}
    tokens = opts.pop("tokens", None)
    media_mode = (opts.get("mode") or PRESETS[opts.get("preset")]["mode"]) == "media"
    given = x.inputs if media_mode else x.enc  # black frames / silence need the media, not the towers' output
    frames = []
    for m in corrupt:
        kw = dict(opts)
        if isinstance(tokens, str) and tokens.split(":")[0] == "each":  # ROME's every position on its own
            kw["tokens"] = tokens
        elif tokens is not None:
            sets = _token_sets(x, tokens if isinstance(tokens, list) else [tokens], sink_opts, opts.get("seed", 0))
            if not sets:
                continue
            kw["tokens"] = sets
        frames.append(causal_tracing(x.model, given, [x.answer], corrupt=m, tm=x.tm, progress=False, **kw).df.assign(corrupted=m))
    if not frames:  # the report says why this sample has no rows
        empty = pd.DataFrame()
        empty.attrs["why"] = f"every token set asked for ({tokens}) is empty in this sample"
        return empty
    return pd.concat(frames, ignore_index=True).assign(dominance=label_of(x)["label"].iloc[0])


def _token_sets(x: StudySample, specs: list, sink_opts: dict, seed: int) -> list:
    """TokenMap specs as given; the hub's named sets (`sink(audio)`, ...) from `find_sinks`; sets
    that are empty in this sample left out."""
    from patching.engine.token_sets import KINDS, hub_sets, media
    from patching.methods.sinks import NoSinkDimensions, find_sinks

    named = {}
    if any(isinstance(s, str) and TOKEN_SET.match(s) for s in specs):
        try:
            found = find_sinks(x.model, x.enc, tm=x.tm, **sink_opts)
        except NoSinkDimensions as e:  # wrong for this model on the first sample; later, this sample has no sink set
            if x.first:
                raise ValueError(f"causal_tracing, on the first sample: {e} (set them with causal_tracing.sinks="
                                 "{\"ratio\": ...})") from None
            found = None
        for m in ("audio", "video"):
            named.update({f"{k}({m})": v for k, v in hub_sets(found, m, seed).items()} if found is not None else
                         {f"all({m})": media(m), **{f"{k}({m})": None for k in (*KINDS, "random_sink_num")}})
    out = []
    for s in specs:
        spec = named[s] if isinstance(s, str) and s in named else s
        if spec is None:  # a sink set of a sample without sink dimensions: empty
            continue
        if bool(resolve(spec, x.tm, 0).mask.any()):
            out.append(spec)
    return out


def _scale(opts: dict) -> float:
    """The indirect effect's multiple of a probability under a study's options (the hub preset: x100)."""
    scale = opts.get("scale")
    return float(scale if scale is not None else PRESETS[opts.get("preset")]["scale"])


def _check(opts: dict, window, cfg=None) -> None:
    """The hub's named token sets (`sink(audio)`, ...) run `find_sinks` on every sample: without a `sinks`
    option, check its defaults against the model's width before its weights load."""
    from patching.methods.sinks import check_settings

    tokens = opts.get("tokens")
    named = [t for t in ([tokens] if isinstance(tokens, str) else tokens or []) if isinstance(t, str) and TOKEN_SET.match(t)]
    if named and opts.get("sinks") is None:
        check_settings({}, cfg, f"causal_tracing.sinks (not given: find_sinks' defaults, for {named[0]}; set them with "
                                "causal_tracing.sinks={\"tau\": ...})")


EXPERIMENT = Experiment(
    "causal_tracing", causal_tracing, check=_check, by=("site", "tokens", "layer"), value="indirect_effect", label="indirect effect",
    correct_only=True, plot=Plot("traced", x="layer", series="tokens", panel="site", xlabel="layer"), run=_run,
    cells=("corrupted", "site", "tokens", "layer", "pos"), extra_options=frozenset({"sinks"}),
    paired=("p_restored", "p_corrupt"), unit="probability", unit_scale=_scale,
    not_options=frozenset({"corrupted", "corrupt_answers"}),
    report=Report("Causal tracing: indirect effect per restored token set", split=("corrupted",), by_site=True),
    columns=("site", "tokens", "layer", "window_start", "window_end", "corrupt_pred", "p_clean", "p_corrupt", "p_restored",
             "indirect_effect", "ie_corrupt_pred", "correct", "pos", "corrupted", "dominance"),
)
