"""Backends that run the patching library's interventions on models hooked_av does not reimplement.
Each imports its toolkit only when used (`nnsight_hf`: `pip install hooked-av[nnsight]`)."""
