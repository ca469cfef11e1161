"""The window-level Q-Former of video-SALMONN 2+: Whisper frames are cut into windows (25 frames =
0.5 s, no padding, `F.unfold`); a learned query per window reads its window through post-LN BERT
layers (self-attention -> LN, cross-attention to the window's frames -> LN, FFN -> LN); a Linear maps
the query to the LLM width. 30 s of audio make 60 tokens (2 per second).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention
from hooked_av.core.mlp import MLP
from hooked_av.core.norms import LayerNorm

BERT_NAMES = ("query", "key", "value", "dense")


class CrossAttention(Attention):
    """BERT cross-attention: queries from the Q-Former stream, keys and values from the window's
    encoder frames (width `d_context`). Same hooks and fast/exact paths as `Attention`;
    `hook_k`/`hook_v` are `[windows, frames, heads, d_head]`, `hook_pattern` `[windows, heads, queries, frames]`."""

    def __init__(self, d_model: int, d_context: int, n_heads: int):
        super().__init__(d_model, n_heads, o_bias=True, names=BERT_NAMES)
        self.key = nn.Linear(d_context, d_model)
        self.value = nn.Linear(d_context, d_model)
        self._context: Tensor | None = None

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # `Attention.forward` projects through `project_qkv(x)`; the context rides along for that call only
        self._context = context
        try:
            return super().forward(x)
        finally:
            self._context = None

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self._context
        b, p, _ = x.shape
        q = self.query(x).view(b, p, self.n_heads, self.d_head)
        k = self.key(c).view(b, c.shape[1], self.n_heads, self.d_head)
        v = self.value(c).view(b, c.shape[1], self.n_heads, self.d_head)
        return q, k, v


class QFormerBlock(nn.Module):
    """A post-LN BERT layer over the queries (TransformerLens's BERT hook names):

        resid_mid = resid_pre + attn_out                     -> ln1
        resid_mid_cross = ln1(resid_mid) + cross_attn_out    -> ln_cross   (cross-attention layers only)
        resid_post = x + mlp_out                             -> ln2 = normalized_resid_post (the output)
    All `[windows, queries, d]`.
    """

    def __init__(self, d_model: int, d_context: int, n_heads: int, d_mlp: int, act: str, eps: float, cross: bool):
        super().__init__()
        self.attn = Attention(d_model, n_heads, o_bias=True, names=BERT_NAMES)
        self.ln1 = LayerNorm(d_model, eps)
        self.cross_attn = CrossAttention(d_model, d_context, n_heads) if cross else None
        self.ln_cross = LayerNorm(d_model, eps) if cross else None
        self.mlp = MLP(d_model, d_mlp, act)
        self.ln2 = LayerNorm(d_model, eps)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        if cross:
            self.hook_cross_attn_out = HookPoint()
            self.hook_resid_mid_cross = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_normalized_resid_post = HookPoint()

    def forward(self, x: Tensor, frames: Tensor) -> Tensor:
        x = self.hook_resid_pre(x)
        x = self.ln1(self.hook_resid_mid(x + self.hook_attn_out(self.attn(x))))
        if self.cross_attn is not None:
            cross = self.hook_cross_attn_out(self.cross_attn(x, frames))
            x = self.ln_cross(self.hook_resid_mid_cross(x + cross))
        x = self.hook_resid_post(x + self.hook_mlp_out(self.mlp(x)))
        return self.hook_normalized_resid_post(self.ln2(x))


class WindowQFormer(nn.Module):
    """Input: encoder frames `[n_chunks, frames, d_context]`. Output: `[n_chunks * windows * n_query,
    out_dim]`, in time order (chunk, window, query).

    Hook points: `hook_windows` `[n_windows, window, d_context]` (the frames each query may read),
    `hook_query_in` (queries after the embedding LayerNorm), `blocks.{i}.*`, `hook_out` (after `audio_proj`).
    """

    def __init__(
        self,
        d_model: int,
        d_context: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int,
        out_dim: int,
        window: int = 25,
        stride: int = 25,
        n_query: int = 1,
        cross_attention_freq: int = 1,
        act: str = "gelu",
        eps: float = 1e-12,
    ):
        super().__init__()
        self.window, self.stride = window, stride
        self.q_tokens = nn.Parameter(0.02 * torch.randn(1, n_query, d_model))  # checkpoints overwrite it
        self.ln_query = LayerNorm(d_model, eps)
        self.blocks = nn.ModuleList(
            QFormerBlock(d_model, d_context, n_heads, d_mlp, act, eps, cross=i % cross_attention_freq == 0)
            for i in range(n_layers)
        )
        self.audio_proj = nn.Linear(d_model, out_dim)
        self.hook_windows = HookPoint()
        self.hook_query_in = HookPoint()
        self.hook_out = HookPoint()

    def windows_per_chunk(self, frames: int) -> int:
        return (frames - self.window) // self.stride + 1

    def forward(self, frames: Float[Tensor, "chunk pos d_context"]) -> Float[Tensor, "token out_dim"]:
        c, _, d = frames.shape
        # [chunk, n_win, d, window] -> [chunk * n_win, window, d]; the unfold of the reference
        windows = frames.unfold(1, self.window, self.stride).transpose(2, 3).reshape(-1, self.window, d)
        windows = self.hook_windows(windows)
        x = self.hook_query_in(self.ln_query(self.q_tokens.expand(windows.shape[0], -1, -1)))
        for block in self.blocks:
            x = block(x, windows)
        return self.hook_out(self.audio_proj(x.reshape(-1, x.shape[-1])))
