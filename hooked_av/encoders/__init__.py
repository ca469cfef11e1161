"""Audio and vision towers."""
