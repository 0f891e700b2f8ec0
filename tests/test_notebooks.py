"""Every notebook in launch/notebooks executes top to bottom on CPU with the tiny presets
(JAXML_NOTEBOOK_TINY=1), so a notebook broken by a code change fails CI."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test extra (nbformat, nbclient)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the test extra (nbformat, nbclient)")
pytest.importorskip("ipykernel", reason="the notebook tests need the test extra (ipykernel)")

from tests.test_engine import REPO  # noqa: E402

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "launch", "notebooks", "*.ipynb")))


def test_the_three_notebooks_exist():
    assert [os.path.basename(p) for p in NOTEBOOKS] == ["generative.ipynb", "quickstart.ipynb", "sequence.ipynb"]


@pytest.mark.slow  # each starts a kernel, trains a tiny model and runs its report (~20-60 s on 2 shared cores)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: 8 fake CPU devices, the session's TFDS dir and compile cache.
    monkeypatch.setenv("JAXML_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAXML_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(path, as_version=4)
    # An exception in any cell raises CellExecutionError naming the cell and the traceback.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    # quickstart: curves, predictions, confusion matrix; sequence: curves; generative: curves, sample grid.
    expected = {"quickstart.ipynb": 3, "sequence.ipynb": 1, "generative.ipynb": 2}[os.path.basename(path)]
    assert len(images) >= expected, f"the notebook drew {len(images)} pictures, expected {expected}"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "JAX " in text and "CPU" in text  # the device cell
    assert "step " in text  # the training cell's summary
