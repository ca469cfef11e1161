"""Experiment arguments that cannot apply are refused before any tower or block runs (counted with forward
pre-hooks on the towers and the first block): a TokenMap of other inputs, a misspelt edge or token set, a
corrupted batch of another layout, batch_size 0. Each used to be refused after the towers had run."""

from __future__ import annotations

import pytest
import torch
from test_patching_common import av_inputs, interleaved_inputs, tiny_pair, token_map

from patching.methods.activation_patching import activation_patching
from patching.methods.causal_tracing import causal_tracing
from patching.methods.knockout import knockout
from patching.engine.metrics import AnswerProb

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    model = tiny_pair()[1]
    inputs, other = av_inputs(6), interleaved_inputs()  # one prompt each, of two layouts
    assert other["input_ids"].shape != inputs["input_ids"].shape
    return model, inputs, token_map(model, inputs), other, token_map(model, other)


CASES = {
    "knockout, the map of other inputs": (lambda m, x, tm, o, otm: knockout(m, x, [5], tm=otm, progress=False),
                                          "the TokenMap is"),
    "knockout, a misspelt edge": (lambda m, x, tm, o, otm: knockout(m, x, [5], edges=["audoi->last"], tm=tm, progress=False),
                                  "audoi"),
    "knockout, batch_size 0": (lambda m, x, tm, o, otm: knockout(m, x, [5], tm=tm, batch_size=0, progress=False),
                               "batch_size"),
    "causal tracing, the map of other inputs": (lambda m, x, tm, o, otm: causal_tracing(m, x, [5], tm=otm, progress=False),
                                                "the TokenMap is"),
    "causal tracing, a misspelt corrupt set": (lambda m, x, tm, o, otm: causal_tracing(m, x, [5], corrupt="audoi", tm=tm,
                                                                                        progress=False), "audoi"),
    "activation patching, another layout": (lambda m, x, tm, o, otm: activation_patching(m, x, o, AnswerProb(5), progress=False),
                                            "differ in length|different token groups"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_anything_runs(setup, case):
    model, inputs, tm, other, other_tm = setup
    run, message = CASES[case]
    ran = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: ran.append(name))
               for name, m in (("audio", model.audio_encoder), ("vision", model.vision_encoder), ("block 0", model.blocks[0]))]
    try:
        with pytest.raises(ValueError, match=message):
            run(model, inputs, tm, other, other_tm)
    finally:
        for h in handles:
            h.remove()
    assert ran == []


def test_a_sweep_refuses_edits_built_on_another_prompts_map_before_its_clean_forward(setup):
    from patching.engine.hooks import block_attention, discard, steer
    from patching.engine.sweep import run_rows, samples

    model, inputs, tm, other, other_tm = setup
    s = samples(model, inputs, tm)[0]
    wrong = samples(model, other, other_tm)[0].tm
    ran = []
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: ran.append(1))
    try:
        for iv in (block_attention(wrong, "audio", "last", [1]), steer(wrong, "last", "audio", 0.5, [1]),
                   discard(wrong, "audio", 1, model.cfg.n_layers)):
            with pytest.raises(ValueError, match=rf"built on a TokenMap of {wrong.seq_len} positions, but the prompt it "
                                                 rf"runs on has {s.seq_len}"):
                run_rows(model, s, [block_attention(s.tm, "video", "last", [2]), iv], progress=False)
    finally:
        handle.remove()
    assert ran == []


@pytest.mark.parametrize("name", ["qwen2_5_omni", "video_salmonn2", "qwen3_omni"])
def test_non_finite_media_given_directly_are_refused_naming_the_key(name):
    # NaN in input_features or pixel values given to the forward (not through prepare) returned NaN logits
    from family_cases import family

    model, inputs = family(name)
    keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert {"input_features", "pixel_values_videos"} <= set(keys)
    variants = [(k, {**inputs, k: _poison(inputs[k], bad)}) for k in keys for bad in (float("nan"), float("inf"))]
    if name == "video_salmonn2":  # the repository's name for the features
        alias = {k: v for k, v in inputs.items() if k != "input_features"}
        variants.append(("audio_feature", {**alias, "audio_feature": _poison(inputs["input_features"], float("nan"))}))
    ran = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: ran.append(n))
               for n, m in model.named_children() if n not in ("blocks", "ln_final", "unembed") and any(True for _ in m.parameters())]
    try:
        for key, bad in variants:
            for call in (lambda x: model(**x), lambda x: model.encode(**x), lambda x: model.generate(**x, max_new_tokens=1),
                         lambda x: model.run_with_cache(**x), lambda x: model.attention_rows(x, "last", layers=[0])):
                with pytest.raises(ValueError, match=rf"^{key} holds \d+ non-finite value\(s\) \(NaN or inf\), the first at index"):
                    call(bad)
    finally:
        for h in handles:
            h.remove()
    assert not ran  # before any tower (or the embedding) ran
    with torch.no_grad():
        assert torch.isfinite(model(**inputs)).all()


def _poison(t, value):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


@pytest.mark.parametrize("name", ["qwen2_5_omni", "video_salmonn2", "qwen3_omni"])
def test_a_cache_device_that_holds_no_data_or_does_not_exist_is_refused(name):
    # run_with_cache(device="meta") returned a cache of empty meta tensors; device="cuda" without a GPU failed
    # in the driver
    from family_cases import family

    model, inputs = family(name)
    ran = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        with pytest.raises(ValueError, match=r"run_with_cache\(device='meta'\) would keep a cache of tensors without values"):
            model.run_with_cache(**inputs, device="meta")
        with pytest.raises(ValueError, match=r"device 'nowhere' is not a device"):
            model.run_with_cache(**inputs, device="nowhere")
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match=r"device 'cuda' was asked for but CUDA is not available on this machine"):
                model.run_with_cache(**inputs, device="cuda")
    finally:
        handle.remove()
    assert not ran
    _, cache = model.run_with_cache(**inputs, device="cpu", names_filter=["blocks.0.hook_resid_post"])
    assert cache["blocks.0.hook_resid_post"].device.type == "cpu" and torch.isfinite(cache["blocks.0.hook_resid_post"]).all()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' was asked for but CUDA is not available"):
            type(model).from_config(model.hf_config, device="cuda")


def test_non_finite_seconds_per_grid_given_as_a_list_are_refused():
    from family_cases import family

    model, inputs = family("video_salmonn2")
    spg = [float("nan")] * len(inputs["video_grid_thw"])
    bad = {**{k: v for k, v in inputs.items() if k != "video_second_per_grid"}, "second_per_grid_ts": spg}
    with pytest.raises(ValueError, match=r"^second_per_grid_ts holds \d+ non-finite value"):
        model.encode(**bad)
