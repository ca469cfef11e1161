"""One file per model family: configuration, weight conversion, position ids, merge."""
