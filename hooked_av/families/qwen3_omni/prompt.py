"""Prompt building for Qwen3-Omni: media items and a question -> the exact inputs `Qwen3OmniMoeProcessor`
builds from the same media and components (ids, attention mask, log-mel features and their mask, pixels,
grids, seconds per grid), with audio-in-video, several clips in one prompt and left-padded batches, plus
`text_parts` (which tokens are the question, options, instruction and clip labels).

    inputs = model.prepare("What makes the sound?", video="clip.mp4")             # audio from the track
    inputs = model.prepare([Prompt("q1", video=frames, audio=(wave, 44100)), Prompt("q2", image="x.png")])

Anchor: transformers 5.24 `processing_qwen3_omni_moe.py`. Its choices followed here: ChatML with no
system message unless one is given (Qwen3's templates write none); audio padded to the longest clip of
the call (not to 300 s) with `feature_attention_mask`; every video in one video-processor call within
`video_size` (no total-pixel budget); `video_second_per_grid` = temporal patch / fps; an audio-in-video
clip's `<|video_pad|>` becomes `<|audio_start|>` + its video and audio tokens merged one by one by
temporal id (`layout.processor_av_order`) + `<|audio_end|>`, inside the clip's vision start/end.
The family-agnostic pieces (the ChatML segments, chat messages of a `Prompt`, placeholder strings,
resolving `use_audio_in_video`) are Qwen2.5-Omni's prompt module's, reused as they are.
"""

from __future__ import annotations

import torch

from hooked_av.families.qwen2_5_omni.processor import OmniParts
from hooked_av.families.qwen2_5_omni.prompt import (chat_segments, item_blocks, messages_for, resolve_audio_in_video,
                                                   token_strings)
from hooked_av.families.qwen3_omni.layout import Qwen3OmniTokenIds, audio_token_counts, processor_av_order
from hooked_av.inputs.chat import special_texts
from hooked_av.inputs.prompt import (as_prompts, check_offsets, check_prompt_text, expand_placeholders, gather_media,
                                     media_item_record, text_part_codes, with_answer)


def prepare_qwen3_omni(parts: OmniParts, ids: Qwen3OmniTokenIds, n_window: int, prompts,
                       use_audio_in_video: bool | None = None, return_text: bool = False, **prompt_kwargs) -> dict:
    """Model inputs for one prompt (`prompts` a question string plus `prompt_kwargs`, `Prompt` fields) or a
    batch (a list of `Prompt`), left-padded: `input_ids` / `attention_mask` `[batch, pos]`, `input_features`
    `[n_audio, mels, frames]` + `feature_attention_mask`, `pixel_values(_videos)` `[n_patches, 3 * 2 * 16 * 16]`
    + grids, `video_second_per_grid` (s), `use_audio_in_video`, `text_parts` `[batch, pos]` (codes into
    `hooked_av.inputs.token_map.TEXT_PARTS`, from the fast tokenizer's character offsets of the same call) and
    `media_items` `[batch, pos]` (the prompt's item of each media token, -1 elsewhere).

    Media are taken in order of appearance (image, video with its audio, audio, clip by clip); a video file
    is sampled at `parts.fps` (1 frame/s, the processor's default) by `media.sample_frames`, and its seconds
    per grid step are the temporal patch over the rate actually sampled. `n_window`: the audio encoder's
    (tokens per clip, `layout.audio_token_counts`). Special-token text in a question is an error."""
    if ids.audio_end is None or ids.vision_end is None:
        raise ValueError("prepare needs the closing audio / vision token ids: read them with "
                         "layout.token_ids(config, tokenizer) (the tokenizer names audio_eos_token / vision_eos_token)")
    prompts = as_prompts(prompts, prompt_kwargs)
    av_mode = resolve_audio_in_video(prompts, use_audio_in_video)
    check_offsets(parts.tokenizer)
    tok = token_strings(parts.tokenizer, ids)
    specials = special_texts(parts.tokenizer, tok.values())
    for p in prompts:
        check_prompt_text(p, specials)
    segments = [with_answer(chat_segments(messages_for(p, av_mode, default_system=None), tok, default_system=None), p)
                for p in prompts]
    images, videos, audios = gather_media(prompts, parts.fps, av_mode)
    out: dict = {}
    if audios:
        fe = parts.feature_extractor
        feats = fe([a.waveform for a in audios], sampling_rate=fe.sampling_rate, padding=True, truncation=False,
                   return_attention_mask=True, return_tensors="pt")
        out["input_features"], out["feature_attention_mask"] = feats["input_features"], feats["attention_mask"]
    if images:
        out.update(parts.image_processor(images=images, input_data_format="channels_last", return_tensors="pt"))
    spgs = [parts.video_processor.temporal_patch_size / v.fps for v in videos]
    if videos:
        done = parts.video_processor(videos=[v.frames for v in videos], size=dict(parts.video_size),
                                     input_data_format="channels_last", return_tensors="pt")
        out["pixel_values_videos"], out["video_grid_thw"] = done["pixel_values_videos"], done["video_grid_thw"]
        out["video_second_per_grid"] = torch.tensor(spgs)
    counts = audio_token_counts(out["feature_attention_mask"], n_window) if audios else []
    expanded = _expand(segments, tok, out, spgs, counts, parts, av_mode)
    enc = parts.tokenizer(["".join(t for _, t in row) for row in expanded], padding=True, padding_side="left",
                          return_tensors="pt", return_offsets_mapping=True)
    text_parts = torch.stack([text_part_codes(o, row) for o, row in zip(enc["offset_mapping"], expanded)])
    items = media_item_record(enc["input_ids"], {ids.audio: "audio", ids.video: "video", ids.image: "image"}, prompts,
                              lambda it: item_blocks(it, av_mode))
    result = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **out,
              "use_audio_in_video": av_mode, "text_parts": text_parts, "media_items": items}
    if return_text:  # the chat text before placeholder expansion (what the HF processor takes)
        result["text"] = ["".join(t for _, t in row) for row in segments]
    return result


def _expand(rows: list[list[tuple[str | None, str]]], tok: dict, out: dict, spgs: list[float], counts: list[int],
            parts: OmniParts, av_mode: bool) -> list[list[tuple[str | None, str]]]:
    """`expand_placeholders` with Qwen3-Omni's audio-in-video body: the clip's video and audio tokens merged
    one by one by temporal id (`layout.processor_av_order`) between the audio start and end tokens."""
    merge = parts.video_processor.merge_size

    def av_body(video: int, grid, n_audio: int) -> str:
        order = processor_av_order(grid, spgs[video], n_audio, merge, parts.position_id_per_seconds)
        return tok["audio_bos"] + "".join(tok[k] for k in order) + tok["audio_eos"]

    return expand_placeholders(rows, tok, out, counts, merge, av_body if av_mode else None)
