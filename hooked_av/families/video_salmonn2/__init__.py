"""video-SALMONN 2+: `model.py` (the hooked model), `weights.py` (checkpoint keys and config),
`layout.py` (token arithmetic), `positions.py` (M-RoPE ids, inference and training modes),
`prompt.py` (media and a question -> inputs, as the repository builds them), `token_map.py`."""

from hooked_av.families.video_salmonn2.model import HookedVideoSALMONN2

NAME = "video-SALMONN 2+"
RECOGNISED_BY = "an audio_config with a qformer_config"
MODEL = HookedVideoSALMONN2


def matches(config: dict) -> bool:
    """Whether config.json's dict is this family's: a Qwen2.5-VL config whose audio_config (Whisper)
    holds a qformer_config."""
    return "qformer_config" in (config.get("audio_config") or {})
