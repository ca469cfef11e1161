"""Result.mean() knows the grouping and the value of every experiment kind, so a new experiment's result
is summarised without by=/value= (a kind without defaults would group by a 'layer' column it lacks)."""

import pandas as pd
import pytest

from patching.engine.results import Result

FRAMES = {
    "pathway": (dict(run=["kept", "kept", "random"], correct=[True, False, False]), {"kept": 0.5, "random": 0.0}),
    "fastv": (dict(method=["full", "fastv", "fastv"], correct=[True, True, False]), {"full": 1.0, "fastv": 0.5}),
    "knockout_accuracy": (dict(edge=["a->b"] * 2, layer=[0, 0], accuracy=[50.0, 100.0]), {("a->b", 0): 75.0}),
    "hallucination": (dict(condition=["plain", "plain", "guided"], hallucinated_caption=[1.0, 0.0, 0.0]),
                      {"plain": 0.5, "guided": 0.0}),
    "dla": (dict(layer=[1, 1], head=[0, 0], group=["audio", "audio"], dla=[0.25, 0.75]), {(1, 0, "audio"): 0.5}),
}


@pytest.mark.parametrize("kind", list(FRAMES))
def test_mean_uses_each_kinds_default_grouping_and_value(kind):
    data, expected = FRAMES[kind]
    out = Result(kind, pd.DataFrame(data)).mean()
    keys = [c for c in out.columns if c != out.columns[-1]]
    got = {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r[out.columns[-1]] for _, r in out.iterrows()}
    assert got == expected
