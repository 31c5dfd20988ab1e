"""The tutorial notebooks in examples/, executed in a real Jupyter kernel as a student runs them.

Each notebook runs once in a fresh `python3` kernel (the Python running the tests), in a
temporary folder so the files it writes land there, with the environment a user's Jupyter has
(no MPLBACKEND=Agg from CI). Then the display is checked as a user would see it: a cell that
trains shows its progress as a handful of outputs (updated in place, not a flood of lines), and
a cell that plots shows a PNG, not the text "<Figure size ...>".
"""
import os
import re
import sys
import time
from pathlib import Path

import pytest

import nanofit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = ["01_quickstart.ipynb", "02_course_workflow.ipynb", "03_checkpoints.ipynb"]
CELL_TIMEOUT = 120  # seconds per cell
MAX_FIT_OUTPUTS = 6

FIT_CALL = re.compile(r"\.fit(_one_cycle|_flat_cos)?\(")
PLOT_CALL = re.compile(r"\.(lr_find|plot_loss|plot_sched|plot_stats|color_dim|dead_chart)\("
                       r"|\bshow_images?\(")


def kernel_env() -> dict:
    """The environment of a user's kernel: CI's MPLBACKEND=Agg would change how figures show."""
    return {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}


def execute(nb, cwd: Path):
    """Run every cell of `nb` in a fresh python3 kernel started in `cwd`; raises
    nbclient's CellExecutionError (with the traceback) at the first failing cell."""
    from nbclient import NotebookClient  # test-only dependency: imported when the test runs

    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env())
    return nb


@pytest.fixture(scope="module", params=NOTEBOOKS)
def executed(request, tmp_path_factory):
    """(name, executed notebook, seconds): each notebook runs once for all checks on it."""
    import nbformat

    name = request.param
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    start = time.monotonic()
    execute(nb, tmp_path_factory.mktemp(name.split(".")[0]))
    return name, nb, time.monotonic() - start


def code_cells(nb, pattern):
    return [(i, c) for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and pattern.search(c.source)]


def describe(output) -> str:
    if output.output_type == "stream":
        return f"stream {output.name} {output.text[:40]!r}"
    return f"{output.output_type} {sorted(output.get('data', {}))}"


def test_notebooks_are_stored_without_outputs():
    import nbformat

    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        nb = nbformat.read(EXAMPLES / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i}"


@pytest.mark.slow
def test_a_fresh_kernel_imports_this_nanofit(tmp_path):
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(
        "import os, sys, nanofit\n"
        "print(sys.executable, nanofit.__file__, os.environ.get('MPLBACKEND'))")])
    execute(nb, tmp_path)
    executable, module, backend = nb.cells[0].outputs[0].text.split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(module).resolve() == Path(nanofit.__file__).resolve()
    assert backend == "module://matplotlib_inline.backend_inline"  # a user's kernel, not CI's Agg


@pytest.mark.slow
def test_notebook_runs_without_errors_in_time(executed):
    name, nb, seconds = executed  # an error in any cell fails the fixture, naming the cell
    errors = [(i, o.ename) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors}"
    assert seconds < 60, f"{name} took {seconds:.0f}s; tutorials should run in seconds"


@pytest.mark.slow
def test_training_cells_show_a_handful_of_outputs(executed):
    name, nb, _ = executed
    cells = code_cells(nb, FIT_CALL)
    assert cells, f"{name} has no cell calling fit"
    flooded = {i: (len(c.outputs), [describe(o) for o in c.outputs[:3]])
               for i, c in cells if len(c.outputs) > MAX_FIT_OUTPUTS}
    assert not flooded, (f"{name}: cells calling fit should show progress in place as at most "
                         f"{MAX_FIT_OUTPUTS} outputs; cell index: (outputs, first ones) "
                         f"{flooded}")


@pytest.mark.slow
def test_plotting_cells_show_one_png_and_no_figure_text(executed):
    name, nb, _ = executed
    cells = code_cells(nb, PLOT_CALL)
    if name != "03_checkpoints.ipynb":
        assert cells, f"{name} has no plotting cell"
    problems = {}
    for i, cell in cells:
        pngs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        texts = [o.get("text", "") + o.get("data", {}).get("text/plain", "")
                 for o in cell.outputs if o.output_type != "error"]
        figure_text = [t for t in texts if "<Figure size" in t]
        if len(pngs) != 1 or figure_text:
            problems[i] = (f"{len(pngs)} image/png", figure_text[:2])
    assert not problems, f"{name}: each plotting cell should show its figure once as a PNG: " \
                         f"{problems}"
