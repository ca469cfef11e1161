"""Small SAELens SAEs for tests: any registered architecture, random weights at SAELens's own initial scale
with every bias and threshold moved off its initial value (so a wrong bias or threshold shows), seeded.

    sae = random_sae("topk", d_in=128, d_sae=64, hook="blocks.1.hook_resid_post", seed=0, k=4)
"""

from __future__ import annotations

import warnings

import torch
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import SAEMetadata

DEFAULTS = {"topk": {"k": 4}, "abstopk": {"k": 4}, "batchtopk": {"k": 4},
            "matryoshka_batchtopk": {"k": 4, "matryoshka_widths": [16]}}


def random_sae(architecture: str = "standard", d_in: int = 128, d_sae: int = 64, hook: str = "blocks.1.hook_resid_post",
               seed: int = 0, training: bool = False, **cfg):
    """An inference SAE (or SAELens's training class, `training=True`) of `architecture` reading `hook`."""
    cls, cfg_cls = (get_sae_training_class if training else get_sae_class)(architecture)
    kw = dict(DEFAULTS.get(architecture, {}), **cfg)
    if "matryoshka_widths" in kw:
        kw["matryoshka_widths"] = [*kw["matryoshka_widths"], d_sae]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, model_name="test"), **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if "threshold" in name:  # JumpReLU: positive thresholds some pre-activations pass
                p.copy_(p + 0.05 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return sae.eval()
