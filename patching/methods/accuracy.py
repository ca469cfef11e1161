"""Accuracy: the share of samples the model answers correctly by the study's scoring rule.

A study scores every sample (`patching.datasets.scoring`) before any experiment runs and writes the
score as the `accuracy` rows (`sample_correct`, the prediction, p(answer)); this record says how that
is summarised and reported.

    from patching.engine.experiment import get
    get("accuracy").value          # "sample_correct"
"""

from __future__ import annotations

from patching.engine.experiment import Experiment, Report

EXPERIMENT = Experiment("accuracy", by=(), value="sample_correct", label="accuracy", outcome="binary",
                        report=Report("Accuracy"), columns=("prediction", "answer_text", "answer_token", "p_answer", "rule", "chance"))
