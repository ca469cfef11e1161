"""Study answer scoring: the first token with and without a leading space, the option
letter, greedy generation cut at a stop token or newline; answers the tokenizer cannot spell are
refused before any sample runs."""

import pytest
import torch
from media_helpers import tiny_tokenizer

from hooked_av import toy
from patching.datasets.manifest import Row
from patching.datasets.scoring import Scorer, _norm

torch.set_num_threads(1)


def _row(answer, options=None, index=None):
    return Row(index=0, id="r", question="q", answer=answer, answer_text=answer if index is None else options[index],
               options=options, answer_index=index)


class FakeModel:
    """A tokenizer and a `generate` that returns fixed ids (what the scorer calls)."""

    def __init__(self, tokenizer, new_ids):
        self.tokenizer, self.new_ids, self.calls = tokenizer, new_ids, []

    def generate(self, **kw):
        self.calls.append(kw)
        return torch.tensor([self.new_ids])


@pytest.fixture(scope="module")
def tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(toy.weights_dir()))  # the toy's tokenizer, no model built


def test_first_token_and_letter_rules_read_the_top_token(tok):
    red, blue = tok.convert_tokens_to_ids(["red", "blue"])
    logits = torch.full((len(tok),), -10.0)
    logits[red], logits[blue] = 3.0, 1.0
    s = Scorer("first_token").score(FakeModel(tok, []), {}, logits, _row("red"))
    p = logits.softmax(-1)
    assert (s.correct, s.answer_token, s.prediction) == (True, red, "red") and s.p_answer == pytest.approx(float(p[red]))
    assert Scorer("first_token").score(FakeModel(tok, []), {}, logits, _row("blue")).correct is False
    # a word-level tokenizer spells " A" as a space token then "A": the space is not the answer's first token
    tiny = tiny_tokenizer()
    a, b = tiny.convert_tokens_to_ids(["A", "B"])
    assert Scorer("letter").targets(tiny, _row("B", ["dog", "cat"], 1)) == [b]
    logits = torch.zeros(len(tiny))
    logits[a] = 5.0
    assert Scorer("letter").score(FakeModel(tiny, []), {}, logits, _row("A", ["dog", "cat"], 0)).correct is True
    assert Scorer("letter").score(FakeModel(tiny, []), {}, logits, _row("B", ["dog", "cat"], 1)).correct is False


def test_generate_compares_the_text_up_to_the_stop_rule(tok):
    ids = tok.convert_tokens_to_ids(["red", "<|im_end|>", "blue"])
    logits = torch.zeros(len(tok))
    enc = {"inputs_embeds": torch.zeros(1, 3, 4), "position_ids": torch.zeros(3, 1, 3, dtype=torch.long)}
    m = FakeModel(tok, ids)
    s = Scorer("generate", max_new_tokens=5).score(m, enc, logits, _row("red"))
    assert s.correct is True and s.prediction == "red" and m.calls[0]["max_new_tokens"] == 5
    assert _norm(" Red. ") == _norm("red") and _norm("a  dog") == "a dog"  # case, final full stop, spaces
    assert Scorer("generate").score(FakeModel(tok, ids[::-1]), enc, logits, _row("red")).correct is False  # "blue" first


def test_rows_that_cannot_be_scored_are_refused_together(tok):
    with pytest.raises(ValueError, match=r"2 sample\(s\) cannot be scored by the 'first_token' rule: 'x': the answer 'Zebra'.*'y'"):
        Scorer("first_token").check(tok, [Row(0, "x", "q", "Zebra", "Zebra"), Row(1, "y", "q", "Piano", "Piano"), _row("red")])
    with pytest.raises(ValueError, match=r"'r': no options, so no answer letter"):
        Scorer("letter").check(tok, [_row("red")])
    with pytest.raises(ValueError, match=r"unknown scoring rule 'exact'"):
        Scorer("exact")
