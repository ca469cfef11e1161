"""`from_pretrained(device_map=..., max_memory=..., offload_folder=...)` through accelerate, as HF: on this
CPU machine an explicit map that offloads blocks to disk and an "auto" map under a `max_memory` that forces
offloading give the same logits, caches, attention rows, knockout sweep and generation as the model loaded
whole (exactly: the same arithmetic on the same device), for Qwen2.5-Omni, SALMONN and Qwen3-Omni; maps
that cannot apply are refused before any weight is placed."""

from __future__ import annotations

import pytest
import torch
from omni_helpers import geometries, tiny_hf_thinker
from test_patching_common import token_map

from hooked_av import HookedQwen2_5Omni
from patching.engine.hooks import block_attention
from patching.engine.sweep import run_rows, samples

torch.set_num_threads(1)
INPUTS, _ = geometries()["audio_and_video_blocks"]
PADDED, _ = geometries()["padded_batch"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinker")
    tiny_hf_thinker(seed=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def whole(folder):
    return HookedQwen2_5Omni.from_pretrained(folder)


def explicit_map(model) -> dict:
    n = model.cfg.n_layers
    return {"audio_encoder": "cpu", "vision_encoder": "disk", "embed": "cpu", "ln_final": "disk", "unembed": "cpu",
            **{f"blocks.{i}": "disk" if i % 2 else "cpu" for i in range(n)}}


def same_everywhere(placed, whole):
    with torch.no_grad():
        for inputs in (INPUTS, PADDED):
            assert torch.equal(placed(**inputs), whole(**inputs))
        names = [f"blocks.{l}.hook_resid_post" for l in range(whole.cfg.n_layers)] + ["blocks.1.attn.hook_pattern"]
        _, got = placed.run_with_cache(**PADDED, names_filter=names)
        _, ref = whole.run_with_cache(**PADDED, names_filter=names)
        for n in names:
            assert torch.equal(got[n], ref[n]), n
        assert torch.equal(placed.attention_rows(PADDED, queries=[-1]), whole.attention_rows(PADDED, queries=[-1]))
        # a sweep that starts cells at later blocks (from cached residuals) and positions
        out = []
        for m in (placed, whole):
            s = samples(m, INPUTS, tm=token_map(m, INPUTS))[0]
            cells = [block_attention(s.tm, "audio", "last", [l]) for l in range(m.cfg.n_layers)]
            stats = {}
            out.append(run_rows(m, s, cells, progress=False, stats=stats))
            assert stats["incremental"]
        assert torch.equal(*out)
        gen = [m.generate(**INPUTS, max_new_tokens=4) for m in (placed, whole)]
        assert torch.equal(*gen)


def test_an_explicit_map_with_disk_offload_changes_nothing(folder, whole, tmp_path):
    placed = HookedQwen2_5Omni.from_pretrained(folder, device_map=explicit_map(whole), offload_folder=tmp_path / "off")
    assert "disk" in placed.hf_device_map.values()
    assert placed.blocks[1].attn.q_proj.weight.device.type == "meta"  # really offloaded
    assert placed.device == torch.device("cpu") and len(placed.block_devices) == whole.cfg.n_layers
    same_everywhere(placed, whole)


def test_auto_under_max_memory_offloads_and_changes_nothing(folder, whole, tmp_path):
    size = sum(p.numel() * p.element_size() for p in whole.parameters())
    placed = HookedQwen2_5Omni.from_pretrained(folder, device_map="auto", max_memory={"cpu": size // 2},
                                               offload_folder=tmp_path / "off")
    where = set(placed.hf_device_map.values())
    assert where == {"cpu", "disk"}, placed.hf_device_map
    # blocks and towers are never split
    assert all(k == "" or k.count(".") <= 1 for k in placed.hf_device_map), placed.hf_device_map
    same_everywhere(placed, whole)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map={"blocks.0.attn": "cpu", "": "cpu"}), r"keys \['blocks.0.attn'\] are not places"),
    (dict(device_map={"blocks.0": "cpu"}), r"places no device for \d+ weight"),
    (dict(device_map={"": "disk"}), "pass offload_folder="),
    (dict(device_map={"": "meta"}), "is not a place for weights"),
    (dict(device_map={"": "cpu"}, max_memory={"cpu": 10**9}), "max_memory applies to device_map='auto'"),
    (dict(device_map="everywhere"), r"device_map='everywhere': use one of"),
    (dict(max_memory={"cpu": 10**9}), "apply to a device_map"),
    (dict(device_map="auto", device="meta"), "not both"),
    (dict(device_map={"": "cpu"}, offload_folder="unused"), "offloads nothing to 'disk'"),
    (dict(device_map={"": -1}), "is not a place for weights"),
    (dict(device_map={"": True}), "is not a place for weights"),
    (dict(device_map={"": "nowhere"}), "is not a place for weights"),
] + ([] if torch.cuda.is_available() else [
    (dict(device_map={"": 0}), r"device_map\[''\] = 0: device .* CUDA is not available"),
    (dict(device_map={"": "cpu", "blocks.1": "cuda:0"}), r"device_map\['blocks.1'\] = 'cuda:0': .*CUDA is not available"),
]))
def test_maps_that_cannot_apply_are_refused(folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HookedQwen2_5Omni.from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("placement", [
    dict(device_map={"": "cpu", "blocks.0": "disk", "blocks.1": "disk", "ln_final": "disk"}),
    "auto"])
def test_each_load_owns_its_offload_folder(folder, whole, tmp_path, placement):
    # two checkpoints of one architecture placed with one offload folder: accelerate found the first's
    # index.json and wrote nothing, so the second ran its offloaded blocks on the first's weights (logits off)
    if placement == "auto":
        size = sum(p.numel() * p.element_size() for p in whole.parameters())
        placement = dict(device_map="auto", max_memory={"cpu": size // 2})
    other = tmp_path / "other"
    tiny_hf_thinker(seed=7).save_pretrained(other)
    first = HookedQwen2_5Omni.from_pretrained(folder, offload_folder=tmp_path / "off", **placement)
    second = HookedQwen2_5Omni.from_pretrained(other, offload_folder=tmp_path / "off", **placement)
    with torch.no_grad():
        assert torch.equal(first(**INPUTS), whole(**INPUTS))
        assert torch.equal(second(**INPUTS), HookedQwen2_5Omni.from_pretrained(other)(**INPUTS))
    # a folder that already holds another load's index.json and weights, at its top: not read either
    import shutil
    shutil.copytree(next((tmp_path / "off").iterdir()), tmp_path / "stale")
    assert (tmp_path / "stale" / "index.json").exists()
    third = HookedQwen2_5Omni.from_pretrained(other, offload_folder=tmp_path / "stale", **placement)
    with torch.no_grad():
        assert torch.equal(third(**INPUTS), second(**INPUTS))
    # each load's subfolder goes with its model
    import gc
    n = len(list((tmp_path / "off").iterdir()))
    del first
    gc.collect()
    assert len(list((tmp_path / "off").iterdir())) == n - 1


def test_an_offload_folder_that_is_a_file_is_refused(folder, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"offload_folder=.*/f' is a file; name a folder"):
        HookedQwen2_5Omni.from_pretrained(folder, device_map={"": "cpu", "blocks.1": "disk"}, offload_folder=tmp_path / "f")


def test_salmonn_and_qwen3_take_a_map(tmp_path):
    # towers offloaded too: SALMONN's Whisper reads its position table and Qwen3-VL's vision tower its
    # position embedding without calling the module; an offloaded tower loads all its weights first
    import salmonn_helpers as H
    from qwen3_omni_helpers import model_inputs, tiny_hf

    from hooked_av import HookedQwen3Omni, HookedVideoSALMONN2

    H.Reference(seed=0).save(tmp_path / "salmonn")
    plain = HookedVideoSALMONN2.from_pretrained(tmp_path / "salmonn")
    n = plain.cfg.n_layers
    towers = [k for k, m in plain.named_children() if k not in ("blocks", "embed", "ln_final", "unembed")
              and any(True for _ in m.parameters())]
    placed = HookedVideoSALMONN2.from_pretrained(
        tmp_path / "salmonn", offload_folder=tmp_path / "off1",
        device_map={"": "cpu", **{t: "disk" for t in towers}, **{f"blocks.{i}": "disk" for i in range(0, n, 2)}})
    assert {placed.hf_device_map[t] for t in towers} == {"disk"}
    inputs, _ = H.batch(H.Row(1).text(4).video_with_audio(3, 4, 8, chunks=1, spg=0.5).text(3),
                        H.Row(2).text(4).audio(chunks=2).text(3))
    with torch.no_grad():
        assert torch.equal(placed(**inputs), plain(**inputs))

    tiny_hf(seed=1).save_pretrained(tmp_path / "q3")
    plain = HookedQwen3Omni.from_pretrained(tmp_path / "q3")
    placed = HookedQwen3Omni.from_pretrained(tmp_path / "q3", offload_folder=tmp_path / "off2", device_map={
        "": "cpu", "blocks.1": "disk", "audio_encoder": "disk", "vision_encoder": "disk"})
    for geometry in ("two_clips", "left_padded"):
        inputs, av = model_inputs(geometry)
        with torch.no_grad():
            assert torch.equal(placed(**inputs, use_audio_in_video=av), plain(**inputs, use_audio_in_video=av))


def test_tied_embeddings_stay_on_one_device(tmp_path):
    from omni_helpers import tiny_thinker_config
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    cfg = tiny_thinker_config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(3)
    Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval().save_pretrained(tmp_path / "tied")
    plain = HookedQwen2_5Omni.from_pretrained(tmp_path / "tied")
    assert plain.unembed.weight is plain.embed.weight
    placed = HookedQwen2_5Omni.from_pretrained(tmp_path / "tied", device_map={"": "cpu", "unembed": "disk"},
                                               offload_folder=tmp_path / "off")
    assert placed.hf_device_map["unembed"] == "cpu"  # the map says where the tied weight really is
    with torch.no_grad():
        assert torch.equal(placed(**INPUTS), plain(**INPUTS))


def test_analyses_that_read_weights_work_on_an_offloaded_model(folder, whole, tmp_path):
    # the weight views, logit lens (map the flow's embedding projection) and DLA read weights without
    # calling their module: offloaded, those sat on the meta device (DLA crashed, the lens gave other numbers)
    from patching.methods.dla import dla
    from patching.methods.logit_lens import logit_lens

    placed = HookedQwen2_5Omni.from_pretrained(folder, device_map={"": "disk"}, offload_folder=tmp_path / "off")
    assert placed.embed.weight.device.type == "meta"
    assert torch.equal(placed.W_E, whole.W_E) and torch.equal(placed.W_U, whole.W_U)
    assert torch.equal(placed.tokens_to_residual_directions([5, 7]), whole.tokens_to_residual_directions([5, 7]))
    assert torch.equal(placed.accumulated_bias(2, mlp_input=True), whole.accumulated_bias(2, mlp_input=True))
    for run in (lambda m: dla(m, INPUTS, 5, tm=token_map(m, INPUTS)).df,
                lambda m: logit_lens(m, INPUTS, 5, tm=token_map(m, INPUTS), lens="map_the_flow").df):
        got, ref = run(placed), run(whole)
        assert got.equals(ref)
    assert placed.embed.weight.device.type == "meta"  # loaded for the reads only


def test_nnsight_wrap_refuses_an_offloaded_model(folder, tmp_path):
    # nnsight's interleaving crashed inside accelerate's offload hook ("Cannot copy out of meta tensor")
    from hooked_av.interop.nnsight import wrap

    placed = HookedQwen2_5Omni.from_pretrained(folder, device_map={"": "cpu", "blocks.1": "disk"},
                                               offload_folder=tmp_path / "off")
    with pytest.raises(ValueError, match=r"offloads \['blocks.1'\] is not supported"):
        wrap(placed)
    wrap(HookedQwen2_5Omni.from_pretrained(folder, device_map={"": "cpu"}))  # on devices only: fine
