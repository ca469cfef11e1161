"""Which positions a language-model loss scores by default (`model(..., return_type="loss")`): HF's labels,
`[batch, pos]` token ids with -100 where nothing is scored, built from the prompt's own structure.

A position is scored (its token is a target the previous position predicts) by the first rule that finds
any in its row:
1. the answer `prepare(..., answer=)` appended (`text_parts` marks it `"answer"`);
2. every token after the last generation prompt (`<|im_start|>assistant\\n`): an answer appended by hand, or
   the tokens `generate` added;
3. the user's text (what the user wrote: question, options, instruction, clip labels), e.g. a string
   prompt `model("...")`;
4. without a chat template (a raw text), every real token, as TransformerLens scores every token.
Media placeholders and their start/end tokens, padding, the system prompt and the chat template are never
scored (-100). A row where no rule finds anything is refused, with what to pass instead.

    labels = default_labels(inputs["input_ids"], inputs["attention_mask"], inputs.get("text_parts"), chat, media_ids)
"""

from __future__ import annotations

import torch
from torch import Tensor

from hooked_av.core.loss import IGNORE  # HF's ignore_index: a position no loss reads
from hooked_av.inputs.chat import ChatTokens, text_groups
from hooked_av.inputs.token_map import TEXT_PARTS, with_text_parts

USER_PARTS = ("question", "options", "instruction", "label")  # what the user wrote (TokenMap's "user")


def default_labels(input_ids: Tensor, attention_mask: Tensor | None, text_parts: Tensor | None,
                   chat: ChatTokens | None, media_ids) -> Tensor:
    """LongTensor `[batch, pos]`: `input_ids` where scored (see the module's rules), -100 elsewhere."""
    ids = input_ids.long()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().to(ids.device)
    media = torch.isin(ids, torch.tensor(sorted(set(media_ids)), dtype=torch.long, device=ids.device))
    answer = None
    if text_parts is not None:
        codes = torch.as_tensor(text_parts, device=ids.device)
        answer = codes == TEXT_PARTS.index("answer")
    scored = torch.zeros_like(real)
    for r in range(ids.shape[0]):
        where = real[r].nonzero()[:, 0]
        if not len(where):
            raise ValueError(f"row {r} is all padding: there is nothing to score")
        start = int(where[0])
        row = ids[r, start:].tolist()
        if answer is not None and bool(answer[r].any()):
            pick = answer[r].clone()
        else:
            pick = torch.zeros_like(real[r])
            after = after_generation_prompt(row, chat)
            if after is not None and after < len(row):
                pick[start + after:] = True
            elif chat is None or chat.im_start not in row:
                pick[start:] = True
            else:  # the user's own parts as the TokenMap groups them: prepare's record over the chat structure
                codes_r = None if text_parts is None else codes[r, start:].tolist()
                groups = with_text_parts(text_groups(row, chat), codes_r)
                pick[start:] = torch.tensor([g in USER_PARTS for g in groups], device=ids.device)
        scored[r] = pick & real[r] & ~media[r]
        if not bool(scored[r, 1:].any()):  # position 0 has no earlier position to predict it
            raise ValueError(
                f"row {r} has no token to score: it holds neither an answer nor text of its own after the chat "
                "template; pass answer= to prepare, labels= (token ids, -100 where not scored) or a prompt with text")
    return torch.where(scored, ids, torch.full_like(ids, IGNORE))


def after_generation_prompt(row: list[int], chat: ChatTokens | None) -> int | None:
    """The index in `row` (unpadded token ids) just after its last generation prompt (`<|im_start|>assistant`
    and the newline that ends the header), None when it has none."""
    if chat is None or not chat.roles.get("assistant"):
        return None
    role = list(chat.roles["assistant"])
    for i in range(len(row) - 1, -1, -1):
        if row[i] == chat.im_start and row[i + 1:i + 1 + len(role)] == role:
            end = i + 1 + len(role)
            if chat.newline is not None and end < len(row) and row[end] == chat.newline:
                end += 1
            return end
    return None
