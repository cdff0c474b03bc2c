"""The optional extras (`pip install 'mnist_jax[serve]'`, `[export]`): the modules each tool needs beyond the core,
and the one-line hint a tool gives when they are missing.

A tool checks its extra when it runs (in its `main`, or where it loads a runtime), never at import time, so every
command module imports in a core-only install and the hint, not a traceback, is what a user sees.
"""

from __future__ import annotations

import importlib
from typing import Sequence

from mnist_jax.config import UserError

# The import names of each extra's packages that the tools use; pyproject.toml's extras list the distributions.
MODULES = {
    "serve": ("fastapi", "uvicorn"),
    "export": ("onnx", "onnxruntime", "ai_edge_litert"),
}


def install_command(extra: str) -> str:
    return f"pip install 'mnist_jax[{extra}]'"


def require(extra: str, needed_by: str, modules: Sequence[str] | None = None) -> None:
    """Raises a UserError naming the pip command unless every module of `extra` (or just `modules`) imports.

    Importing, rather than looking the module up, also catches a package that is installed but broken."""
    for module in MODULES[extra] if modules is None else modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{needed_by} needs the [{extra}] extra: {install_command(extra)} "
                            f"(cannot import {module})") from None
