"""Qwen3-Omni inputs: position ids equal HF's `get_rope_index` exactly (torch.equal, fp32 ids and deltas) on
every geometry, the layout rules against HF's own functions, and clear errors for inputs HF would mishandle."""

from __future__ import annotations

import pytest
import torch
from qwen3_omni_helpers import (AUDIO, AUDIO_BOS, AUDIO_EOS, IMAGE, N_WINDOW, PER_SECOND, VIDEO, VISION_BOS,
                                VISION_EOS, audio_block, av_block, batch, hf_rope_index, text, tiny_thinker_config,
                                vision_block)

from hooked_av.families.qwen3_omni import layout
from hooked_av.families.qwen3_omni.positions import qwen3_omni_position_ids

torch.set_num_threads(1)
TC = tiny_thinker_config()
IDS = layout.token_ids(TC)


def frames_for(n_tokens_wanted: int) -> int:
    """The smallest mel frame count whose clip makes `n_tokens_wanted` tokens."""
    f = 1
    while layout.audio_token_count(torch.tensor(f), N_WINDOW) < n_tokens_wanted:
        f += 1
    return f


def geometry(name: str):
    """(input_ids, attention_mask, kwargs for both functions: image/video grids, audio frames, spg, av)."""
    img, vid, vid2 = [1, 4, 6], [3, 4, 4], [2, 2, 4]
    fa, fb = 47, 23  # mel frames of two clips (tails exercise the conv arithmetic)
    na, nb = (int(layout.audio_token_count(torch.tensor(f), N_WINDOW)) for f in (fa, fb))
    if name == "text":
        ids, mask = batch([text(9)])
        return ids, mask, {}
    if name == "text_padded":
        ids, mask = batch([text(9), text(5, 1)])
        return ids, mask, {}
    if name == "audio":
        ids, mask = batch([text(3) + audio_block(na) + text(4, 1)])
        return ids, mask, dict(audio=[fa])
    if name == "image":
        ids, mask = batch([text(3) + vision_block(IMAGE, img) + text(4, 1)])
        return ids, mask, dict(image=[img])
    if name == "video":  # 2/3 s per grid step: fractional temporal ids
        ids, mask = batch([text(3) + vision_block(VIDEO, vid) + text(4, 1)])
        return ids, mask, dict(video=[vid], spg=[2 / 3])
    if name == "audio_in_video":
        ids, mask = batch([text(3) + av_block(vid, 1.0, na) + text(4, 1)])
        return ids, mask, dict(video=[vid], spg=[1.0], audio=[fa], av=True)
    if name == "two_clips":  # two audio-in-video clips, the second with fractional ids, then an image and audio
        row = (text(2) + av_block(vid, 1.0, na) + text(2, 1) + av_block(vid2, 0.5, nb) + text(1, 2)
               + vision_block(IMAGE, img) + audio_block(nb) + text(3, 3))
        ids, mask = batch([row])
        return ids, mask, dict(video=[vid, vid2], spg=[1.0, 0.5], audio=[fa, fb, fb], image=[img], av=True)
    if name == "left_padded":  # rows of different media, left padded; media consumed in batch order
        r0 = text(2) + vision_block(VIDEO, vid) + text(3, 1) + audio_block(na) + text(2, 2)
        r1 = text(4, 3) + vision_block(IMAGE, img) + text(2, 4)
        ids, mask = batch([r0, r1])
        return ids, mask, dict(video=[vid], spg=[2 / 3], audio=[fa], image=[img])
    raise KeyError(name)


GEOMETRIES = ["text", "text_padded", "audio", "image", "video", "audio_in_video", "two_clips", "left_padded"]


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

    frames = torch.arange(1, 400)
    for n_window in (10, 50):
        assert torch.equal(layout.audio_token_count(frames, n_window), _get_feat_extract_output_lengths(frames, n_window))
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
