"""The toy task as a dataset of real files and a manifest (`hooked-av toy-data DIR --n N`), so a study
runs on the toy exactly as on a real dataset: media decoded from disk by `model.prepare`.

    manifest = write_toy_dataset("data/toy", n=200)     # data/toy/manifest.jsonl, data/toy/clips/*

Each clip is an mp4 at the training format (`clips.SIZE` px, `clips.N_FRAMES` frames at `clips.FPS`,
`clips.SECONDS` of audio): lossless H.264 in RGB (libx264rgb, qp 0) with a lossless ALAC track (32-bit),
so decoding gives back the rendered frames rounded to uint8 and the waveform to 1e-7. Auditory
samples also name a separate float WAV of the same audio in their `audio` column (the toy has no
audio-only format: it was trained on clips with both); two-clip samples list their clips as `items`.
Rows: `id`, `video` or `items`, `audio` (auditory kind), `question`, `answer`, and the metadata
columns `kind` (see `vocab.KINDS`), `question_name`, `dataset` ("toy"), `n_options` (the question's
answer words: a study's chance level is 1 / n_options) and the planted attributes of the row's clip(s)
(`ATTRIBUTE_COLUMNS`: `colour`, `brightness`, `note`, `instrument`, as answer words, e.g. "red"), whatever
the question asks: a two-clip row lists its clips' values in prompt order, comma-separated ("red,blue"), so
`value.split(",")[item]` is the value of clip `item` (the TokenMap's and the store's `item`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hooked_av.toy import vocab
from hooked_av.toy.clips import ATTRIBUTES, FPS, N_FRAMES, SAMPLE_RATE, SECONDS, SIZE, ClipBank, render_clips
from hooked_av.toy.data import draw_samples

MIN_CLIPS = 32  # enough clips that every attribute value (and a matching pair) is drawn
ATTRIBUTE_COLUMNS = tuple(ATTRIBUTES)  # colour, brightness, note, instrument: metadata columns of every row


def write_toy_dataset(out_dir, n: int, seed: int = 0, kinds: tuple[str, ...] = vocab.KINDS) -> Path:
    """Write `n` toy samples (kinds drawn uniformly from `kinds`; clips and questions deterministic in
    `seed`) as files under `out_dir` and return the manifest's path (`out_dir/manifest.jsonl`)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n!r}")
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    n_clips = max(MIN_CLIPS, n)
    attrs, video, audio = render_clips(n_clips, seed)
    frames = np.round(video).astype(np.uint8)
    # draw_samples reads only the attributes and the bank's length: no tensors are made for it
    bank = ClipBank(attrs, torch.empty(n_clips, 0), torch.empty(n_clips, 0, 0), (0, 0, 0), 0.0)
    written: dict[tuple[int, str], str] = {}

    def clip(i: int, ext: str) -> str:
        if (i, ext) not in written:
            name = f"clips/clip{i:05d}.{ext}"
            (write_clip if ext == "mp4" else write_wav)(out / name, *((frames[i], audio[i]) if ext == "mp4" else (audio[i],)))
            written[i, ext] = name
        return written[i, ext]

    lines = []
    for k, s in enumerate(draw_samples(bank, n, seed=seed + 1, kinds=kinds)):
        row = {"id": f"toy-{k:05d}"}
        if len(s.clips) == 1:
            row["video"] = clip(s.clips[0], "mp4")
            if s.kind == "auditory":
                row["audio"] = clip(s.clips[0], "wav")
        else:
            row["items"] = [{"video": clip(c, "mp4")} for c in s.clips]
        row |= {"question": s.text, "answer": s.answer, "kind": s.kind, "question_name": s.question, "dataset": "toy",
                "n_options": round(1 / vocab.chance(s.kind, s.question))}
        row |= {a: ",".join(ATTRIBUTES[a][attrs[a][c]] for c in s.clips) for a in ATTRIBUTE_COLUMNS}
        lines.append(json.dumps(row))
    path = out / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_clip(path, frames: np.ndarray, wave: np.ndarray, fps: float = FPS) -> Path:
    """An mp4 of `frames` `[T, H, W, 3]` uint8 at `fps` (lossless RGB H.264) with `wave` (float32,
    16 kHz) as a lossless ALAC track."""
    import av

    if frames.shape[1:3] != (SIZE, SIZE) or len(frames) != N_FRAMES or len(wave) != int(SECONDS * SAMPLE_RATE):
        raise ValueError(f"a toy clip is {N_FRAMES} frames of {SIZE}x{SIZE} px and {SECONDS} s of audio; got "
                         f"{tuple(frames.shape)} frames and {len(wave)} samples")
    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream("libx264rgb", rate=int(fps), options={"qp": "0"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "bgr24"
        a = c.add_stream("alac", rate=SAMPLE_RATE, layout="mono")
        for f in frames:
            c.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(vs.encode())
        _encode_audio(c, a, wave, "s32p")
    return Path(path)


def write_wav(path, wave: np.ndarray) -> Path:
    """A float32 PCM WAV at 16 kHz: decoding gives back `wave` exactly."""
    import av

    with av.open(str(path), "w", format="wav") as c:
        _encode_audio(c, c.add_stream("pcm_f32le", rate=SAMPLE_RATE, layout="mono"), wave, "flt")
    return Path(path)


def _encode_audio(container, stream, wave: np.ndarray, fmt: str) -> None:
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, dtype=np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    resampler = av.AudioResampler(format=fmt, layout="mono", rate=SAMPLE_RATE)
    for f in resampler.resample(frame) + resampler.resample(None):
        container.mux(stream.encode(f))
    container.mux(stream.encode(None))
