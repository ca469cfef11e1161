"""Media -> video-SALMONN 2+ inputs (`HookedVideoSALMONN2.prepare`): SALMONN's audio front end (30 s
Whisper chunks, 60 tokens each), frame sampling, the interleaved block per grid step, several items,
left padding, the TokenMap's position mode, and clear errors. Media are written by the tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import salmonn_helpers as H
from media_helpers import moving_frames, sine, write_mp4, write_wav

from hooked_av import HookedVideoSALMONN2
from hooked_av.inputs.media import load_audio
from hooked_av.families.video_salmonn2.layout import audio_per_step
from hooked_av.inputs.prompt import Item, Prompt

IM_START, IM_END, USER, PAD = 300, 301, 302, 303
WORDS = ["system", "assistant", "\n", " ", "What", "makes", "the", "sound", "?", ":", "Clip", "1", "2", ".", "You",
         "are", "a", "helpful", "Which", "clip", "has", "dog", "A", "B", "cat", "Describe", "[UNK]"]
SPECIALS = {"<|image_pad|>": H.IMAGE, "<|video_pad|>": H.VIDEO, "<|vision_start|>": H.VISION_START,
            "<|vision_end|>": H.VISION_END, "<|audio_pad|>": H.AUDIO, "<|im_start|>": IM_START,
            "<|im_end|>": IM_END, "<|endoftext|>": PAD}


def salmonn_tokenizer():
    """A word-level fast tokenizer over the tiny SALMONN ids (`<|audio_pad|>` is H.AUDIO, ...)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"user": USER} | SPECIALS
    used = set(vocab.values())
    vocab |= {f"<unused{i}>": i for i in range(320) if i not in used}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def whisper(wave: np.ndarray) -> torch.Tensor:
    """The stock feature extractor run directly on a 16 kHz waveform: `[1, 128, 3000]`."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=H.N_MELS, sampling_rate=16000, hop_length=160, chunk_length=30)
    return fe(wave, sampling_rate=16000, return_tensors="pt")["input_features"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("salmonn_media")
    junk = d / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    return dict(mp4=write_mp4(d / "clip.mp4", seconds=3.0, fps=10), silent=write_mp4(d / "silent.mp4", 2.0, with_audio=False),
                wav=write_wav(d / "tone.wav", 1.5, 22050), junk=junk)


@pytest.fixture(scope="module")
def config():
    return H.Reference(seed=0).salmonn_config()


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    m = HookedVideoSALMONN2.from_config(config)
    m.tokenizer = salmonn_tokenizer()
    return m


def _block(ids: torch.Tensor) -> list[int]:
    """The ids between the first <|vision_start|> and its <|vision_end|>."""
    ids = ids.tolist()
    s = ids.index(H.VISION_START)
    return ids[s + 1 : ids.index(H.VISION_END, s)]


def test_video_file_with_its_track_makes_the_interleaved_block_and_runs(model, media):
    inputs = model.prepare("What makes the sound?", video=media["mp4"])
    ids = inputs["input_ids"]
    # audio: 3 s -> one 30 s chunk -> ceil(3 / 30) * 60 = 60 tokens, equal to the placeholders
    wave = load_audio(media["mp4"]).waveform
    assert inputs["input_features"].shape == (1, H.N_MELS, 3000)
    assert int((ids == H.AUDIO).sum()) == math.ceil(len(wave) / 16000 / 30) * 60 == 60
    torch.testing.assert_close(inputs["input_features"], whisper(wave), atol=0, rtol=0)
    # video: 3 s at 10 fps -> 30 frames (inside [16, 768]) -> 15 grid steps of 2 frames; 48x64 -> 56x56
    grid = inputs["video_grid_thw"][0].tolist()
    assert grid == [15, 4, 4]
    assert int((ids == H.VIDEO).sum()) == grid[0] * grid[1] * grid[2] // 4
    assert inputs["pixel_values_videos"].shape == (15 * 4 * 4, H.PATCH_DIM)
    # layout: per step 4 video tokens then floor(t * 0.2 s * 2) differences of audio, the last the rest
    body, expected = _block(ids[0]), []
    for n in audio_per_step(15, 2 / 10, 60):
        expected += [H.VIDEO] * 4 + [H.AUDIO] * n
    assert body == expected
    # the chat template: system, user header, block, "\n", question, assistant header
    tok = model.tokenizer
    assert ids[0, : ids[0].tolist().index(H.VISION_START)].tolist() == tok.encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert ids[0, ids[0].tolist().index(H.VISION_END) + 1 :].tolist() == tok.encode(
        "\nWhat makes the sound?<|im_end|>\n<|im_start|>assistant\n")
    assert inputs["position_mode"] == "inference" and inputs["video_second_per_grid"].tolist() == [pytest.approx(2 / 10)]
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()
    tm = model.token_map(inputs)
    assert tm.count("audio").tolist() == [60] and tm.count("video").tolist() == [60]
    assert tm.position_mode == "inference" == model.position_mode
    assert tm.describe().splitlines()[0] == "position_mode=inference"
    assert tm.extend(2).position_mode == "inference"
    assert tm.count("system").tolist() == [len(tok.encode("You are a helpful assistant."))]


def test_training_mode_passes_seconds_per_grid_and_the_map_says_so(model, config, media):
    tr = model.prepare("What makes the sound?", video=media["mp4"], position_mode="training")
    assert tr["position_mode"] == "training"
    assert tr["video_second_per_grid"].tolist() == [pytest.approx(2 / 10)]
    tm = model.token_map(tr)
    assert tm.position_mode == "training" and tm.count("audio").tolist() == [60]
    # video step t starts at t * 0.2 s; audio token k at k * 0.5 s
    assert tm.time[0, tm.positions("video")].unique().tolist() == pytest.approx([t * 0.2 for t in range(15)])
    assert tm.time[0, tm.positions("audio")].tolist() == [k * 0.5 for k in range(60)]
    inf = model.prepare("What makes the sound?", video=media["mp4"])
    assert torch.equal(tr["input_ids"], inf["input_ids"])
    with torch.no_grad():
        assert (model(**tr) - model(**inf)).abs().max() > 1e-4  # the two modes place positions differently
    trained = HookedVideoSALMONN2.from_config(config, position_mode="training")
    trained.tokenizer = model.tokenizer
    out = trained.prepare("What makes the sound?", video=media["mp4"])
    assert out["position_mode"] == "training" and trained.token_map(out).position_mode == "training"


def test_audio_is_padded_to_1s_and_cut_into_30s_chunks(model, media):
    rng = np.random.default_rng(0)
    long = (0.1 * rng.standard_normal(31 * 16000)).astype(np.float32)
    inputs = model.prepare("Describe the sound.", audio=(long, 16000))
    f = inputs["input_features"]
    assert f.shape == (2, H.N_MELS, 3000)
    assert int((inputs["input_ids"] == H.AUDIO).sum()) == math.ceil(31 / 30) * 60 == 120
    torch.testing.assert_close(f[:1], whisper(long[: 30 * 16000]), atol=0, rtol=0)
    torch.testing.assert_close(f[1:], whisper(long[30 * 16000 :]), atol=0, rtol=0)
    assert _block(inputs["input_ids"][0]) == [H.AUDIO] * 120  # audio only: one run inside the block
    with torch.no_grad():
        assert torch.isfinite(model(**inputs)).all()
    short = model.prepare("Describe the sound.", audio=(long[:4800], 16000))  # 0.3 s -> padded to 1 s
    assert int((short["input_ids"] == H.AUDIO).sum()) == 60
    wav = model.prepare("Describe the sound.", audio=media["wav"])  # 22.05 kHz file, resampled
    torch.testing.assert_close(wav["input_features"], whisper(load_audio(media["wav"]).waveform), atol=0, rtol=0)
    tm = model.token_map(inputs)
    assert tm.count("audio").tolist() == [120] and tm.count("audio", time=(30.0, 60.0)).tolist() == [60]


def test_sampling_parameters_clip_the_frame_count(model, media):
    def grid_t(**kw):
        return model.prepare("What makes the sound?", video=media["mp4"], position_mode="training", **kw)

    low = grid_t(fps=2.0)  # round(3 s * 2) = 6 frames, raised to min_frames 16
    assert low["video_grid_thw"][0, 0].item() == 8
    assert low["video_second_per_grid"].item() == pytest.approx(2 / (16 / 3))  # 2 / the rate actually sampled
    capped = grid_t(max_frames=8, min_frames=4)
    assert capped["video_grid_thw"][0, 0].item() == 4
    small = grid_t(max_pixels=28 * 28)
    assert small["video_grid_thw"][0, 1:].tolist() == [2, 2]
    assert model.processor_parts.fps == 10.0  # per-call settings leave the model's parts alone


def test_interleaved_items_and_a_left_padded_batch(model, media):
    frames = moving_frames(6, 56, 84, seed=2)  # numpy frames are taken as sampled at 10 fps
    clip2 = Item(video=frames, audio=(sine(0.6, 44100), 44100), label="Clip 2: ")
    batch = [
        Prompt("Which clip has a dog?", items=[Item(video=media["mp4"], label="Clip 1: "), clip2], options=["cat", "dog"]),
        Prompt("What makes the sound?", audio=media["wav"], system=None),
    ]
    inputs = model.prepare(batch)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert inputs["video_grid_thw"].tolist() == [[15, 4, 4], [3, 4, 6]]
    assert inputs["input_features"].shape[0] == 3  # clip 1, clip 2, row 1's audio, in prompt order
    assert mask[1, 0] == 0 and ids[1, 0] == PAD and mask[0].all()  # row 1 is shorter: left-padded
    tm = model.token_map(inputs)
    assert tm.count("video[1]").tolist() == [3 * 4 * 6 // 4, 0] and tm.count("audio[1]").tolist() == [60, 0]
    assert tm.count("audio").tolist() == [120, 60] and tm.count("system").tolist()[1] == 0
    assert not (tm.mask("all") & ~mask.bool()).any()
    text = [t for t in ids[0].tolist() if t not in (H.VIDEO, H.AUDIO, H.VISION_START, H.VISION_END)]
    want = model.tokenizer.encode("Clip 1: \nClip 2: \nWhich clip has a dog?\nA. cat\nB. dog<|im_end|>")
    assert text[-len(want) - 4 : -4] == want  # before "\n<|im_start|>assistant\n"
    with torch.no_grad():
        logits = model(**inputs)
    assert torch.isfinite(logits[mask.bool()]).all()


def test_bad_input_is_refused_with_a_clear_message(model, media):
    with pytest.raises(ValueError, match="question is empty"):
        model.prepare("  ", video=media["mp4"])
    with pytest.raises(ValueError, match="has no audio track, but its audio was requested"):
        model.prepare("What makes the sound?", video=media["silent"], use_audio_in_video=True)
    silent = model.prepare("What makes the sound?", video=media["silent"])  # default: frames only
    assert int((silent["input_ids"] == H.AUDIO).sum()) == 0 and "input_features" not in silent
    with pytest.raises(ValueError, match="cannot read media file"):
        model.prepare("What makes the sound?", video=media["junk"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.prepare("What makes the sound?", audio="/nonexistent/a.wav")
    with pytest.raises(ValueError, match="must be uint8"):
        model.prepare("What makes the sound?", video=np.zeros((4, 56, 56, 3), np.float32))
    with pytest.raises(ValueError, match=r"must be an array \[T, H, W, 3\]"):
        model.prepare("What makes the sound?", video=np.zeros((56, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="contains a media placeholder token"):
        model.prepare("What <|audio_pad|> sound?", audio=media["wav"])
    with pytest.raises(ValueError, match="position_mode 'train' is unknown"):
        model.prepare("What makes the sound?", audio=media["wav"], position_mode="train")
    with pytest.raises(ValueError, match="need fps > 0"):
        model.prepare("What makes the sound?", video=media["mp4"], fps=0)
