"""Every public name of `patching` (`patching.__all__`) ends its docstring with a short example
(docs STYLE.md: "a public function's docstring ends with a short runnable example"), and every example
runs: each is executed on the shipped toy model, so an example that goes stale against its function
fails here, by name.

The example is the docstring's last paragraph: code indented by 4 spaces, at most 4 lines, naming the
function or class it documents. It runs in a fresh copy of one namespace built once per session, and
may assume these names (anything else it imports itself):

- every name in `patching.__all__`, `torch` and `hooked_av`;
- `model`: `hooked_av.load("toy")`;
- `inputs` (alias `clean`): one toy prompt, "which note is played ?", over one clip given as frames
  `[2, 56, 56, 3]` uint8 and a 1 s waveform: `model.prepare(question, video=frames, audio=(wave, 16000))`;
  batch 1, 50 positions (video 4 tokens, audio 25);
- `answer`: the answer's token id (an int); the toy's top token for `inputs` (checked here);
- `tm`: `model.token_map(inputs)`;
- `corrupted`: `inputs` with the audio silenced (`patching.engine.corrupt.zero_modality`), the same
  layout; it loses the answer (checked here);
- `cache`: the clean run's activations, `model.run_with_cache(**inputs)[1]`;
- `sample`: `samples(model, inputs)[0]`;
- `manifest`: the `manifest.jsonl` of a 2-sample toy dataset on disk
  (`hooked_av.toy.dataset.write_toy_dataset(dir, n=2)`);
- `tmp`: an empty folder of the example's own (pytest's `tmp_path`);
- `sae`: a random SAELens TopK SAE (64 features, k 4) reading `blocks.1.hook_resid_post`, not spliced: an
  example that splices it (`with model.saes(sae, ...)`) leaves the model without SAEs.

An example that registers an experiment kind leaves the registry as it found it; figures are closed.
Examples that cannot run on the toy are compiled only and listed in `COMPILE_ONLY` with the reason,
which is checked to still hold.

The model's parameters require grad (as HF and TransformerLens load them), so every public function is
also checked to build no autograd graph while it runs (no tensor is saved for a backward: the library's
forwards run under `torch.no_grad`), except those in `BUILDS_A_GRAPH`, whose graph reaches activations
only and leaves no weight gradient behind.
"""

import ast
import inspect
import re
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hooked_av  # noqa: E402
import patching  # noqa: E402
from patching.engine import experiment as registry  # noqa: E402

MAX_LINES = 4
QUESTION = "which note is played ?"

# name -> (why its example is compiled but not run, a check on the toy model that the reason still holds)
COMPILE_ONLY = {
    # the toy's MLPs are dense: it has no `blocks.{l}.mlp.experts.{e}.hook_out` to silence
    "ablate_experts": ("needs a mixture-of-experts model (e.g. Qwen3-Omni's Thinker); the toy's MLPs are dense",
                       lambda model: not any(".mlp.experts." in name for name in model.hook_dict)),
}


# name -> why it builds a graph (over activations only: it freezes the weights)
BUILDS_A_GRAPH = {"attribution_patching": "its backward gives the metric's gradient at every site"}


def example(name: str) -> str:
    """The last paragraph of `name`'s own docstring (not an inherited one), dedented. It must be indented
    4 spaces past the docstring's text (read from the source: `inspect.cleandoc` would strip a one-line
    summary's example to the margin)."""
    obj = inspect.unwrap(getattr(patching, name))
    assert obj.__doc__, f"{name} has no docstring"
    source = inspect.getsource(obj)
    text = len(source) - len(source.lstrip(" ")) + 4  # a def's or class's docstring sits 4 past it
    last = obj.__doc__.rstrip().split("\n\n")[-1]
    lines = [line for line in last.splitlines() if line.strip()]
    assert lines and all(line.startswith(" " * (text + 4)) for line in lines), (
        f"{name}: the docstring's last paragraph is not an example indented 4 spaces past its text:\n{last}")
    return textwrap.dedent(last).strip("\n")


@pytest.fixture(scope="session")
def namespace(tmp_path_factory):
    from hooked_av.toy import vocab
    from hooked_av.toy.clips import SAMPLE_RATE, render_clips
    from hooked_av.toy.dataset import write_toy_dataset
    from patching.engine.corrupt import zero_modality

    model = hooked_av.load("toy")
    attrs, video, audio = render_clips(1, seed=3)
    inputs = model.prepare(QUESTION, video=video[0].round().astype("uint8"), audio=(audio[0], SAMPLE_RATE))
    answer = model.tokenizer.convert_tokens_to_ids(vocab.NOTES[attrs["note"][0]])
    corrupted = zero_modality(inputs, "audio", model=model)
    with torch.no_grad():
        p_clean = model(**inputs)[0, -1].softmax(-1)
        p_corrupt = model(**corrupted)[0, -1].softmax(-1)
        _, cache = model.run_with_cache(**inputs)
    # the examples' comments read these as the toy's behaviour: the answer is known, silence loses it
    assert int(p_clean.argmax()) == answer and p_clean[answer] > 0.99 and p_corrupt[answer] < 0.01
    ns = {name: getattr(patching, name) for name in patching.__all__}
    from sae_helpers import random_sae

    ns.update(sae=random_sae("topk", d_in=model.cfg.d_model, d_sae=64, hook="blocks.1.hook_resid_post", k=4))
    ns.update(torch=torch, hooked_av=hooked_av, model=model, inputs=inputs, clean=inputs, answer=answer,
              tm=model.token_map(inputs), corrupted=corrupted, cache=cache, sample=patching.samples(model, inputs)[0],
              manifest=write_toy_dataset(tmp_path_factory.mktemp("toy_data"), n=2))
    return ns


@pytest.mark.parametrize("name", patching.__all__)
def test_docstring_ends_with_a_short_example_that_names_it(name):
    code = example(name)
    lines = code.splitlines()
    assert 1 <= len(lines) <= MAX_LINES, f"{name}: the example has {len(lines)} lines; keep it to {MAX_LINES}"
    assert re.search(rf"\b{re.escape(name)}\b", code), f"{name}: the example does not use {name}:\n{code}"
    compile(code, f"<{name} example>", "exec")


@pytest.mark.parametrize("name", patching.__all__)
def test_docstring_example_runs_on_the_toy(name, namespace, tmp_path):
    code = example(name)
    if name in COMPILE_ONLY:
        reason, holds = COMPILE_ONLY[name]
        compile(code, f"<{name} example>", "exec")
        assert holds(namespace["model"]), f"{name}: {reason!r} no longer holds; run its example (drop it from COMPILE_ONLY)"
        print(f"{name}: example compiled, not run: {reason}")
        pytest.skip(f"{name}: compiled only: {reason}")
    ns = {k: dict(v) if isinstance(v, dict) else v for k, v in namespace.items()}  # inputs dicts copied
    ns["tmp"] = tmp_path
    saved = []  # tensors autograd saved for a backward while a public function ran (not the example's own code)

    def counted(fn):
        def run(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(fn.__name__) or t, lambda t: t):
                return fn(*args, **kwargs)
        return run

    for public in patching.__all__:
        if inspect.isfunction(ns[public]):
            ns[public] = counted(ns[public])
    body = ast.parse(code).body
    # the last line, when an expression, is what the example shows: it must be something
    shown = body.pop() if isinstance(body[-1], ast.Expr) else None
    records = dict(registry._REGISTRY)
    try:
        exec(compile(ast.Module(body, type_ignores=[]), f"<{name} example>", "exec"), ns)
        if shown is not None:
            value = eval(compile(ast.Expression(shown.value), f"<{name} example>", "eval"), ns)
            is_print = isinstance(shown.value, ast.Call) and getattr(shown.value.func, "id", None) == "print"
            assert value is not None or is_print, f"{name}: the example's last line shows None"
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(records)
        plt.close("all")
    assert ns["model"].acts_to_saes == {}, f"{name}: the example left SAEs spliced"
    model = ns["model"]
    assert all(p.requires_grad and p.grad is None for p in model.parameters()), f"{name} left weight gradients"
    if name in BUILDS_A_GRAPH:
        assert saved, f"{name} is said to build a graph ({BUILDS_A_GRAPH[name]}) but saved nothing"
    else:
        assert not saved, f"{name}: {len(saved)} tensors saved for a backward inside {sorted(set(saved))}"


def test_compile_only_examples_are_public_names_and_few():
    assert set(COMPILE_ONLY) <= set(patching.__all__)
    assert len(COMPILE_ONLY) <= 2
