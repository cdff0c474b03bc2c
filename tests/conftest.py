"""Shared fixtures: a small learnable dataset written in tfds's own format, and a way to run the real CLIs."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from mnist_jax.datacache import CACHE_VARIABLE as DATA_CACHE_VARIABLE

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "tensorflow_datasets"
TINY = "tiny_digits"  # The synthetic dataset's tfds name.


XLA_CACHE_VARIABLE = "MNIST_JAX_TESTS_XLA_CACHE"  # the session's compilation cache, for the CLIs tests start


def pytest_configure(config):
    """Caches on disk for the session, made by the controller before it starts the xdist workers (which inherit
    the variables) and removed at its end:

    - One XLA compilation cache for every CLI the session starts, which would otherwise each compile the same init,
      steps and evaluation anew (a tiny `train` run: ~17 s cold, ~9 s warm). A loaded executable is the one
      compiled, so results are the same bits. The test processes themselves keep JAX's default (no disk cache):
      their eager code compiles thousands of small programs once each, and writing those costs more than it saves.
    - The decoded-split cache (`mnist_jax.datacache`) in a directory of the session's own, so the CLIs skip
      TensorFlow's import and tfds's decoding (~8 s each) once a split has been read. A user's own
      MNIST_JAX_DATA_CACHE (a directory, or `off`) is respected, as JAX_COMPILATION_CACHE_DIR is.
    """
    if not os.environ.get(XLA_CACHE_VARIABLE):
        config.session_cache_dir = tempfile.mkdtemp(prefix="mnist_jax-test-caches-")
        os.environ[XLA_CACHE_VARIABLE] = os.path.join(config.session_cache_dir, "xla")
        os.mkdir(os.environ[XLA_CACHE_VARIABLE])
        os.environ.setdefault(DATA_CACHE_VARIABLE, os.path.join(config.session_cache_dir, "data"))


def pytest_unconfigure(config):
    if getattr(config, "session_cache_dir", None):
        shutil.rmtree(config.session_cache_dir, ignore_errors=True)


def make_tiny_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 images where class k is a bright 5x5 block at its own place on a noisy background."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28, 1), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 3 + (label // 5) * 13 + rng.integers(-1, 2)
        col = 1 + (label % 5) * 5 + rng.integers(0, 2)
        images[i, row : row + 5, col : col + 5, 0] = 255
    return images


def numpy_softmax(logits) -> np.ndarray:
    """Softmax in float64 numpy: the independent side of tests that check jitted probabilities."""
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def write_tiny_dataset(data_dir: Path, train: int = 640, test: int = 200, seed: int = 0, name: str = TINY,
                       num_classes: int = 10, channels: int = 1) -> Path:
    """Writes `tiny_digits` (or a variant: fewer classes, more channels) into data_dir with tfds's writer, so
    tests read it through the real loader."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)

    def split(n: int):
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        images = np.repeat(make_tiny_images(labels, rng), channels, axis=-1)
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(28, 28, channels)),
         "label": tfds.features.ClassLabel(num_classes=num_classes)}
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=features, data_dir=str(data_dir),
        split_datasets={"train": split(train), "test": split(test)}, disable_shuffling=True,
    )
    return data_dir


def shared_path(tmp_path_factory, name: str) -> Path:
    """A path every pytest-xdist worker of this session sees, so expensive fixtures are built once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root / name


@contextlib.contextmanager
def built_once(path: Path):
    """Holds an exclusive lock while a worker builds `path`; the others wait, then reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield not (path / ".done").exists()
        path.mkdir(parents=True, exist_ok=True)
        (path / ".done").touch()


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


def trained_once(tmp_path_factory, name: str, *train_args, timeout: float = 300) -> Path:
    """A workdir trained by `python -m mnist_jax.train` once per test session (its stdout kept beside it)."""
    path = shared_path(tmp_path_factory, name)
    with built_once(path) as needed:
        if needed:
            result = run_module("mnist_jax.train", "--workdir", path, *train_args, timeout=timeout)
            assert result.returncode == 0, result.stderr
            Path(f"{path}.stdout").write_text(result.stdout)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data_dir) -> Path:
    """A finished 3-epoch training workdir on tiny_digits."""
    return trained_once(tmp_path_factory, "tiny-run", "--data-dir", tiny_data_dir, *TINY_FLAGS, "--epochs", "3",
                        "--learning-rate", "0.003")


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
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real MNIST not available: {SHARED_DATA} is absent (it sits beside the repository in CI)")
    return SHARED_DATA


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MNIST_JAX_OFFLINE"] = "1"  # Never wait on a network in tests.
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if XLA_CACHE_VARIABLE in env and "JAX_COMPILATION_CACHE_DIR" not in env:
        env.update({
            "JAX_COMPILATION_CACHE_DIR": env[XLA_CACHE_VARIABLE],
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # small programs too
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            # A size limit makes JAX lock the cache (filelock) around each read and write, so no process reads an
            # entry that another is still writing.
            "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
        })
    return env


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m module args...` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO,
    )


def run_main_in_process(main, *args: str) -> subprocess.CompletedProcess:
    """Runs a tool's `main` under the command-line error contract (`cli.run_cli`) in this process, and returns
    what `run_module` would: exit code, stdout, stderr. For error paths, where a fresh process would spend
    seconds importing TensorFlow and JAX to print one line; subprocess tests hold the contract end to end."""
    import jax

    from mnist_jax.cli import run_cli

    jax.devices()  # The backend is up before the tool runs, so it cannot change this process's device count.
    stdout, stderr = io.StringIO(), io.StringIO()
    with (mock.patch.dict(os.environ, MNIST_JAX_OFFLINE="1"),  # as in cli_env: never wait on a network in tests
          contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr),
          pytest.raises(SystemExit) as exit_status):  # run_cli always ends in sys.exit
        run_cli(main, [str(arg) for arg in args])
    return subprocess.CompletedProcess(list(args), exit_status.value.code, stdout.getvalue(), stderr.getvalue())


def train_in_process(config, data_dir: Path, workdir: Path, stopped_after_epoch_1_of: Path | None = None):
    """Trains `config` (two 20-step epochs of tiny_digits) in this process on one device and returns its history
    without the timing fields and its latest variables as numpy arrays. With `stopped_after_epoch_1_of`, the
    workdir starts as a copy of that finished run without epoch 2's checkpoint (step 40), as if killed there."""
    import shutil

    import jax

    from mnist_jax.checkpoint import restore_model
    from mnist_jax.train import RunOptions, train_and_evaluate

    if stopped_after_epoch_1_of is not None:
        shutil.copytree(stopped_after_epoch_1_of, workdir)
        shutil.rmtree(workdir / "checkpoints" / "40")
    history = train_and_evaluate(config, RunOptions(workdir=str(workdir), data_dir=str(data_dir), devices=1,
                                                    progress=False, plots=False))
    leaves = jax.tree_util.tree_leaves(restore_model(str(workdir), "latest").variables)
    return ([{k: v for k, v in h.items() if k not in ("train_images_per_second", "elapsed_seconds")}
             for h in history], [np.asarray(leaf) for leaf in leaves])


# Small, fast settings for CLI runs on tiny_digits.
TINY_FLAGS = ("--dataset", TINY, "--batch-size", "32", "--eval-batch-size", "100", "--no-progress")
STRONG_TINY_FLAGS = ("--epochs", "3", "--warmup-epochs", "0.5", "--validation-fraction", "0.25")  # strong_tiny_run
