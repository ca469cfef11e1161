"""The patching library: composable interventions (`hooks`) and the information-flow experiments
(knockout, activation patching, causal tracing, attribution patching, discarding, logit lens), built on
hook names, the TokenMap and public model methods only, so every hooked_av model family runs them.
hooked_av never imports this package."""

from patching.methods.activation_patching import activation_patching
from patching.methods.attribution import attribution_patching
from patching.methods.causal_tracing import causal_tracing
from patching.methods.discarding import discarding, physical_forward
from patching.engine.hooks import ablate, add_noise, block_attention, discard, patch_from_cache, scale_attention, steer
from patching.engine.intervention import Intervention
from patching.methods.dla import dla
from patching.methods.dominance import dominance
from patching.methods.experts import ablate_experts
from patching.methods.fastv import fastv
from patching.methods.guidance import AdaptiveScale, guided_generate
from patching.methods.hallucination import hallucination
from patching.methods.knockout import default_edges, knockout, knockout_accuracy, styled_window, window_layers
from patching.methods.logit_lens import logit_lens
from patching.engine.metrics import AnswerLogProb, AnswerProb, LogitDiff, normalised, relative_change
from patching.methods.pathway import pathway
from patching.engine.results import Result
from patching.methods.sinks import find_sinks, sink_dimensions
from patching.methods.var import var

__all__ = [
    "Intervention", "Result", "ablate", "activation_patching", "add_noise", "attribution_patching", "block_attention",
    "causal_tracing", "default_edges", "discard", "discarding", "knockout", "logit_lens", "patch_from_cache",
    "physical_forward", "scale_attention", "steer", "window_layers", "AnswerProb", "AnswerLogProb", "LogitDiff",
    "normalised", "relative_change", "AdaptiveScale", "ablate_experts", "dla", "dominance", "fastv", "find_sinks",
    "guided_generate", "hallucination", "knockout_accuracy", "pathway", "sink_dimensions", "styled_window", "var",
]
