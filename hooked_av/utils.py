"""What code written on top of hooked_av models (experiments, analyses, notebooks) may import besides
the models themselves: the public helper surface, stable across releases. `patching` reaches the
model's internals only through these and the model's own methods (tests/test_structure.py checks it).

- hook names: `get_act_name` (TransformerLens's `transformer_lens.utils.get_act_name`, gone from 4.x's top
  level; with the towers' points and the media embeddings), `SITES` (short site names), `position_major`,
  `conditional`, `flag_of` (the TransformerLens flag a point needs), `layer_of`, `hf_stages`
  (`hooked_av.core.hook_names`, the one table);
- the additive attention mask: `neg_inf` (the value a knocked-out edge gets), `additive`, `open_mask`;
- positions and layers as users write them: `positions_or_mask` (int positions or a bool mask, checked),
  `layer_list` (the one layer check);
- devices and dtypes as users write them: `as_device`, `as_dtype`;
- weights of a model a device map placed: `resident` (a context in which a module's offloaded weights
  are loaded), `resident_weight` (a loaded copy of one weight);
- generation: `decoding_from` (inside a hook, while `generate` runs a decoding step: the prompt's length;
  None for a prompt's run).

    from hooked_av.utils import get_act_name, neg_inf
    get_act_name("resid_pre", 3)               # "blocks.3.hook_resid_pre"
    mask.masked_fill_(edge, neg_inf(mask.dtype))
"""

from hooked_av.core.devices import as_device, as_dtype
from hooked_av.core.hook_names import SITES, conditional, flag_of, get_act_name, hf_stages, layer_of, position_major
from hooked_av.core.language_model import decoding_from
from hooked_av.core.masks import additive, neg_inf, open_mask, positions_or_mask
from hooked_av.core.placement import resident, resident_weight
from hooked_av.core.validate import layer_list

__all__ = [
    "SITES", "additive", "as_device", "as_dtype", "conditional", "flag_of", "decoding_from", "get_act_name", "hf_stages", "layer_list", "layer_of", "neg_inf",
    "open_mask", "position_major", "positions_or_mask", "resident", "resident_weight",
]
