"""The patching library on HookedVideoSALMONN2, using only hook names, the TokenMap and public
methods: a knockout sweep equals the same edits made by hand through hook_attn_mask."""

import pytest
import salmonn_helpers as H
import torch
from test_salmonn_inputs import salmonn_tokenizer, write_mp4

from hooked_av import HookedVideoSALMONN2
from hooked_av.core.masks import neg_inf
from patching.methods.discarding import physical_forward
from patching.engine.hooks import discard
from patching.methods.knockout import knockout, window_layers
from patching.engine.sweep import samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = HookedVideoSALMONN2.from_config(H.Reference(seed=0).salmonn_config())
    model.tokenizer = salmonn_tokenizer()
    clip = write_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=2.0, fps=10)
    inputs = model.prepare("What makes the sound?", video=clip)
    tm = model.token_map(inputs)
    with torch.no_grad():
        answer = int(model(**inputs)[0, -1].argmax())
    return model, inputs, tm, answer


def test_knockout_on_salmonn_equals_hand_made_mask_edits(setup):
    model, inputs, tm, answer = setup
    L = model.cfg.n_layers
    res = knockout(model, inputs, [answer], edges=["audio->last", "video->question"], window=3, tm=tm, progress=False).df
    assert len(res) == 2 * L
    audio, last = tm.mask("audio")[0], tm.mask("last")[0]
    with torch.no_grad():
        p_orig = model(**inputs)[0, -1].softmax(-1)[answer]
    for centre in (0, L - 1):
        layers = list(window_layers(centre, 3, L))

        def cut(mask, hook):
            mask[:, :, last.nonzero()[:, 0][:, None], audio.nonzero()[:, 0][None, :]] = neg_inf(mask.dtype)
            return mask

        with torch.no_grad():
            logits = model.run_with_hooks(**inputs, fwd_hooks=[(f"blocks.{l}.attn.hook_attn_mask", cut) for l in layers])
        p = logits[0, -1].softmax(-1)[answer]
        row = res[(res.edge == "audio->last") & (res.layer == centre)]
        got = float(row.iloc[0]["rel_change"])
        assert abs(got - float((p - p_orig) / p_orig * 100)) < 1e-3


def test_physical_discarding_on_salmonn_equals_mask_discarding(setup):
    model, inputs, tm, _ = setup
    sample = samples(model, inputs, tm)[0]
    with torch.no_grad():
        physical = physical_forward(model, sample, "audio", from_layer=1)
        masked = model.run_with_hooks(**inputs, fwd_hooks=discard(tm, "audio", from_layer=1, n_layers=model.cfg.n_layers))
    assert physical.shape == (1, masked.shape[-1])
    assert (physical[0] - masked[0, -1]).abs().max() < 1e-5
    assert (physical[0] - model(**inputs)[0, -1]).abs().max() > 1e-4
