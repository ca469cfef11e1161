"""Direct logit attribution per attention head, split by the token group its attention reads.

A head's output at the last position is `z[h] @ W_O[h]` with `z[h] = sum_src pattern[h, last, src] *
v[src, kv(h)]`; splitting the sum over source positions by token group (audio, video, question, ...)
splits the head's output, and each part is taken, as TransformerLens's `cache.logit_attrs` takes a
component, through the final RMSNorm's cached scale (`ln_final.hook_scale` at the last position)
onto the answer's unembedding direction with the norm's weight folded in
(`model.tokens_to_residual_directions`). The parts of a head add up to its direct logit
attribution (`logit_attrs` of `cache.stack_head_results`), and over all heads, plus the embeddings,
MLPs and biases, to the answer's logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from hooked_av.inputs.token_map import GROUPS
from hooked_av.utils import resident
from patching.engine import checks, cost
from patching.engine.experiment import Cost, Experiment, Plot, Report, StudySample
from patching.engine.metrics import AnswerProb
from patching.engine.results import Result
from patching.engine.sweep import forward_rows, sample_maps, samples


def _groups(tm, groups) -> list[tuple[str, torch.Tensor]]:
    """(label, bool `[pos]`) per group of a batch-1 TokenMap; default every group present (a
    partition of the positions). Given groups must be disjoint; positions none of them holds form
    a group "rest" (when there are any), so the parts always add up to the head's total."""
    if groups is None:
        specs = [g for g in GROUPS if g != "padding" and bool(tm.select(g).mask.any())]
    else:
        specs = groups
    out, seen = [], torch.zeros(tm.seq_len, dtype=torch.bool)
    for spec in specs:
        sel = tm.select(spec)
        m = tm.mask(sel, nonempty=True)[0]
        if bool((m & seen).any()):
            raise ValueError(f"dla: group {sel.label!r} overlaps an earlier group; give disjoint groups so the parts add up")
        seen |= m
        out.append((sel.label, m))
    if not bool(seen.all()):
        out.append(("rest", ~seen))
    return out


def dla(model, inputs: dict, answers=None, groups: Sequence | None = None, layers: Sequence[int] | None = None,
        tm=None) -> Result:
    """One row per (sample, layer, head, group): `dla`, the answer logit's direct contribution through
    that head's attention to that group at the last position (logit units). `answers`: the token per
    sample (default each sample's top token); `groups`: disjoint TokenMap specs (default every group
    present); `layers` default all.

        res = dla(model, inputs, [answer], layers=[3])
        res.df.groupby("group").dla.sum()  # layer 3's heads' direct effect on the answer logit, by the group they read
    """
    layers = checks.layers(model, layers)
    if answers is not None:
        answers = (answers if isinstance(answers, AnswerProb) else AnswerProb(answers)).check(model, checks.batch_of(inputs), inputs)
    if groups is not None:
        groups = checks.nonempty(groups, "groups", none_ok=True)
    c = model.cfg
    rep = c.n_heads // c.n_key_value_heads
    rows = []
    for s in samples(model, inputs, tm):
        parts = _groups(s.tm, groups)
        seen: dict = {}

        def grab(act, hook):
            seen[hook.name] = act[0, :, -1].float() if hook.name.endswith("hook_pattern") else act[0].float()

        names = [f"blocks.{l}.attn.{h}" for l in layers for h in ("hook_pattern", "hook_v")] + ["ln_final.hook_scale"]
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, grab) for n in names]):
            logits = forward_rows(model, s, 1)
        if answers is None:
            tok = int(logits[0].argmax())
        else:
            tok = int(answers._pick(answers.answer, s.index, 1, "cpu")[0])
        with torch.no_grad():
            direction = model.tokens_to_residual_directions(tok).float()  # [d_model]
            scale = seen["ln_final.hook_scale"][-1].squeeze()
            for l in layers:
                pat = seen[f"blocks.{l}.attn.hook_pattern"]  # [heads, key]
                v = seen[f"blocks.{l}.attn.hook_v"].repeat_interleave(rep, dim=1)  # [key, heads, d_head]
                with resident(model, model.blocks[l]):  # a block the device map offloaded
                    w_o = model.blocks[l].attn.W_O.float().clone().to(direction.device)  # [heads, d_head, d_model]
                # per head, the logit weight of each value vector: (W_O[h] @ direction) / scale
                per_value = torch.einsum("khd,hd->kh", v, w_o @ direction) / scale  # [key, heads]
                contrib = pat.T * per_value  # [key, heads]
                for label, m in parts:
                    vals = contrib[m.to(contrib.device)].sum(0).tolist()
                    rows += [dict(sample=s.index, layer=l, head=h, group=label, answer=tok, dla=x) for h, x in enumerate(vals)]
    return Result("dla", pd.DataFrame(rows), dict(layers=layers, groups=None if groups is None else [str(g) for g in groups]))


# ---- the record ---------------------------------------------------------------------------------
def _run(x: StudySample, opts: dict) -> pd.DataFrame:
    return dla(x.model, x.enc, [x.answer], tm=x.tm, **opts).df


def _plan(x: StudySample, opts: dict) -> Cost:
    """One forward whose read layers run on the exact path (their patterns are read: every key)."""
    c = x.model.cfg
    n = sample_maps(x.model, x.inputs, x.tm)[0].seq_len
    read = set(checks.layers(x.model, opts.get("layers")))
    flops = sum(cost.block_flops(c, l, n, cost.keys_read(n, 0, "all" if l in read else "causal")) for l in range(c.n_layers))
    flops += cost.unembed_flops(c, 1)
    return Cost(flops, flops / cost.forward_flops(c, n), cost.run_bytes(c, 1, n, n, exact=True))


EXPERIMENT = Experiment(
    "dla", dla, by=("layer", "head", "group"), value="dla", label="direct logit attribution (logit)",
    plot=Plot("heads", panel="group"), run=_run, plan=_plan, cells=("group", "layer", "head"),
    report=Report("Direct logit attribution per head, split by the token group read"),
    columns=("layer", "head", "group", "answer", "dla"),
)
