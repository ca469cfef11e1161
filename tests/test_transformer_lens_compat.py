"""TransformerLens users' analysis code (ActivationCache methods, get_act_name, token helpers) on our model."""

import pytest
import torch
from omni_helpers import geometries, tiny_hf_thinker
from transformer_lens.utilities import get_act_name

from hooked_av import HookedQwen2_5Omni

INPUTS, _ = geometries()["audio_and_video_blocks"]


def word_tokenizer(n: int = 320):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0")


@pytest.fixture(scope="module")
def run():
    model = HookedQwen2_5Omni.from_hf(tiny_hf_thinker(seed=4))
    model.tokenizer = word_tokenizer()
    with torch.no_grad():
        logits, cache = model.run_with_cache(**INPUTS)
    return model, logits, cache


def test_config_view_has_the_language_models_numbers(run):
    model, _, _ = run
    c = model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.n_key_value_heads, c.d_head, c.d_mlp, c.d_vocab) == (3, 64, 4, 2, 16, 128, 320)
    assert (c.normalization_type, c.act_fn, c.attn_only, c.positional_embedding_type) == ("RMS", "silu", False, "rotary")
    assert c.towers["audio_encoder"]["d_model"] == 32 and c.towers["vision_encoder"]["n_layers"] == 3
    assert model.W_U.shape == (64, 320) and model.W_E.shape == (320, 64)
    assert torch.equal(model.b_U, torch.zeros(320))


def test_get_act_name_keys_exist_in_hook_dict(run):
    model, _, _ = run
    for name, layer in [("pattern", 2), ("resid_pre", 0), ("resid_mid", 1), ("resid_post", 2), ("attn_out", 0),
                        ("mlp_out", 1), ("q", 0), ("k", 1), ("v", 2), ("z", 0), ("attn_scores", 1), ("rot_q", 0),
                        ("pre", 0), ("post", 1), ("pre_linear", 2), ("result", 0)]:
        assert get_act_name(name, layer) in model.hook_dict, name
    assert get_act_name("scale", 1, "ln1") == "blocks.1.ln1.hook_scale" in model.hook_dict
    assert get_act_name("normalized", 0, "ln2") == "blocks.0.ln2.hook_normalized" in model.hook_dict
    assert get_act_name("embed") in model.hook_dict


def test_accumulated_resid_with_final_ln_unembeds_to_the_logits(run):
    model, logits, cache = run
    stack = cache.accumulated_resid(layer=-1, apply_ln=True, incl_mid=True)
    assert stack.shape[0] == 2 * model.cfg.n_layers + 1
    final = stack[-1] @ model.W_U + model.b_U
    assert (final - logits).abs().max() < 1e-5


def test_decompose_resid_sums_to_the_final_residual(run):
    model, _, cache = run
    parts, labels = cache.decompose_resid(layer=-1, return_labels=True)
    assert labels == ["embed"] + [f"{l}_{k}" for l in range(model.cfg.n_layers) for k in ("attn_out", "mlp_out")]
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert (parts.sum(0) - final).abs().max() < 1e-5


def test_logit_attrs_sum_to_the_answer_logit(run):
    """The final RMSNorm divides every component by the same cached rms (hook_scale) and its weight
    is folded into the direction, so the components' attributions add up to the logit exactly."""
    model, logits, cache = run
    answer = int(logits[0, -1].argmax())
    stack = cache.decompose_resid(layer=-1, pos_slice=-1)
    attrs = cache.logit_attrs(stack, tokens=answer, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], 1)
    assert abs(attrs.sum().item() - logits[0, -1, answer].item()) < 1e-4
    by_name = cache.logit_attrs(stack, tokens=f"w{answer}", pos_slice=-1)
    assert torch.allclose(by_name, attrs)


def test_head_results_and_stacks(run):
    model, _, cache = run
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    assert heads.shape == (model.cfg.n_layers * model.cfg.n_heads, 1, 64)
    per_layer = heads.view(model.cfg.n_layers, model.cfg.n_heads, 1, 64).sum(1)
    attn_out = torch.stack([cache[f"blocks.{l}.hook_attn_out"][:, -1] for l in range(model.cfg.n_layers)])
    assert (per_layer - attn_out).abs().max() < 1e-5
    patterns = cache.stack_activation("pattern")
    s = INPUTS["input_ids"].shape[1]
    assert patterns.shape == (model.cfg.n_layers, 1, model.cfg.n_heads, s, s)
    normed = cache.apply_ln_to_stack(cache.accumulated_resid(layer=-1), layer=-1)
    assert normed.shape[0] == model.cfg.n_layers + 1


def test_full_resid_decomposition_sums_to_the_final_residual(run):
    model, _, cache = run
    full = cache.get_full_resid_decomposition(layer=-1, expand_neurons=False, pos_slice=-1)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, -1]
    assert (full.sum(0) - final).abs().max() < 1e-5


def test_token_helpers(run):
    model, _, _ = run
    assert model.to_single_token("w17") == 17
    assert model.to_tokens(["w3 w4", "w5 w6"], prepend_bos=False).tolist() == [[3, 4], [5, 6]]  # the text alone
    assert model.to_string(torch.tensor([3, 4])) == "w3 w4"
    assert torch.allclose(model.tokens_to_residual_directions(7), model.W_U[:, 7] * model.ln_final.weight)
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token("w1 w2")


def test_what_does_not_apply_says_why(run):
    model, _, cache = run
    with pytest.raises(NotImplementedError, match="no positional embedding matrix"):
        model.W_pos
    with pytest.raises(ValueError, match="left-padded"):
        model.to_tokens("w1", padding_side="right")
    bare = HookedQwen2_5Omni.from_hf(tiny_hf_thinker(seed=4))
    with pytest.raises(ValueError, match="no tokenizer is attached"):
        bare.to_single_token("w1")


def test_transformer_lens_logit_lens_ends_at_the_models_logits(run):
    model, logits, cache = run
    lens = cache.logit_lens(return_type="logits")
    assert lens.labels == [f"{l}_pre" for l in range(model.cfg.n_layers)] + ["final_post"]
    assert (lens.values[-1, 0] - logits[0, -1]).abs().max() < 1e-5


def test_hook_result_per_head_sums_to_attn_out(run):
    model, logits, _ = run
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            again, cache = model.run_with_cache(**INPUTS, names_filter=lambda n: n.startswith("blocks.1."))
    finally:
        model.set_use_attn_result(False)
    result = cache["blocks.1.attn.hook_result"]
    assert result.shape == (*INPUTS["input_ids"].shape, model.cfg.n_heads, model.cfg.d_model)
    assert (result.sum(2) + model.blocks[1].attn.b_O - cache["blocks.1.hook_attn_out"]).abs().max() < 1e-5
    assert (again - logits).abs().max() < 1e-5
