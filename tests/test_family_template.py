"""A family is its folder plus one registry line. The stand-in (tests/standin_family/: two files, 38 lines,
of which the model's differences are two overrides) is Qwen2.5-Omni's Thinker saved under model_type
'standin_omni' with the decoder's keys under `llm.`; its model subclasses its nearest sibling,
`HookedQwen2_5Omni`, and overrides the two checkpoint points that differ. One line appended to
`hooked_av.families.FAMILIES` makes `hooked_av.load` pick it, and on the same weights it runs `forward`,
`encode`, `generate` and `token_map` exactly as the sibling does (the template's, written once)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import standin_family
import torch
from omni_helpers import geometries, tiny_hf_thinker
from safetensors.torch import load_file, save_file

import hooked_av
from hooked_av import HookedAVFamily, HookedQwen2_5Omni

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(the sibling's checkpoint, the stand-in's): one tiny random Thinker saved by save_pretrained, and the
    same tensors with the decoder under `llm.` and config.json's model_type 'standin_omni'."""
    root = tmp_path_factory.mktemp("family")
    tiny_hf_thinker(seed=4).save_pretrained(root / "sibling")
    tensors = load_file(root / "sibling" / "model.safetensors")
    assert any(k.startswith("model.") for k in tensors)
    (root / "standin").mkdir()
    save_file({re.sub(r"^model\.", "llm.", k): v for k, v in tensors.items()}, root / "standin" / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((root / "sibling" / "config.json").read_text())
    (root / "standin" / "config.json").write_text(json.dumps({**config, "model_type": "standin_omni"}))
    return root / "sibling", root / "standin"


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(hooked_av.families, "FAMILIES", (*hooked_av.families.FAMILIES, standin_family))  # the one line


def test_the_stand_in_is_two_small_files_and_only_its_differences():
    files = sorted(p.name for p in Path(standin_family.__file__).parent.glob("*.py"))
    assert files == ["__init__.py", "model.py"]
    assert sum(len(open(Path(standin_family.__file__).parent / f).readlines()) for f in files) <= 40
    own = {n for n, v in vars(standin_family.MODEL).items() if callable(v) or isinstance(v, classmethod)}
    assert own == {"read_checkpoint_config", "key_converter"}
    assert issubclass(standin_family.MODEL, HookedAVFamily)


def test_registered_stand_in_loads_and_runs_as_its_sibling_on_the_same_weights(folders, registered):
    sibling, standin = hooked_av.load(folders[0]), hooked_av.load(folders[1])
    assert type(standin) is standin_family.MODEL and type(sibling) is HookedQwen2_5Omni
    assert standin.checkpoint_folder == folders[1]
    a, b = sibling.state_dict(), standin.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("padded_batch", "audio_in_video"):
        inputs, av = geometries()[name]
        with torch.no_grad():
            assert torch.equal(standin(**inputs, use_audio_in_video=av), sibling(**inputs, use_audio_in_video=av))
            got, want = standin.encode(**inputs), sibling.encode(**inputs)
            assert list(got) == list(want) == ["inputs_embeds", "position_ids", "attention_mask", "rope_deltas"]
            assert all(torch.equal(got[k], want[k]) for k in got if got[k] is not None)
            assert torch.equal(standin(**got), sibling(**inputs))
        assert torch.equal(standin.generate(**inputs, max_new_tokens=3), sibling.generate(**inputs, max_new_tokens=3))
        tm, want_tm = standin.token_map(inputs), sibling.token_map(inputs)
        for field in ("group", "item", "frame", "time", "time_end", "chunk"):  # times are NaN on text: equal_nan
            assert torch.allclose(getattr(tm, field), getattr(want_tm, field), rtol=0, atol=0, equal_nan=True), field


def test_a_family_option_it_does_not_take_is_refused_before_any_weight_is_read(folders, registered, tmp_path):
    (tmp_path / "config.json").write_text((folders[1] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a tensor file")  # reading it would fail otherwise
    with pytest.raises(TypeError, match=r"HookedStandInOmni takes no option\(s\) \['position_mode'\]; its options: none"):
        hooked_av.load(tmp_path, position_mode="training")
    with pytest.raises(ValueError, match=r"has model_type 'qwen2_5_omni_thinker'; a stand-in checkpoint has 'standin_omni'"):
        standin_family.MODEL.from_pretrained(folders[0])  # the sibling's checkpoint is not the stand-in's


def test_the_stand_in_is_unknown_without_its_registry_line(folders):
    assert standin_family not in hooked_av.families.FAMILIES  # (the tests that register it restore the registry)
    with pytest.raises(ValueError, match="'standin_omni' is not a supported family"):
        hooked_av.load(folders[1])
