"""`HookedStandInOmni`: what differs from its nearest sibling, `HookedQwen2_5Omni` (the config's
model_type and the decoder's checkpoint prefix); everything else is the sibling's and the template's."""

from __future__ import annotations

import re

from hooked_av.core import checkpoint
from hooked_av.families.qwen2_5_omni.model import HookedQwen2_5Omni
from hooked_av.families.qwen2_5_omni.weights import convert_key


class HookedStandInOmni(HookedQwen2_5Omni):
    @classmethod
    def read_checkpoint_config(cls, folder):
        from transformers import Qwen2_5OmniThinkerConfig

        config = checkpoint.read_config(folder)
        if config.get("model_type") != "standin_omni":
            raise ValueError(f"{folder / 'config.json'} has model_type {config.get('model_type')!r}; "
                             "a stand-in checkpoint has 'standin_omni'")
        return Qwen2_5OmniThinkerConfig(**{k: v for k, v in config.items() if k != "model_type"})

    def key_converter(self):
        return lambda key, t: convert_key(re.sub(r"^llm\.", "model.", key), t)
