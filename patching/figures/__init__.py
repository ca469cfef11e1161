"""Pictures of results: `Result.plot` draws each experiment kind as its registry record says
(`patching.engine.experiment.Plot`); importing this package registers that drawer, which `import
patching` does."""

from patching.engine.experiment import register_drawer
from patching.figures.plots import plot

register_drawer(plot)
