"""The pre-norm residual block shared by the language model and both towers."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention


class Block(nn.Module):
    """`resid_mid = resid_pre + attn(ln1(resid_pre))`; `resid_post = resid_mid + mlp(ln2(resid_mid))`.

    The norms, attention and MLP are built by the model file that owns the block, so the same block
    serves the Qwen2 decoder (RMSNorm, gated MLP), the Qwen2.5-VL vision blocks and the Whisper-style
    audio blocks (LayerNorm, fc1/fc2).
    """

    # TransformerLens's logit lens checks this: logits are unembed(ln_final(last hook_resid_post))
    hook_out_is_single_residual_stream = True

    def __init__(self, ln1: nn.Module, attn: Attention, ln2: nn.Module, mlp: nn.Module, injection: bool = False,
                 split_inputs: bool = False):
        """`injection`: the block accepts a residual addition after its MLP (`hook_injection`). `split_inputs`:
        it has TransformerLens's conditional input points, each computed only while its flag is on
        (`set_use_split_qkv_input`: `hook_q_input` `[batch, pos, n_heads, d_model]`, `hook_k_input` and
        `hook_v_input` `[batch, pos, n_kv_heads, d_model]`, each head's own copy of the residual that ln1 and
        that head's projection read; `set_use_attn_in`: `hook_attn_in` `[batch, pos, n_heads, d_model]`, one
        copy per query head that its q, k and v read, so k and v are computed per query head (hook_k / hook_v
        carry n_heads); `set_use_hook_mlp_in`: `hook_mlp_in` `[batch, pos, d_model]`, what ln2 reads)."""
        super().__init__()
        self.ln1 = ln1
        self.attn = attn
        self.ln2 = ln2
        self.mlp = mlp
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if injection:
            self.hook_injection = HookPoint()
        self.use_split_qkv_input = self.use_attn_in = self.use_hook_mlp_in = False
        if split_inputs:
            self.hook_attn_in = HookPoint()
            self.hook_q_input = HookPoint()
            self.hook_k_input = HookPoint()
            self.hook_v_input = HookPoint()
            self.hook_mlp_in = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], injection: Tensor | None = None,
                **attn_kwargs) -> Float[Tensor, "batch pos d_model"]:
        """`injection` `[batch, pos, d_model]` is added after the MLP, before `hook_resid_post`, so that
        `resid_post` of block l stays `resid_pre` of block l + 1 (DeepStack; zero where nothing is injected)."""
        x = self.hook_resid_pre(x)
        if self.use_split_qkv_input or self.use_attn_in:  # TransformerLens's per-head input points
            attn = self.attn.from_inputs(*(self.ln1(t) for t in self.head_inputs(x)), **attn_kwargs)
        else:
            attn = self.attn(self.ln1(x), **attn_kwargs)
        x = self.hook_resid_mid(x + self.hook_attn_out(attn))
        x = x + self.hook_mlp_out(self.mlp(self.ln2(self.hook_mlp_in(x.clone()) if self.use_hook_mlp_in else x)))
        if injection is not None:
            if not hasattr(self, "hook_injection"):
                raise ValueError("this block takes no injection; its family's recipe has injection=False")
            x = x + self.hook_injection(injection)
        return self.hook_resid_post(x)

    def head_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The residual `[batch, pos, d_model]` as each head's own input (q, k, v), through the flag's hooks."""
        h, kv = self.attn.n_heads, self.attn.n_kv_heads
        if self.use_split_qkv_input:
            return (self.hook_q_input(_per_head(x, h)), self.hook_k_input(_per_head(x, kv)),
                    self.hook_v_input(_per_head(x, kv)))
        a = self.hook_attn_in(_per_head(x, h))
        return a, a, a


def _per_head(x: Tensor, n: int) -> Tensor:
    """`[batch, pos, d]` -> `[batch, pos, n, d]`, a copy per head (an edit of one head leaves the others)."""
    return x.unsqueeze(2).expand(-1, -1, n, -1).clone()
