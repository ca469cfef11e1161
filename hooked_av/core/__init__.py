"""Building blocks shared by every model family; nothing here knows a model family."""
