"""docs/notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

import nbformat
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
    # the kernel starts in tmp_path: the notebook's outputs/ goes there
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    texts = ["".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for o in cell.outputs) for cell in nb.cells if cell.cell_type == "code"]
    assert "bal_acc" in texts[1]  # the run's summary
    assert "'ALF'" in texts[-1] and "linear (last CLS)" in texts[-1]
    assert (tmp_path / "outputs" / "mlflow.db").is_file()
    assert list((tmp_path / "outputs" / "runs").glob("*/probe.pt"))
