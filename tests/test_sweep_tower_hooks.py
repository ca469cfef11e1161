"""A sweep runs the language model on embeddings its `samples` encoded, never the towers: an intervention
hooking a tower, a tower's output (`hook_audio_embeds`, ...), or such a hook already active on the model
that the sample was not encoded under, did nothing (the clean logits came back). Each is refused before any
forward, on every family and every hook point outside the language model; a hook active while `samples`
encodes is in the sample, and the sweep then equals the whole forward under that hook."""

from __future__ import annotations

import pytest
import torch
from family_cases import NAMES, family

from patching.engine.hooks import ablate, block_attention
from patching.engine.intervention import Intervention
from patching.engine.sweep import encode, run_rows, samples

LANGUAGE_MODEL = ("hook_embed", "blocks", "ln_final", "unembed")  # what run_language_model runs


def outside_points(model) -> list[str]:
    return [n for n in model.hook_dict if n.split(".")[0] not in LANGUAGE_MODEL]


def zero(act, hook):
    return torch.zeros_like(act)


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    model, inputs = family(request.param)
    return request.param, model, inputs


def test_every_point_outside_the_language_model_is_refused_in_an_intervention(case, monkeypatch):
    name, model, inputs = case
    points = outside_points(model)
    towers = {"audio_encoder", "vision_encoder"} | ({"audio_qformer"} if name == "video_salmonn2" else set())
    assert {"hook_audio_embeds", "hook_image_embeds", "hook_video_embeds"} <= set(points)
    assert towers <= {p.split(".")[0] for p in points}
    assert not any(p.startswith(("blocks.", "ln_final")) or p == "hook_embed" for p in points)
    s = samples(model, inputs)[0]
    ran = []
    monkeypatch.setattr(model, "run_language_model", lambda *a, **k: ran.append(1))
    for point in points:
        with pytest.raises(ValueError, match=r"outside the language model; a sweep runs the language model on "
                                             r"embeddings the towers made"):
            run_rows(model, s, [block_attention(s.tm, "question", "last", [0]), ablate([point])], progress=False)
    # a name filter that reaches a tower point
    filt = Intervention()
    filt._pairs = [(lambda n: n.endswith("hook_audio_embeds"), zero)]
    with pytest.raises(ValueError, match=r"hooks \['hook_audio_embeds'\], outside the language model"):
        run_rows(model, s, [filt], progress=False)
    assert not ran  # refused before any forward


def test_a_tower_hook_already_on_the_model_is_refused_unless_the_sample_was_encoded_under_it(case):
    name, model, inputs = case
    point = "hook_audio_embeds"
    with torch.no_grad():
        whole = model.run_with_hooks(**inputs, fwd_hooks=[(point, zero)])[:, -1]
        clean = model(**inputs)[:, -1]
    assert (whole - clean).abs().max() > 1e-3  # the edit matters
    plain = samples(model, inputs)
    with model.hooks(fwd_hooks=[(point, zero)]):
        with pytest.raises(ValueError, match=r"hook\(s\) active on \['hook_audio_embeds'\], outside the language model, "
                                             r"were not active when the sample was encoded"):
            run_rows(model, plain[0], [Intervention()], progress=False)
        encoded = samples(model, inputs)
        inside = [run_rows(model, s, [Intervention()], progress=False)[0] for s in encoded]
        # inputs encoded without the hook would not run the towers again; encoded under it (patching's encode
        # remembers), they carry its edit, as a study's experiments get them
        with pytest.raises(ValueError, match=r"the inputs were encoded without them"):
            samples(model, model.encode(**inputs), tm=model.token_map(inputs))
        enc = encode(model, inputs)
        again = samples(model, enc, tm=model.token_map(inputs))
        assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(again, encoded))
    with pytest.raises(ValueError, match=r"the inputs were encoded without them"):
        with model.hooks(fwd_hooks=[("hook_video_embeds", zero)]):  # another hook than the one encoded under
            samples(model, enc, tm=model.token_map(inputs))
    outside = [run_rows(model, s, [Intervention()], progress=False)[0] for s in encoded]
    for s, a, b in zip(encoded, inside, outside):
        torch.testing.assert_close(a, whole[s.index], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, whole[s.index], atol=1e-4, rtol=1e-4)
    # a torch hook on a tower module counts too
    handle = model.audio_encoder.register_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(ValueError, match=r"hook\(s\) active on \['audio_encoder'\]"):
            run_rows(model, plain[0], [Intervention()], progress=False)
    finally:
        handle.remove()


def test_hook_pairs_are_refused_by_name_not_at_on_rows(case):
    # a list of (name, fn) pairs failed inside run_rows with "'list' object has no attribute 'on_rows'"
    _, model, inputs = case
    s = samples(model, inputs)[0]
    with pytest.raises(TypeError, match=r"takes Intervention objects \(they know their rows\); got \[\(1, 'list'\)\]"):
        run_rows(model, s, [Intervention(), [("blocks.0.hook_resid_post", zero)]], progress=False)
