"""The model families, one package each. A family package exposes `MODEL` (its `HookedAVModel`
class), `NAME`, `RECOGNISED_BY` (what in config.json marks it, for error messages) and
`matches(config)` (config.json's dict -> bool); `FAMILIES` is the one list `hooked_av.load` picks
from (docs/architecture.md says how to add one)."""

from hooked_av.families import qwen2_5_omni, qwen3_omni, video_salmonn2

FAMILIES = (qwen2_5_omni, video_salmonn2, qwen3_omni)
