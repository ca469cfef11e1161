"""Bridges from hooked_av models to other interpretability toolkits. Each submodule imports its
toolkit only when used, so `import hooked_av` works without any of them installed."""
