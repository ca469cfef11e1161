"""The sparse mixture-of-experts MLP (Qwen3-MoE / Qwen3-Omni Thinker) with hook points on its routing.

Follows transformers `qwen3_omni_moe` (`Qwen3OmniMoeThinkerTextSparseMoeBlock`, its `TopKRouter` and
`Experts`): router logits in the model dtype, softmax in fp32, top-k, optional renormalisation of the k
weights to sum 1, cast back; each chosen expert is a gated MLP `down(act(gate(x)) * up(x))` whose output
is multiplied by its weight and summed over experts in ascending expert order. Parameter names and layouts
are HF's (`gate.weight` [n_experts, d_model]; `experts.gate_up_proj` [n_experts, 2 d_expert, d_model],
gate rows first; `experts.down_proj` [n_experts, d_model, d_expert]).

Hooks:
  hook_router_logits   [batch, pos, n_experts]
  hook_router_weights  [batch, pos, k]   the weights that multiply the chosen experts' outputs
  hook_router_choice   [batch, pos, k]   (long) the chosen experts; an edit reroutes the tokens
  experts.{e}.hook_in  [n_routed, d_model]  the tokens routed to expert e (flattened batch x pos order)
  experts.{e}.hook_out [n_routed, d_model]  expert e's output before its weight (zero it to ablate e)
An expert that no token chooses does not run, so its two hooks do not fire.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.mlp import activation


class ExpertHooks(nn.Module):
    """The hook points of one expert (its weights live in the fused tensors of `Experts`)."""

    def __init__(self):
        super().__init__()
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()


class Experts(nn.Module):
    """`n_experts` gated MLPs in HF's fused layout; child `str(e)` holds expert e's hooks."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, act: str):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.act = activation(act)
        for e in range(n_experts):
            self.add_module(str(e), ExpertHooks())

    def hooks_of(self, e: int) -> ExpertHooks:
        return getattr(self, str(e))

    def run(self, e: int, x: Tensor) -> Tensor:
        """Expert e on the rows x `[n, d_model]` -> `[n, d_model]` (unweighted)."""
        h = self.hooks_of(e)
        gate, up = F.linear(h.hook_in(x), self.gate_up_proj[e]).chunk(2, dim=-1)
        return h.hook_out(F.linear(self.act(gate) * up, self.down_proj[e]))


class SparseMoE(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, d_expert: int, norm_topk_prob: bool,
                 act: str = "silu"):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = Experts(n_experts, d_model, d_expert, act)
        self.hook_router_logits = HookPoint()
        self.hook_router_weights = HookPoint()
        self.hook_router_choice = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        """x `[batch, pos, d_model]` -> `[batch, pos, d_model]`."""
        b, p, d = x.shape
        logits = self.hook_router_logits(self.gate(x))
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        top, choice = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        weights = self.hook_router_weights(top.to(logits.dtype)).reshape(b * p, -1)
        choice = self.hook_router_choice(choice).reshape(b * p, -1)
        n = self.gate.out_features
        if choice.numel() and not (0 <= int(choice.min()) and int(choice.max()) < n):
            raise ValueError(f"hook_router_choice holds an expert outside 0..{n - 1}")
        flat = x.reshape(b * p, d)
        out = torch.zeros_like(flat)
        for e in torch.unique(choice).tolist():  # ascending, as HF adds them
            token, slot = torch.where(choice == e)
            y = self.experts.run(e, flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(b, p, d)
