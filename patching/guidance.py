"""Training-free guidance for generation (the cross-modal-hub paper's hallucination mitigation):
decode with `log p + s * (log p_guided - log p)`, where `p_guided` comes from the same model run
under an attention intervention (e.g. `steer` toward cross-modal sinks) and `p` from the plain run.

The intervention is rebuilt at every step from the TokenMap extended by the tokens generated so
far (`make_hooks(tm)`), so it can name "generated" positions; both runs recompute the whole
sequence (no KV cache), which is what short answers (a label, a letter) need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from patching import checks
from patching.sweep import encode


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


@torch.no_grad()
def guided_generate(
    model,
    inputs: dict,
    make_hooks: Callable,
    scale: float | Tensor | Callable = 1.0,
    max_new_tokens: int = 8,
    eos_token_id: int | None = None,
    tm=None,
) -> Tensor:
    """Greedy tokens `[batch, n_new]` under guidance. `make_hooks(tm)` returns the intervention for
    the current TokenMap; `scale` is a number, a `[batch]` tensor, or `fn(tm) -> scale` (e.g. from
    the last token's attention mass on cross-modal vs unimodal sinks)."""
    checks.count(max_new_tokens, "max_new_tokens")
    if not callable(scale):  # a callable's value is checked at each step, by guided_logits
        checks.finite(scale, "guidance scale")
        n, batch = torch.as_tensor(scale).numel(), checks.batch_of(inputs)
        if n not in (1, batch):
            raise ValueError(f"a scale tensor of {n} values for {batch} prompt{'s' * (batch != 1)}: pass one per prompt (or one number)")
    if eos_token_id is not None:
        checks.token_ids(model, [eos_token_id], "eos_token_id")
    enc = encode(model, inputs)
    tm = model.token_map(inputs) if tm is None else tm
    embeds, pos = enc["inputs_embeds"], enc["position_ids"]
    mask = enc.get("attention_mask")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out, done = [], torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    for _ in range(max_new_tokens):
        plain = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask)[:, -1]
        with model.hooks(fwd_hooks=list(make_hooks(tm))):
            guided = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask)[:, -1]
        s = scale(tm) if callable(scale) else scale
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
        tm = tm.extend(1)
    return torch.stack(out, 1)
