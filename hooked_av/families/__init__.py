"""The model families, one package each. A family package exposes `MODEL` (its hooked class, a
`hooked_av.families.base.HookedAVFamily`), `NAME`, `RECOGNISED_BY` (what in config.json marks it, for
error messages) and `matches(config)` (config.json's dict -> bool); `FAMILIES` is the one list
`hooked_av.load` picks from, so a new family is its folder and one line here (docs/architecture.md,
"What a family provides")."""

from hooked_av.families import qwen2_5_omni, qwen3_omni, video_salmonn2

FAMILIES = (qwen2_5_omni, video_salmonn2, qwen3_omni)
