"""Studies: from a dataset manifest to the papers' figures. A manifest of samples (`manifest`), prompt
templates (`templates`), answer scoring (`scoring`), a resumable, data-parallel runner streaming
results to parquet (`runner`), statistics (`stats`), figures (`figures`) and the HTML report (`report`).

    from patching.apps.study import run_study, Study
    run_study("toy", "data/manifest.jsonl", ["knockout", "discarding"], "runs/study")
    Study("runs/study").summary()
"""

from patching.datasets.manifest import ManifestError, read_manifest

__all__ = ["ManifestError", "Study", "read_manifest", "run_study"]


def __getattr__(name):  # the runner and statistics import torch / matplotlib: only when asked for
    if name == "run_study":
        from patching.apps.study.runner import run_study

        return run_study
    if name == "Study":
        from patching.apps.study.stats import Study

        return Study
    raise AttributeError(name)
