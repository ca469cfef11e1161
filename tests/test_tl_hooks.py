"""TransformerLens's own hook tests, ported to the toy model (TransformerLens `tests/integration/test_hooks.py` at
commit 4cd36aae, current main, checked against the installed 3.9).

Their model (`solu-1l` from the hub) is replaced by the shipped toy and their prompt ("Hello World!") by a toy
question as a string (the toy's text-only prompt); every test keeps its claim. Adapted: the cached shapes
name the prompt's length (theirs: 4 tokens); the prepending test zeroes the last block's `hook_resid_post` (theirs
has one block) and feeds text token ids 12..16 (theirs 0..4; the toy's ids below 12 are chat and media
tokens), and reads the unembedding bias as `model.b_U` (zeros: the toy's unembedding has none). Each test
leaves no hook and no gradient on the shared model.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

torch.set_num_threads(1)
PROMPT = "what colour is the shape ?"
embed = lambda name: name == "hook_embed"  # noqa: E731


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


@pytest.fixture
def model(toy_model):
    yield toy_model
    toy_model.remove_all_hook_fns(including_permanent=True)
    toy_model.zero_grad(set_to_none=True)


def fwd(model, name="hook_embed"):
    return model.hook_dict[name].fwd_hooks


def test_hook_attaches_normally(model):
    c = Counter()
    model.run_with_hooks(PROMPT, fwd_hooks=[(embed, c.inc)])
    assert all(len(hp.fwd_hooks) == 0 for _, hp in model.hook_dict.items()) and c.count == 1


def test_perma_hook_attaches_normally(model):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(fwd(model)) == 1
    model.run_with_hooks(PROMPT, fwd_hooks=[])
    assert len(fwd(model)) == 1 and c.count == 1


def test_hook_context_manager(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(fwd(model)) == 1
        model.forward(PROMPT)
    assert len(fwd(model)) == 0 and c.count == 1


def test_nested_hook_context_manager(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(fwd(model)) == 1
        model.forward(PROMPT)
        assert c.count == 1
        with model.hooks(fwd_hooks=[(embed, c.inc)]):
            assert len(fwd(model)) == 2
            model.forward(PROMPT)
            assert c.count == 3  # 2 from the outer, 1 from the inner
        assert len(fwd(model)) == 1
    assert len(fwd(model)) == 0 and c.count == 3


def test_context_manager_run_with_cache(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(fwd(model)) == 1
        model.run_with_cache(PROMPT)
        assert len(fwd(model)) == 1
    assert len(fwd(model)) == 0 and c.count == 1


def test_backward_hook_runs_successfully(model):
    c = Counter()

    def skip_grad(output_grad: torch.Tensor, hook: Any):
        c.inc()
        return (output_grad,)

    with model.hooks(bwd_hooks=[(embed, skip_grad)]):
        assert len(model.hook_dict["hook_embed"].bwd_hooks) == 1
        out = model(PROMPT)
        assert c.count == 0
        out.sum().backward()  # this runs the hook
        assert len(model.hook_dict["hook_embed"].bwd_hooks) == 1
    assert len(model.hook_dict["hook_embed"].bwd_hooks) == 0 and c.count == 1


def test_backward_hook_returning_bare_tensor(model):
    c = Counter()

    def modify_grad(grad: torch.Tensor, hook: Any):
        c.inc()
        return grad  # a bare tensor, not (grad,)

    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", modify_grad)]):
        model(PROMPT).sum().backward()
    assert c.count == 1


def test_backward_hook_returning_none(model):
    c = Counter()

    def observe_grad(grad: torch.Tensor, hook: Any):
        c.inc()

    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", observe_grad)]):
        model(PROMPT).sum().backward()
    assert c.count == 1


def test_hook_context_manager_with_permanent_hook(model):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(fwd(model)) == 1
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(fwd(model)) == 2
        model.forward(PROMPT)
    assert len(fwd(model)) == 1 and c.count == 2  # 1 from the permanent hook, 1 from the context


def test_nested_context_manager_with_failure(model):
    def fail_hook(z, hook):
        raise ValueError("fail")

    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        with pytest.raises(ValueError):
            with model.hooks(fwd_hooks=[(embed, fail_hook)]):
                assert len(fwd(model)) == 2
                model.forward(PROMPT)
        assert len(fwd(model)) == 1 and c.count == 1
    assert len(fwd(model)) == 0


def test_reset_hooks_in_context_manager(model):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert len(fwd(model)) == 1
        model.reset_hooks()
        assert len(fwd(model)) == 0
    assert len(fwd(model)) == 0


def test_remove_hook(model):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert len(fwd(model)) == 1
    model.remove_all_hook_fns()
    assert len(fwd(model)) == 1  # a permanent hook stays without the flag
    model.remove_all_hook_fns(including_permanent=True)
    assert len(fwd(model)) == 0
    model.run_with_hooks(PROMPT, fwd_hooks=[])
    assert c.count == 0


def test_conditional_hooks(model):
    """A hook can be added to a conditional point only while its flag is on; the points cache TransformerLens's shapes."""

    def identity_hook(z, hook):
        return z

    for name, flag in [("blocks.0.attn.hook_result", model.set_use_attn_result),
                       ("blocks.0.hook_q_input", model.set_use_split_qkv_input),
                       ("blocks.0.hook_mlp_in", model.set_use_hook_mlp_in),
                       ("blocks.0.hook_attn_in", model.set_use_attn_in)]:
        model.reset_hooks()
        flag(False)
        with pytest.raises(AssertionError):
            model.add_hook(name, identity_hook)
        flag(True)
        model.add_hook(name, identity_hook)
        flag(False)
    model.reset_hooks()
    pos = model.to_tokens(PROMPT).shape[1]  # TransformerLens: 4 ("Hello World!" with BOS)
    shapes = {3: (1, pos, model.cfg.d_model), 4: (1, pos, model.cfg.n_heads, model.cfg.d_model)}
    for name, flag, dims in [("blocks.0.hook_q_input", model.set_use_split_qkv_input, 4),
                             ("blocks.0.hook_attn_in", model.set_use_attn_in, 4),
                             ("blocks.0.hook_mlp_in", model.set_use_hook_mlp_in, 3)]:
        model.reset_hooks()
        flag(True)
        cache = model.run_with_cache(PROMPT, names_filter=lambda x: x == name)[1]
        assert list(cache.keys()) == [name] and cache[name].shape == shapes[dims]
        flag(False)


@pytest.mark.parametrize("zero_attach_pos,prepend", [(z, p) for z in range(2) for p in (True, False)])
def test_prepending_hooks(model, zero_attach_pos, prepend):
    """Two hooks on the last residual: one zeroes it (the logits are then the unembedding bias), one replaces it
    with noise; the logits are the bias exactly when the zeroing hook runs last (attached last XOR prepended)."""

    def set_to_zero(z, hook):
        z[:] = 0.0
        return z

    def set_to_randn(z, hook):
        return torch.randn_like(z) * 0.1

    model.reset_hooks()
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"  # TransformerLens: blocks.0 of a 1-layer model
    for i in range(2):
        model.add_hook(last, set_to_zero if i == zero_attach_pos else set_to_randn, prepend=prepend)
    with torch.no_grad():
        logits = model(torch.arange(12, 17)[None, :])
    assert torch.allclose(logits, model.b_U[None, :]) == ((zero_attach_pos == 1) != prepend)
