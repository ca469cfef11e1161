"""Every notebook in notebooks/ runs top to bottom against the embedded toy model, is stored without
outputs, and starts from its one parameter cell.

The notebooks run one after the other in one kernel, each after `%reset -f` (an empty namespace, so a
notebook that forgets an import or leans on an earlier notebook's variables fails): the modules are
imported once (about 8 s of CPU for torch, transformer_lens and hooked_av) instead of six times."""

import os
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAMES = ["01_quickstart", "02_information_flow", "03_patching_and_tracing", "04_sinks_and_steering",
         "05_token_discarding", "06_interleaved_items"]
RESET = "%reset -f\nimport matplotlib.pyplot\nmatplotlib.pyplot.close('all')"


def test_there_are_the_six_notebooks_stored_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == NAMES
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} is stored with outputs"
        first = code[0].source
        assert first.startswith("# Parameters") and 'MODEL = "toy"' in first, f"{path.name} does not start from its parameter cell"
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 3, f"{path.name} has too little text between its cells"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path_factory.mktemp("notebooks")), env={**os.environ, "OMP_NUM_THREADS": "1"})  # one torch thread, as the other tests
    yield km
    km.shutdown_kernel(now=True)


def _run(path: Path, km) -> tuple[nbformat.NotebookNode, float]:
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(RESET))
    t0 = time.perf_counter()
    NotebookClient(nb, km=km, timeout=300, kernel_name="python3").execute()
    seconds = time.perf_counter() - t0
    print(f"{path.name}: {seconds:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    return nb, seconds


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel):
    nb, _ = _run(path, kernel)
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if path.stem != "01_quickstart":
        assert figures >= 1, f"{path.name} draws no figure"
    if path.stem == "01_quickstart":
        text = _text(nb)
        accuracy = float(text.split("accuracy on 8 fresh samples: ")[1].split()[0])
        assert accuracy >= 0.9
        clean, silent = (float(x) for x in text.split("auditory  accuracy: clean ")[1].split("\n")[0].split(", audio silenced "))
        assert clean >= 0.9 and silent <= 0.6  # silencing the audio takes auditory answers towards chance
