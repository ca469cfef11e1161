"""Qwen3-Omni inputs: position ids equal HF's `get_rope_index` exactly (torch.equal, fp32 ids and deltas) on
every geometry, the layout rules against HF's own functions, and clear errors for inputs HF would mishandle."""

from __future__ import annotations

import pytest
import torch
from qwen3_omni_helpers import (AUDIO, AUDIO_BOS, AUDIO_EOS, GEOMETRIES, N_WINDOW, PER_SECOND, VIDEO, VISION_BOS,
                                VISION_EOS, geometry, hf_rope_index, tiny_thinker_config)

from hooked_av.families.qwen3_omni import layout
from hooked_av.families.qwen3_omni.positions import qwen3_omni_position_ids

torch.set_num_threads(1)
TC = tiny_thinker_config()
IDS = layout.token_ids(TC)


def both(name):
    ids, mask, kw = geometry(name)
    grid = lambda k: torch.tensor(kw[k]) if k in kw else None  # noqa: E731
    frames = torch.tensor(kw["audio"]) if "audio" in kw else None
    spg = torch.tensor(kw["spg"]) if "spg" in kw else None
    ref = hf_rope_index(TC, ids, mask, grid("image"), grid("video"), kw.get("av", False), frames, spg)
    ours = qwen3_omni_position_ids(
        ids, mask, IDS, grid("image"), grid("video"),
        None if frames is None else layout.audio_token_counts(frames, N_WINDOW), spg, kw.get("av"), 2, PER_SECOND)
    return ref, ours, ids, mask


@pytest.mark.parametrize("name", GEOMETRIES)
def test_position_ids_equal_hf_get_rope_index(name):
    (ref_pos, ref_delta), (pos, delta), ids, mask = both(name)
    assert pos.dtype == ref_pos.dtype == torch.float32
    assert torch.equal(pos, ref_pos), (pos - ref_pos).abs().max()
    assert torch.equal(delta, ref_delta.to(delta.dtype)) and delta.shape == ref_delta.shape
    if name in ("video", "two_clips"):  # the case the float ids exist for: not whole numbers
        assert bool((pos != pos.round()).any())


def test_audio_in_video_opens_with_two_ids_and_merges_by_temporal_id():
    (_, _), (pos, _), ids, mask = both("audio_in_video")
    row = ids[0].tolist()
    b = row.index(VISION_BOS)
    assert row[b + 1] == AUDIO_BOS and pos[0, 0, b + 1] == pos[0, 0, b] + 1
    body = [i for i in range(len(row)) if row[i] in (AUDIO, VIDEO)]
    t = pos[0, 0, body]
    assert bool((t[1:] >= t[:-1]).all())  # merged in temporal order


def test_layout_rules_equal_hf():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    from hooked_av.encoders import qwen3_omni_audio

    assert layout.audio_token_count is qwen3_omni_audio.audio_token_count  # one frames -> tokens rule, the tower's
    frames = torch.arange(1, 400)
    assert torch.equal(layout.audio_token_count(frames, 50), _get_feat_extract_output_lengths(frames, 50))
    # HF writes 13 tokens per full chunk as a literal; at n_window 10 a 20-frame chunk makes 10 -> 5 -> 3 tokens, a 7-frame tail 1
    assert layout.audio_token_counts([20, 40, 47], 10) == [3, 6, 7]
    assert _get_feat_extract_output_lengths(torch.tensor(40), 10) == 26
    assert layout.audio_seconds_per_token(50) == pytest.approx(1 / 13)
    # the processor's own interleave (float64) equals ours on a grid with fractional ids
    from types import SimpleNamespace

    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    stub = SimpleNamespace(audio_bos_token="B", audio_eos_token="E", video_token="V", audio_token="A",
                           video_processor=SimpleNamespace(merge_size=2))
    for grid, spg, n in (([3, 4, 4], 2 / 3, 25), ([2, 2, 4], 0.5, 3), ([4, 2, 2], 2.0, 100)):
        s = Qwen3OmniMoeProcessor.replace_video_with_audio_token(
            stub, {"video_grid_thw": torch.tensor([grid]), "video_second_per_grid": [spg]}, 0,
            {"num_audio_tokens": [n]}, 0, position_id_per_seconds=PER_SECOND)
        ours = layout.processor_av_order(grid, spg, n, 2, PER_SECOND)
        assert s == "B" + "".join("V" if k == "video" else "A" for k in ours) + "E"


def test_errors_name_the_problem():
    ids, mask, kw = geometry("audio_in_video")
    counts = layout.audio_token_counts(torch.tensor(kw["audio"]), N_WINDOW)
    grid = torch.tensor(kw["video"])
    with pytest.raises(ValueError, match="use_audio_in_video=True"):
        qwen3_omni_position_ids(ids, mask, IDS, None, grid, counts, torch.tensor([1.0]), False, 2, PER_SECOND)
    with pytest.raises(ValueError, match="video_second_per_grid"):
        qwen3_omni_position_ids(ids, mask, IDS, None, grid, counts, None, None, 2, PER_SECOND)
    with pytest.raises(ValueError, match="position_id_per_seconds"):  # ids laid out at another rate
        qwen3_omni_position_ids(ids, mask, IDS, None, grid, counts, torch.tensor([1.0]), None, 2, 25)
    with pytest.raises(ValueError, match="more audio blocks"):
        qwen3_omni_position_ids(ids, mask, IDS, None, grid, [], torch.tensor([1.0]), None, 2, PER_SECOND)
    no_vs = tiny_thinker_config()
    del no_vs.vision_start_token_id
    with pytest.raises(ValueError, match="vision_start_token_id"):
        layout.token_ids(no_vs)
    assert (IDS.audio_end, IDS.vision_end) == (AUDIO_EOS, VISION_EOS)


@pytest.mark.parametrize("name", ["audio_in_video", "two_clips", "left_padded"])
def test_token_map_times_agree_with_position_ids(name):
    """Each media token's time (s) x position_id_per_seconds + its block's start id = its temporal position id."""
    from hooked_av.families.qwen3_omni.token_map import qwen3_omni_token_map

    (_, _), (pos, _), ids, mask = both(name)
    _, _, kw = geometry(name)
    grid = lambda k: torch.tensor(kw[k]) if k in kw else None  # noqa: E731
    counts = layout.audio_token_counts(torch.tensor(kw["audio"]), N_WINDOW)
    tm = qwen3_omni_token_map(ids, mask, IDS, None, grid("image"), grid("video"), counts, kw.get("spg"), 2, PER_SECOND,
                              layout.audio_seconds_per_token(N_WINDOW))
    checked = 0
    for row in range(ids.shape[0]):
        toks = ids[row].tolist()
        for p, t in enumerate(toks):
            if t in (AUDIO, VIDEO):
                start = p
                while toks[start - 1] in (AUDIO, VIDEO):
                    start -= 1
                first = float(pos[0, row, start - 1]) + 1  # the id after the opening token(s)
                assert float(tm.time[row, p]) * PER_SECOND + first == pytest.approx(float(pos[0, row, p]), abs=1e-4)
                checked += 1
    assert checked == int(((ids == AUDIO) | (ids == VIDEO)).sum()) > 0
    assert set(tm.names(0)) >= {"audio", "video", "question", "template", "last"}
