"""The field's experiments, one file each, built on `patching.engine` and the model's public API."""
