"""A mask edit changes only the queries that can see an edited key: a sweep's cell starts at the first
dst query at or after the first src key of its row, whatever the token map's grouping. On every family
(tests/family_cases.py, whose maps hold all text as `question`, as for a checkpoint whose tokenizer is
not a Qwen chat vocabulary), every default edge, as a knockout, a head knockout, a scaling, a steering
and mask discarding: the positions and blocks recomputed equal a count from a naive loop over the
positions, and every cell equals whole forwards (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from family_cases import NAMES, family

from patching.engine.hooks import block_attention, discard, scale_attention, steer
from patching.engine.sweep import first_layer, run_rows, samples
from patching.methods.knockout import default_edges, window_layers

TOL = 1e-5


def naive_first(tm, src, dst) -> int:
    """The first position whose query is in dst and sees a src key (k <= q), by a loop; the map's length
    where there is none."""
    s, d = tm.select(src).mask[0].tolist(), tm.select(dst).mask[0].tolist()
    n = len(d)
    return next((q for q in range(n) if d[q] and any(s[: q + 1])), n)


def cells(model, tm):
    """Every default edge as each kind of mask edit, with the (src, dst) each edits."""
    L = model.cfg.n_layers
    out = []
    for i, (src, dst) in enumerate(default_edges(tm)):
        c = i % L
        out += [(block_attention(tm, src, dst, window_layers(c, 3, L)), src, dst),
                (block_attention(tm, src, dst, [c], heads=[i % model.cfg.n_heads]), src, dst),
                (scale_attention(tm, dst, src, 0.3, [c]), src, dst),
                (steer(tm, dst, src, 0.7, [c]), src, dst)]
    for group in ("audio", "video", "image"):
        if bool(tm.mask(group).any()):
            out.append((discard(tm, group, 1, n_layers=L), group, tm.select("all") - tm.select(group)))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_edge_starts_at_the_first_query_that_sees_its_src(name):
    torch.manual_seed(0)
    model, inputs = family(name)
    L = model.cfg.n_layers
    done = before = 0
    for s in samples(model, inputs):
        groups = set(s.tm.names())
        assert "system" not in groups and "template" in groups and "question" in groups  # all user text is question
        made = cells(model, s.tm)
        ivs = [iv for iv, _, _ in made]
        stats: dict = {}
        fast = run_rows(model, s, ivs, progress=False, stats=stats, batch_size=1)
        full = run_rows(model, s, ivs, progress=False, incremental=False, batch_size=1)
        torch.testing.assert_close(fast, full, atol=TOL, rtol=0)
        n = s.seq_len
        starts = [min(naive_first(s.tm, src, dst), n - 1) for _, src, dst in made]
        assert stats["incremental"]
        assert stats["positions"] == n + sum(n - st for st in starts)
        assert stats["layer_positions"] == n * L + sum((n - st) * (L - first_layer(iv)) for st, iv in zip(starts, ivs))
        old = [int(s.tm.select(dst).mask[0].nonzero()[0, 0]) for _, src, dst in made]  # the first dst query
        done += stats["positions"]
        before += n + sum(n - st for st in old)
    print(name, done, before)
    # edges into `question` no longer start at its first token (the prompt's start, here)
    assert done < before / 2
