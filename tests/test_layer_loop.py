"""The one layer loop (`run_language_model`): logits only where they are read, physical discarding
against mask-based discarding (an independent path: the same keys masked instead of removed), and
sweep samples that carry the family's injections (DeepStack) through trimming, discarding and rows."""

from __future__ import annotations

import pytest
import torch

from hooked_av.core.language_model import scatter_injections
from hooked_av.core.masks import neg_inf
from hooked_av.inputs.token_map import TokenMapBuilder
from patching.methods.discarding import physical_forward
from patching.engine.hooks import discard
from patching.engine.sweep import forward_rows, samples
from test_recipe_qwen3_text import mm_positions, pair

torch.set_num_threads(1)
TOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    """Our Qwen3-recipe language model, a left-padded batch of 2 with visual positions and two layers
    of DeepStack injections."""
    _, model, _ = pair(4)
    b, s = 2, 12
    torch.manual_seed(5)
    embeds = torch.randn(b, s, model.cfg.d_model)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :3] = 0
    visual = torch.zeros(b, s, dtype=torch.bool)
    visual[0, 4:8] = True
    visual[1, 5:8] = True
    pos = mm_positions(b, s)
    pos = torch.where(mask.bool()[None], pos, torch.ones_like(pos))
    inj = scatter_injections(visual, [torch.randn(int(visual.sum()), model.cfg.d_model) for _ in range(2)], embeds)
    return model, dict(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, injections=inj), visual


def token_map(mask, visual):
    tb = TokenMapBuilder(*mask.shape)
    for r in range(mask.shape[0]):
        real = mask[r].nonzero()[:, 0].tolist()
        for p in real:
            tb.set(r, p, "video" if bool(visual[r, p]) else "question")
        tb.set(r, real[-1], "last")
    return tb.build()


def test_logits_at_reads_the_positions_it_names(setup):
    model, kw, _ = setup
    with torch.no_grad():
        full = model.run_language_model(**kw)
        assert torch.equal(model.run_language_model(**kw, logits_at="all"), full)
        torch.testing.assert_close(model.run_language_model(**kw, logits_at="last"), full[:, -1:], atol=TOL, rtol=0)
        torch.testing.assert_close(model.run_language_model(**kw, logits_at=[2, -3]), full[:, [2, 9]], atol=TOL, rtol=0)
        m = torch.zeros(12, dtype=torch.bool)
        m[[0, 5]] = True
        torch.testing.assert_close(model.run_language_model(**kw, logits_at=m), full[:, [0, 5]], atol=TOL, rtol=0)
        resid = model.run_language_model(**kw, return_type="resid", logits_at="last")
        assert resid.shape == (2, 1, model.cfg.d_model)
    for bad, msg in ((12, "out of range"), ("first", "logits_at must be"), ([], "selects no position"),
                     (torch.ones(5, dtype=torch.bool), r"bool \[12\]")):
        with pytest.raises(ValueError, match=msg):
            model.run_language_model(**kw, logits_at=bad)


@pytest.mark.parametrize("from_layer", [0, 1, 2])
def test_physical_discard_equals_masked_keys(setup, from_layer):
    """Removing positions from layer L on equals masking them as keys from layer L on, at every kept
    position, with left padding and injections on the removed and kept positions alike."""
    model, kw, _ = setup
    drop = torch.zeros(12, dtype=torch.bool)
    drop[[4, 5, 6]] = True

    def cut(mask, hook):
        mask = mask.clone()
        mask[..., drop] = neg_inf(mask.dtype)
        return mask

    hooks = [(f"blocks.{l}.attn.hook_attn_mask", cut) for l in range(from_layer, model.cfg.n_layers)]
    with torch.no_grad():
        with model.hooks(fwd_hooks=hooks):
            ref = model.run_language_model(**kw)[:, ~drop]
        got = model.run_language_model(**kw, discard=(drop, from_layer))
        last = model.run_language_model(**kw, discard=(drop, from_layer), logits_at=[11, 2])
    real = kw["attention_mask"].bool()[:, ~drop]
    torch.testing.assert_close(got[real], ref[real], atol=TOL, rtol=0)
    torch.testing.assert_close(last, got[:, [-1, 2]], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="discarded"):
        model.run_language_model(**kw, discard=(drop, from_layer), logits_at=[5])


def test_discard_refuses_what_it_cannot_do(setup):
    model, kw, _ = setup
    rows = torch.zeros(2, 12, dtype=torch.bool)
    rows[0, 3] = True
    with pytest.raises(ValueError, match="differ between batch rows"):
        model.run_language_model(**kw, discard=(rows, 1))
    with pytest.raises(ValueError, match="select nothing"):
        model.run_language_model(**kw, discard=(torch.zeros(12, dtype=torch.bool), 1))
    with pytest.raises(ValueError, match="0..3"):
        model.run_language_model(**kw, discard=(rows[0], 4))


def test_samples_carry_injections_through_trimming_rows_and_discarding(setup):
    model, kw, visual = setup
    tm = token_map(kw["attention_mask"], visual)
    data = samples(model, kw, tm)
    assert data[1].seq_len == 9 and data[1].injections[0].shape == (1, 9, model.cfg.d_model)
    with torch.no_grad():
        full = model.run_language_model(**kw, logits_at="last")[:, -1]
        plain = model.run_language_model(kw["inputs_embeds"], kw["position_ids"], kw["attention_mask"], logits_at="last")[:, -1]
        for s in data:
            rows = forward_rows(model, s, 2)
            torch.testing.assert_close(rows, full[s.index].expand(2, -1), atol=TOL, rtol=0)
            assert not torch.allclose(rows[0], plain[s.index], atol=1e-3)  # the injections were applied
            phys = physical_forward(model, s, "video", 1)
            with model.hooks(fwd_hooks=discard(s.tm, "video", 1, model.cfg.n_layers)):
                masked = forward_rows(model, s, 1)
            torch.testing.assert_close(phys, masked, atol=TOL, rtol=0)
