"""`model(**inputs, stop_at_layer=k)` as TransformerLens's, on every family: the residual stream entering
block k (equal to the full run's `blocks.{k}.hook_resid_pre`, the last block's `hook_resid_post` for
k = n_layers, the embeddings for k = 0; negative k counts from the end), with no block from k on, no
final norm and no unembedding run; what cannot apply with it is refused before any work."""

from __future__ import annotations

import pytest
import torch
from family_cases import NAMES, family

torch.set_num_threads(1)


@pytest.mark.parametrize("name", NAMES)
def test_stop_at_layer_returns_the_residual_entering_that_block_and_runs_nothing_after(name):
    model, inputs = family(name)
    n = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda h: h.endswith(("hook_resid_pre", "hook_resid_post")))
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(model.blocks)]
    handles += [m.register_forward_pre_hook(lambda m, a, w=w: ran.append(w)) for w, m in
                (("ln_final", model.ln_final), ("unembed", model.unembed))]
    try:
        for k in (0, 1, n - 1, n, -1):
            ran.clear()
            with torch.no_grad():
                out = model(**inputs, stop_at_layer=k)
            stop = k % n if k < 0 else k
            want = cache[f"blocks.{n - 1}.hook_resid_post"] if stop == n else cache[f"blocks.{stop}.hook_resid_pre"]
            torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
            assert ran == list(range(stop)), (k, ran)  # blocks before k only; no final norm, no unembedding
    finally:
        for h in handles:
            h.remove()


def test_stop_at_layer_refuses_what_cannot_apply_before_any_work():
    model, inputs = family("qwen2_5_omni")
    n = model.cfg.n_layers
    ran = []
    handle = model.audio_encoder.register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        for kwargs, message in [(dict(stop_at_layer=n + 1), rf"stop_at_layer {n + 1}: the model has {n} blocks"),
                                (dict(stop_at_layer=-n - 1), "the model has"),
                                (dict(stop_at_layer=1.5), "must be an integer"),
                                (dict(stop_at_layer=True), "must be an integer"),
                                (dict(stop_at_layer=1, logits_at="last"), "do not apply"),
                                (dict(stop_at_layer=1, return_type="resid"), "do not apply")]:
            with pytest.raises(ValueError, match=message):
                model(**inputs, **kwargs)
    finally:
        handle.remove()
    assert ran == []  # refused before the towers ran
    enc = model.encode(**inputs)
    with pytest.raises(ValueError, match="caches empty"):
        model.run_language_model(enc["inputs_embeds"], enc["position_ids"], kv_caches=model.empty_kv_caches(),
                                 stop_at_layer=1)
    with pytest.raises(ValueError, match="comes before start_layer"):
        model.run_language_model(enc["inputs_embeds"], enc["position_ids"], start_layer=2, stop_at_layer=1)
