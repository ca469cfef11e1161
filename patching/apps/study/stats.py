"""Statistics over a study folder: per cell, over the correctly answered samples (and over all,
labelled), the mean, its 95 % interval and, where the experiment compares an intervention with the
plain run, a paired test with Holm's correction over the cells; sample counts; per model / dataset /
task / kind. The interval and the test follow the experiment's record (`outcome`, `paired`, `unit`),
through `patching.engine.stats`, the one definition the figures and the report use too.

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

from patching.apps.study.runner import read_empty, read_parts
from patching.engine import experiment as registry
from patching.engine.stats import N_BOOT, SEED, adjust, cell_table, numerical_floor

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
                empty = self.empty(experiment)
                why = f"; {len(empty)} sample(s) gave none: {empty.why.iloc[0]} (Study.empty)" if len(empty) else ""
                raise ValueError(f"{self.dir} has no {experiment!r} rows yet (no sample finished, or none gave rows){why}")
            self._frames[experiment] = df.assign(model=self.model)
        return self._frames[experiment]

    def empty(self, experiment: str) -> pd.DataFrame:
        """`id`, `why` of the samples that gave `experiment` no rows (e.g. every token set asked for is
        empty in them), and the rows that say why a sample has no result (sinks: `n_sinks` 0)."""
        out = read_empty(self.dir, experiment)
        df = read_parts(self.dir, experiment)
        if df is not None and "why" in df.columns:
            said = df.loc[df["why"].fillna("") != "", ["id", "why"]].drop_duplicates("id")
            out = pd.concat([out, said], ignore_index=True)
        return out

    def floor(self, experiment: str) -> float:
        """The numerical floor of `experiment`'s value in this study: its record's `unit` at the
        study's dtype (`patching.engine.stats.numerical_floor`), times its `unit_scale` under the
        study's options; 0 for values without a unit."""
        record = registry.get(experiment)
        scale = record.unit_scale(self.settings.get("options", {}).get(experiment, {})) if record.unit_scale else 1.0
        dtype = self.settings.get("dtype", "float32")
        # folders written before the dtype was recorded said "checkpoint": a name loaded with no dtype ran in float32
        return numerical_floor(record.unit, "float32" if dtype == "checkpoint" else dtype, scale)

    def knockout_accuracy(self, sample_mode: str = "correct", by: list[str] | None = None) -> pd.DataFrame:
        """Map the Flow's accuracy under the knockout (`patching.methods.knockout.knockout_accuracy`, percent of
        the samples, with its Wilson 95 % interval and McNemar's test against the plain run) per
        (edge, layer), computed over the samples of each `by` group (default the model / dataset /
        task / kind columns present), with `n_samples`; `p_holm` is Holm's correction over every cell
        of the figure (all groups)."""
        from patching.engine.results import Result
        from patching.methods.knockout import knockout_accuracy

        df = self.frame("knockout")
        by = self.group_columns(df) if by is None else list(by)
        out = []
        for key, part in df.groupby(by, sort=False) if by else [((), df)]:
            key = key if isinstance(key, tuple) else (key,)
            res = knockout_accuracy(Result("knockout", part.assign(sample=pd.factorize(part["id"])[0])), sample_mode)
            out.append(res.df.assign(**dict(zip(by, key)), n_samples=res.settings["n_samples"]))
        out = pd.concat(out, ignore_index=True)
        out["p_holm"] = adjust(out["p_value"])
        return out[[*by, *out.columns.difference(by, sort=False)]]

    def group_columns(self, df: pd.DataFrame) -> list[str]:
        return [c for c in GROUPS if c in df.columns]

    def summary(self, experiment: str | None = None, value: str | None = None, by: list[str] | None = None,
                subsets=SUBSETS, n_boot: int = N_BOOT, seed: int = SEED) -> pd.DataFrame:
        """Per cell (`by`, default the model / dataset / task / kind columns present and the
        experiment's cell columns) and subset ("correct": samples answered correctly; "all"): the
        number of samples, the mean of `value` (default: the record's `summary_value`), its 95 %
        interval (`ci_low`, `ci_high`; `interval` names the method: Wilson for a 0/1 outcome, the
        seeded percentile bootstrap for a continuous one, "none" below `MIN_N` samples), and for the
        record's summary value of an experiment with a `paired` comparison the paired test against
        the plain run (`p_value`, `test`: McNemar for 0/1, the sign test of the per-sample effect
        for continuous ones) with Holm's correction over the cells of each subset (`p_holm`,
        `significant` at `ALPHA`). `note`: "n < 5" (no interval, no test), "no effect" (a mean
        effect within the numerical floor, `floor`). A sample with several rows in a cell (sinks)
        counts once, by its mean. Without `experiment`: every experiment of the study, stacked,
        with `experiment` and `value` columns."""
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
        outcome = record.outcome_of(value, df[value])
        paired = record.paired if value == record.summary_value else None
        if paired is not None and outcome == "binary" and paired[1] not in df.columns:
            paired = None  # a folder written before the plain run's column existed: no test, said in `test`
        floor = self.floor(experiment) if outcome == "continuous" and value == record.summary_value else 0.0
        by = list(by) if by is not None else self.group_columns(df) + [c for c in cells if c in df.columns]
        if experiment == "accuracy":
            subsets = [s for s in subsets if s == "all"]  # accuracy over the correct samples is 1 by definition
        agg = dict(v=(value, "mean"), correct=("sample_correct", "first"))
        if paired is not None and outcome == "binary":
            agg["base"] = (paired[1], "mean")
        per_sample = df.groupby(by + ["id"], sort=False, dropna=False).agg(**agg).reset_index()
        tables = []
        for subset in subsets:  # Holm over the cells of each subset: the cells of one figure
            part = per_sample[per_sample.correct.astype(bool)] if subset == "correct" else per_sample
            # every cell is listed in every subset, n 0 where it has no such sample
            part = per_sample[by].drop_duplicates().merge(part, how="left", on=by) if by else part
            t = cell_table(part, by, outcome, floor, paired is not None, n_boot, seed)
            tables.append(t.assign(subset=subset, floor=floor))
        out = pd.concat(tables, ignore_index=True)
        front = [*by, "subset", "n_samples", "mean", "ci_low", "ci_high", "interval", "p_value", "p_holm", "significant",
                 "test", "floor", "note"]
        return out[front].reset_index(drop=True).assign(experiment=experiment, value=value)
