"""One hooked attention for every model: grouped-query, optional rotary, additive mask.

Fast by default, exact when looked at: a call runs `scaled_dot_product_attention` unless
`hook_attn_scores` or `hook_pattern` of this layer has a hook (forward or backward), in which
case the scores and pattern are materialised for this layer only. Both paths apply the additive
mask after `hook_attn_mask`, so every edit of who attends to whom acts before the softmax. A hooked
`hook_attn_mask` always runs: where the caller passes no mask (nothing padded), it sees the mask of
"nothing masked" (causal, or all zeros).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_av.core.masks import additive, neg_inf, open_mask
from hooked_av.core.tl_compat import FactoredViews

Rotary = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class Attention(FactoredViews, nn.Module):
    """Multi-head attention with `n_kv_heads <= n_heads` (grouped-query).

    Hook shapes (TransformerLens convention):
      hook_q, hook_rot_q, hook_z      [batch, pos, n_heads, d_head]
      hook_k, hook_v, hook_rot_k      [batch, pos, n_kv_heads, d_head]  (k and v carry the kv heads)
      hook_attn_mask                  [batch, 1 or n_heads, q_pos, k_pos], additive (0 or a large negative)
      hook_attn_scores, hook_pattern  [batch, n_heads, q_pos, k_pos]
      hook_result                     [batch, pos, n_heads, d_model], only when `use_attn_result` is set
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        d_head: int | None = None,
        q_bias: bool = True,
        k_bias: bool = True,
        v_bias: bool = True,
        o_bias: bool = False,
        names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        qk_norm: tuple[nn.Module, nn.Module] | None = None,
    ):
        """`qk_norm`: norms over d_head applied to q and k after `hook_q` / `hook_k`, before the rotary
        (Qwen3's QK-norm; their own hooks are `q_norm.hook_normalized`, `k_norm.hook_normalized`)."""
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.d_head = d_head or d_model // n_heads
        self.scale = self.d_head**-0.5
        self._names = names
        q, k, v, o = names
        setattr(self, q, nn.Linear(d_model, n_heads * self.d_head, bias=q_bias))
        setattr(self, k, nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=k_bias))
        setattr(self, v, nn.Linear(d_model, self.n_kv_heads * self.d_head, bias=v_bias))
        setattr(self, o, nn.Linear(n_heads * self.d_head, d_model, bias=o_bias))
        if qk_norm is not None:
            self.q_norm, self.k_norm = qk_norm
        self.use_attn_result = False
        # set by read-outs (`attention_rows`, `group_attention_mass`): called once per forward with the
        # (query-head) q, k, final mask, causal flag and, on the exact path, the final pattern
        self.reader: Callable | None = None
        self.last_path: str | None = None  # "fast" or "exact": which path the last call took

        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_mask = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()

    @property
    def out_proj_module(self) -> nn.Linear:
        return getattr(self, self._names[3])

    # TransformerLens weight views (TransformerLens 4's grouped-query attention): W_Q [n_heads, d_model, d_head];
    # _W_K, _W_V [n_kv_heads, d_model, d_head] as stored, W_K, W_V their repeated view [n_heads, d_model, d_head]
    # (query head h reads kv head h // groups); W_O [n_heads, d_head, d_model]; biases likewise, zeros where the
    # projection has none.
    def _proj(self, i: int) -> nn.Linear:
        return getattr(self, self._names[i])

    def _w_in(self, i: int, n: int) -> Tensor:
        return self._proj(i).weight.view(n, self.d_head, -1).transpose(1, 2)

    def _b(self, i: int, shape: tuple[int, ...]) -> Tensor:
        lin = self._proj(i)
        if lin.bias is not None:
            return lin.bias.view(shape)
        return torch.zeros(shape, dtype=lin.weight.dtype, device=lin.weight.device)

    def _repeat(self, t: Tensor) -> Tensor:
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    @property
    def W_Q(self) -> Tensor:
        return self._w_in(0, self.n_heads)

    @property
    def _W_K(self) -> Tensor:
        return self._w_in(1, self.n_kv_heads)

    @property
    def _W_V(self) -> Tensor:
        return self._w_in(2, self.n_kv_heads)

    @property
    def W_K(self) -> Tensor:
        return self._repeat(self._W_K)

    @property
    def W_V(self) -> Tensor:
        return self._repeat(self._W_V)

    @property
    def W_O(self) -> Tensor:
        return self._proj(3).weight.view(-1, self.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_Q(self) -> Tensor:
        return self._b(0, (self.n_heads, self.d_head))

    @property
    def _b_K(self) -> Tensor:
        return self._b(1, (self.n_kv_heads, self.d_head))

    @property
    def _b_V(self) -> Tensor:
        return self._b(2, (self.n_kv_heads, self.d_head))

    @property
    def b_K(self) -> Tensor:
        return self._repeat(self._b_K)

    @property
    def b_V(self) -> Tensor:
        return self._repeat(self._b_V)

    @property
    def b_O(self) -> Tensor:
        return self._b(3, (self._proj(3).weight.shape[0],))

    def needs_exact(self) -> bool:
        return self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, p, _ = x.shape
        q_lin, k_lin, v_lin, _ = (getattr(self, n) for n in self._names)
        q = q_lin(x).view(b, p, self.n_heads, self.d_head)
        k = k_lin(x).view(b, p, self.n_kv_heads, self.d_head)
        v = v_lin(x).view(b, p, self.n_kv_heads, self.d_head)
        return q, k, v

    def from_inputs(self, q_in: Tensor, k_in: Tensor, v_in: Tensor, mask: Tensor | None = None,
                    rotary: Rotary | None = None, causal: bool = False, kv_cache: "KVSlot | None" = None) -> Tensor:
        """`forward` from per-head inputs `[batch, pos, heads, d_model]` (TransformerLens's split inputs): head
        h's projection reads its own input; k and v inputs with `n_kv_heads` heads give the kv heads, with
        `n_heads` heads (one per query head) keys and values per query head."""
        def proj(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
            return torch.einsum("bphd,hde->bphe", t, w) + b

        q = proj(q_in, self.W_Q, self.b_Q)
        grouped = k_in.shape[2] == self.n_kv_heads
        k = proj(k_in, self._W_K if grouped else self.W_K, self._b_K if grouped else self.b_K)
        v = proj(v_in, self._W_V if grouped else self.W_V, self._b_V if grouped else self.b_V)
        return self.output(self.attend(q, k, v, mask=mask, rotary=rotary, causal=causal, kv_cache=kv_cache))

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Tensor | None = None,
        rotary: Rotary | None = None,
        causal: bool = False,
        kv_cache: "KVSlot | None" = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`mask` is additive `[batch, 1|heads, q, k]` or None. `causal=True` means `mask` is a plain
        causal mask (no padding, no edits), which the fast path may replace by the causal kernel."""
        return self.output(self.attend(*self.project_qkv(x), mask=mask, rotary=rotary, causal=causal, kv_cache=kv_cache))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, rotary: Rotary | None = None,
               causal: bool = False, kv_cache: "KVSlot | None" = None) -> Tensor:
        """From projected q `[batch, pos, heads, d_head]`, k and v `[batch, pos, kv_heads, d_head]` to
        `hook_z` `[batch, pos, heads, d_head]`: norms, rotary, the cache, the mask, the pattern (every hook
        between the projections and the output)."""
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotary(q, k)
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        prefix = None  # keys and values every row shares (a sweep's clean prefix), read without copies
        if kv_cache is not None:
            prefix = kv_cache.shared_prefix() if self.reader is None and not self.needs_exact() else None
            if prefix is None:
                k, v = kv_cache.update(k, v)
        k_len = k.shape[1] + (0 if prefix is None else prefix[0].shape[1])

        if self.hook_attn_mask.has_hooks():
            # a hooked mask point always runs, on a real mask where the caller needs none (nothing
            # padded); else on a clone, so that an in-place edit does not leak into the other layers
            b, q_len = q.shape[0], q.shape[1]
            mask = self.hook_attn_mask(open_mask(b, q_len, k_len, causal, q.dtype, q.device) if mask is None else mask.clone())
            causal = False
        elif mask is not None:
            mask = self.hook_attn_mask(mask)

        qh = q.transpose(1, 2)  # [b, h, q, d]
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)
        if prefix is not None:
            self.last_path = "fast"
            return self.hook_z(self.after_prefix(qh, kh, vh, prefix, mask).transpose(1, 2))
        if self.reader is not None and not self.needs_exact():
            if getattr(self.reader, "block_rows", None):  # a read-out computed with the output, blockwise
                self.last_path = "blockwise"
                return self.hook_z(self.blockwise(qh, kh, vh, mask, causal, self.reader).transpose(1, 2))
            self.reader(self, qh, kh, mask, causal, None)
        if self.needs_exact():
            self.last_path = "exact"
            groups = self.n_heads // kh.shape[1]  # kv heads (n_heads where keys are per query head)
            kh = kh.repeat_interleave(groups, dim=1)
            vh = vh.repeat_interleave(groups, dim=1)
            scores = torch.matmul(qh, kh.transpose(2, 3)) * self.scale
            if mask is not None:
                scores = scores + mask
            scores = self.hook_attn_scores(scores)
            pattern = F.softmax(scores, dim=-1, dtype=softmax_dtype(scores.dtype)).to(q.dtype)
            pattern = self.hook_pattern(pattern)
            if self.reader is not None:  # rows of the pattern as edited, the one that multiplies the values
                self.reader(self, qh, kh, mask, causal, pattern)
            z = torch.matmul(pattern, vh)
        else:
            self.last_path = "fast"
            use_causal = causal and qh.shape[2] == kh.shape[2]
            z = F.scaled_dot_product_attention(
                qh,
                kh,
                vh,
                attn_mask=None if use_causal else mask,
                is_causal=use_causal,
                scale=self.scale,
                enable_gqa=kh.shape[1] != self.n_heads,
            )
        return self.hook_z(z.transpose(1, 2))  # [b, pos, heads, d_head]

    def blockwise(self, qh: Tensor, kh: Tensor, vh: Tensor, mask: Tensor | None, causal: bool, reader) -> Tensor:
        """The attention output `[batch, heads, q, d]` computed `reader.block_rows` query rows at a time as the
        exact path computes it (scores in the model dtype, plus the mask, softmax in `softmax_dtype`, times
        the values), each block against the keys up to the last one any of its rows may see (the causal
        triangle, not the square: the keys after it are masked, so their weights are exactly 0), handing
        each block's pattern `[batch, heads, rows, keys]` to `reader.block(start, pattern)` before its values
        are read: a read-out of the whole pattern (`hooked_av.viz.group_attention_mass`) for the price of
        the layer's own attention, no `[q, k]` matrix held. qh `[b, heads, q, d]`, kh, vh `[b, kv_heads, k, d]`
        (the queries are the last q of the k positions), mask `[b, 1|heads, q, k]` additive or None."""
        b, h, n_q, d = qh.shape
        n_k, kv, step = kh.shape[2], self.n_kv_heads, int(reader.block_rows)
        g = h // kv
        z = qh.new_empty(b, h, n_q, d)
        for start in range(0, n_q, step):
            end = min(n_q, start + step)
            r = end - start
            if mask is not None:  # the last key any row of the block may see (an edit may open later keys)
                allowed = mask[:, :, start:end] > neg_inf(mask.dtype) / 2
                seen = allowed.flatten(0, 2).any(0).nonzero()
                # a row that sees no key (left padding) spreads its weight over every key, as the exact path does
                cut = int(seen[-1, 0]) + 1 if len(seen) and bool(allowed.any(-1).all()) else n_k
            else:
                cut = end + n_k - n_q if causal else n_k
            q = qh[:, :, start:end].reshape(b, kv, g * r, d)  # query head j reads kv head j // groups
            # in place: the same values as `scores * scale + mask`, in fewer passes over the block's scores
            scores = torch.matmul(q, kh[:, :, :cut].transpose(2, 3)).view(b, h, r, cut).mul_(self.scale)
            if mask is not None:
                scores.add_(mask[:, :, start:end, :cut])
            elif causal:  # every row sees the keys before the block's own r x r triangle: only that is masked
                diag = cut - r
                allowed = torch.arange(diag, cut, device=qh.device) <= torch.arange(start, end, device=qh.device)[:, None] + n_k - n_q
                scores[..., diag:].add_(additive(allowed, scores.dtype))
            pattern = F.softmax(scores, dim=-1, dtype=softmax_dtype(scores.dtype)).to(qh.dtype)
            reader.block(start, pattern)
            z[:, :, start:end] = torch.matmul(pattern.view(b, kv, g * r, cut), vh[:, :, :cut]).view(b, h, r, d)
        return z

    def after_prefix(self, qh: Tensor, kh: Tensor, vh: Tensor, prefix: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """Attention of every row's queries qh `[rows, heads, q, d]` over keys and values that every row shares
        (`prefix`: `[1, p, kv_heads, d]` each, a sweep's clean prefix) followed by the rows' own kh, vh
        `[rows, kv_heads, q, d]`, under `mask` `[rows, 1|heads, q, p + q]` (None: every key; causal
        among the row's own keys), `[rows, heads, q, d]`, in one attention call that reads the prefix once
        for every row: the rows' queries as one sequence over the prefix and every row's own keys, each
        row's queries masked off the other rows' keys (rows x q keys per query computed in vain: the
        caller folds rows this way where that is small beside the prefix, `KVSlot.of(fold=True)`)."""
        r, h, m, d = qh.shape
        kp, vp = (t[:1].transpose(1, 2) for t in prefix)  # [1, kv, p, d]
        p, dtype = kp.shape[2], qh.dtype
        if mask is None:  # one query per row after the prefix: it sees every key
            mask = torch.zeros(r, 1, m, p + m, dtype=dtype, device=qh.device)
        mh = mask.shape[1]
        k = torch.cat([kp, kh.transpose(0, 1).reshape(1, -1, r * m, d)], dim=2)  # [1, kv, p + r * m, d]
        v = torch.cat([vp, vh.transpose(0, 1).reshape(1, -1, r * m, d)], dim=2)
        full = torch.full((1, mh, r * m, p + r * m), neg_inf(dtype), dtype=dtype, device=qh.device)
        full[0, :, :, :p] = mask[..., :p].transpose(0, 1).reshape(mh, r * m, p)
        own = full[0, :, :, p:].view(mh, r, m, r, m).diagonal(dim1=1, dim2=3)  # [mh, m, m, r]: row i's own block
        own.copy_(mask[..., p:].permute(1, 2, 3, 0))
        z = F.scaled_dot_product_attention(qh.transpose(0, 1).reshape(1, h, r * m, d), k, v, attn_mask=full,
                                           scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return z.view(h, r, m, d).transpose(0, 1)

    def output(self, z: Tensor) -> Tensor:
        """`hook_z` `[batch, pos, heads, d_head]` -> the attention output `[batch, pos, d_model]`
        (through `hook_result` per head when `use_attn_result` is on)."""
        o = self.out_proj_module
        if self.use_attn_result:
            w = o.weight.view(o.weight.shape[0], self.n_heads, self.d_head)  # [d_model, h, d]
            result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w))
            out = result.sum(2)
            return out + o.bias if o.bias is not None else out
        return o(z.reshape(z.shape[0], z.shape[1], -1))


    def pattern_rows(self, qh: Tensor, kh: Tensor, mask: Tensor | None, causal: bool, rows: Tensor,
                     pattern: Tensor | None = None) -> Tensor:
        """The attention pattern of query rows `rows` (long `[batch, r]`, indices into the queries) over every
        key, `[batch, heads, r, keys]`: the rows of `pattern` where the exact path made one, else computed
        as the exact path computes the full pattern (scores in the model dtype, softmax in `softmax_dtype`) without any
        `[queries, keys]` matrix: the mask's rows are gathered, or the causal rows built directly.
        qh `[b, heads, q, d]`, kh `[b, kv_heads, k, d]` (the arguments a `reader` receives)."""
        if pattern is not None:
            return pattern.gather(2, rows[:, None, :, None].expand(*pattern.shape[:2], rows.shape[1], pattern.shape[-1]))
        b, h, _, d = qh.shape
        n_q, n_k, r = qh.shape[2], kh.shape[2], rows.shape[1]
        q = qh.gather(2, rows[:, None, :, None].expand(b, h, r, d))
        # query head j reads kv head j // groups: fold each kv head's query heads into the rows, so the keys
        # are never repeated (`[batch, kv_heads, groups * r, keys]`, then unfolded)
        kv = kh.shape[1]
        scores = torch.matmul(q.reshape(b, kv, (h // kv) * r, d), kh.transpose(2, 3)).view(b, h, r, n_k) * self.scale
        if mask is not None:
            scores = scores + mask.gather(2, rows[:, None, :, None].expand(b, mask.shape[1], r, n_k))
        elif causal:  # queries are the last n_q of n_k positions
            allowed = torch.arange(n_k, device=qh.device)[None, None, :] <= (rows + n_k - n_q)[:, :, None]
            scores = scores + additive(allowed, scores.dtype)[:, None]
        return F.softmax(scores, dim=-1, dtype=softmax_dtype(scores.dtype)).to(qh.dtype)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The exact path's softmax dtype: fp32 for fp32 and below (HF's eager attention), the model's own for
    fp64, where fp64's mask value (`finfo(float64).min`) would become -inf in fp32 and a padding row of
    -inf a NaN that spreads through the padding's values to every row."""
    return dtype if dtype == torch.float64 else torch.float32


class KVSlot:
    """The growing keys and values of one layer (`[batch, pos, kv_heads, d]`, rotated keys) during
    generation, or a cached prefix that a sweep's cells continue from."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.grow = True
        self.fold = False

    @classmethod
    def of(cls, k: Tensor, v: Tensor, grow: bool = True, fold: bool = False) -> "KVSlot":
        """A slot already holding keys and values (a cached prefix); `grow=False`: a run reads the prefix
        followed by its own keys and values, and the slot keeps the prefix alone; `fold` (with `grow=False`
        and a prefix the same in every row): the rows' queries are folded into one attention call over the
        prefix (`Attention.after_prefix`) instead of each row reading its own copy of it."""
        slot = cls()
        slot.k, slot.v, slot.grow, slot.fold = k, v, grow, fold
        return slot

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k = k if self.k is None else torch.cat([self.k, k], dim=1)
        v = v if self.v is None else torch.cat([self.v, v], dim=1)
        if self.grow:
            self.k, self.v = k, v
        return k, v

    def shared_prefix(self) -> tuple[Tensor, Tensor] | None:
        """`(k, v)` `[1, p, kv_heads, d]` where the slot folds its rows over a prefix that every row shares and
        keeps (`fold`, `grow=False`, the same keys in every row, as `prefix_kv_caches` expands them), else None."""
        if self.grow or not self.fold or self.k is None or not self.k.shape[1] or not (self.k.shape[0] == 1 or (self.k.stride(0) == 0 and self.v.stride(0) == 0)):
            return None
        return self.k[:1], self.v[:1]

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

