"""The patching library: composable interventions (`hooks`) and the information-flow experiments
(knockout, activation patching, causal tracing, attribution patching, discarding, logit lens), built on
hook names, the TokenMap and public model methods only, so every hooked_av model family runs them.
hooked_av never imports this package."""

from patching.activation_patching import activation_patching
from patching.attribution import attribution_patching
from patching.causal_tracing import causal_tracing
from patching.discarding import discarding, physical_forward
from patching.hooks import ablate, add_noise, block_attention, discard, patch_from_cache, scale_attention, steer
from patching.intervention import Intervention
from patching.dla import dla
from patching.dominance import dominance
from patching.experts import ablate_experts
from patching.fastv import fastv
from patching.guidance import AdaptiveScale, guided_generate
from patching.hallucination import hallucination
from patching.knockout import default_edges, knockout, knockout_accuracy, styled_window, window_layers
from patching.logit_lens import logit_lens
from patching.metrics import AnswerLogProb, AnswerProb, LogitDiff, normalised, relative_change
from patching.pathway import pathway
from patching.results import Result
from patching.sinks import find_sinks, sink_dimensions
from patching.var import var

__all__ = [
    "Intervention", "Result", "ablate", "activation_patching", "add_noise", "attribution_patching", "block_attention",
    "causal_tracing", "default_edges", "discard", "discarding", "knockout", "logit_lens", "patch_from_cache",
    "physical_forward", "scale_attention", "steer", "window_layers", "AnswerProb", "AnswerLogProb", "LogitDiff",
    "normalised", "relative_change", "AdaptiveScale", "ablate_experts", "dla", "dominance", "fastv", "find_sinks",
    "guided_generate", "hallucination", "knockout_accuracy", "pathway", "sink_dimensions", "styled_window", "var",
]
