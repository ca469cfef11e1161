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

    @classmethod
    def from_qwen2_text(cls, text, model_name: str, original_architecture: str, tie_word_embeddings: bool,
                        towers: dict[str, dict[str, Any]]) -> "HookedAVConfig":
        """From a HF Qwen2-style text config (Qwen2.5-Omni's and Qwen2.5-VL's decoders)."""
        rope = dict(getattr(text, "rope_parameters", None) or {})
        n_heads = text.num_attention_heads
        return cls(
            model_name=model_name,
            n_layers=text.num_hidden_layers,
            d_model=text.hidden_size,
            n_heads=n_heads,
            n_key_value_heads=text.num_key_value_heads or n_heads,
            d_head=getattr(text, "head_dim", None) or text.hidden_size // n_heads,
            d_mlp=text.intermediate_size,
            d_vocab=text.vocab_size,
            act_fn=text.hidden_act,
            eps=text.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", 1e6)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            original_architecture=original_architecture,
            tie_word_embeddings=bool(tie_word_embeddings),
            towers=towers,
        )

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def n_ctx(self) -> int:
        return 32768
