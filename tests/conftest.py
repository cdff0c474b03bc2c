"""Shared fixtures: a small learnable dataset written in tfds's own format, and a way to run the real CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "tensorflow_datasets"
TINY = "tiny_digits"  # The synthetic dataset's tfds name.


def make_tiny_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 images where class k is a bright 5x5 block at its own place on a noisy background."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28, 1), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 3 + (label // 5) * 13 + rng.integers(-1, 2)
        col = 1 + (label % 5) * 5 + rng.integers(0, 2)
        images[i, row : row + 5, col : col + 5, 0] = 255
    return images


def write_tiny_dataset(data_dir: Path, train: int = 640, test: int = 200, seed: int = 0) -> Path:
    """Writes `tiny_digits` into data_dir with tfds's writer, so tests read it through the real loader."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)

    def split(n: int):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        return tf.data.Dataset.from_tensor_slices({"image": make_tiny_images(labels, rng), "label": labels})

    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=10)}
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name=TINY, version="1.0.0", features=features, data_dir=str(data_dir),
        split_datasets={"train": split(train), "test": split(test)}, disable_shuffling=True,
    )
    return data_dir


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tfds"))


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
    return env


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m module args...` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO,
    )


# Small, fast settings for CLI runs on tiny_digits.
TINY_FLAGS = ("--dataset", TINY, "--batch-size", "32", "--eval-batch-size", "100", "--no-progress")
