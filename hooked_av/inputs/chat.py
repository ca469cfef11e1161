"""The ChatML structure shared by Qwen2.5-Omni and video-SALMONN 2+ (`<|im_start|>role\\n ... <|im_end|>\\n`):
which text positions are system prompt, user text (the question), or template."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTokens:
    """Token ids of the chat template: `im_start`, `im_end`, the newline that ends a header, and each
    role's token ids. Read them from a tokenizer with `ChatTokens.from_tokenizer`."""

    im_start: int
    im_end: int
    newline: int | None
    roles: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTokens":
        def one(token: str) -> int:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {token!r} token; it is not a ChatML (Qwen) tokenizer")
            return int(tid)

        nl = tokenizer.encode("\n", add_special_tokens=False)
        roles = {r: tuple(tokenizer.encode(r, add_special_tokens=False)) for r in ROLES}
        return cls(one("<|im_start|>"), one("<|im_end|>"), nl[0] if len(nl) == 1 else None, roles)


# ChatML ids of the Qwen2.5 tokenizer, the same in every Qwen2.5 checkpoint (Omni's and the
# Qwen2.5-VL under video-SALMONN 2+): <|im_start|>, <|im_end|>, "\n" and the role words.
QWEN2_5_CHAT = ChatTokens(151644, 151645, 198, {"system": (8948,), "user": (872,), "assistant": (77091,)})
QWEN2_5_VOCAB = 151665  # tokens in the Qwen2.5 tokenizer; checkpoints pad the embedding beyond it
QWEN2_5_VISION_START = 151652


def chat_tokens(tokenizer, chat: ChatTokens | None, d_vocab: int, vision_start: int) -> ChatTokens | None:
    """The chat ids a TokenMap reads: `chat` if given, else the tokenizer's, else Qwen2.5's own when
    the config uses Qwen2.5's vocabulary (`<|vision_start|>` at its id and room for every token),
    else None, and all text is "question"."""
    if chat is not None:
        return chat
    if tokenizer is not None:
        return ChatTokens.from_tokenizer(tokenizer)
    if d_vocab >= QWEN2_5_VOCAB and vision_start == QWEN2_5_VISION_START:
        return QWEN2_5_CHAT
    return None


def text_groups(tokens: list[int], chat: ChatTokens | None) -> list[str]:
    """Group of every token of one unpadded row, from the chat structure alone: headers
    (`<|im_start|>role\\n`), `<|im_end|>` and the text between messages are `template`; system
    content is `system`; user content is `question`; assistant content is `template`. A row with no
    `<|im_start|>` (a raw prompt) is all `question`. Media are labelled afterwards by the caller."""
    if chat is None or chat.im_start not in tokens:
        return ["question"] * len(tokens)
    out = ["template"] * len(tokens)
    role, i = None, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == chat.im_start:
            role, n = _role_at(tokens, i + 1, chat)
            end = i + 1 + n
            if chat.newline is not None and end < len(tokens) and tokens[end] == chat.newline:
                end += 1
            i = end  # header tokens stay template
            continue
        if tok == chat.im_end:
            role = None
        elif role == "system":
            out[i] = "system"
        elif role == "user":
            out[i] = "question"
        i += 1
    return out


def _role_at(tokens: list[int], i: int, chat: ChatTokens) -> tuple[str | None, int]:
    for role, ids in chat.roles.items():
        if ids and tuple(tokens[i : i + len(ids)]) == ids:
            return role, len(ids)
    return None, 0


def special_texts(tokenizer, extra=()) -> frozenset[str]:
    """The text of every special token of `tokenizer` (media placeholders, `<|im_start|>`, ...) and of
    `extra`: written in a prompt's text they would be tokenized as that token, so prompt builders
    refuse them (`check_plain_text`) rather than build a layout that no longer matches the media."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special} | set(extra)
    return frozenset(t for t in found if t)


def check_plain_text(text: str, specials: frozenset[str], what: str) -> None:
    """A clear error when `text` (named `what`) holds the text of a special token."""
    found = sorted(t for t in specials if t in text)
    if found:
        raise ValueError(
            f"{what} {text!r} contains a media placeholder token or chat-template token ({', '.join(map(repr, found))}); "
            "prepare writes those itself: pass media as video=/audio=/image= and leave them out of the text"
        )
