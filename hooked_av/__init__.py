"""hooked_av: hooked, exact reimplementations of audio-visual LLMs for mechanistic interpretability."""

from hooked_av.core.base import HookedAVModel
from hooked_av.families.base import HookedAVFamily
from hooked_av.families.qwen2_5_omni import HookedQwen2_5Omni
from hooked_av.families.qwen3_omni import HookedQwen3Omni
from hooked_av.families.video_salmonn2 import HookedVideoSALMONN2
from hooked_av.registry import load

__all__ = ["HookedAVFamily", "HookedAVModel", "HookedQwen2_5Omni", "HookedQwen3Omni", "HookedVideoSALMONN2", "load"]
__version__ = "0.1.0"
