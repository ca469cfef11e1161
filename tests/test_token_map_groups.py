"""TokenMap items are clips: on hand-built prompts of both families, `item` is the
clip index within the row (not a per-modality counter), `audio[1]` is the second clip's audio when the
first clip has none, and `item[i]` is every media token of clip i. The expected arrays are written from
how each prompt was assembled, not read back from the ids."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from omni_helpers import IM_END, IM_START, USER, Builder, audio_tokens, batch, tiny_thinker_config

from hooked_av import HookedQwen2_5Omni
from hooked_av.families.video_salmonn2.layout import salmonn_block_ids
from hooked_av.families.video_salmonn2.token_map import salmonn_token_map
from hooked_av.inputs.chat import ChatTokens
from hooked_av.inputs.token_map import clip_numbers

torch.set_num_threads(1)
CHAT = ChatTokens(IM_START, IM_END, None, {"user": (USER,)})


@pytest.fixture(scope="module")
def model():
    return HookedQwen2_5Omni.from_config(tiny_thinker_config())


def _expected(spans: list[tuple[int, int, int]], n: int) -> list[int]:
    """-1 everywhere but `[start, stop)` of each `(start, stop, clip)`."""
    out = [-1] * n
    for start, stop, clip in spans:
        out[start:stop] = [clip] * (stop - start)
    return out


def test_omni_video_only_clip_then_audio_in_video_clip(model):
    # [im_start user t t t] [vbos V*8 veos] [t t] [vbos abos (V|A chunks) aeos veos] [t t t im_end]
    row = Builder(0).video(2, 4, 8).text(2).audio_in_video(2, 4, 4, frames=300).end()
    n_v0, n_v1, n_a1 = 2 * 4 * 8 // 4, 2 * 4 * 4 // 4, audio_tokens(300)
    first = 5 + 1  # after the 5 prefix tokens and vision_bos
    second = first + n_v0 + 1 + 2 + 2  # vision_eos, 2 label tokens, vision_bos + audio_bos
    tm = model.token_map(batch(row), chat=CHAT)
    assert tm.item[0].tolist() == _expected([(first, first + n_v0, 0), (second, second + n_v1 + n_a1, 1)], len(row.ids))
    assert tm.count("audio[0]").tolist() == [0] and tm.count("audio[1]").tolist() == [n_a1]
    assert tm.count("video[0]").tolist() == [n_v0] and tm.count("video[1]").tolist() == [n_v1]
    assert tm.positions("item[1]").tolist() == list(range(second, second + n_v1 + n_a1))
    assert torch.equal(tm.mask("item[0]"), tm.mask("video[0]"))


def test_omni_separate_blocks_of_one_clip_share_its_index_and_text_or_order_starts_a_new_clip(model):
    # clip 0: video only; [label]; clip 1: video block then audio block (use_audio_in_video=False);
    # then an audio block directly followed by a video block: video cannot follow audio within a clip
    row = Builder(1).video(2, 4, 4).text(1).video(2, 4, 4).audio(45).audio(30).video(2, 4, 4).end()
    nv, na1, na2 = 2 * 4 * 4 // 4, audio_tokens(45), audio_tokens(30)
    p = 5 + 1
    spans = [(p, p + nv, 0)]
    p += nv + 1 + 1 + 1  # vision_eos, label, vision_bos
    spans.append((p, p + nv, 1))
    p += nv + 1 + 1  # vision_eos, audio_bos
    spans.append((p, p + na1, 1))
    p += na1 + 1 + 1
    spans.append((p, p + na2, 2))
    p += na2 + 1 + 1
    spans.append((p, p + nv, 3))
    tm = model.token_map(batch(row), chat=CHAT)
    assert tm.item[0].tolist() == _expected(spans, len(row.ids))
    assert tm.count("audio[0]").tolist() == [0] and tm.count("audio[1]").tolist() == [na1]
    assert tm.count("item[1]").tolist() == [nv + na1] and tm.count("item[3]").tolist() == [nv]


def test_salmonn_video_only_clip_then_audio_visual_clip():
    ids = SimpleNamespace(audio=90, image=91, video=92, vision_start=93, vision_end=94)
    chat = ChatTokens(80, 81, None, {"user": (83,)})
    first = salmonn_block_ids(ids, (2, 4, 4))  # video only: 2 steps of 4 tokens
    second = salmonn_block_ids(ids, (3, 4, 4), second_per_grid=1.0, n_audio=6)  # 4 video + 2 audio per step
    row = [80, 83, 5] + first + [9] + [6] + second + [9, 7, 81]
    tm = salmonn_token_map(torch.tensor([row]), None, ids, chat, video_grid_thw=torch.tensor([[2, 4, 4], [3, 4, 4]]))
    a, b = 3 + 1, 3 + len(first) + 2 + 1
    assert tm.item[0].tolist() == _expected([(a, a + 8, 0), (b, b + 12 + 6, 1)], len(row))
    assert tm.count("audio[0]").tolist() == [0] and tm.count("audio[1]").tolist() == [6]
    assert tm.positions("item[1]").tolist() == list(range(b, b + 18))


def test_salmonn_video_and_audio_blocks_of_one_clip_share_its_index():
    ids = SimpleNamespace(audio=90, image=91, video=92, vision_start=93, vision_end=94)
    video, audio = salmonn_block_ids(ids, (2, 4, 4)), salmonn_block_ids(ids, None, n_audio=5)
    row = [83] + video + audio + [9] + audio + [7]  # clip 0: video + its audio block; "\n"; clip 1: audio
    tm = salmonn_token_map(torch.tensor([row]), None, ids, None, video_grid_thw=torch.tensor([[2, 4, 4]]))
    v0, a0 = 2, 1 + len(video) + 1
    a1 = 1 + len(video) + len(audio) + 1 + 1
    assert tm.item[0].tolist() == _expected([(v0, v0 + 8, 0), (a0, a0 + 5, 0), (a1, a1 + 5, 1)], len(row))


def test_clip_numbers_rule():
    # a clip shows image, video, audio in that order: a modality that does not come later starts a new clip
    runs = [(1, 2, ["video"]), (3, 4, ["audio"]), (5, 6, ["video"]), (6, 7, ["image"]), (8, 9, ["image"]), (9, 10, ["audio"])]
    assert clip_numbers(runs) == [0, 0, 1, 2, 3, 3]
    assert clip_numbers([(1, 5, ["video", "audio", "video"]), (6, 7, ["audio"])]) == [0, 1]  # after audio-in-video


def test_text_between_blocks_does_not_split_a_clip(model):
    # "video, question, audio": one clip, its audio not interleaved (knockout's six edges, no cross-item edge)
    row = Builder(2).video(2, 4, 8).text(2).audio(30).end()
    tm = model.token_map(batch(row), chat=CHAT)
    assert set(tm.item[0, tm.mask("media")[0]].tolist()) == {0}


def test_item_spec_needs_an_index(model):
    tm = model.token_map(batch(Builder(0).video(2, 4, 4).end()), chat=CHAT)
    with pytest.raises(ValueError, match=r"'item' needs a clip index"):
        tm.select("item")
    assert tm.count("item[0]").tolist() == [8] and tm.count("item[1]").tolist() == [0]
