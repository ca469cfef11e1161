"""The shipped toy model: it loads in both implementations, it answers held-out questions, and the
information flow we planted is there (raw hooks on `blocks.{l}.attn.hook_attn_mask`).

Everything runs on one fixed held-out batch (fresh clip and question seeds, never used in training).
"""

import numpy as np
import pytest
import torch

from hooked_av import toy
from hooked_av.toy import vocab
from hooked_av.toy.clips import log_mel, patchify

FIXTURES = {"toy": "toy_model", "toy-flow": "toy_flow_model"}  # conftest's session fixtures
HELD_OUT_SEED = 4242  # the training run used clip seeds 0 and 1 and question seeds below 2**31 from seed 0
N_PER_KIND = 48


@pytest.fixture(scope="module")
def model(toy_model):
    return toy_model


@pytest.fixture(scope="module")
def held_out(model):
    bank = toy.make_clips(400, seed=HELD_OUT_SEED)
    samples = [s for k in vocab.KINDS for s in toy.draw_samples(bank, N_PER_KIND, seed=HELD_OUT_SEED + 1, kinds=(k,))]
    return toy.collate(bank, samples, model.tokenizer)


def _media(model, batch, which: str) -> torch.Tensor:
    """bool `[batch, pos]`: the placeholder positions of `which` ("audio", "video" or "media")."""
    ids = batch.inputs["input_ids"]
    wanted = {"audio": [model.ids.audio], "video": [model.ids.video], "media": [model.ids.audio, model.ids.video]}
    return torch.isin(ids, torch.tensor(wanted[which]))


def _block(queries: torch.Tensor, keys: torch.Tensor, layers) -> list:
    """Hooks that stop every query in `queries` `[batch, pos]` from reading every key in `keys`."""
    blocked = queries[:, None, :, None] & keys[:, None, None, :]

    def fn(mask, hook):
        return mask.masked_fill(blocked, torch.finfo(mask.dtype).min)

    return [(f"blocks.{layer}.attn.hook_attn_mask", fn) for layer in layers]


def _accuracy(model, batch, hooks=()) -> dict[str, float]:
    with torch.no_grad():
        logits = model.run_with_hooks(**batch.inputs, fwd_hooks=list(hooks))
    hit = (logits[:, -1].argmax(-1) == batch.answers).numpy()
    kinds = np.array(batch.kinds)
    return {k: float(hit[kinds == k].mean()) for k in vocab.KINDS}


def _chance(batch, kind: str) -> float:
    return float(np.mean([vocab.chance(s.kind, s.question) for s in batch.samples if s.kind == kind]))


@pytest.fixture(scope="module")
def clean(model, held_out):
    return _accuracy(model, held_out)


@pytest.fixture(scope="module", params=list(FIXTURES))
def any_toy(request):
    """(model, held-out batch, plain accuracy) of each shipped toy: what both must pass."""
    model = request.getfixturevalue(FIXTURES[request.param])
    batch = request.getfixturevalue("held_out")  # same clips and questions; the toys share the tokenizer
    return model, batch, _accuracy(model, batch)


@pytest.mark.parametrize("name, layers", [("toy", 4), ("toy-flow", 8)])
def test_shipped_files_load_in_hf_and_ours_with_equal_logits(name, layers, request):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = request.getfixturevalue(FIXTURES[name])
    assert model.cfg.n_layers == layers
    hf = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(toy.weights_dir(name))).eval()
    batch = toy.make_batch(8, seed=7, tokenizer=model.tokenizer, n_clips=40)  # mixed kinds: padded rows
    with torch.no_grad():
        ours = model(**batch.inputs)
        ref = hf(**batch.inputs, use_audio_in_video=False).logits
    real = batch.inputs["attention_mask"].bool()
    assert (ours[real] - ref[real]).abs().max() < 1e-4
    files = list(toy.weights_dir(name).glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size / 2**20 < 20
    from safetensors import safe_open

    with safe_open(files[0], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_each_toy_loads_by_name_through_one_loader(toy_model, toy_flow_model):
    import hooked_av
    from hooked_av.registry import inspect

    assert toy.TOYS == {"toy": "weights", "toy-flow": "weights_flow"}
    for name, model in (("toy", toy_model), ("toy-flow", toy_flow_model)):
        family, tokenizer = inspect(name)
        assert family.NAME == "Qwen2.5-Omni" and tokenizer.get_vocab() == model.tokenizer.get_vocab()
        assert model.prepare.__func__ is toy.prepare  # the toy's own format, for both
    loaded = hooked_av.load("toy-flow")
    assert loaded.cfg.n_layers == 8 and loaded.cfg.d_model == toy_model.cfg.d_model == 128
    assert toy.weights_dir() == toy.weights_dir("toy") != toy.weights_dir("toy-flow")
    with pytest.raises(ValueError, match=r"no shipped toy named 'toy-deep'; the toys are \['toy', 'toy-flow'\]"):
        toy.weights_dir("toy-deep")
    with pytest.raises(TypeError, match="first argument is the toy's name"):
        toy.load(torch.float64)
    with pytest.raises(ValueError, match="the toy model takes no"):
        hooked_av.load("toy-flow", position_mode="x")


# held-out accuracy each toy reaches on every kind; toy-flow's auditory and two-clip kinds hold the instrument
# questions, which its planted pathway answers at about 0.65 (docs/toy.md: the question's few words carry it)
FLOOR = {"toy": dict.fromkeys(vocab.KINDS, 0.95), "toy-flow": {"visual": 0.95, "auditory": 0.8, "audiovisual": 0.95, "two_clip": 0.85}}


def test_held_out_accuracy_of_every_question_kind_reaches_the_toys_floor(any_toy):
    model, _, clean = any_toy
    floor = FLOOR["toy" if model.cfg.n_layers == 4 else "toy-flow"]
    assert all(clean[k] >= floor[k] for k in vocab.KINDS), (clean, floor)


def test_blocking_audio_keys_kills_auditory_answers_only(any_toy):
    model, held_out, clean = any_toy
    audio = _media(model, held_out, "audio")
    acc = _accuracy(model, held_out, _block(~audio, audio, range(model.cfg.n_layers)))
    assert acc["auditory"] <= _chance(held_out, "auditory") + 0.15, acc
    assert acc["visual"] >= clean["visual"] - 0.05, acc


def test_blocking_video_keys_kills_visual_answers_only(any_toy):
    model, held_out, clean = any_toy
    video = _media(model, held_out, "video")
    acc = _accuracy(model, held_out, _block(~video, video, range(model.cfg.n_layers)))
    assert acc["visual"] <= _chance(held_out, "visual") + 0.15, acc
    assert acc["auditory"] >= clean["auditory"] - 0.05, acc


def test_discarding_media_from_the_last_layer_keeps_accuracy(any_toy):
    model, held_out, clean = any_toy
    media = _media(model, held_out, "media")
    acc = _accuracy(model, held_out, _block(~media, media, [model.cfg.n_layers - 1]))
    assert all(acc[k] >= clean[k] - 0.05 for k in vocab.KINDS), (acc, clean)


def test_discarding_media_from_layer_0_destroys_accuracy(any_toy):
    model, held_out, _ = any_toy
    media = _media(model, held_out, "media")
    acc = _accuracy(model, held_out, _block(~media, media, range(model.cfg.n_layers)))
    for kind in vocab.KINDS:
        assert acc[kind] <= _chance(held_out, kind) + 0.15, (kind, acc)


# toy-flow's planted pathway (train.RECIPES["toy-flow"], train.pathway_mask): the question's words read the media
# in the "gather" layers only, the positions after the question read the question in the "answer" layers only.
# The audiovisual (match) question also takes a second route, through the template tokens between the media
# (docs/toy.md: 0.958 -> 0.646 with only the question reading the media), so the pathway is asserted on the others
PATHWAY_KINDS = ("visual", "auditory", "two_clip")


def test_toy_flow_takes_the_media_to_the_answer_through_the_question_in_the_planted_layers(toy_flow_model, held_out):
    clean = _accuracy(toy_flow_model, held_out)
    from hooked_av.toy.train import RECIPES, question_positions

    model, layers = toy_flow_model, RECIPES["toy-flow"]["pathway_layers"]
    gather, answer = list(layers["gather"]), list(layers["answer"])
    assert model.cfg.n_layers == 8 and max(gather) < min(answer)
    ids = held_out.inputs["input_ids"]
    media, question = _media(model, held_out, "media"), question_positions(ids)
    pos = torch.arange(ids.shape[1])
    after = pos[None] >= torch.where(ids == toy.token_ids()["im_end"], pos, -1).max(1).values[:, None]
    elsewhere = lambda chosen: [i for i in range(8) if i not in chosen]  # noqa: E731
    kept = {  # what the plant leaves the model free to lose
        "media gone after the gather layers": _accuracy(model, held_out, _block(~media, media, range(max(gather) + 1, 8))),
        "no text but the question reads the media": _accuracy(model, held_out, _block(~media & ~question, media, range(8))),
        "the question reads the media in the gather layers only": _accuracy(model, held_out, _block(question, media, elsewhere(gather))),
        "the answer side reads the question in the answer layers only": _accuracy(model, held_out, _block(after, question, elsewhere(answer))),
    }
    for name, acc in kept.items():
        assert all(acc[k] >= clean[k] - 0.05 for k in PATHWAY_KINDS), (name, acc, clean)
    cut = {  # what it needs: either step of the pathway, in its layers
        "the question blind to the media in the gather layers": _accuracy(model, held_out, _block(question, media, gather)),
        "the answer side blind to the question in the answer layers": _accuracy(model, held_out, _block(after, question, answer)),
    }
    for name, acc in cut.items():
        for kind in PATHWAY_KINDS:
            assert acc[kind] <= _chance(held_out, kind) + 0.15, (name, kind, acc)
        assert acc["audiovisual"] < clean["audiovisual"] - 0.15, (name, acc)  # it needs the pathway too, not only


def test_data_generator_is_deterministic_in_its_seed(model):
    a, b = (toy.make_batch(12, seed=3, tokenizer=model.tokenizer, n_clips=30) for _ in range(2))
    c = toy.make_batch(12, seed=4, tokenizer=model.tokenizer, n_clips=30)
    assert a.samples == b.samples and a.samples != c.samples
    for key in a.inputs:
        assert torch.equal(a.inputs[key], b.inputs[key]), key
    assert not torch.equal(a.inputs["input_features"][:2], c.inputs["input_features"][:2])


def test_media_tensors_match_the_hf_feature_extractor_and_video_processor():
    from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) + rng.normal(0, 0.01, 16000)).astype(np.float32)
    full = WhisperFeatureExtractor(feature_size=128)(wave, sampling_rate=16000, return_tensors="np")["input_features"]
    assert full.shape[-1] == 3000  # the processor's 30 s padding
    assert np.abs(log_mel(wave[None]).numpy() - full[:, :, :100]).max() < 1e-5

    frames = rng.integers(0, 256, (2, 56, 56, 3)).astype(np.uint8)
    ref = Qwen2VLVideoProcessor()(videos=[frames], return_tensors="pt", do_resize=False, cap_pixels_per_frame=False)
    assert ref["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert (patchify(frames[None].astype(np.float32))[0] - ref["pixel_values_videos"]).abs().max() < 1e-5


def test_tokenizer_round_trip_and_special_ids_agree_with_the_config(model):
    tok = model.tokenizer
    bank = toy.make_clips(20, seed=11)
    batch = toy.collate(bank, toy.draw_samples(bank, 6, seed=12), tok)
    for row, mask, sample in zip(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.samples):
        ids = row[mask.bool()].tolist()
        text = toy.prompt_text(bank, sample)
        assert tok.decode(ids) == text
        assert tok(text)["input_ids"] == ids
    assert len(tok) == model.cfg.d_vocab == 256
    assert tok.unk_token_id not in tok(" ".join(vocab.all_words()))["input_ids"]
    ids, cfg = toy.token_ids(), model.hf_config
    assert (cfg.audio_token_id, cfg.video_token_id, cfg.image_token_id) == (ids["audio"], ids["video"], ids["image"])
    assert (cfg.audio_start_token_id, cfg.audio_end_token_id) == (ids["audio_bos"], ids["audio_eos"])
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.user_token_id) == (
        ids["vision_bos"], ids["vision_eos"], ids["user"]
    )
    assert tok.convert_tokens_to_ids("<|AUDIO|>") == ids["audio"]


def test_the_docs_discarding_row_is_what_the_model_gives_by_mask_and_physically(model, held_out):
    # docs/toy.md: media discarded from layer 0 -> visual 0.438, auditory 0.312, audiovisual 0.604, two_clip 0.333
    # (n = 48 each); the demo, on 16 other visual samples, read 0.69: the same computation on other samples
    from patching.methods.discarding import discarding

    media = _media(model, held_out, "media")
    acc = _accuracy(model, held_out, _block(~media, media, range(model.cfg.n_layers)))
    assert {k: round(v, 3) for k, v in acc.items()} == {"visual": 0.438, "auditory": 0.312, "audiovisual": 0.604,
                                                         "two_clip": 0.333}
    visual = [s for s in held_out.samples if s.kind == "visual"]
    batch = toy.collate(toy.make_clips(400, seed=HELD_OUT_SEED), visual, model.tokenizer)  # the held-out bank
    inputs = batch.inputs
    res = discarding(model, inputs, batch.answers.tolist(), from_layers=[0], repeats=1, progress=False).df
    assert round(res.correct.mean(), 3) == 0.438 and len(res) == 48
    # with no media the model gives one answer per question: accuracy is the share of samples with that answer
    qs = [s.question for s in visual]
    assert {q: res.correct[[j for j, x in enumerate(qs) if x == q]].sum() for q in set(qs)} == {"colour": 6, "brightness": 15}


def test_training_refuses_settings_that_cannot_apply_before_any_work(tmp_path):
    from hooked_av.toy.train import train

    with pytest.raises(ValueError, match="a resumed run keeps its weights: audio_from=None / init_from='toy'"):
        train(1, tmp_path / "out", resume=toy.weights_dir("toy-flow"), init_from="toy", n_layers=8)
    with pytest.raises(ValueError, match="pathway_layers .* go with plant='pathway' and only with it"):
        train(1, tmp_path / "out", plant="pathway")
    with pytest.raises(ValueError, match="attention_penalty applies to plant='pathway' only"):
        train(1, tmp_path / "out", attention_penalty=1.0, n_clips=8)
    for typo in ({"gathr": (1,), "answer": (4,)}, {"gather": (1, 4), "answer": (4,)}):  # one ignored, one ambiguous
        with pytest.raises(ValueError, match="names the 'gather' and the 'answer' layers, no layer in both"):
            train(1, tmp_path / "out", plant="pathway", pathway_layers=typo, n_layers=8)
    assert not (tmp_path / "out").exists()
