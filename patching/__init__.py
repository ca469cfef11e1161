"""The patching library: composable interventions and the information-flow experiments of the field,
built on hook names, the TokenMap and public model methods only, so every hooked_av model family runs
them. hooked_av never imports this package.

Layers (each a folder; lower ones never import higher ones, docs/architecture.md):
`engine/` (interventions, hooks, the sweep, metrics, results, checks, statistics, the experiment
registry), `datasets/` (manifests, templates, scoring), `methods/` (one experiment per file, each with
its registry record), `figures/` (how results are drawn), `apps/` (the CLI, the demo, flow, studies).

    from patching import block_attention, knockout, run_rows, samples
    res = knockout(model, inputs, answers=[answer_id])
    res.plot()
"""

from patching import figures as _figures  # registers how Result.plot draws  # noqa: F401
from patching import methods as _methods  # registers every experiment record  # noqa: F401
from patching.datasets.coco_objects import CocoObjects
from patching.datasets.manifest import ManifestError, read_manifest
from patching.engine.experiment import Experiment, Plot, Report, StudySample, register
from patching.engine.features import (
    ablate_features,
    patch_features,
    scale_features,
    steer_features,
)
from patching.engine.hooks import (
    ablate,
    add_noise,
    block_attention,
    discard,
    pai_steer,
    patch_from_cache,
    scale_attention,
    steer,
)
from patching.engine.intervention import Intervention
from patching.engine.metrics import (
    AnswerLogProb,
    AnswerProb,
    LogitDiff,
    Metric,
    normalised,
    relative_change,
)
from patching.engine.results import Result
from patching.engine.sweep import Sample, plan_sweep, run_rows, samples
from patching.methods.activation_patching import activation_patching
from patching.methods.attribution import attribution_patching
from patching.methods.causal_tracing import causal_tracing
from patching.methods.discarding import discarding, physical_forward
from patching.methods.dla import dla
from patching.methods.dominance import dominance
from patching.methods.experts import ablate_experts
from patching.methods.fastv import fastv
from patching.methods.guidance import AdaptiveScale, guided_generate
from patching.methods.hallucination import hallucination
from patching.methods.knockout import default_edges, knockout, knockout_accuracy
from patching.methods.logit_lens import logit_lens
from patching.methods.pathway import pathway
from patching.methods.sae_eval import (
    loss_recovered,
    reconstruction_stats,
    summarise_loss_recovered,
)
from patching.methods.sae_features import sae_features
from patching.methods.sinks import find_sinks, sink_dimensions
from patching.methods.var import var

__all__ = [
    # experiments (one file each in patching/methods)
    "activation_patching", "attribution_patching", "causal_tracing", "default_edges", "discarding", "dla", "dominance",
    "fastv", "find_sinks", "guided_generate", "hallucination", "knockout", "knockout_accuracy", "logit_lens", "pathway",
    "physical_forward", "sink_dimensions",
    # interventions (composable: `a + b`, printable, saved with results)
    "AdaptiveScale", "Intervention", "ablate", "ablate_experts", "add_noise", "block_attention", "discard",
    "pai_steer", "patch_from_cache", "scale_attention", "steer", "var",
    # sparse autoencoders: feature edits and experiments on an SAELens SAE spliced by model.add_sae (docs/features.md)
    "ablate_features", "loss_recovered", "patch_features", "reconstruction_stats", "sae_features", "scale_features",
    "steer_features", "summarise_loss_recovered",
    # the engine, for writing an experiment
    "AnswerLogProb", "AnswerProb", "Experiment", "LogitDiff", "Metric", "Plot", "Report", "Sample", "StudySample",
    "normalised", "plan_sweep", "register", "relative_change", "run_rows", "samples",
    # results and studies
    "CocoObjects", "ManifestError", "Result", "Study", "plan_study", "read_manifest", "run_study", "write_report",
    # features: activations harvested over a dataset, an SAE's features over them and their page
    "feature_page", "feature_stats", "harvest",
]


def __getattr__(name):  # the study app loads matplotlib's file backend: only when asked for
    if name == "harvest":
        from patching.apps.harvest import harvest

        return harvest
    if name == "feature_stats":
        from patching.datasets.feature_stats import feature_stats

        return feature_stats
    if name == "feature_page":
        from patching.apps.features_page import feature_page

        return feature_page
    if name in ("run_study", "Study", "write_report", "plan_study"):
        from patching.apps.study import Study, run_study
        from patching.apps.study.plan import plan_study
        from patching.apps.study.report import write_report

        return {"run_study": run_study, "Study": Study, "write_report": write_report, "plan_study": plan_study}[name]
    raise AttributeError(f"module 'patching' has no attribute {name!r}")
