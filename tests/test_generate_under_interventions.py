"""Mask edits hold during generation: `model.generate` (greedy, KV cache) under `block_attention` or
`discard` built from the prompt's TokenMap equals, step by step, a forward without a cache of the prompt
extended by hand with the tokens generated so far, under the same edit built from `tm.extend(j)`
(identical tokens; fp64 logits within 1e-10, fp32 within 1e-4: in fp32 the cached and uncached runs
differ by rounding alone, up to 9e-6 without any edit and 4e-5 with one, while fp64 agrees to 1e-14),
on the toy model and a left-padded batch of two. A
`block_attention` to `"last"` holds for generated queries by default (`generated="as_last"`: the oracle
names `"last|generated"`) and only where dst names `"generated"` under `generated="by_group"` (the oracle
names `"last"`). `steer` (on the scores, some heads) holds the same way. Maps that do not fit the run are
refused."""

from __future__ import annotations

import pytest
import torch

import hooked_av
from hooked_av.toy import make_batch
from patching.engine.hooks import ablate, add_noise, block_attention, discard, patch_from_cache, steer

torch.set_num_threads(1)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
STEPS = 3


def load(dtype):
    model = hooked_av.load("toy", dtype=dtype)
    inputs = make_batch(2, 0, model.tokenizer, n_clips=20, kinds=("auditory", "two_clip")).inputs
    tm = model.token_map(inputs)
    assert tm.padding[0].any() and not tm.padding[1].any()  # row 0 is left-padded
    return model, inputs, tm


@pytest.fixture(scope="module")
def setup():
    return load(torch.float64)


def generate_with_logits(model, inputs, hooks) -> tuple[torch.Tensor, torch.Tensor]:
    """`(tokens [batch, STEPS], logits [batch, STEPS, vocab])` of `model.generate` under `hooks`; each
    step's logits are the unembedded final-norm output of its last position."""
    seen = []

    def keep(t, hook):
        seen.append(t[:, -1].clone())

    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, ("ln_final.hook_normalized", keep)]):
        tokens = model.generate(**inputs, max_new_tokens=STEPS)
    with torch.no_grad():
        return tokens, model.unembed(torch.stack(seen[:STEPS], 1))


def by_hand(model, inputs, tm, tokens, build) -> torch.Tensor:
    """Logits `[batch, STEPS, vocab]`: step j runs the prompt + `tokens[:, :j]` whole (no cache) under
    `build(tm.extend(j))` and reads its last position."""
    out = []
    for j in range(STEPS):
        ext = dict(inputs)
        ext["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, :j]], 1)
        ext["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(len(tokens), j)], 1)
        with torch.no_grad(), model.hooks(fwd_hooks=build(tm.extend(j)).check(model)):
            out.append(model(**ext)[:, -1])
    return torch.stack(out, 1)


CASES = {  # name: (the edit on the prompt's map, the same edit on tm.extend(j) for the oracle)
    "block_as_last": (lambda tm: block_attention(tm, "audio", "last", range(4)),
                      lambda tm: block_attention(tm, "audio", "last|generated", range(4))),
    "block_by_group": (lambda tm: block_attention(tm, "audio", "last", range(4), generated="by_group"),
                       lambda tm: block_attention(tm, "audio", "last", range(4))),
    "block_question_to_generated": (lambda tm: block_attention(tm, "question", "generated", [1, 2], generated="by_group"),
                                    # by_group here too: on tm.extend(0) the set is only the tokens to come
                                    lambda tm: block_attention(tm, "question", "generated", [1, 2], generated="by_group")),
    "discard": (lambda tm: discard(tm, "audio", 1),
                lambda tm: discard(tm, "audio", 1)),
    "steer_as_last": (lambda tm: steer(tm, "last", "audio", 0.8, range(4), heads=[0, 2]),
                      lambda tm: steer(tm, "last|generated", "audio", 0.8, range(4), heads=[0, 2])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_equals_the_prompt_extended_by_hand(setup, case):
    check_case(*setup, case)


def test_in_fp32_too():
    check_case(*load(torch.float32), "block_as_last")


def check_case(model, inputs, tm, case):
    on_prompt, on_extended = CASES[case]
    tokens, logits = generate_with_logits(model, inputs, on_prompt(tm).check(model))
    assert tokens.shape == (2, STEPS)
    ref = by_hand(model, inputs, tm, tokens, on_extended)
    err = (logits - ref).abs().max().item()
    print(f"{case} {logits.dtype}: max |generate - by hand| = {err:.2e}, tokens {tokens.tolist()}")
    assert err < TOL[logits.dtype]
    assert torch.equal(ref.argmax(-1), tokens)


def test_the_edits_change_generation(setup):
    """The cases above are not no-ops: each changes the generated logits, and `as_last` differs from
    `by_group` after the first step (where only the generated queries tell them apart)."""
    model, inputs, tm = setup
    _, plain = generate_with_logits(model, inputs, [])
    got = {c: generate_with_logits(model, inputs, CASES[c][0](tm).check(model))[1] for c in CASES}
    for c, logits in got.items():
        assert (logits - plain).abs().max() > 1e-3, c
    step0 = (got["block_as_last"][:, 0] - got["block_by_group"][:, 0]).abs().max()
    later = (got["block_as_last"][:, 1:] - got["block_by_group"][:, 1:]).abs().max()
    assert step0 < TOL[step0.dtype] and later > 1e-3


def test_maps_that_do_not_fit_are_refused(setup):
    model, inputs, tm = setup
    short = tm.extend(0)
    longer = dict(inputs, input_ids=torch.cat([inputs["input_ids"], inputs["input_ids"][:, -1:]], 1),
                  attention_mask=torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1))
    # a whole forward longer than the map: its queries start inside the map, so they are not generated
    with torch.no_grad(), model.hooks(fwd_hooks=block_attention(short, "audio", "last", [0]).check(model)):
        with pytest.raises(ValueError, match=f"the TokenMap has {tm.seq_len} positions, the attention sees {tm.seq_len + 1} keys"):
            model(**longer)
    # a map longer than the run
    with torch.no_grad(), model.hooks(fwd_hooks=discard(tm.extend(2), "audio", 1).check(model)):
        with pytest.raises(ValueError, match=f"the TokenMap has {tm.seq_len + 2} positions"):
            model.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match="generated must be one of"):
        block_attention(tm, "audio", "last", [0], generated="last")


def _prompt_only(tm):
    """bool `[batch, pos]`: every position of `tm` that is not a generated token."""
    return ~tm.select("generated").mask


ACTIVATION_CASES = {  # positions are the prompt's: the prefill is edited, the generated tokens are not
    "ablate_at_20": (lambda tm: ablate(["blocks.1.hook_resid_pre"], positions=[20]),
                     lambda tm: ablate(["blocks.1.hook_resid_pre"], positions=[20])),
    "ablate_everywhere": (lambda tm: ablate(["blocks.2.hook_mlp_out"]),
                          lambda tm: ablate(["blocks.2.hook_mlp_out"], positions=_prompt_only(tm))),
    "ablate_a_head_at_the_audio": (lambda tm: ablate(["blocks.0.attn.hook_z"], positions=tm.select("audio"), heads=[1]),
                                   lambda tm: ablate(["blocks.0.attn.hook_z"], positions=tm.select("audio"), heads=[1])),
    "noise_on_the_embeddings": (lambda tm: add_noise("hook_embed", None, std=0.3, seed=2),
                                lambda tm: add_noise("hook_embed", _prompt_only(tm), std=0.3, seed=2)),
    "noise_at_the_video": (lambda tm: add_noise("hook_embed", tm.select("video"), std=0.3, seed=2),
                           lambda tm: add_noise("hook_embed", tm.select("video"), std=0.3, seed=2)),
}


@pytest.mark.parametrize("case", sorted(ACTIVATION_CASES))
def test_activation_edits_act_on_the_prompt_under_generation(setup, case):
    # ablate(positions=[20]) failed at step 2 ("out of range for 1 positions"); positions=None zeroed each
    # generated token and add_noise gave every generated token position 0's noise
    model, inputs, tm = setup
    on_prompt, on_extended = ACTIVATION_CASES[case]
    tokens, logits = generate_with_logits(model, inputs, on_prompt(tm).check(model))
    ref = by_hand(model, inputs, tm, tokens, on_extended)
    assert (logits - ref).abs().max().item() < TOL[logits.dtype]
    assert torch.equal(ref.argmax(-1), tokens)
    _, plain = generate_with_logits(model, inputs, [])
    assert (logits - plain).abs().max() > 1e-3  # the edit is not a no-op


def test_patching_from_a_prompts_cache_runs_under_generation(setup):
    # it failed at the first decoding step: the prompt's cache has no generated position
    model, inputs, tm = setup
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=["blocks.1.hook_resid_pre"])
    iv = patch_from_cache({"blocks.1.hook_resid_pre": cache["blocks.1.hook_resid_pre"].flip(0)}, ["blocks.1.hook_resid_pre"])
    tokens, logits = generate_with_logits(model, inputs, iv.check(model))
    with torch.no_grad(), model.hooks(fwd_hooks=iv.check(model)):
        first = model(**inputs)[:, -1]
    assert (logits[:, 0] - first).abs().max() < TOL[first.dtype] and tokens.shape == (2, STEPS)
