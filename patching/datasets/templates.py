"""Prompt templates: how a manifest row becomes a `hooked_av.inputs.Prompt` for `model.prepare`.

- `"default"`: the question as it stands, the family's own chat format (its system prompt, its media
  layout); options, when the row has them, are listed as lettered lines (A. ..., B. ...).
- `"mc"`: multiple choice: the options lettered and an instruction after them; the default
  instruction is the cross-modal-hub paper's VGGSound prompt's ("Respond ONLY with a single label
  letter", `kaistmm/crossmodal-hub`, docs/methods.md §2). Rows without options are refused.
- a custom string with `{question}` (and optionally `{options}`, the lettered lines): the question
  text the model sees, e.g. `"Listen and watch. {question} Answer in one word."`.

Options and the instruction go to `Prompt(options=..., instruction=...)`, so the TokenMap shows them
as their own groups ("options", "instruction"), not lumped into "question".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hooked_av.inputs import Item, Prompt
from patching.datasets.manifest import Row

MC_INSTRUCTION = "Respond ONLY with a single label letter."
KINDS = ("default", "mc")


def lettered(options) -> str:
    """`A. dog\\nB. car`: the options as the families' prompts letter them."""
    return "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))


@dataclass(frozen=True)
class Template:
    """`kind`: "default", "mc" or "custom"; `text`: the custom format string; `instruction`: the
    multiple-choice instruction (None for the others)."""

    kind: str = "default"
    text: str | None = None
    instruction: str | None = None

    def settings(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, rows) -> None:
        """Refuse, before any model work, rows this template cannot build (mc without options)."""
        if self.kind == "mc":
            bad = [r.id for r in rows if not r.options]
            if bad:
                raise ValueError(f"the 'mc' template needs options; {len(bad)} sample(s) have none (ids {bad[:5]}): "
                                 "add options to the manifest or use --template default")

    def prompt(self, row: Row) -> Prompt:
        """The row's Prompt: media as one item or its items, in the manifest's order."""
        media = dict(video=row.video, audio=row.audio, image=row.image)
        if row.items:
            media = dict(items=[Item(video=it["video"], audio=it["audio"], image=it["image"], label=it["label"]) for it in row.items])
        question, options, instruction = row.question, list(row.options) if row.options else None, self.instruction
        if self.kind == "custom":
            question = self.text.format(question=row.question, options=lettered(row.options or ()))
            options = None  # the custom text placed them (or left them out) itself
        return Prompt(question, options=options, instruction=instruction, **media)


def parse_template(spec, instruction: str | None = None) -> Template:
    """"default", "mc" or a custom format string with `{question}` -> a Template (`instruction`
    replaces the mc default; it is refused for the others, where it would be ignored)."""
    if isinstance(spec, Template):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a template is 'default', 'mc' or a text with {{question}}; got {spec!r}")
    if spec in KINDS:
        if instruction is not None and spec != "mc":
            raise ValueError("an instruction applies to the 'mc' template only; put it in a custom template text instead")
        return Template(spec, None, (instruction or MC_INSTRUCTION) if spec == "mc" else None)
    if "{question}" not in spec:
        raise ValueError(f"a custom template must contain {{question}} (and may contain {{options}}); got {spec!r}, "
                         f"or choose one of {KINDS}")
    try:
        spec.format(question="", options="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"the custom template {spec!r} has a field other than {{question}} and {{options}} ({e}); "
                         "write literal braces as {{ and }}") from None
    if instruction is not None:
        raise ValueError("an instruction applies to the 'mc' template only; put it in the custom template text instead")
    return Template("custom", spec, None)
