"""Statistics over a study folder: means per cell over the correctly answered samples (and over all,
labelled), seeded bootstrap 95 % intervals over samples, sample counts, per model / dataset / task.

    study = Study("runs/toy")
    study.summary("knockout")       # one row per (model, kind, edge, layer, subset)
    study.frame("discarding")       # the rows as written (merged parts, manifest order)

The papers average knockout curves over the samples a model answers correctly (docs/methods.md §1);
a cell with no correct sample has `n_samples` 0 and NaN mean and interval in the "correct" subset:
it is never filled with the average over all samples (that is the "all" subset, labelled so).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from patching.apps.study.runner import read_parts
from patching.engine import experiment as registry
from patching.engine.stats import N_BOOT, SEED, bootstrap_ci

GROUPS = ("model", "dataset", "task", "kind")  # metadata a summary is split by, when the study has it
SUBSETS = ("correct", "all")


class Study:
    """A study folder written by `run_study` (complete or not: the parts written so far are read).

        out = run_study(model, manifest, ["logit_lens"], tmp / "study", progress=False)
        Study(out).summary("logit_lens")  # mean, bootstrap 95 % interval and n per cell and subset
    """

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        path = self.dir / "settings.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir} is not a study folder (no settings.json); run `hooked-av study ... --out {self.dir}` first")
        self.settings = json.loads(path.read_text())
        self.experiments: list[str] = self.settings["experiments"]
        self.model = self.settings["model"]
        self._frames: dict = {}

    def __repr__(self) -> str:
        return f"Study({str(self.dir)!r}, model {self.model!r}, {self.experiments}, {self.n_done} samples done)"

    @property
    def n_done(self) -> int:
        return len(list((self.dir / "parts" / "accuracy").glob("*.parquet")))

    def frame(self, experiment: str) -> pd.DataFrame:
        """Every row of `experiment`, in manifest order, with a `model` column."""
        if experiment not in self.experiments:
            raise ValueError(f"{self.dir} ran {self.experiments}; it has no {experiment!r} results")
        if experiment not in self._frames:
            df = read_parts(self.dir, experiment)
            if df is None:
                raise ValueError(f"{self.dir} has no {experiment!r} rows yet (no sample finished, or none gave rows)")
            self._frames[experiment] = df.assign(model=self.model)
        return self._frames[experiment]

    def knockout_accuracy(self, sample_mode: str = "correct", by: list[str] | None = None) -> pd.DataFrame:
        """Map the Flow's accuracy under the knockout (`patching.methods.knockout.knockout_accuracy`, percent of
        the samples) per (edge, layer), computed over the samples of each `by` group (default the
        model / dataset / task / kind columns present), with `n_samples`."""
        from patching.engine.results import Result
        from patching.methods.knockout import knockout_accuracy

        df = self.frame("knockout")
        by = self.group_columns(df) if by is None else list(by)
        out = []
        for key, part in df.groupby(by, sort=False) if by else [((), df)]:
            key = key if isinstance(key, tuple) else (key,)
            res = knockout_accuracy(Result("knockout", part.assign(sample=pd.factorize(part["id"])[0])), sample_mode)
            out.append(res.df.assign(**dict(zip(by, key)), n_samples=res.settings["n_samples"]))
        return pd.concat(out, ignore_index=True)[[*by, *out[0].columns.difference(by, sort=False)]]

    def group_columns(self, df: pd.DataFrame) -> list[str]:
        return [c for c in GROUPS if c in df.columns]

    def summary(self, experiment: str | None = None, value: str | None = None, by: list[str] | None = None,
                subsets=SUBSETS, n_boot: int = N_BOOT, seed: int = SEED) -> pd.DataFrame:
        """Per cell (`by`, default the model / dataset / task / kind columns present and the
        experiment's cell columns) and subset ("correct": samples answered correctly; "all"): the
        number of samples, the mean of `value` (default: the record's `summary_value`) and its bootstrap
        95 % interval. A sample with several rows in a cell (sinks) counts once, by its mean.
        Without `experiment`: every experiment of the study, stacked, with `experiment` and `value`
        columns."""
        if experiment is None:
            return pd.concat([self.summary(e, None, None, subsets, n_boot, seed) for e in self.experiments], ignore_index=True)
        df = self.frame(experiment)
        record = registry.get(experiment)
        if record.summary_rows is not None:
            df = record.summary_rows(df)
        cells = list(record.cells)
        value = value or record.summary_value
        if value not in df.columns:
            raise ValueError(f"{experiment} rows have no column {value!r}; choose from {list(df.columns)}")
        by = list(by) if by is not None else self.group_columns(df) + [c for c in cells if c in df.columns]
        if experiment == "accuracy":
            subsets = [s for s in subsets if s == "all"]  # accuracy over the correct samples is 1 by definition
        per_sample = df.groupby(by + ["id"], sort=False, dropna=False).agg(v=(value, "mean"), correct=("sample_correct", "first")).reset_index()
        rows = []
        for key, part in per_sample.groupby(by, sort=False, dropna=False) if by else [((), per_sample)]:
            key = key if isinstance(key, tuple) else (key,)
            for subset in subsets:
                v = (part.v[part.correct] if subset == "correct" else part.v).to_numpy(dtype=float)
                lo, hi = bootstrap_ci(v, n_boot, seed)
                rows.append({**dict(zip(by, key)), "subset": subset, "n_samples": len(v),
                             "mean": float(v.mean()) if len(v) else float("nan"), "ci_low": lo, "ci_high": hi})
        return pd.DataFrame(rows).assign(experiment=experiment, value=value)

