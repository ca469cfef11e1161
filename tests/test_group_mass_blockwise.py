"""`group_attention_mass` computed inside each layer's own attention (`Attention.blockwise`: scores once, a
block of query rows at a time against the keys up to the block's last row, the output and the masses from
one pattern): equal (fp32, 1e-6) to the previous read-out (every block's pattern recomputed over every key
beside the layer's SDPA) on every family's batch (left padding included) and under a mask edit; each block
reads exactly the causal triangle's keys (a left-padded block every key, as the exact path spreads a row
that sees nothing); the forward it rides on gives the plain forward's residuals."""

from __future__ import annotations

import pytest
import torch
from family_cases import NAMES, family

from hooked_av.viz import group_attention_mass
from hooked_av.viz.attention_mass import DEFAULT_GROUPS
from patching.engine.hooks import block_attention


def previous_mass(model, inputs, tm, groups, block_rows):
    """`{layer: [batch, heads, G, G]}` as group_attention_mass read it before: the layer runs its SDPA, and a
    reader recomputes each block's pattern over every key (`Attention.pattern_rows`)."""
    present = [g for g in groups if bool(tm.mask(g).any())]
    masks = torch.stack([tm.mask(g) for g in present]).float()
    out = {}

    def reader(layer):
        def read(attn, qh, kh, mask, causal, pattern):
            m = masks.to(qh.device, qh.dtype)
            b, n_q = qh.shape[0], qh.shape[2]
            summed = 0
            for start in range(0, n_q, block_rows):
                rows = torch.arange(start, min(n_q, start + block_rows)).expand(b, -1)
                p = attn.pattern_rows(qh, kh, mask, causal, rows, pattern)
                to_src = torch.einsum("bhqk,gbk->bhqg", p, m)
                summed = summed + torch.einsum("bhqg,fbq->bhfg", to_src, m[:, :, start : start + rows.shape[1]])
            out[layer] = summed / m.sum(-1).T.clamp(min=1)[:, None, :, None]

        return read

    with model.attention_readers({l: reader(l) for l in range(model.cfg.n_layers)}), torch.no_grad():
        model(**inputs, return_type=None)
    return present, out


@pytest.mark.parametrize("name", NAMES)
def test_blockwise_mass_equals_the_previous_read_out_on_every_family(name):
    torch.manual_seed(0)
    model, inputs = family(name)
    tm = model.token_map(inputs)
    edit = block_attention(tm, "question", "last", [1])
    for hooks in ([], list(edit)):
        with model.hooks(fwd_hooks=hooks):
            df = group_attention_mass(model, inputs, tm, per_head=True, block_rows=5)
            present, ref = previous_mass(model, inputs, tm, DEFAULT_GROUPS, 5)
        assert {b.attn.last_path for b in model.blocks} == {"fast"}  # the reference ran the SDPA
        counts = torch.stack([tm.mask(g) for g in present]).sum(-1).T
        for r in df.itertuples():
            i, j = present.index(r.dst), present.index(r.src)
            rows = (counts[:, i] > 0) & (counts[:, j] > 0)
            assert abs(float(ref[r.layer][rows, r.head, i, j].mean()) - r.mass) < 1e-6


def test_each_block_reads_the_causal_triangle_and_the_forward_is_unchanged():
    model, inputs = family("qwen2_5_omni")
    seen: list = []

    class Spy:
        block_rows = 6

        def block(self, start, p):
            seen.append((start, p.shape[2], p.shape[3]))

    tm = model.token_map(inputs)
    n = tm.seq_len
    padded = int(tm.padding[0].sum())  # row 0 is left-padded: its first rows see no key
    with torch.no_grad():
        plain = model(**inputs, return_type="resid")
        with model.attention_readers({0: Spy()}):
            read = model(**inputs, return_type="resid")
    assert model.blocks[0].attn.last_path == "blockwise"
    blocks = list(range(0, n, 6))
    assert seen == [(s, min(6, n - s), n if s < padded else min(s + 6, n)) for s in blocks]
    real = ~tm.padding
    torch.testing.assert_close(read[real], plain[real], atol=1e-5, rtol=0)
