"""The notebook: its committed outputs are those of its current code on real MNIST (fast tier, read from the file), and
it runs top to bottom on small data, so it cannot rot (e2e: a Jupyter kernel is a Python subprocess)."""

import copy
import hashlib
import json
import os

import nbformat
import pytest

from helpers import REPO, TINY

NOTEBOOK = REPO / "notebooks" / "mnist_jax.ipynb"
MIN_IMAGES = 8  # examples, class balance, curves, confusion matrix, per class, samples, mistakes, the drawn digit


def outputs(notebook) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def images(notebook) -> list:
    return [output for output in outputs(notebook) if "image/png" in output.get("data", {})]


def text(notebook) -> str:
    return "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs(notebook))


def staleness(notebook) -> list[str]:
    """Why the committed outputs are not those of the current code; empty when they are."""
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    reasons = []
    recorded = notebook.metadata.get("mnist_jax", {}).get("code_sha256")
    current = hashlib.sha256(json.dumps([cell.source for cell in code]).encode()).hexdigest()
    if recorded != current:
        reasons.append(f"the code cells changed since the last refresh (sha256 {current[:12]}, recorded "
                       f"{str(recorded)[:12]})")
    counts = [cell.execution_count for cell in code]
    if counts != list(range(1, len(code) + 1)):
        reasons.append(f"execution counts {counts} are not 1..{len(code)} in order")
    if [output for output in outputs(notebook) if output.output_type == "error"]:
        reasons.append("an error output")
    if len(images(notebook)) < MIN_IMAGES:
        reasons.append(f"{len(images(notebook))} image outputs, fewer than {MIN_IMAGES}")
    return reasons


def test_the_committed_outputs_are_fresh():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert staleness(notebook) == [], "run `python notebooks/refresh.py --data-dir DIR` (a tfds dir holding MNIST)"
    printed = text(notebook)
    assert "mnist: train (60000, 28, 28, 1), test (10000, 28, 28, 1)" in printed  # a real MNIST run
    assert "epoch 3/3" in printed and "weighted avg" in printed and "ONNX Runtime: " in printed
    assert "execution" not in json.dumps([cell.metadata for cell in notebook.cells])  # no timings


def test_a_changed_code_cell_or_a_failed_run_is_stale():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    edited = copy.deepcopy(notebook)
    next(cell for cell in edited.cells if cell.cell_type == "code").source += "\nprint('new')"
    assert "the code cells changed" in staleness(edited)[0]
    rerun = copy.deepcopy(notebook)
    code = [cell for cell in rerun.cells if cell.cell_type == "code"]
    code[1].execution_count, code[1].outputs = 7, [nbformat.v4.new_output("error", ename="E", evalue="", traceback=[])]
    reasons = staleness(rerun)
    assert reasons[0].startswith("execution counts [1, 7, 3") and "an error output" in reasons


@pytest.mark.e2e
def test_notebook_executes_on_tiny_data(tiny_data_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MNIST_JAX_DATASET", TINY)
    monkeypatch.setenv("MNIST_JAX_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("MNIST_JAX_EPOCHS", "1")
    monkeypatch.setenv("MNIST_JAX_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [output for output in outputs(notebook) if output.output_type == "error"]
    assert len(images(notebook)) >= MIN_IMAGES
    printed = text(notebook)
    assert "parameters: 824458" in printed and "weighted avg" in printed and "top 3:" in printed
    assert "same class as JAX: True" in printed
    assert (tmp_path / "run" / "eval" / "test" / "report.json").exists()
    assert (tmp_path / "run" / "export" / "model.onnx").exists()
