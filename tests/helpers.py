"""What the tests share: paths, the tiny synthetic dataset, the ways to run the tools (in this process, or as a user
runs them in a subprocess), and small builders of states, batches, checkpoints and HTTP servers.

Test files import from here (`from helpers import ...`: pytest puts tests/ on sys.path); conftest.py holds only
pytest's hooks and fixtures. Heavy libraries (JAX, TensorFlow) are imported inside the functions, so pytest's
controller process never loads them.

Library APIs that several test files use are reached through this module, so a change of one is adapted here:
- the jitted training step (`steps.make_train_step`): `train_step(config)`, `non_donating_train_step(config)`; the
  states it takes: `new_state`, `trained_state`, `optimizer`;
- the training loop (`training.train_and_evaluate`, `config.RunOptions`): `train_run`, `train_in_process`.
Outside it: test_parallel.py's two-device script makes its own step in its subprocess, and test_model.py,
test_transfer.py spell the layer names (conv1_1, ..., head).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import http.server
import importlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn
from unittest import mock

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The `slow` tests' real MNIST: a tfds data dir holding mnist prepared, named by this variable, else the one CI puts
# beside the repository.
REAL_DATA_VARIABLE = "MNIST_JAX_TEST_DATA_DIR"
SHARED_DATA = REPO.parent / "shared" / "tensorflow_datasets"
TINY = "tiny_digits"  # The synthetic dataset's tfds name.
XLA_CACHE_VARIABLE = "MNIST_JAX_TESTS_XLA_CACHE"  # the session's compilation cache, for the CLIs tests start

# Small, fast settings for CLI runs on tiny_digits.
TINY_FLAGS = ("--dataset", TINY, "--batch-size", "32", "--eval-batch-size", "100", "--no-progress")
TINY_RUN_FLAGS = ("--epochs", "3", "--learning-rate", "0.003")  # tiny_run (3 epochs of 20 steps)
STRONG_TINY_FLAGS = ("--epochs", "3", "--warmup-epochs", "0.5", "--validation-fraction", "0.25")  # strong_tiny_run
SMALL_MODEL = {"conv_features": (8, 16), "dense_features": (32,)}  # for tests that do not depend on the architecture
# SMALL_MODEL as the training command's flags: --conv-features 8,16 --dense-features 32
SMALL_MODEL_FLAGS = tuple(word for field, sizes in SMALL_MODEL.items()
                          for word in (f"--{field.replace('_', '-')}", ",".join(map(str, sizes))))
# tiny_named: tiny_digits' images with fashion_mnist's class names, for the tools that print or return a class.
NAMED = "tiny_named"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
TIMING_FIELDS = {"train_images_per_second", "elapsed_seconds"}  # wall-clock facts of a history, not results

# How a test runs a tool: `main` called in this process (the fast tier), or `python -m` in a subprocess (e2e).
IN_PROCESS, SUBPROCESS = "in_process", "subprocess"
# Each `mnist-jax COMMAND` and the module its `python -m` form runs, in the order `mnist-jax --help` lists them.
COMMAND_MODULES = {"train": "mnist_jax.train", "evaluate": "mnist_jax.evaluate", "predict": "mnist_jax.predict",
                   "serve": "mnist_jax.serve", "export": "mnist_jax.export", "sweep": "mnist_jax.sweep",
                   "transfer": "mnist_jax.transfer"}
# The tools that only read a run's checkpoints (never train or move one).
READING_TOOLS = ("mnist_jax.evaluate", "mnist_jax.predict", "mnist_jax.serve", "mnist_jax.export")


# --------------------------------------------------------------------------------------------- data
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
                       num_classes: int = 10, channels: int = 1, class_names: tuple[str, ...] | None = None) -> Path:
    """Writes `tiny_digits` (or a variant: fewer classes, more channels, classes with names rather than numbers)
    into data_dir with tfds's writer, so tests read it through the real loader. (Not `tfds.testing.mock_data`:
    `tfds.load(..., batch_size=-1)` under it aborts the process.)"""
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
         "label": tfds.features.ClassLabel(names=class_names) if class_names else
         tfds.features.ClassLabel(num_classes=num_classes)}
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=features, data_dir=str(data_dir),
        split_datasets={"train": split(train), "test": split(test)}, disable_shuffling=True,
    )
    return data_dir


def real_data_dir() -> Path:
    """Where the `slow` tests look for real MNIST: $MNIST_JAX_TEST_DATA_DIR, else SHARED_DATA."""
    chosen = os.environ.get(REAL_DATA_VARIABLE)
    return Path(chosen) if chosen else SHARED_DATA


def real_data_missing(data_dir: Path) -> str | None:
    """Why the `slow` tests skip with `data_dir`, naming where they looked and how to point them elsewhere; None
    when it holds mnist."""
    if (data_dir / "mnist").is_dir():
        return None
    return (f"real MNIST not available: no {data_dir / 'mnist'}; set {REAL_DATA_VARIABLE} to a tfds data dir that "
            "holds mnist prepared")


# --------------------------------------------------------------------------------------------- session-wide builds
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


def trained_once(tmp_path_factory, name: str, *train_args, timeout: float = 300, in_process: bool = False,
                 module: str = "mnist_jax.train") -> Path:
    """A workdir trained once per test session by the training command (or `module`: transfer), its stdout kept
    beside it: by `python -m mnist_jax.train` in a subprocess, or with `in_process`, by the same `main` in this
    process."""
    path = shared_path(tmp_path_factory, name)
    with built_once(path) as needed:
        if needed:
            result = run_tool(IN_PROCESS if in_process else SUBPROCESS, module, "--workdir", path, *train_args,
                              timeout=timeout)
            assert result.returncode == 0, result.stderr
            Path(f"{path}.stdout").write_text(result.stdout)
    return path


# --------------------------------------------------------------------------------------------- running the tools
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


def without_huge_page_settings(environ) -> dict[str, str]:
    """`environ` less the variables the huge-page restart reads and sets: a process started with it decides anew."""
    from mnist_jax.backend import HUGE_PAGES_OPT_OUT

    return {name: value for name, value in environ.items() if name not in ("GLIBC_TUNABLES", HUGE_PAGES_OPT_OUT)}


def huge_pages_apply() -> bool:
    """Whether the huge-page restart happens on this machine for a process without a setting of its own."""
    import platform

    from mnist_jax.backend import THP_SETTING, huge_page_environment

    try:
        with open(THP_SETTING) as f:
            thp = f.read()
    except OSError:
        return False
    return sys.platform.startswith("linux") and huge_page_environment(
        without_huge_page_settings(os.environ), platform.libc_ver(), thp) is not None


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m module args...` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO,
    )


def run_main_in_process(main, *args: str) -> subprocess.CompletedProcess:
    """Runs a tool's `main` under the command-line error contract (`cli.run_cli`) in this process, and returns
    what `run_module` would: exit code, stdout, stderr. For the fast tier and error paths, where a fresh process
    would spend seconds importing TensorFlow and JAX; subprocess tests (e2e) hold the contract end to end."""
    import jax

    from mnist_jax.cli import run_cli

    jax.devices()  # The backend is up before the tool runs, so it cannot change this process's device count.
    stdout, stderr = io.StringIO(), io.StringIO()
    with (mock.patch.dict(os.environ, MNIST_JAX_OFFLINE="1"),  # as in cli_env: never wait on a network in tests
          contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr),
          pytest.raises(SystemExit) as exit_status):  # run_cli always ends in sys.exit
        run_cli(main, [str(arg) for arg in args])
    return subprocess.CompletedProcess(list(args), exit_status.value.code, stdout.getvalue(), stderr.getvalue())


def run_tool(way: str, module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` run one of two ways: IN_PROCESS (`module.main` through `run_main_in_process`)
    or SUBPROCESS (`run_module`). Both return the exit code, stdout and stderr."""
    if way == SUBPROCESS:
        return run_module(module, *args, timeout=timeout)
    assert way == IN_PROCESS, way
    return run_main_in_process(tool_main(module), *args)


def tool_main(module: str):
    """The `main` that `python -m module` runs: the module's own, or for a package (export, serve) its
    __main__'s."""
    tool = importlib.import_module(module)
    if hasattr(tool, "__path__"):
        tool = importlib.import_module(f"{module}.__main__")
    return tool.main


def unavailable(message: str) -> NoReturn:
    """A test's missing requirement: skips with `message`, except in CI, which installs everything (.ci/run), where
    the absence is a failure."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago (the OS's pick, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Way:
    """How a test runs the tools: IN_PROCESS (each tool's main in this process, on the `*_in_process` runs) or
    SUBPROCESS (`python -m`, on the runs the CLI trained)."""

    def __init__(self, name: str, request) -> None:
        self.name, self._request = name, request

    @property
    def in_process(self) -> bool:
        return self.name == IN_PROCESS

    def run(self, module: str, *args, timeout: float = 300):
        """`python -m module args...`, this way: a CompletedProcess with the exit code, stdout and stderr."""
        return run_tool(self.name, module, *args, timeout=timeout)

    def fixture(self, name: str):
        """The session fixture `name` (a run the CLI trained) or, in process, its twin `name_in_process`."""
        return self._request.getfixturevalue(f"{name}_in_process" if self.in_process else name)


# --------------------------------------------------------------------------------------------- the training loop
def train_run(config, workdir: Path, data_dir: Path, **options) -> list[dict[str, Any]]:
    """`training.train_and_evaluate` of `config` in `workdir` on one device, without progress bars or plots unless
    `options` (more `config.RunOptions` fields) say otherwise; returns the metrics history."""
    from mnist_jax.config import RunOptions
    from mnist_jax.training import train_and_evaluate

    options = {"devices": 1, "progress": False, "plots": False, "tensorboard": False, **options}
    return train_and_evaluate(config, RunOptions(workdir=str(workdir), data_dir=str(data_dir), **options))


def train_in_process(config, data_dir: Path, workdir: Path, stopped_after_epoch_1_of: Path | None = None):
    """Trains `config` (two 20-step epochs of tiny_digits) in this process on one device and returns its history
    without the timing fields and its latest variables as numpy arrays. With `stopped_after_epoch_1_of`, the
    workdir starts as a copy of that finished run without epoch 2's checkpoint (step 40), as if killed there."""
    import jax

    from mnist_jax.checkpoint import restore_model

    if stopped_after_epoch_1_of is not None:
        shutil.copytree(stopped_after_epoch_1_of, workdir)
        shutil.rmtree(workdir / "checkpoints" / "40")
    history = train_run(config, workdir, data_dir)
    leaves = jax.tree_util.tree_leaves(restore_model(str(workdir), "latest").variables)
    return results(history), [np.asarray(leaf) for leaf in leaves]


# --------------------------------------------------------------------------------------------- workdirs
def read_jsonl(path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def tensorboard_events(workdir) -> Any:
    """WORKDIR/tensorboard/ read back by TensorBoard's own reader (an `EventAccumulator`, everything kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(Path(workdir) / "tensorboard"),
                                   size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return accumulator.Reload()


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in WORKDIR/tensorboard/, in the order a reader gets them."""
    events = tensorboard_events(workdir)
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# metrics.jsonl key -> TensorBoard tag, for what a run without a validation slice logs
TENSORBOARD_TAGS = {"train_loss": "loss/train", "train_accuracy": "accuracy/train", "test_loss": "loss/test",
                    "test_accuracy": "accuracy/test", "learning_rate": "learning_rate",
                    "train_images_per_second": "train_images_per_second"}


def assert_tensorboard_equals_metrics(workdir) -> None:
    """WORKDIR/tensorboard/ holds every metrics.jsonl value at its epoch (as TensorBoard stores it: float32), each
    epoch once and in order, one event file per epoch."""
    from mnist_jax.summaries import written_epochs

    history = read_jsonl(Path(workdir) / "metrics.jsonl")
    expected = {tag: [(entry["epoch"], float(np.float32(entry[key]))) for entry in history]
                for key, tag in TENSORBOARD_TAGS.items()}
    assert tensorboard_scalars(workdir) == expected
    assert written_epochs(str(workdir)) == [entry["epoch"] for entry in history]


def results(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A metrics history without its wall-clock fields: what two equal runs share."""
    return [{k: v for k, v in entry.items() if k not in TIMING_FIELDS} for entry in history]


def snapshot(workdir) -> dict[str, bytes]:
    """Every file in a workdir with its bytes, to prove a failed command changed nothing."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, workdir)] = handle.read()
    return files


# --------------------------------------------------------------------------------------------- the package's modules
def module_name(path: Path) -> str:
    """mnist_jax/export/pipeline.py -> mnist_jax.export.pipeline; a package's __init__.py -> the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """{module name: its file} of every module of the package mnist_jax, its subpackages' too."""
    return {module_name(path): path for path in (REPO / "mnist_jax").rglob("*.py")}


def reachable(graph: dict[str, set[str]], roots) -> set[str]:
    """The nodes reached from `roots` by one edge or more of `graph` ({node: the nodes it leads to}; a node missing
    from it leads nowhere): a root is among them only when a path leads back to it."""
    seen, stack = set(), list(roots)
    while stack:
        for node in graph.get(stack.pop(), ()):
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return seen


# --------------------------------------------------------------------------------------------- steps and states
def fixed_batch(n=32, seed=0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    return {"image": jnp.asarray(make_tiny_images(labels, rng)), "label": jnp.asarray(labels, jnp.int32)}


@functools.cache
def train_step(config=None):
    """The jitted (donating) training step of `config` (default: Config()), as `train` makes it; one per config, so
    the tests of a config share its compiled step."""
    from mnist_jax import steps
    from mnist_jax.config import Config

    return steps.make_train_step(Config() if config is None else config)


def non_donating_train_step(config=None):
    """`train_step(config)`, jitted without donating its input state, for tests that keep every state."""
    import jax

    from mnist_jax import steps
    from mnist_jax.augment import training_augmentation
    from mnist_jax.config import Config

    config = Config() if config is None else config
    return jax.jit(functools.partial(steps.train_step, label_smoothing=config.label_smoothing,
                                     ema_decay=config.ema_decay, augmentation=training_augmentation(config)))


@functools.cache
def optimizer(config, steps_per_epoch):
    """`optim.make_optimizer`, one object per (config, steps_per_epoch): the jitted step is cached per optimizer
    object (a static field of the state), so states of one config share its compiled step."""
    from mnist_jax.optim import make_optimizer

    return make_optimizer(config, steps_per_epoch)


def new_state(config=None, steps_per_epoch=10, seed=0):
    """A fresh training state of `config` (default: Config()) for 10 classes, mean 0.2, std 0.3."""
    import jax

    from mnist_jax import steps
    from mnist_jax.config import Config
    from mnist_jax.model import build_model

    config = Config() if config is None else config
    model = build_model(config, 10, 0.2, 0.3)
    return steps.create_train_state(model, optimizer(config, steps_per_epoch), jax.random.PRNGKey(seed),
                                    (28, 28, 1), moving_average=config.ema_decay > 0)


def trained_state(config=None, n_steps=2):
    """`new_state(config)` (without its moving average and label smoothing) after `n_steps` steps on fixed_batch()."""
    import jax

    from mnist_jax import steps
    from mnist_jax.config import Config
    from mnist_jax.model import build_model

    config = Config() if config is None else config
    model = build_model(config, 10, 0.2, 0.3)
    state = steps.create_train_state(model, optimizer(config, 10), jax.random.PRNGKey(0), (28, 28, 1))
    step = train_step(dataclasses.replace(config, ema_decay=0.0, label_smoothing=0.0))
    for _ in range(n_steps):
        state, _ = step(state, fixed_batch())
    return state


def copy(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def assert_trees_equal(a, b):
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------- checkpoints
def meta(config, epoch, accuracy):
    """A checkpoint's metadata for epoch `epoch` whose validation accuracies were `accuracy[:epoch]`.
    Epoch e ends at step e + 1 in these tests (one step before the first save, then one per epoch)."""
    history = [{"epoch": e, "step": e + 1, "validation_accuracy": accuracy[e - 1], "test_accuracy": 1 - accuracy[e - 1]}
               for e in range(1, epoch + 1)]
    return {"config": config.__dict__ | {"conv_features": list(config.conv_features),
                                         "dense_features": list(config.dense_features)},
            "class_names": [str(i) for i in range(10)], "image_shape": [28, 28, 1],
            "mean": 0.2, "std": 0.3, "epoch": epoch, "history": history}


def save_epochs(workdir, config, accuracies):
    """One checkpoint per epoch (one step each) with these validation accuracies; returns the last state and
    each saved step's params as numpy."""
    import jax

    from mnist_jax import checkpoint

    manager = checkpoint.open_manager(str(workdir), keep=2)
    state = trained_state(config, 1)
    step = train_step(config)
    saved = {}
    for epoch in range(1, len(accuracies) + 1):
        state, _ = step(state, fixed_batch())
        checkpoint.save(manager, state, meta(config, epoch, accuracies))
        saved[int(state.step)] = jax.tree_util.tree_map(np.asarray, state.params)
    manager.close()
    return state, saved


def corrupt(step_dir):
    """Truncates every data file of a checkpoint, as a disk fault or a bad copy would."""
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as handle:
                handle.truncate(0)


def overwrite_data_files(step_dir, arrays_only: bool = True):
    """Overwrites a checkpoint's data files (TensorStore's OCDBT `d/` folders) with random bytes of the same size,
    leaving its JSON files whole: with `arrays_only`, those of the arrays themselves (`ocdbt.process_N/d/`), so the
    restore fails while reading them; else the array metadata's too."""
    rng = np.random.default_rng(0)
    for root, _, files in os.walk(step_dir):
        if os.path.basename(root) != "d" or (arrays_only and not os.path.basename(os.path.dirname(root)).startswith(
                "ocdbt.process")):
            continue
        for name in files:
            path = os.path.join(root, name)
            Path(path).write_bytes(rng.integers(0, 256, os.path.getsize(path), dtype=np.uint8).tobytes())


CORRUPTIONS = {
    "truncated": corrupt,  # every file empty, its JSON too
    "array data overwritten": overwrite_data_files,  # TensorStore fails while reading the arrays
    "array metadata overwritten": lambda step_dir: overwrite_data_files(step_dir, arrays_only=False),
}


def corrupt_copy(run, tmp_path, corruption: str, steps=("60",)) -> Path:
    """A copy of a finished run (checkpoints 20, 40, 60) as tmp_path/run whose checkpoints `steps` (by default the
    newest) are corrupt, in a way of CORRUPTIONS."""
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    for step in steps:
        CORRUPTIONS[corruption](workdir / "checkpoints" / step)
    return workdir


# --------------------------------------------------------------------------------------------- serving
READY = re.compile(r"serving \S+ checkpoint (\d+) at (http://\S+)")


class ServerProcess:
    """`python -m mnist_jax.serve --port 0 ...` started, waited for (its ready line gives the URL), and stopped;
    this checkout's package unless `env` and `cwd` say otherwise."""

    def __init__(self, workdir: Path, *args: str, log_dir: Path, timeout: float = 180,
                 env: dict[str, str] | None = None, cwd: Path = REPO) -> None:
        self.stdout_path, self.stderr_path = log_dir / "serve.stdout", log_dir / "serve.stderr"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mnist_jax.serve", "--workdir", str(workdir), "--port", "0", *args],
                stdout=stdout, stderr=stderr, env=cli_env() if env is None else env, cwd=cwd,
            )
        deadline = time.monotonic() + timeout
        while not (match := READY.search(self.stdout_path.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not become ready: {self.stderr_path.read_text()}")
            time.sleep(0.1)
        self.step, self.url = int(match.group(1)), match.group(2).rstrip("/")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def digit_png(seed: int, size: int = 140, dark_on_light: bool = False) -> bytes:
    """A random multi-stroke scribble, like a drawn digit, as PNG bytes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), 255 if dark_on_light else 0)
    points = [tuple(int(v) for v in rng.integers(size // 6, size - size // 6, 2)) for _ in range(4)]
    ImageDraw.Draw(image).line(points, fill=0 if dark_on_light else 255, width=max(2, size // 14), joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def refuse_python_subprocesses(nodeid: str) -> contextlib.AbstractContextManager:
    """While active, starting `python ...` (a tool, `python -c`, a benchmark script) in a subprocess fails with an
    AssertionError asking for the e2e marker: the fast tier stays in this process."""
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        program = args[0] if isinstance(args, (list, tuple)) and args else args
        name = os.fspath(program).split(" ")[0] if isinstance(program, (str, os.PathLike)) else ""
        if name == sys.executable or os.path.basename(name).startswith("python"):
            raise AssertionError(f"{nodeid} starts Python ({name}) in a subprocess; mark it e2e "
                                 "(pytest.mark.e2e), or call the tool's main in this process")
        original(self, args, *rest, **kwargs)

    return mock.patch.object(subprocess.Popen, "__init__", guarded)


# --------------------------------------------------------------------------------------------- drawing in a browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
INK_THRESHOLD = 128  # MNIST pixels at least this bright are traced


def strokes(image: np.ndarray) -> list[tuple[int, int, int]]:
    """Each row's runs of bright pixels as (row, first column, last column): one horizontal drag each."""
    runs = []
    for row in range(image.shape[0]):
        bright = np.flatnonzero(image[row] >= INK_THRESHOLD)
        if bright.size:
            breaks = np.flatnonzero(np.diff(bright) > 1)
            for start, end in zip(np.r_[bright[0], bright[breaks + 1]], np.r_[bright[breaks], bright[-1]]):
                runs.append((row, int(start), int(end)))
    return runs


def draw(page, image: np.ndarray) -> None:
    """Drags the mouse along the digit's strokes, the 28x28 image scaled to the whole canvas."""
    box = page.get_by_test_id("digit-canvas").bounding_box()
    scale = box["width"] / image.shape[1]
    def at(row: float, col: float) -> tuple[float, float]:
        return box["x"] + (col + 0.5) * scale, box["y"] + (row + 0.5) * scale
    for row, first, last in strokes(image):
        page.mouse.move(*at(row, first))
        page.mouse.down()
        page.mouse.move(*at(row, last + 0.01), steps=max(1, last - first))
        page.mouse.up()


def settled_prediction(page) -> str:
    page.wait_for_function("document.body.dataset.pending === '0'"
                           " && document.querySelector('[data-testid=prediction]').textContent !== ''", timeout=20_000)
    return page.get_by_test_id("prediction").text_content()


def web_runtime_dir() -> Path:
    """ONNX Runtime Web's files at the pinned version: $MNIST_JAX_ONNXRUNTIME_WEB, else `npm ci`'s in this checkout.
    A test that needs them skips without, except in CI, which installs them (.ci/run), where their absence is a
    failure."""
    from mnist_jax.export import webruntime

    checkout = REPO / "node_modules" / webruntime.PACKAGE / "dist"
    directory = Path(os.environ.get(webruntime.DIRECTORY_VARIABLE) or checkout)
    try:
        return webruntime.checked_dist(directory, "run `npm ci` in the repository")
    except webruntime.RuntimeUnavailable as error:
        unavailable(str(error))


# --------------------------------------------------------------------------------------------- an npm registry
def npm_pack(package: str, version: str, folder: Path) -> Path:
    """The registry's own tarball of package@version, by `npm pack` (from npm's cache when it holds it, as after
    `npm ci`); skips without npm, except in CI, which installs it (.ci/run)."""
    if not shutil.which("npm"):
        unavailable("npm is not installed (apt-get install -y npm)")
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["npm", "pack", f"{package}@{version}", "--prefer-offline", "--silent",
                             "--pack-destination", str(folder)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder / f"{package}-{version}.tgz"


class StaticServer:
    """A real HTTP server on 127.0.0.1, in a thread, serving the files under `folder` (as an npm registry serves
    `NAME/-/NAME-VERSION.tgz`); `requested` lists the paths asked for."""

    def __init__(self, folder: Path) -> None:
        self.requested: list[str] = []
        requested = self.requested

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, format, *args):  # noqa: A002 (the base class's name)
                requested.append(self.path)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "StaticServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def npm_registry(root: Path, tarball: bytes, package: str, version: str) -> Path:
    """A folder laid out as an npm registry serving one tarball at its standard path."""
    path = root / package / "-" / f"{package}-{version}.tgz"
    path.parent.mkdir(parents=True)
    path.write_bytes(tarball)
    return root


# --------------------------------------------------------------------------------------------- PostgreSQL
def postgres_tool(name: str) -> str | None:
    """initdb or pg_ctl: from PATH, else from Debian's versioned folder (the `postgresql` package), or None."""
    import glob

    found = shutil.which(name)
    if found:
        return found
    versioned = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versioned[-1] if versioned else None


class PostgresServer:
    """A PostgreSQL server of the test's own: a new cluster in a temporary folder, on a free port of 127.0.0.1,
    trusting local connections, removed by `stop`. PostgreSQL refuses to run as root, so as root its commands
    run as the `postgres` user (which the package creates)."""

    def __init__(self) -> None:
        import pwd
        import tempfile

        initdb, self.pg_ctl = postgres_tool("initdb"), postgres_tool("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            unavailable("PostgreSQL is not installed (initdb, pg_ctl; Debian: apt-get install postgresql)")
        self.folder = Path(tempfile.mkdtemp(prefix="mnist_jax-postgres-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, pwd.getpwnam("postgres").pw_uid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        port = free_port()
        self.data = self.folder / "data"
        subprocess.run([*self.as_user, initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True)
        options = f"-p {port} -h 127.0.0.1 -k {self.folder} -c fsync=off"
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-l", str(self.folder / "server.log"),
                        "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True)
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def stop(self) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)
