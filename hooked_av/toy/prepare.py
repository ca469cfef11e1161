"""`model.prepare` of the toy model (`toy.load()` attaches it): media and a question -> exactly the
format the toy was trained on (`collate`'s), or an error that says why not.

The toy saw one format only: per clip, 2 frames of 56x56 px sampled at 2 fps and 1 s of audio, a
video block then an audio block (`use_audio_in_video=False`), its own system prompt, and words of
its own vocabulary; two clips come as "clip one <media> clip two <media>". Omni's prompt builder
would add a system prompt, an audio-in-video layout and `<|unk|>` tokens the toy never saw.

    model = toy.load()
    inputs = model.prepare("what colour is the shape ?", video="clip.mkv")        # its audio track
    inputs = model.prepare("which note is played ?", video=frames, audio="clip.wav")
    inputs = model.prepare(Prompt("what colour is clip two ?", items=[Item(video="a.mkv"), Item(video="b.mkv")]))
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from hooked_av.inputs.media import SAMPLE_RATE, Video, load_audio, load_video
from hooked_av.inputs.prompt import Prompt, as_prompts
from hooked_av.toy import vocab
from hooked_av.toy.clips import FPS, N_FRAMES, SECONDS, SIZE, bank_from_media
from hooked_av.toy.data import model_inputs, prompt_records

AUDIO_SLACK = 0.1  # s: a decoded track may be a little longer or shorter (codec padding); cut or pad to SECONDS


def prepare(model, prompts, *, use_audio_in_video: bool | None = None, **prompt_kwargs) -> dict:
    """Model inputs for one question (`video=` a file, frames `[2, 56, 56, 3]` uint8 or a `Video`;
    `audio=` a file or `(waveform, sample_rate)`, else the video file's track) or a list of `Prompt`
    (left-padded rows); `items=[Item(...), Item(...)]` for two clips; no media: a text-only prompt (what
    `model("...")` runs; the toy never saw one in training). `answer=` appends the answer word after the
    prompt, marked in `text_parts` (what `model(**inputs, return_type="loss")` scores). Returns
    `collate`'s inputs and `use_audio_in_video=False`, with `prompt_records`' `text_parts` (the clip names are
    labels; the answer) and `media_items`."""
    if use_audio_in_video:
        raise ValueError("the toy model was trained on separate video and audio blocks; pass use_audio_in_video=False (or leave it out)")
    frames, waves, clips, questions, answers = [], [], [], [], []
    for p in as_prompts(prompts, prompt_kwargs):
        questions.append(_question(p))
        answers.append(p.answer)
        items = p.all_items()
        if len(items) > len(vocab.CLIP_NAMES) - 1:
            raise ValueError(f"the toy model was trained on one or two clips per prompt; this prompt has {len(items)}")
        start = len(frames)
        for it in items:
            if it.image is not None or it.label:
                raise ValueError("the toy model takes clips only: no images, no labels (two clips are named 'clip one', 'clip two' for you)")
            frames.append(_frames(it.video))
            waves.append(_wave(it.audio, it.video))
        clips.append(tuple(range(start, len(frames))))
    bank = bank_from_media({}, np.stack(frames), np.stack(waves), FPS) if frames else None
    inputs = model_inputs(bank, clips, questions, model.tokenizer, answers)
    records = prompt_records(inputs["input_ids"], clips, model.tokenizer)
    if "text_parts" in inputs:  # the answer model_inputs marked, over the clip labels' record
        records["text_parts"] = torch.where(inputs["text_parts"] != 0, inputs["text_parts"], records["text_parts"])
    return {**inputs, **records, "use_audio_in_video": False}


def _question(p: Prompt) -> str:
    if p.options or p.instruction is not None:
        raise ValueError("the toy model was not trained on answer options or instructions; ask its plain questions")
    if p.system is not Prompt.system and p.system != vocab.SYSTEM:
        raise ValueError(f"the toy model was trained with its own system prompt ({vocab.SYSTEM!r}) only; leave system= out")
    known = set(vocab.all_words())
    unknown = [w for w in (p.text() + " " + (p.answer or "")).split() if w not in known]
    if unknown:
        examples = [t for qs in vocab.SINGLE_CLIP.values() for t, _, _ in qs.values()][:2]
        raise ValueError(
            f"words not in the toy vocabulary: {unknown}; the toy reads lower-case words split by spaces, "
            f"as in {examples} (see hooked_av.toy.vocab)"
        )
    return p.question


def _frames(video) -> np.ndarray:
    """The clip's frames `[N_FRAMES, SIZE, SIZE, 3]` uint8, sampled at FPS from a file."""
    if video is None:
        raise ValueError("the toy model was trained on clips with both video and audio; give video= too")
    name = str(video) if isinstance(video, (str, os.PathLike)) else "these frames"
    v = load_video(video, fps=FPS)  # a file sampled at FPS; frames in memory are taken as sampled at FPS
    frames = v.frames
    if frames.shape[1:3] != (SIZE, SIZE):
        raise ValueError(
            f"the toy model was trained on {SIZE}x{SIZE} px frames; {name} has {frames.shape[1]}x{frames.shape[2]}: "
            "render or crop the clip at that size"
        )
    if len(frames) != N_FRAMES or not math.isclose(v.fps, FPS):
        raise ValueError(
            f"the toy model was trained on {N_FRAMES} frames per clip ({SECONDS} s at {FPS} fps); {name} gives "
            f"{len(frames)} at {v.fps:g} fps: write the clip at {FPS} fps and {SECONDS} s, or pass its {N_FRAMES} frames"
        )
    return frames


def _wave(audio, video) -> np.ndarray:
    """The clip's audio, `SECONDS` at 16 kHz (float32), from `audio` or else the video file's track."""
    if audio is None and isinstance(video, Video):
        audio = video.audio
    elif audio is None and isinstance(video, (str, os.PathLike)):
        audio = video  # load_audio reads a video file's track, and says so when it has none
    if audio is None:
        raise ValueError(
            "the toy model was trained on clips with both video and audio; give audio= (a file or "
            "(waveform, sample_rate)) or a video file with an audio track"
        )
    wave = load_audio(audio).waveform
    n = int(SECONDS * SAMPLE_RATE)
    if abs(len(wave) - n) > AUDIO_SLACK * SAMPLE_RATE:
        raise ValueError(
            f"the toy model was trained on {SECONDS} s of audio per clip; this audio is {len(wave) / SAMPLE_RATE:.2f} s: "
            f"cut it to {SECONDS} s"
        )
    return np.pad(wave[:n], (0, max(0, n - len(wave))))
