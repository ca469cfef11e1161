"""`model(**inputs, logits_at=...)` on every family, from processor-style inputs (towers included) and from
`encode`'s outputs: the positions named are the rows of the full logits (fp32, 1e-6), only those are
unembedded (the unembedding sees `[batch, n_read, d_model]`), and a bad value is refused."""

from __future__ import annotations

import pytest
import torch
from family_cases import NAMES, families

torch.set_num_threads(1)


@pytest.mark.parametrize("family", NAMES)
def test_logits_at_reads_only_what_it_names(family):
    _, model, inputs = next(f for f in families() if f[0] == family)
    seen = []
    with torch.no_grad():
        full = model(**inputs)
        handle = model.unembed.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
        try:
            last = model(**inputs, logits_at="last")
            some = model(**inputs, logits_at=[1, -2])
            enc = model.encode(**inputs)
            from_enc = model(**enc, logits_at="last")
        finally:
            handle.remove()
    b, s, _ = full.shape
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(some, full[:, [1, s - 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(from_enc, full[:, -1:], atol=1e-6, rtol=0)
    assert seen == [(b, 1, model.cfg.d_model), (b, 2, model.cfg.d_model), (b, 1, model.cfg.d_model)]
    with pytest.raises(ValueError, match="logits_at must be"):
        model(**inputs, logits_at="first")


def test_position_arguments_that_would_be_misread_are_refused():
    # an int 0/1 mask was read as the indices 0 and 1, floats were truncated, 2-D ints flattened for every row
    from patching.engine.hooks import ablate

    _, model, inputs = next(families())
    s = inputs["input_ids"].shape[1]
    last = torch.zeros(s, dtype=torch.long)
    last[-1] = 1
    cases = [(last, "look like a mask"), (torch.ones(s, dtype=torch.uint8), "look like a mask"),
             ([1.7], "must be ints or a bool mask"), (torch.tensor([[1], [2]]), "same positions in every row")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**inputs, logits_at=bad)
        with pytest.raises(ValueError, match=message):
            model.attention_rows(inputs, queries=bad)
        with pytest.raises(ValueError, match=message), torch.no_grad():
            model.run_with_hooks(**inputs, fwd_hooks=list(ablate(["blocks.1.hook_resid_post"], positions=bad)))
    with torch.no_grad():  # the same as bool masks and int lists still read
        full = model(**inputs)
        torch.testing.assert_close(model(**inputs, logits_at=last.bool()), full[:, -1:], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(**inputs, logits_at=torch.tensor([s - 1])), full[:, -1:], atol=1e-6, rtol=0)
