"""Qwen3-Omni (the Thinker of `Qwen/Qwen3-Omni-30B-A3B-*`, transformers `qwen3_omni_moe`): `model.py` (the
hooked model), `weights.py` (checkpoint keys and config), `layout.py` (token arithmetic), `positions.py`
(position ids, as HF's `get_rope_index`), `processor.py` (processor components, media constants),
`prompt.py` (media and a question -> the processor's inputs), `token_map.py` (the TokenMap)."""

from hooked_av.families.qwen3_omni.model import HookedQwen3Omni

NAME = "Qwen3-Omni"
RECOGNISED_BY = "model_type 'qwen3_omni_moe' or 'qwen3_omni_moe_thinker'"
MODEL = HookedQwen3Omni


def matches(config: dict) -> bool:
    """Whether config.json's dict is this family's (the whole Qwen3-Omni config or a bare Thinker's)."""
    return str(config.get("model_type", "")).startswith("qwen3_omni_moe")
