"""Clips numbered as the prompt has them, on every family's `prepare` and the toy's: a prompt whose first
clip has only an image (or only video) and whose second only audio, labels or not, was numbered as one clip
(`audio[0]` named the second clip's audio; the ids alone cannot tell, as the processors lay the blocks out
back to back). `prepare` records each media token's item (`inputs["media_items"]`) and every TokenMap
numbers by it; without the record a clip label between two blocks splits them. The expected items are
written from how each prompt is laid out: item k holds the placeholders of its own media."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from media_helpers import moving_frames, sine
from test_inputs import model as omni  # noqa: F401  (the tiny Omni with a tokenizer and processor parts)
from test_prompt_parts import salmonn  # noqa: F401  (the tiny SALMONN with its tokenizer)

from hooked_av import HookedQwen3Omni
from hooked_av.inputs import Item, Prompt

torch.set_num_threads(1)
WAVE = (sine(1.0, 16000, 440.0), 16000)


@pytest.fixture(scope="module")
def qwen3():
    from qwen3_omni_helpers import tiny_thinker_config, tiny_tokenizer

    torch.manual_seed(0)
    m = HookedQwen3Omni.from_config(tiny_thinker_config())
    m.tokenizer = tiny_tokenizer()
    return m


def _image(seed: int) -> np.ndarray:
    return moving_frames(1, 56, 56, seed=seed)[0]


def expected_items(inputs, row: int, items: list[Item], media_ids: dict) -> list[int]:
    """The item of each media placeholder of `row`, from the prompt: the blocks come item by item, each in the
    order image, video, audio (a video's audio inside its block when the inputs interleave them), so the k-th
    block of placeholders belongs to the item that lays it out."""
    av = bool(inputs.get("use_audio_in_video"))
    owners = [k for k, it in enumerate(items) for m in ("image", "video", "audio") if getattr(it, m) is not None
              and not (m == "audio" and av and it.video is not None)]
    ids = inputs["input_ids"][row].tolist()
    out, block, prev = [], -1, False
    for t in ids:
        media = t in media_ids
        if media and not prev:
            block += 1
        out.append(owners[block] if media else -1)
        prev = media
    return out


PROMPTS = {
    "image_then_audio": [Item(image=_image(0)), Item(audio=WAVE)],
    "labelled": [Item(image=_image(0), label="first: "), Item(audio=WAVE, label="second: ")],
    "video_then_audio": [Item(video=moving_frames(4, 56, 56, seed=1)), Item(audio=WAVE)],
    "image_then_image_and_audio": [Item(image=_image(0)), Item(image=_image(1), audio=WAVE)],
    "image_then_video_with_its_audio": [Item(image=_image(0)), Item(video=moving_frames(4, 56, 56, seed=1), audio=WAVE)],
}


SALMONN_FRAMES = 16


@pytest.mark.parametrize("family", ["omni", "salmonn", "qwen3"])
@pytest.mark.parametrize("case", list(PROMPTS))
def test_items_follow_the_prompts_clips(family, case, request):
    model = request.getfixturevalue(family)
    items = PROMPTS[case]
    if family == "salmonn":  # SALMONN samples more frames than the 4-frame clip holds: the same case, a longer clip
        items = [dataclasses.replace(it, video=moving_frames(SALMONN_FRAMES, 56, 56, seed=1)) if it.video is not None
                 else it for it in items]
    inputs = model.prepare([Prompt("what sounds ?", items=items), Prompt("what is shown ?", image=_image(5))])
    tm = model.token_map(inputs)
    media_ids = {model.ids.audio, model.ids.video, model.ids.image}
    for row, its in ((0, items), (1, [Item(image=_image(5))])):
        want = expected_items(inputs, row, its, media_ids)
        assert tm.item[row].tolist() == want, (case, row)
    n_audio = int((inputs["input_ids"][0] == model.ids.audio).sum())
    assert tm.count("audio[1]").tolist() == [n_audio, 0] and tm.count("audio[0]").tolist() == [0, 0]
    extra = {"image_then_image_and_audio": int((inputs["input_ids"][0] == model.ids.image).sum()) // 2,
             "image_then_video_with_its_audio": int((inputs["input_ids"][0] == model.ids.video).sum())}.get(case, 0)
    assert tm.count("item[1]").tolist()[0] == n_audio + extra
    assert int(tm.count("item[0]")[0]) > 0  # two clips, so an item[0] -> item[1] edge exists
    # the record survives the map's growth under generation
    assert torch.equal(tm.extend(3).item[:, :-3], tm.item)




@pytest.mark.parametrize("family", ["omni", "salmonn", "qwen3"])
def test_without_the_record_a_clip_label_splits_the_blocks(family, request):
    model = request.getfixturevalue(family)
    inputs = model.prepare(Prompt("what sounds ?", items=PROMPTS["labelled"]))
    bare = {k: v for k, v in inputs.items() if k != "media_items"}
    assert torch.equal(model.token_map(bare).item, model.token_map(inputs).item)
    neither = {k: v for k, v in bare.items() if k != "text_parts"}  # ids alone: one clip, as documented
    assert model.token_map(neither).item.max() == 0
    with pytest.raises(ValueError, match=r"inputs\['media_items'\] has shape"):
        model.token_map({**inputs, "media_items": inputs["media_items"][:, 1:]})
    shuffled = inputs["media_items"].clone()
    shuffled[shuffled == 1] = 7
    shuffled[0, (shuffled[0] >= 0).nonzero()[0, 0]] = 1  # one block holding two items
    with pytest.raises(ValueError, match=r"inputs\['media_items'\] gives the media block"):
        model.token_map({**inputs, "media_items": shuffled})
    with torch.no_grad():  # the model takes the record and ignores it
        assert torch.equal(model(**inputs), model(**bare))


def test_the_toys_clip_names_are_labels_and_its_clips_items(toy_model, tmp_path):
    # "clip one" / "clip two" were tagged question: question -> last and item[i] -> question held them
    from hooked_av.toy.dataset import write_toy_dataset
    from patching.datasets.manifest import read_manifest
    from patching.datasets.templates import parse_template

    rows = read_manifest(write_toy_dataset(tmp_path, n=6, seed=3)).rows
    two = next(r for r in rows if r.items)
    inputs = toy_model.prepare(parse_template("default").prompt(two))
    tm = toy_model.token_map(inputs)
    tok = toy_model.tokenizer
    words = tok.convert_ids_to_tokens(inputs["input_ids"][0])
    label = [w for w, g in zip(words, tm.names(0)) if g == "label"]
    assert label == ["clip", "one", "clip", "two"]
    question = [w for w, g in zip(words, tm.names(0)) if g in ("question", "last")]
    assert " ".join(question).startswith(two.question.split()[0]) and "one" not in question[:-3]
    assert tm.count("question").tolist() == [len(two.question.split())]
    assert tm.count("item[0]").tolist() == tm.count("item[1]").tolist() == [int((tm.item[0] == 0).sum())]
    one = toy_model.prepare(parse_template("default").prompt(next(r for r in rows if not r.items)))
    assert toy_model.token_map(one).count("label").tolist() == [0]
