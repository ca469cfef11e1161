"""`Result`: what an experiment returns. Data first (`.df`, a tidy DataFrame), pictures second
(`.plot()`), settings (interventions, metric, window, ...) saved beside the data (`.save(path)`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from patching.engine import experiment


@dataclass
class Result:
    """`kind` names the experiment (and the plot); `settings` is JSON-able.

        res = logit_lens(model, inputs, [answer])
        res.mean()  # p(answer) by group and layer, the record's default
        Result.load(res.save(tmp / "lens.parquet")).df
    """

    kind: str
    df: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Result({self.kind}, {len(self.df)} rows, columns {list(self.df.columns)})"

    # ---- summaries --------------------------------------------------------------------------
    def rows(self, correct_only: bool | None = None) -> pd.DataFrame:
        """The frame, restricted to the correctly answered samples when `correct_only` (default: for
        knockout and causal tracing, the papers' convention; discarding keeps every sample, its
        `correct` is the accuracy). With `correct_only` and no correct sample it raises rather than
        return the wrong answers: pass `correct_only=False` to ask for those."""
        if correct_only is None:
            correct_only = experiment.known(self.kind) and experiment.get(self.kind).correct_only
        df = self.df
        if not correct_only:
            return df
        if "correct" not in df.columns:
            raise ValueError(f"correct_only=True but this {self.kind} frame has no 'correct' column; pass correct_only=False")
        if not bool(df["correct"].any()):
            raise ValueError(
                f"no sample is answered correctly in this {self.kind} result, so a mean over correct samples "
                "is undefined; check the answers, or pass correct_only=False to average every sample"
            )
        return df[df["correct"]]

    def mean(self, by: list[str] | None = None, value: str | None = None, correct_only: bool | None = None) -> pd.DataFrame:
        """Mean of `value` grouped by `by` (defaults: the kind's record, `patching.engine.experiment`)
        over `rows(correct_only)`."""
        record = experiment.get(self.kind) if experiment.known(self.kind) else experiment.Experiment(self.kind)
        by = by or list(record.by)
        value = value or record.value
        return self.rows(correct_only).groupby(by, sort=False)[value].mean().reset_index()

    # ---- pictures ---------------------------------------------------------------------------
    def plot(self, ax=None, correct_only: bool | None = None, **kwargs):
        """The experiment's figure, drawn as its record says (`patching.figures.plots.plot`, registered
        by `patching.figures`): every dimension of interest (edge, token set, group, site, item, method,
        head) its own series or panel, the spread over samples and their count shown, the statistic,
        its interval and test named in the title. Returns the matplotlib `Figure` (`.savefig`); with
        `ax=` (an Axes, or one per panel) it draws there and returns the Figure that holds them."""
        return experiment.draw(self, ax=ax, correct_only=correct_only, **kwargs)

    # ---- files ------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """`.parquet` or `.csv` for the frame (by suffix; parquet by default) and `<stem>.json` for
        kind + settings. Returns the data path."""
        path = Path(path)
        if path.suffix not in (".parquet", ".csv"):
            path = path.with_suffix(".parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".csv":
            self.df.to_csv(path, index=False)
        else:
            self.df.to_parquet(path, index=False)
        path.with_suffix(".json").write_text(json.dumps({"kind": self.kind, "settings": self.settings}, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path) -> "Result":
        path = Path(path)
        df = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(meta["kind"], df, meta["settings"])

