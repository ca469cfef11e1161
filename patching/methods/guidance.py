"""Training-free guidance for generation (the cross-modal-hub paper's hallucination mitigation):
decode with `log p + s * (log p_guided - log p)`, where `p_guided` comes from the same model run
under an attention intervention (e.g. `steer` toward cross-modal sinks) and `p` from the plain run.

The intervention is rebuilt at every step from the TokenMap extended by the tokens generated so
far (`make_hooks(tm)`), so it can name "generated" positions; both runs recompute the whole
sequence (no KV cache), which is what short answers (a label, a letter) need.

The scale `s` is a number, one per prompt, `fn(tm)`, or an `AdaptiveScale`: the hub's schedule
(`kaistmm/crossmodal-hub`, `logic/adaptive_guidance_complex.py::GuidanceLogits`), computed at each
step from the plain run's attention of the last token:

    step 0:      s = 0 (the momentum state is left as it is)
    step t > 0:  m   = the last row's attention to keys after the last media token, summed over
                       those keys, averaged over heads and over the guidance layers
                 w   = cross / (cross + uni + 1e-8), where cross = sum over the cross-modal sink
                       sets (audio, video) of [sum over layers of the head-and-sink mean], uni the
                       same over the unimodal sets
                 u   = min(cap, base * w)
                 u  *= (1 + cos(pi * min(1, (m - 0.4) / 0.2))) / 2         if m > 0.4
                 u  *= (w / 0.6)^2                                         if w < 0.6
                 s   = 0.5 * s_prev + 0.5 * u;  s_prev = s
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from patching.engine import checks, token_sets
from patching.engine.intervention import Intervention
from patching.engine.sweep import encode, slice_token_map

HUB_LAYERS, HUB_DEPTH = (18, 26), 28  # the hub's target_layers=range(18, 26) on the 28-layer 7B Thinker
W_EPS = 1e-8  # the hub's guard in cross / (cross + uni + 1e-8)


def guided_logits(logits: Tensor, guided: Tensor, scale: float | Tensor) -> Tensor:
    """`log_softmax(logits) + scale * (log_softmax(guided) - log_softmax(logits))`, `[..., vocab]`.
    `scale` 0 gives the plain model, 1 the guided one; a tensor scale broadcasts per row. A NaN or
    inf scale is refused: its argmax would be token 0."""
    checks.finite(scale, "guidance scale")
    lp = torch.log_softmax(logits.float(), -1)
    lg = torch.log_softmax(guided.float(), -1)
    if isinstance(scale, Tensor):
        scale = scale.to(lp.device).view(-1, *([1] * (lp.dim() - 1)))
    return lp + scale * (lg - lp)


def hub_layers(n_layers: int) -> list[int]:
    """The hub's guidance layers 18-25 of 28 as the same share of `n_layers` (ends rounded, at least
    one layer): `range(18, 26)` for 28 layers, `[3]` for 4."""
    start = min(n_layers - 1, round(HUB_LAYERS[0] * n_layers / HUB_DEPTH))
    return list(range(start, max(start + 1, min(n_layers, round(HUB_LAYERS[1] * n_layers / HUB_DEPTH)))))


class AdaptiveScale:
    """The hub's adaptive guidance scale (see the module docstring), one value per prompt and step,
    read from the plain run's attention. Give it to `guided_generate(scale=...)`; each call starts
    it afresh (`start`), and `records()` then holds every step's text mass, weight and scale.

    `cross`, `unimodal`: the sink sets whose head-and-sink means are summed (the hub's av_sink +
    va_sink and aa_sink + vv_sink): TokenMap specs, `Selection`s or `patching.engine.token_sets.TokenSet`s
    (positions of each sample without its padding, as `find_sinks` reports them); `from_sinks`
    builds them from a `find_sinks` result. Every set must hold a position in every prompt: the
    hub's mean over an empty set is NaN (and its `min(0.6, nan)` then runs at the cap), so an empty
    set is refused.

    Defaults follow `logic/adaptive_guidance_complex.py`: `cap` 0.6 (its hard-coded clamp),
    `text_threshold` 0.4 (`text_mass_threshold`), `decay_margin` 0.2, `gate` 0.6
    (`adaptive_threshold`), `momentum` 0.5; `layers` its `range(18, 26)` of 28 scaled to the model's
    depth (`hub_layers`); `base` 0.5 is `--guidance_strength`'s default in its driver
    (`infer_adpative_guidance.py`, removed from the repository in commit 0535a88; the class itself
    has no default), which ran sinks with `--k_divide 3`.

        scale = AdaptiveScale.from_sinks(find_sinks(model, inputs, ratio=5, tau=2.5))
        tokens = guided_generate(model, inputs, lambda tm: steer(tm, "last", "audio", 0.5, [3]), scale, max_new_tokens=2)
        scale.records()  # text mass, weight and scale of every step
    """

    def __init__(self, cross: Sequence, unimodal: Sequence, base: float = 0.5, layers: Sequence[int] | None = None,
                 cap: float = 0.6, text_threshold: float = 0.4, decay_margin: float = 0.2, gate: float = 0.6,
                 momentum: float = 0.5):
        self.cross = checks.nonempty(cross, "cross-modal sink sets")
        self.unimodal = checks.nonempty(unimodal, "unimodal sink sets")
        for value, what, low in ((base, "base", 0), (cap, "cap", 0), (text_threshold, "text_threshold", 0),
                                 (decay_margin, "decay_margin", 0), (gate, "gate", 0), (momentum, "momentum", 0)):
            checks.finite(value, what, minimum=low)
        if decay_margin == 0 or gate == 0:
            raise ValueError(f"decay_margin and gate divide the schedule; got decay_margin={decay_margin}, gate={gate}: "
                             "pass positive values (the hub's 0.2 and 0.6)")
        if momentum > 1:
            raise ValueError(f"momentum must be in [0, 1] (the share of the previous step's scale), got {momentum}")
        self.base, self.cap, self.text_threshold, self.decay_margin = base, cap, text_threshold, decay_margin
        self.gate, self.momentum, self._layers = gate, momentum, layers
        self.layers: list[int] = []
        self._records: list[dict] = []

    def __repr__(self) -> str:
        sets = lambda specs: [str(getattr(s, "label", s)) for s in specs]  # noqa: E731
        return (f"AdaptiveScale(cross={sets(self.cross)}, unimodal={sets(self.unimodal)}, base={self.base:g}, "
                f"layers={self._layers or 'hub'}, cap={self.cap:g}, text_threshold={self.text_threshold:g}, "
                f"decay_margin={self.decay_margin:g}, gate={self.gate:g}, momentum={self.momentum:g})")

    @classmethod
    def from_sinks(cls, result, **kwargs) -> "AdaptiveScale":
        """Sets from a `patching.methods.sinks.find_sinks` result: cross = the cross-modal audio and video
        sinks, unimodal = the unimodal audio and video sinks (the hub's av/va and aa/vv sinks)."""
        sets = {k: [token_sets.sinks(result, m, k) for m in ("audio", "video")] for k in ("cross_modal_sink", "unimodal_sink")}
        return cls(sets["cross_modal_sink"], sets["unimodal_sink"], **kwargs)

    # ---- what guided_generate calls ----------------------------------------------------------
    def start(self, model, tm) -> None:
        """Resolve the sets and the text start in `tm`'s padded positions and reset the momentum;
        raises before any forward when a set is empty in a prompt or a prompt has no media."""
        self.layers = checks.layers(model, hub_layers(model.cfg.n_layers) if self._layers is None else self._layers)
        media = tm.mask("media")
        bare = [r for r in range(tm.batch) if not bool(media[r].any())]
        if bare:
            raise ValueError(f"prompt(s) {bare} hold no media token: the text mass is read after the last media "
                             "token, so adaptive guidance needs media in every prompt")
        self.text_start = torch.tensor([int(media[r].nonzero().max()) + 1 for r in range(tm.batch)])
        self.sets = {"cross": self._resolve(self.cross, tm, "cross"), "unimodal": self._resolve(self.unimodal, tm, "unimodal")}
        self.prev = torch.zeros(tm.batch, dtype=torch.float64)
        self._records = []

    def _resolve(self, specs, tm, kind) -> list[list[Tensor]]:
        """Per set, per prompt: the long positions in the padded row."""
        out = []
        for spec in specs:
            per_row = []
            for r in range(tm.batch):
                keep = ~tm.padding[r]
                sel = token_sets.resolve(spec, slice_token_map(tm, r, keep), r).mask[0]
                pos = keep.nonzero()[:, 0][sel]
                if not len(pos):
                    raise ValueError(
                        f"{kind} sink set {str(getattr(spec, 'label', spec))!r} is empty in prompt {r}: the hub's "
                        "head-and-sink mean over no sink is NaN; find sinks with another k_divide / tau, or pass "
                        "sets that hold a position in every prompt")
                per_row.append(pos)
            out.append(per_row)
        return out

    def step(self, index: int, rows: Tensor) -> Tensor:
        """The scales `[batch]` (float64) at decoding step `index` from the plain run's last-row
        attention `rows` `[layers, batch, heads, keys]` at `self.layers`."""
        b = rows.shape[1]
        if index == 0:  # the hub guides nothing on the first token and keeps its momentum state
            self._records += [dict(step=0, row=r, text_mass=math.nan, weight=math.nan, target=0.0, scale=0.0)
                              for r in range(b)]
            return torch.zeros(b, dtype=torch.float64)
        rows = rows.double().cpu()
        out = torch.zeros(b, dtype=torch.float64)
        for r in range(b):
            a = rows[:, r]  # [layers, heads, keys]
            text = float(a[:, :, int(self.text_start[r]):].sum(-1).mean(-1).mean())
            cross, uni = (sum(float(a[:, :, s[r]].mean((1, 2)).sum()) for s in self.sets[k]) for k in ("cross", "unimodal"))
            w = cross / (cross + uni + W_EPS)
            target = min(self.cap, self.base * w)
            if text > self.text_threshold:
                target *= 0.5 * (1 + math.cos(min(1.0, (text - self.text_threshold) / self.decay_margin) * math.pi))
            if w < self.gate:
                target *= (w / self.gate) ** 2
            out[r] = self.momentum * float(self.prev[r]) + (1 - self.momentum) * target
            self._records.append(dict(step=index, row=r, text_mass=text, weight=w, target=target, scale=float(out[r])))
        self.prev = out.clone()
        return out

    def records(self) -> pd.DataFrame:
        """One row per step and prompt of the last `guided_generate` call: step, row, text_mass,
        weight (w), target (before momentum) and scale (NaN text mass and weight on step 0)."""
        return pd.DataFrame(self._records, columns=["step", "row", "text_mass", "weight", "target", "scale"])


def _plain_run(model, embeds, pos, mask, inj, layers):
    """Last-position logits `[batch, vocab]` of the plain run and, with `layers`, the last row's
    attention `[layers, batch, heads, keys]` read in the same forward (exact path's rows)."""
    got: dict[int, Tensor] = {}

    def reader(layer):
        def read(attn, qh, kh, m, causal, pattern):
            last = torch.full((qh.shape[0], 1), qh.shape[2] - 1, dtype=torch.long, device=qh.device)
            got[layer] = attn.pattern_rows(qh, kh, m, causal, last, pattern)[:, :, 0].float()

        return read

    with model.attention_readers({l: reader(l) for l in layers or []}):
        logits = model.run_language_model(embeds, pos, mask, injections=inj, logits_at="last")[:, -1]
    return logits, (torch.stack([got[l] for l in layers]) if layers else None)


def _hooks_of(model, make_hooks, tm) -> list:
    """`make_hooks(tm)` as checked `(hook_name, fn)` pairs; anything else is refused, naming what it returned."""
    if not callable(make_hooks):
        raise TypeError(f"make_hooks must be a function of the TokenMap returning the intervention (e.g. "
                        f"lambda tm: steer(tm, 'last', 'audio', 0.5, [3])), got {type(make_hooks).__name__}")
    got = make_hooks(tm)
    if isinstance(got, Intervention):
        return list(got.check(model, seq_len=tm.seq_len))
    pairs = list(got) if isinstance(got, (list, tuple)) else None
    if pairs is None or not pairs or not all(isinstance(p, tuple) and len(p) == 2 and (isinstance(p[0], str) or callable(p[0]))
                                             and callable(p[1]) for p in pairs):
        raise TypeError(f"make_hooks(tm) returned {type(got).__name__} {got!r:.80}; it must return an Intervention "
                        "(e.g. lambda tm: steer(tm, 'last', 'audio', 0.5, [3])) or a non-empty list of (hook_name, fn) "
                        "pairs (a function body without `return` gives None)")
    for name, _ in pairs:
        if isinstance(name, str):
            model.check_hook_name(name)
    return pairs


@torch.no_grad()
def guided_generate(
    model,
    inputs: dict,
    make_hooks: Callable,
    scale: float | Tensor | Callable | AdaptiveScale = 1.0,
    max_new_tokens: int = 8,
    eos_token_id: int | None = None,
    tm=None,
) -> Tensor:
    """Greedy tokens `[batch, n_new]` under guidance. `make_hooks(tm)` returns the intervention for
    the current TokenMap; `scale` is a number, a `[batch]` tensor, `fn(tm) -> scale`, or an
    `AdaptiveScale` (fed the plain run's last-row attention at every step). A step whose scale is 0
    in every row is decoded from the plain run alone (the guided forward would not change it).
    Injections of `encode` (DeepStack's visual features) are added on the prompt's positions at
    every step, none on the generated ones.

        toward_audio = lambda tm: steer(tm, "last", "audio", alpha=0.5, layers=[3])
        tokens = guided_generate(model, inputs, toward_audio, scale=1.0, max_new_tokens=2)
        model.tokenizer.decode(tokens[0])
    """
    checks.count(max_new_tokens, "max_new_tokens")
    adaptive = isinstance(scale, AdaptiveScale)
    if not adaptive and not callable(scale):  # a callable's value is checked at each step
        checks.finite(scale, "guidance scale")
        n, batch = torch.as_tensor(scale).numel(), checks.batch_of(inputs)
        if n not in (1, batch):
            raise ValueError(f"a scale tensor of {n} values for {batch} prompt{'s' * (batch != 1)}: pass one per prompt (or one number)")
    if eos_token_id is not None:
        checks.token_ids(model, [eos_token_id], "eos_token_id")
    tm = model.token_map(inputs) if tm is None else tm
    if adaptive:
        scale.start(model, tm)
    _hooks_of(model, make_hooks, tm)  # what it returns is checked before any forward
    enc = encode(model, inputs)
    embeds, pos = enc["inputs_embeds"], enc["position_ids"]
    inj = enc.get("injections")
    mask = enc.get("attention_mask")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out, done = [], torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    for step in range(max_new_tokens):
        plain, rows = _plain_run(model, embeds, pos, mask, inj, scale.layers if adaptive else None)
        s = scale.step(step, rows) if adaptive else scale(tm) if callable(scale) else scale
        checks.finite(s, "guidance scale")
        if bool((torch.as_tensor(s) == 0).all()):
            nxt = plain.argmax(-1)
        else:
            with model.hooks(fwd_hooks=_hooks_of(model, make_hooks, tm)):
                guided = model.run_language_model(embeds, pos, mask, injections=inj, logits_at="last")[:, -1]
            nxt = guided_logits(plain, guided, s).argmax(-1)
        if out and eos_token_id is not None:
            nxt = torch.where(done, out[-1], nxt)
        out.append(nxt)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
        embeds = torch.cat([embeds, model.embed(nxt[:, None]).to(embeds.dtype)], 1)
        nxt_pos = (pos.amax(dim=(0, 2)) + 1).view(1, -1, 1).expand(3, -1, 1)
        pos = torch.cat([pos, nxt_pos], 2)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        if inj is not None:  # generated tokens are text: nothing injected there
            items = inj.items() if isinstance(inj, Mapping) else enumerate(inj)
            inj = {l: None if t is None else torch.cat([t, t.new_zeros(t.shape[0], 1, t.shape[2])], 1) for l, t in items}
        tm = tm.extend(1)
    return torch.stack(out, 1)
