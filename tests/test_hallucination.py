"""The hallucination loop: captions with and without guidance on the toy model, CHAIR_i / CHAIR_s
against a naive count written here (CHAIR as `LisaAnne/Hallucination` `utils/chair.py` counts it:
every mention, repeats included, over all mentions; captions with any hallucination over all
captions), the matcher's phrases and synonyms, and the loop over a study manifest."""

import json
import math

import pytest
import torch

import hooked_av
from hooked_av import toy
from hooked_av.toy import vocab
from patching.methods.hallucination import ObjectMatcher, captions, chair, hallucination, hallucination_study, rates
from patching.engine.hooks import block_attention

torch.set_num_threads(1)
OBJECTS = vocab.COLOURS + vocab.INSTRUMENTS
STEPS = 4


@pytest.fixture(scope="module")
def setup():
    model = hooked_av.load("toy")
    bank = toy.make_clips(32, seed=5)
    drawn = toy.draw_samples(bank, 8, seed=6)
    batch = toy.collate(bank, drawn, model.tokenizer)
    labels = [[vocab.COLOURS[bank.attrs["colour"][c]] for c in s.clips] +
              [vocab.INSTRUMENTS[bank.attrs["instrument"][c]] for c in s.clips] for s in drawn]
    return model, batch, labels


def no_audio(tm):
    return block_attention(tm, "audio", tm.select("all") - tm.select("audio"), range(4))


def naive(model, tokens, labels, eos):
    """Hallucinated mentions, mentions and hallucinated captions of greedy tokens, word by word."""
    bad = total = bad_caps = 0
    for row, labs in zip(tokens.tolist(), labels):
        if eos in row:
            row = row[: row.index(eos)]
        hit = [w for w in model.tokenizer.convert_ids_to_tokens(row) if w in OBJECTS]
        miss = [w for w in hit if w not in labs]
        bad, total, bad_caps = bad + len(miss), total + len(hit), bad_caps + bool(miss)
    return bad, total, bad_caps


def test_chair_rates_with_and_without_guidance_equal_a_naive_count(setup):
    model, batch, labels = setup
    eos = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    res = hallucination(model, batch.inputs, labels, no_audio, 1.0, ObjectMatcher(OBJECTS), max_new_tokens=STEPS,
                        eos_token_id=eos)
    with torch.no_grad():
        plain = model.generate(**batch.inputs, max_new_tokens=STEPS)
    from patching.methods.guidance import guided_generate

    guided = guided_generate(model, batch.inputs, no_audio, 1.0, STEPS)
    got = res.settings["rates"]
    for cond, tokens in (("plain", plain), ("guided", guided)):
        bad, total, bad_caps = naive(model, tokens, labels, eos)
        assert got[cond] == dict(chair_s=bad_caps / 8, chair_i=bad / total, captions=8, mentions=total,
                                 hallucinated_mentions=bad), cond
    # the numbers on this batch: blocking the audio from the guided run adds instrument hallucinations
    assert got["plain"]["chair_s"] == 0.375 and got["plain"]["chair_i"] == 4 / 16
    assert got["guided"]["chair_s"] == 0.5 and got["guided"]["chair_i"] == 4 / 10
    df = res.df
    assert list(df.condition) == ["plain"] * 8 + ["guided"] * 8 and list(df["sample"]) == list(range(8)) * 2
    first = df.iloc[0]
    assert first.caption == "re clarinet red high" and first.mentioned == ["clarinet", "red"]
    assert first.hallucinated == ["clarinet"] and first.objects == ["flute", "red"] and first.hallucinated_caption


def test_matcher_reads_phrases_synonyms_and_every_repeat():
    m = ObjectMatcher({"fire truck": ["fire engine"], "truck": ["lorry", "trucks"], "dog": ["puppy", "dogs"],
                       "kennel": ["dog house"]})
    assert m("a dog house for the dog") == ["kennel", "dog"]
    assert m("A fire truck, a lorry and two Dogs; the puppy's truck. Fire!") == \
        ["fire truck", "truck", "dog", "truck"]  # "puppy's" is its own word
    assert m("the fire engine passes the trucks and a puppy") == ["fire truck", "truck", "dog"]
    assert m.canonical("Puppy") == "dog" and m.canonical("cat") is None
    df = chair(["a dog and a dog and a truck", "nothing here", "a fire truck"], [["puppy"], ["dog"], ["cat"]], m)
    assert df.n_mentions.tolist() == [3, 0, 1] and df.n_hallucinated.tolist() == [1, 0, 1]
    assert df.unknown_labels.tolist() == [[], [], ["cat"]]
    assert rates(df, by=None) == dict(chair_s=2 / 3, chair_i=2 / 4, captions=3, mentions=4, hallucinated_mentions=2)
    assert math.isnan(rates(chair(["nothing"], [["dog"]], m), by=None)["chair_i"])


def test_a_caption_ends_at_its_first_eos(setup):
    model = setup[0]
    eos = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    red, blue = model.tokenizer.convert_tokens_to_ids(["red", "blue"])
    tokens = torch.tensor([[red, eos, blue, eos], [blue, red, blue, red]])
    assert captions(model, tokens, eos) == ["red", "blue red blue red"]
    assert captions(model, tokens, None) == ["red blue", "blue red blue red"]


def test_bad_input_is_refused_before_generation(setup):
    model, batch, labels = setup
    with pytest.raises(ValueError, match=r"'dog' names both 'dog' and 'puppy'"):
        ObjectMatcher({"dog": [], "puppy": ["dog"]})
    with pytest.raises(ValueError, match=r"object '\?': the name '\?' holds no word"):
        ObjectMatcher(["?"])
    with pytest.raises(ValueError, match=r"7 label lists for 8 prompts"):
        hallucination(model, batch.inputs, labels[:7], no_audio, 1.0, ObjectMatcher(OBJECTS))
    with pytest.raises(ValueError, match=r"matcher must be an ObjectMatcher or a function"):
        hallucination(model, batch.inputs, labels, no_audio, 1.0, OBJECTS)
    with pytest.raises(ValueError, match=r"labels 'red' is one string"):
        chair(["red"], ["red"], ObjectMatcher(OBJECTS))


def test_the_loop_over_a_manifest_takes_labels_from_a_column(setup, tmp_path):
    from hooked_av.toy.dataset import write_toy_dataset

    model = setup[0]
    path = write_toy_dataset(tmp_path, n=3, seed=2, kinds=("visual",))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    labels = [["red", "flute"], ["blue"], ["green", "trumpet"]]
    path.write_text("".join(json.dumps({**r, "objects": o}) + "\n" for r, o in zip(rows, labels)))
    res = hallucination_study(model, path, lambda m, inputs: (no_audio, 1.0), ObjectMatcher(OBJECTS),
                              max_new_tokens=STEPS)
    assert list(res.df.id) == [r["id"] for r in rows for _ in (0, 1)] and list(res.df["sample"]) == [0, 0, 1, 1, 2, 2]
    from patching.datasets.manifest import read_manifest
    from patching.datasets.templates import parse_template

    row = read_manifest(path).rows[1]
    one = hallucination(model, model.prepare(parse_template("default").prompt(row)), [["blue"]], no_audio, 1.0,
                        ObjectMatcher(OBJECTS), max_new_tokens=STEPS)
    assert res.df[res.df.id == row.id].caption.tolist() == one.df.caption.tolist()
    counted = {c: dict(chair_s=float(p.hallucinated_caption.mean()), chair_i=p.n_hallucinated.sum() / p.n_mentions.sum())
               for c, p in res.df.groupby("condition")}
    assert {c: {k: v[k] for k in ("chair_s", "chair_i")} for c, v in res.settings["rates"].items()} == counted
    with pytest.raises(ValueError, match=r"have no list of object names in column 'labels'"):
        hallucination_study(model, path, lambda m, inputs: (no_audio, 1.0), ObjectMatcher(OBJECTS), column="labels")
