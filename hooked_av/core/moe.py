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

The experts' hook points are made where a user asks for them: a released Thinker has 48 x 128 experts,
and building their 12,288 hook points (with a module each) took ~6 s at every load. A model built inside
`experts_without_hooks()` makes none, and `lazy_expert_hooks(root)` after its `setup()` makes the root's
`hook_dict` / `mod_dict` know every expert's names and build an expert's two points on first lookup; an
expert whose points do not exist runs without them (nothing is hooked there). Built outside that context,
`Experts` make every expert's points at once (what a plain TransformerLens `setup()` can see).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.mlp import activation


class ExpertWeights:
    """Expert e's weights as TransformerLens's gated MLP names them, views of `Experts`' fused tensors:
    `W_gate`, `W_in` `[d_model, d_expert]` (HF's gate and up projections), `W_out` `[d_expert, d_model]`
    (`mlp.experts[e]`, and the same names on the expert's hook module `mlp.experts.{e}`)."""

    def __init__(self, experts: "Experts", e: int):
        self._experts, self._e = experts, e

    @property
    def W_gate(self) -> Tensor:
        w = self._experts.gate_up_proj[self._e]
        return w[: w.shape[0] // 2].T

    @property
    def W_in(self) -> Tensor:
        w = self._experts.gate_up_proj[self._e]
        return w[w.shape[0] // 2:].T

    @property
    def W_out(self) -> Tensor:
        return self._experts.down_proj[self._e].T


class ExpertHooks(nn.Module):
    """The hook points of one expert (its weights live in the fused tensors of `Experts`; `W_gate`, `W_in`,
    `W_out` read them as `ExpertWeights` does)."""

    def __init__(self, experts: "Experts | None" = None, e: int = 0):
        super().__init__()
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()
        object.__setattr__(self, "_weights", None if experts is None else ExpertWeights(experts, e))  # not a child

    W_gate = property(lambda self: self._weights.W_gate)
    W_in = property(lambda self: self._weights.W_in)
    W_out = property(lambda self: self._weights.W_out)


_LAZY: ContextVar[bool] = ContextVar("experts_without_hooks", default=False)


@contextmanager
def experts_without_hooks() -> Iterator[None]:
    """`Experts` built inside make no hook points; the root calls `lazy_expert_hooks` after `setup()`."""
    token = _LAZY.set(True)
    try:
        yield
    finally:
        _LAZY.reset(token)


class Experts(nn.Module):
    """`n_experts` gated MLPs in HF's fused layout; child `str(e)` holds expert e's hooks once they exist
    (`hooks_of`)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, act: str):
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        # random weights for `from_config` (a checkpoint overwrites them): HF's normal(0, initializer_range 0.02)
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.act = activation(act)
        if not _LAZY.get():
            for e in range(n_experts):
                self.hooks_of(e)

    def hooks_of(self, e: int) -> ExpertHooks:
        """Expert e's hook points, made (and registered as child `str(e)`) on first use."""
        if not 0 <= e < self.n_experts:
            raise ValueError(f"expert {e}: this layer has {self.n_experts} experts (0..{self.n_experts - 1})")
        got = self._modules.get(str(e))
        if got is None:
            got = ExpertHooks(self, e)
            self.add_module(str(e), got)
        return got

    def __getitem__(self, e: int) -> ExpertWeights:
        """Expert e's weights (`W_gate`, `W_in`, `W_out`, TransformerLens's gated-MLP shapes), without
        building its hook points."""
        if isinstance(e, bool) or not isinstance(e, int) or not -self.n_experts <= e < self.n_experts:
            raise IndexError(f"expert {e!r}: this layer has {self.n_experts} experts (0..{self.n_experts - 1})")
        return ExpertWeights(self, e % self.n_experts)

    def __len__(self) -> int:
        return self.n_experts

    def run(self, e: int, x: Tensor) -> Tensor:
        """Expert e on the rows x `[n, d_model]` -> `[n, d_model]` (unweighted)."""
        h = self._modules.get(str(e))
        gate, up = F.linear(x if h is None else h.hook_in(x), self.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(self.act(gate) * up, self.down_proj[e])
        return y if h is None else h.hook_out(y)


_EXPERT_NAME = re.compile(r"(.+)\.(\d+)(?:\.(hook_in|hook_out))?")


class LazyHookDict(dict):
    """A root's `hook_dict` or `mod_dict` that also knows every expert's names before their modules exist.

    Looking a name up (`d[name]`, `d.get`) builds that expert's `ExpertHooks` and enters it in both
    dicts; `name in d`, `len(d)` and iteration count every name; `items()` pairs a name not yet built with
    a stand-in that builds it when used (TransformerLens adds hooks by filter function through `items()`);
    `values()` holds the built points only (hook removal walks them: a point not built has no hooks)."""

    def __init__(self, built: dict, owners: dict[str, Experts], hooks_only: bool):
        super().__init__(built)
        self.owners, self.hooks_only, self.twin = owners, hooks_only, None

    def _virtual(self, name: str) -> tuple[str, int] | None:
        m = _EXPERT_NAME.fullmatch(name)
        if m is None or m.group(1) not in self.owners or (self.hooks_only and m.group(3) is None):
            return None
        e = int(m.group(2))
        return (m.group(1), e) if e < self.owners[m.group(1)].n_experts else None

    def _pending(self) -> list[str]:
        out = []
        for prefix, owner in self.owners.items():
            for e in range(owner.n_experts):
                if str(e) not in owner._modules:
                    base = f"{prefix}.{e}"
                    out += ([] if self.hooks_only else [base]) + [f"{base}.hook_in", f"{base}.hook_out"]
        return out

    def build(self, prefix: str, e: int) -> None:
        """Make expert e of `prefix` and enter its names in this dict and its twin."""
        h = self.owners[prefix].hooks_of(e)
        base = f"{prefix}.{e}"
        h.name, h.hook_in.name, h.hook_out.name = base, f"{base}.hook_in", f"{base}.hook_out"
        for d in (self, self.twin):
            if d is not None:
                if not d.hooks_only:
                    dict.__setitem__(d, base, h)
                dict.__setitem__(d, h.hook_in.name, h.hook_in)
                dict.__setitem__(d, h.hook_out.name, h.hook_out)

    def __missing__(self, name: str):
        where = self._virtual(name)
        if where is None:
            raise KeyError(name)
        self.build(*where)
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and self._virtual(name) is not None)

    def __iter__(self):
        return iter(list(dict.keys(self)) + self._pending())

    def keys(self) -> list[str]:
        return list(self)

    def __len__(self) -> int:
        return dict.__len__(self) + len(self._pending())

    def items(self) -> list[tuple[str, object]]:
        return list(dict.items(self)) + [(n, _Unbuilt(self, n)) for n in self._pending()]

    def values(self):
        return dict.values(self)


class _Unbuilt:
    """Stands for a hook point not built yet (in `LazyHookDict.items()`): any use builds it."""

    def __init__(self, owner: LazyHookDict, name: str):
        self._owner, self._name = owner, name

    def __getattr__(self, attr):
        return getattr(self._owner[self._name], attr)


def lazy_expert_hooks(root: nn.Module) -> None:
    """After `root.setup()` (TransformerLens): make `root.hook_dict` / `root.mod_dict` `LazyHookDict`s over
    every `Experts` module, whose hook points are then built on first lookup. Call it again after any
    later `setup()`."""
    owners = {name: m for name, m in root.named_modules() if isinstance(m, Experts)}
    hooks = LazyHookDict(root.hook_dict, owners, hooks_only=True)
    mods = LazyHookDict(root.mod_dict, owners, hooks_only=False)
    hooks.twin, mods.twin = mods, hooks
    root.hook_dict, root.mod_dict = hooks, mods


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

    @property
    def W_router(self) -> Tensor:
        """The router `[d_model, n_experts]` (HF's `gate.weight` transposed; TransformerLens's MoE calls it W_gate)."""
        return self.gate.weight.T

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
