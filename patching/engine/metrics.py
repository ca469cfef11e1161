"""Metrics on last-position logits, and the normalisations the experiments report.

A metric is called as `metric(logits, samples)`: `logits` `[rows, vocab]` (the final prompt position),
`samples` `[rows]` (or one int) the sample index of each row (a sweep repeats one sample over many rows);
it returns `[rows]` floats. Answers are token ids, one for every sample (or one for all), or words: a
word is the first token the model would write next (`model.answer_tokens`, read in each prompt's context
when the metric is checked against the inputs, as every experiment does before its forwards). Without
`samples`, row i is sample i when there are as many rows as answers; any other shape must say which
sample each row is (scoring every row against the first answer was a silent wrong result).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from patching.engine import checks


class Words(list):
    """Answers given as words, resolved to token ids by `Metric.check(model, n, inputs)`."""


def _ids(tokens) -> Tensor | Words:
    items = [tokens] if isinstance(tokens, str) else tokens
    if isinstance(items, (list, tuple)) and any(isinstance(t, str) for t in items):
        return Words(items)
    t = torch.as_tensor(tokens).flatten()
    if t.numel() == 0:
        raise ValueError("a metric needs at least one answer token id")
    if t.is_floating_point() or t.is_complex():  # a cast would truncate 2.5 to token 2
        raise ValueError(f"answer token ids must be integers, got {t.tolist()}")
    return t.long()


class Metric:
    """A score of the last prompt position: `metric(logits, samples)` takes `logits` `[rows, vocab]` and
    `samples` (the sample index of each row, or one int) and returns `[rows]` floats (see the module).
    A subclass sets `name` and `__call__`; the answer ids it holds as tensors are checked by `check`
    and saved by `settings`.

        class TopLogit(Metric):  # any metric: [rows, vocab] last-position logits -> [rows]
            def __call__(self, logits, samples=None):
                return logits.float().amax(-1)
        activation_patching(model, clean, corrupted, TopLogit(), layers=[1], progress=False).df
    """

    name = "metric"

    def __call__(self, logits: Tensor, samples: Tensor | Sequence[int] | int | None = None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _pick(ids: Tensor, samples, rows: int, device) -> Tensor:
        if isinstance(ids, Words):
            raise ValueError(f"answers given as words {list(ids)} become token ids in their prompts' context: call "
                             "metric.check(model, n_samples, inputs) first (every experiment does), or pass token ids")
        if samples is None:
            if len(ids) == 1:
                return ids.to(device).expand(rows)
            if len(ids) != rows:
                raise ValueError(
                    f"the metric holds {len(ids)} answers but the logits have {rows} rows; pass samples= (the sample "
                    "index of each row, or one int for every row)"
                )
            return ids.to(device)
        s = torch.as_tensor(samples, dtype=torch.long, device=device).flatten()
        s = s.expand(rows) if s.numel() == 1 else s
        if len(ids) == 1:
            return ids.to(device).expand(rows)
        if int(s.max()) >= len(ids):
            raise IndexError(f"sample {int(s.max())} has no answer: the metric holds {len(ids)} answers")
        return ids.to(device)[s]

    def check(self, model, n_samples: int, inputs: dict | None = None) -> "Metric":
        """Raise, before any forward, unless every id list holds one id per sample (or one for all)
        and every id is in the model's vocabulary. Answers given as words become ids here, each read in
        the context of its prompt in `inputs` (`model.answer_tokens`), or after a generation prompt."""
        for field, words in [(k, v) for k, v in vars(self).items() if isinstance(v, Words)]:
            if len(words) not in (1, n_samples):
                raise ValueError(f"{len(words)} {field.removesuffix('_ids')} words for {n_samples} sample"
                                 f"{'s' * (n_samples != 1)}: pass one per sample (or one for all)")
            ctx = inputs if inputs is not None and "input_ids" in inputs else None
            setattr(self, field, model.answer_tokens(list(words), ctx))
        for field, ids in self._id_lists().items():
            what = f"{field.removesuffix('_ids')} token"  # "answer token", "correct token", "wrong token"
            if len(ids) not in (1, n_samples):
                raise ValueError(f"{len(ids)} {what} ids for {n_samples} sample{'s' * (n_samples != 1)}: "
                                 "pass one id per sample (or one for all)")
            checks.token_ids(model, ids.tolist(), f"{what} id(s)")
        return self

    def _id_lists(self) -> dict[str, Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}

    def resolved(self, model, n_samples: int, inputs: dict | None = None) -> "Metric":
        """`check`, returning the metric (for `metric = AnswerProb(answers).resolved(model, n, inputs)`)."""
        return self.check(model, n_samples, inputs)

    def settings(self) -> dict:
        return {"metric": self.name, **{k: v.tolist() if isinstance(v, Tensor) else v for k, v in vars(self).items()}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.settings().items() if k != 'metric')})"


class AnswerProb(Metric):
    """Softmax probability of the answer token (e.g. the first token of the correct answer).

        metric = AnswerProb([answer])
        logits = model(**inputs)[:, -1]
        metric(logits), metric.correct(logits)  # p(answer) and whether it is the top token, per row
    """

    name = "prob"

    def __init__(self, answer):
        self.answer = _ids(answer)

    def __call__(self, logits, samples=None):
        a = self._pick(self.answer, samples, logits.shape[0], logits.device)
        return logits.float().softmax(-1).gather(-1, a[:, None])[:, 0]

    def correct(self, logits, samples=None) -> Tensor:
        """bool `[rows]`: the answer token is the argmax."""
        return logits.argmax(-1) == self._pick(self.answer, samples, logits.shape[0], logits.device)


class AnswerLogProb(AnswerProb):
    """Log-softmax probability of the answer token (natural log, `<= 0`): `AnswerProb` on a scale that
    keeps small probabilities apart.

        metric = AnswerLogProb([answer])
        metric(model(**inputs)[:, -1])  # [rows] log p(answer)
    """

    name = "logprob"

    def __call__(self, logits, samples=None):
        a = self._pick(self.answer, samples, logits.shape[0], logits.device)
        return logits.float().log_softmax(-1).gather(-1, a[:, None])[:, 0]


class LogitDiff(Metric):
    """`logit[correct] - logit[wrong]` (the clean answer against the corrupted one).

        metric = LogitDiff(correct=[answer], wrong=model.tokenizer.convert_tokens_to_ids(["la"]))
        metric(model(**inputs)[:, -1])
    """

    name = "logit_diff"

    def __init__(self, correct, wrong):
        self.correct_ids, self.wrong_ids = _ids(correct), _ids(wrong)

    def check(self, model, n_samples: int, inputs: dict | None = None) -> "LogitDiff":
        """As `Metric.check`; a sample whose correct and wrong answers are the same token is refused (its
        difference would be 0 whatever the model does)."""
        super().check(model, n_samples, inputs)
        c, w = self.correct_ids.expand(n_samples) if len(self.correct_ids) == 1 else self.correct_ids, \
            self.wrong_ids.expand(n_samples) if len(self.wrong_ids) == 1 else self.wrong_ids
        same = (c == w).nonzero()[:, 0].tolist()
        if same:
            raise ValueError(f"sample(s) {same}: the correct and wrong answers are the same token ({int(c[same[0]])}); "
                             "a logit difference needs two tokens (words that start differently, or token ids)")
        return self

    def __call__(self, logits, samples=None):
        n, d = logits.shape[0], logits.device
        c, w = self._pick(self.correct_ids, samples, n, d), self._pick(self.wrong_ids, samples, n, d)
        lf = logits.float()
        return lf.gather(-1, c[:, None])[:, 0] - lf.gather(-1, w[:, None])[:, 0]


def normalised(patched: Tensor, clean, corrupt, eps: float = 1e-12) -> Tensor:
    """`(m_patched - m_corrupt) / (m_clean - m_corrupt)`: 0 = as corrupted, 1 = as clean. Raises when
    clean and corrupted give the same metric (the corruption did nothing to normalise against).

        normalised(torch.tensor([0.1, 0.5, 0.9]), clean=0.9, corrupt=0.1)  # tensor([0.0, 0.5, 1.0])
    """
    clean, corrupt = torch.as_tensor(clean, dtype=torch.float), torch.as_tensor(corrupt, dtype=torch.float)
    gap = clean - corrupt
    if bool((gap.abs() < eps).any()):
        raise ValueError(f"clean and corrupted metrics are equal ({float(clean.flatten()[0]):.6g}); the corruption does not change the metric, so nothing can be normalised")
    return (patched.float() - corrupt) / gap


def relative_change(new: Tensor, orig) -> Tensor:
    """`(new - orig) / orig * 100`, percent.

        relative_change(torch.tensor([0.45, 0.9]), 0.9)  # tensor([-50., 0.]), percent
    """
    orig = torch.as_tensor(orig, dtype=torch.float)
    return (new.float() - orig) / orig * 100
