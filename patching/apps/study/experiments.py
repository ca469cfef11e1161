"""The study's experiments: how each runs on one prepared sample and which options it takes.

Each experiment calls the library's own function (`patching.methods.knockout.knockout`, `patching.methods.pathway.pathway`,
...) on the sample's encoded inputs (the towers ran once, `Sample.enc`) with the sample's scored answer
token, and returns the library's rows unchanged (the runner adds the sample's id, metadata and
correctness). Options are the library function's keyword arguments, checked by name before a model
loads (`check_options`), plus the few the study adds (`EXTRA`):

- `knockout`: `knockout()`'s options; the window is the study's `window=` (None: the library's
  default for the window style). `Study.knockout_accuracy` gives Map the Flow's accuracy from its rows.
- `discarding`: `discarding()`; `group` defaults to the sample's media.
- `causal_tracing`: `causal_tracing()` (presets `hub`, `rome`), once per corrupted modality
  (`corrupt`: one or a list, default every media modality of the sample); `tokens` takes TokenMap
  specs and the hub's token sets by name, `all(m)`, `sink(m)`, `cross_modal_sink(m)`,
  `unimodal_sink(m)`, `random_sink_num(m)` (`patching.engine.token_sets.hub_sets`, from
  `find_sinks(**sinks)` with the `sinks` option; the random set's seed is the tracing's `seed`).
  A token set that is empty in a sample (no sinks of that kind) gives that sample no rows for it
  (the figures' and tables' n says how many samples each set has). Every row carries the sample's
  `dominance` label (`patching.methods.dominance`).
- `sinks`: `find_sinks()`. Its tau defaults to the hub's 25, which a model narrower than 625
  (sqrt(d_model) <= 25, e.g. the 128-wide toy) can never exceed: pass `tau` (and `ratio` or `dims`).
- `logit_lens`: `logit_lens()`; `lens` may be a list ("standard", "map_the_flow"), one run each,
  told apart by a `lens` column.
- `pathway`: `pathway()`; `keep` is required (`[[src, dst, [layers kept]], ...]`).
- `fastv`: `fastv()`.
- `var`: VisAttnSink's redistribution (`patching.methods.var.var`) as an accuracy-under-intervention
  experiment: the sinks from `find_sinks(**sinks)` at every layer of `layers` (default
  `var_layers`), one forward with the edit; one row per sample with p(answer) and the top token
  with and without it. A sample with no sink among its media has nothing to redistribute: VAR is
  the identity there, and its row says `applied=False`.
- `dla`: `dla()` with the scored answer token.
- `dominance`: `patching.methods.dominance.dominance` (audio+video, audio only with black frames, video
  only with silence); a sample without both audio and video gets a row with `label` None and
  `absent` naming what it lacks.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import pandas as pd
import torch

from patching.engine import checks

MEDIA = ("audio", "video", "image")
RESERVED = {"model", "inputs", "answers", "tm", "progress", "result"}  # what the study passes itself
TOKEN_SET = re.compile(r"^(all|sink|cross_modal_sink|unimodal_sink|random_sink_num)\((audio|video)\)$")


@dataclass
class Sample:
    """One prepared sample: `inputs` (processor-style, on the device), `enc` (`model.encode`'s output:
    the towers ran once), `tm` (its TokenMap), `answer` (the scored answer token id), `window` (the
    study's knockout window)."""

    model: object
    inputs: dict
    enc: dict
    tm: object
    answer: int
    window: int | None


def present(tm, groups) -> list[str]:
    """The groups of `groups` the (batch-1) TokenMap holds."""
    return [g for g in groups if bool(tm.select(g).mask.any())]


# ---- the experiments ----------------------------------------------------------------------------
def run_knockout(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.knockout import knockout

    return knockout(x.model, x.enc, [x.answer], window=x.window, tm=x.tm, progress=False, **opts).df


def run_discarding(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.discarding import discarding

    opts.setdefault("group", "|".join(present(x.tm, MEDIA)))
    return discarding(x.model, x.enc, [x.answer], tm=x.tm, progress=False, **opts).df


def run_causal_tracing(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.causal_tracing import PRESETS, causal_tracing

    corrupt = opts.pop("corrupt", None) or present(x.tm, MEDIA)
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
            sets = token_sets(x, tokens if isinstance(tokens, list) else [tokens], sink_opts, opts.get("seed", 0))
            if not sets:
                continue
            kw["tokens"] = sets
        frames.append(causal_tracing(x.model, given, [x.answer], corrupt=m, tm=x.tm, progress=False, **kw).df.assign(corrupted=m))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return df.assign(dominance=dominance_label(x)["label"].iloc[0])


def token_sets(x: Sample, specs: list, sink_opts: dict, seed: int) -> list:
    """TokenMap specs as given; the hub's named sets (`sink(audio)`, ...) from `find_sinks`; sets
    that are empty in this sample left out."""
    from patching.engine.token_sets import hub_sets, resolve

    named = {}
    if any(isinstance(s, str) and TOKEN_SET.match(s) for s in specs):
        from patching.methods.sinks import find_sinks

        found = find_sinks(x.model, x.enc, tm=x.tm, **sink_opts)
        for m in ("audio", "video"):
            named.update({f"{k}({m})": v for k, v in hub_sets(found, m, seed).items()})
    out = []
    for s in specs:
        spec = named[s] if isinstance(s, str) and s in named else s
        if bool(resolve(spec, x.tm, 0).mask.any()):
            out.append(spec)
    return out


def run_sinks(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.sinks import find_sinks

    return find_sinks(x.model, x.enc, tm=x.tm, **opts).df


def run_logit_lens(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.logit_lens import logit_lens

    lenses = opts.pop("lens", "standard")
    lenses = [lenses] if isinstance(lenses, str) else checks.nonempty(lenses, "lens")
    return pd.concat([logit_lens(x.model, x.enc, [x.answer], tm=x.tm, lens=lens, **opts).df.assign(lens=lens)
                      for lens in lenses], ignore_index=True)


def run_pathway(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.pathway import pathway

    return pathway(x.model, x.enc, [x.answer], tm=x.tm, **opts).df


def run_fastv(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.fastv import fastv

    return fastv(x.model, x.enc, [x.answer], tm=x.tm, progress=False, **opts).df


def run_var(x: Sample, opts: dict) -> pd.DataFrame:
    """p(answer) and the top token with VAR's redistribution at the sinks `find_sinks` finds."""
    from patching.engine.metrics import AnswerProb, relative_change
    from patching.methods.sinks import find_sinks
    from patching.engine.sweep import forward_rows, samples
    from patching.methods.var import var, var_layers

    model = x.model
    sink_opts = opts.pop("sinks", None) or {}
    layers = opts.pop("layers", None) or var_layers(model.cfg.n_layers)
    media = opts.get("media", "audio|video|image")
    found = find_sinks(model, x.enc, tm=x.tm, **sink_opts).df
    sinks = torch.zeros(1, x.tm.seq_len, dtype=torch.bool)
    sinks[0, found.pos.astype(int).tolist()] = True
    n_media_sinks = int((sinks & x.tm.mask(media)).sum())
    (s,) = samples(model, x.enc, x.tm)
    metric = AnswerProb([x.answer])
    with torch.no_grad():
        base = forward_rows(model, s, 1)
        if n_media_sinks:
            iv = var(x.tm, sinks, layers, **opts).check(model, 1)
            with model.hooks(fwd_hooks=list(iv)):
                lg = forward_rows(model, s, 1)
        else:  # no media sink: no head qualifies, the edit changes nothing
            lg = base
    p_orig, p = metric(base), metric(lg)
    return pd.DataFrame([dict(sample=0, intervention="var", layers=" ".join(map(str, layers)), n_sinks=int(sinks.sum()),
                              n_media_sinks=n_media_sinks, applied=bool(n_media_sinks), p_orig=float(p_orig[0]), p=float(p[0]),
                              rel_change=float(relative_change(p, p_orig)[0]), pred_orig=int(base[0].argmax()),
                              pred=int(lg[0].argmax()), correct_orig=bool(metric.correct(base)[0]),
                              correct=bool(metric.correct(lg)[0]))])


def run_dla(x: Sample, opts: dict) -> pd.DataFrame:
    from patching.methods.dla import dla

    return dla(x.model, x.enc, [x.answer], tm=x.tm, **opts).df


def run_dominance(x: Sample, opts: dict) -> pd.DataFrame:
    return dominance_label(x)


def dominance_label(x: Sample) -> pd.DataFrame:
    """`patching.methods.dominance.dominance` of the sample (one row), or a row with `label` None and
    `absent` when the sample lacks audio or video."""
    from patching.methods.dominance import dominance

    absent = [m for m in ("audio", "video") if not bool(x.tm.select(m).mask.any())]
    if absent:
        return pd.DataFrame([dict(sample=0, pred_av=None, pred_audio_only=None, pred_video_only=None, label=None,
                                  correct_av=None, absent="|".join(absent))])
    return dominance(x.model, x.inputs, answers=[x.answer]).reset_index(drop=True).assign(absent="")


# ---- options --------------------------------------------------------------------------------------
def _library(exp: str):
    """The library function whose keyword arguments are `exp`'s options."""
    import importlib

    module, name = LIBRARY[exp]
    return getattr(importlib.import_module(module), name)


LIBRARY = {"knockout": ("patching.methods.knockout", "knockout"), "discarding": ("patching.methods.discarding", "discarding"),
           "causal_tracing": ("patching.methods.causal_tracing", "causal_tracing"), "sinks": ("patching.methods.sinks", "find_sinks"),
           "logit_lens": ("patching.methods.logit_lens", "logit_lens"), "pathway": ("patching.methods.pathway", "pathway"),
           "fastv": ("patching.methods.fastv", "fastv"), "var": ("patching.methods.var", "var"), "dla": ("patching.methods.dla", "dla"),
           "dominance": ("patching.methods.dominance", "dominance")}
EXTRA = {"causal_tracing": {"sinks"}, "var": {"sinks", "layers"}}  # options the study adds (see the module)
NOT_OPTIONS = {"knockout": {"window"}, "causal_tracing": {"corrupted", "corrupt_answers"}, "var": {"sinks", "rows"}}
REQUIRED = {"pathway": ("keep",)}

EXPERIMENT_FNS = {"knockout": run_knockout, "discarding": run_discarding, "causal_tracing": run_causal_tracing,
                  "sinks": run_sinks, "logit_lens": run_logit_lens, "pathway": run_pathway, "fastv": run_fastv,
                  "var": run_var, "dla": run_dla, "dominance": run_dominance}


def option_names(exp: str) -> list[str]:
    """The options `exp` takes: its library function's keyword arguments (less what the study passes)
    and the study's own (`EXTRA`)."""
    params = inspect.signature(_library(exp)).parameters
    lib = {n for n, p in params.items() if p.default is not inspect.Parameter.empty or n in REQUIRED.get(exp, ())}
    return sorted((lib - RESERVED - NOT_OPTIONS.get(exp, set())) | EXTRA.get(exp, set()))


def check_options(options: dict, experiments: list[str], window) -> dict:
    """Refuse, before a model loads, options for experiments the study does not run, names an
    experiment does not take, missing required ones, and a window the knockout's style cannot take."""
    options = dict(options or {})
    stray = [k for k in options if k not in experiments]
    if stray:
        raise ValueError(f"options for {stray}, which this study does not run ({experiments}); drop them or add the experiment")
    for exp, kw in options.items():
        if not isinstance(kw, dict):
            raise ValueError(f"options[{exp!r}] must be a mapping of option names to values, got {kw!r}")
        if exp == "accuracy" and kw:
            raise ValueError("accuracy takes no options (the scoring rule is the study's scoring=)")
        if exp == "accuracy":
            continue
        allowed = option_names(exp)
        bad = sorted(set(kw) - set(allowed))
        if bad:
            owned = sorted(set(bad) & (RESERVED | NOT_OPTIONS.get(exp, set())))
            why = f" ({owned} the study sets itself; the knockout window is the study's window=)" if owned else ""
            raise ValueError(f"{exp} takes no option(s) {bad}{why}; its options: {allowed}")
        nested = kw.get("sinks")
        if exp in ("causal_tracing", "var") and nested is not None:
            if not isinstance(nested, dict):
                raise ValueError(f"{exp}.sinks holds find_sinks options as a mapping (e.g. {{\"tau\": 3}}), got {nested!r}")
            bad = sorted(set(nested) - set(option_names("sinks")))
            if bad:
                raise ValueError(f"{exp}.sinks: find_sinks takes no option(s) {bad}; its options: {option_names('sinks')}")
    for exp in experiments:
        missing = [k for k in REQUIRED.get(exp, ()) if k not in options.get(exp, {})]
        if missing:
            raise ValueError(f"{exp} needs the option(s) {missing}, e.g. {exp}.keep=[[\"video\", \"question\", [1, 2]]]")
    if "knockout" in experiments:
        from patching.methods.knockout import styled_window

        style = options.get("knockout", {}).get("window_style", "centre")
        try:  # the style and the window's size agree (the model's depth is checked once it loads)
            styled_window(0, window, 10**6, style)
        except ValueError as e:
            raise ValueError(f"knockout window {window} with window_style {style!r}: {e}") from None
    return options
