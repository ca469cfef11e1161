"""video-SALMONN 2+ position ids against the rules of the repository (bytedance/video-SALMONN-2,
`video_SALMONN2_plus/`), written here as a naive per-row walk that shares nothing with
`hooked_av.families.video_salmonn2.positions`.

The rules, as read from the repository:
- Inference (`inference.py`): `prepare_inputs` keeps only tensors and `_get_item` pops `audio_lengths`
  and never returns `second_per_grid_ts`; `prepare_inputs_for_generation` sets `position_ids=None`, so
  the model's `get_rope_index` runs with neither: Qwen2.5-VL positions at 1.0 s per grid step whatever
  the clip's rate. The first `T*H'*W'` tokens of a block (video and audio alike) take the grid, every
  other token counts on from the largest id + 1. A row without image or video counts 0, 1, 2, ...
- Training (`qwenvl/data/dataset.py` calls `rope2d.get_rope_index_25` once per sample, the collator pads):
  the branch is chosen per sample: audio and video -> time-aligned (video `(floor(t*spg*2), h, w)`,
  audio token k `(k, 0, k)`; images count as text); else image or video -> the Qwen2.5-VL branch with
  the given spg (audio counts as text); else audio -> `(k, k, 0)`; else text. In the audio branches the
  text after the last block resumes at the block's largest temporal id + 1, elsewhere at the largest id + 1.
"""

from __future__ import annotations

import pytest
import torch

import salmonn_helpers as H
from hooked_av import HookedVideoSALMONN2

TOL = 1e-4


def repo_rule_positions(tokens: list[int], images: list, videos: list, mode: str) -> torch.Tensor:
    """`[3, n]` ids of one unpadded row. `images`: this row's `(t, h, w)` patch grids; `videos`: its
    `(t, h, w, seconds per grid step)`, in prompt order."""
    if mode == "inference":
        branch = "visual"  # neither audio_lengths nor second_per_grid_ts reaches get_rope_index
    else:
        a, v, im = H.AUDIO in tokens, H.VIDEO in tokens, H.IMAGE in tokens
        branch = "audio_visual" if a and v else "visual" if v or im else "audio" if a else "text"
    opens = {"visual": (H.IMAGE, H.VIDEO), "audio_visual": (H.VIDEO,), "audio": (H.AUDIO,), "text": ()}[branch]
    blocks_left = sum(1 for i in range(1, len(tokens)) if tokens[i - 1] == H.VISION_START and tokens[i] in opens)
    image_grids, video_grids = iter(images), iter(videos)

    def grid(t, h, w, spg, start):
        return [[int(s * spg * 2) + start, r + start, c + start] for s in range(t) for r in range(h // 2) for c in range(w // 2)]

    def audio_count(i):
        end = tokens.index(H.VISION_END, i)
        return sum(1 for x in tokens[i:end] if x == H.AUDIO)

    cols: list[list[int]] = []
    nxt, i = 0, 0
    while i < len(tokens):
        if blocks_left and tokens[i] in opens:  # the repository takes the next such token as the block start
            blocks_left -= 1
            if tokens[i] == H.IMAGE:
                block = grid(*next(image_grids), 0.0, nxt)
            elif tokens[i] == H.AUDIO:
                block = [[nxt + k, nxt + k, nxt] for k in range(audio_count(i))]
            else:
                t, h, w, spg = next(video_grids)
                block = grid(t, h, w, 1.0 if mode == "inference" else spg, nxt)
                if branch == "audio_visual":
                    cells, k, block = iter(block), 0, []
                    for x in tokens[i : i + t * (h // 2) * (w // 2) + audio_count(i)]:
                        block.append(next(cells) if x == H.VIDEO else [nxt + k, nxt, nxt + k])
                        k += x == H.AUDIO
            cols += block
            i += len(block)
            temporal_tail = branch in ("audio_visual", "audio") and not blocks_left
            nxt = 1 + (max(c[0] for c in block) if temporal_tail else max(max(c) for c in block))
        else:
            cols.append([nxt] * 3)
            nxt, i = nxt + 1, i + 1
    return torch.tensor(cols, dtype=torch.long).T


def repo_rule_batch(inputs: dict, rows_media: list[tuple[list, list]], mode: str) -> torch.Tensor:
    """`[3, batch, pos]`: each row by itself (padding at 1, as the repository's collator pads)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    out = torch.ones(3, *ids.shape, dtype=torch.long)
    for r, (images, videos) in enumerate(rows_media):
        out[:, r, mask[r]] = repo_rule_positions(ids[r, mask[r]].tolist(), images, videos, mode)
    return out


def row_media(row: H.Row) -> tuple[list, list]:
    """(images, videos) of a helper row; its segments keep merged grids, so patches are twice as many."""
    videos = []
    for seg in row.segments:
        if seg[0] == "av":
            (t, h, w), spg = seg[1], seg[3]
            videos.append((t, 2 * h, 2 * w, spg))
    return [], videos


@pytest.fixture(scope="module")
def ref():
    return H.Reference(seed=0)


@pytest.fixture(scope="module")
def model(ref, tmp_path_factory):
    return HookedVideoSALMONN2.from_pretrained(ref.save(tmp_path_factory.mktemp("salmonn_positions")))


def _compare(model, ref, rows, mode):
    """(max |logit diff| on real tokens, whether the ids equal the repository's) of our model against
    the HF-parts reference run at the repository's ids; the seconds per grid step are always passed."""
    inputs, _ = H.batch(*rows, mode=mode, spg_given=True)
    expect = repo_rule_batch(inputs, [row_media(r) for r in rows], mode)
    with torch.no_grad():
        enc = model.encode(**inputs, position_mode=mode)
        diff = (model(**enc) - ref(inputs, expect).logits).abs()[inputs["attention_mask"].bool()].max().item()
    return diff, torch.equal(enc["position_ids"], expect)


INFERENCE_AT_075 = {
    "video+audio": lambda: [H.Row(11).text(4).video_with_audio(3, 4, 8, chunks=1, spg=0.75).text(3)],
    "video_only": lambda: [H.Row(12).text(4).video(3, 4, 8, spg=0.75).text(3)],
    # the audio-only row of a mixed batch counts 0, 1, 2, ... as the repository's get_rope_index does
    "video+audio_and_audio_only_left_padded": lambda: [
        H.Row(13).text(4).video_with_audio(3, 4, 8, chunks=1, spg=0.75).text(3),
        H.Row(14).text(2).audio(chunks=1).text(5),
    ],
}


@pytest.mark.parametrize("name", list(INFERENCE_AT_075))
def test_inference_mode_runs_1s_per_grid_step_whatever_the_input_carries(model, ref, name):
    diff, same_ids = _compare(model, ref, INFERENCE_AT_075[name](), "inference")
    print(f"inference {name}, spg 0.75 passed: max |logit diff| = {diff:.2e}")
    assert same_ids and diff < TOL


TRAINING_MIXES = {
    "audio_visual_and_audio_only": lambda: [
        H.Row(21).text(4).video_with_audio(3, 4, 8, chunks=1, spg=0.5).text(3),
        H.Row(22).text(2).audio(chunks=1).text(5),
    ],
    "audio_visual_and_video_only": lambda: [
        H.Row(23).text(4).video_with_audio(2, 4, 8, chunks=1, spg=0.5).text(3),
        H.Row(24).text(2).video(2, 8, 8, spg=0.5).text(5),
    ],
    "audio_only_and_text_only": lambda: [H.Row(25).text(2).audio(chunks=1).text(5), H.Row(26).text(9)],
    "video_only_and_audio_only": lambda: [
        H.Row(27).text(2).video(2, 8, 8, spg=0.5).text(5),
        H.Row(28).text(3).audio(chunks=1).text(2),
    ],
}


@pytest.mark.parametrize("name", list(TRAINING_MIXES))
def test_training_mode_picks_the_branch_per_row_of_a_left_padded_batch(model, ref, name):
    diff, same_ids = _compare(model, ref, TRAINING_MIXES[name](), "training")
    print(f"training {name}: max |logit diff| = {diff:.2e}")
    assert same_ids and diff < TOL


def test_training_mode_image_row_with_audio_takes_the_visual_branch(model):
    """An image and an audio clip in one sample: the repository's Qwen2.5-VL branch (the image on its
    grid, the audio counting as text), not the audio branch; the image grid of the audio-visual row
    beside it is that row's alone (its branch ignores images)."""
    S, E = H.VISION_START, H.VISION_END
    image_row = [1, 2, S] + [H.IMAGE] * 4 + [E, 3, S] + [H.AUDIO] * 60 + [E, 4, 5]
    av_row = [6, S] + [H.IMAGE] * 4 + [E, S] + [H.VIDEO] * 8 + [H.AUDIO] * 60 + [E, 7]
    n = max(len(image_row), len(av_row))
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for r, row in enumerate([image_row, av_row]):
        ids[r, n - len(row):], mask[r, n - len(row):] = torch.tensor(row), 1
    images, video = [(1, 4, 4), (1, 4, 4)], (1, 4, 8, 2.0)
    inputs = {
        "input_ids": ids, "attention_mask": mask, "input_features": torch.randn(2, H.N_MELS, H.FRAMES),
        "pixel_values": torch.randn(32, H.PATCH_DIM), "image_grid_thw": torch.tensor(images),
        "pixel_values_videos": torch.randn(32, H.PATCH_DIM), "video_grid_thw": torch.tensor([video[:3]]),
        "video_second_per_grid": torch.tensor([video[3]]),
    }
    expect = repo_rule_batch(inputs, [([images[0]], []), ([images[1]], [video])], "training")
    with torch.no_grad():
        ours = model.encode(**inputs, position_mode="training")["position_ids"]
    assert expect[:, 0, n - len(image_row) + 3].tolist() == [3, 3, 3]  # first image token: grid (0, 0, 0) + 3
    assert expect[:, 0, -3:].tolist() == [[68, 69, 70]] * 3  # audio counted as text: 1D on to the end
    assert torch.equal(ours, expect)


def test_seconds_per_grid_not_one_per_video_is_refused_before_the_towers(model):
    inputs, _ = H.batch(H.Row(31).text(2).video(2, 4, 8, spg=0.5).text(2), mode="training", spg_given=True)
    calls = []
    model.add_hook("vision_encoder.hook_patch_embed", lambda t, hook: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"video_second_per_grid has 2 value\(s\) but video_grid_thw has 1 video\(s\); pass one per video"):
            model(**dict(inputs, video_second_per_grid=torch.tensor([0.5, 1.0])), position_mode="training")
    finally:
        model.reset_hooks()
    assert calls == []


def test_prepare_in_inference_mode_keeps_the_clips_timing_for_the_token_map(model, tmp_path):
    """The clip's seconds per grid step (2 frames / 10 fps) reach the TokenMap's times in either mode;
    the positions still run at 1.0 s per step in "inference" mode, as the repository's do."""
    from media_helpers import write_mp4
    from test_salmonn_inputs import salmonn_tokenizer

    inputs = model.prepare("What makes the sound?", video=write_mp4(tmp_path / "clip.mp4", seconds=3.0, fps=10),
                           tokenizer=salmonn_tokenizer(), position_mode="inference")
    assert inputs["video_second_per_grid"].tolist() == [pytest.approx(0.2)]
    tm = model.token_map(inputs)
    assert tm.time[0, tm.positions("video")].unique().tolist() == pytest.approx([t * 0.2 for t in range(15)])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    expect = repo_rule_batch(inputs, [([], [(t, h, w, 0.2)])], "inference")
    assert torch.equal(model.position_ids(**{k: inputs[k] for k in ("input_ids", "attention_mask", "video_grid_thw", "video_second_per_grid")})[0], expect)
