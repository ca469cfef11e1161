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


class FactoredViews:
    """`QK` and `OV` as TransformerLens's `FactoredMatrix` over the owner's `W_Q`, `W_K`, `W_V`, `W_O` (a
    block's attention: `[n_heads, d_model, d_model]`; the model: stacked, `[n_layers, n_heads, ...]`)."""

    @property
    def QK(self):
        """`W_Q @ W_K^T` per head (TransformerLens's)."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """`W_V @ W_O` per head (TransformerLens's)."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)


class TransformerLensCompat(FactoredViews):
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

    # per layer, stacked as TransformerLens's HookedTransformer stacks them (a copy of an offloaded block's)
    def _stack(self, read) -> Tensor:
        out = []
        for block in self.blocks:
            t = read(block)
            if t.device.type == "meta" and getattr(self, "hf_device_map", None) is not None:
                with resident(self, block):
                    t = read(block).detach().clone()
            out.append(t)
        return torch.stack([t.to(out[0].device) for t in out])

    def _mlp_stack(self, name: str) -> Tensor:
        sparse = [l for l, b in enumerate(self.blocks) if hasattr(b.mlp, "experts")]
        if sparse:  # not AttributeError: nn.Module would swallow it and report a plain missing attribute
            raise ValueError(
                f"blocks {sparse} are mixtures of experts, so there is no one {name} per layer to stack: read expert e "
                f"of block l as model.blocks[l].mlp.experts[e].{name} (the router: model.blocks[l].mlp.W_router)")
        return self._stack(lambda b: getattr(b.mlp, name))

    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q), doc="`[n_layers, n_heads, d_model, d_head]`")
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K),
                   doc="`[n_layers, n_heads, d_model, d_head]`: each query head's key weights (kv head h // groups)")
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V), doc="`[n_layers, n_heads, d_model, d_head]`")
    _W_K = property(lambda self: self._stack(lambda b: b.attn._W_K), doc="`[n_layers, n_kv_heads, d_model, d_head]`")
    _W_V = property(lambda self: self._stack(lambda b: b.attn._W_V), doc="`[n_layers, n_kv_heads, d_model, d_head]`")
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O), doc="`[n_layers, n_heads, d_head, d_model]`")
    b_Q = property(lambda self: self._stack(lambda b: b.attn.b_Q), doc="`[n_layers, n_heads, d_head]`")
    b_K = property(lambda self: self._stack(lambda b: b.attn.b_K), doc="`[n_layers, n_heads, d_head]`")
    b_V = property(lambda self: self._stack(lambda b: b.attn.b_V), doc="`[n_layers, n_heads, d_head]`")
    _b_K = property(lambda self: self._stack(lambda b: b.attn._b_K), doc="`[n_layers, n_kv_heads, d_head]`")
    _b_V = property(lambda self: self._stack(lambda b: b.attn._b_V), doc="`[n_layers, n_kv_heads, d_head]`")
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O), doc="`[n_layers, d_model]`")
    W_in = property(lambda self: self._mlp_stack("W_in"), doc="`[n_layers, d_model, d_mlp]` (the up projection)")
    W_gate = property(lambda self: self._mlp_stack("W_gate"), doc="`[n_layers, d_model, d_mlp]`")
    W_out = property(lambda self: self._mlp_stack("W_out"), doc="`[n_layers, d_mlp, d_model]`")
    b_in = property(lambda self: self._mlp_stack("b_in"), doc="`[n_layers, d_mlp]` (zeros: no bias)")
    b_out = property(lambda self: self._mlp_stack("b_out"), doc="`[n_layers, d_model]` (zeros: no bias)")


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
        in the forward, as TransformerLens does; costs `n_heads` times the attention-output memory.

            model.set_use_attn_result(True)
        """
        for block in self.blocks:
            block.attn.use_attn_result = bool(use_attn_result)
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the residual stream as its q, k and v input, `blocks.{l}.hook_q_input`
        `[batch, pos, n_heads, d_model]`, `hook_k_input` / `hook_v_input` `[batch, pos, n_kv_heads, d_model]`
        (ln1 and the head's projection read it: path patching into one head's queries or keys), as
        TransformerLens does; off, the forward is the plain one.

            model.set_use_split_qkv_input(True)
        """
        self._set_input_flag("use_split_qkv_input", use_split_qkv_input, "use_attn_in")

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each query head its own copy of the residual stream, `blocks.{l}.hook_attn_in` `[batch, pos,
        n_heads, d_model]`, that its q, k and v read. TransformerLens 3.x refuses this on grouped-query models;
        here a query head's keys and values are computed from its own copy (with its kv head's weights), so
        `hook_k` / `hook_v` carry `n_heads` heads while it is on.

            model.set_use_attn_in(True)
        """
        self._set_input_flag("use_attn_in", use_attn_in, "use_split_qkv_input")

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Compute `blocks.{l}.hook_mlp_in` `[batch, pos, d_model]` (a copy of `resid_mid` that ln2 reads), as
        TransformerLens does.

            model.set_use_hook_mlp_in(True)
        """
        self._set_input_flag("use_hook_mlp_in", use_hook_mlp_in)

    def _set_input_flag(self, flag: str, on: bool, exclusive: str | None = None) -> None:
        if on and exclusive and getattr(self.cfg, exclusive):
            raise ValueError(f"{exclusive} is on: {flag} and {exclusive} give each head its input in two ways; call "
                             f"set_{exclusive}(False) first")
        for block in self.blocks:
            setattr(block, flag, bool(on))
        setattr(self.cfg, flag, bool(on))

    # ---- tokens -----------------------------------------------------------------------------
    def _need_tokenizer(self):
        if getattr(self, "tokenizer", None) is None:
            raise ValueError(
                "no tokenizer is attached: load from a folder that holds one, or set model.tokenizer = ..."
            )
        return self.tokenizer

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> Tensor:
        """Text -> ids `[batch, pos]` (a list: left-padded rows). By default (`prepend_bos` None or True) the
        text-only prompt `model(text)` runs: the family's chat template around the text (Qwen has no BOS; the
        template is what comes first); `prepend_bos=False`: the text's own tokens, as TransformerLens gives them
        without BOS (what one appends to a prompt, e.g. an answer). `padding_side`: "left" only (the prompt
        builders pad on the left). A prompt longer than `cfg.n_ctx` is refused (truncating it would cut its
        template) whatever `truncate` says.

            model.to_tokens("what colour is the shape ?")                      # [1, pos], the chat prompt
            model.to_tokens("red", prepend_bos=False)                          # [1, 1]
        """
        if padding_side not in (None, "left"):
            raise ValueError(f"padding_side {padding_side!r}: prompts are left-padded here; pass 'left' or None")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("to_tokens takes a string or a non-empty list of strings")
        if prepend_bos is False:
            tok = self._need_tokenizer()
            tok_side, tok.padding_side = tok.padding_side, "left"
            try:
                ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"]
            finally:
                tok.padding_side = tok_side
        else:
            ids = self.text_inputs(input)["input_ids"]
        if ids.shape[-1] > self.cfg.n_ctx:
            raise ValueError(f"the prompt is {ids.shape[-1]} tokens; the model's context is {self.cfg.n_ctx}")
        return ids.to(self.device) if move_to_device else ids

    def to_string(self, tokens) -> str | list[str]:
        """Ids -> text: one string for `[pos]` (or an int, a list of ints), a list for `[batch, pos]`
        (TransformerLens's; special tokens kept, spaces not cleaned up).

            model.to_string(model.to_tokens("red", prepend_bos=False)[0])      # "red"
        """
        tok = self._need_tokenizer()
        t = torch.as_tensor(tokens)
        if t.dim() == 2:
            return tok.batch_decode(t.tolist(), clean_up_tokenization_spaces=False)
        if t.dim() > 2:
            raise ValueError(f"to_string takes ids [pos] or [batch, pos], got shape {tuple(t.shape)}")
        return tok.decode(t.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None) -> list:
        """One string per token (TransformerLens's): of a text's tokens (`to_tokens(text, prepend_bos)`), of ids
        `[pos]` or `[1, pos]`; a list of texts or id rows gives one list each.

            model.to_str_tokens("what colour is the shape ?")[-3:]           # the prompt's last three tokens
        """
        tok = self._need_tokenizer()
        if isinstance(input, list) and input and not isinstance(input[0], int):
            return [self.to_str_tokens(x, prepend_bos, padding_side) for x in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
        else:
            ids = torch.as_tensor(input)
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() > 1:
                raise ValueError(f"to_str_tokens takes ids [pos] or [1, pos] (one row), got shape {tuple(ids.shape)}; "
                                 "pass the rows one at a time (or a list of them)")
            ids = ids.reshape(-1)
        return tok.batch_decode([[int(i)] for i in ids.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is one token (its own tokens, no template); more than one is an error.

            model.to_single_token("red")
        """
        ids = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if ids.numel() != 1:
            raise ValueError(f"{string!r} is {ids.numel()} tokens, not one: {self.to_str_tokens(ids)}")
        return int(ids[0])

    def get_token_position(self, single_token: str | int, input, mode: str = "first", prepend_bos: bool | None = None,
                           padding_side: str | None = None) -> int:
        """The position of a token (an id, or a string that is one token) in a text (its prompt, as
        `to_tokens(input, prepend_bos)` makes it) or in ids `[pos]` / `[1, pos]`: its first or last
        occurrence (`mode`); absent is an error (TransformerLens's).

            model.get_token_position("colour", "what colour is the shape ?")
        """
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        ids = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else torch.as_tensor(input)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"ids of shape {tuple(ids.shape)}: pass one row ([pos] or [1, pos])")
            ids = ids[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (ids == token).nonzero()[:, 0]
        if not len(where):
            raise ValueError(f"token {token} ({self.to_str_tokens([token])[0]!r}) does not occur in the input")
        return int(where[0] if mode == "first" else where[-1])

    def answer_tokens(self, answers, inputs: dict | None = None) -> Tensor:
        """Answer words -> the first token of each as the model would write it next, `[n]` long: after the
        last real token of `inputs["input_ids"]` row i (one answer per row, or one for all), else after a
        generation prompt. Ids pass through (checked against the vocabulary). A word reads as its text alone
        where the position before it ends a word (a newline, a space, a special token, or a word-level
        vocabulary where both readings agree); written with a leading space (" Paris", TransformerLens's habit)
        it reads as written; a word after text that does not end a word is ambiguous (a new word, or the
        previous one continued) and refused, as is a word the tokenizer cannot spell.

            model.answer_tokens(["red", "blue"])          # tensor([id of red, id of blue])
        """
        items = answers.flatten().tolist() if isinstance(answers, Tensor) else (
            [answers] if isinstance(answers, (str, int)) else list(answers))
        if not items:
            raise ValueError("no answer given")
        if all(not isinstance(a, str) for a in items):
            ids = torch.as_tensor(items)
            if ids.is_floating_point():
                raise ValueError(f"answer token ids must be integers, got {items}")
            bad = [int(i) for i in ids.flatten() if not 0 <= int(i) < self.cfg.d_vocab]
            if bad:
                raise ValueError(f"answer token id(s) {bad} out of range; the model has {self.cfg.d_vocab} token ids")
            return ids.long().flatten()
        tok = self._need_tokenizer()
        last = None
        if inputs is not None:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            last = [int(r[m.bool()][-1]) if m is not None else int(r[-1]) for r, m in
                    zip(ids, mask if mask is not None else [None] * len(ids))]
            if len(items) not in (1, len(last)):
                raise ValueError(f"{len(items)} answers for {len(last)} prompts: pass one per prompt (or one for all)")
        out = []
        for i, a in enumerate(items):
            if not isinstance(a, str):
                out.append(int(a))
                continue
            before = None if last is None else last[i if len(items) > 1 else 0]
            out.append(answer_token(tok, a, before))
        return torch.tensor(out, dtype=torch.long)

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


def answer_token(tokenizer, word: str, before: int | None) -> int:
    """The first token of `word` written right after token `before` (None: after a generation prompt, whose
    header ends with a newline). See `TransformerLensCompat.answer_tokens`."""
    plain = tokenizer.encode(word, add_special_tokens=False)
    if not word.strip() or not plain:
        raise ValueError(f"the answer {word!r} has no text to score; give the answer's word")
    back = tokenizer.decode(plain, clean_up_tokenization_spaces=False)
    if (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in plain) or back.strip() != word.strip():
        raise ValueError(f"the answer {word!r} has a word the tokenizer does not know (it reads back as {back!r}); give "
                         "an answer in the model's vocabulary, or its token ids")
    if word[0].isspace():  # the caller wrote the space: TransformerLens's habit (" Paris")
        return plain[0]
    spaced = tokenizer.encode(" " + word, add_special_tokens=False)
    if spaced and spaced[0] == plain[0]:  # a word-level vocabulary: both readings agree
        return plain[0]
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    text = "\n" if before is None else tokenizer.decode([before])
    if before in specials or not text or text[-1].isspace():  # a new line, a space or a template token ends a word
        return plain[0]
    raise ValueError(
        f"the answer {word!r} after {text!r} is ambiguous: the model may write it as a new word ({spaced[:1]}, with its "
        f"space) or continue {text!r} ({plain[:1]}); write the space (' {word}') or pass token ids")
