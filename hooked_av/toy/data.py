"""Questions over a `ClipBank`, and batches in exactly the format the Thinker (ours or HF's) takes.

    bank = make_clips(2000, seed=1)
    samples = draw_samples(bank, 64, seed=2)                 # kinds drawn per sample
    batch = collate(bank, samples, tokenizer)
    logits = model(**batch.inputs)                           # [batch, pos, vocab]
    correct = logits[:, -1].argmax(-1) == batch.answers     # the answer is read at the last position

Every clip serves every kind: a sample picks a kind and a question, then the clip(s) whose stored
attributes give the answer balance it needs (the match question and two-clip prompts need that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hooked_av.toy import vocab
from hooked_av.toy.clips import ClipBank
from hooked_av.toy.tokenizer import SPECIALS

S = SPECIALS


@dataclass(frozen=True)
class Sample:
    """One question: `kind` (see `vocab.KINDS`), `question` (its name in `vocab`), `clips` (bank
    indices, in prompt order), `text` (the question's words) and the one-word `answer`."""

    kind: str
    question: str
    clips: tuple[int, ...]
    text: str
    answer: str


@dataclass
class Batch:
    """`inputs`: processor-style kwargs for `model(**inputs)`; `answers` `[batch]` answer token ids;
    `samples`: what each row asks."""

    inputs: dict[str, Tensor]
    answers: Tensor
    samples: list[Sample]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.samples]


def draw_samples(
    bank: ClipBank, n: int, seed: int, kinds: tuple[str, ...] = vocab.KINDS, weights: tuple[float, ...] | None = None
) -> list[Sample]:
    """`n` questions over `bank`, deterministic in `seed`; the kind is drawn from `kinds` (uniform, or
    with `weights`), the question uniform within the kind, answers balanced for the match and
    two-clip questions."""
    unknown = set(kinds) - set(vocab.KINDS)
    if unknown:
        raise ValueError(f"unknown question kind(s) {sorted(unknown)}; choose from {vocab.KINDS}")
    p = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    rng = np.random.default_rng(seed)
    by_value = {(a, v): np.flatnonzero(vals == v) for a, vals in bank.attrs.items() for v in np.unique(vals)}
    out = []
    for _ in range(n):
        kind = kinds[rng.choice(len(kinds), p=p)]
        if kind == "two_clip":
            out.append(_two_clip(rng, bank, by_value))
            continue
        name = list(vocab.SINGLE_CLIP[kind])[rng.integers(len(vocab.SINGLE_CLIP[kind]))]
        text, attr, words = vocab.SINGLE_CLIP[kind][name]
        if attr == "match":  # only 1 clip in 4 matches by chance; pick the answer first to balance it
            clip = int(_pick(rng, by_value, attr, rng.integers(2)))
        else:
            clip = int(rng.integers(len(bank)))
        out.append(Sample(kind, name, (clip,), text, words[bank.attrs[attr][clip]]))
    return out


def _pick(rng, by_value, attr: str, value: int) -> int:
    pool = by_value.get((attr, value))
    if pool is None or len(pool) == 0:
        raise ValueError(f"the clip bank has no clip with {attr}={value}; make a larger bank")
    return int(pool[rng.integers(len(pool))])


def _two_clip(rng, bank: ClipBank, by_value) -> Sample:
    """Two clips that differ in the asked attribute; the question names which one to read."""
    name = list(vocab.TWO_CLIP)[rng.integers(len(vocab.TWO_CLIP))]
    template, attr, words = vocab.TWO_CLIP[name]
    first = int(rng.integers(len(bank)))
    others = np.flatnonzero(bank.attrs[attr] != bank.attrs[attr][first])
    clips = (first, int(others[rng.integers(len(others))]))
    which = int(rng.integers(2))
    text = template.format(vocab.CLIP_NAMES[1 + which])
    return Sample("two_clip", name, clips, text, words[bank.attrs[attr][clips[which]]])


def media_text(bank: ClipBank) -> str:
    """One clip's placeholders: its video block, then its audio block (separate blocks, so the model
    runs with `use_audio_in_video=False`)."""
    return " ".join(
        [S["vision_bos"]] + [S["video"]] * bank.video_tokens + [S["vision_eos"]]
        + [S["audio_bos"]] + [S["audio"]] * bank.audio_tokens + [S["audio_eos"]]
    )


def prompt_text(bank: ClipBank, sample: Sample) -> str:
    """The chat prompt up to the answer (the model predicts the answer word next)."""
    return chat_text(bank, len(sample.clips), sample.text)


def chat_text(bank: ClipBank | None, n_clips: int, question: str) -> str:
    """The toy's chat prompt for a question over `n_clips` clips of `bank`'s format: its own system
    prompt; one clip's media bare, two as "clip one <media> clip two <media>"; none (a text-only
    prompt, which the toy never saw in training) the question alone."""
    media = media_text(bank) if n_clips else ""
    if n_clips == 0:
        body = ""
    elif n_clips == 1:
        body = media
    else:
        clip, *names = vocab.CLIP_NAMES
        body = " ".join(f"{clip} {name} {media}" for name in names[:n_clips])
    return (
        f"{S['im_start']} system {vocab.SYSTEM} {S['im_end']} "
        f"{S['im_start']} user {body + ' ' if body else ''}{question} {S['im_end']} {S['im_start']} assistant"
    )


def collate(bank: ClipBank, samples: list[Sample], tokenizer) -> Batch:
    """`model_inputs` for `samples`, and their answer ids `[batch]`."""
    inputs = model_inputs(bank, [s.clips for s in samples], [s.text for s in samples], tokenizer)
    answers = torch.tensor(tokenizer.convert_tokens_to_ids([s.answer for s in samples]))
    return Batch(inputs, answers, list(samples))


def model_inputs(bank: ClipBank | None, clips: list[tuple[int, ...]], questions: list[str], tokenizer,
                 answers: list[str | None] | None = None) -> dict[str, Tensor]:
    """One row per question over the bank's `clips` (indices, prompt order): left-padded
    `input_ids` / `attention_mask` `[batch, pos]`, `input_features` `[n_audio, 128, frames]` +
    `feature_attention_mask`, `pixel_values_videos` `[n_video * rows, 1176]`, `video_grid_thw`
    `[n_video, 3]`, `video_second_per_grid` `[n_video]` (media in prompt order; none when no row has a
    clip). `answers` (one per row, or None): words appended after the prompt, marked in `text_parts`
    (`[batch, pos]`, codes into `hooked_av.inputs.token_map.TEXT_PARTS`) as the answer a loss scores."""
    texts = [chat_text(bank, len(c), q) for c, q in zip(clips, questions)]
    if answers is not None:
        texts = [t if a is None else f"{t} {a}" for t, a in zip(texts, answers)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    if enc["input_ids"].eq(tokenizer.unk_token_id).any():
        raise ValueError("a toy prompt has a word outside the toy vocabulary; rebuild the tokenizer")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if answers is not None and any(a is not None for a in answers):
        from hooked_av.inputs.token_map import TEXT_PARTS

        parts = torch.zeros_like(enc["input_ids"])
        for r, a in enumerate(answers):  # left-padded: the answer is the row's end
            if a is not None:
                parts[r, parts.shape[1] - len(tokenizer(a, add_special_tokens=False)["input_ids"]):] = TEXT_PARTS.index("answer")
        out["text_parts"] = parts
    flat = torch.tensor([i for c in clips for i in c], dtype=torch.long)
    if not len(flat):
        return out
    features = bank.features[flat]
    return {
        **out,
        "input_features": features,
        "feature_attention_mask": torch.ones(features.shape[0], features.shape[2], dtype=torch.long),
        "pixel_values_videos": bank.pixels[flat].flatten(0, 1),
        "video_grid_thw": torch.tensor([bank.grid_thw] * len(flat)),
        "video_second_per_grid": torch.full((len(flat),), bank.second_per_grid),
    }


def prompt_records(input_ids: Tensor, clips: list[tuple[int, ...]], tokenizer) -> dict[str, Tensor]:
    """`prepare`'s records of toy prompts (`model_inputs`' `input_ids`, the clips of each row): `text_parts`
    (the words naming two clips, "clip one" / "clip two", are clip labels, `label`; the rest is the chat's)
    and `media_items` (each clip's video and audio blocks are item k of its row), as the families' `prepare`
    record them for `token_map`. Not in `collate`'s batches, which HF's Thinker takes too."""
    from hooked_av.inputs.token_map import TEXT_PARTS, media_runs

    media = {tokenizer.convert_tokens_to_ids(S["video"]): "video", tokenizer.convert_tokens_to_ids(S["audio"]): "audio"}
    names = [tokenizer.convert_tokens_to_ids(w) for w in vocab.CLIP_NAMES]
    parts, items = torch.zeros_like(input_ids), torch.full_like(input_ids, -1)
    for r, c in enumerate(clips):
        toks = input_ids[r].tolist()
        runs = list(media_runs(toks, media))
        if len(runs) != 2 * len(c):
            raise RuntimeError(f"toy row {r} holds {len(runs)} media blocks for {len(c)} clip(s); report this")
        for k, (i, j, _) in enumerate(runs):
            items[r, i:j] = k // 2
            if len(c) > 1 and k % 2 == 0:  # "clip <name> <vision_bos>" before each clip's video block
                if toks[i - 3] != names[0] or toks[i - 2] != names[1 + k // 2]:
                    raise RuntimeError(f"toy row {r}: clip {k // 2} is not named before its media; report this")
                parts[r, i - 3 : i - 1] = TEXT_PARTS.index("label")
    return {"text_parts": parts, "media_items": items}

