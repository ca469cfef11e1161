"""The Whisper encoder of video-SALMONN 2+ (whisper-large-v3's): every 30 s chunk of exactly
`2 * max_source_positions` mel frames (3000 at 10 ms) is encoded on its own, with learned positions,
pre-LN blocks, full bidirectional attention inside the chunk and a final LayerNorm.

Chunks are the batch dimension, so `blocks.{i}.attn.hook_pattern` is `[n_chunks, heads, 1500, 1500]`
and no mask is built: nothing is padded inside a chunk (a hooked `hook_attn_mask` sees the all-zero mask).
"""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention
from hooked_av.core.block import Block
from hooked_av.core.mlp import MLP
from hooked_av.core.norms import LayerNorm

# HF's Whisper-style encoder layer keys (`layers.{i}.` ...) -> our block names; the Whisper encoder, the
# Qwen2.5-Omni audio tower and the Qwen3-Omni audio tower share them (each table adds its own stem and head)
WHISPER_LAYER_KEYS = [
    (r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"blocks.\1.ln1.\2"),
    (r"layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"blocks.\1.ln2.\2"),
    (r"layers\.(\d+)\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
]


def whisper_blocks(n_layers: int, d_model: int, n_heads: int, d_mlp: int, act: str = "gelu") -> nn.ModuleList:
    """Whisper's pre-LN encoder layers (the checkpoint names `q_proj`/`k_proj` (no bias)/`v_proj`/
    `out_proj`, `fc1`/`fc2`), shared by SALMONN's Whisper and Qwen2.5-Omni's audio tower."""
    return nn.ModuleList(
        Block(
            LayerNorm(d_model),
            Attention(d_model, n_heads, k_bias=False, o_bias=True, names=("q_proj", "k_proj", "v_proj", "out_proj")),
            LayerNorm(d_model),
            MLP(d_model, d_mlp, act),
        )
        for _ in range(n_layers)
    )

class WhisperEncoder(nn.Module):
    """Input `[n_chunks, n_mels, 2 * max_source_positions]` mel frames; output
    `[n_chunks, max_source_positions, d_model]` (20 ms per frame).

    Hook points: `hook_conv_out` (after the convolutions, positions added), `blocks.{i}.*`,
    `hook_out` (after the final LayerNorm).
    """

    def __init__(
        self,
        num_mel_bins: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int,
        max_source_positions: int = 1500,
        act: str = "gelu",
    ):
        super().__init__()
        self.num_mel_bins = num_mel_bins
        self.max_source_positions = max_source_positions
        self.conv1 = nn.Conv1d(num_mel_bins, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(max_source_positions, d_model)
        self.blocks = whisper_blocks(n_layers, d_model, n_heads, d_mlp, act)
        self.layer_norm = LayerNorm(d_model)
        self.hook_conv_out = HookPoint()
        self.hook_out = HookPoint()

    @property
    def frames_per_chunk(self) -> int:
        """Mel frames one chunk must have (conv2 halves them to `max_source_positions`)."""
        return 2 * self.max_source_positions

    def check_input(self, features: Tensor) -> None:
        if features.dim() != 3 or features.shape[1] != self.num_mel_bins or features.shape[2] != self.frames_per_chunk:
            raise ValueError(
                f"the Whisper encoder takes mel features [n_chunks, {self.num_mel_bins}, {self.frames_per_chunk}] "
                f"(exactly {self.frames_per_chunk} frames per 30 s chunk), got {tuple(features.shape)}; "
                f"cut the audio into 30 s chunks and pad each to {self.frames_per_chunk} frames, as "
                "WhisperFeatureExtractor(chunk_length=30) does"
            )

    def forward(self, features: Float[Tensor, "chunk mel frame"]) -> Float[Tensor, "chunk pos d_model"]:
        self.check_input(features)
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [chunk, 1500, d]
        x = self.hook_conv_out(x + self.embed_positions.weight)
        for block in self.blocks:
            x = block(x)
        return self.hook_out(self.layer_norm(x))
