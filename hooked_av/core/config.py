"""A TransformerLens-style configuration view of a model's language model (`model.cfg`).

TransformerLens's `ActivationCache` reads these field names; the towers' numbers live under
`cfg.towers` so nobody mistakes them for the language model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class HookedAVConfig:
    model_name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    act_fn: str = "silu"
    eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    normalization_type: str = "RMS"  # RMSNorm with a learned weight (TransformerLens's "RMS")
    final_rms: bool = True
    attn_only: bool = False
    gated_mlp: bool = True
    positional_embedding_type: str = "rotary"
    original_architecture: str = ""
    tie_word_embeddings: bool = False
    default_prepend_bos: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    dtype: torch.dtype = torch.float32
    device: str | None = None
    towers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def n_ctx(self) -> int:
        return 32768
