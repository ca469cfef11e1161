"""Family-agnostic prompt objects: a `Prompt` (one batch row: question, media items, system
prompt, options, instruction) and its `Item`s (one clip each), which every family's `prepare` turns
into its own chat text and token layout, recording which tokens hold which part of the user's text
(`text_part_codes`, read back by the TokenMap as the groups question, options, instruction, label)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hooked_av.inputs.chat import check_plain_text
from hooked_av.inputs.media import Video
from hooked_av.inputs.token_map import TEXT_PARTS, media_runs

DEFAULT = object()  # "the family's own default system prompt"


@dataclass
class Item:
    """One media item of a prompt, shown in the order label, image, video, audio. `video`: a file,
    frames `[T, H, W, 3]` uint8 at the prompt's fps, or a `Video`; `audio`: a file, `(waveform,
    sample_rate)` or `Audio` (with a video and `use_audio_in_video`, it replaces the file's track)."""

    video: object = None
    audio: object = None
    image: object = None
    label: str = ""


@dataclass
class Prompt:
    """One row: a question, its media (`video`/`audio`/`image` for a single item, or `items`), an
    optional system prompt (`None`: the template's default), answer options
    (one line each, lettered A., B., ...) and an instruction (e.g. "Respond ONLY with a single label
    letter.", the hub paper's VGGSound prompt; "Answer with a single word.").

    The user's text after the media is rendered in the order question, options, instruction
    (`parts()`); each part after the question starts on a new line:

        Which clip has the dog?
        A. clip one
        B. clip two
        Respond ONLY with a single label letter.
    """

    question: str
    video: object = None
    audio: object = None
    image: object = None
    items: list = field(default_factory=list)
    system: object = DEFAULT
    options: list | None = None
    instruction: str | None = None
    answer: str | None = None  # appended after the generation prompt (`inputs["text_parts"]` marks it): what a loss scores

    def all_items(self) -> list[Item]:
        single = Item(self.video, self.audio, self.image) if any(x is not None for x in (self.video, self.audio, self.image)) else None
        if single and self.items:
            raise ValueError("give media either as video=/audio=/image= (one item) or as items=[...], not both")
        return [single] if single else [i if isinstance(i, Item) else Item(**i) for i in self.items]

    def parts(self) -> list[tuple[str, str]]:
        """The user's text after the media as `(group, text)` in the order written: `("question", q)`,
        then `("options", "\nA. ...\nB. ...")` when there are options, then `("instruction",
        "\n...")` when there is one. The newline that separates a part belongs to it."""
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"the question is empty ({self.question!r}); pass the text the model should answer")
        out = [("question", self.question)]
        if self.options:
            out.append(("options", "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(self.options))))
        if self.instruction is not None:
            if not isinstance(self.instruction, str) or not self.instruction.strip():
                raise ValueError(f"the instruction is empty ({self.instruction!r}); pass its text or leave instruction out")
            out.append(("instruction", "\n" + self.instruction))
        return out

    def text(self) -> str:
        """The user's text after the media: question, options, instruction (`parts()`) joined."""
        return "".join(t for _, t in self.parts())


def check_prompt_text(prompt: Prompt, specials: frozenset[str]) -> None:
    """Refuse a special token's text (`<|AUDIO|>`, `<|im_start|>`, ...) in the question, an option, a
    label or the system prompt, before anything is tokenized: it would become that token."""
    prompt.text()  # refuses an empty question first
    texts = [("the question", prompt.question)]
    texts += [(f"option {i + 1}", str(o)) for i, o in enumerate(prompt.options or [])]
    if prompt.instruction is not None:
        texts.append(("the instruction", prompt.instruction))
    if prompt.answer is not None:
        if not isinstance(prompt.answer, str) or not prompt.answer.strip():
            raise ValueError(f"the answer is empty ({prompt.answer!r}); pass its text or leave answer out")
        texts.append(("the answer", prompt.answer))
    texts += [("the label", it.label) for it in prompt.all_items() if it.label]
    if isinstance(prompt.system, str):
        texts.append(("the system prompt", prompt.system))
    for what, text in texts:
        check_plain_text(text, specials, what)


def text_part_codes(offsets: Tensor, segments: list[tuple[str | None, str]]) -> Tensor:
    """Which part of a text each of its tokens holds: `offsets` `[pos, 2]` the tokens' character spans
    `[start, end)` in `"".join(text for _, text in segments)` (a fast tokenizer's `offset_mapping`),
    `segments` the text in order as `(part, text)`, `part` a name of `TEXT_PARTS` or None. Returns
    LongTensor `[pos]`: `TEXT_PARTS.index(part)` of the segment where the token's first character
    lies, 0 for a token in a None segment and for an empty span (padding). Reading the parts from the
    offsets of the whole text's tokens leaves the ids exactly the tokenizer's; a token that straddles
    two parts (a BPE merge such as "?\n") belongs to the part where it starts."""
    starts, ends, codes, at = [], [], [], 0
    for part, text in segments:
        if part is not None and text:
            starts.append(at)
            ends.append(at + len(text))
            codes.append(TEXT_PARTS.index(part))
        at += len(text)
    offsets = torch.as_tensor(offsets).reshape(-1, 2)
    out = torch.zeros(len(offsets), dtype=torch.long)
    if not starts:
        return out
    first = offsets[:, 0].contiguous()
    seg = torch.searchsorted(torch.tensor(starts), first, right=True) - 1
    inside = (seg >= 0) & (offsets[:, 1] > offsets[:, 0])
    seg = seg.clamp(min=0)
    inside &= first < torch.tensor(ends)[seg]
    return torch.where(inside, torch.tensor(codes)[seg], out)


def check_offsets(tokenizer) -> None:
    """Refuse, before any media work, a tokenizer without character offsets (a slow, pure-Python
    one): prepare reads the offsets to record which tokens hold which part of the user's text."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} gives no character offsets, which prepare reads to record which tokens "
            "are the question, the options, the instruction and the item labels; load the fast tokenizer "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )


def has_audio(it: Item) -> bool:
    """Whether an item brings audio: an explicit waveform, a `Video` with audio, or a video file with an audio track."""
    if it.audio is not None:
        return True
    if isinstance(it.video, Video):
        return it.video.audio is not None
    if isinstance(it.video, str) or hasattr(it.video, "__fspath__"):
        from hooked_av.inputs.media import _open

        with _open(it.video) as c:
            return bool(c.streams.audio)
    return False


def gather_media(prompts: list[Prompt], fps: float, use_audio_in_video: bool) -> tuple[list, list, list]:
    """`(images, videos, audios)` of a batch of prompts, decoded, in the order the processors consume them:
    clip by clip, image, then video (with its audio when `use_audio_in_video`: the track, or the item's
    explicit audio), then a separate audio. Videos are sampled at `fps` (`media.load_video`)."""
    from hooked_av.inputs.media import load_audio, load_image, load_video

    images, videos, audios = [], [], []
    for p in prompts:
        for it in p.all_items():
            if it.image is not None:
                images.append(load_image(it.image))
            if it.video is not None:
                v = load_video(it.video, fps=fps, with_audio=use_audio_in_video,
                               audio=it.audio if use_audio_in_video else None)
                videos.append(v)
                if use_audio_in_video:
                    audios.append(v.audio)
            if it.audio is not None and not (it.video is not None and use_audio_in_video):
                audios.append(load_audio(it.audio))
    return images, videos, audios


def expand_placeholders(rows: list[list[tuple[str | None, str]]], tok: dict[str, str], grids: dict, counts: list[int],
                        merge: int, av_body=None) -> list[list[tuple[str | None, str]]]:
    """Replace each media placeholder of the chat text by its run of tokens, consuming media in order across
    the batch, segment by segment (`rows`: one `(part, text)` list per prompt; `tok`: placeholder strings
    by kind, `token_strings`). An image or video becomes `t * h * w / merge**2` tokens of its grid
    (`grids["image_grid_thw"]`, `grids["video_grid_thw"]`), an audio `counts[i]` tokens. `av_body(video,
    grid, n_audio) -> str`: the family's audio-in-video body replacing a video's placeholder together with
    the next audio's tokens (None: videos stand without their audio)."""
    state = {"image": 0, "video": 0, "audio": 0}
    pattern = re.compile("|".join(re.escape(tok[k]) for k in ("image", "video", "audio")))
    kind_of = {tok["image"]: "image", tok["video"]: "video", tok["audio"]: "audio"}

    def one(m: re.Match) -> str:
        kind = kind_of[m.group(0)]
        i = state[kind]
        state[kind] += 1
        if kind == "audio":
            return tok["audio"] * counts[i]
        grid = grids[f"{kind}_grid_thw"][i].tolist()
        if kind == "image" or av_body is None:
            return tok[kind] * (grid[0] * grid[1] * grid[2] // merge**2)
        a = state["audio"]
        state["audio"] += 1  # the video's own audio, next in appearance order
        return av_body(i, grid, counts[a])

    return [[(part, pattern.sub(one, t)) for part, t in row] for row in rows]


def media_item_record(input_ids: Tensor, media: dict[int, str], prompts: list[Prompt], blocks) -> Tensor:
    """`inputs["media_items"]` `[batch, pos]` long: the prompt's item (0-based) of every media placeholder, -1
    elsewhere, so the TokenMap numbers clips as the prompt has them (from the ids alone a video-only clip
    followed by an audio-only clip reads as one). `media`: placeholder id -> kind; `blocks(item)`: how many
    media blocks (runs of placeholders between their start and end tokens) the family lays out for an item."""
    out = torch.full_like(input_ids, -1)
    for r, p in enumerate(prompts):
        runs = list(media_runs(input_ids[r].tolist(), media))
        owners = [k for k, it in enumerate(p.all_items()) for _ in range(blocks(it))]
        if len(owners) != len(runs):  # the layout and its block count disagree: a bug, not a user error
            raise RuntimeError(f"prompt {r} lays out {len(runs)} media blocks for items that make {len(owners)}; report this")
        for (i, j, _), k in zip(runs, owners):
            out[r, i:j] = k
    return out


def with_answer(segments: list[tuple[str | None, str]], prompt: Prompt) -> list[tuple[str | None, str]]:
    """A prompt's chat segments with its answer (if any) after the generation prompt, as part "answer"."""
    return segments + [("answer", prompt.answer)] if prompt.answer is not None else segments


def as_prompts(prompts, prompt_kwargs: dict) -> list:
    """A question string (with `Prompt` fields in `prompt_kwargs`), one `Prompt` or a list of them
    -> a list of `Prompt`."""
    if isinstance(prompts, Prompt):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        return [Prompt(prompts, **prompt_kwargs)]
    if prompt_kwargs:
        raise ValueError(f"with a list of Prompt, put {sorted(prompt_kwargs)} inside each Prompt")
    return list(prompts)
