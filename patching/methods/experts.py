"""Expert ablation: a mixture-of-experts model run with chosen experts silenced, as an `Intervention`.

    iv = ablate_experts(layers=[10, 11], experts=[3, 17])                          # everywhere
    iv = ablate_experts(range(8, 16), [3], positions=tm.select("audio"))           # on the audio tokens only
    logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))

An ablated expert's output is zeroed at `blocks.{l}.mlp.experts.{e}.hook_out` (before its router weight):
the routing is left as it was, so the token's other experts keep their weights and expert e adds nothing,
which is HF's Thinker with that expert's `down_proj` zeroed (the test checks it to 1e-5). Renormalising
the remaining weights instead would be a different intervention (a rerouting); editing
`hook_router_choice` does that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from patching.engine import checks
from patching.engine.hooks import position_mask, positions_label
from patching.engine.intervention import Intervention, Part, batch_rows, layer_list


def ablate_experts(layers, experts, positions=None, rows: Sequence[int] | None = None) -> Intervention:
    """Zero the outputs of `experts` (ints) in the sparse blocks `layers` (an int, range or list),
    at `positions` (None: every token; a Selection, a bool mask `[pos]` or `[batch, pos]`, or int
    positions) of batch rows `rows` (None: all). An expert outside the layer's range, or a dense layer,
    is refused by name when the intervention is checked or installed (`iv.check(model)`,
    `run_with_hooks`), before the forward runs.

    The rows of `experts.{e}.hook_out` are the tokens routed to e in flattened batch x pos order
    (`hooked_av.core.moe`); with positions or rows, a hook on `mlp.hook_router_choice` of the same
    block records which tokens those are.

        iv = ablate_experts(layers=[10, 11], experts=[3, 17], positions=tm.select("audio"))  # a mixture-of-experts model
        logits = model.run_with_hooks(**inputs, fwd_hooks=iv.check(model))
    """
    layers = layer_list(layers, "ablate_experts")
    experts = checks.indices(checks.nonempty(experts, "ablate_experts: experts"), 1 << 30, "ablate_experts: experts",
                             "experts", valid="experts count from 0")
    params = {"layers": list(layers), "experts": list(experts), "positions": positions_label(positions, "ablate_experts")}

    def make(rows_):
        pairs = []
        for l in layers:
            if positions is None and rows_ is None:
                pairs += [(f"blocks.{l}.mlp.experts.{e}.hook_out", _zero) for e in experts]
                continue
            seen: dict[str, Tensor] = {}

            def record(choice: Tensor, hook, seen=seen) -> None:  # [batch, pos, k], before any expert runs
                where = batch_rows(position_mask(positions, choice.shape[0], choice.shape[1], choice.device),
                                   choice.shape[0], rows_, "ablate_experts")
                seen["choice"], seen["where"] = choice.flatten(0, 1), where.flatten()

            def zero_routed(out: Tensor, hook, e: int, seen=seen) -> Tensor:
                routed = (seen["choice"] == e).any(-1).nonzero()[:, 0]  # the rows of hook_out, in order
                keep = seen["where"][routed]
                return out.masked_fill(keep[:, None], 0)

            pairs.append((f"blocks.{l}.mlp.hook_router_choice", record))
            pairs += [(f"blocks.{l}.mlp.experts.{e}.hook_out", _bound(zero_routed, e)) for e in experts]
        return pairs

    iv = Intervention([Part("ablate_experts", params, make, tuple(sorted(set(layers))))])
    return iv if rows is None else iv.on_rows(rows)


def _zero(out: Tensor, hook) -> Tensor:
    return torch.zeros_like(out)


def _bound(fn, e: int):
    def hook_fn(out: Tensor, hook) -> Tensor:
        return fn(out, hook, e)

    return hook_fn
