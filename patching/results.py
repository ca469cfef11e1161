"""`Result`: what an experiment returns. Data first (`.df`, a tidy DataFrame), pictures second
(`.plot()`), settings (interventions, metric, window, ...) saved beside the data (`.save(path)`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Result:
    """`kind` names the experiment (and the plot); `settings` is JSON-able."""

    kind: str
    df: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Result({self.kind}, {len(self.df)} rows, columns {list(self.df.columns)})"

    # ---- summaries --------------------------------------------------------------------------
    def mean(self, by: list[str] | None = None, value: str | None = None, correct_only: bool | None = None) -> pd.DataFrame:
        """Mean of `value` grouped by `by` (defaults per kind), over correctly answered samples when
        `correct_only` (default: for knockout and causal tracing, the papers' convention; discarding
        keeps every sample, its `correct` is the accuracy). With `correct_only` and no correct sample it
        raises rather than average the wrong answers: pass `correct_only=False` to ask for that."""
        if correct_only is None:
            correct_only = self.kind in ("knockout", "causal_tracing")
        by = by or _DEFAULT_BY.get(self.kind, ["layer"])
        value = value or _DEFAULT_VALUE.get(self.kind, "value")
        df = self.df
        if correct_only:
            if "correct" not in df.columns:
                raise ValueError(f"correct_only=True but this {self.kind} frame has no 'correct' column; pass correct_only=False")
            if not bool(df["correct"].any()):
                raise ValueError(
                    f"no sample is answered correctly in this {self.kind} result, so a mean over correct samples "
                    "is undefined; check the answers, or pass correct_only=False to average every sample"
                )
            df = df[df["correct"]]
        return df.groupby(by, sort=False)[value].mean().reset_index()

    # ---- pictures ---------------------------------------------------------------------------
    def plot(self, ax=None, correct_only: bool | None = None, **kwargs):
        """Matplotlib: lines against layer, one per series (edge, group, site...), or a layer x position
        heatmap for per-position patching; `correct_only` as in `mean`. Returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=kwargs.pop("figsize", (7, 4)))
        value = _DEFAULT_VALUE.get(self.kind, "value")
        if self.kind == "sinks":  # one point per sink: position against MDS, by modality
            for (m, cross), part in self.df.groupby(["modality", "cross_modal"]):
                ax.scatter(part["pos"], part["mds"], s=14, label=f"{m} {'cross-modal' if cross else 'unimodal'}")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(xlabel="position", ylabel="MDS (video - audio) / (video + audio)", title="sinks")
            ax.legend(fontsize="small")
            return ax
        if self.kind in ("activation_patching", "attribution") and "pos" in self.df.columns and self.df["pos"].nunique() > 1:
            site = self.df["site"].iloc[0]
            grid = self.df[self.df["site"] == site].pivot_table(index="layer", columns="pos", values=value)
            im = ax.imshow(grid.values, aspect="auto", origin="lower", cmap="RdBu_r", **kwargs)
            ax.figure.colorbar(im, ax=ax, label=value)
            ax.set(xlabel="position", ylabel="layer", title=f"{self.kind}: {site}")
            return ax
        x = "from_layer" if self.kind == "discarding" else "layer"
        series = _SERIES.get(self.kind)
        m = self.mean(by=[series, x] if series else [x], value=value, correct_only=correct_only)
        for name, part in (m.groupby(series, sort=False) if series else [(None, m)]):
            ax.plot(part[x], part[value], marker="o", ms=3, label=name, **kwargs)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel=x.replace("_", " "), ylabel=_YLABEL.get(self.kind, value), title=self.kind.replace("_", " "))
        if series:
            ax.legend(fontsize="small")
        return ax

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


_DEFAULT_BY = {
    "knockout": ["edge", "layer"], "causal_tracing": ["site", "tokens", "layer"],
    "logit_lens": ["group", "layer"], "discarding": ["from_layer"],
    "activation_patching": ["site", "layer", "pos"], "attribution": ["site", "layer", "pos"],
    "sinks": ["modality", "cross_modal"], "pathway": ["run"], "fastv": ["method"], "dla": ["layer", "head", "group"],
    "knockout_accuracy": ["edge", "layer"],
}
_DEFAULT_VALUE = {
    "knockout": "rel_change", "causal_tracing": "indirect_effect", "logit_lens": "prob", "discarding": "metric",
    "activation_patching": "normalised", "attribution": "attribution", "sinks": "mds",
    "pathway": "correct", "fastv": "correct", "dla": "dla", "knockout_accuracy": "accuracy",
}
_SERIES = {"knockout": "edge", "causal_tracing": "site", "logit_lens": "group", "activation_patching": "site", "attribution": "site"}
_YLABEL = {
    "knockout": "relative change of p(answer) (%)", "causal_tracing": "indirect effect",
    "logit_lens": "p(answer)", "discarding": "answer metric", "activation_patching": "normalised metric",
}
