"""TokenMap: groups, items, frames, times and chunks of every position, read from ids and metadata;
selections, errors, describe and extend; the video-SALMONN 2+ builder on hand-built ids."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from media_helpers import moving_frames, sine, tiny_tokenizer, write_mp4
from omni_helpers import AUDIO, IM_END, IM_START, USER, VIDEO, geometries

from hooked_av.inputs.chat import ChatTokens
from hooked_av.families.qwen2_5_omni.layout import audio_token_counts
from hooked_av.families.video_salmonn2.layout import salmonn_block_ids
from hooked_av.families.video_salmonn2.token_map import salmonn_token_map
from hooked_av.inputs.prompt import Item, Prompt

CHAT = ChatTokens(IM_START, IM_END, None, {"user": (USER,)})  # the hand-built rows have no newline token


@pytest.fixture(scope="module")
def model(tiny_omni):
    return tiny_omni


@pytest.fixture(scope="module")
def two_clips(model, tmp_path_factory):
    """Row 0: two interleaved audio-visual clips; row 1 (left-padded): a question on an audio clip."""
    path = write_mp4(tmp_path_factory.mktemp("tm") / "clip.mp4", seconds=3.0)
    rows = [
        Prompt("Which clip has the dog?", items=[Item(video=path, label="Clip 1: "),
                                                 Item(video=moving_frames(4, 40, 56), audio=(sine(2.0, 16000), 16000), label="Clip 2: ")]),
        Prompt("What makes the sound?", audio=(sine(1.0, 16000), 16000)),
    ]
    return model.prepare(rows, use_audio_in_video=True)


def _counts(model, inputs):
    return audio_token_counts(inputs["feature_attention_mask"]) if "feature_attention_mask" in inputs else None


def test_group_counts_equal_placeholder_counts_on_every_geometry(model):
    for name, (inputs, av) in geometries().items():
        tm = model.token_map(inputs, chat=CHAT)
        ids, keep = inputs["input_ids"], inputs["attention_mask"].bool()
        for group, tid in (("audio", AUDIO), ("video", VIDEO), ("image", model.ids.image)):
            assert torch.equal(tm.count(group), ((ids == tid) & keep).sum(-1)), (name, group)
        assert torch.equal(tm.count("padding"), (~keep).sum(-1)), name
        assert tm.count("last").tolist() == [1] * ids.shape[0], name
        assert int(tm.count("all").sum()) == int(keep.sum()), name


def test_media_times_match_the_models_position_ids(model):
    checked = 0
    for name, (inputs, av) in geometries().items():
        tm = model.token_map(inputs, chat=CHAT)
        pos, _ = model.position_ids(inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"),
                                    inputs.get("video_grid_thw"), _frames(inputs), inputs.get("video_second_per_grid"), av)
        for row in range(tm.batch):
            for group in ("audio", "video"):
                for item in range(int(tm.item[row].max()) + 1):
                    where = tm.positions(group, row=row, item=item, nonempty=False)
                    if not len(where):
                        continue
                    t_ids = pos[0, row, where]
                    start = pos[0, row, tm.positions("media", row=row, item=item)].min() if av else t_ids.min()
                    assert torch.allclose(tm.time[row, where], (t_ids - start).float() / 25, atol=1e-6), (name, group, item)
                    checked += len(where)
    assert checked == sum(int(((i["input_ids"] == AUDIO) | (i["input_ids"] == VIDEO)).sum()) for i, _ in geometries().values())


def _frames(inputs):
    fam = inputs.get("feature_attention_mask")
    return None if fam is None else fam.sum(-1)


def test_interleaved_clips_are_indexed_by_item_with_chunks(model, two_clips):
    tm = model.token_map(two_clips)
    assert tm.count("video").tolist() == [int((two_clips["input_ids"][0] == VIDEO).sum()), 0]
    grids = two_clips["video_grid_thw"].tolist()
    per = [t * h * w // 4 for t, h, w in grids]
    assert tm.count("video[0]").tolist() == [per[0], 0] and tm.count("video", item=1).tolist() == [per[1], 0]
    assert torch.equal(tm.mask("video[1]"), tm.mask("video", item=1))
    assert tm.count("audio[0]").tolist() == [75, 25] and tm.count("audio[1]").tolist() == [50, 0]
    assert tm.positions("video[1]", row=0).min() > tm.positions("audio[0]", row=0).max()  # clip 2 after clip 1
    # 3 s clip: frames 0-2 at 0, 1, 2 s; chunks of 2 s: video chunk 0 holds frames 0-1, chunk 1 frame 2
    assert tm.time[0, tm.positions("video[0]", row=0)].unique().tolist() == [0.0, 1.0, 2.0]
    assert tm.frame[0, tm.positions("video[0]", row=0, chunk=1)].unique().tolist() == [2]
    assert tm.count("audio[0]", chunk=1).tolist() == [25, 0]  # 75 audio tokens: 50 in chunk 0, 25 in chunk 1
    assert tm.count("audio", time=(2.0, 4.0), item=0).tolist() == [25, 0]
    assert tm.count("video", time=(0.5, 1.5), item=0).tolist() == [2 * per[0] // 3, 0]  # frames at 0 s and 1 s
    q = tm.positions("question", row=0)
    assert len(q) == len(tiny_tokenizer()("Which clip has the dog?")["input_ids"])  # the clips' labels are "label"
    assert tm.count("label").tolist()[0] == len(tiny_tokenizer()("Clip 1: Clip 2: ")["input_ids"])
    assert tm.count("system").tolist()[0] > 0 and tm.names(1)[-1] == "last"


def test_selections_on_a_left_padded_batch_never_select_padding(model, two_clips):
    tm = model.token_map(two_clips)
    pad = ~two_clips["attention_mask"].bool()
    assert int(pad[1].sum()) > 0
    for spec in ("all", "media", "audio", "question", "template", "system", "last", "audio|question", ["video", "last"]):
        assert not (tm.mask(spec) & pad).any(), spec
    assert not (tm.mask("audio", time=(0.0, 100.0)) & pad).any()
    sel = tm.select("all") - tm.select("media")
    assert torch.equal(sel.mask, tm.mask("all") & ~tm.mask("media"))
    assert torch.equal((tm.select("audio") | tm.select("video")).mask, tm.mask("media"))
    assert torch.equal((tm.select("audio") & tm.select("audio[0]")).mask, tm.mask("audio[0]"))


def test_errors_name_what_is_wrong(model, two_clips):
    tm = model.token_map(two_clips)
    with pytest.raises(ValueError, match=r"'video' selects no position in row 1 \(row 1 holds: system .*audio 25.*\)"):
        tm.positions("video", row=1)
    with pytest.raises(ValueError, match="'video' selects no position in row 1"):
        tm.mask("video", nonempty=True)
    assert tm.positions("video", row=1, nonempty=False).numel() == 0
    with pytest.raises(ValueError, match="unknown token group 'vidoe'"):
        tm.select("vidoe")
    with pytest.raises(ValueError, match="only media groups"):
        tm.select("question[1]")
    with pytest.raises(IndexError, match="the batch has 2 rows"):
        tm.positions("audio", row=5)
    bad = dict(two_clips, video_grid_thw=two_clips["video_grid_thw"][:1])
    with pytest.raises(ValueError, match="no matching video_grid_thw"):
        model.token_map(bad)


def test_describe_shows_one_line_per_segment_and_extend_appends_generated(model):
    inputs, _ = geometries()["audio_only"]
    tm = model.token_map(inputs, chat=CHAT)
    lines = tm.describe().splitlines()
    assert lines == [
        "row 0 [    0,     2)  template                  2 tok",
        "row 0 [    2,     5)  question                  3 tok",
        "row 0 [    5,     6)  template                  1 tok",
        "row 0 [    6,    17)  audio[0]                 11 tok  0.00-0.44 s",
        "row 0 [   17,    18)  template                  1 tok",
        "row 0 [   18,    25)  question                  7 tok",
        "row 0 [   25,    26)  last                      1 tok",
    ]
    longer = tm.extend(3)
    assert longer.group.shape == (1, tm.seq_len + 3) and longer.count("generated").tolist() == [3]
    assert longer.positions("last").tolist() == tm.positions("last").tolist()
    assert longer.describe().splitlines()[-1] == "row 0 [   26,    29)  generated                 3 tok"


def test_salmonn_builder_on_hand_built_interleaved_ids():
    ids = SimpleNamespace(audio=90, image=91, video=92, vision_start=93, vision_end=94)
    chat = ChatTokens(80, 81, None, {"system": (82,), "user": (83,)})
    block = salmonn_block_ids(ids, (3, 4, 4), second_per_grid=1.5, n_audio=60)  # 3 steps of 4 tokens, 0.5 s audio
    row = [80, 82, 5, 6, 81, 80, 83] + block + [7, 8, 81, 80, 84]
    tm = salmonn_token_map(torch.tensor([row]), None, ids, chat, video_grid_thw=torch.tensor([[3, 4, 4]]), second_per_grid=[1.5])
    assert tm.count("video").tolist() == [12] and tm.count("audio").tolist() == [60]
    assert tm.count("system").tolist() == [2] and tm.count("question").tolist() == [2]
    audio = tm.positions("audio")
    # floor(t * 1.5 * 2) = 0, 3, 6: steps 0 and 1 take 3 audio tokens each, the last the other 54
    assert [int((tm.frame[0, audio] == t).sum()) for t in range(3)] == [3, 3, 54]
    assert tm.time[0, audio].tolist() == [k * 0.5 for k in range(60)]
    assert tm.time[0, tm.positions("video")].unique().tolist() == [0.0, 1.5, 3.0]
    assert tm.count("audio", frame=(1, 2), time=(1.5, 3.0)).tolist() == [3]
    assert tm.names(0)[-1] == "last" and tm.count("template").tolist() == [len(row) - 12 - 60 - 4 - 1]
    only = salmonn_block_ids(ids, None, n_audio=5)
    tm2 = salmonn_token_map(torch.tensor([[83] + only]), None, ids, None)
    assert tm2.count("audio").tolist() == [5] and tm2.frame[0, tm2.positions("audio")].tolist() == [-1] * 5
