"""The Qwen3-Omni audio encoder (transformers `qwen3_omni_moe`, `Qwen3OmniMoeAudioEncoder`): three
stride-2 Conv2d over (mel, time) on 1 s chunks, sinusoid positions restarting per chunk, pre-LN
blocks with attention inside 8 s windows, no pooling, then `ln_post`, `proj1`, GELU, `proj2`.

Input: the valid mel frames of every audio concatenated, `[n_mels, total_frames]` (10 ms each), and
the frame count of each audio. Output: `[n_tokens, output_dim]`, 13 tokens per full 1 s chunk.

Defaults follow the anchor (transformers 5.24 `Qwen3OmniMoeAudioEncoderConfig` class defaults).
Its choices that this file keeps on purpose, so that it stays exact against HF:
- every chunk is right-padded to the longest chunk of the call and the padding is NOT masked in the
  convolutions: a short last chunk's last token (and, through attention, its window) depends on
  whether a longer chunk shares the call (HF's `chunk_and_pad_features`; measured 4e-3 on a tiny
  random tower). The window length is likewise computed from the longest chunk of the call.
- the window is `tokens(longest chunk) * (n_window_infer // (2 * n_window))` tokens, counted from
  each audio's first token; windows never cross audios.
"""

from __future__ import annotations

from torch import Tensor, nn
import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention
from hooked_av.core.block import Block
from hooked_av.core.checkpoint import apply_key_table
from hooked_av.core.masks import additive
from hooked_av.core.mlp import MLP, activation
from hooked_av.core.norms import LayerNorm
from hooked_av.encoders.omni_audio import sinusoids
from hooked_av.encoders.whisper import WHISPER_LAYER_KEYS


def _conv_length(n):
    """Frames after one Conv2d (kernel 3, stride 2, padding 1) over time."""
    return (n - 1) // 2 + 1


def _chunk_tokens(n):
    """Tokens of one chunk of `n` frames after the three convolutions (0 for 0 frames)."""
    return _conv_length(_conv_length(_conv_length(n)))


def audio_token_count(n_mel_frames: Tensor | int, n_window: int = 50) -> Tensor | int:
    """Tokens the encoder makes from `n_mel_frames` mel frames (int or long tensor): every full chunk
    of `2 * n_window` frames gives `_chunk_tokens(2 * n_window)` (13 for the released 50), the rest
    its own count. Equal to HF's `_get_feat_extract_output_lengths`, which writes the 13 as a literal
    (and so is only right for `n_window` 50; this one holds for any)."""
    chunk = 2 * n_window
    return (n_mel_frames // chunk) * _chunk_tokens(chunk) + _chunk_tokens(n_mel_frames % chunk)


# HF audio-tower key (after `audio_tower.`, `thinker.audio_tower.` or `model.audio_tower.`) -> ours;
# the first row whose pattern matches the whole key wins
AUDIO_KEYS = [
    (r"(conv2d1|conv2d2|conv2d3)\.(weight|bias)", r"\1.\2"),
    (r"conv_out\.weight", "conv_out.weight"),
    (r"(ln_post|proj1|proj2)\.(weight|bias)", r"\1.\2"),
    *WHISPER_LAYER_KEYS,
]


def convert_audio_key(rest: str, t: Tensor) -> list[tuple[str, Tensor]] | None:
    """One HF audio-tower key (without its prefix) -> `[(our name, tensor)]`; None for a key no row knows."""
    return apply_key_table(AUDIO_KEYS, rest, t)


def audio_settings(a) -> dict:
    """`Qwen3OmniAudioEncoder` keyword arguments from a HF `Qwen3OmniMoeAudioEncoderConfig`."""
    return dict(
        num_mel_bins=a.num_mel_bins, d_model=a.d_model, n_layers=a.encoder_layers, n_heads=a.encoder_attention_heads,
        d_mlp=a.encoder_ffn_dim, output_dim=a.output_dim, n_window=a.n_window, n_window_infer=a.n_window_infer,
        downsample_hidden_size=a.downsample_hidden_size, conv_chunksize=a.conv_chunksize, act=a.activation_function,
    )


class Qwen3OmniAudioEncoder(nn.Module):
    """Hook points:
      hook_conv_out     `[chunks, frames, d_model]` after `conv_out`, positions added: one row per
                        1 s chunk (13 frames of 80 ms when full; rows right-padded to the longest chunk)
      blocks.{i}.*      `[windows, tokens, d_model]`: one row per attention window (104 tokens = 8 s
                        when full), right-padded to the longest window, the padded keys masked
                        (attention `[windows, heads, tokens, tokens]`); no mask is built when no
                        window is padded
      hook_out          `[n_tokens, output_dim]`, every audio's tokens back to back
    `ln_post.hook_normalized` is `[n_tokens, d_model]`.
    """

    def __init__(
        self,
        num_mel_bins: int = 128,
        d_model: int = 1280,
        n_layers: int = 32,
        n_heads: int = 20,
        d_mlp: int = 5120,
        output_dim: int = 3584,
        n_window: int = 50,
        n_window_infer: int = 800,
        downsample_hidden_size: int = 480,
        conv_chunksize: int = 500,
        act: str = "gelu",
    ):
        super().__init__()
        if n_window_infer < 2 * n_window:
            raise ValueError(f"n_window_infer ({n_window_infer} frames) must be at least one chunk of 2 * n_window "
                             f"= {2 * n_window} frames: the attention window is a whole number of chunks")
        self.d_model, self.n_window, self.n_window_infer = d_model, n_window, n_window_infer
        self.conv_chunksize = conv_chunksize
        c = downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv_out = nn.Linear(c * _chunk_tokens(num_mel_bins), d_model, bias=False)  # mel bins halve 3 times too
        self.blocks = nn.ModuleList(
            Block(LayerNorm(d_model), Attention(d_model, n_heads, o_bias=True, names=("q_proj", "k_proj", "v_proj", "out_proj")),
                  LayerNorm(d_model), MLP(d_model, d_mlp, act))
            for _ in range(n_layers)
        )
        self.ln_post = LayerNorm(d_model)
        self.proj1 = nn.Linear(d_model, d_model)
        self.act = activation(act)
        self.proj2 = nn.Linear(d_model, output_dim)
        self.num_mel_bins = num_mel_bins
        self.hook_conv_out = HookPoint()
        self.hook_out = HookPoint()

    def check_input(self, features: Tensor, feature_lens: Tensor) -> None:
        if features.dim() != 2 or features.shape[0] != self.num_mel_bins:
            raise ValueError(f"the Qwen3-Omni audio encoder takes mel features [{self.num_mel_bins}, total_frames] "
                             f"(every audio's valid frames concatenated), got {tuple(features.shape)}")
        if feature_lens.dim() != 1 or feature_lens.dtype.is_floating_point or bool((feature_lens <= 0).any()):
            raise ValueError(f"feature_lens must be a 1D integer tensor of positive frame counts, got {feature_lens.tolist()}")
        if int(feature_lens.sum()) != features.shape[1]:
            raise ValueError(f"feature_lens sum to {int(feature_lens.sum())} frames but features have {features.shape[1]}; "
                             "pass each audio's valid frames only (feature_attention_mask applied)")

    def convs(self, x: Tensor) -> Tensor:
        """`[chunks, 1, mel, frames]` -> `[chunks, channels, mel / 8, frames / 8]` (GELU after each)."""
        return F.gelu(self.conv2d3(F.gelu(self.conv2d2(F.gelu(self.conv2d1(x))))))

    def forward(self, features: Tensor, feature_lens: Tensor) -> Tensor:
        """features `[n_mels, sum(feature_lens)]`; feature_lens `[n_audio]` -> `[n_tokens, output_dim]`."""
        self.check_input(features, feature_lens)
        chunk, dev = 2 * self.n_window, features.device
        chunk_lens = []
        for n in feature_lens.tolist():
            chunk_lens += [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
        padded = nn.utils.rnn.pad_sequence(features.T.split(chunk_lens), batch_first=True)  # [c, L, mel]
        padded = padded.transpose(1, 2)[:, None].to(self.conv2d1.weight.dtype)
        x = torch.cat([self.convs(part) for part in padded.split(self.conv_chunksize)])
        c, ch, f, t = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(c, t, ch * f))
        x = self.hook_conv_out(x + sinusoids(t, self.d_model, dev).to(x.dtype))  # positions restart per chunk
        per_chunk = _chunk_tokens(torch.tensor(chunk_lens, device=dev))
        x = x[torch.arange(t, device=dev)[None, :] < per_chunk[:, None]]  # [n_tokens, d], padding dropped

        window = int(per_chunk.max()) * (self.n_window_infer // chunk)
        window_lens = []
        for n in audio_token_count(feature_lens, self.n_window).tolist():
            window_lens += [window] * (n // window) + ([n % window] if n % window else [])
        x = nn.utils.rnn.pad_sequence(x.split(window_lens), batch_first=True)  # [windows, tokens, d]
        wl = torch.tensor(window_lens, device=dev)
        real = torch.arange(x.shape[1], device=dev)[None, :] < wl[:, None]
        mask = None if bool(real.all()) else additive(real[:, None, None, :].expand(-1, 1, x.shape[1], -1), x.dtype)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.hook_out(self.proj2(self.act(self.proj1(self.ln_post(x[real])))))
