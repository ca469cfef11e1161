"""Harvesting activations (`patching.apps.harvest`): on every family, the stored activations and token
metadata equal a naive loop (a whole-model `run_with_cache`, positions picked from the TokenMap's own
table); no block past the last hooked one, no final norm or unembedding runs, and the towers run once;
from a manifest, the store equals the naive loop over its prepared samples and keeps each sample's media
and question; a resumed harvest equals an uninterrupted one; `max_tokens` stops after the sample that
reaches it; bad input is refused before the model loads (an unknown hook before any sample runs)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from family_cases import NAMES, family

from hooked_av.toy.dataset import write_toy_dataset
from patching.apps import harvest as harvest_module
from patching.apps.harvest import harvest, harvest_inputs
from patching.datasets.activations import ActivationStore
from patching.datasets.manifest import ManifestError, read_manifest
from patching.datasets.templates import parse_template

torch.set_num_threads(1)
MEDIA = {"audio", "video", "image"}
HOOKS = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed"]  # the toy has 4 blocks


def naive(model, inputs, hooks, groups: set[str], tm=None):
    """Per batch row `(acts, meta)` from a plain whole forward's cache, the positions of `groups` read off
    `TokenMap.to_df()` (the names spelled out: no alias resolved by the code under test)."""
    routers = [h for h in model.hook_dict if h.endswith("mlp.hook_router_choice")]
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=list(hooks) + routers)
    df = (tm or model.token_map(inputs)).to_df()
    out = []
    for r in range(int(df["row"].max()) + 1):
        sel = df[(df["row"] == r) & df["group"].isin(groups)].reset_index(drop=True)
        pos = torch.as_tensor(sel["pos"].to_numpy())
        acts = {h: cache[h][r, pos].reshape(len(pos), -1) for h in hooks}
        hooked_layers = {int(h.split(".")[1]) for h in hooks if h.startswith("blocks.")}
        meta = pd.DataFrame({"pos": sel["pos"], "group": sel["group"], "item": sel["item"],
                             "modality": [g if g in MEDIA else "text" for g in sel["group"]],
                             "t_start": sel["time"], "t_end": sel["time_end"], "frame": sel["frame"],
                             "patch_row": sel["patch_row"], "patch_col": sel["patch_col"], "chunk": sel["chunk"],
                             "token_id": inputs["input_ids"][r, pos].numpy()})
        for h in routers:
            layer = int(h.split(".")[1])
            if layer in hooked_layers:
                meta[f"expert_l{layer}"] = [list(v) for v in cache[h][r, pos].tolist()]
        out.append((acts, meta))
    return out


def assert_same(got, want):
    (acts, meta), (acts_ref, meta_ref) = got, want
    assert list(acts) == list(acts_ref)
    for h in acts_ref:
        assert torch.equal(acts[h], acts_ref[h]), h
    meta = meta.copy()
    for c in [c for c in meta.columns if c.startswith("expert_l")]:
        meta[c] = [list(map(int, v)) for v in meta[c]]
    pd.testing.assert_frame_equal(meta.reset_index(drop=True), meta_ref, check_dtype=False)


@pytest.mark.parametrize("name", NAMES)
def test_harvest_equals_a_naive_run_with_cache_and_runs_nothing_past_the_last_hooked_block(name):
    model, inputs = family(name)
    n = model.cfg.n_layers
    last = n - 2
    hooks = [f"blocks.{last}.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed"]
    ran, towers = [], {}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(model.blocks)]
    handles += [m.register_forward_pre_hook(lambda m, a, w=w: ran.append(w)) for w, m in
                (("ln_final", model.ln_final), ("unembed", model.unembed))]
    handles += [getattr(model, f"hook_{k}_embeds").register_forward_pre_hook(
        lambda m, a, k=k: towers.__setitem__(k, towers.get(k, 0) + 1)) for k in ("audio", "image", "video")]
    try:
        got = harvest_inputs(model, inputs, hooks, ["media", "question"])
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(last + 1))  # the hooked blocks and those before them only; no final norm, no unembedding
    kinds = {g for g in model.token_map(inputs).names(0) + model.token_map(inputs).names(1) if g in MEDIA}
    assert towers == {k: 1 for k in kinds}  # each tower once for the batch
    want = naive(model, inputs, hooks, MEDIA | {"question"})
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert_same(g, w)
        assert len(w[1]) and set(w[1]["group"]) >= {"question"}
    if name == "qwen3_omni":  # the router's choice at the hooked sparse block (0); block 1 is dense, 2 did not run
        assert [c for c in got[0][1].columns if c.startswith("expert")] == ["expert_l0"]
        assert all(len(v) == model.cfg.recipe.moe.top_k for v in got[0][1]["expert_l0"])
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())  # no hook left behind


def test_harvest_refuses_hooks_and_groups_it_cannot_apply_and_leaks_no_hook():
    model, inputs = family("qwen2_5_omni")
    for hooks, groups, message in [
        (["blocks.0.attn.hook_pattern"], "media", "not a language-model hook whose dim 1 is the prompt's positions"),
        (["ln_final.hook_normalized"], "media", "needs the final norm"),
        (["audio_encoder.blocks.0.hook_resid_post"], "media", "dim 1 is the prompt's positions"),
        (["blocks.9.hook_resid_post"], "media", r"do not exist on this model; it has 6 blocks .* 'blocks.\{l\}.hook_resid_post'"),
        ([], "media", "hooks is empty"),
        (["hook_embed"], "audio,vidoe", "unknown token group 'vidoe'"),
        (["hook_embed"], "", "groups are TokenMap group names"),
    ]:
        with pytest.raises(ValueError, match=message):
            harvest_inputs(model, inputs, hooks, groups)

    def boom(t, hook):
        raise RuntimeError("boom")

    qwen3, batch = family("qwen3_omni")  # DeepStack adds to blocks 0 and 1 only: block 2's hook_injection never runs
    with pytest.raises(ValueError, match=r"\['blocks.2.hook_injection'\] ran \[0\] times in this forward, not once"):
        harvest_inputs(qwen3, batch, ["blocks.2.hook_injection"], "media")
    model.blocks[0].hook_resid_post.add_hook(boom)  # a user's hook that raises mid-forward
    with pytest.raises(RuntimeError, match="boom"):
        harvest_inputs(model, inputs, ["blocks.1.hook_resid_post"], "media")
    model.reset_hooks()
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    got = harvest_inputs(model, inputs, ["blocks.1.hook_resid_post"], "text")[0][1]  # every text group
    assert set(got["group"]) == {"question", "template", "last"} and set(got["modality"]) == {"text"}


# ---- from a manifest, on the toy --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy_data"), n=6, seed=7)


@pytest.fixture(scope="module")
def whole(toy_model, data, tmp_path_factory):
    return harvest(toy_model, data, HOOKS, tmp_path_factory.mktemp("whole") / "store", groups="media,question",
                   shard_tokens=70, progress=False)


def tokens(out) -> tuple[pd.DataFrame, dict]:
    """The store's metadata in (row, pos) order without where each token sits, and each hook's activations in that order."""
    store = ActivationStore(out)
    meta = store.metadata().sort_values(["row", "pos"])
    acts = {h: store.activations(h, meta) for h in store.hooks}
    return meta.drop(columns=["shard", "index"]).reset_index(drop=True), acts


def assert_stores_equal(a, b):
    (ma, aa), (mb, ab) = tokens(a), tokens(b)
    pd.testing.assert_frame_equal(ma, mb, check_exact=True)
    assert aa.keys() == ab.keys() and all(torch.equal(aa[h], ab[h]) for h in aa)
    sa, sb = (ActivationStore(x).samples().sort_values("row").reset_index(drop=True) for x in (a, b))
    pd.testing.assert_frame_equal(sa, sb)


def test_a_manifest_harvest_equals_the_naive_loop_over_its_prepared_samples(toy_model, data, whole):
    store = ActivationStore(whole)
    rows = read_manifest(data).rows
    assert len(store.shards) > 1 and store.info["dtype"] == "float32"
    assert store.settings["groups"] == ["media", "question"] and store.hooks == HOOKS
    meta = store.metadata()
    for row in rows:
        inputs = toy_model.prepare(parse_template("default").prompt(row))
        (acts_ref, meta_ref), = naive(toy_model, inputs, HOOKS, MEDIA | {"question"})
        mine = meta[meta["id"] == row.id]
        assert (mine["row"] == row.index).all() and len(set(mine["shard"])) == 1  # a sample is never split
        acts = {h: store.activations(h, mine) for h in HOOKS}
        assert_same((acts, mine.drop(columns=["id", "row", "shard", "index"])), (acts_ref, meta_ref))
    samples = store.samples().set_index("id")
    for row in rows:  # what a view needs to show the media a feature fires on
        s = samples.loc[row.id]
        assert (s["row"], s["question"], s["answer"]) == (row.index, row.question, row.answer_text)
        assert s["n_tokens"] == (meta["id"] == row.id).sum()
        if row.items:
            assert [it["video"] for it in json.loads(s["items"])] == [it["video"] for it in row.items]
        else:
            assert (s["video"], s["audio"], s["image"]) == (row.video, row.audio, row.image)
        assert json.loads(s["meta"]) == row.meta


def test_resume_after_an_interrupted_harvest_equals_an_uninterrupted_one(toy_model, data, whole, tmp_path, monkeypatch):
    real, seen = harvest_module.harvest_inputs, []

    def crash_on_fourth(model, inputs, *a, **k):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(model, inputs, *a, **k)

    monkeypatch.setattr(harvest_module, "harvest_inputs", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70, progress=False)
    kept = ActivationStore(tmp_path / "s").samples()["id"].tolist()
    # samples of 36, 68, 36, ... tokens in shards of 70: 0 and 1 are in complete shards; 2, in flight, is lost
    assert kept == ["toy-00000", "toy-00001"]
    ids = []
    monkeypatch.setattr(harvest_module, "harvest_inputs", lambda m, inputs, *a, **k: ids.append(1) or real(m, inputs, *a, **k))
    harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70, progress=False)
    assert len(ids) == 6 - len(kept)  # done samples skipped
    assert_stores_equal(tmp_path / "s", whole)
    harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70, progress=False)
    assert len(ids) == 6 - len(kept)  # a finished store: nothing runs again


def test_max_tokens_stops_after_the_sample_that_reaches_it_and_resumes_further(toy_model, data, whole, tmp_path):
    per_sample = ActivationStore(whole).samples().sort_values("row")["n_tokens"].to_numpy()
    budget = int(per_sample[:2].sum()) - 1  # reached inside the second sample: it is kept whole
    out = harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70, max_tokens=budget,
                  progress=False)
    assert ActivationStore(out).samples()["row"].tolist() == [0, 1]
    out = harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70,
                  max_tokens=int(per_sample[:4].sum()), progress=False)
    assert sorted(ActivationStore(out).samples()["row"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="past where max_tokens=10 stops"):
        harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70, max_tokens=10,
                progress=False)
    with pytest.raises(ValueError, match=r"already holds 2 harvested sample\(s\) beyond this run's first 2"):
        harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70, limit=2, progress=False)
    harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=70, progress=False)
    assert_stores_equal(tmp_path / "s", whole)  # resumed to the end: the whole harvest


def test_bad_input_is_refused_before_the_model_loads(data, whole, tmp_path, monkeypatch):
    import hooked_av

    monkeypatch.setattr(hooked_av, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().replace("clip0", "nope0"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "settings.json").write_text("{}")
    for kwargs, error, message in [
        (dict(manifest=bad), ManifestError, "does not exist"),
        (dict(groups="audio,vidoe"), ValueError, "unknown token group 'vidoe'"),
        (dict(hooks=["blocks.1.attn.hook_pattern"]), ValueError, "dim 1 is the prompt's positions"),
        (dict(limit=0), ValueError, "limit must be >= 1"),
        (dict(max_tokens=-1), ValueError, "max_tokens must be >= 1"),
        (dict(shard_tokens=0), ValueError, "shard_tokens must be >= 1"),
        (dict(template="mc"), ValueError, "the 'mc' template needs options"),
        (dict(dtype="float64"), ValueError, "a store keeps"),
        (dict(out=tmp_path / "file"), ValueError, "is a file"),
        (dict(out=tmp_path / "other"), ValueError, "other files and no store.json"),
    ]:
        args = dict(manifest=data, hooks=HOOKS, out=tmp_path / "new", groups="media,question", shard_tokens=70) | kwargs
        with pytest.raises(error, match=message):
            harvest("toy", args.pop("manifest"), args.pop("hooks"), args.pop("out"), progress=False, **args)
    assert not (tmp_path / "new").exists()


def test_a_store_of_other_settings_is_refused_before_any_sample_runs(toy_model, data, whole, monkeypatch):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in whole.rglob("*"))
    monkeypatch.setattr(harvest_module, "harvest_inputs", lambda *a, **k: pytest.fail("a sample ran"))
    for kwargs, message in [
        (dict(groups="media"), r"other settings \(settings.groups differ: \{'settings.groups': \['media', 'question'\]\} there, "
                               r"\{'settings.groups': \['media'\]\} now\)"),
        (dict(shard_tokens=71), r"other settings \(shard_tokens differ"),
        (dict(hooks=HOOKS[:1]), r"other settings \(hooks differ"),
        (dict(limit=2), r"already holds 4 harvested sample\(s\) beyond this run's first 2"),
    ]:
        args = dict(hooks=HOOKS, groups="media,question", shard_tokens=70) | kwargs
        with pytest.raises(ValueError, match=message):
            harvest(toy_model, data, args.pop("hooks"), whole, progress=False, **args)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in whole.rglob("*")) == before


def test_a_loaded_model_is_harvested_as_it_is_and_an_unknown_hook_is_refused_before_any_sample(toy_model, data, tmp_path,
                                                                                               monkeypatch):
    with pytest.raises(ValueError, match="a loaded model is harvested as it is"):
        harvest(toy_model, data, HOOKS, tmp_path / "a", dtype="bfloat16", progress=False)
    monkeypatch.setattr(harvest_module, "harvest_inputs", lambda *a, **k: pytest.fail("a sample ran"))
    with pytest.raises(ValueError, match=r"\['blocks.7.hook_resid_post'\] do not exist on this model; it has 4 blocks"):
        harvest(toy_model, data, ["blocks.7.hook_resid_post"], tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_the_cli_harvests_the_toy_and_reports_a_bad_group_in_one_line(data, tmp_path, capsys):
    from patching.apps.cli import main

    args = ["harvest", "--model", "toy", "--manifest", str(data), "--hook", "blocks.2.hook_resid_post", "--hook",
            "hook_embed", "--groups", "audio,video", "--limit", "3", "--shard-tokens", "40"]
    assert main(args + ["--out", str(tmp_path / "s")]) == 0
    store = ActivationStore(tmp_path / "s")
    assert store.hooks == ["blocks.2.hook_resid_post", "hook_embed"] and len(store.shards) >= 2
    assert sorted(store.done_ids()) == [f"toy-{k:05d}" for k in range(3)]
    assert set(store.metadata()["group"]) == {"audio", "video"} and np.isnan(store.metadata()["t_start"]).sum() == 0
    assert f"{store.n_tokens:,} tokens of 3 samples" in capsys.readouterr().out
    assert main(args[:-4] + ["--groups", "audio,vidoe", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown token group 'vidoe'")


def test_memory_is_bounded_by_a_shard_and_a_resume_reads_no_token_table(toy_model, data, whole, tmp_path, monkeypatch):
    from patching.datasets import activations

    held, real_add = [], activations.StoreWriter.add

    def add(self, acts, meta, sample=None):
        real_add(self, acts, meta, sample)
        held.append(self._n)  # tokens buffered in memory once the sample is in

    monkeypatch.setattr(activations.StoreWriter, "add", add)
    monkeypatch.setattr(activations.ActivationStore, "metadata", lambda self: pytest.fail("read every token's metadata"))
    harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=40, progress=False)
    assert len(held) == 6 and max(held) < 40  # a shard is written as soon as it is full: never more than one in memory
    harvest(toy_model, data, HOOKS, tmp_path / "s", groups="media,question", shard_tokens=40, progress=False)  # resumes
    assert len(held) == 6
