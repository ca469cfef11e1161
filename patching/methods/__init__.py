"""The field's experiments, one file each, built on `patching.engine` and the model's public API.

Each file holds its function(s) and its `Experiment` record (`patching.engine.experiment`); the list
below registers every record, in the order reports show them. A new experiment is one new file and
one line here.
"""

from patching.engine.experiment import register
from patching.methods import (
    accuracy,
    activation_patching,
    attribution,
    causal_tracing,
    discarding,
    dla,
    dominance,
    fastv,
    hallucination,
    knockout,
    logit_lens,
    pathway,
    sae_eval,
    sae_features,
    sinks,
    var,
)

RECORDS = register(
    accuracy.EXPERIMENT,
    knockout.EXPERIMENT,
    knockout.ACCURACY,
    discarding.EXPERIMENT,
    causal_tracing.EXPERIMENT,
    sinks.EXPERIMENT,
    logit_lens.EXPERIMENT,
    pathway.EXPERIMENT,
    fastv.EXPERIMENT,
    var.EXPERIMENT,
    dla.EXPERIMENT,
    dominance.EXPERIMENT,
    activation_patching.EXPERIMENT,
    attribution.EXPERIMENT,
    hallucination.EXPERIMENT,
    sae_features.EXPERIMENT,
    sae_eval.EXPERIMENT,
)
