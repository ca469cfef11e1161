"""The user's text as groups of its own (issues 14, 11): a Prompt's question, lettered options and
instruction, and each clip's label, are recorded by `prepare` (`inputs["text_parts"]`) and come back
from `model.token_map` as the groups question, options, instruction and label, on both families. The
expected group arrays are written from how each prompt is assembled (piece by piece), the ids are
checked against the processor (Omni) and against a prompt that holds the same full text as its
question (both), and `model(**inputs)` / `model.encode(**inputs)` / `model.generate(**inputs)` take
prepare's output as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salmonn_helpers as H
from media_helpers import OMNI_CHAT_TEMPLATE, sine
from omni_helpers import AUDIO, Builder, batch, tiny_thinker_config
from test_inputs import model  # noqa: F401  (the tiny Omni with a tokenizer and processor parts)
from test_salmonn_inputs import salmonn_tokenizer
from test_token_map_groups import CHAT

from hooked_av import HookedVideoSALMONN2
from hooked_av.families.qwen2_5_omni.layout import audio_token_counts
from hooked_av.families.qwen2_5_omni.processor import hf_processor
from hooked_av.families.qwen2_5_omni.prompt import OMNI_SYSTEM_PROMPT
from hooked_av.families.video_salmonn2.prompt import SALMONN_SYSTEM_PROMPT
from hooked_av.inputs import Item, Prompt
from hooked_av.inputs.prompt import check_offsets, text_part_codes
from hooked_av.inputs.token_map import TEXT_PARTS
from patching.backends.nnsight_hf import hf_token_map

torch.set_num_threads(1)
QUESTION = "Which clip has the dog?"
OPTIONS = ["Clip 1", "Clip 2"]
INSTRUCTION = "Answer with a single letter."
FULL = "Which clip has the dog?\nA. Clip 1\nB. Clip 2\nAnswer with a single letter."  # written out by hand


def _image(seed: int, h: int = 56, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


WAVE = (sine(0.5, 16000, 440.0), 16000)


def _items() -> list[Item]:
    """Clip 0: an image; clip 1: an image and a sound (each clip starts with an image, so the ids
    alone tell the clips apart)."""
    return [Item(image=_image(0), label="Clip 1: "), Item(image=_image(1), audio=WAVE, label="Clip 2: ")]


def _names(*runs: tuple[str, int]) -> list[str]:
    return [g for g, n in runs for _ in range(n)]


# ---- Prompt and the offset rule ---------------------------------------------------------------
def test_prompt_renders_question_options_instruction_in_order():
    p = Prompt(QUESTION, options=OPTIONS, instruction=INSTRUCTION)
    assert p.text() == FULL
    assert p.parts() == [("question", QUESTION), ("options", "\nA. Clip 1\nB. Clip 2"), ("instruction", "\n" + INSTRUCTION)]
    assert Prompt(QUESTION, instruction=INSTRUCTION).text() == QUESTION + "\n" + INSTRUCTION
    with pytest.raises(ValueError, match="the instruction is empty"):
        Prompt(QUESTION, instruction="  ").text()


def test_a_token_belongs_to_the_part_where_it_starts():
    # "Why?\nA. x": a BPE merge "?\n" straddles question and options; padding has an empty span
    segments = [("question", "Why?"), ("options", "\nA. x"), (None, "<|im_end|>")]
    offsets = torch.tensor([[0, 0], [0, 3], [3, 5], [5, 6], [6, 7], [7, 9], [9, 19]])
    q, o = TEXT_PARTS.index("question"), TEXT_PARTS.index("options")
    assert text_part_codes(offsets, segments).tolist() == [0, q, q, o, o, o, 0]


def test_a_tokenizer_without_offsets_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match=r"Slow gives no character offsets.*use_fast=True"):
        check_offsets(Slow())


def test_the_toy_refuses_an_instruction_it_was_not_trained_on():
    from hooked_av.toy.prepare import prepare

    with pytest.raises(ValueError, match="not trained on answer options or instructions"):
        prepare(None, Prompt("what colour is the shape ?", video=np.zeros((2, 56, 56, 3), np.uint8), instruction="answer ."))


# ---- Qwen2.5-Omni -----------------------------------------------------------------------------
def _n(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _omni_expected(tok, inputs, row: int, items: bool, options: bool) -> list[str]:
    """Row `row`'s groups, assembled as the chat template writes the prompt."""
    n = lambda text: _n(tok, text)  # noqa: E731
    runs = [("template", 3), ("system", n(OMNI_SYSTEM_PROMPT)), ("template", 2), ("template", 3)]
    if items:
        img = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
        runs += [("label", n("Clip 1: ")), ("template", 1), ("image", img[0]), ("template", 1)]
        runs += [("label", n("Clip 2: ")), ("template", 1), ("image", img[1]), ("template", 1)]
        runs += [("template", 1), ("audio", audio_token_counts(inputs["feature_attention_mask"])[0]), ("template", 1)]
        runs += [("question", n(QUESTION))]
    else:
        runs += [("template", 1), ("image", int(inputs["image_grid_thw"][-1].prod()) // 4), ("template", 1), ("question", n("What makes the sound?"))]
    if options:
        runs += [("options", n("\nA. Clip 1\nB. Clip 2")), ("instruction", n("\n" + INSTRUCTION))]
    runs += [("template", 4), ("last", 1)]  # <|im_end|> \n <|im_start|> assistant, then the final \n
    return _names(*runs)


def test_omni_groups_ids_equal_the_processor_and_the_model_takes_the_inputs(model):
    tok = model.tokenizer
    prompt = Prompt(QUESTION, items=_items(), options=OPTIONS, instruction=INSTRUCTION)
    inputs = model.prepare(prompt, return_text=True)
    text = inputs.pop("text")
    tm = model.token_map(inputs)
    assert tm.names(0) == _omni_expected(tok, inputs, 0, items=True, options=True)
    assert _n(tok, QUESTION) + _n(tok, "\nA. Clip 1\nB. Clip 2") + _n(tok, "\n" + INSTRUCTION) == _n(tok, FULL)

    # ids: the HF processor on the chat text with the whole user text as one text content
    msgs = [{"role": "system", "content": OMNI_SYSTEM_PROMPT}, {"role": "user", "content": [
        {"type": "text", "text": "Clip 1: "}, {"type": "image"}, {"type": "text", "text": "Clip 2: "}, {"type": "image"},
        {"type": "audio"}, {"type": "text", "text": FULL}]}]
    proc = hf_processor(model.processor_parts, chat_template=OMNI_CHAT_TEMPLATE)
    hf_text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == [hf_text]
    hf = proc(text=[hf_text], images=[_image(0), _image(1)], audio=[WAVE[0]], padding=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], hf["input_ids"]) and torch.equal(inputs["attention_mask"], hf["attention_mask"])

    # selections and the description; without the record all user text is "question", as before
    assert tm.count("options").tolist() == [_n(tok, "\nA. Clip 1\nB. Clip 2")]
    assert tm.count("instruction").tolist() == [_n(tok, "\n" + INSTRUCTION)]
    assert tm.count("label").tolist() == [_n(tok, "Clip 1: ") + _n(tok, "Clip 2: ")]
    described = [ln.split(")", 1)[1].split()[0] for ln in tm.describe().splitlines()]  # each segment's group[item]
    assert described.count("label") == 2 and described.count("options") == described.count("instruction") == 1
    old = model.token_map({k: v for k, v in inputs.items() if k != "text_parts"})
    assert torch.equal(old.mask("question"), tm.mask("user")) and old.count("options").tolist() == [0]
    n_audio = audio_token_counts(inputs["feature_attention_mask"])[0]
    assert torch.equal(old.item, tm.item) and tm.count("item[1]").tolist() == [int(inputs["image_grid_thw"][1].prod()) // 4 + n_audio]

    # the model takes prepare's output unchanged (text_parts accepted, not read)
    bare = {k: v for k, v in inputs.items() if k != "text_parts"}
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**bare))
        assert torch.equal(model.encode(**inputs)["inputs_embeds"], model.encode(**bare)["inputs_embeds"])
        assert torch.equal(model.generate(**inputs, max_new_tokens=2), model.generate(**bare, max_new_tokens=2))
    with pytest.raises(ValueError, match=r"inputs\['text_parts'\] has shape \(1, \d+\) but input_ids"):
        model.token_map({**inputs, "text_parts": inputs["text_parts"][:, 1:]})


def test_omni_left_padded_batch_where_one_row_has_options(model):
    tok = model.tokenizer
    rows = [Prompt("What makes the sound?", image=_image(2)),
            Prompt(QUESTION, items=_items(), options=OPTIONS, instruction=INSTRUCTION)]
    inputs = model.prepare(rows)
    mask = inputs["attention_mask"].bool()
    assert not mask[0, 0] and mask[1].all()  # row 0 is shorter: left-padded
    assert (inputs["text_parts"][~mask] == 0).all()
    tm = model.token_map(inputs)
    n_pad = int((~mask[0]).sum())
    assert tm.names(0) == ["padding"] * n_pad + _omni_expected(tok, {"image_grid_thw": inputs["image_grid_thw"][:1]}, 0, items=False, options=False)
    assert tm.names(1) == _omni_expected(tok, {**inputs, "image_grid_thw": inputs["image_grid_thw"][1:]}, 1, items=True, options=True)
    assert tm.count("options").tolist() == [0, _n(tok, "\nA. Clip 1\nB. Clip 2")]
    alone = model.prepare(rows[0])  # the short row by itself: the same ids and parts after the padding
    assert torch.equal(inputs["input_ids"][0, n_pad:], alone["input_ids"][0])
    assert torch.equal(inputs["text_parts"][0, n_pad:], alone["text_parts"][0])
    with torch.no_grad():
        logits = model(**inputs)
    assert torch.isfinite(logits[mask]).all()


# ---- video-SALMONN 2+ ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def salmonn():
    torch.manual_seed(0)
    m = HookedVideoSALMONN2.from_config(H.Reference(seed=0).salmonn_config())
    m.tokenizer = salmonn_tokenizer()
    return m


def _salmonn_expected(tok, inputs, items: bool, options: bool, question: str) -> list[str]:
    n = lambda text: _n(tok, text)  # noqa: E731
    runs = [("template", 3), ("system", n(SALMONN_SYSTEM_PROMPT)), ("template", 2), ("template", 3)]
    img = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    if items:
        runs += [("label", n("Clip 1: ")), ("template", 1), ("image", img[0]), ("template", 1), ("template", 1)]
        runs += [("label", n("Clip 2: ")), ("template", 1), ("image", img[1]), ("template", 1)]
        runs += [("template", 1), ("audio", H.TOKENS_PER_CHUNK), ("template", 1), ("template", 1)]  # the item's "\n"
    else:
        runs += [("template", 1), ("image", img[0]), ("template", 1), ("template", 1)]
    runs += [("question", n(question))]
    if options:
        runs += [("options", n("\nA. Clip 1\nB. Clip 2")), ("instruction", n("\n" + INSTRUCTION))]
    return _names(*runs, ("template", 4), ("last", 1))


def test_salmonn_groups_ids_of_the_whole_text_and_the_model_takes_the_inputs(salmonn):
    tok = salmonn.tokenizer
    inputs = salmonn.prepare(Prompt(QUESTION, items=_items(), options=OPTIONS, instruction=INSTRUCTION))
    tm = salmonn.token_map(inputs)
    assert tm.names(0) == _salmonn_expected(tok, inputs, items=True, options=True, question=QUESTION)
    same_text = salmonn.prepare(Prompt(FULL, items=_items()))  # the full text given as the question
    assert torch.equal(inputs["input_ids"], same_text["input_ids"])
    assert salmonn.token_map(same_text).count("question").tolist() == [_n(tok, FULL)]
    assert tm.count("item[0]").tolist() == [int(inputs["image_grid_thw"][0].prod()) // 4]
    assert tm.count("item[1]").tolist() == [int(inputs["image_grid_thw"][1].prod()) // 4 + H.TOKENS_PER_CHUNK]
    bare = {k: v for k, v in inputs.items() if k != "text_parts"}
    old = salmonn.token_map(bare)
    assert torch.equal(old.mask("question"), tm.mask("user") | (tm.mask("template") & ~old.mask("template")))
    with torch.no_grad():
        assert torch.equal(salmonn(**inputs), salmonn(**bare))
        assert torch.equal(salmonn.encode(**inputs)["inputs_embeds"], salmonn.encode(**bare)["inputs_embeds"])


def test_salmonn_left_padded_batch_where_one_row_has_options(salmonn):
    tok = salmonn.tokenizer
    rows = [Prompt(QUESTION, items=_items(), options=OPTIONS, instruction=INSTRUCTION),
            Prompt("What makes the sound?", image=_image(2))]
    inputs = salmonn.prepare(rows)
    mask = inputs["attention_mask"].bool()
    n_pad = int((~mask[1]).sum())
    assert n_pad > 0 and mask[0].all() and (inputs["text_parts"][~mask] == 0).all()
    tm = salmonn.token_map(inputs)
    assert tm.names(0) == _salmonn_expected(tok, {"image_grid_thw": inputs["image_grid_thw"][:2]}, True, True, QUESTION)
    assert tm.names(1) == ["padding"] * n_pad + _salmonn_expected(
        tok, {"image_grid_thw": inputs["image_grid_thw"][2:]}, False, False, "What makes the sound?")
    assert tm.count("options").tolist() == [_n(tok, "\nA. Clip 1\nB. Clip 2"), 0]
    with torch.no_grad():
        assert torch.isfinite(salmonn(**inputs)[mask]).all()


# ---- the nnsight backend numbers items by clip, as our maps do -----------------------------------------
def test_hf_token_map_numbers_items_by_clip_like_ours(model):
    # clip 0 video only; text; clip 1 video with its audio interleaved: audio[0] is empty, audio[1] clip 1's
    inputs = batch(Builder(0).video(2, 4, 8).text(2).audio_in_video(2, 4, 4, frames=300).end())
    ours = model.token_map(inputs, chat=CHAT)
    theirs = hf_token_map(inputs, tiny_thinker_config(), chat=CHAT)
    assert torch.equal(theirs.item, ours.item) and torch.equal(theirs.group, ours.group)
    assert theirs.count("audio[0]").tolist() == [0] and theirs.count("audio[1]").tolist() == [int((inputs["input_ids"] == AUDIO).sum())]


def test_hf_token_map_reads_prepares_text_parts_like_ours(model):
    """The nnsight backend's map of `prepare`'s inputs names the question, options, instruction and labels as
    ours does (it used to call all user text question), and the record never reaches the HF model."""
    inputs = model.prepare(Prompt(QUESTION, items=_items(), options=OPTIONS, instruction=INSTRUCTION))
    ours = model.token_map(inputs)
    theirs = hf_token_map(inputs, tiny_thinker_config(), tokenizer=model.tokenizer)
    assert torch.equal(theirs.group, ours.group) and torch.equal(theirs.item, ours.item)
    assert {g: int(theirs.count(g)[0]) > 0 for g in ("options", "instruction", "label")} == dict.fromkeys(
        ("options", "instruction", "label"), True)
