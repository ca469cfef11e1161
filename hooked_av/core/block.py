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

    def __init__(self, ln1: nn.Module, attn: Attention, ln2: nn.Module, mlp: nn.Module, injection: bool = False):
        """`injection`: the block accepts a residual addition after its MLP (`hook_injection`)."""
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

    def forward(self, x: Float[Tensor, "batch pos d_model"], injection: Tensor | None = None,
                **attn_kwargs) -> Float[Tensor, "batch pos d_model"]:
        """`injection` `[batch, pos, d_model]` is added after the MLP, before `hook_resid_post`, so that
        `resid_post` of block l stays `resid_pre` of block l + 1 (DeepStack; zero where nothing is injected)."""
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x), **attn_kwargs)))
        x = x + self.hook_mlp_out(self.mlp(self.ln2(x)))
        if injection is not None:
            if not hasattr(self, "hook_injection"):
                raise ValueError("this block takes no injection; its family's recipe has injection=False")
            x = x + self.hook_injection(injection)
        return self.hook_resid_post(x)
