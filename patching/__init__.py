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
from patching.knockout import default_edges, knockout, window_layers
from patching.logit_lens import logit_lens
from patching.metrics import AnswerLogProb, AnswerProb, LogitDiff, normalised, relative_change
from patching.results import Result

__all__ = [
    "Intervention", "Result", "ablate", "activation_patching", "add_noise", "attribution_patching", "block_attention",
    "causal_tracing", "default_edges", "discard", "discarding", "knockout", "logit_lens", "patch_from_cache",
    "physical_forward", "scale_attention", "steer", "window_layers", "AnswerProb", "AnswerLogProb", "LogitDiff",
    "normalised", "relative_change",
]
