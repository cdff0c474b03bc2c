"""Re-executes notebooks/mnist_jax.ipynb in place, so its committed outputs are what its code does on real data.

    python notebooks/refresh.py --data-dir ~/tensorflow_datasets

Every cell runs in a fresh kernel, with this repository's `mnist_jax` first on its path, in a fresh working folder
(the notebook's run trains from scratch in its `runs/notebook/`, removed afterwards). Then the metadata that changes
with every execution is dropped (cell timings, the kernel's version details) and the sha256 of the code cells is
recorded in the notebook's metadata (`mnist_jax.code_sha256`): tests/test_notebook.py fails when a code cell was
changed without a refresh. Execution needs the `[dev]` extra (nbclient, ipykernel). A cell that fails leaves the
notebook as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "mnist_jax.ipynb"
METADATA_KEY = "mnist_jax"


def code_sha256(notebook: nbformat.NotebookNode) -> str:
    """The sha256 of the JSON list of the code cells' sources: what the committed outputs were produced by."""
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def strip_volatile(notebook: nbformat.NotebookNode) -> None:
    """Drops what differs between two executions of the same code but is no output: timings and versions."""
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    notebook.metadata["language_info"] = {"name": notebook.metadata.get("language_info", {}).get("name", "python")}
    notebook.metadata.pop("widgets", None)


def refresh(path: Path, data_dir: str | None, timeout: int) -> None:
    notebook = nbformat.read(path, as_version=4)
    environment = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if data_dir:
        environment["MNIST_JAX_DATA_DIR"] = os.path.abspath(os.path.expanduser(data_dir))
    os.environ.update(environment)  # the kernel inherits this process's environment
    for name in ("MNIST_JAX_DATASET", "MNIST_JAX_EPOCHS", "MNIST_JAX_WORKDIR"):  # the defaults: the real recipe
        os.environ.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="mnist_jax-notebook-") as folder:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": folder}})
        client.execute()
    strip_volatile(notebook)
    notebook.metadata[METADATA_KEY] = {"code_sha256": code_sha256(notebook)}
    nbformat.validate(notebook)
    nbformat.write(notebook, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python notebooks/refresh.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR"),
                        help="tfds data directory holding MNIST (default: $TFDS_DATA_DIR, else tfds's default)")
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK, help=f"default: {NOTEBOOK.relative_to(REPO)}")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run (default: 3600)")
    args = parser.parse_args(argv)
    try:
        refresh(args.notebook, args.data_dir, args.timeout)
    except CellExecutionError as error:
        print(f"error: a cell failed, {args.notebook} is unchanged:\n{error}", file=sys.stderr)
        return 1
    print(f"refreshed {args.notebook} (code sha256 {code_sha256(nbformat.read(args.notebook, as_version=4))[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
