"""The optional extras: what a core-only install imports needs no extra's package, and each tool whose extra is
missing says so in one line naming the pip command (exit code 2). The missing package is simulated honestly:
`sys.modules[name] = None` makes `import name` raise ImportError, as it does where the package is not installed."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from helpers import REPO, digit_png, module_name, package_modules, reachable, run_main_in_process

OPTIONAL_SUBPACKAGES = ("mnist_jax.serve", "mnist_jax.export")  # the tools that need an extra, one folder each
MODULES = package_modules()


def import_time_imports(path: Path) -> set[str]:
    """The modules importing this module imports: every import outside function bodies (class bodies, `if` and
    `try` blocks run at import time), each with its parent packages, which Python imports first."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}: relative import"
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names
                                          if f"{child.module}.{alias.name}" in MODULES]
            for name in names:
                parts = name.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {module_name(path)}


def normal(name: str) -> str:
    """A distribution's name normalised (PEP 503): lower case, each run of '-', '_', '.' one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(requirements) -> set[str]:
    """The distributions these requirements install, with everything they require in turn (without extras of
    their own), as installed here; names normalised (`normal`)."""
    found, stack = set(), [Requirement(r) for r in requirements]
    while stack:
        requirement = stack.pop()
        name = normal(requirement.name)
        if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        found.add(name)
        try:
            stack += [Requirement(r) for r in importlib.metadata.requires(name) or ()]
        except importlib.metadata.PackageNotFoundError:
            pass  # a platform's package not installed here (uvloop on Windows); nothing else can require it here
    return found


def extras_packages() -> dict[str, str]:
    """{top-level import name: extra} of every package an extra of pyproject.toml brings that a core install lacks,
    read from the installed distributions' metadata (the test environment installs every extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = distributions(project["dependencies"])
    modules_of: dict[str, set[str]] = {}
    for module, names in importlib.metadata.packages_distributions().items():
        for name in names:
            modules_of.setdefault(normal(name), set()).add(module)
    packages = {}
    for extra, requirements in project["optional-dependencies"].items():
        own = [r for r in requirements if not r.startswith("mnist_jax[")]
        for distribution in distributions(own) - core:
            for module in modules_of.get(distribution, ()):
                packages.setdefault(module, extra)  # the first extra that brings it (serve's h11, not dev's)
    return packages


def test_no_module_a_core_install_imports_needs_an_extra() -> None:
    """Every module outside the optional subpackages, and those subpackages' __init__ and __main__ (the commands,
    which give the hint), import without any extra's package, and so does every package module they import."""
    graph = {name: import_time_imports(path) for name, path in MODULES.items()}
    roots = {name for name in MODULES if not name.startswith(tuple(f"{sub}." for sub in OPTIONAL_SUBPACKAGES))}
    roots |= {f"{sub}.__main__" for sub in OPTIONAL_SUBPACKAGES}
    reached = (roots | reachable(graph, roots)) & MODULES.keys()
    packages = extras_packages()
    assert {"fastapi", "uvicorn", "onnx", "onnxruntime", "ai_edge_litert", "pytest"} <= set(packages)

    def offending(modules):
        return sorted(f"{module} imports {name} (the [{packages[name]}] extra's)" for module in modules
                      for name in graph[module] if name in packages)

    assert offending(reached) == []
    assert "mnist_jax.export.runtimes" in reached  # predict's, at import time: the check follows imports
    # It catches what it is for: the server imports the web framework at the top.
    assert "mnist_jax.serve.app imports fastapi (the [serve] extra's)" in offending(["mnist_jax.serve.app"])


@pytest.mark.parametrize("command, missing", [
    ("serve", "fastapi"), ("serve", "uvicorn"),
    ("export", "onnx"), ("export", "onnxruntime"), ("export", "ai_edge_litert"),
    ("predict --model model.onnx", "onnxruntime"), ("predict --model model.tflite", "ai_edge_litert"),
])
def test_each_command_names_its_extra_when_a_package_of_it_is_missing(command, missing, tmp_path,
                                                                      monkeypatch) -> None:
    from mnist_jax import predict
    from mnist_jax.export import __main__ as export
    from mnist_jax.serve import __main__ as serve

    monkeypatch.setitem(sys.modules, missing, None)
    workdir = tmp_path / "run"  # never read: the hint comes first
    if command == "serve":
        result = run_main_in_process(serve.main, "--workdir", workdir)
        expected = "error: serve needs the [serve] extra: pip install 'mnist_jax[serve]'"
    elif command == "export":
        result = run_main_in_process(export.main, "--workdir", workdir)
        expected = "error: export needs the [export] extra: pip install 'mnist_jax[export]'"
    else:
        model = tmp_path / command.split()[-1]
        model.write_bytes(b"an exported model")
        (tmp_path / "digit.png").write_bytes(digit_png(0))
        result = run_main_in_process(predict.main, "--model", model, tmp_path / "digit.png")
        expected = f"error: running {model} needs the [export] extra: pip install 'mnist_jax[export]'"
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"{expected} (cannot import {missing})\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [] if command in ("serve", "export") else ["digit.png", model.name])
