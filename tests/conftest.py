"""pytest's hooks and the shared fixtures: a small learnable dataset written in tfds's own format, training runs on
it built once per session, and `way`, which runs a test both ways the tests run the tools: in this process (the fast
tier, `-m "not e2e"`) and as `python -m` subprocesses (e2e). The helpers they use live in helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import (CHROMIUM, CHROMIUM_ARGS, CLASS_NAMES, IN_PROCESS, NAMED, SMALL_MODEL_FLAGS, STRONG_TINY_FLAGS,
                     SUBPROCESS, TINY_FLAGS, TINY_RUN_FLAGS, XLA_CACHE_VARIABLE, Way, built_once, npm_pack, real_data_dir,
                     real_data_missing, refuse_python_subprocesses, shared_path, trained_once, write_tiny_dataset)
from mnist_jax.datacache import CACHE_VARIABLE as DATA_CACHE_VARIABLE


def pytest_configure(config):
    """Caches on disk for the session, made by the controller before it starts the xdist workers (which inherit
    the variables) and removed at its end:

    - One XLA compilation cache for every CLI the session starts, which would otherwise each compile the same init,
      steps and evaluation anew (a tiny `train` run: ~17 s cold, ~9 s warm), and for the test processes themselves,
      for the programs that take 0.1 s or more to compile: a training step or an initialisation compiled in one
      xdist worker (or by one run in process) is loaded by the other and by later runs, which saves the fast tier
      about a fifth of its CPU time. Their eager code's thousands of small programs stay out: writing those costs
      more than it saves. A loaded executable is the one compiled, so results are the same bits.
    - The decoded-split cache (`mnist_jax.datacache`) in a directory of the session's own, so the CLIs skip
      TensorFlow's import and tfds's decoding (~8 s each) once a split has been read. A user's own
      MNIST_JAX_DATA_CACHE (a directory, or `off`) is respected, as JAX_COMPILATION_CACHE_DIR is.
    """
    if not os.environ.get(XLA_CACHE_VARIABLE):
        config.session_cache_dir = tempfile.mkdtemp(prefix="mnist_jax-test-caches-")
        os.environ[XLA_CACHE_VARIABLE] = os.path.join(config.session_cache_dir, "xla")
        os.mkdir(os.environ[XLA_CACHE_VARIABLE])
        os.environ.setdefault(DATA_CACHE_VARIABLE, os.path.join(config.session_cache_dir, "data"))
    runs_tests = os.environ.get("PYTEST_XDIST_WORKER") or not config.getoption("numprocesses", None)
    if runs_tests and "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # not the xdist controller, which imports no JAX
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ[XLA_CACHE_VARIABLE])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
        jax.config.update("jax_compilation_cache_max_size", 4 << 30)  # makes JAX lock entries, as in cli_env


def pytest_unconfigure(config):
    if getattr(config, "session_cache_dir", None):
        shutil.rmtree(config.session_cache_dir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test without the e2e marker may not start Python in a subprocess (in its fixtures either): the fast tier
    runs every tool in this process."""
    if item.get_closest_marker("e2e"):
        return (yield)
    with refuse_python_subprocesses(item.nodeid):
        return (yield)


# --------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    path = shared_path(tmp_path_factory, "tiny-tfds")
    with built_once(path) as needed:
        if needed:
            write_tiny_dataset(path)
    return path


@pytest.fixture(scope="session")
def tiny_variants_dir(tmp_path_factory) -> Path:
    """`tiny_five` (tiny_digits' first 5 classes) and `tiny_rgb` (3-channel tiny_digits), for transfer tests."""
    path = shared_path(tmp_path_factory, "tiny-variants-tfds")
    with built_once(path) as needed:
        if needed:
            write_tiny_dataset(path, train=320, test=100, seed=1, name="tiny_five", num_classes=5)
            write_tiny_dataset(path, train=64, test=20, seed=2, name="tiny_rgb", channels=3)
    return path


@pytest.fixture(scope="session")
def named_data_dir(tmp_path_factory) -> Path:
    """`tiny_named`: tiny_digits' images, classes named like fashion_mnist's (T-shirt/top, ..., Ankle boot)."""
    path = shared_path(tmp_path_factory, "tiny-named-tfds")
    with built_once(path) as needed:
        if needed:
            write_tiny_dataset(path, train=320, test=100, seed=3, name=NAMED, class_names=CLASS_NAMES)
    return path


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Real MNIST for the `slow` tests: $MNIST_JAX_TEST_DATA_DIR, else ../shared/tensorflow_datasets (CI's)."""
    path = real_data_dir()
    missing = real_data_missing(path)
    if missing:
        pytest.skip(missing)
    return path


# --------------------------------------------------------------------------------------------- training runs
# Runs by `python -m mnist_jax.train` in a subprocess, for the e2e tests; tiny_run also by the same command's `main`
# in a test process (`tiny_run_in_process`, for the fast tier). One device in a test process, every core in a CLI:
# the two agree to float tolerance, not bitwise, so a test compares runs of one kind only. The strong preset has no
# twin in process: training it costs ~30 s of CPU, a fifth of the fast tier.
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data_dir) -> Path:
    """A finished 3-epoch training workdir on tiny_digits."""
    return trained_once(tmp_path_factory, "tiny-run", "--data-dir", tiny_data_dir, *TINY_FLAGS, *TINY_RUN_FLAGS)


@pytest.fixture(scope="session")
def tiny_run_in_process(tmp_path_factory, tiny_data_dir) -> Path:
    """tiny_run, trained by the training command's main in a test process."""
    return trained_once(tmp_path_factory, "tiny-run-in-process", "--data-dir", tiny_data_dir, *TINY_FLAGS,
                        *TINY_RUN_FLAGS, in_process=True)


@pytest.fixture(scope="session")
def strong_tiny_run(tmp_path_factory, tiny_data_dir) -> Path:
    """The `strong` preset (augmentation, batch norm, dropout, moving average, a clean final epoch, final
    test-time augmentation) trained 3 epochs on tiny_digits with a quarter held out for validation."""
    return trained_once(tmp_path_factory, "strong-tiny-run", "--data-dir", tiny_data_dir, "--config", "strong",
                        *TINY_FLAGS, *STRONG_TINY_FLAGS)


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, shared_data_dir) -> Path:
    """The default model trained for one epoch on 20,000 real MNIST images: 97.81% test accuracy, where all 60,000
    give 98.88% in 30 s more; the real-data tests ask for 97% (evaluate), 95% (predict) and 7 of 10 drawn digits."""
    return trained_once(tmp_path_factory, "mnist-run", "--data-dir", shared_data_dir, "--epochs", "1",
                        "--train-examples", "20000", "--no-progress", timeout=600)


@pytest.fixture(scope="session")
def named_run_in_process(tmp_path_factory, named_data_dir) -> Path:
    """One epoch of a small model on tiny_named, trained by the training command's main in a test process: a run
    whose classes have names."""
    return trained_once(tmp_path_factory, "named-run-in-process", "--data-dir", named_data_dir, *TINY_FLAGS,
                        "--dataset", NAMED, "--epochs", "1", *SMALL_MODEL_FLAGS, in_process=True)


# --------------------------------------------------------------------------------------------- both ways
@pytest.fixture(params=[IN_PROCESS, pytest.param(SUBPROCESS, marks=pytest.mark.e2e)])
def way(request) -> Way:
    """Runs a test both ways: in this process (fast tier) and through `python -m` subprocesses (e2e)."""
    return Way(request.param, request)


# --------------------------------------------------------------------------------------------- ONNX Runtime Web
@pytest.fixture(scope="session")
def onnxruntime_web_tarball(tmp_path_factory) -> Path:
    """The npm tarball of the ONNX Runtime Web version the package pins, as the registry serves it."""
    from mnist_jax.export import webruntime

    path = shared_path(tmp_path_factory, "npm-pack")
    with built_once(path) as needed:
        if needed:
            npm_pack(webruntime.PACKAGE, webruntime.VERSION, path)
    return path / f"{webruntime.PACKAGE}-{webruntime.VERSION}.tgz"


# --------------------------------------------------------------------------------------------- a browser
@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (which never downloads a browser here), one per test module."""
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
