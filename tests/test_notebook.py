"""The notebook runs top to bottom on small data, so it cannot rot."""

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO, TINY

pytestmark = pytest.mark.e2e  # the notebook runs in a Jupyter kernel: a Python subprocess


def test_notebook_executes_on_tiny_data(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_JAX_DATASET", TINY)
    monkeypatch.setenv("MNIST_JAX_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("MNIST_JAX_EPOCHS", "1")
    monkeypatch.setenv("MNIST_JAX_WORKDIR", str(tmp_path / "run"))
    notebook = nbformat.read(REPO / "notebooks" / "mnist_jax.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8  # data, curves, 4 evaluation plots, the drawing and its 28x28 version
    text = "".join(o.get("text", "") for o in outputs)
    assert "parameters: 824458" in text and "weighted avg" in text and "top 3:" in text
    assert (tmp_path / "run" / "eval" / "test" / "report.json").exists()
