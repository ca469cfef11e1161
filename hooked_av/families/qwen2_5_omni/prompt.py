"""Prompt building for Qwen2.5-Omni: media items and a question -> the exact inputs the model takes
(what `Qwen2_5OmniProcessor` builds), with the chat template, audio-in-video interleaving, several
audio-visual items in one prompt, and left-padded batches.

    inputs = model.prepare("What makes the sound?", video="clip.mp4")             # audio from the track
    inputs = model.prepare("Which clip has a dog?", items=[Item(video="a.mp4", label="Clip 1: "),
                                                           Item(video="b.mp4", label="Clip 2: ")])
    inputs = model.prepare([Prompt("q1", video=frames, audio=(wave, 44100)), Prompt("q2", image="x.png")])
    logits = model(**inputs)
"""

from __future__ import annotations

import torch

from hooked_av.families.qwen2_5_omni.layout import OmniTokenIds, audio_token_counts, av_block_runs
from hooked_av.families.qwen2_5_omni.processor import OmniParts, video_max_pixels
from hooked_av.inputs.chat import special_texts
from hooked_av.inputs.media import SAMPLE_RATE
from hooked_av.inputs.prompt import (DEFAULT, Prompt, as_prompts, check_offsets, check_prompt_text, expand_placeholders,
                                     gather_media, has_audio, media_item_record, text_part_codes, with_answer)

OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
TEMPLATE_SYSTEM_PROMPT = "You are a helpful assistant."  # what the chat template inserts when none is given


def token_strings(tokenizer, ids: OmniTokenIds) -> dict[str, str]:
    """The placeholder strings, read from the tokenizer at the model's ids."""
    names = dict(audio=ids.audio, image=ids.image, video=ids.video, audio_bos=ids.audio_start,
                 audio_eos=ids.audio_end, vision_bos=ids.vision_start, vision_eos=ids.vision_end)
    return {k: tokenizer.convert_ids_to_tokens(v) for k, v in names.items()}


def render_chat(messages: list[dict], tok: dict[str, str]) -> str:
    """Qwen2.5-Omni's chat template (with the generation prompt) in Python. `messages`: role and
    content, a string or a list of `{"type": "text"|"image"|"video"|"audio", ...}`."""
    return "".join(text for _, text in chat_segments(messages, tok))


def chat_segments(messages: list[dict], tok: dict[str, str],
                  default_system: str | None = TEMPLATE_SYSTEM_PROMPT) -> list[tuple[str | None, str]]:
    """`render_chat`'s text in order as `(part, text)`: a text content's `"part"` (a name of
    `hooked_av.inputs.token_map.TEXT_PARTS`, as `messages_for` sets it), None for the rest.
    `default_system`: the system message the template writes when the messages have none (None: none,
    as Qwen3's ChatML templates)."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    out = [] if has_system or default_system is None else [(None, f"<|im_start|>system\n{default_system}<|im_end|>\n")]
    media = {
        "image": tok["vision_bos"] + tok["image"] + tok["vision_eos"],
        "video": tok["vision_bos"] + tok["video"] + tok["vision_eos"],
        "audio": tok["audio_bos"] + tok["audio"] + tok["audio_eos"],
    }
    for m in messages:
        out.append((None, f"<|im_start|>{m['role']}\n"))
        content = m["content"]
        if isinstance(content, str):
            out.append((None, content))
        else:
            out += [(None, media[c["type"]]) if c["type"] in media else (c.get("part"), c.get("text", "")) for c in content]
        out.append((None, "<|im_end|>\n"))
    return out + [(None, "<|im_start|>assistant\n")]


def messages_for(prompt: Prompt, use_audio_in_video: bool, default_system: str | None = OMNI_SYSTEM_PROMPT) -> list[dict]:
    """The chat messages of one prompt (media as typed parts, then the question, options and
    instruction, each a text content; text contents name their `"part"`, which chat templates ignore).
    `default_system`: the family's system prompt when the prompt asks for the default (`DEFAULT`)."""
    content = []
    for it in prompt.all_items():
        if it.label:
            content.append({"type": "text", "text": it.label, "part": "label"})
        if it.image is not None:
            content.append({"type": "image"})
        if it.video is not None:
            content.append({"type": "video"})
        if it.audio is not None and not (it.video is not None and use_audio_in_video):
            content.append({"type": "audio"})
    content += [{"type": "text", "text": text, "part": part} for part, text in prompt.parts()]
    system = default_system if prompt.system is DEFAULT else prompt.system
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": content}]


def item_blocks(it, use_audio_in_video: bool) -> int:
    """The media blocks `messages_for` lays out for an item: its image, its video (with its audio when
    `use_audio_in_video`), its audio on its own otherwise."""
    return (it.image is not None) + (it.video is not None) + (it.audio is not None and not (it.video is not None and use_audio_in_video))


def resolve_audio_in_video(prompts: list[Prompt], use_audio_in_video: bool | None) -> bool:
    """`None`: True when every video item has audio (a track or an explicit waveform), False when
    none has; a mix is an error (the model's flag applies to the whole batch)."""
    if use_audio_in_video is not None:
        return bool(use_audio_in_video)
    flags = [has_audio(it) for p in prompts for it in p.all_items() if it.video is not None]
    if flags and all(flags):
        return True
    if any(flags):
        raise ValueError("some video items have audio and some do not; pass use_audio_in_video=True (and audio for each) or False")
    return False


def prepare_omni(
    parts: OmniParts, ids: OmniTokenIds, prompts, use_audio_in_video: bool | None = None, return_text: bool = False, **prompt_kwargs
) -> dict:
    """Model inputs for one prompt (`prompts` a question string plus `prompt_kwargs`) or a batch (a
    list of `Prompt`), left-padded: input_ids/attention_mask `[batch, pos]`, input_features
    `[n_audio, mels, frames]` + feature_attention_mask, pixel_values(_videos) `[n_patches, 1176]` +
    grid_thw, video_second_per_grid, `use_audio_in_video`, and `text_parts` `[batch, pos]` (codes into
    `hooked_av.inputs.token_map.TEXT_PARTS`: which tokens are the question, options, instruction and
    item labels, read from the fast tokenizer's character offsets of the same call, so the ids are the
    processor's; `token_map` reads it, `forward` / `encode` accept and ignore it) and `media_items` `[batch, pos]`
    (the prompt's item of each media token, -1 elsewhere, `media_item_record`: the TokenMap numbers clips by it).

    As qwen-omni-utils + `Qwen2_5OmniProcessor` build them: a video file is sampled at `parts.fps` by
    `media.sample_frames`, and its seconds per temporal grid step are `temporal_patch_size` over the
    rate actually sampled (`Video.fps`; frames given as an array are taken as sampled at
    `parts.fps`). Every video's frames are resized within `video_max_pixels` (qwen-omni-utils'
    per-frame cap, applied to frame arrays too). Frames and images are read channels last. Audio too
    short for one token, and prompt text holding a special token, are errors."""
    prompts = as_prompts(prompts, prompt_kwargs)
    av_mode = resolve_audio_in_video(prompts, use_audio_in_video)
    check_offsets(parts.tokenizer)
    tok = token_strings(parts.tokenizer, ids)
    specials = special_texts(parts.tokenizer, tok.values())
    for p in prompts:
        check_prompt_text(p, specials)
    segments = [with_answer(chat_segments(messages_for(p, av_mode), tok), p) for p in prompts]
    images, videos, audios = gather_media(prompts, parts.fps, av_mode)
    out: dict = {}
    if audios:
        feats = parts.feature_extractor(
            [a.waveform for a in audios], sampling_rate=parts.feature_extractor.sampling_rate,
            return_attention_mask=True, padding="max_length", return_tensors="pt",
        )
        out["input_features"], out["feature_attention_mask"] = feats["input_features"], feats["attention_mask"]
        _check_audio_tokens(audios, audio_token_counts(feats["attention_mask"]), parts.feature_extractor.hop_length)
    if images:
        out.update(parts.image_processor(images=images, input_data_format="channels_last", return_tensors="pt"))
    spgs = [parts.video_processor.temporal_patch_size / v.fps for v in videos]  # Python floats, as the processor uses
    if videos:
        # one call per video: the per-frame cap depends on the video's frame count
        done = [parts.video_processor(
            videos=[v.frames], size={**parts.video_size, "longest_edge": video_max_pixels(parts, len(v.frames))},
            cap_pixels_per_frame=False, input_data_format="channels_last", return_tensors="pt",
        ) for v in videos]
        out["pixel_values_videos"] = torch.cat([d["pixel_values_videos"] for d in done])
        out["video_grid_thw"] = torch.cat([d["video_grid_thw"] for d in done])
        out["video_second_per_grid"] = torch.tensor(spgs)
    expanded = _expand(segments, tok, out, spgs, parts, av_mode)
    enc = parts.tokenizer(["".join(t for _, t in row) for row in expanded], padding=True, padding_side="left",
                          return_tensors="pt", return_offsets_mapping=True)
    text_parts = torch.stack([text_part_codes(o, row) for o, row in zip(enc["offset_mapping"], expanded)])
    items = media_item_record(enc["input_ids"], {ids.audio: "audio", ids.video: "video", ids.image: "image"}, prompts,
                              lambda it: item_blocks(it, av_mode))
    result = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **out, "use_audio_in_video": av_mode,
              "text_parts": text_parts, "media_items": items}
    if return_text:  # the chat text before placeholder expansion (what the HF processor takes)
        result["text"] = ["".join(t for _, t in row) for row in segments]
    return result


def _check_audio_tokens(audios: list, counts: list[int], hop: int) -> None:
    """The audio tower turns mel frames into tokens as `audio_token_counts` says: 2 frames or fewer
    (2 hops of samples, 20 ms) make none, and the audio would silently vanish from the prompt."""
    for i, (a, n) in enumerate(zip(audios, counts)):
        if n == 0:
            k = len(a.waveform)
            raise ValueError(
                f"audio item {i} is {k} samples ({1000 * k / SAMPLE_RATE:.1f} ms at 16 kHz), too short for one audio "
                f"token: pass at least {2 * hop + 1} samples (pad it with silence if the sound really is that short)"
            )


def _expand(rows: list[list[tuple[str | None, str]]], tok: dict, out: dict, spgs: list[float], parts: OmniParts,
            av_mode: bool) -> list[list[tuple[str | None, str]]]:
    """`expand_placeholders` with Qwen2.5-Omni's audio-in-video body: 2 s chunks of video then audio
    tokens (`layout.av_block_runs`) between the audio start and end tokens."""
    merge = parts.video_processor.merge_size
    counts = audio_token_counts(out["feature_attention_mask"]) if "feature_attention_mask" in out else []

    def av_body(video: int, grid, n_audio: int) -> str:
        runs = av_block_runs(grid, spgs[video], n_audio, merge, parts.position_id_per_seconds, parts.seconds_per_chunk)
        return tok["audio_bos"] + "".join(tok[m_] * (e - b) for m_, _, b, e in runs) + tok["audio_eos"]

    return expand_placeholders(rows, tok, out, counts, merge, av_body if av_mode else None)
