"""Read-outs in bounded memory: `attention_rows` equals the rows of the full pattern (the exact path's
`hook_pattern`, fp32, 1e-6) on both families, a left-padded batch and the Qwen3 recipe, under a knockout
too; `group_attention_mass` (query blocks, no pattern hook) equals the reduction of the full patterns."""

from __future__ import annotations

import pytest
import salmonn_helpers as H
import torch
from test_patching_common import av_inputs, tiny_pair, token_map
from test_recipe_qwen3_text import mm_positions, pair
from test_salmonn_inputs import salmonn_tokenizer, write_mp4

from hooked_av import HookedVideoSALMONN2
from hooked_av.viz.attention_mass import group_attention_mass
from patching.engine.hooks import block_attention

torch.set_num_threads(1)
TOL = 1e-6


def full_rows(model, inputs, rows, layers, hooks=()):
    """Reference: the exact path's whole patterns, then the rows of each batch row."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(**inputs, names_filter=names, return_type=None)
    out = []
    for n in names:
        p = cache[n]
        out.append(torch.stack([p[b][:, rows[b]] for b in range(p.shape[0])]))
    return torch.stack(out)


@pytest.fixture(scope="module")
def omni():
    _, model = tiny_pair()
    inputs = av_inputs(6, 7)  # left-padded batch of two
    assert not bool(inputs["attention_mask"].all())
    return model, inputs, token_map(model, inputs)


def test_rows_equal_the_full_pattern_on_a_left_padded_batch(omni):
    model, inputs, tm = omni
    n = model.cfg.n_layers
    got = model.attention_rows(inputs, "last", tm=tm)
    s = inputs["input_ids"].shape[1]
    assert got.shape == (n, 2, model.cfg.n_heads, 1, s)
    torch.testing.assert_close(got, full_rows(model, inputs, [[s - 1]] * 2, range(n)), atol=TOL, rtol=0)
    some = model.attention_rows(inputs, [5, -1, 20], layers=[1, 4], heads=[3, 0], tm=tm)
    ref = full_rows(model, inputs, [[5, s - 1, 20]] * 2, [1, 4])[:, :, [3, 0]]
    torch.testing.assert_close(some, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_5_omni", "video_salmonn2", "qwen3_omni"])
def test_int_queries_keep_their_order_and_repeats_and_a_mask_reads_in_order(name):
    # queries=[10, 2] returned rows 2, 10 and [5, 5] one row; logits_at keeps both, so must this
    from family_cases import family

    model, inputs = family(name)
    s = inputs["input_ids"].shape[1]
    for queries, rows in (([10, 2], [10, 2]), ([5, 5], [5, 5]), ([-1, 3, -1, 0], [s - 1, 3, s - 1, 0]),
                          (torch.tensor([7, 4]), [7, 4])):
        got = model.attention_rows(inputs, queries, layers=[0, 1])
        assert got.shape[3] == len(rows)
        torch.testing.assert_close(got, full_rows(model, inputs, [rows] * got.shape[1], [0, 1]), atol=TOL, rtol=0)
    mask = torch.zeros(s, dtype=torch.bool)
    mask[[9, 3]] = True
    torch.testing.assert_close(model.attention_rows(inputs, mask, layers=[1]),
                               full_rows(model, inputs, [[3, 9]] * inputs["input_ids"].shape[0], [1]), atol=TOL, rtol=0)


def test_rows_under_a_knockout_are_those_of_the_edited_pattern(omni):
    model, inputs, tm = omni
    cut = block_attention(tm, "audio", "last", [1, 2])
    with model.hooks(fwd_hooks=cut):
        got = model.attention_rows(inputs, "last", tm=tm)
    s = inputs["input_ids"].shape[1]
    torch.testing.assert_close(got, full_rows(model, inputs, [[s - 1]] * 2, range(model.cfg.n_layers), cut),
                               atol=TOL, rtol=0)
    audio = tm.mask("audio")
    assert float(got[1][audio[None, :, None, None, :].expand_as(got[1:2])[0]].abs().max()) == 0  # knocked out
    assert float(model.attention_rows(inputs, "last", layers=[1], tm=tm)[0][audio[:, None, None, :].expand(
        -1, model.cfg.n_heads, 1, -1)].sum()) > 0  # and only under the hooks


def test_rows_on_salmonn_and_the_qwen3_recipe(tmp_path):
    torch.manual_seed(0)
    model = HookedVideoSALMONN2.from_config(H.Reference(seed=0).salmonn_config())
    model.tokenizer = salmonn_tokenizer()
    inputs = model.prepare("What makes the sound?", video=write_mp4(tmp_path / "c.mp4", seconds=2.0, fps=10))
    tm = model.token_map(inputs)
    q = tm.mask("question")[0].nonzero()[:, 0].tolist()
    got = model.attention_rows(inputs, "question", layers=[0, model.cfg.n_layers - 1], tm=tm)
    torch.testing.assert_close(got, full_rows(model, inputs, [q], [0, model.cfg.n_layers - 1]), atol=TOL, rtol=0)

    _, lm, _ = pair(6)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    kw = dict(inputs_embeds=torch.randn(2, 9, lm.cfg.d_model), position_ids=mm_positions(2, 9), attention_mask=mask)
    rows = torch.zeros(9, dtype=torch.bool)
    rows[[4, 8]] = True
    torch.testing.assert_close(lm.attention_rows(kw, rows), full_rows(lm, kw, [[4, 8]] * 2, range(3)), atol=TOL, rtol=0)


def test_rows_refuse_what_they_cannot_read(omni):
    model, inputs, tm = omni
    with pytest.raises(ValueError, match="same number"):
        model.attention_rows(inputs, "question", tm=tm)  # 2 and 3 question tokens in the two rows
    with pytest.raises(ValueError, match="layers"):
        model.attention_rows(inputs, "last", layers=[model.cfg.n_layers], tm=tm)
    with pytest.raises(ValueError, match="query heads"):
        model.attention_rows(inputs, "last", heads=[model.cfg.n_heads], tm=tm)


@pytest.mark.parametrize("block_rows", [7, 256])
def test_group_mass_equals_the_reduction_of_full_patterns(omni, block_rows):
    model, inputs, tm = omni
    groups = ("template", "audio", "video", "question", "last")
    df = group_attention_mass(model, inputs, tm, groups=groups, layers=[0, 3], per_head=True, block_rows=block_rows)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"), return_type=None)
    for r in df.sample(12, random_state=0).itertuples():
        p = cache[f"blocks.{r.layer}.attn.hook_pattern"][:, r.head]  # [batch, q, k]
        dst, src = tm.mask(r.dst).float(), tm.mask(r.src).float()
        per_row = torch.einsum("bqk,bq,bk->b", p, dst, src) / dst.sum(-1).clamp(min=1)
        both = (dst.sum(-1) > 0) & (src.sum(-1) > 0)
        assert abs(float(per_row[both].mean()) - r.mass) < 1e-5


def test_run_with_cache_moves_activations_to_the_device_asked(omni):
    # each activation is moved as it is made (the forward itself runs on the model's device and its logits are
    # unchanged, up to the exact path); "meta", which stood for another device here, is refused now: its cache
    # held no values (test_refused_before_the_towers.py)
    model, inputs, _ = omni
    names = ["blocks.0.hook_resid_post", "audio_encoder.hook_out", "blocks.1.attn.hook_pattern"]
    with torch.no_grad():
        ref = model(**inputs)
        out, cache = model.run_with_cache(**inputs, names_filter=names, device="cpu")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # a read pattern takes the exact path
    if torch.cuda.is_available():
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=names, device="cuda")
        assert {cache[n].device.type for n in names} == {"cuda"}
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=names, device="cpu", return_type=None)
    assert {cache[n].device.type for n in names} == {"cpu"}


def test_group_mass_checks_its_layers_and_map_before_the_forward(omni):
    from hooked_av.viz import group_attention_mass

    model, inputs, tm = omni
    L = model.cfg.n_layers
    for bad in ([L], [-1], []):
        with pytest.raises(ValueError, match="name at least one of the model's"):
            group_attention_mass(model, inputs, tm, layers=bad)
    other = model.token_map({k: (v[:, :-1] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()})
    with pytest.raises(ValueError, match="build it from the same inputs"):
        group_attention_mass(model, inputs, other)
