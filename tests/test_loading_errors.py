"""Loading, the flow CLI and the toy's prepare: every case that could return a wrong result or a raw
error gives the right result or an error that says what was wrong and what to do, raised before
the expensive work (reading weights, loading a model)."""

import json
import shutil

import numpy as np
import pytest
import torch
from media_helpers import write_mp4
from omni_helpers import geometries, tiny_hf_thinker
from safetensors.torch import load_file, save_file

from hooked_av import HookedQwen2_5Omni, HookedVideoSALMONN2, toy
from hooked_av.inputs.prompt import Item, Prompt
from hooked_av.toy.clips import SAMPLE_RATE, bank_from_media, render_clips
from patching.apps.cli import main

INPUTS, _ = geometries()["audio_and_video_blocks"]


# ---- loading ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("thinker")
    tiny_hf_thinker(seed=2).save_pretrained(d)
    return d


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the saved checkpoint to damage."""
    return shutil.copytree(saved, tmp_path / "ckpt")


def _truncate(f, keep: int = 100):
    f.write_bytes(f.read_bytes()[:keep])


@pytest.mark.parametrize("name", ["bfloat16", "bf16", "torch.bfloat16", "float32"])
def test_dtype_given_as_a_string_is_mapped(saved, name):
    model = HookedQwen2_5Omni.from_pretrained(saved, dtype=name)
    want = torch.float32 if name == "float32" else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {want}
    with torch.no_grad():
        assert model(**INPUTS).dtype == want


def test_bad_dtype_and_device_are_refused_before_any_weight_is_read(ckpt, monkeypatch):
    _truncate(ckpt / "model.safetensors")  # reading a weight would fail with another message
    with pytest.raises(ValueError, match=r"dtype 'bfloat17' is not.*'bfloat16'"):
        HookedQwen2_5Omni.from_pretrained(ckpt, dtype="bfloat17")
    with pytest.raises(ValueError, match=r"dtype torch\.int8 is not.*'float32'"):
        HookedQwen2_5Omni.from_pretrained(ckpt, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"device 'gpu:0' is not a device.*'cuda:0'"):
        HookedQwen2_5Omni.from_pretrained(ckpt, device="gpu:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda'.*CUDA is not available.*device='cpu'"):
        HookedQwen2_5Omni.from_pretrained(ckpt, device="cuda")


def test_a_damaged_weight_file_or_index_is_named(saved, tmp_path):
    tensors = load_file(saved / "model.safetensors")
    truncated = shutil.copytree(saved, tmp_path / "truncated")
    _truncate(truncated / "model.safetensors", 5000)
    with pytest.raises(ValueError, match=r"cannot read weight file .*truncated/model\.safetensors.*download it again"):
        HookedQwen2_5Omni.from_pretrained(truncated)

    old_bin = shutil.copytree(saved, tmp_path / "bin")
    (old_bin / "model.safetensors").unlink()
    torch.save(tensors, old_bin / "pytorch_model.bin")
    _truncate(old_bin / "pytorch_model.bin", 5000)
    with pytest.raises(ValueError, match=r"cannot read weight file .*bin/pytorch_model\.bin"):
        HookedQwen2_5Omni.from_pretrained(old_bin)

    sharded = shutil.copytree(saved, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, sharded / name)
    index = sharded / "model.safetensors.index.json"
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    index.write_text(json.dumps({"weight_map": weight_map})[:-20])  # cut short
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        HookedQwen2_5Omni.from_pretrained(sharded)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json has no weight_map"):
        HookedQwen2_5Omni.from_pretrained(sharded)
    index.write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json lists .*'model-00002-of-00002\.safetensors'"):
        HookedQwen2_5Omni.from_pretrained(sharded)


@pytest.mark.parametrize("cls", [HookedQwen2_5Omni, HookedVideoSALMONN2])
def test_a_folder_without_a_usable_config_says_which_and_what_to_do(cls, saved, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is an empty folder; pass the checkpoint folder"):
        cls.from_pretrained(empty)
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(saved / "model.safetensors", weights_only)
    with pytest.raises(FileNotFoundError, match=r"weights_only has no config\.json \(it holds \['model\.safetensors'\]\)"):
        cls.from_pretrained(weights_only)
    broken = shutil.copytree(weights_only, tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "qwen2_5_omni_thinker", ')
    with pytest.raises(ValueError, match=r"broken/config\.json is not valid JSON"):
        cls.from_pretrained(broken)


def test_a_config_without_model_type_says_what_it_should_hold(saved, tmp_path):
    d = shutil.copytree(saved, tmp_path / "untyped")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json has no model_type.*'qwen2_5_omni'"):
        HookedQwen2_5Omni.from_pretrained(d)


def test_a_tokenizer_that_needs_custom_code_is_refused_without_trust_remote_code_advice(ckpt):
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "FancyTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_fancy.FancyTokenizer", None]},
    }))
    _truncate(ckpt / "model.safetensors")  # the tokenizer is checked before any weight is read
    with pytest.raises(ValueError, match=r"tokenizer .* needs custom code, which hooked_av never runs.*model\.tokenizer = ") as e:
        HookedQwen2_5Omni.from_pretrained(ckpt)
    assert "trust_remote_code" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_integer_weights_are_refused_with_their_key(ckpt, dtype):
    tensors = load_file(ckpt / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=rf"weight '{key}' is {dtype}.*quantised checkpoints are not supported"):
        HookedQwen2_5Omni.from_pretrained(ckpt)


# ---- the toy's prepare from files ------------------------------------------------------------------
def write_lossless_clip(path, frames: np.ndarray, wave: np.ndarray | None, fps: int = 2):
    """A Matroska file with lossless video (FFV1, RGB) and, when given, a float32 PCM track at 16 kHz:
    decoding gives back exactly `frames` (uint8) and `wave`."""
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        a = None if wave is None else c.add_stream("pcm_f32le", rate=SAMPLE_RATE, layout="mono")
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if a is not None:
            fr = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="flt", layout="mono")
            fr.sample_rate, fr.pts = SAMPLE_RATE, 0
            for pkt in list(a.encode(fr)) + list(a.encode()):
                c.mux(pkt)
    return path


def write_float_wav(path, wave: np.ndarray, rate: int = SAMPLE_RATE):
    import av

    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream("pcm_f32le", rate=rate, layout="mono")
        fr = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="flt", layout="mono")
        fr.sample_rate = rate
        for pkt in list(s.encode(fr)) + list(s.encode()):
            c.mux(pkt)
    return path


N_CLIPS = 8


@pytest.fixture(scope="module")
def toy_clips(tmp_path_factory):
    """Toy clips rendered to real files: `bank` holds the in-memory tensors of what the files hold
    (frames rounded to uint8, as any video file stores them), `float_bank` the unrounded clips."""
    d = tmp_path_factory.mktemp("toy_media")
    attrs, video, audio = render_clips(N_CLIPS, seed=71)  # a seed whose 8 clips include a match
    frames = video.round().astype(np.uint8)
    mkv = [write_lossless_clip(d / f"clip{i}.mkv", frames[i], audio[i]) for i in range(N_CLIPS)]
    wav = [write_float_wav(d / f"clip{i}.wav", audio[i]) for i in range(N_CLIPS)]
    return dict(bank=bank_from_media(attrs, frames, audio), float_bank=bank_from_media(attrs, video, audio),
                frames=frames, audio=audio, mkv=mkv, wav=wav, dir=d)


def test_toy_prepare_from_files_builds_exactly_the_training_format(toy_model, toy_clips):
    bank, tok = toy_clips["bank"], toy_model.tokenizer
    samples = [s for kind in toy.KINDS for s in toy.draw_samples(bank, 3, seed=5, kinds=(kind,))]
    # odd rows: a video file with its own audio track; even rows: frames in memory + a wav file
    prompts = [
        Prompt(s.text, items=[Item(video=toy_clips["mkv"][c]) if r % 2 else Item(video=toy_clips["frames"][c], audio=toy_clips["wav"][c])
                              for c in s.clips])
        for r, s in enumerate(samples)
    ]
    inputs = toy_model.prepare(prompts)
    ref = toy.collate(bank, samples, tok)
    assert inputs["input_ids"].tolist() == ref.inputs["input_ids"].tolist()
    assert inputs["use_audio_in_video"] is False
    for key, want in ref.inputs.items():
        assert inputs[key].shape == want.shape and inputs[key].dtype == want.dtype, key
        assert (inputs[key].double() - want.double()).abs().max() < 1e-5, key
    with torch.no_grad():
        from_files, in_memory = toy_model(**inputs)[:, -1], toy_model(**ref.inputs)[:, -1]
        unrounded = toy_model(**toy.collate(toy_clips["float_bank"], samples, tok).inputs)[:, -1]
    assert (from_files - in_memory).abs().max() < 1e-5
    assert from_files.argmax(-1).tolist() == unrounded.argmax(-1).tolist() == ref.answers.tolist()

    one = samples[0]  # the single-clip call of the README
    c = one.clips[0]
    single = toy_model.prepare(one.text, video=toy_clips["mkv"][c])
    assert single["input_ids"].tolist() == toy.collate(bank, [one], tok).inputs["input_ids"].tolist()
    single = toy_model.prepare(one.text, video=toy_clips["frames"][c], audio=(toy_clips["audio"][c], SAMPLE_RATE))
    assert (single["input_features"] - bank.features[c : c + 1]).abs().max() == 0


def test_toy_prepare_refuses_what_the_toy_never_saw(toy_model, toy_clips, tmp_path):
    mkv, frames, wav = toy_clips["mkv"][0], toy_clips["frames"][0], toy_clips["wav"][0]
    q = "what colour is the shape ?"
    with pytest.raises(ValueError, match=r"not in the toy vocabulary: \['Which', 'colour\?'\]"):
        toy_model.prepare("Which colour?", video=mkv)
    with pytest.raises(ValueError, match=r"trained on 56x56 px frames; .*clip\.mp4 has 48x64"):
        toy_model.prepare(q, video=write_mp4(tmp_path / "clip.mp4", seconds=1.0, fps=2))
    long = write_lossless_clip(tmp_path / "long.mkv", np.concatenate([frames] * 3), None)
    with pytest.raises(ValueError, match=r"trained on 2 frames per clip \(1\.0 s at 2\.0 fps\); .*long\.mkv gives 6 at 2 fps"):
        toy_model.prepare(q, video=long, audio=wav)
    fast = write_lossless_clip(tmp_path / "fast.mkv", np.repeat(frames, 5, axis=0), None, fps=10)  # 1 s at 10 fps
    with pytest.raises(ValueError, match=r"fast\.mkv gives 4 at 4 fps: write the clip at 2\.0 fps"):
        toy_model.prepare(q, video=fast, audio=wav)
    with pytest.raises(ValueError, match=r"both video and audio.*audio="):
        toy_model.prepare(q, video=frames)
    with pytest.raises(ValueError, match=r"1\.0 s of audio per clip; .* 2\.50 s"):
        toy_model.prepare(q, video=frames, audio=(np.zeros(40000, np.float32), SAMPLE_RATE))
    with pytest.raises(ValueError, match=r"separate video and audio blocks.*use_audio_in_video=False"):
        toy_model.prepare(q, video=mkv, use_audio_in_video=True)
    with pytest.raises(ValueError, match=r"its own system prompt"):
        toy_model.prepare(Prompt(q, video=mkv, system="You are Qwen"))
    with pytest.raises(ValueError, match=r"one or two clips"):
        toy_model.prepare(Prompt(q, items=[Item(video=mkv)] * 3))


# ---- the flow CLI ---------------------------------------------------------------------------------
def _flow(*args, out):
    return main(["flow", *args, "--window", "1", "--out", str(out)])


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_flow_refuses_an_answer_or_question_the_toy_tokenizer_does_not_know(toy_clips, tmp_path, capsys):
    mkv = str(toy_clips["mkv"][0])
    assert _flow("--model", "toy", "--video", mkv, "--question", "what colour is the shape ?", "--answer", "C", out=tmp_path) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "answer 'C'" in err and "<|unk|>" in err
    assert _flow("--model", "toy", "--video", mkv, "--question", "What colour?", "--answer", "red", out=tmp_path) == 2
    assert "['What', 'colour?']" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "report.html").exists()


def test_flow_checks_media_before_loading_the_model(tmp_path, capsys):
    no_model = tmp_path / "no_model"
    no_model.mkdir()  # loading it would fail: the media errors must come first
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    silent = write_mp4(tmp_path / "silent.mp4", seconds=1.0, with_audio=False)
    cases = [
        (["--video", str(tmp_path / "missing.mp4")], "media file '.*missing.mp4' does not exist"),
        (["--video", str(junk)], "cannot read media file '.*junk.mp4'"),
        (["--audio", str(silent)], "'.*silent.mp4' has no audio stream"),
        ([], "give --video and/or --audio"),
    ]
    import re

    for media, message in cases:
        assert _flow("--model", str(no_model), *media, "--question", "What?", "--answer", "dog", out=tmp_path) == 2
        assert re.search(message, _one_error_line(capsys.readouterr().err)), message
    assert _flow("--model", str(no_model), "--video", str(silent), "--question", "What?", "--answer", "dog", out=tmp_path) == 2
    assert "no_model is an empty folder" in _one_error_line(capsys.readouterr().err)


def test_a_bug_inside_flow_keeps_its_traceback(monkeypatch):
    import patching.apps.flow

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(patching.apps.flow, "run_flow", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["flow", "--model", "toy", "--question", "q", "--answer", "a"])


def test_flow_warns_when_the_answer_is_not_the_models_prediction(toy_clips, tmp_path, capsys):
    bank = toy_clips["bank"]
    colour = toy.vocab.COLOURS[bank.attrs["colour"][0]]
    wrong = next(c for c in toy.vocab.COLOURS if c != colour)
    args = ["--model", "toy", "--video", str(toy_clips["mkv"][0]), "--question", "what colour is the shape ?"]
    assert _flow(*args, "--answer", colour, out=tmp_path / "right") == 0
    assert "warning" not in capsys.readouterr().err
    assert "warning" not in (tmp_path / "right" / "report.html").read_text()

    assert _flow(*args, "--answer", wrong, out=tmp_path / "wrong") == 0
    err = capsys.readouterr().err
    assert f"warning: the model does not predict the answer {wrong!r}: p = " in err
    assert f"its top prediction is {colour!r}" in err
    assert f"its top prediction is {colour!r}" in (tmp_path / "wrong" / "report.html").read_text().replace("&#x27;", "'")
