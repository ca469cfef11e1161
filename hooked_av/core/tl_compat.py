"""What TransformerLens's `ActivationCache` and users' notebooks call on a model, beyond hooks.

Mixed into `HookedAVModel`; reads only `cfg`, `embed`, `unembed`, `ln_final`, `blocks` and
`tokenizer`, which every model family provides for its language model.

Differences from a TransformerLens `HookedTransformer`, by design:
- RMSNorm keeps its learned weight (no `fold_ln`): `tokens_to_residual_directions` multiplies the
  unembedding by `ln_final.weight`, so `cache.apply_ln_to_stack(...) @ directions` (what
  `cache.logit_attrs` computes) gives exact logit contributions.
- There is no positional embedding matrix (rotary positions).
- Only the language model's activations are batch-major (`AVActivationCache`).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from torch import Tensor
from transformer_lens import ActivationCache

from hooked_av.core.placement import resident, resident_weight

# hook names (and their "_grad" twins) of the language model, the only activations that are [batch, ...]
BATCH_MAJOR_PREFIXES = ("hook_embed", "blocks.", "ln_final.")


def is_batch_major(name: str) -> bool:
    """Whether a cached activation is `[batch, ...]`: the language model's are; the towers' (`audio_encoder.*`,
    `vision_encoder.*`, `audio_qformer.*`: `[chunks | frames | windows, ...]`) and their outputs
    (`hook_*_embeds`: `[n_tokens, d]`) hold the whole batch's media back to back; so do the experts' hooks
    (`blocks.{l}.mlp.experts.{e}.*`) with the tokens routed to them."""
    # a mixture-of-experts expert's hooks hold only the tokens routed to it, `[n_routed, d]`
    return name.startswith(BATCH_MAJOR_PREFIXES) and ".mlp.experts." not in name


class AVActivationCache(ActivationCache):
    """TransformerLens's `ActivationCache`, slicing (`apply_slice_to_batch_dim`) and dropping
    (`remove_batch_dim`) the batch dimension of batch-major activations only. Tower activations
    are kept whole: their first size counts chunks or frames of every sample, and equalling the
    batch size makes it no batch index."""

    def _batch_major_part(self) -> ActivationCache:
        part = {k: v for k, v in self.cache_dict.items() if is_batch_major(k)}
        return ActivationCache(part, self.model, has_batch_dim=self.has_batch_dim)

    def _with(self, part: ActivationCache) -> dict:
        return {k: part.cache_dict.get(k, v) for k, v in self.cache_dict.items()}

    def remove_batch_dim(self, batch_size: int | None = None) -> "AVActivationCache":
        part = self._batch_major_part()
        # TransformerLens 4 takes the true batch size; 3.x infers it
        takes_size = "batch_size" in inspect.signature(part.remove_batch_dim).parameters
        part = part.remove_batch_dim(batch_size) if takes_size else part.remove_batch_dim()
        self.cache_dict, self.has_batch_dim = self._with(part), part.has_batch_dim
        return self

    if not hasattr(ActivationCache, "logit_lens"):  # TransformerLens 3.x: 4.x's one-call lens, its readout only

        def logit_lens(self, layers=None, positions=-1, return_type: str = "logits"):
            """TransformerLens 4's `cache.logit_lens` where the installed 3.x lacks it: the accumulated
            residual (`accumulated_resid(apply_ln=True)`, labels "0_pre" .. "final_post") at `positions`
            through the unembedding; `.values` `[entries, batch, (pos,) vocab]` as `return_type`
            ("logits", "probs", "log_probs"), `.labels`. The last entry is the model's logits."""
            if return_type not in ("logits", "probs", "log_probs"):
                raise ValueError(f"return_type must be 'logits', 'probs' or 'log_probs', got {return_type!r}")
            stack, labels = self.accumulated_resid(apply_ln=True, pos_slice=positions, return_labels=True)
            if layers is not None:
                stack, labels = stack[list(layers)], [labels[i] for i in layers]
            logits = stack @ self.model.W_U.to(stack.device) + self.model.b_U.to(stack.device)
            values = {"logits": logits, "probs": logits.softmax(-1), "log_probs": logits.log_softmax(-1)}[return_type]
            return SimpleNamespace(values=values, labels=labels)

    def apply_slice_to_batch_dim(self, batch_slice) -> "AVActivationCache":
        part = self._batch_major_part().apply_slice_to_batch_dim(batch_slice)
        return AVActivationCache(self._with(part), self.model, has_batch_dim=part.has_batch_dim)


class TransformerLensCompat:
    # ---- weights ----------------------------------------------------------------------------
    @property
    def W_E(self) -> Tensor:
        """`[d_vocab, d_model]` (a copy where a device map offloaded it)."""
        return resident_weight(self, self.embed)

    @property
    def W_U(self) -> Tensor:
        """`[d_model, d_vocab]` (a copy where a device map offloaded it)."""
        return resident_weight(self, self.unembed).T

    @property
    def b_U(self) -> Tensor:
        """Zeros `[d_vocab]`: the unembedding has no bias."""
        w = self.unembed.weight
        return torch.zeros(w.shape[0], dtype=w.dtype, device=self.device)

    @property
    def W_pos(self):
        # not AttributeError: nn.Module would swallow it and report a plain missing attribute
        raise NotImplementedError(
            "this model has no positional embedding matrix: positions enter through rotary embeddings "
            "(M-RoPE) inside attention, so there is no W_pos / hook_pos_embed"
        )

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Sum of the biases written into the residual stream before `layer` (attention output and
        MLP output biases), `[d_model]`; zeros for Qwen2, whose o_proj and down_proj have none."""
        total = torch.zeros(self.cfg.d_model, dtype=self.dtype, device=self.device)
        for i in range(layer + (1 if mlp_input else 0)):
            with resident(self, self.blocks[i]):  # a block the device map offloaded
                total = total + self.blocks[i].attn.b_O.to(total.device)
                if include_mlp_biases and i < layer:
                    total = total + self.blocks[i].mlp.b_out.to(total.device)
        return total

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute `blocks.{l}.attn.hook_result` (each head's output `[batch, pos, head, d_model]`)
        in the forward, as TransformerLens does; costs `n_heads` times the attention-output memory."""
        for block in self.blocks:
            block.attn.use_attn_result = use_attn_result
        self.cfg.use_attn_result = use_attn_result

    # ---- tokens -----------------------------------------------------------------------------
    def _need_tokenizer(self):
        if getattr(self, "tokenizer", None) is None:
            raise ValueError(
                "no tokenizer is attached: load from a folder that holds one, or set model.tokenizer = ..."
            )
        return self.tokenizer

    def to_tokens(self, text: str | list[str], prepend_bos: bool = False) -> Tensor:
        """Plain text -> ids `[batch, pos]` (no chat template, no media: use `model.prepare` for those).
        Qwen has no BOS token, so `prepend_bos` must stay False."""
        if prepend_bos:
            raise ValueError("Qwen tokenizers have no BOS token; prompts start with the chat template instead")
        tok = self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device)

    def to_string(self, tokens) -> str | list[str]:
        tok = self._need_tokenizer()
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return [tok.decode(t) for t in tokens.tolist()]
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return tok.decode(tokens if isinstance(tokens, list) else [tokens])

    def to_str_tokens(self, tokens) -> list[str]:
        tok = self._need_tokenizer()
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens)[0]
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return [tok.decode([i]) for i in ids]

    def to_single_token(self, string: str) -> int:
        ids = self.to_tokens(string)[0]
        if ids.numel() != 1:
            raise ValueError(f"{string!r} is {ids.numel()} tokens, not one: {self.to_str_tokens(ids)}")
        return int(ids[0])

    def tokens_to_residual_directions(self, tokens) -> Tensor:
        """Unembedding directions `[d_model]` (one token) or `[*tokens, d_model]`, with the final
        RMSNorm weight folded in so that `(resid / rms) @ direction` is the token's logit."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            tokens = torch.tensor(tokens)
        w = resident_weight(self, self.unembed)
        tokens = torch.as_tensor(tokens, device=w.device)
        return w[tokens] * resident_weight(self, self.ln_final).to(w.device)
