"""Adaptive guided decoding as the cross-modal-hub paper runs it (`kaistmm/crossmodal-hub`,
`logic/adaptive_guidance_complex.py::GuidanceLogits`): the reference below is a batch-1 loop written
from that class (the plain run's attentions of every layer, the text mass after the last media token,
w from the av/va and aa/vv sink means over the target layers, the 0.6 cap, the cosine decay, the
(w/0.6)^2 gate, momentum 0.5, strength 0 on the first step), on the toy model with sinks given
explicitly. `guided_generate` runs a left-padded batch of the same prompts in one call."""

import math

import pandas as pd
import pytest
import torch

import hooked_av
from hooked_av import toy
from patching.methods.guidance import AdaptiveScale, guided_generate, hub_layers
from patching.engine.hooks import block_attention
from patching.engine.results import Result
from patching.engine.token_sets import TokenSet

torch.set_num_threads(1)
STEPS = 6
CROSS = (("audio", slice(0, 3)), ("video", slice(0, 1)))  # the planted sets: av_sink, va_sink
UNI = (("audio", slice(3, None)), ("video", slice(1, None)))  # aa_sink, vv_sink


@pytest.fixture(scope="module")
def setup():
    model = hooked_av.load("toy")
    bank = toy.make_clips(32, seed=31)
    drawn = toy.draw_samples(bank, 4, seed=32)
    batch = toy.collate(bank, drawn, model.tokenizer)
    singles = [toy.collate(bank, [s], model.tokenizer).inputs for s in drawn]
    return model, batch, singles


def sets(spec):
    return [TokenSet(f"{g}{sl}", lambda tm, s, g=g, sl=sl: tm.positions(g)[sl].tolist()) for g, sl in spec]


def no_audio(model):
    return lambda tm: block_attention(tm, "audio", tm.select("all") - tm.select("audio"), range(model.cfg.n_layers))


def hub_reference(model, inputs, base, target_layers, steps=STEPS):
    """GuidanceLogits.__call__ inside a greedy loop, batch 1, whole-sequence forwards: the scales per
    step and the tokens. Guide: non-audio queries may not read audio keys (on the additive mask)."""
    ids = inputs["input_ids"][0]
    audio_idx = (ids == model.ids.audio).nonzero()[:, 0].tolist()
    video_idx = (ids == model.ids.video).nonzero()[:, 0].tolist()
    by = {"audio": audio_idx, "video": video_idx}
    av, va = (by[g][sl] for g, sl in CROSS)
    aa, vv = (by[g][sl] for g, sl in UNI)
    text_token_start = max(max(video_idx), max(audio_idx)) + 1
    audio = torch.zeros(len(ids), dtype=torch.bool)
    audio[audio_idx] = True

    def guide(mask, hook):
        n = mask.shape[-1]
        a = torch.cat([audio, torch.zeros(n - len(audio), dtype=torch.bool)])
        return mask.masked_fill(~a[:, None] & a[None, :], torch.finfo(mask.dtype).min)

    names = [f"blocks.{l}.attn.hook_pattern" for l in target_layers]  # the hub reads attentions[li] of these
    prev_strength, scales, tokens = 0.0, [], []
    x = dict(inputs)
    for step in range(steps):
        with torch.no_grad():
            logits, cache = model.run_with_cache(**x, names_filter=names)
            guided = model.run_with_hooks(**x, fwd_hooks=[(f"blocks.{l}.attn.hook_attn_mask", guide)
                                                          for l in range(model.cfg.n_layers)])
        if step == 0:
            strength = 0.0
        else:
            last = [cache[f"blocks.{li}.attn.hook_pattern"][:, :, -1, :] for li in target_layers]
            text_mass = sum(a[:, :, text_token_start:].sum(-1).mean().item() for a in last) / len(last)
            cross = sum(a[:, :, av].mean().item() for a in last) + sum(a[:, :, va].mean().item() for a in last)
            uni = sum(a[:, :, aa].mean().item() for a in last) + sum(a[:, :, vv].mean().item() for a in last)
            w = cross / (cross + uni + 1e-8)
            target = min(0.6, base * w)
            if text_mass > 0.4:
                ratio = min(1.0, (text_mass - 0.4) / 0.2)
                target *= 0.5 * (1 + math.cos(ratio * math.pi))
            if w < 0.6:
                target *= max(0.0, (w / 0.6) ** 2)
            strength = 0.5 * prev_strength + 0.5 * target
            prev_strength = strength
        lp, lg = logits[0, -1].log_softmax(-1), guided[0, -1].log_softmax(-1)
        nxt = int((lp + strength * (lg - lp)).argmax())
        scales.append(strength)
        tokens.append(nxt)
        x["input_ids"] = torch.cat([x["input_ids"], torch.tensor([[nxt]])], 1)
        x["attention_mask"] = torch.cat([x["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    return scales, tokens


def test_hub_layers_scale_the_hubs_range_to_the_depth():
    assert hub_layers(28) == list(range(18, 26))
    assert hub_layers(4) == [3] and hub_layers(36) == list(range(23, 33)) and hub_layers(1) == [0]


@pytest.mark.parametrize("base", [0.5, 4.0])
def test_adaptive_scale_equals_the_hubs_loop(setup, base):
    """Per-step scales (1e-6) and tokens of a padded batch equal the batch-1 reference of each prompt.
    base 0.5 is the hub driver's default; 4.0 reaches the 0.6 cap, the text-mass decay and the gate."""
    model, batch, singles = setup
    scale = AdaptiveScale(sets(CROSS), sets(UNI), base=base)
    got = guided_generate(model, batch.inputs, no_audio(model), scale=scale, max_new_tokens=STEPS)
    rec = scale.records()
    assert scale.layers == [3] and len(rec) == STEPS * len(singles)
    for r, single in enumerate(singles):
        ref_scales, ref_tokens = hub_reference(model, single, base, scale.layers)
        mine = rec[rec.row == r].sort_values("step")
        assert mine.scale.tolist() == pytest.approx(ref_scales, abs=1e-6), r
        assert got[r].tolist() == ref_tokens, r
    later = rec[rec.step > 0]
    assert (rec[rec.step == 0].scale == 0).all() and (later.scale > 0).all()
    if base == 4.0:  # every branch of the schedule is taken in this run
        assert (later.target == 0.6).any() and (later.text_mass > 0.4).any() and (later.weight < 0.6).any()
        plain = guided_generate(model, batch.inputs, no_audio(model), scale=0.0, max_new_tokens=STEPS)
        assert int((got != plain).sum()) == 3  # guidance changes tokens ...
        assert torch.equal(got[:, 0], plain[:, 0])  # ... but never the first


def test_the_first_token_is_not_guided_where_a_constant_scale_guides_it(setup):
    """The earlier behaviour (a scale from the first token on) changes first tokens of this batch;
    the hub's schedule leaves them to the plain model."""
    model, batch, _ = setup
    plain = guided_generate(model, batch.inputs, no_audio(model), scale=0.0, max_new_tokens=1)
    constant = guided_generate(model, batch.inputs, no_audio(model), scale=1.0, max_new_tokens=1)
    adaptive = guided_generate(model, batch.inputs, no_audio(model), scale=AdaptiveScale(sets(CROSS), sets(UNI)),
                               max_new_tokens=1)
    assert not torch.equal(constant, plain) and torch.equal(adaptive, plain)


def test_from_sinks_takes_the_cross_modal_and_unimodal_sinks_of_each_modality(setup):
    """A find_sinks result (positions without padding) gives the same schedule as the sets named by hand."""
    model, batch, _ = setup
    tm = model.token_map(batch.inputs)
    rows = []
    for r in range(tm.batch):
        real = ~tm.padding[r]
        where = {g: (tm.mask(g)[r][real]).nonzero()[:, 0].tolist() for g in ("audio", "video")}
        for (g, sl), cross in [(c, True) for c in CROSS] + [(u, False) for u in UNI]:
            rows += [dict(sample=r, modality=g, pos=p, cross_modal=cross) for p in where[g][sl]]
    res = Result("sinks", pd.DataFrame(rows))
    by_hand, found = AdaptiveScale(sets(CROSS), sets(UNI), base=4.0), AdaptiveScale.from_sinks(res, base=4.0)
    a = guided_generate(model, batch.inputs, no_audio(model), scale=by_hand, max_new_tokens=3)
    b = guided_generate(model, batch.inputs, no_audio(model), scale=found, max_new_tokens=3)
    assert torch.equal(a, b) and by_hand.records().equals(found.records())
    assert (found.records().scale > 0).sum() == 2 * tm.batch


def test_adaptive_scale_refuses_empty_sets_and_prompts_without_media(setup):
    model, batch, _ = setup
    empty = [TokenSet("none", lambda tm, s: [])]
    with pytest.raises(ValueError, match=r"cross sink set 'none' is empty in prompt 0: the hub's head-and-sink mean"):
        guided_generate(model, batch.inputs, no_audio(model), scale=AdaptiveScale(empty, sets(UNI)))
    with pytest.raises(ValueError, match=r"unimodal sink sets is empty"):
        AdaptiveScale(sets(CROSS), [])
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        AdaptiveScale(sets(CROSS), sets(UNI), momentum=1.5)
    with pytest.raises(ValueError, match=r"gate must be a finite number >= 0, got nan"):
        AdaptiveScale(sets(CROSS), sets(UNI), gate=math.nan)
    with pytest.raises(ValueError, match=r"layer\(s\) \[4\] out of range; the model has 4 layers"):
        guided_generate(model, batch.inputs, no_audio(model), scale=AdaptiveScale(sets(CROSS), sets(UNI), layers=[4]))
    text_only = {"input_ids": batch.inputs["input_ids"][:1, -6:], "attention_mask": batch.inputs["attention_mask"][:1, -6:]}
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] hold no media token"):
        guided_generate(model, text_only, no_audio(model), scale=AdaptiveScale(sets(CROSS), sets(UNI)))
