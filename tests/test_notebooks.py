"""The example notebooks execute from top to bottom (on tiny and toy models, offline)."""

import glob
import os

import pytest

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb"))), ids=os.path.basename)
def test_notebook_executes(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    # Run in a scratch folder so nothing the notebook writes lands in the repo.
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_committed_notebooks_have_outputs():
    nbformat = pytest.importorskip("nbformat")
    for path in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert code and all(c.execution_count for c in code), f"{path} was committed unexecuted"
        assert sum(bool(c.outputs) for c in code) >= len(code) - 1, f"{path} was committed without outputs"
