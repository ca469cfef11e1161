"""A TransformerLens-style configuration view of a model's language model (`model.cfg`).

TransformerLens's `ActivationCache` reads these field names; the towers' numbers live under
`cfg.towers` so nobody mistakes them for the language model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ROPE_VARIANTS = ("mrope_sectioned", "mrope_interleaved")


@dataclass(frozen=True)
class MoERecipe:
    """A sparse mixture-of-experts MLP: `n_experts` gated experts of width `d_expert`, `top_k` chosen per
    token from a softmax (fp32) over the router logits, their weights renormalised to sum 1 when
    `norm_topk_prob`; `layers` are the blocks that have it (the others keep the dense MLP)."""

    n_experts: int
    top_k: int
    d_expert: int
    norm_topk_prob: bool
    layers: tuple[int, ...]


@dataclass(frozen=True)
class BlockRecipe:
    """How a family's decoder blocks are built (one fact per field):

    qkv_bias / o_bias: biases of the q, k, v and output projections;
    qk_norm: an RMSNorm over each head's d_head on q and k, before the rotary (`attn.q_norm`, `attn.k_norm`);
    rope: "mrope_sectioned" (contiguous frequency sections per t/h/w row) or "mrope_interleaved"
      (bands cycle t, h, w; see `rope.mrope_rows`);
    moe: None (dense gated MLP everywhere) or the `MoERecipe`;
    injection: whether blocks accept a per-layer residual addition after their MLP (`hook_injection`;
      DeepStack adds visual features at the visual positions of the first layers).

    The default is the Qwen2 decoder of Qwen2.5-Omni and video-SALMONN 2+ (transformers `qwen2_5_omni`).
    """

    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    rope: str = "mrope_sectioned"
    moe: MoERecipe | None = None
    injection: bool = False

    def __post_init__(self):
        if self.rope not in ROPE_VARIANTS:
            raise ValueError(f"rope must be one of {ROPE_VARIANTS}, got {self.rope!r}")

    @classmethod
    def qwen3_moe(cls, text) -> "BlockRecipe":
        """Qwen3-Omni's Thinker decoder from its HF text config (transformers `qwen3_omni_moe`,
        `Qwen3OmniMoeThinkerTextDecoderLayer`): `attention_bias` on every projection, QK-norm,
        interleaved M-RoPE, DeepStack injection; block l is sparse when `num_experts > 0`, l is not in
        `mlp_only_layers` and `(l + 1) % decoder_sparse_step == 0`, as HF decides."""
        n, only = text.num_hidden_layers, set(text.mlp_only_layers or [])
        layers = tuple(l for l in range(n) if text.num_experts > 0 and l not in only
                       and (l + 1) % text.decoder_sparse_step == 0)
        moe = MoERecipe(text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size,
                        bool(text.norm_topk_prob), layers) if layers else None
        bias = bool(getattr(text, "attention_bias", False))
        return cls(qkv_bias=bias, o_bias=bias, qk_norm=True, rope="mrope_interleaved", moe=moe, injection=True)


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
    dtype: torch.dtype = torch.float32  # the model's (kept current by HookedAVModel._apply)
    device: torch.device | None = None  # where inputs go: the model's `device`, kept current likewise
    n_ctx: int = 32768  # the checkpoint's max_position_embeddings
    towers: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe: BlockRecipe = field(default_factory=BlockRecipe)

    @classmethod
    def from_qwen2_text(cls, text, model_name: str, original_architecture: str, tie_word_embeddings: bool,
                        towers: dict[str, dict[str, Any]], recipe: BlockRecipe | None = None) -> "HookedAVConfig":
        """From a HF Qwen2-style text config (Qwen2.5-Omni's and Qwen2.5-VL's decoders; Qwen3-Omni's
        with `recipe=BlockRecipe.qwen3_moe(text)`)."""
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
            n_ctx=int(getattr(text, "max_position_embeddings", None) or 32768),
            act_fn=text.hidden_act,
            eps=text.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", 1e6)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            original_architecture=original_architecture,
            tie_word_embeddings=bool(tie_word_embeddings),
            towers=towers,
            recipe=recipe or BlockRecipe(),
        )

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    # TransformerLens's names for the mixture-of-experts sizes (None for a dense model)
    @property
    def num_experts(self) -> int | None:
        return self.recipe.moe.n_experts if self.recipe.moe else None

    @property
    def experts_per_token(self) -> int | None:
        return self.recipe.moe.top_k if self.recipe.moe else None
