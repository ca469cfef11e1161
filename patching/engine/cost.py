"""What a run of the language model costs, counted from the config alone: FLOPs and the peak bytes of its
tensors. The sweep engine plans its chunks with these counts and reports its work in them, and a study's
plan (`hooked-av study --plan`) says what a study will cost before any weight loads.

FLOPs are 2 x multiply-adds of the projections, attention (QK^T and PV over the keys each query reads)
and MLP (a sparse layer: the router and its top-k experts), and of the unembedding of the rows read;
norms, rotary and softmax (O(tokens x width)) are left out. A causal forward's query i reads keys 0..i;
a run whose mask is materialised (a hooked mask, the exact path) reads every key of the run (the additive
mask rules out the causal kernel), and a sweep's suffix after cached keys every key too, or, where its rows
fold over the shared prefix (`folds`), the prefix and every row's own keys.

    forward_flops(model.cfg, 4096)                 # one causal forward of 4,096 tokens
    run_bytes(model.cfg, rows=8, queries=25, keys=4096)  # the tensors of a sweep chunk's widest block
"""

from __future__ import annotations


def _mlp_macs(cfg, layer: int) -> float:
    """Multiply-adds of one token through block `layer`'s MLP (a sparse layer: router + top-k experts)."""
    moe = cfg.recipe.moe
    if moe is not None and layer in moe.layers:
        return cfg.d_model * moe.n_experts + moe.top_k * 3 * cfg.d_model * moe.d_expert
    return (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp


def block_flops(cfg, layer: int, queries: float, keys_read: float) -> float:
    """FLOPs of block `layer` for `queries` positions (summed over rows) that read `keys_read` keys in all
    (summed over those positions)."""
    dq, dkv = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    dense = queries * (cfg.d_model * (dq + 2 * dkv) + dq * cfg.d_model + _mlp_macs(cfg, layer))
    return 2 * (dense + 2 * dq * keys_read)


def folds(rows: int, queries: int, prefix: int) -> bool:
    """Whether a sweep runs `rows` rows of `queries` positions after a shared `prefix` of cached keys as one
    attention call over the prefix and every row's own keys (`Attention.after_prefix`): where the keys it
    reads in vain, `rows x queries` per query, are at most half the prefix."""
    return prefix > 0 and rows * queries <= prefix // 2


def keys_read(seq: int, start: int, how: str = "causal", rows: int = 1) -> float:
    """Keys read, summed over the queries `start..seq-1` of each of `rows` rows of a `seq`-position prompt:
    `"causal"`, each query the keys up to itself (the floor, and what the causal kernel of a whole forward
    reads); `"all"`, every key of the run (a materialised mask); `"suffix"`, a suffix after a cached prefix
    as the sweep runs it: every key, or where the rows fold (`folds`), the prefix and every row's own keys."""
    if how not in ("causal", "all", "suffix"):
        raise ValueError(f"how must be 'causal', 'all' or 'suffix', got {how!r}")
    m = seq - start
    if how == "causal":
        return rows * (m * seq - m * (m - 1) / 2)
    if how == "suffix" and folds(rows, m, start):
        return rows * m * (start + rows * m)
    return rows * m * seq


def run_flops(cfg, seq: int, start: int = 0, layer: int = 0, rows: int = 1, how: str = "causal",
              read: int = 1) -> float:
    """FLOPs of `rows` copies of a `seq`-position prompt recomputing positions `start..` in blocks `layer..`
    (queries reading keys as `keys_read(how)` says) and unembedding `read` positions per row."""
    q, k = rows * (seq - start), keys_read(seq, start, how, rows)
    return sum(block_flops(cfg, l, q, k) for l in range(layer, cfg.n_layers)) + unembed_flops(cfg, rows * read)


def unembed_flops(cfg, positions: int) -> float:
    """FLOPs of unembedding `positions` final residuals."""
    return positions * 2 * cfg.d_model * cfg.d_vocab


def forward_flops(cfg, seq: int) -> float:
    """One causal forward of `seq` positions reading the last position's logits."""
    return run_flops(cfg, seq)


def run_bytes(cfg, rows: int, queries: int, keys: int, dtype_bytes: int = 4, mask: bool = True,
              exact: bool = False, fold: bool = False) -> int:
    """Peak bytes of the tensors a run of `rows` rows x `queries` positions against `keys` keys holds in its
    widest block, besides the weights and what the caller keeps: the residual stream and its norm, q / k / v
    (rotated copies too), the keys and values of every key, the MLP's hidden units, the additive mask
    (`mask`: materialised, its hooked copy and an edit's bool edge), the scores and pattern where the layer
    runs on the exact path (`exact`), and the last position's logits (fp32). `fold`: the rows read one copy
    of the keys before their queries and one mask over every row's keys (`folds`). An estimate within a small
    factor above what is measured (tests/test_sweep_cost.py): the budget a sweep packs its chunks against
    and a study plans with."""
    d, dq, dkv = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    moe = cfg.recipe.moe
    hidden = cfg.d_mlp if moe is None else max(cfg.d_mlp if len(moe.layers) < cfg.n_layers else 0,
                                              moe.top_k * moe.d_expert + moe.n_experts)
    tokens = rows * queries
    per_token = 4 * d + 2 * (dq + 2 * dkv) + 3 * hidden  # residual in / out, norm, attention out; q k v twice; MLP
    square = tokens * keys
    if fold:
        attn = (keys - queries + tokens) * 2 * dkv  # the prefix once, every row's own keys
        square += tokens * (keys - queries + tokens)  # the folded mask over every row's keys
    else:
        attn = rows * keys * 2 * dkv  # the keys and values every row reads
    masks = square * (2 + 1 / dtype_bytes) if mask else 0  # the mask, its hooked copy, an edit's bool edge
    scores = tokens * keys * cfg.n_heads * 3 if exact else 0  # scores, fp32 softmax, pattern
    logits = rows * cfg.d_vocab * 4 / dtype_bytes
    return int(dtype_bytes * (tokens * per_token + attn + masks + scores + logits))
