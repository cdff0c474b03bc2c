"""The package as its wheel installs it (not editable), run from a folder outside the checkout: every module
imports, the tools train, evaluate, predict, serve the drawing page with its static assets (package data), and
export every format; `web` gets ONNX Runtime Web without the checkout's node_modules, from a registry (a real local
HTTP server serving npm's real tarball) into the per-user cache, and offline says so in one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from helpers import (REPO, SMALL_MODEL_FLAGS, TINY_FLAGS, ServerProcess, StaticServer, cli_env, digit_png,
                     npm_registry, read_jsonl)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout's sources, installed without dependencies into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: pip builds in the source folder, and would leave build/ in the checkout
    shutil.copytree(REPO / "mnist_jax", source / "mnist_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", root / "dist", source],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("mnist_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("mnist_jax/")}
    assert packaged == {path.relative_to(source).as_posix() for path in (source / "mnist_jax").rglob("*")
                        if path.is_file()}  # every module and every static asset, nothing else
    target = root / "site-packages"
    done = subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return target


@pytest.fixture(scope="module")
def outside(installed, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder outside the checkout to run from (holding digit.png), and the environment that puts the installed
    copy first on the path (the test environment's packages provide its dependencies): no node_modules near it,
    no $MNIST_JAX_ONNXRUNTIME_WEB, a per-user cache of its own."""
    folder = tmp_path_factory.mktemp("elsewhere")
    (folder / "digit.png").write_bytes(digit_png(0))
    env = cli_env() | {"PYTHONPATH": str(installed), "XDG_CACHE_HOME": str(folder / "cache")}
    env.pop("MNIST_JAX_ONNXRUNTIME_WEB", None)
    return folder, env


def run(outside, *args: str, timeout: float = 300, **variables: str) -> subprocess.CompletedProcess:
    folder, env = outside
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=folder, env=env | variables)


@pytest.fixture(scope="module")
def workdir(outside, tiny_data_dir) -> Path:
    """A run trained by the installed copy."""
    path = outside[0] / "run"
    result = run(outside, "-m", "mnist_jax.train", "--workdir", path, "--data-dir", tiny_data_dir, *TINY_FLAGS,
                 "--epochs", "1", *SMALL_MODEL_FLAGS)
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(path / "metrics.jsonl")) == 1
    return path


def test_the_installed_copy_runs_and_every_module_imports(installed, outside) -> None:
    result = run(outside, "-c", "import importlib, pkgutil, mnist_jax\n"
                                "print(mnist_jax.__file__)\n"
                                "for module in pkgutil.walk_packages(mnist_jax.__path__, 'mnist_jax.'):\n"
                                "    importlib.import_module(module.name)\n")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == installed / "mnist_jax" / "__init__.py"


def test_train_evaluate_and_predict(workdir, outside, tiny_data_dir) -> None:
    evaluated = run(outside, "-m", "mnist_jax.evaluate", "--workdir", workdir, "--data-dir", tiny_data_dir)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((workdir / "eval" / "test" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(read_jsonl(workdir / "metrics.jsonl")[-1]["test_accuracy"], abs=1e-6)
    predicted = run(outside, "-m", "mnist_jax.predict", "--workdir", workdir, "digit.png", "--json")
    assert predicted.returncode == 0, predicted.stderr
    (result,) = json.loads(predicted.stdout)
    assert result["file"] == "digit.png" and sum(result["probabilities"]) == pytest.approx(1, abs=1e-4)


def test_serve_gives_the_page_and_every_asset_it_links(workdir, installed, outside, tmp_path) -> None:
    server = ServerProcess(workdir, log_dir=tmp_path, env=outside[1], cwd=outside[0])
    try:
        with urllib.request.urlopen(server.url + "/", timeout=30) as response:
            page = response.read().decode()
        assets = re.findall(r'(?:src|href)="/static/([^"]+)"', page)
        assert {"style.css", "drawing.js", "app.js"} <= set(assets), page
        for asset in assets:
            with urllib.request.urlopen(f"{server.url}/static/{asset}", timeout=30) as response:
                assert response.read() == (installed / "mnist_jax" / "serve" / "static" / asset).read_bytes()
    finally:
        assert server.stop() == 0, server.stderr


def test_export_writes_every_format_and_gets_onnx_runtime_web_outside_the_checkout(
        workdir, outside, tiny_data_dir, onnxruntime_web_tarball, tmp_path) -> None:
    from mnist_jax.export import webruntime

    out = outside[0] / "export"
    cache = outside[0] / "cache" / "mnist_jax" / f"{webruntime.PACKAGE}-{webruntime.VERSION}"
    args = ["-m", "mnist_jax.export", "--workdir", workdir, "--data-dir", tiny_data_dir, "--out", out]
    offline = run(outside, *args, MNIST_JAX_OFFLINE="1")
    assert offline.returncode == 2
    assert re.fullmatch(r"error: the web format needs ONNX Runtime Web .*: pass --onnxruntime-web DIR, .*; "
                        r"MNIST_JAX_OFFLINE=1 forbids the download\n", offline.stderr), offline.stderr
    assert not out.exists() and not cache.exists()

    registry = npm_registry(tmp_path / "registry", onnxruntime_web_tarball.read_bytes(), webruntime.PACKAGE,
                            webruntime.VERSION)
    with StaticServer(registry) as server:
        exported = run(outside, *args, MNIST_JAX_OFFLINE="0", MNIST_JAX_NPM_REGISTRY=server.url)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines()[0].startswith(f"downloading {webruntime.PACKAGE} {webruntime.VERSION} from "
                                                      f"{server.url}/")
    manifest = json.loads((out / "export.json").read_text())
    assert [entry["format"] for entry in manifest["files"]] == ["tflite", "tflite_fp16", "tflite_int8", "onnx",
                                                                "savedmodel", "web"]
    assert manifest["files"][-1]["browser_runtime"] == f"{webruntime.PACKAGE} {webruntime.VERSION}"
    for name in webruntime.RUNTIME_FILES:
        assert (out / "web" / name).read_bytes() == (cache / "dist" / name).read_bytes()
    assert (out / "web" / "index.html").is_file() and (out / "web" / "drawing.js").is_file()

    predicted = run(outside, "-m", "mnist_jax.predict", "--model", out / "model.tflite", outside[0] / "digit.png")
    assert predicted.returncode == 0 and predicted.stdout.startswith(f"{outside[0] / 'digit.png'}: "), predicted.stderr
