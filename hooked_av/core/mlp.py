"""Feed-forward layers with TransformerLens hook points."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU, as HF's "gelu"
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * (1.702 * x).sigmoid(),
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`.

    hook_pre: gate pre-activation, hook_pre_linear: up projection, hook_post: `act(gate) * up`,
    all `[batch, pos, d_mlp]` (TransformerLens's gated-MLP names).
    """

    def __init__(self, d_model: int, d_mlp: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act_name = act
        self.act = activation(act)
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    # TransformerLens weight views: W_gate, W_in [d_model, d_mlp]; W_out [d_mlp, d_model]
    @property
    def W_gate(self) -> Tensor:
        return self.gate_proj.weight.T

    @property
    def W_in(self) -> Tensor:
        return self.up_proj.weight.T

    @property
    def W_out(self) -> Tensor:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Tensor:
        return self.up_proj.bias if self.up_proj.bias is not None else self.up_proj.weight.new_zeros(self.up_proj.weight.shape[0])

    @property
    def b_out(self) -> Tensor:
        return self.down_proj.bias if self.down_proj.bias is not None else self.down_proj.weight.new_zeros(self.down_proj.weight.shape[0])

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        pre = self.hook_pre(self.gate_proj(x))
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(self.act(pre) * pre_linear))


class MLP(nn.Module):
    """`fc2(act(fc1(x)))` (Whisper-style). hook_pre: `fc1(x)`, hook_post: `act(fc1(x))`."""

    def __init__(self, d_model: int, d_mlp: int, act: str = "gelu", names: tuple[str, str] = ("fc1", "fc2")):
        super().__init__()
        self._names = names
        setattr(self, names[0], nn.Linear(d_model, d_mlp))
        setattr(self, names[1], nn.Linear(d_mlp, d_model))
        self.act = activation(act)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = (getattr(self, n) for n in self._names)
        return fc2(self.hook_post(self.act(self.hook_pre(fc1(x)))))
