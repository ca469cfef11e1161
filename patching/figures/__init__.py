"""Pictures of results: `Result.plot` draws each experiment kind as its registry record says."""
