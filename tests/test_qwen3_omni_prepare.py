"""Media -> Qwen3-Omni inputs: `model.prepare` equal (torch.equal) to HF's `Qwen3OmniMoeProcessor` assembled
offline from the same components (a video file with its audio track; two labelled clips, one with an
explicit waveform, and an image with a wav in a left-padded batch), the text parts recorded and labelled by
the TokenMap with items numbered by clip, and the prepared inputs run by the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from media_helpers import sine, write_mp4, write_wav
from qwen3_omni_helpers import AUDIO, QWEN3_CHAT_TEMPLATE, VIDEO, tiny_thinker_config, tiny_tokenizer

from hooked_av import HookedQwen3Omni
from hooked_av.families.qwen2_5_omni.prompt import messages_for
from hooked_av.families.qwen3_omni.layout import audio_token_counts
from hooked_av.inputs.media import load_audio, load_video, resample
from hooked_av.inputs.prompt import Item, Prompt

torch.set_num_threads(1)
KEYS = ["input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
        "pixel_values_videos", "video_grid_thw", "video_second_per_grid"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    from media_helpers import moving_frames

    d = tmp_path_factory.mktemp("media")
    png = d / "img.png"
    Image.fromarray(moving_frames(1, 60, 90, seed=3)[0]).save(png)
    # 4 s at 10 fps: sampled at the processor's 1 frame/s, 4 frames, exactly 1.0 frame/s
    return dict(mp4=write_mp4(d / "clip.mp4", seconds=4.0), mp4b=write_mp4(d / "clip2.mp4", seconds=4.0, seed=1),
                wav=write_wav(d / "tone.wav", 1.5, 22050), png=png)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HookedQwen3Omni.from_config(tiny_thinker_config())
    m.tokenizer = tiny_tokenizer()
    return m


def hf_processor(model):
    from transformers import Qwen3OmniMoeProcessor

    parts = model.processor_parts
    return Qwen3OmniMoeProcessor(image_processor=parts.image_processor, video_processor=parts.video_processor,
                                 feature_extractor=parts.feature_extractor, tokenizer=parts.tokenizer,
                                 chat_template=QWEN3_CHAT_TEMPLATE)


def assert_same(ours: dict, hf) -> list[str]:
    compared = []
    for k in KEYS:
        assert (k in ours) == (k in hf), k
        if k in ours:
            theirs = torch.as_tensor(hf[k])
            assert ours[k].shape == theirs.shape and ours[k].dtype == theirs.dtype, (k, ours[k].shape, theirs.shape)
            assert torch.equal(ours[k], theirs), k
            compared.append(k)
    return compared


def test_video_file_with_its_audio_track_equals_hf_processor(model, media):
    ours = model.prepare("What makes the sound?", video=media["mp4"], return_text=True)
    assert ours["use_audio_in_video"] is True
    proc = hf_processor(model)
    msgs = messages_for(Prompt("What makes the sound?", video=media["mp4"]), True, default_system=None)
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ours["text"][0]  # the chat template (Qwen3's ChatML), in Python
    assert not text.startswith("<|im_start|>system")  # Qwen3's ChatML writes no default system message
    v = load_video(media["mp4"], fps=1.0, with_audio=True)
    assert v.fps == 1.0 and len(v.frames) == 4
    hf = proc(text=[text], videos=[v.frames], audio=[v.audio.waveform], load_audio_from_video=True,
              audio_from_video_indices=[0], padding=True, return_tensors="pt")
    assert assert_same(ours, hf) == ["input_ids", "attention_mask", "input_features", "feature_attention_mask",
                                     "pixel_values_videos", "video_grid_thw", "video_second_per_grid"]
    frames = int(ours["feature_attention_mask"].sum())
    assert 400 < frames < 500 and audio_token_counts(ours["feature_attention_mask"], model.n_window) == [53]  # 13 a second + the tail
    assert float(ours["video_second_per_grid"][0]) == 2.0
    row = ours["input_ids"][0].tolist()
    body = [t for t in row if t in (AUDIO, VIDEO)]
    assert body.count(AUDIO) == 53 and body[0] == VIDEO and body[-1] == AUDIO  # interleaved, video first on ties
    inputs = {k: v for k, v in ours.items() if k != "text"}
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (1, len(row), model.cfg.d_vocab) and torch.isfinite(logits).all()


def test_two_clips_image_and_wav_in_a_left_padded_batch_equal_hf_processor(model, media):
    from PIL import Image

    wave = sine(4.0, 44100, 330.0)
    rows = [
        Prompt("Which clip has the dog?", items=[Item(video=media["mp4"], label="Clip 1: "),
                                                 Item(video=media["mp4b"], audio=(wave, 44100), label="Clip 2: ")]),
        Prompt("What makes the sound?", image=media["png"], audio=media["wav"], options=["dog", "cat"],
               instruction="Answer with a single word."),
    ]
    ours = model.prepare(rows, use_audio_in_video=True, return_text=True)
    v0, v1 = load_video(media["mp4"], with_audio=True, fps=1.0), load_video(media["mp4b"], fps=1.0)
    a1, wav = resample(wave, 44100), load_audio(media["wav"])
    img = np.asarray(Image.open(media["png"]).convert("RGB"))
    hf = hf_processor(model)(text=ours["text"], videos=[v0.frames, v1.frames],
                             audio=[v0.audio.waveform, a1.waveform, wav.waveform], images=[img],
                             load_audio_from_video=True, audio_from_video_indices=[0, 1, None], padding=True,
                             return_tensors="pt")
    assert len(assert_same(ours, hf)) == 9
    assert ours["attention_mask"][1, 0] == 0 and ours["attention_mask"][0].all()  # left padding
    assert audio_token_counts(ours["feature_attention_mask"], model.n_window) == [53, 52, 20]  # the track (4.0x s), the explicit 4 s waveform, 1.5 s of wav
    assert "A. dog\nB. cat\nAnswer with a single word." in ours["text"][1]

    tm = model.token_map(ours)
    assert tm.describe()
    for row, expect in ((0, {"label", "question", "video", "audio"}), (1, {"question", "options", "instruction",
                                                                          "image", "audio"})):
        assert expect <= set(tm.names(row)), (row, set(tm.names(row)))
    text_of = lambda row, g: model.tokenizer.decode(ours["input_ids"][row][tm.mask(g)[row]])  # noqa: E731
    assert text_of(0, "label").replace(" ", "") == "Clip1:Clip2:"
    assert text_of(1, "options").replace(" ", "").replace("\n", "") == "A.dogB.cat"
    assert text_of(1, "question").replace(" ", "") == "Whatmakesthesound?"
    assert text_of(1, "instruction").startswith("\n") and text_of(1, "instruction").count("[UNK]") == 4  # 4 new words
    # items are clips: row 0 has clips 0 and 1 (each a video and its audio), row 1 one clip (an image and a wav)
    n_video1, n_image = int(ours["video_grid_thw"][1].prod()) // 4, int(ours["image_grid_thw"][0].prod()) // 4
    for row, spec, n in ((0, "item[1]", n_video1 + 52), (1, "item[0]", n_image + 20), (1, "item[1]", 0)):
        assert int(tm.mask(spec)[row].sum()) == n, (row, spec)
    assert int(tm.mask("audio[1]")[0].sum()) == 52 and int(tm.mask("audio[0]")[0].sum()) == 53
    inputs = {k: v for k, v in ours.items() if k != "text"}
    with torch.no_grad():
        logits = model(**inputs)
    assert torch.isfinite(logits[ours["attention_mask"].bool()]).all()


def test_prepare_refuses_what_the_processor_would_mishandle(model, media):
    with pytest.raises(ValueError, match="contains a media placeholder token"):
        model.prepare("What is <|audio_pad|>?", audio=media["wav"])
    with pytest.raises(ValueError, match="the question is empty"):
        model.prepare("  ", audio=media["wav"])
    kept = model.processor_parts
    with pytest.raises(ValueError, match="no tokenizer"):
        from hooked_av.families.qwen3_omni.processor import assemble_parts

        assemble_parts(None, model.hf_config)
    assert model.processor_parts is kept
