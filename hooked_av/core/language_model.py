"""The M-RoPE decoder shared by the audio-visual models: token embedding, pre-norm blocks built from the
family's `BlockRecipe` (Qwen2's dense decoder; Qwen3's QK-norm, mixture of experts, interleaved M-RoPE and
DeepStack injection), final RMSNorm, unembedding, the one layer loop every experiment runs through
(`run_language_model`: injections, physical discarding, logits where they are read) and greedy decoding.

A model family mixes `MRoPELanguageModel` into its `HookedAVModel`, calls `build_language_model(cfg)`
in `__init__` and supplies its own `encode` (towers, merge, position ids). The module names
(`embed`, `blocks`, `ln_final`, `unembed`, `hook_embed`) are the TransformerLens ones, so hook names,
`ActivationCache` analyses and `HookedAVModel`'s TransformerLens weight views are the same for every family.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.attention import Attention, KVSlot
from hooked_av.core.block import Block
from hooked_av.core.config import HookedAVConfig
from hooked_av.core.masks import additive, causal_allowed, positions_or_mask
from hooked_av.core.mlp import GatedMLP
from hooked_av.core.moe import SparseMoE
from hooked_av.core.norms import RMSNorm
from hooked_av.core.rope import apply_rotary, mrope_cos_sin
from hooked_av.core.validate import layer_list


class MRoPELanguageModel:
    """Mixin for an `nn.Module` with `self.cfg` (a `HookedAVConfig`)."""

    cfg: HookedAVConfig

    def build_language_model(self, c: HookedAVConfig) -> None:
        """Embedding, `c.n_layers` blocks built from `c.recipe` (see `BlockRecipe`), final norm, unembedding."""
        r = c.recipe
        self.embed = nn.Embedding(c.d_vocab, c.d_model)
        self.blocks = nn.ModuleList(
            Block(
                RMSNorm(c.d_model, c.eps),
                Attention(c.d_model, c.n_heads, c.n_key_value_heads, c.d_head, q_bias=r.qkv_bias, k_bias=r.qkv_bias,
                          v_bias=r.qkv_bias, o_bias=r.o_bias,
                          qk_norm=(RMSNorm(c.d_head, c.eps), RMSNorm(c.d_head, c.eps)) if r.qk_norm else None),
                RMSNorm(c.d_model, c.eps),
                SparseMoE(c.d_model, r.moe.n_experts, r.moe.top_k, r.moe.d_expert, r.moe.norm_topk_prob, c.act_fn)
                if r.moe and layer in r.moe.layers else GatedMLP(c.d_model, c.d_mlp, c.act_fn),
                injection=r.injection,
                split_inputs=True,
            )
            for layer in range(c.n_layers)
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
                      media: dict, media_args: tuple[str, ...], logits_at=None, injections=None,
                      stop_at_layer: int | None = None, **encode_kwargs):
        """The body of a family's `forward`: encode `input_ids` + `media` (with `encode_kwargs`) or
        take already merged `inputs_embeds` (with the `injections` `encode` returned, if any), then run
        the language model, reading logits at `logits_at` (see `run_language_model`)."""
        unknown = set(media) - set(media_args)
        if unknown:
            raise TypeError(f"unexpected argument(s) {sorted(unknown)}; accepted media inputs: {list(media_args)}")
        self._stop_layer(stop_at_layer, 0, return_type, logits_at, None)  # refused before the towers run
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with media inputs) or inputs_embeds and position_ids from model.encode")
            if injections is not None:
                raise ValueError("injections come from model.encode: pass them with inputs_embeds, not with input_ids")
            enc = self.encode(input_ids, attention_mask, **encode_kwargs, **media)
            inputs_embeds, position_ids, injections = enc["inputs_embeds"], enc["position_ids"], enc.get("injections")
        elif any(media.get(k) is not None for k in media_args):
            raise ValueError("pass either media inputs or inputs_embeds (already merged), not both")
        elif position_ids is None:
            position_ids = self.text_positions(inputs_embeds, attention_mask)
        return self.run_language_model(inputs_embeds, position_ids, attention_mask, return_type=return_type,
                                       injections=injections, logits_at=logits_at, stop_at_layer=stop_at_layer)

    def run_language_model(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        return_type: str | None = "logits",
        kv_caches: list[KVSlot] | None = None,
        injections: Mapping[int, Tensor] | Sequence[Tensor | None] | None = None,
        discard: tuple[object, int] | None = None,
        logits_at=None,
        start_layer: int = 0,
        stop_at_layer: int | None = None,
        embed: bool = True,
    ) -> Tensor | None:
        """The one layer loop of the language model (every experiment runs through it).

        inputs_embeds `[batch, pos, d_model]`, position_ids `[3, batch, pos]` (or `[batch, pos]`),
        attention_mask `[batch, past + pos]` (1 = real token).
        injections: `{layer: [batch, pos, d_model]}` (or a list indexed by layer), added after that
          block's MLP (`blocks.{l}.hook_injection`; the recipe must allow it).
        discard: `(positions, from_layer)`: the positions (bool `[pos]`, bool `[batch, pos]` equal in every
          row, or a `Selection`) are physically removed from the residual stream before block
          `from_layer`; the rest keep their own position ids (rotary angles), padding and injections.
        logits_at: None or "all" (every position), "last", or positions (ints or a bool `[pos]` mask);
          HF's `logits_to_keep`. Only those positions are unembedded (or returned, for "resid").
        start_layer: `inputs_embeds` is the residual stream entering block `start_layer` (its `hook_resid_pre`
          fires on it); `hook_embed`, the blocks before it and their injections do not run (what a sweep
          reusing a clean run's residuals needs: nothing before its first edited layer changes).
          `n_layers`: no block runs, only `ln_final` and the unembedding (TransformerLens's `start_at_layer`).
        embed: whether `inputs_embeds` passes `hook_embed` (False: it is already the residual stream, as
          TransformerLens's `start_at_layer=0` takes it).
        stop_at_layer: as TransformerLens's: run blocks before it only (0: the embeddings alone; negative
          counts from the end, -1 = all but the last block) and return the residual stream entering that
          block, `[batch, pos, d_model]`, unnormalised; no later block, `ln_final` or unembedding runs (what
          harvesting one layer's activations needs). `return_type` and `logits_at` do not apply and are refused.
        Returns logits `[batch, n_read, vocab]`, the final residual after `ln_final` ("resid") or None.
        """
        b, q_len, _ = inputs_embeds.shape
        n = len(self.blocks)
        if not 0 <= int(start_layer) <= n:
            raise ValueError(f"start_layer {start_layer}: the model has {n} blocks (0..{n - 1}, or {n}: none)")
        start_layer = int(start_layer)
        stop = self._stop_layer(stop_at_layer, start_layer, return_type, logits_at, kv_caches)
        if start_layer and discard is not None:
            raise ValueError("discard cannot run from start_layer > 0; run the whole stack")
        if kv_caches is not None and len(kv_caches) != n:
            raise ValueError(f"kv_caches holds {len(kv_caches)} slots; the model has {n} blocks (one slot per block)")
        past = kv_caches[start_layer].length if kv_caches and start_layer < n else 0
        inject = self.injection_list(injections, inputs_embeds)
        drop_at, keep = self._discard_plan(discard, b, q_len, inputs_embeds.device, past)
        read = read_positions(logits_at, q_len, inputs_embeds.device, keep)
        if return_type not in ("logits", "resid", None):
            raise ValueError(f"return_type must be 'logits', 'resid' or None, got {return_type!r}")
        embed = embed and not start_layer
        if (self.hook_embed.has_hooks() and embed) or (start_layer < n and self.blocks[start_layer].hook_resid_pre.has_hooks()):
            # these two hooks receive the caller's tensor (encode() outputs, a sweep's cached residual): an
            # in-place edit must stay in this run
            inputs_embeds = inputs_embeds.clone()
        x = self.hook_embed(inputs_embeds) if embed else inputs_embeds
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        state = None
        devices = getattr(self, "block_devices", None)  # set where a device map placed the blocks
        for i in range(start_layer, n if stop is None else stop):
            block = self.blocks[i]
            if devices is not None and (devices[i] != x.device or devices[i] != position_ids.device):
                # the stream follows the blocks across devices (a sweep's cached residual may already be there)
                x, position_ids = x.to(devices[i]), position_ids.to(devices[i])
                attention_mask = None if attention_mask is None else attention_mask.to(devices[i])
                state = None
            if i == drop_at:  # physical discarding: fewer positions from here on
                k = keep.to(x.device)
                x, position_ids = x[:, k], position_ids[:, :, k]
                attention_mask = None if attention_mask is None else attention_mask[:, k]
                inject = [None if t is None else t[:, keep.to(t.device)] for t in inject]
                state = None
            if state is None:
                state = self.attention_inputs(x, position_ids, attention_mask, past)
            injection = None if inject[i] is None else inject[i].to(x.device)
            x = block(x, injection=injection, kv_cache=kv_caches[i] if kv_caches else None, **state)
        if stop is not None:
            return x
        x = self.ln_final(x)
        if return_type is None:
            return None
        if read is not None:
            x = x[:, read.to(x.device) if isinstance(read, Tensor) else read]
        return x if return_type == "resid" else self.unembed(x)

    def _stop_layer(self, stop_at_layer, start_layer: int, return_type, logits_at, kv_caches) -> int | None:
        """`stop_at_layer` as a block index in start_layer..n (None: run every block), after refusing what
        cannot apply with it."""
        if stop_at_layer is None:
            return None
        n = len(self.blocks)
        if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int):
            raise ValueError(f"stop_at_layer must be an integer layer, got {stop_at_layer!r}")
        stop = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
        if not 0 <= stop <= n:
            raise ValueError(f"stop_at_layer {stop_at_layer}: the model has {n} blocks; use 0..{n} (or -{n}..-1)")
        if stop < start_layer:
            raise ValueError(f"stop_at_layer {stop_at_layer} comes before start_layer {start_layer}: nothing would run")
        if return_type != "logits" or logits_at is not None:
            raise ValueError("stop_at_layer returns the residual stream entering that block (as TransformerLens's); "
                             "return_type and logits_at do not apply: leave them at their defaults")
        if kv_caches is not None:
            raise ValueError("stop_at_layer with kv_caches would leave the later blocks' caches empty; run without a cache")
        return stop

    def attention_rows(self, inputs: dict, queries="last", layers: Sequence[int] | None = None,
                       heads: Sequence[int] | None = None, tm=None) -> Tensor:
        """The attention of chosen query rows over every key, `[layers, batch, heads, rows, keys]`, for a
        forward of `inputs` (what `model(**inputs)` takes) under whatever hooks are active.

        queries: a TokenMap spec ("last", "question", ...; `tm` defaults to `model.token_map(inputs)`), a
        Selection, a bool mask `[pos]` or `[batch, pos]` (rows in position order; every batch row must select
        as many), or int positions (rows in the order and with the repeats given, as `logits_at`). Computed per layer from the rotated q and k with the final mask (after any `hook_attn_mask`
        edits), the rows alone (see `Attention.pattern_rows`); a layer whose scores or pattern are hooked
        runs exactly and gives the rows of its pattern as edited. Memory grows with rows x keys."""
        layers = layer_list(layers, len(self.blocks), "layers")
        h = self.cfg.n_heads
        heads_t = None if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
        if heads_t is not None and (not len(heads_t) or int(heads_t.min()) < 0 or int(heads_t.max()) >= h):
            raise ValueError(f"heads {list(heads)}: the model has {h} query heads (0..{h - 1})")
        rows = self.query_rows(inputs, queries, tm)
        out: dict[int, Tensor] = {}

        def reader(layer: int):
            def read(attn, qh, kh, mask, causal, pattern):
                got = attn.pattern_rows(qh, kh, mask, causal, rows.to(qh.device), pattern)
                out[layer] = got if heads_t is None else got[:, heads_t.to(got.device)]

            return read

        with self.attention_readers({l: reader(l) for l in layers}), torch.no_grad():
            self(**inputs, return_type=None)
        return torch.stack([out[l].to(out[layers[0]].device) for l in layers])  # layers may sit on several devices

    def empty_kv_caches(self) -> list[KVSlot]:
        """One empty key/value slot per block, for `run_language_model(kv_caches=...)`, which fills slot l
        with block l's rotated keys and values (`slot.k`, `slot.v`: `[batch, pos, kv_heads, d_head]`;
        `slot.length`); a later run with the same slots continues after those positions.

            caches = model.empty_kv_caches()
            model.run_language_model(**lm_inputs, kv_caches=caches, return_type=None)
            k3, v3 = caches[3].k, caches[3].v
        """
        return [KVSlot() for _ in self.blocks]

    def prefix_kv_caches(self, kv: Sequence[tuple[Tensor, Tensor]], end: int, n: int = 1,
                         from_layer: int = 0, grow: bool = True, fold: bool = False) -> list[KVSlot | None]:
        """Slots holding positions `0..end-1` of cached keys and values `kv` (per block `(k, v)` of a batch-1
        run, e.g. an earlier `empty_kv_caches()` filled), repeated `n` times along the batch, for blocks
        `from_layer..` (None before them: a run with `start_layer=from_layer` reads none there). A run of the
        positions after `end` continues from them, as a sweep's cells do. `grow=False`: a run reads the
        prefix and its own keys and values but the slots keep the prefix alone (a sweep's cells run once, so
        each layer's `n` rows of every key are dropped as soon as the layer is done); `fold` (with `grow=False`):
        the rows' queries read the prefix in one attention call, not a copy per row (`KVSlot.of`).

            slots = model.prefix_kv_caches([(s.k, s.v) for s in caches], end=40, n=8, from_layer=2)
        """
        if len(kv) != len(self.blocks):
            raise ValueError(f"kv holds {len(kv)} layers; the model has {len(self.blocks)} blocks")
        return [KVSlot.of(k[:, :end].expand(n, -1, -1, -1), v[:, :end].expand(n, -1, -1, -1), grow=grow, fold=fold)
                if i >= from_layer else None for i, (k, v) in enumerate(kv)]

    @contextmanager
    def attention_readers(self, readers: Mapping[int, Callable]):
        """Install `readers[l]` as block l's `attn.reader` for the runs inside the context (see `Attention`):
        `reader(attn, qh, kh, mask, causal, pattern)` sees each forward's final q, k and mask."""
        try:
            for l, fn in readers.items():
                self.blocks[l].attn.reader = fn
            yield
        finally:
            for blk in self.blocks:
                blk.attn.reader = None

    def query_rows(self, inputs: dict, queries, tm=None) -> Tensor:
        """long `[batch, r]`: the positions `queries` names in each row (see `attention_rows`): int positions in
        the order and with the repeats given (negative ones from the end), a mask's positions in order."""
        ref = inputs.get("inputs_embeds", inputs.get("input_ids"))
        b, s = ref.shape[:2]
        if isinstance(queries, str):
            tm = self.token_map(inputs) if tm is None else tm
            queries = tm.select(queries)
        t = positions_or_mask(queries, s, "queries")
        if t.dtype != torch.bool:
            t = t.flatten().long()
            if not len(t) or int(t.max()) >= s or int(t.min()) < -s:
                raise ValueError(f"queries {t.tolist()}: name at least one position in 0..{s - 1}")
            return (t % s)[None].expand(b, -1)  # in the order and with the repeats given, as logits_at
        t = t if t.dim() == 2 else t[None].expand(b, -1)
        if t.shape[-1] != s or t.shape[0] not in (1, b):
            raise ValueError(f"queries as a mask must be [pos] or [batch, pos] = [{b}, {s}], got {tuple(t.shape)}")
        t = t.expand(b, -1)
        counts = t.sum(-1)
        if int(counts.min()) == 0 or bool((counts != counts[0]).any()):
            raise ValueError(f"queries select {counts.tolist()} positions per row; every row must select the same "
                             "number (at least one): read the rows one at a time or pick positions")
        return t.nonzero()[:, 1].view(b, -1)

    def attention_inputs(self, x: Tensor, position_ids: Tensor, attention_mask: Tensor | None, past: int = 0) -> dict:
        """The keyword arguments every block's attention takes for a run of x `[batch, q, d]` after `past`
        cached positions: the additive mask (None where the causal kernel suffices), the rotary of the
        recipe's M-RoPE variant, and whether the mask is plain causal."""
        c = self.cfg
        b, q_len = x.shape[:2]
        k_len = past + q_len
        plain = attention_mask is None or bool(attention_mask.all())
        # a mask is only materialised when something needs it: padding, an exact layer (a hooked mask
        # point without one gets its own, see Attention), or queries after a cached prefix
        needs_mask = not plain or any(blk.attn.needs_exact() for blk in self.blocks) or (past and q_len > 1)
        mask = additive(causal_allowed(attention_mask, q_len, k_len, b, x.device), x.dtype) if needs_mask else None
        cos, sin = mrope_cos_sin(position_ids, c.d_head, c.rope_theta, c.mrope_section, x.dtype,
                                 interleaved=c.recipe.rope == "mrope_interleaved")
        return dict(mask=mask, rotary=functools.partial(apply_rotary, cos=cos, sin=sin), causal=plain and not past)

    def injection_list(self, injections, embeds: Tensor) -> list[Tensor | None]:
        """Per layer: the injection `[batch, pos, d_model]` or None, checked before any work."""
        n = len(self.blocks)
        out: list[Tensor | None] = [None] * n
        if injections is None:
            return out
        if not self.cfg.recipe.injection:
            raise ValueError("this model's blocks take no injections (its recipe has injection=False)")
        items = injections.items() if isinstance(injections, Mapping) else enumerate(injections)
        for layer, t in items:
            if t is None:
                continue
            if not 0 <= int(layer) < n:
                raise ValueError(f"injection at layer {layer}: the model has {n} blocks (0..{n - 1})")
            if tuple(t.shape) != tuple(embeds.shape):
                raise ValueError(f"injection at layer {layer} has shape {tuple(t.shape)}; it must be "
                                 f"[batch, pos, d_model] = {tuple(embeds.shape)} (zeros where nothing is added)")
            out[int(layer)] = t.to(embeds.device, embeds.dtype)
        return out

    def _discard_plan(self, discard, batch: int, seq: int, device, past: int) -> tuple[int, Tensor | None]:
        """`(from_layer, keep)`: keep is bool `[pos]` (None: nothing discarded)."""
        if discard is None:
            return -1, None
        positions, from_layer = discard
        n = len(self.blocks)
        if not 0 <= int(from_layer) <= n:
            raise ValueError(f"discard from layer {from_layer}: the model has {n} layers (0..{n}, {n} = discard nothing)")
        if past:
            raise ValueError("discard cannot run after a cached prefix (kv_caches); run the whole sequence")
        drop = torch.as_tensor(getattr(positions, "mask", positions), device=device)
        if drop.dtype != torch.bool or drop.shape[-1] != seq or drop.dim() not in (1, 2):
            raise ValueError(f"discard positions must be a bool mask [pos] or [batch, pos] over {seq} positions "
                             f"(or a Selection), got {drop.dtype} {tuple(drop.shape)}")
        if drop.dim() == 2:
            if drop.shape[0] not in (1, batch) or not bool((drop == drop[:1]).all()):
                raise ValueError("discard positions differ between batch rows; physical discarding removes the "
                                 "same positions from every row: run the rows one at a time")
            drop = drop[0]
        if not bool(drop.any()):
            raise ValueError("discard positions select nothing; pass None to discard nothing")
        if int(from_layer) == n:
            return -1, None
        return int(from_layer), ~drop

    @torch.no_grad()
    def greedy_decode(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
        rope_deltas: Tensor | None,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None,
        injections: Mapping[int, Tensor] | Sequence[Tensor | None] | None = None,
        pick: Callable[[Tensor], Tensor] | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """Decoding with a KV cache from merged embeddings, under whatever hooks are active: greedy, or
        `pick(logits)` (fp32 `[batch, vocab]` of each step's last position -> the next ids `[batch]`; a
        sampler). Decoding step n sits at position `n_real_tokens + rope_deltas` on all three rows.
        `injections` (what `encode` returns, e.g. DeepStack's `[batch, pos, d_model]` per layer) are added
        on the prefill only: generated tokens are text, where they add nothing (HF's Qwen3-Omni passes its
        visual features on the first step alone). Rows that have produced an eos id continue with
        `pad_token_id` (default: their eos), as HF's; decoding stops when every row has.
        Returns the new tokens `[batch, n_new]`."""
        eos = decode_args(max_new_tokens, eos_token_id, self.cfg.d_vocab)
        b, s = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = self.text_positions(inputs_embeds, attention_mask)
        if rope_deltas is None:
            rope_deltas = (position_ids.amax(dim=(0, 2)) + 1 - attention_mask.sum(-1)).unsqueeze(1)
        caches = [KVSlot() for _ in self.blocks]
        logits = self.run_language_model(inputs_embeds, position_ids, attention_mask, kv_caches=caches, logits_at="last",
                                         injections=injections)
        out, done = [], torch.zeros(b, dtype=torch.bool, device=inputs_embeds.device)
        for _ in range(max_new_tokens):
            scores = logits[:, -1].float()  # HF reads each step's logits in fp32
            nxt = scores.argmax(-1) if pick is None else pick(scores).to(scores.device)
            if out and eos:
                nxt = torch.where(done, out[-1] if pad_token_id is None else torch.full_like(nxt, pad_token_id), nxt)
            out.append(nxt)
            if eos:
                done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
                if bool(done.all()):
                    break
            pos = (attention_mask.sum(-1, keepdim=True) + rope_deltas).unsqueeze(0).expand(3, -1, -1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
            with decoding(s):  # hooks may ask (decoding_from): this run holds a generated token, no prompt position
                logits = self.run_language_model(self.embed(nxt[:, None]), pos, attention_mask, kv_caches=caches,
                                                 logits_at="last")
        return torch.stack(out, dim=1)


_DECODING: ContextVar[int | None] = ContextVar("hooked_av_decoding", default=None)


@contextmanager
def decoding(prompt_length: int) -> Iterator[None]:
    """Inside, the layer loop's runs are `greedy_decode`'s decoding steps after a prompt of `prompt_length`
    positions (see `decoding_from`)."""
    token = _DECODING.set(int(prompt_length))
    try:
        yield
    finally:
        _DECODING.reset(token)


def decoding_from() -> int | None:
    """While `generate` runs a decoding step (a generated token's forward, after the prompt's cached keys and
    values): the prompt's length in positions (padding included), the first generated position; None for
    any other run (a forward, the prefill, a sweep's cells). For hooks that act on prompt positions:

        from hooked_av.utils import decoding_from
        def zero_prompt_position_20(act, hook):
            if decoding_from() is None:  # the prompt's run (prefill); decoding steps hold generated tokens only
                act[:, 20] = 0
            return act
    """
    return _DECODING.get()


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


def read_positions(logits_at, seq: int, device, keep: Tensor | None = None) -> Tensor | slice | None:
    """Which positions of a run of `seq` positions `run_language_model` reads out (None: all), as an index
    into the final residual; with physical discarding (`keep` bool `[seq]`) into the kept positions, and a
    discarded position is refused."""
    if logits_at is None or (isinstance(logits_at, str) and logits_at == "all"):
        return None
    if isinstance(logits_at, str):
        if logits_at != "last":
            raise ValueError(f"logits_at must be None, 'all', 'last' or positions, got {logits_at!r}")
        if keep is not None and not bool(keep[-1]):
            raise ValueError("logits_at='last': the last position is discarded; discard something else")
        return slice(-1, None)
    t = positions_or_mask(logits_at, seq, "logits_at").to(device)
    if t.dtype == torch.bool:
        if t.shape != (seq,):
            raise ValueError(f"logits_at as a mask must be bool [{seq}], got {tuple(t.shape)}")
        t = t.nonzero()[:, 0]
    t = t.flatten().long()
    if not len(t):
        raise ValueError("logits_at selects no position; pass None for every position")
    if int(t.max()) >= seq or int(t.min()) < -seq:
        raise ValueError(f"logits_at position(s) {t.tolist()} out of range for {seq} positions")
    t = t % seq
    if keep is not None:
        if not bool(keep[t].all()):
            raise ValueError(f"logits_at position(s) {t[~keep[t]].tolist()} are discarded; read kept positions")
        t = (keep.long().cumsum(0) - 1)[t]
    return t


def scatter_injections(positions: Tensor, features: Sequence[Tensor], like: Tensor) -> list[Tensor]:
    """DeepStack's per-layer features as dense injections: `positions` bool `[batch, pos]` (the visual
    positions, HF's `visual_pos_masks`), `features[i]` `[n_positions, d_model]` in the batch-major order of
    `positions` -> one `[batch, pos, d_model]` per layer i, zero elsewhere (adding zero changes nothing)."""
    out = []
    n = int(positions.sum())
    for i, f in enumerate(features):
        if f.shape != (n, like.shape[-1]):
            raise ValueError(f"injection features {i} have shape {tuple(f.shape)}; expected [{n}, {like.shape[-1]}] "
                             "(one row per True of positions)")
        t = torch.zeros_like(like)
        t[positions.to(like.device)] = f.to(like.device, like.dtype)
        out.append(t)
    return out
