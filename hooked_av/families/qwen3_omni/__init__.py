"""Qwen3-Omni (the Thinker of `Qwen/Qwen3-Omni-30B-A3B-*`, transformers `qwen3_omni_moe`): `layout.py`
(token arithmetic), `positions.py` (position ids, as HF's `get_rope_index`)."""
