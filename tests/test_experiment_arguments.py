"""Experiments refuse what they cannot run: every bad count, empty list, answer
list of the wrong length, id outside the vocabulary, head or dimension out of range and NaN/inf number
is a clear error raised before any forward; discarding times its full forward through the same path."""

import importlib
import math

import pandas as pd
import pytest
import torch
from test_patching_common import N_LAYERS, av_inputs, tiny_pair, token_map

from patching.methods.attribution import attribution_patching
from patching.methods.causal_tracing import causal_tracing
from patching.methods.discarding import discarding
from patching.methods.guidance import guided_generate, guided_logits
from patching.engine.hooks import ablate, add_noise, patch_from_cache, scale_attention, steer
from patching.engine.intervention import Intervention
from patching.methods.knockout import knockout, window_layers
from patching.engine.metrics import AnswerProb, LogitDiff
from patching.engine.results import Result
from patching.methods.sinks import find_sinks, sink_dimensions
from patching.engine.sweep import rows_per_forward

discarding_module = importlib.import_module("patching.methods.discarding")  # `patching.methods.discarding` is also the function


@pytest.fixture(scope="module")
def setup():
    _, model = tiny_pair()
    one = av_inputs(6)  # one sample
    with torch.no_grad():
        answer = int(model(**one)[0, -1].argmax())
    return model, one, token_map(model, one), answer


@pytest.fixture
def no_forward(setup, monkeypatch):
    """The model with every forward replaced by a failure: an error raised under it came first."""
    model = setup[0]

    def ran(*args, **kwargs):
        raise AssertionError("a forward ran before the argument error")

    for name in ("encode", "run_language_model", "run_with_cache", "run_with_hooks", "forward"):
        monkeypatch.setattr(model, name, ran)
    return setup


# ---- Result.mean ------------------------------------------------------------------------------------
def _knockout_frame(correct):
    return pd.DataFrame(dict(sample=[0, 1], edge=["audio->last"] * 2, layer=[3, 3], rel_change=[-10.0, -30.0], correct=correct))


def test_mean_over_correct_samples_refuses_when_no_sample_is_correct():
    res = Result("knockout", _knockout_frame([False, False]))
    with pytest.raises(ValueError, match=r"no sample is answered correctly.*correct_only=False"):
        res.mean()
    assert res.mean(correct_only=False).rel_change.tolist() == [-20.0]  # asked for: every sample
    assert Result("knockout", _knockout_frame([True, False])).mean().rel_change.tolist() == [-10.0]


def test_mean_correct_only_on_a_frame_without_correctness_is_an_error():
    res = Result("activation_patching", pd.DataFrame(dict(site=["resid_pre"], layer=[0], pos=[-1], normalised=[0.5])))
    assert res.mean().normalised.tolist() == [0.5]
    with pytest.raises(ValueError, match=r"correct_only=True.*no 'correct' column"):
        res.mean(correct_only=True)


# ---- answers --------------------------------------------------------------------------------------
def test_knockout_refuses_more_answers_than_samples(no_forward):
    model, one, tm, answer = no_forward
    with pytest.raises(ValueError, match=r"3 answer token ids for 1 sample.*one id per sample \(or one for all\)"):
        knockout(model, one, [answer, 1, 2], tm=tm, progress=False)


@pytest.mark.parametrize("bad", [320, -1])
def test_answer_ids_outside_the_vocabulary_are_refused(no_forward, bad):
    model, one, tm, _ = no_forward
    with pytest.raises(ValueError, match=rf"answer token id\(s\) \[{bad}\] out of range; the model has 320 token ids \(0..319\)"):
        knockout(model, one, [bad], tm=tm, progress=False)
    with pytest.raises(ValueError, match=rf"\[{bad}\] out of range"):
        causal_tracing(model, one, [bad], tm=tm, progress=False)
    with pytest.raises(ValueError, match=rf"\[{bad}\] out of range"):
        discarding(model, one, [bad], tm=tm, progress=False)
    with pytest.raises(ValueError, match=rf"wrong token id\(s\) \[{bad}\] out of range"):
        attribution_patching(model, one, one, metric=LogitDiff([0], [bad]))


def test_answers_must_be_whole_token_ids():
    with pytest.raises(ValueError, match=r"answer token ids must be integers, got \[2.5\]"):
        AnswerProb([2.5])


# ---- knockout and causal tracing ----------------------------------------------------------------------
def test_window_of_zero_layers_is_refused_everywhere(no_forward):
    model, one, tm, answer = no_forward
    with pytest.raises(ValueError, match=r"window must be >= 1 layer, got 0"):
        window_layers(3, 0, N_LAYERS)
    with pytest.raises(ValueError, match=r"window must be >= 1 layer, got 0"):
        causal_tracing(model, one, [answer], window=0, tm=tm, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(edges=[]), r"edges is empty"),
    (dict(centres=[]), r"centres is empty"),
])
def test_knockout_refuses_empty_and_out_of_range_lists(no_forward, kwargs, message):
    model, one, tm, answer = no_forward
    with pytest.raises(ValueError, match=message):
        knockout(model, one, [answer], tm=tm, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_noise=0), r"n_noise must be >= 1, got 0"),
    (dict(restore=()), r"restore is empty"),
    (dict(tokens=[]), r"tokens is empty"),
    (dict(centres=[]), r"centres is empty"),
    (dict(noise_scale=float("nan")), r"noise_scale must be a finite number >= 0, got nan"),
    (dict(noise_std=float("inf")), r"noise_std must be a finite number >= 0, got inf"),
    (dict(answers=[1, 2]), r"2 answer token ids for 1 sample"),
])
def test_causal_tracing_refuses_arguments_that_restore_or_corrupt_nothing(no_forward, kwargs, message):
    model, one, tm, _ = no_forward
    with pytest.raises(ValueError, match=message):
        causal_tracing(model, one, **{"tm": tm, "progress": False, **kwargs})


# ---- discarding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(repeats=0), r"repeats must be >= 1, got 0"),
    (dict(from_layers=[]), r"from_layers is empty"),
    (dict(from_layers=[N_LAYERS + 1]), rf"from_layer\(s\) \[{N_LAYERS + 1}\] out of range; valid: 0..{N_LAYERS} \({N_LAYERS} = discard nothing\)"),
    (dict(group="last"), r"'last' includes the last position"),
])
def test_discarding_refuses_bad_arguments_before_any_forward(no_forward, kwargs, message):
    model, one, tm, answer = no_forward
    with pytest.raises(ValueError, match=message):
        discarding(model, one, [answer], **{"tm": tm, "progress": False, **kwargs})


def test_discarding_times_the_full_forward_through_the_same_path_warmed_up_and_interleaved(setup, monkeypatch):
    model, one, tm, answer = setup
    calls = []
    real = discarding_module.physical_forward

    def counted(model, sample, group, from_layer):
        calls.append(from_layer)
        return real(model, sample, group, from_layer)

    monkeypatch.setattr(discarding_module, "physical_forward", counted)
    df = discarding(model, one, [answer], "audio|video", from_layers=[0, 3, N_LAYERS], tm=tm, repeats=2, progress=False).df
    # one warm-up round, then `repeats` rounds; the full forward is from_layer = n_layers (nothing dropped), first
    assert calls == [N_LAYERS, 0, 3] * 3
    full = df[df.from_layer == N_LAYERS].iloc[0]
    assert full.flops_saved == 0.0 and full.time_saved == 0.0 and full.seconds == full.seconds_full
    assert df.seconds_full.nunique() == 1 and full.metric == full.metric_full
    assert df[df.from_layer == 0].flops_saved.iloc[0] > 0.3


# ---- interventions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [float("nan"), float("inf"), -1.0])
def test_scale_attention_refuses_a_factor_that_is_not_a_finite_non_negative_number(setup, factor):
    tm = setup[2]
    with pytest.raises(ValueError, match=rf"scale_attention: factor must be a finite number >= 0, got {factor}"):
        scale_attention(tm, "last", "video", factor, [1])


def test_steer_and_add_noise_refuse_nan_and_inf(setup):
    tm = setup[2]
    with pytest.raises(ValueError, match=r"steer: alpha must be a finite number, got nan"):
        steer(tm, "last", "video", float("nan"), [1])
    with pytest.raises(ValueError, match=r"add_noise: std must be a finite number >= 0, got inf"):
        add_noise("hook_embed", tm.select("audio"), float("inf"))


@pytest.mark.parametrize("positions", [[], torch.zeros(38, dtype=torch.bool)])
def test_positions_that_select_nothing_are_refused(setup, positions):
    with pytest.raises(ValueError, match=r"positions select nothing"):
        ablate("blocks.0.hook_resid_pre", "zero", positions=positions)
    with pytest.raises(ValueError, match=r"positions select nothing"):
        patch_from_cache({"blocks.0.hook_resid_pre": torch.zeros(1, 38, 64)}, "blocks.0.hook_resid_pre", positions)
    with pytest.raises(ValueError, match=r"positions select nothing"):
        add_noise("hook_embed", positions, 1.0)


def test_empty_site_lists_are_refused():
    with pytest.raises(ValueError, match=r"ablate: sites is empty"):
        ablate([], "zero")
    with pytest.raises(ValueError, match=r"patch_from_cache: sites is empty"):
        patch_from_cache({}, [])


def test_heads_out_of_range_are_refused_before_the_run(setup):
    model, _, tm, _ = setup
    cache = {"blocks.1.attn.hook_z": torch.zeros(1, 38, 4, 16)}
    with pytest.raises(ValueError, match=r"head\(s\) \[4\] out of range; the model has 4 heads \(0..3\)"):
        patch_from_cache(cache, "blocks.1.attn.hook_z", heads=[4]).check(model)
    with pytest.raises(ValueError, match=r"head\(s\) \[7\] out of range; the model has 4 heads \(0..3\)"):
        steer(tm, "last", "video", 0.5, [1], heads=[7]).check(model)
    with pytest.raises(ValueError, match=r"head\(s\) \[-1\] out of range"):
        patch_from_cache(cache, "blocks.1.attn.hook_z", heads=[-1]).check(model)
    with pytest.raises(ValueError, match=r"patch_from_cache: heads is empty"):
        patch_from_cache(cache, "blocks.1.attn.hook_z", heads=[])
    # the check is part of every sweep's Intervention.check and of an ablation's too
    with pytest.raises(ValueError, match=r"head\(s\) \[4\] out of range"):
        ablate("blocks.1.attn.hook_z", heads=[4]).check(model)


# ---- sinks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(dims=[64]), r"dims \[64\] out of range; the model has 64 dimensions \(0..63\)"),
    (dict(dims=[-1]), r"dims \[-1\] out of range"),
    (dict(dims=[]), r"dims is empty"),
    (dict(tau=float("nan")), r"tau must be a finite number, got nan"),
    (dict(modalities=[]), r"modalities is empty"),
    (dict(layers=[]), r"layers is empty"),
])
def test_find_sinks_refuses_bad_arguments_before_any_forward(no_forward, kwargs, message):
    model, one, tm, _ = no_forward
    with pytest.raises(ValueError, match=message):
        find_sinks(model, one, **{"tm": tm, **kwargs})


def test_sink_dimensions_refuses_layers_out_of_range_and_a_bad_ratio(no_forward):
    model, one, tm, _ = no_forward
    with pytest.raises(ValueError, match=rf"layer\(s\) \[{N_LAYERS}\] out of range"):
        sink_dimensions(model, one, layers=[N_LAYERS], tm=tm)
    with pytest.raises(ValueError, match=r"ratio must be a finite number >= 0, got nan"):
        sink_dimensions(model, one, ratio=float("nan"), tm=tm)


# ---- attribution patching and the sweep engine ---------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(positions=[]), r"positions is empty"),
    (dict(sites=[]), r"sites is empty"),
    (dict(layers=[]), r"layers is empty"),
    (dict(metric=AnswerProb([1, 2])), r"2 answer token ids for 1 sample"),
])
def test_attribution_patching_refuses_empty_lists_and_mismatched_answers(no_forward, kwargs, message):
    model, one, _, _ = no_forward
    with pytest.raises(ValueError, match=message):
        attribution_patching(model, one, one, **kwargs)


def test_max_batch_tokens_must_be_positive():
    with pytest.raises(ValueError, match=r"max_batch_tokens must be >= 1, got 0"):
        rows_per_forward(10, None, 0)


# ---- guidance ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), torch.tensor([0.5, float("nan")])])
def test_guidance_refuses_a_nan_or_inf_scale(no_forward, scale):
    model, one, _, _ = no_forward
    with pytest.raises(ValueError, match=r"guidance scale must be a finite number"):
        guided_generate(model, one, lambda tm: Intervention(), scale=scale)
    with pytest.raises(ValueError, match=r"guidance scale must be a finite number"):
        guided_logits(torch.zeros(2, 5), torch.zeros(2, 5), scale)


def test_guidance_refuses_a_scale_tensor_of_the_wrong_batch_and_an_eos_outside_the_vocabulary(no_forward):
    model, one, _, _ = no_forward
    with pytest.raises(ValueError, match=r"a scale tensor of 3 values for 1 prompt"):
        guided_generate(model, one, lambda tm: Intervention(), scale=torch.ones(3))
    with pytest.raises(ValueError, match=r"eos_token_id \[320\] out of range; the model has 320 token ids"):
        guided_generate(model, one, lambda tm: Intervention(), eos_token_id=320)


def test_guidance_refuses_a_callable_scale_that_returns_nan(setup):
    model, one, tm, _ = setup
    with pytest.raises(ValueError, match=r"guidance scale must be a finite number, got nan"):
        guided_generate(model, one, lambda tm: Intervention(), scale=lambda _: math.nan, tm=tm)


# ---- activation patching and the logit lens -------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(positions=[]), "positions is empty"),
    (dict(sites=[]), "sites is empty"),
    (dict(layers=[]), "layers is empty"),
    (dict(heads=[4], sites=("head",)), r"head\(s\) \[4\] out of range"),
    (dict(metric=AnswerProb([1, 2, 3])), "3 answer token ids for 1 sample"),
])
def test_activation_patching_refuses_lists_that_patch_nothing_before_any_forward(no_forward, kwargs, message):
    from patching.methods.activation_patching import activation_patching

    model, one, tm, _ = no_forward
    with pytest.raises(ValueError, match=message):
        activation_patching(model, one, one, **{"progress": False, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(answers=[1, 2, 3]), "3 answer token ids for 1 sample"),
    (dict(answers=[320]), r"answer token id\(s\) \[320\] out of range"),
    (dict(groups=[]), "groups is empty"),
])
def test_logit_lens_refuses_answers_and_groups_that_do_not_fit_before_any_forward(no_forward, kwargs, message):
    from patching.methods.logit_lens import logit_lens

    model, one, tm, _ = no_forward
    with pytest.raises(ValueError, match=message):
        logit_lens(model, one, **kwargs)


def test_a_metric_without_samples_scores_row_i_against_answer_i_or_asks_which():
    """`metric(logits)` on n rows with n answers used to score every row against answer 0."""
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    m = AnswerProb([0, 1])
    assert torch.allclose(m(logits), logits.softmax(-1)[[0, 1], [0, 1]])
    assert m.correct(logits).tolist() == [True, True]
    assert torch.allclose(m(logits, 1), logits.softmax(-1)[:, 1])  # one sample for every row, as sweeps call it
    assert torch.allclose(AnswerProb([2])(logits), logits.softmax(-1)[:, 2])  # one answer for all rows
    with pytest.raises(ValueError, match="3 answers but the logits have 2 rows; pass samples="):
        AnswerProb([0, 1, 2])(logits)
    assert LogitDiff([0, 1], [1, 0])(logits).tolist() == [4.0, 4.0]
