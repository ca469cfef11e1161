"""Scoring a sample's answer: when is it "correct", and which token do the experiments follow.

Rules (docs/methods.md):
- `"first_token"`: the answer's first token, spelled with and without a leading space (the
  cross-modal-hub paper's metric, `kaistmm/crossmodal-hub` `causal_trace.py`); correct when the
  model's top next token is either spelling. The experiments follow the spelling the model gives the
  higher probability.
- `"letter"`: the same on the option's letter ("B", " B"); needs options.
- `"generate"`: greedy generation (at most `max_new_tokens`, stopping at an end-of-turn token or a
  newline); correct when the generated text, stripped and case-folded and without a final full stop,
  equals the answer's text (or, with options, its letter). Zhang et al. keep samples whose full
  answer matches (`FightingFighting/cross-modal-information-flow-in-MLLM`). The experiments follow the
  answer's first token as in "first_token".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patching.datasets.manifest import Row

RULES = ("first_token", "letter", "generate")


@dataclass(frozen=True)
class Score:
    """`correct` by the rule; `answer_token`: the id the experiments follow; `p_answer`: its
    probability at the last prompt position; `prediction`: the model's answer (decoded top token,
    or the generated text)."""

    correct: bool
    answer_token: int
    p_answer: float
    prediction: str


@dataclass(frozen=True)
class Scorer:
    rule: str = "first_token"
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown scoring rule {self.rule!r}; choose from {RULES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def settings(self) -> dict:
        return {"rule": self.rule, **({"max_new_tokens": self.max_new_tokens} if self.rule == "generate" else {})}

    def target_text(self, row: Row) -> str:
        return row.letter if self.rule == "letter" else row.answer_text

    def targets(self, tokenizer, row: Row) -> list[int]:
        """The first token ids of the target text without and with a leading space (deduplicated),
        the ones the tokenizer spells with its unknown token left out."""
        text = self.target_text(row)
        ids = []
        for t in (text, " " + text):
            enc = tokenizer.encode(t, add_special_tokens=False)
            enc = [i for i in enc if not (len(t) > 1 and tokenizer.decode([i]).strip() == "")]  # a lone space token
            if enc and enc[0] != tokenizer.unk_token_id and enc[0] not in ids:
                ids.append(enc[0])
        return ids

    def check(self, tokenizer, rows) -> None:
        """Refuse, before any sample runs, rows this rule cannot score: no options for "letter", an
        answer whose first token the tokenizer does not know."""
        if tokenizer is None:
            raise ValueError("scoring needs the model's tokenizer (model.tokenizer is None); load a checkpoint with its tokenizer files")
        problems = []
        for r in rows:
            if self.rule == "letter" and r.answer_index is None:
                problems.append(f"{r.id!r}: no options, so no answer letter")
            elif not self.targets(tokenizer, r):
                problems.append(f"{r.id!r}: the answer {self.target_text(r)!r} starts with a word the tokenizer does not know")
        if problems:
            raise ValueError(f"{len(problems)} sample(s) cannot be scored by the {self.rule!r} rule: " + "; ".join(problems[:10])
                             + (" ..." if len(problems) > 10 else "") + "; fix the answers or choose another --scoring rule")

    def score(self, model, enc: dict, last_logits: torch.Tensor, row: Row) -> Score:
        """`enc`: the sample's `model.encode` outputs (batch 1); `last_logits` `[vocab]` at the last
        prompt position."""
        tok = model.tokenizer
        probs = last_logits.float().softmax(-1)
        ids = (Scorer("first_token") if self.rule == "generate" else self).targets(tok, row)
        if not ids:
            self.check(tok, [row])  # raises, naming the row and why
        best = max(ids, key=lambda i: float(probs[i]))
        top = int(probs.argmax())
        if self.rule != "generate":
            return Score(top in ids, best, float(probs[best]), tok.decode([top]))
        text = self.generate(model, enc)
        want = [row.answer_text] + ([row.letter] if row.letter else [])
        return Score(_norm(text) in {_norm(w) for w in want}, best, float(probs[best]), text)

    def generate(self, model, enc: dict) -> str:
        """Greedy text from the encoded prompt, cut at the first newline."""
        tok = model.tokenizer
        eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id}
               if isinstance(i, int) and i != tok.unk_token_id]
        with torch.no_grad():
            new = model.generate(inputs_embeds=enc["inputs_embeds"], position_ids=enc["position_ids"],
                                 attention_mask=enc.get("attention_mask"), rope_deltas=enc.get("rope_deltas"),
                                 max_new_tokens=self.max_new_tokens, eos_token_id=eos)
        ids = new[0].tolist()
        ids = ids[: next((k for k, i in enumerate(ids) if i in eos), len(ids))]
        return tok.decode(ids, skip_special_tokens=True).split("\n")[0].strip()


def _norm(text: str) -> str:
    return " ".join(text.strip().casefold().rstrip(".").split())
