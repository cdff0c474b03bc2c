"""A cache of decoded splits on disk, so a run reads its data without TensorFlow.

tfds stores images as PNG inside tfrecord files, and reading them goes through TensorFlow: importing it and
decoding MNIST take seconds in every process, for 55 MB of pixels. The first read of a split keeps its arrays in one
`.npz` file; later processes load that without TensorFlow. The file's name carries a hash of the prepared dataset's
files, so a re-prepared or different dataset never meets an old entry.

Where: `$MNIST_JAX_DATA_CACHE`, else `$XDG_CACHE_HOME/mnist_jax/data`, else `~/.cache/mnist_jax/data`;
`MNIST_JAX_DATA_CACHE=off` turns it off. An unreadable entry is decoded again and replaced; a cache that cannot
be written is skipped. Either way the run gets the same arrays as tfds gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from mnist_jax.workdir import atomic_file

Arrays = tuple[np.ndarray, np.ndarray]  # uint8 images (N, H, W, C), int32 labels (N,)

CACHE_VARIABLE = "MNIST_JAX_DATA_CACHE"
_FORMAT = b"mnist_jax decoded split v1"  # part of every key: a change of layout here never reads old entries


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off."""
    chosen = os.environ.get(CACHE_VARIABLE)
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist_jax" / "data"


def entry_path(prepared_dir: str, split: str) -> Path | None:
    """Where the split of the dataset prepared in `prepared_dir` (tfds's `DATA_DIR/NAME/VERSION`) is cached.

    The key hashes the content of every file tfds prepared there, so it follows the data itself, not a path or a
    modification time.
    """
    root = cache_dir()
    if root is None:
        return None
    key = hashlib.sha256(_FORMAT + split.encode())
    with os.scandir(prepared_dir) as entries:
        files = sorted((entry for entry in entries if entry.is_file()), key=lambda entry: entry.name)
    for entry in files:
        with open(entry.path, "rb") as file:
            key.update(entry.name.encode() + hashlib.file_digest(file, "sha256").digest())
    version_dir = Path(prepared_dir)
    readable_split = re.sub(r"[^\w.%-]+", "_", split)
    return root / f"{version_dir.parent.name}-{version_dir.name}-{readable_split}-{key.hexdigest()[:20]}.npz"


def load_or_decode(prepared_dir: str, split: str, num_examples: int, decode: Callable[[], Arrays]) -> Arrays:
    """The split's arrays from the cache when a sound entry holds them, else from `decode()`, then cached."""
    path = entry_path(prepared_dir, split)
    cached = _read(path, num_examples) if path else None
    if cached is not None:
        return cached
    images, labels = decode()
    if path:
        _write(path, images, labels)
    return images, labels


def _read(path: Path, num_examples: int) -> Arrays | None:
    """The entry's arrays, or None when it is missing, unreadable or not what the split holds."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            images, labels = entry["images"], entry["labels"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    sound = (images.dtype == np.uint8 and images.ndim == 4 and labels.dtype == np.int32 and labels.ndim == 1
             and len(images) == len(labels) == num_examples)
    return (images, labels) if sound else None


def _write(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the entry whole or not at all (a temporary file renamed into place), so concurrent runs and a kill
    mid-write leave no half entry; a cache that cannot be written is left alone."""
    with contextlib.suppress(OSError), atomic_file(str(path), binary=True) as file:
        np.savez(file, images=images, labels=labels)
