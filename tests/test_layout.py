"""The package's shape: no module imports one that imports it back, and its comments say why without carrying
measurements (timings, speed-ups and CPU models go stale in code; they live in docs/performance.md)."""

import ast
import io
import re
import tokenize
from pathlib import Path

from helpers import REPO, module_name, package_modules, reachable

PACKAGE = REPO / "mnist_jax"
MEASUREMENT = re.compile(
    r"\d[\d,.]*\s*(ms|s|sec|seconds?|minutes?|hours?|GFLOP/s|img/s|images/s|req/s|requests/s)(?![\w/])"  # timings
    r"|[+-]\d[\d,.]*\s*%|\d[\d,.]*\s*%\s+(faster|slower|more|fewer|less)\b|\d[\d.]*x\b"  # speed-ups
    r"|\b(Zen ?\d|Xeon|EPYC|Ryzen|Core i\d|Emerald Rapids|Sapphire Rapids|Skylake|Ice Lake)\b",  # CPU models
    re.IGNORECASE)

MODULES = package_modules()


def imports_of(path: Path) -> set[str]:
    """The package modules a module imports, at any depth (inside functions too): `from mnist_jax.export import
    runtimes` names the module mnist_jax.export.runtimes, `from mnist_jax.config import Config` mnist_jax.config."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mnist_jax":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "mnist_jax"}
    return found - {module_name(path)}


def test_no_module_imports_a_module_that_imports_it_back():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    assert graph["mnist_jax.training"] >= {"mnist_jax.steps", "mnist_jax.backend", "mnist_jax.checkpoint"}
    assert "mnist_jax.export.runtimes" in graph["mnist_jax.export.pipeline"]  # subpackages are read too
    assert [module for module in sorted(graph) if module in reachable(graph, [module])] == []


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a module."""
    source = path.read_text()
    texts = [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                texts.append((node.body[0].lineno, docstring))
    return texts


def test_the_measurement_pattern_catches_what_it_is_for():
    for text in ("3.5 s instead of 5.7 s cold", "685 of a 1,160 ms step", "+26%", "2.1x the reference",
                 "20% faster", "on Zen 3", "an Intel Xeon", "1,455 images/s"):
        assert MEASUREMENT.search(text), text
    for text in ("2x2 pooling", "a 3x3 conv", "28x28 frame", "a 7% zoom", "`train[:90%]`", "in 0..255"):
        assert not MEASUREMENT.search(text), text


def test_no_comment_or_docstring_carries_a_timing_a_speed_up_or_a_cpu_model():
    found = [f"{path.relative_to(PACKAGE)}:{line}: {match.group(0)!r}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for line, text in comments_and_docstrings(path)
             for match in MEASUREMENT.finditer(text)]
    assert found == []
