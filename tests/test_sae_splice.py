"""SAEs spliced into our models as SAELens's `HookedSAETransformer.add_sae` splices them, checked against
SAELens's own code path (`_SAEWrapper`, what `add_sae` puts at a hook, and `SAE.encode`) on the same
activations: with the error term kept the spliced forward is the plain one (fp32, 1e-5) on every family;
the points are SAELens's names and hold SAELens's values, edits included; SAEs saved by SAELens (every
architecture its `load_from_disk` reads) load and splice; splicing is refused before anything changes
where it cannot apply, and leaves nothing behind (hooks, names, the plain hook point) when it ends."""

from __future__ import annotations

import copy

import pytest
import torch
from family_cases import NAMES, family
from sae_helpers import random_sae
from sae_lens import SAE
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper

from hooked_av.sae import SAE_POINTS, SAESplice, load_sae
from hooked_av.utils import position_major

torch.set_num_threads(1)
TOL = 1e-5
HOOK = "blocks.1.hook_resid_post"


def _saelens(sae, x, edit=None, use_error_term=True, at="hook_sae_acts_post"):
    """SAELens's spliced module on activations `x` (what HookedSAETransformer.add_sae puts at a hook), with
    `edit` at its point `at`: its output and its features."""
    wrapper = _SAEWrapper(sae, use_error_term=use_error_term)
    seen = {}
    if edit is not None:
        getattr(wrapper, at).add_hook(lambda t, hook: edit(t))
    wrapper.hook_sae_acts_post.add_hook(lambda t, hook: seen.setdefault("f", t.clone()))
    try:
        out = wrapper(x)
    finally:
        for p in SAE_POINTS:
            getattr(wrapper, p).remove_hooks("fwd", including_permanent=True)
    return out, seen["f"]


@pytest.mark.parametrize("name", NAMES)
def test_spliced_forward_with_the_error_term_is_the_plain_forward_on_every_family(name):
    model, inputs = family(name)
    sae = random_sae("topk", d_in=model.cfg.d_model, d_sae=3 * model.cfg.d_model, hook=HOOK, k=8)
    with torch.no_grad():
        plain, plain_cache = model.run_with_cache(**inputs, names_filter=HOOK)
        with model.saes(sae, use_error_term=True):
            spliced, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith(HOOK))
    torch.testing.assert_close(spliced, plain, atol=TOL, rtol=0)
    x = cache[HOOK]
    assert torch.equal(x, plain_cache[HOOK])  # the hook itself still holds what the model made
    out, features = _saelens(sae, x)
    assert torch.equal(cache[f"{HOOK}.hook_sae_acts_post"], features)
    assert torch.equal(cache[f"{HOOK}.hook_sae_output"], out)
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (*x.shape[:2], sae.cfg.d_sae)
    assert (cache[f"{HOOK}.hook_sae_acts_post"] > 0).sum(-1).max() <= 8
    assert model.acts_to_saes == {} and type(model.hook_dict[HOOK]).__name__ == "HookPoint"


def test_points_are_named_as_saelens_names_them_and_hold_its_values(toy_model):
    model = toy_model
    from hooked_av.toy import make_batch

    inputs = make_batch(2, seed=0, tokenizer=model.tokenizer).inputs
    sae = random_sae("jumprelu", hook=HOOK, d_sae=96)
    wrapper = _SAEWrapper(sae, use_error_term=True)
    theirs = {f"{HOOK}.{n}" for n, m in wrapper.named_modules() if n and type(m).__name__ == "HookPoint"}
    with torch.no_grad(), model.saes(sae, use_error_term=True):
        ours = {n for n in model.hook_dict if n.startswith(f"{HOOK}.")}
        assert ours == theirs == {f"{HOOK}.{p}" for p in SAE_POINTS}
        assert all(position_major(n) for n in ours)
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith(HOOK))
    x = cache[HOOK]
    with torch.no_grad():
        assert torch.equal(cache[f"{HOOK}.hook_sae_input"], x)
        assert torch.equal(cache[f"{HOOK}.hook_sae_acts_pre"], (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        assert torch.equal(cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(x))
        assert torch.equal(cache[f"{HOOK}.hook_sae_recons"], sae.decode(sae.encode(x)))
        assert torch.equal(cache[f"{HOOK}.hook_sae_error"], x - sae.decode(sae.encode(x)))


def test_an_edited_feature_is_what_saelens_computes_and_reaches_the_logits(toy_model):
    model = toy_model
    from hooked_av.toy import make_batch

    inputs = make_batch(2, seed=1, tokenizer=model.tokenizer).inputs
    sae = random_sae("topk", hook=HOOK, d_sae=96, k=6)
    with torch.no_grad():
        x = model.run_with_cache(**inputs, names_filter=HOOK)[1][HOOK]
        top = int(sae.encode(x)[..., :].sum((0, 1)).argmax())

    def zero_top(t, hook=None):
        t = t.clone()
        t[..., top] = 0
        return t

    def zero_top_in_place(t, hook=None):
        t[..., top] = 0  # edits the features where they are, returns nothing

    def half_pre(t, hook=None):
        return t * 0.5

    cases = [(True, zero_top, "hook_sae_acts_post"), (False, zero_top, "hook_sae_acts_post"),
             (True, zero_top_in_place, "hook_sae_acts_post"), (True, half_pre, "hook_sae_acts_pre")]
    for use_error_term, edit, at in cases:
        with torch.no_grad(), model.saes(sae, use_error_term=use_error_term):
            plain_features = model.run_with_cache(**inputs, names_filter=f"{HOOK}.hook_sae_acts_post")[1]
            # the edit through the hook API, with and without every point cached
            hooked = model.run_with_hooks(**inputs, fwd_hooks=[(f"{HOOK}.{at}", edit)])
            with model.hooks(fwd_hooks=[(f"{HOOK}.{at}", edit)]):
                _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith(HOOK))
        out, features = _saelens(sae, x, zero_top if edit is zero_top_in_place else edit, use_error_term, at)
        assert torch.equal(cache[f"{HOOK}.hook_sae_output"], out) and torch.equal(cache[f"{HOOK}.hook_sae_acts_post"], features)
        with torch.no_grad():  # a forward where a naive hook on the plain model writes SAELens's output
            oracle = model.run_with_hooks(**inputs, fwd_hooks=[(HOOK, lambda t, hook: out)])
        torch.testing.assert_close(hooked, oracle, atol=TOL, rtol=0)
        assert torch.equal(plain_features[f"{HOOK}.hook_sae_acts_post"], sae.encode(x))  # unedited when not hooked
        assert (hooked - model(**inputs)).abs().max() > 1e-3  # the edit moved the logits


def test_without_the_error_term_the_reconstruction_replaces_the_activation(toy_model):
    model = toy_model
    from hooked_av.toy import make_batch

    inputs = make_batch(2, seed=2, tokenizer=model.tokenizer).inputs
    sae = random_sae("standard", hook=HOOK)
    with torch.no_grad():
        oracle = model.run_with_hooks(**inputs, fwd_hooks=[(HOOK, lambda t, hook: sae.decode(sae.encode(t)))])
        got = model.run_with_saes(**inputs, saes=[sae])  # the SAE's own use_error_term: False
        plain = model(**inputs)
    torch.testing.assert_close(got, oracle, atol=TOL, rtol=0)
    assert (got - plain).abs().max() > 1e-2


def test_a_hook_z_sae_splices_with_its_heads_flattened(toy_model):
    model = toy_model
    from hooked_av.toy import make_batch

    inputs = make_batch(1, seed=3, tokenizer=model.tokenizer).inputs
    hook = "blocks.2.attn.hook_z"
    d = model.cfg.n_heads * model.cfg.d_head
    sae = random_sae("standard", d_in=d, hook=hook, reshape_activations="hook_z")
    with torch.no_grad():
        plain, pc = model.run_with_cache(**inputs, names_filter=hook)
        with model.saes(sae, use_error_term=True):
            spliced, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith(hook))
    torch.testing.assert_close(spliced, plain, atol=TOL, rtol=0)
    assert cache[f"{hook}.hook_sae_input"].shape == (*pc[hook].shape[:2], d)
    assert torch.equal(cache[f"{hook}.hook_sae_output"], _saelens(sae, pc[hook])[0])


ARCHITECTURES = [("standard", "save_model"), ("gated", "save_model"), ("topk", "save_model"), ("abstopk", "save_model"),
                 ("jumprelu", "save_model"), ("matching_pursuit", "save_model"),
                 ("batchtopk", "save_inference_model"), ("matryoshka_batchtopk", "save_inference_model")]


@pytest.mark.parametrize("arch, save", ARCHITECTURES)
def test_saes_saved_by_saelens_load_and_splice(arch, save, tmp_path, toy_model):
    """A training SAE of each architecture saved as SAELens users save them: `load_sae` is
    `SAE.load_from_disk` (identical weights), and the loaded SAE splices exactly."""
    model = toy_model
    from hooked_av.toy import make_batch

    trained = random_sae(arch, hook=HOOK, d_sae=64, training=True)
    getattr(trained, save)(tmp_path)
    ours, theirs = load_sae(tmp_path), SAE.load_from_disk(tmp_path)
    assert type(ours) is type(theirs) and ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], theirs.state_dict()[k]) for k in ours.state_dict())
    inputs = make_batch(1, seed=4, tokenizer=model.tokenizer).inputs
    with torch.no_grad():
        plain = model(**inputs)
        with model.saes(tmp_path, use_error_term=True):  # a folder splices too
            spliced, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith(HOOK))
        x = cache[HOOK]
        torch.testing.assert_close(spliced, plain, atol=TOL, rtol=0)
        assert torch.equal(cache[f"{HOOK}.hook_sae_output"], _saelens(theirs, x)[0] if arch != "matching_pursuit" else
                           _SAEWrapper(theirs, use_error_term=True)(x))
        if arch == "matching_pursuit":  # its encode passes no point (SAELens's own): no features to cache or edit
            assert f"{HOOK}.hook_sae_acts_post" not in cache
            return
        assert torch.equal(cache[f"{HOOK}.hook_sae_acts_post"], theirs.encode(x))
        if save == "save_model":  # the training SAE's own features, read by the inference class
            torch.testing.assert_close(theirs.encode(x), trained.encode(x), atol=1e-6, rtol=0)


def test_splicing_leaves_nothing_behind_even_after_an_exception(toy_model):
    model = toy_model
    from hooked_av.toy import make_batch

    inputs = make_batch(1, seed=5, tokenizer=model.tokenizer).inputs
    sae = random_sae("topk", hook=HOOK)
    point = model.hook_dict[HOOK]
    names = set(model.hook_dict)
    with pytest.raises(RuntimeError, match="boom"):
        with model.saes(sae, use_error_term=True):
            model.add_hook(f"{HOOK}.hook_sae_acts_post", lambda t, hook: t)
            model.add_hook(HOOK, lambda t, hook: t, is_permanent=True)
            raise RuntimeError("boom")
    assert model.hook_dict[HOOK] is point and set(model.hook_dict) == names and model.acts_to_saes == {}
    assert not point.has_hooks() and not any(getattr(sae, p).has_hooks() for p in SAE_POINTS)
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"  # its own name back
    # a second SAE replaces the first inside a context, and the first comes back after it
    other = random_sae("standard", hook=HOOK, seed=1)
    model.add_sae(sae, use_error_term=True)
    try:
        with model.saes(other):
            assert model.acts_to_saes[HOOK] is other
        assert model.acts_to_saes[HOOK] is sae and model.hook_dict[HOOK].use_error_term
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs), model.run_with_hooks(**inputs, fwd_hooks=[]), atol=0, rtol=0)
    finally:
        model.reset_saes()
    assert model.hook_dict[HOOK] is point and model.acts_to_saes == {}


def test_what_cannot_be_spliced_is_refused_before_anything_changes(toy_model):
    model = toy_model
    before = dict(model.hook_dict)
    sae = random_sae("standard", hook=HOOK)
    cases = [
        (dict(sae=sae, hook_name="blocks.9.hook_resid_post"), KeyError, "the language model has 4 blocks"),
        (dict(sae=sae, hook_name="blocks.1.attn.hook_pattern"), ValueError, "computed only when hooked"),
        (dict(sae=random_sae("standard", d_in=64, hook=HOOK)), ValueError, "d_in=64 but 'blocks.1.hook_resid_post' holds d_model=128"),
        (dict(sae=random_sae("standard", hook=None)), ValueError, "names no hook"),
        (dict(sae=torch.nn.Linear(2, 2)), TypeError, "takes an SAELens SAE"),
        (dict(sae="/no/such/sae"), FileNotFoundError, "no such SAE folder"),
    ]
    cases.append((dict(sae=random_sae("standard", hook=HOOK).to("meta")), ValueError,
                  "the SAE is on meta but 'blocks.1.hook_resid_post' runs on cpu; move it there"))
    per_head = random_sae("standard", hook=HOOK)
    per_head.cfg.metadata.hook_head_index = 1
    cases.append((dict(sae=per_head), ValueError, "per-head SAEs are not supported"))
    coder = random_sae("standard", hook=HOOK)
    coder.cfg.metadata.hook_name_out = "blocks.2.hook_resid_post"
    cases.append((dict(sae=coder), ValueError, "a transcoder"))
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            model.add_sae(**kw)
        assert model.hook_dict == before and model.acts_to_saes == {}
    model.add_hook(HOOK, lambda t, hook: t)
    try:
        with pytest.raises(ValueError, match="has hooks on it"):
            model.add_sae(sae)
    finally:
        model.reset_hooks()
    model.add_sae(sae, hook_name="blocks.1.hook_resid_post")
    try:
        with pytest.raises(ValueError, match="already spliced at 'blocks.1.hook_resid_post'"):
            model.add_sae(sae, hook_name="blocks.2.hook_resid_post")
        model.add_sae(copy.deepcopy(sae), hook_name="blocks.2.hook_resid_post")  # a copy may go elsewhere
        assert set(model.acts_to_saes) == {"blocks.1.hook_resid_post", "blocks.2.hook_resid_post"}
        with pytest.raises(ValueError, match="a point of the SAE"):
            model.add_sae(copy.deepcopy(sae), hook_name=f"{HOOK}.hook_sae_acts_post")
    finally:
        model.reset_saes()
    with pytest.raises(KeyError, match="no SAE is spliced at 'blocks.3.hook_resid_post'"):
        model.check_hook_name("blocks.3.hook_resid_post.hook_sae_acts_post")
    with pytest.raises(KeyError, match=r"no SAE is spliced at \['blocks.3.hook_resid_post'\]"):
        model.reset_saes("blocks.3.hook_resid_post")
    assert model.hook_dict == before


def test_splicing_keeps_qwen3_omni_s_lazily_built_expert_hooks():
    model, inputs = family("qwen3_omni")
    experts = [n for n in model.hook_dict if ".mlp.experts." in n]
    assert experts
    with model.saes(random_sae("standard", d_in=model.cfg.d_model, hook="blocks.0.hook_resid_post"), use_error_term=True):
        assert all(n in model.hook_dict for n in experts)
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=[experts[0], "blocks.0.hook_resid_post.hook_sae_acts_post"])
        assert set(cache.keys()) == {experts[0], "blocks.0.hook_resid_post.hook_sae_acts_post"}
        assert isinstance(model.hook_dict["blocks.0.hook_resid_post"], SAESplice)


def test_without_saelens_every_package_imports_and_add_sae_says_how_to_install_it():
    import subprocess
    import sys

    code = ("import sys; sys.modules['sae_lens'] = None\n"  # an import of sae_lens now raises ImportError
            "import hooked_av, patching\n"  # every package imports without it
            "try:\n    hooked_av.HookedAVModel.add_sae(None, 'x')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SAEs need SAELens, which is not installed: pip install 'hooked-av[sae]'" in out.stdout
