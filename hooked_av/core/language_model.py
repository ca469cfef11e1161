"""The Qwen2-style M-RoPE decoder shared by the audio-visual models: token embedding, pre-norm blocks,
final RMSNorm, unembedding, the masked forward from merged embeddings and greedy decoding.

A model family mixes `MRoPELanguageModel` into its `HookedAVModel`, calls `build_language_model(cfg)`
in `__init__` and supplies its own `encode` (towers, merge, position ids). The module names
(`embed`, `blocks`, `ln_final`, `unembed`, `hook_embed`) are the TransformerLens ones, so hook names,
`ActivationCache` analyses and `HookedAVModel`'s TransformerLens weight views are the same for every family.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention, KVSlot
from hooked_av.core.block import Block
from hooked_av.core.config import HookedAVConfig
from hooked_av.core.masks import additive, causal_allowed
from hooked_av.core.mlp import GatedMLP
from hooked_av.core.norms import RMSNorm
from hooked_av.core.rope import apply_rotary, mrope_cos_sin


class MRoPELanguageModel:
    """Mixin for an `nn.Module` with `self.cfg` (a `HookedAVConfig`)."""

    cfg: HookedAVConfig

    def build_language_model(self, c: HookedAVConfig) -> None:
        self.embed = nn.Embedding(c.d_vocab, c.d_model)
        self.blocks = nn.ModuleList(
            Block(
                RMSNorm(c.d_model, c.eps),
                Attention(c.d_model, c.n_heads, c.n_key_value_heads, c.d_head, o_bias=False),
                RMSNorm(c.d_model, c.eps),
                GatedMLP(c.d_model, c.d_mlp, c.act_fn),
            )
            for _ in range(c.n_layers)
        )
        self.ln_final = RMSNorm(c.d_model, c.eps)
        self.unembed = nn.Linear(c.d_model, c.d_vocab, bias=False)
        if c.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_embed = HookPoint()

    def text_positions(self, embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
        """1D positions on all three rows `[3, batch, pos]`; padding gets 1 (as HF)."""
        b, s = embeds.shape[:2]
        if attention_mask is None:
            return torch.arange(s, device=embeds.device).view(1, 1, -1).expand(3, b, -1)
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 1).unsqueeze(0).expand(3, -1, -1)

    def route_forward(self, input_ids, attention_mask, inputs_embeds, position_ids, return_type,
                      media: dict, media_args: tuple[str, ...], **encode_kwargs):
        """The body of a family's `forward`: encode `input_ids` + `media` (with `encode_kwargs`) or
        take already merged `inputs_embeds`, then run the language model."""
        unknown = set(media) - set(media_args)
        if unknown:
            raise TypeError(f"unexpected argument(s) {sorted(unknown)}; accepted media inputs: {list(media_args)}")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with media inputs) or inputs_embeds and position_ids from model.encode")
            enc = self.encode(input_ids, attention_mask, **encode_kwargs, **media)
            inputs_embeds, position_ids = enc["inputs_embeds"], enc["position_ids"]
        elif any(media.get(k) is not None for k in media_args):
            raise ValueError("pass either media inputs or inputs_embeds (already merged), not both")
        elif position_ids is None:
            position_ids = self.text_positions(inputs_embeds, attention_mask)
        return self.run_language_model(inputs_embeds, position_ids, attention_mask, return_type=return_type)

    def run_language_model(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        return_type: str | None = "logits",
        kv_caches: list[KVSlot] | None = None,
    ) -> Tensor | None:
        """inputs_embeds `[batch, pos, d_model]`, position_ids `[3, batch, pos]` (or `[batch, pos]`),
        attention_mask `[batch, past + pos]` (1 = real token) -> logits `[batch, pos, vocab]`,
        the final residual after `ln_final` ("resid") or None."""
        if self.hook_embed.has_hooks() or self.blocks[0].hook_resid_pre.has_hooks():
            # these two hooks receive the caller's tensor (encode() outputs): an in-place edit must stay in this run
            inputs_embeds = inputs_embeds.clone()
        x = self.hook_embed(inputs_embeds)
        b, q_len, _ = x.shape
        past = kv_caches[0].length if kv_caches else 0
        k_len = past + q_len
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        plain = attention_mask is None or bool(attention_mask.all())
        # a mask is only materialised when something needs it: padding, an exact layer (a hooked mask
        # point without one gets its own, see Attention)
        needs_mask = not plain or any(blk.attn.needs_exact() for blk in self.blocks) or (past and q_len > 1)
        mask = additive(causal_allowed(attention_mask, q_len, k_len, b, x.device), x.dtype) if needs_mask else None
        cos, sin = mrope_cos_sin(position_ids, self.cfg.d_head, self.cfg.rope_theta, self.cfg.mrope_section, x.dtype)

        def rotary(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return apply_rotary(q, k, cos, sin)

        for i, block in enumerate(self.blocks):
            slot = kv_caches[i] if kv_caches else None
            x = block(x, mask=mask, rotary=rotary, causal=plain and not past, kv_cache=slot)
        x = self.ln_final(x)
        if return_type is None:
            return None
        if return_type == "resid":
            return x
        if return_type == "logits":
            return self.unembed(x)
        raise ValueError(f"return_type must be 'logits', 'resid' or None, got {return_type!r}")

    @torch.no_grad()
    def greedy_decode(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        rope_deltas: Tensor | None,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None,
    ) -> Tensor:
        """Greedy decoding with a KV cache from merged embeddings, under whatever hooks are active.
        Decoding step n sits at position `n_real_tokens + rope_deltas` on all three rows.
        Returns the new tokens `[batch, n_new]` (finished rows are padded with their eos)."""
        eos = decode_args(max_new_tokens, eos_token_id, self.cfg.d_vocab)
        b, s = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = self.text_positions(inputs_embeds, attention_mask)
        if rope_deltas is None:
            rope_deltas = (position_ids.amax(dim=(0, 2)) + 1 - attention_mask.sum(-1)).unsqueeze(1)
        caches = [KVSlot() for _ in self.blocks]
        logits = self.run_language_model(inputs_embeds, position_ids, attention_mask, kv_caches=caches)
        out, done = [], torch.zeros(b, dtype=torch.bool, device=inputs_embeds.device)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if out and eos:
                nxt = torch.where(done, out[-1], nxt)
            out.append(nxt)
            if eos:
                done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
                if bool(done.all()):
                    break
            pos = (attention_mask.sum(-1, keepdim=True) + rope_deltas).unsqueeze(0).expand(3, -1, -1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
            logits = self.run_language_model(self.embed(nxt[:, None]), pos, attention_mask, kv_caches=caches)
        return torch.stack(out, dim=1)


def decode_args(max_new_tokens: int, eos_token_id: int | list[int] | None, d_vocab: int) -> set[int]:
    """The eos ids of a `greedy_decode` call as a set, after refusing what cannot be decoded; a
    family's `generate` calls it before its towers run."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id or []}
    bad = sorted(t for t in eos if not 0 <= t < d_vocab)
    if bad:
        raise ValueError(f"eos_token_id {bad} out of range; the model has {d_vocab} token ids (0..{d_vocab - 1})")
    return eos
