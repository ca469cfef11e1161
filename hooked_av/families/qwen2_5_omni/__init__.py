"""Qwen2.5-Omni (the Thinker): `model.py` (the hooked model), `weights.py` (checkpoint keys and
config), `layout.py` (token arithmetic), `positions.py` (TMRoPE ids), `prompt.py` + `processor.py`
(media and a question -> inputs, as `Qwen2_5OmniProcessor`), `token_map.py` (the TokenMap)."""

from hooked_av.families.qwen2_5_omni.model import HookedQwen2_5Omni

NAME = "Qwen2.5-Omni"
RECOGNISED_BY = "model_type 'qwen2_5_omni' or 'qwen2_5_omni_thinker'"
MODEL = HookedQwen2_5Omni


def matches(config: dict) -> bool:
    """Whether config.json's dict is this family's (the full Omni config or a bare Thinker's)."""
    return str(config.get("model_type", "")).startswith("qwen2_5_omni")
