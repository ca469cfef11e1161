"""The structure of the package (docs/architecture.md): the registry picks each registered family from
config.json and every family is the template's subclass, the dependency rules hold and no modules import
each other, the token arithmetic has one home per family and agrees with the towers, and media constants
come from the family's processor."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

import hooked_av
from hooked_av import HookedAVFamily, HookedQwen2_5Omni, HookedVideoSALMONN2
from hooked_av.core import checkpoint
from hooked_av.families import FAMILIES
from hooked_av.families.qwen2_5_omni.layout import audio_token_counts, av_chunk_runs

torch.set_num_threads(1)
ROOT = Path(hooked_av.__file__).resolve().parent


# ---- registry -----------------------------------------------------------------------------------
def tiny_checkpoint(family, folder: Path) -> None:
    """Write a tiny random checkpoint of `family` (a registered family package) into `folder`."""
    import salmonn_helpers as S
    from omni_helpers import tiny_hf_thinker
    from qwen3_omni_helpers import tiny_hf

    writers = {
        "Qwen2.5-Omni": lambda: tiny_hf_thinker().save_pretrained(folder),
        "video-SALMONN 2+": lambda: S.Reference(seed=0).save(folder),
        "Qwen3-Omni": lambda: tiny_hf().save_pretrained(folder),
    }
    if family.NAME not in writers:
        pytest.fail(f"no tiny checkpoint for the registered family {family.NAME!r}: add its writer to tiny_checkpoint")
    writers[family.NAME]()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.NAME)
def test_load_picks_each_registered_family_from_its_config_and_no_other_claims_it(family, tmp_path):
    tiny_checkpoint(family, tmp_path)
    assert [f for f in FAMILIES if f.matches(checkpoint.read_config(tmp_path))] == [family]
    model = hooked_av.load(tmp_path)
    assert type(model) is family.MODEL and model.checkpoint_folder == tmp_path


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.NAME)
def test_every_registered_family_is_the_template_s_subclass_defining_its_open_points(family):
    assert isinstance(family.NAME, str) and isinstance(family.RECOGNISED_BY, str) and callable(family.matches)
    assert issubclass(family.MODEL, HookedAVFamily)
    for point in ("build", "key_converter", "audio_placeholders", "position_ids", "prepare", "token_map",
                  "media_constants"):
        assert getattr(family.MODEL, point) is not getattr(HookedAVFamily, point), point


def test_load_passes_family_options_to_from_pretrained(tmp_path):
    import salmonn_helpers as S

    S.Reference(seed=0).save(tmp_path)
    salmonn = hooked_av.load(tmp_path, position_mode="training")
    assert type(salmonn) is HookedVideoSALMONN2 and salmonn.position_mode == "training"
    with pytest.raises(TypeError, match=r"HookedVideoSALMONN2 takes no option\(s\) \['position_modes'\]; its options: \['position_mode'\]"):
        hooked_av.load(tmp_path, position_modes="training")


def test_load_refuses_an_unknown_family_naming_the_known_ones_before_any_weight(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weight files at all
    with pytest.raises(ValueError, match=r"'llama' is not a supported family \(Qwen2\.5-Omni: model_type .*; video-SALMONN 2\+: .*qformer_config; Qwen3-Omni: model_type .*qwen3_omni_moe.*\)"):
        hooked_av.load(tmp_path)


def test_load_toy_is_the_registry_s_and_takes_no_family_options():
    model = hooked_av.load("toy")
    assert type(model) is HookedQwen2_5Omni and model.tokenizer is not None
    with pytest.raises(ValueError, match="toy model takes no"):
        hooked_av.load("toy", position_mode="training")


# ---- dependency rules ---------------------------------------------------------------------------
def _imports(folder: Path) -> dict[str, set[str]]:
    """Module file -> every module name it imports (top level or inside functions)."""
    out = {}
    for f in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
        out[str(f.relative_to(ROOT.parent))] = names
    return out


@pytest.mark.parametrize("folder, forbidden", [
    ("", ("patching",)),  # nothing in hooked_av imports patching
    ("core", ("hooked_av.families", "hooked_av.toy", "hooked_av.registry")),
    ("encoders", ("hooked_av.families", "hooked_av.toy", "hooked_av.inputs", "hooked_av.registry")),
    ("inputs", ("hooked_av.families", "hooked_av.toy", "hooked_av.registry")),
    ("families", ("hooked_av.toy", "hooked_av.registry")),  # the toy depends on the families, never the reverse
])
def test_dependency_rules(folder, forbidden):
    bad = {f: sorted(n for n in names if n.split(".")[0] in forbidden or n.startswith(forbidden))
           for f, names in _imports(ROOT / folder).items()}
    assert {f: n for f, n in bad.items() if n} == {}


def test_the_template_knows_no_family():
    names = _imports(ROOT / "families")[str(Path("hooked_av", "families", "base.py"))]
    assert sorted(n for n in names if n.startswith(tuple(f.__name__ for f in FAMILIES))) == []


def test_the_old_module_paths_are_gone():
    assert not (ROOT / "models").exists()
    for old in ("omni.py", "omni_layout.py", "processor.py", "salmonn.py", "salmonn_prompt.py"):
        assert not (ROOT / "inputs" / old).exists()


# ---- token arithmetic ---------------------------------------------------------------------------
def test_audio_token_counts_equal_what_the_audio_tower_emits():
    from omni_helpers import N_MELS, tiny_thinker_config

    model = HookedQwen2_5Omni.from_config(tiny_thinker_config())
    frames = [3, 4, 5, 19, 20, 21, 37, 100, 101]
    with torch.no_grad():
        for n in frames:  # the oracle: the rows the tower really outputs
            out = model.audio_encoder(torch.randn(N_MELS, n), torch.tensor([n]))
            assert audio_token_counts([n]) == [out.shape[0]], n
    mask = torch.zeros(len(frames), 101, dtype=torch.long)
    for i, n in enumerate(frames):
        mask[i, :n] = 1
    assert audio_token_counts(mask) == audio_token_counts(frames) == [1, 1, 1, 5, 5, 5, 9, 25, 25]


def test_av_chunk_runs_interleave_2s_chunks_video_first():
    # 4 frames at 1 s per grid step, 2 tokens each: temporal ids 0, 0, 25, 25, 50, 50, 75, 75; 120 audio tokens
    video = torch.tensor([0, 0, 25, 25, 50, 50, 75, 75])
    assert av_chunk_runs(video, 120, 50) == [
        ("video", 0, 0, 4), ("audio", 0, 0, 50), ("video", 1, 4, 8), ("audio", 1, 50, 100), ("audio", 2, 100, 120),
    ]
    assert av_chunk_runs(video, 0, 50) == [("video", 0, 0, 4), ("video", 1, 4, 8)]  # no empty runs


# ---- media constants ----------------------------------------------------------------------------
def test_media_constants_come_from_the_family_processor_and_drive_zero_modality():
    from media_helpers import tiny_tokenizer
    from omni_helpers import tiny_thinker_config
    from transformers import Qwen2VLImageProcessor

    from hooked_av.families.qwen2_5_omni.processor import assemble_omni_parts
    from patching.engine.corrupt import zero_modality

    whisper_silence = (math.log10(1e-10) + 4) / 4  # log10 of the clamp floor, then Whisper's (x + 4) / 4
    stock = Qwen2VLImageProcessor()
    model = HookedQwen2_5Omni.from_config(tiny_thinker_config())
    c = model.media_constants
    assert (c.image_mean, c.image_std, c.silent_log_mel) == (tuple(stock.image_mean), tuple(stock.image_std), whisper_silence)

    model.tokenizer = tiny_tokenizer()
    model.processor_parts = assemble_omni_parts(model.tokenizer, num_mel_bins=16, chunk_length=30)
    model.processor_parts.image_processor.image_mean = [0.5, 0.5, 0.5]  # a Qwen3-VL-style processor
    model.processor_parts.image_processor.image_std = [0.5, 0.5, 0.5]
    assert model.media_constants.image_mean == (0.5, 0.5, 0.5)
    inputs = {"pixel_values_videos": torch.randn(8, 3 * 2 * 14 * 14), "input_features": torch.randn(1, 16, 40)}
    z = zero_modality(inputs, "video", model)
    assert torch.equal(z["pixel_values_videos"], torch.full((8, 1176), -1.0))  # (0 - 0.5) / 0.5
    assert torch.equal(zero_modality(inputs, "audio", model)["input_features"], torch.full((1, 16, 40), whisper_silence))
    # without a model: the stock Qwen2-VL / Whisper numbers both families ship with
    assert torch.allclose(zero_modality(inputs, "video")["pixel_values_videos"][0, 0], torch.tensor(-stock.image_mean[0] / stock.image_std[0]))
    with pytest.raises(ValueError, match="not both"):
        zero_modality(inputs, "video", model, constants=c)


def test_salmonn_media_constants():
    import salmonn_helpers as S

    c = HookedVideoSALMONN2.from_config(S.Reference(seed=0).salmonn_config()).media_constants
    assert c.silent_log_mel == -1.5 and c.image_mean == (0.48145466, 0.4578275, 0.40821073)


def test_omni_token_map_reads_audio_feature_lengths_as_mel_frames():
    # audio_feature_lengths are mel frames per audio (HF's name; model.encode reads them so), not tokens
    from omni_helpers import Builder, audio_tokens, batch, tiny_thinker_config

    from hooked_av.inputs.chat import ChatTokens

    model = HookedQwen2_5Omni.from_config(tiny_thinker_config())
    inputs = batch(Builder(3).audio(45).text().end())
    lengths = inputs.pop("feature_attention_mask").sum(-1)
    inputs["audio_feature_lengths"] = lengths
    tm = model.token_map(inputs, chat=ChatTokens(300, 301, None, {"user": (302,)}))
    assert tm.count("audio").tolist() == [audio_tokens(45)] and lengths.tolist() == [45]


# ---- the patching layers (docs/architecture.md) --------------------------------------------------
PATCHING = ROOT.parent / "patching"
LAYER_OF = {"engine": 0, "datasets": 0, "backends": 1, "methods": 1, "figures": 2, "apps": 3}
MAY_IMPORT = {  # folder -> the patching folders its modules may import (besides its own)
    "engine": set(), "datasets": set(), "backends": {"engine"}, "methods": {"engine", "datasets"},
    "figures": {"engine", "methods"}, "apps": {"engine", "datasets", "methods", "figures", "backends"},
}
INTERNALS = ("hooked_av.core", "hooked_av.families", "hooked_av.encoders")  # the model's insides
APPS_ONLY = ("hooked_av.registry", "hooked_av.toy")  # what the apps load models and data with


def _module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules it imports (top level or inside functions), `from a import b` resolved to the
    module a.b where b is a module; package faces (`__init__.py`) are modules like any other."""
    files = {".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in root.rglob("*.py")}
    out = {}
    for mod, f in files.items():
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    names.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module)
        out[mod] = {n for n in names if n.split(".")[0] == package}
    return out


def test_patching_layers_point_down():
    graph = _module_graph(PATCHING, "patching")
    bad = {}
    for mod, deps in graph.items():
        parts = mod.split(".")
        if len(parts) < 3 or parts[1] not in LAYER_OF:
            continue
        allowed = MAY_IMPORT[parts[1]] | {parts[1]}
        wrong = sorted(d for d in deps if len(d.split(".")) > 1 and d.split(".")[1] not in allowed)
        if wrong:
            bad[mod] = wrong
    assert bad == {}
    assert set(p.name for p in PATCHING.iterdir() if p.is_dir() and p.name != "__pycache__") == set(LAYER_OF)


def test_data_never_imports_pictures_and_methods_never_import_apps():
    pictures = ("matplotlib", "patching.figures", "hooked_av.viz", "circuitsvis", "plotly")
    imports = _imports(PATCHING)
    bad = {f: sorted(n for n in names if n.startswith(pictures))
           for f, names in imports.items() if f.split("/")[1] in ("engine", "datasets", "methods", "backends")}
    assert {f: n for f, n in bad.items() if n} == {}
    bad = {f: sorted(n for n in names if n.startswith("patching.apps"))
           for f, names in imports.items() if f.split("/")[1] != "apps" and f != "patching/__init__.py"}
    assert {f: n for f, n in bad.items() if n} == {}


def test_patching_reaches_models_through_their_public_api_only():
    """hooked_av's top level, `hooked_av.utils`, `inputs`, `viz` and `interop` (and for the apps the registry
    and the toy): never the model's internals (`core`, `families`, `encoders`); what methods need of them
    is a model method or `hooked_av.utils`."""
    bad = {}
    for f, names in _imports(PATCHING).items():
        forbidden = INTERNALS + (() if f.split("/")[1] == "apps" else APPS_ONLY)
        wrong = sorted(n for n in names if n.startswith(forbidden))
        if wrong:
            bad[f] = wrong
    assert bad == {}


@pytest.mark.parametrize("package", ["hooked_av", "patching"])
def test_no_import_circles(package):
    root = ROOT if package == "hooked_av" else PATCHING
    graph = _module_graph(root, package)
    # patching's face imports every layer to export it (and register the records): that is not a circle
    faces = {m for m in graph if (root.parent / Path(*m.split("."))).is_dir()} if package == "patching" else set()
    graph = {m: {d for d in deps if d in graph and d not in faces} for m, deps in graph.items() if m not in faces}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert cycles == []
