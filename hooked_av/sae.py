"""SAEs on hooked_av models, in SAELens's format and with SAELens's hook names (`pip install 'hooked-av[sae]'`).

Every model splices SAEs as SAELens's `HookedSAETransformer` does: `model.add_sae(sae, hook_name=None,
use_error_term=None)`, `model.reset_saes()`, `with model.saes(sae): ...`, `model.acts_to_saes`,
`model.run_with_saes`, `model.run_with_cache_with_saes`; the points `{hook}.hook_sae_*` (`SAE_POINTS`) are
cached and hooked like any other (`hooked_av.core.sae` says what each holds). `load_sae(folder)` reads an
SAE saved by SAELens or by `hooked-av sae train`.

    from hooked_av.sae import load_sae
    sae = load_sae("runs/sae")
    with model.saes(sae, use_error_term=True):
        _, cache = model.run_with_cache(**inputs)     # cache[f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"]
"""

from hooked_av.core.hook_names import SAE_POINTS, sae_site
from hooked_av.core.sae import INSTALL, SAESplice, load_sae, sae_lens

__all__ = ["INSTALL", "SAESplice", "SAE_POINTS", "load_sae", "sae_lens", "sae_site"]
