"""The Qwen2.5-Omni audio tower: a Whisper-style encoder run on 2 s chunks with block-diagonal attention.

Input: the valid mel frames of every audio concatenated, `[n_mels, total_frames]`, and the frame
count of each audio. Output: `[n_tokens, output_dim]`, 25 tokens a second (40 ms each).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.masks import additive
from hooked_av.core.norms import LayerNorm
from hooked_av.encoders.whisper import whisper_blocks


def conv_frames(n_frames: Tensor | int) -> Tensor | int:
    """Frames after the stride-2 conv (kernel 3, padding 1) from `n_frames` mel frames."""
    return (n_frames - 1) // 2 + 1


def pooled_frames(n_conv_frames: Tensor | int) -> Tensor | int:
    """Tokens after pooling adjacent pairs of `n_conv_frames` (an odd last frame is dropped)."""
    return (n_conv_frames - 2) // 2 + 1


def audio_token_count(n_frames: Tensor | int) -> Tensor | int:
    """Tokens the tower makes from `n_frames` mel frames: conv stride 2, then pairs pooled."""
    return pooled_frames(conv_frames(n_frames))


def sinusoids(length: int, channels: int, device=None, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's `[sin | cos]` position table in fp32, `[length, channels]`."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, device=device).float())
    t = torch.arange(length, device=device)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


class OmniAudioEncoder(nn.Module):
    """Runs with one batch row per 2 s chunk (attention never crosses chunks, so no `[n, n]` mask over
    a whole audio is built). Hook points: `hook_conv_out` and the blocks' (`blocks.{i}.*`) with
    shape `[chunks, frames, d]` (100 frames of 20 ms per full chunk; a shorter last chunk of an audio
    is right-padded and its padding masked as keys), attention `[chunks, heads, frames, frames]`;
    `hook_pooled` `[n_tokens, d]`, `hook_out` `[n_tokens, output_dim]` (40 ms per token)."""

    def __init__(
        self,
        num_mel_bins: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int,
        output_dim: int,
        n_window: int = 100,
        act: str = "gelu",
    ):
        super().__init__()
        self.d_model = d_model
        self.n_window = n_window
        self.conv1 = nn.Conv1d(num_mel_bins, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.blocks = whisper_blocks(n_layers, d_model, n_heads, d_mlp, act)
        self.ln_post = LayerNorm(d_model)
        self.proj = nn.Linear(d_model, output_dim)
        # in every checkpoint but never used by the forward (kept so each checkpoint key has a home)
        self.audio_bos_eos_token = nn.Embedding(2, output_dim)
        self.hook_conv_out = HookPoint()
        self.hook_pooled = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, features: Tensor, feature_lens: Tensor) -> Tensor:
        """features `[n_mels, sum(feature_lens)]`; feature_lens `[n_audio]` -> `[n_tokens, output_dim]`."""
        chunk = 2 * self.n_window
        lens = feature_lens.tolist()
        chunk_lens = []
        for n in lens:
            chunk_lens += [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
        chunks = features.T.split(chunk_lens, dim=0)
        padded = nn.utils.rnn.pad_sequence(chunks, batch_first=True).transpose(1, 2)  # [c, mel, L]
        padded = padded.to(self.conv1.weight.dtype)
        cl = torch.tensor(chunk_lens, device=features.device)
        frame_ok = (torch.arange(padded.shape[2], device=features.device) < cl[:, None]).unsqueeze(1)
        x = F.gelu(self.conv1(padded)) * frame_ok  # zero padding so conv2 sees each chunk alone
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [c, L', d]
        x = x + sinusoids(x.shape[1], self.d_model, x.device).to(x.dtype)
        after = conv_frames(cl)
        real = torch.arange(x.shape[1], device=x.device)[None, :] < after[:, None]  # [chunks, frames]
        x = self.hook_conv_out(x)
        mask = None
        if not bool(real.all()):
            keys = real[:, None, None, :].expand(-1, 1, x.shape[1], -1)
            mask = additive(keys, x.dtype)
        for block in self.blocks:
            x = block(x, mask=mask)
        x = x[real]  # chunks back to back, padding dropped: [n_frames, d]

        # average adjacent pairs within each audio (an odd last frame is dropped)
        after_audio = conv_frames(feature_lens.to(x.device))
        starts = F.pad(after_audio.cumsum(0)[:-1], (1, 0))
        n_pool = pooled_frames(after_audio)
        first = torch.cat([s + 2 * torch.arange(int(n), device=x.device) for s, n in zip(starts.tolist(), n_pool.tolist())])
        pooled = self.hook_pooled((x[first] + x[first + 1]) / 2)
        return self.hook_out(self.proj(self.ln_post(pooled)))
