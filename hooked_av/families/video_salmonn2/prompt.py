"""Prompt building for video-SALMONN 2+: media items and a question -> the exact inputs
`HookedVideoSALMONN2` takes, with SALMONN's own chat template, its audio front end (30 s Whisper
chunks, 60 tokens each), its frame sampling (10 fps, 16..768 frames, 61250 pixels per frame), the
interleaved audio-visual block per temporal grid step (`layout.py`), several items in one prompt, and
left-padded batches.

    inputs = model.prepare("What makes the sound?", video="clip.mp4")        # audio from the track
    inputs = model.prepare("Which clip has a dog?", items=[Item(video="a.mp4", label="Clip 1: "),
                                                           Item(video="b.mp4", label="Clip 2: ")])
    inputs = model.prepare([Prompt("q1", audio="a.wav"), Prompt("q2", video=frames, audio=(wave, 44100))])
    logits = model(**inputs)

The prompt text is the repository's: `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n`,
then per item `{label}<|vision_start|>...<|vision_end|>\\n`, then the question (and lettered options,
and an instruction: `Prompt.parts`), `<|im_end|>\\n<|im_start|>assistant\\n`. Media ids come from the
model (`model.ids`), never from strings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from hooked_av.families.video_salmonn2.layout import salmonn_block_ids
from hooked_av.inputs.chat import special_texts
from hooked_av.inputs.media import (
    SAMPLE_RATE, Audio, MediaConstants, Video, _decode_audio, _open, check_frames, load_audio, load_image, media_constants,
    sampled_rate,
)
from hooked_av.inputs.prompt import DEFAULT, Item, Prompt, as_prompts, check_offsets, check_prompt_text, has_audio, text_part_codes
from hooked_av.inputs.token_map import TEXT_PARTS

SALMONN_SYSTEM_PROMPT = "You are a helpful assistant."  # what the repository's data pipeline always inserts


@dataclass
class SalmonnParts:
    """What `prepare_salmonn` needs: `tokenizer`, `feature_extractor` (WhisperFeatureExtractor over
    `chunk_seconds` of 16 kHz audio), `image_processor` / `video_processor` (Qwen2-VL), and the
    sampling settings: `fps` (frames per second taken from a video file), `min_frames` / `max_frames`
    (clip of the sampled count), `min_pixels` / `max_pixels` (per frame or image, resize bounds),
    `tokens_per_chunk` (LLM tokens per audio chunk, 60 for the released models)."""

    tokenizer: object
    feature_extractor: object
    image_processor: object
    video_processor: object
    fps: float = 10.0
    min_frames: int = 16
    max_frames: int = 768
    min_pixels: int = 784
    max_pixels: int = 61250
    chunk_seconds: int = 30
    tokens_per_chunk: int = 60

    @property
    def chunk_samples(self) -> int:
        return int(self.chunk_seconds * SAMPLE_RATE)


def assemble_salmonn_parts(tokenizer, num_mel_bins: int = 128, chunk_seconds: int = 30, tokens_per_chunk: int = 60, **settings) -> SalmonnParts:
    """The components around a given tokenizer: `WhisperFeatureExtractor(num_mel_bins, hop 160,
    chunk_seconds)` and the stock Qwen2-VL image/video processors; `settings` override `SalmonnParts`
    fields (fps, min_frames, max_frames, min_pixels, max_pixels)."""
    if tokenizer is None:
        raise ValueError(
            "no tokenizer: load the model from a folder that has one, set model.tokenizer, or pass "
            "tokenizer=... (the Qwen2.5-VL tokenizer with <|audio_pad|>)"
        )
    return SalmonnParts(tokenizer, *stock_components(num_mel_bins, chunk_seconds), chunk_seconds=chunk_seconds,
                        tokens_per_chunk=tokens_per_chunk, **settings)


def stock_components(num_mel_bins: int = 128, chunk_seconds: int = 30) -> tuple:
    """`(feature_extractor, image_processor, video_processor)`: `WhisperFeatureExtractor(num_mel_bins,
    16 kHz, hop 160, chunk_seconds)` and the stock Qwen2-VL image and video processors, as the
    repository's data pipeline builds them."""
    from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    fe = WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=chunk_seconds, n_fft=400
    )
    return fe, Qwen2VLImageProcessor(), Qwen2VLVideoProcessor()


def model_media_constants(model) -> MediaConstants:
    """Image mean/std and the silent log-mel level of a `HookedVideoSALMONN2`'s processor: the parts
    its `prepare` uses (`model.processor_parts`, else those built for its tokenizer), else the stock
    components sized by its Whisper encoder."""
    parts = getattr(model, "processor_parts", None)
    if parts is None and getattr(model, "tokenizer", None) is not None:
        parts = salmonn_parts_for_model(model)
    if parts is None:
        fe, ip, _ = stock_components(model.audio_encoder.num_mel_bins)
        return media_constants(ip, fe)
    return media_constants(parts.image_processor, parts.feature_extractor)


def salmonn_parts_for_model(model, tokenizer=None, **settings) -> SalmonnParts:
    """Parts sized by a `HookedVideoSALMONN2`: mel bins from its Whisper encoder, the chunk length from
    its positions (`2 * max_source_positions` frames of 10 ms), tokens per chunk from its Q-Former."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    enc = model.audio_encoder
    frames = 2 * enc.max_source_positions  # conv2 has stride 2: 3000 mel frames -> 1500 positions
    seconds = frames * 160 / SAMPLE_RATE
    if seconds != int(seconds):
        raise ValueError(f"the audio encoder takes {frames} mel frames ({seconds} s at hop 160), not a whole number of seconds")
    return assemble_salmonn_parts(tok, enc.num_mel_bins, int(seconds), model.audio_tokens_per_chunk, **settings)


# ---- media -------------------------------------------------------------------------------------
def audio_features(parts: SalmonnParts, audio: Audio) -> tuple[torch.Tensor, int]:
    """Mel chunks `[n_chunks, n_mels, 3000]` of one mono 16 kHz waveform and its token count
    `ceil(len / 30 s) * 60`. The waveform is zero-padded to at least 1 s, then cut into 30 s chunks
    (the last one shorter; the feature extractor pads each chunk to 30 s)."""
    w = np.asarray(audio.waveform, dtype=np.float32)
    if len(w) < SAMPLE_RATE:
        w = np.pad(w, (0, SAMPLE_RATE - len(w)))
    step = parts.chunk_samples
    chunks = [w[i : i + step] for i in range(0, len(w), step)]
    feats = parts.feature_extractor(
        chunks, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=False, return_tensors="pt"
    )["input_features"]
    return feats, math.ceil(len(w) / step) * parts.tokens_per_chunk


def sample_video_file(path, parts: SalmonnParts, with_audio: bool) -> Video:
    """Frames `[T, H, W, 3]` uint8 from a video file: `round(duration * fps)` frames clipped to
    `[min_frames, max_frames]`, evenly spaced (the repository's rule); `Video.fps` is the rate actually
    sampled (`media.sampled_rate`), which sets the seconds per grid step. With `with_audio`, the audio
    track (mono 16 kHz) comes too."""
    with _open(path) as c:
        if not c.streams.video:
            raise ValueError(f"{str(path)!r} has no video stream; pass it as audio= instead")
        stream = c.streams.video[0]
        rate = float(stream.average_rate or 0)
        total = sum(1 for _ in c.decode(stream))  # counted, not trusted from the header
    if total == 0 or rate <= 0:
        raise ValueError(f"{str(path)!r} holds no decodable video frames (or no frame rate)")
    duration = total / rate
    target = min(max(round(duration * parts.fps), parts.min_frames), parts.max_frames)
    wanted = np.unique(np.linspace(0, total - 1, target).astype(int))
    keep, frames = set(wanted.tolist()), []
    with _open(path) as c:
        for i, f in enumerate(c.decode(c.streams.video[0])):
            if i in keep:
                frames.append(f.to_ndarray(format="rgb24"))
    track = None
    if with_audio:
        with _open(path) as c:
            if not c.streams.audio:
                raise ValueError(
                    f"{str(path)!r} has no audio track, but its audio was requested; pass use_audio_in_video=False "
                    "to use the frames only, or give the audio with audio=..."
                )
            track = _decode_audio(c, path)
    return Video(np.stack(frames), sampled_rate(len(frames), total, rate), track)


def load_salmonn_video(source, parts: SalmonnParts, with_audio: bool, audio=None) -> Video:
    """A video file (sampled by `sample_video_file`), frames `[T, H, W, 3]` uint8 (taken as already
    sampled at `parts.fps`), or a `Video`; `audio` (file, `(waveform, rate)`, `Audio`) replaces the track."""
    if isinstance(source, Video):
        video = Video(check_frames(source.frames, "Video.frames"), source.fps, source.audio)
    elif isinstance(source, (str, os.PathLike)):
        video = sample_video_file(source, parts, with_audio and audio is None)
    else:
        video = Video(check_frames(source, "video frames"), parts.fps)
    if audio is not None:
        video = Video(video.frames, video.fps, load_audio(audio))
    if with_audio and video.audio is None:
        raise ValueError("this video has no audio but its audio was requested (use_audio_in_video=True); pass "
                         "audio=(waveform, sample_rate) with it or use_audio_in_video=False")
    return video


# ---- prompt --------------------------------------------------------------------------------------
def _audio_for(it: Item, use_audio_in_video: bool | None) -> bool:
    """Whether a video item's block interleaves audio: `None` = when it has some (track or audio=)."""
    if use_audio_in_video is None:
        return has_audio(it)
    return bool(use_audio_in_video)


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def prepare_salmonn(
    parts: SalmonnParts, ids, prompts, position_mode: str = "inference", use_audio_in_video: bool | None = None,
    merge: int = 2, **prompt_kwargs,
) -> dict:
    """Model inputs for one prompt (`prompts` a question string plus `prompt_kwargs`: video, audio,
    image, items, system, options) or a batch (a list of `Prompt`), left-padded:

    - `input_ids` / `attention_mask` `[batch, pos]`;
    - `input_features` `[n_chunks, n_mels, 3000]`: every audio's 30 s chunks in prompt order;
    - `pixel_values` / `image_grid_thw`, `pixel_values_videos` `[patches, 3*2*14*14]` / `video_grid_thw`;
    - `video_second_per_grid` (seconds per temporal grid step, `temporal_patch_size / fps`): the
      TokenMap's times; positions read it in "training" mode only (the official inference drops it);
    - `position_mode`: the mode these inputs are for (the model's forward, encode and token_map read it);
    - `text_parts` `[batch, pos]`: codes into `hooked_av.inputs.token_map.TEXT_PARTS` saying which
      tokens are the question, options, instruction, item labels and the newline the template puts
      after each item (the question text is tokenized whole and split by the fast tokenizer's
      character offsets, so the ids do not change); `token_map` reads it, `forward` / `encode`
      accept and ignore it;
    - `media_items` `[batch, pos]`: the prompt's item (0-based) of each media token, -1 elsewhere (the
      TokenMap numbers clips by it).

    `use_audio_in_video`: None (default) interleaves each video with its audio when it has some; True
    requires audio for every video; False keeps video frames alone (an `audio=` then becomes its own block).
    `ids`: the model's `SalmonnTokenIds`; `merge`: the vision tower's spatial merge size."""
    prompts = as_prompts(prompts, prompt_kwargs)
    if not prompts:
        raise ValueError("no prompt given; pass a question string or a list of Prompt")
    if any(not isinstance(p, Prompt) for p in prompts):
        raise ValueError("a batch must be a list of hooked_av.inputs.Prompt")
    tok = parts.tokenizer
    check_offsets(tok)
    media = [ids.audio, ids.image, ids.video, ids.vision_start, ids.vision_end]
    specials = special_texts(tok, tok.convert_ids_to_tokens(media))
    for p in prompts:
        check_prompt_text(p, specials)
    tp = parts.video_processor.temporal_patch_size
    rows, codes, items, mels, images, videos, spgs = [], [], [], [], [], [], []
    placeholders = {ids.audio, ids.image, ids.video}

    for p in prompts:
        system = SALMONN_SYSTEM_PROMPT if p.system is DEFAULT else p.system
        head = (f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else "") + "<|im_start|>user\n"
        row = _encode(tok, head)
        code = [0] * len(row)
        item = [-1] * len(row)
        for k, it in enumerate(p.all_items()):
            row += _encode(tok, it.label) if it.label else []
            code += [TEXT_PARTS.index("label")] * (len(row) - len(code))
            if it.image is not None:
                images.append(load_image(it.image))
                grid = _image_grid(parts, images)
                row += [ids.vision_start] + [ids.image] * (int(np.prod(grid)) // merge**2) + [ids.vision_end]
            interleave = False
            if it.video is not None:
                interleave = _audio_for(it, use_audio_in_video)
                v = load_salmonn_video(it.video, parts, interleave, it.audio if interleave else None)
                videos.append(v.frames)
                spgs.append(tp / v.fps)
                n_audio = 0
                if interleave:
                    feats, n_audio = audio_features(parts, v.audio)
                    mels.append(feats)
                grid = _video_grid(parts, v.frames, tp, merge)
                row += salmonn_block_ids(ids, grid, spgs[-1], n_audio, merge)
            if it.audio is not None and not interleave:
                feats, n_audio = audio_features(parts, load_audio(it.audio))
                mels.append(feats)
                row += salmonn_block_ids(ids, None, n_audio=n_audio)
            code += [0] * (len(row) - len(code))
            item += [k if t in placeholders else -1 for t in row[len(item):]]
            row += _encode(tok, "\n")
            code += [TEXT_PARTS.index("template")] * (len(row) - len(code))
        text = tok(p.text(), add_special_tokens=False, return_offsets_mapping=True)  # whole: the ids do not change
        row += text["input_ids"]
        code += text_part_codes(text["offset_mapping"], p.parts()).tolist()
        row += _encode(tok, "<|im_end|>\n<|im_start|>assistant\n")
        code += [0] * (len(row) - len(code))
        if p.answer is not None:  # after the generation prompt, for a loss to score
            row += _encode(tok, p.answer)
            code += [TEXT_PARTS.index("answer")] * (len(row) - len(code))
        item += [-1] * (len(row) - len(item))
        rows.append(row)
        codes.append(code)
        items.append(item)

    out = _left_pad(rows, tok)
    out["text_parts"] = _left_pad(codes, tok, pad=0)["input_ids"]
    out["media_items"] = _left_pad(items, tok, pad=-1)["input_ids"]
    if mels:
        out["input_features"] = torch.cat(mels)
    if images:
        out.update(parts.image_processor(images=images, size=_size(parts), input_data_format="channels_last", return_tensors="pt"))
    if videos:
        # the repository caps each frame at max_pixels only (no whole-video budget); frames are [T, H, W, 3]
        out.update(parts.video_processor(videos=videos, size=_size(parts), cap_pixels_per_frame=False,
                                         input_data_format="channels_last", return_tensors="pt"))
        out["video_second_per_grid"] = torch.tensor(spgs)
    out["position_mode"] = position_mode
    return out


def _size(parts: SalmonnParts) -> dict:
    return {"shortest_edge": parts.min_pixels, "longest_edge": parts.max_pixels}


def _image_grid(parts: SalmonnParts, images: list) -> list[int]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = parts.image_processor
    h, w = images[-1].shape[:2]
    rh, rw = smart_resize(h, w, ip.patch_size * ip.merge_size, parts.min_pixels, parts.max_pixels)
    return [1, rh // ip.patch_size, rw // ip.patch_size]


def _video_grid(parts: SalmonnParts, frames: np.ndarray, tp: int, merge: int) -> list[int]:
    """`[T', H', W']` the video processor will report (frames padded to a multiple of `tp`)."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    vp = parts.video_processor
    if vp.merge_size != merge:
        raise ValueError(f"the video processor merges {vp.merge_size}x{vp.merge_size} patches but the model merges {merge}x{merge}")
    h, w = frames.shape[1:3]
    rh, rw = smart_resize(h, w, vp.patch_size * merge, parts.min_pixels, parts.max_pixels)
    return [math.ceil(len(frames) / tp), rh // vp.patch_size, rw // vp.patch_size]


def _left_pad(rows: list[list[int]], tok, pad: int | None = None) -> dict:
    """`input_ids` (left-padded with `pad`, default the tokenizer's pad id) and `attention_mask`."""
    n = max(len(r) for r in rows)
    pad = tok.pad_token_id if pad is None else pad
    if pad is None and any(len(r) < n for r in rows):
        raise ValueError("the rows differ in length but the tokenizer has no pad token; set tokenizer.pad_token (Qwen: '<|endoftext|>')")
    ids = torch.full((len(rows), n), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def with_settings(parts: SalmonnParts, **settings) -> SalmonnParts:
    """A copy of `parts` with sampling settings changed (fps, min_frames, max_frames, min/max_pixels)."""
    unknown = set(settings) - {"fps", "min_frames", "max_frames", "min_pixels", "max_pixels"}
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {sorted(unknown)}; use fps, min_frames, max_frames, min_pixels, max_pixels")
    new = replace(parts, **settings)
    if new.fps <= 0 or not 1 <= new.min_frames <= new.max_frames or new.max_pixels < new.min_pixels:
        raise ValueError(
            f"bad sampling settings (fps={new.fps}, frames {new.min_frames}..{new.max_frames}, pixels "
            f"{new.min_pixels}..{new.max_pixels}): need fps > 0, 1 <= min_frames <= max_frames, min_pixels <= max_pixels"
        )
    return new
