"""A stand-in family, to show what adding one takes (tests/test_family_template.py): a variant of the
Qwen2.5-Omni Thinker recognised by model_type 'standin_omni', its checkpoints holding the decoder under
`llm.`. Registered by one line in `hooked_av.families.FAMILIES`."""

from standin_family.model import HookedStandInOmni

NAME = "Stand-in Omni"
RECOGNISED_BY = "model_type 'standin_omni'"
MODEL = HookedStandInOmni


def matches(config: dict) -> bool:
    return config.get("model_type") == "standin_omni"
