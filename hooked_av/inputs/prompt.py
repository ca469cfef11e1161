"""Family-agnostic prompt objects: a `Prompt` (one batch row: question, media items, system
prompt, options) and its `Item`s (one clip each), which every family's `prepare` turns into its own
chat text and token layout."""

from __future__ import annotations

from dataclasses import dataclass, field

from hooked_av.inputs.chat import check_plain_text
from hooked_av.inputs.media import Video

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
    optional system prompt (`None`: the template's default) and answer options (one line each,
    lettered A., B., ...)."""

    question: str
    video: object = None
    audio: object = None
    image: object = None
    items: list = field(default_factory=list)
    system: object = DEFAULT
    options: list | None = None

    def all_items(self) -> list[Item]:
        single = Item(self.video, self.audio, self.image) if any(x is not None for x in (self.video, self.audio, self.image)) else None
        if single and self.items:
            raise ValueError("give media either as video=/audio=/image= (one item) or as items=[...], not both")
        return [single] if single else [i if isinstance(i, Item) else Item(**i) for i in self.items]

    def text(self) -> str:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"the question is empty ({self.question!r}); pass the text the model should answer")
        if not self.options:
            return self.question
        return self.question + "\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(self.options))


def check_prompt_text(prompt: Prompt, specials: frozenset[str]) -> None:
    """Refuse a special token's text (`<|AUDIO|>`, `<|im_start|>`, ...) in the question, an option, a
    label or the system prompt, before anything is tokenized: it would become that token."""
    prompt.text()  # refuses an empty question first
    texts = [("the question", prompt.question)]
    texts += [(f"option {i + 1}", str(o)) for i, o in enumerate(prompt.options or [])]
    texts += [("the label", it.label) for it in prompt.all_items() if it.label]
    if isinstance(prompt.system, str):
        texts.append(("the system prompt", prompt.system))
    for what, text in texts:
        check_plain_text(text, specials, what)


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
