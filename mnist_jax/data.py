"""Data: a tfds image-classification dataset, held on the device as uint8, batched there.

MNIST is 47 MB as uint8, so each split lives on the accelerator for the whole run. Batches are gathered on the
device from a per-epoch permutation drawn from an explicit PRNG key, and the model normalises them itself, so
the host never sits in the input path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from typing import NamedTuple

import jax
import numpy as np

from mnist_jax import datacache
from mnist_jax.config import UserError, plural

# tfds fetches datasets from this host (its GCS mirror) first. Probing it takes milliseconds, whereas
# tfds's own download retries for minutes before it fails when there is no network.
_DOWNLOAD_PROBE = ("storage.googleapis.com", 443)


class Split(NamedTuple):
    """One split on the device: uint8 images (N, H, W, C) and int32 labels (N,)."""

    images: jax.Array
    labels: jax.Array


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits plus what the model and the plots need to know about them."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    mean: float  # pixel statistics of the training split, in [0, 1] units
    std: float
    validation: Split | None = None  # held out from the training split when asked

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


def resolve_data_dir(data_dir: str | None) -> str | None:
    """--data-dir, else $TFDS_DATA_DIR, else None (tfds's default, ~/tensorflow_datasets)."""
    return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def network_available(timeout: float = 3.0) -> bool:
    """True when tfds's download host answers; MNIST_JAX_OFFLINE=1 forces False."""
    if os.environ.get("MNIST_JAX_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(_DOWNLOAD_PROBE, timeout=timeout):
            return True
    except OSError:
        return False


def _builder(name: str, data_dir: str | None):
    """A prepared tfds builder, preparing (downloading) it only when a network exists."""
    import tensorflow_datasets as tfds  # Imported lazily: TensorFlow is slow to import.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        _check_nearby(name, data_dir)
        raise UserError(f"unknown dataset {name!r}: not a tfds dataset"
                        + (f", and not prepared in the data dir {data_dir}" if data_dir else ""))
    if not builder.is_prepared():
        _check_nearby(name, data_dir)  # before any download: a second copy in the wrong folder helps nobody
        if not network_available():
            root = os.path.dirname(os.path.dirname(str(builder.data_dir)))  # DATA_DIR/NAME/VERSION
            raise UserError(
                f"dataset {name!r} is not prepared in {root} (no {builder.data_dir}) and there is no network to "
                "download it; pass --data-dir pointing at a tfds data dir that holds it"
            )
        builder.download_and_prepare()
    features = builder.info.features
    if "image" not in features or "label" not in features or not hasattr(features["label"], "names"):
        raise UserError(f"dataset {name!r} is not an image-classification dataset (needs 'image' and 'label')")
    return builder


def _prepared_in(name: str, data_dir: str) -> bool:
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        return False


def _check_nearby(name: str, data_dir: str | None) -> None:
    """A UserError naming the data dir meant when `data_dir` lacks the dataset but is a common slip away from one
    that holds it: the dataset's own folder or a version folder in it (DIR/mnist, DIR/mnist/3.0.1: one or two
    levels too deep), or a folder that holds the data dir (one level too high)."""
    if not data_dir:
        return
    parent = os.path.normpath(os.path.join(data_dir, os.pardir))
    candidates = []
    if os.path.basename(os.path.normpath(data_dir)) == name:
        candidates.append(parent)
    if os.path.basename(parent) == name:
        candidates.append(os.path.normpath(os.path.join(parent, os.pardir)))
    if os.path.isdir(data_dir):
        with os.scandir(data_dir) as entries:
            candidates += sorted(os.path.normpath(entry.path) for entry in entries
                                 if entry.is_dir() and os.path.isdir(os.path.join(entry.path, name)))
    for candidate in candidates:
        if _prepared_in(name, candidate):
            raise UserError(f"dataset {name!r} is not in the data dir {data_dir} but in {candidate}: pass "
                            f"--data-dir {candidate} (the folder that holds {name}/)")


def load_split_numpy(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One split as host arrays (uint8 images, int32 labels), in the split's stored order.

    Decoded by tfds (TensorFlow) once per dataset and split, then read from `datacache` on disk; cached per process
    too (read-only arrays), so a study training many runs in one process reads each split once.
    """
    return _load_split_cached(name, split, data_dir)


@functools.lru_cache(maxsize=8)
def _load_split_cached(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir)
    if split.split("[")[0] not in builder.info.splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(builder.info.splits)}")
    try:
        num_examples = builder.info.splits[split].num_examples
    except ValueError as error:  # tfds's own message names the format, in its first line
        raise UserError(f"bad split {split!r}: {str(error).splitlines()[0]}")
    if num_examples <= 0:
        raise UserError(f"split {split!r} of dataset {name!r} holds no examples")

    def decode() -> tuple[np.ndarray, np.ndarray]:
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
        images = arrays["image"]
        return (images[..., None] if images.ndim == 3 else images).astype(np.uint8), arrays["label"].astype(np.int32)

    images, labels = datacache.load_or_decode(str(builder.data_dir), split, num_examples, decode)
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller of the cache
    return images, labels


def image_shape(name: str, data_dir: str | None) -> tuple[int, ...]:
    """(H, W, C) of the dataset's images from its metadata, without reading any data."""
    shape = tuple(_builder(name, resolve_data_dir(data_dir)).info.features["image"].shape)
    return shape if len(shape) == 3 else (*shape, 1)


def balanced_subset(labels: np.ndarray, size: int, num_classes: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` examples, as equal per class as possible; depends only on (labels, size, seed).

    Each class's examples are ranked by a generator seeded with (seed, class), and the `size % num_classes`
    classes that get one extra example are drawn from a generator seeded with (seed,): so subsets for the same
    seed are nested (the 100-example subset lies inside the 1000-example one), and nothing else (batch size,
    model, JAX backend) can change them.
    """
    if size > len(labels):
        raise UserError(f"--train-examples {size} is larger than the training split ({len(labels)} examples)")
    quota = np.full(num_classes, size // num_classes)
    quota[np.random.default_rng([seed]).permutation(num_classes)[: size % num_classes]] += 1
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < quota[label]:
            raise UserError(f"--train-examples {size} needs {plural(int(quota[label]), 'example')} of class {label}, "
                            f"the training split has {len(members)}")
        ranked = members[np.random.default_rng([seed, label]).permutation(len(members))]
        chosen.append(ranked[: quota[label]])
    return np.sort(np.concatenate(chosen))


def class_names(name: str, data_dir: str | None) -> tuple[str, ...]:
    """The label names tfds records for the dataset."""
    return tuple(_builder(name, data_dir).info.features["label"].names)


def load_dataset(
    name: str,
    data_dir: str | None,
    sharding: jax.sharding.Sharding | None = None,
    train_examples: int = 0,
    subset_seed: int = 0,
    validation_fraction: float = 0.0,
) -> Dataset:
    """Loads train and test splits onto the device(s) given by `sharding` (default: the first device).

    `validation_fraction > 0` first holds out the last examples of the training split (`validation_slice`);
    `train_examples > 0` then keeps only `balanced_subset` of what remains. Pixel statistics come from the
    training examples alone, so a run sees nothing of the examples it was not given.
    """
    data_dir = resolve_data_dir(data_dir)
    train_images, train_labels = load_split_numpy(name, "train", data_dir)
    train_part, validation_part = validation_slice(len(train_labels), validation_fraction)
    validation = (train_images[validation_part], train_labels[validation_part]) if validation_fraction else None
    train_images, train_labels = train_images[train_part], train_labels[train_part]
    test_images, test_labels = load_split_numpy(name, "test", data_dir)
    names = class_names(name, data_dir)
    if train_examples:
        keep = balanced_subset(train_labels, train_examples, len(names), subset_seed)
        train_images, train_labels = train_images[keep], train_labels[keep]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise UserError(f"dataset {name!r}: train and test images differ in shape")
    scaled = train_images.astype(np.float64) / 255.0
    put = lambda x: jax.device_put(x, sharding)  # noqa: E731
    return Dataset(
        name=name,
        train=Split(put(train_images), put(train_labels)),
        test=Split(put(test_images), put(test_labels)),
        class_names=names,
        mean=float(scaled.mean()),
        std=float(scaled.std()),
        validation=Split(put(validation[0]), put(validation[1])) if validation else None,
    )


def validation_slice(num_examples: int, fraction: float) -> tuple[slice, slice]:
    """(train, validation) slices of the training split: the validation part is its last round(fraction * N)
    examples, like tfds's `train[:90%]` / `train[90%:]`, so it is the same on every run and machine."""
    held_out = int(round(fraction * num_examples))
    if fraction and not 0 < held_out < num_examples:
        raise UserError(f"--validation-fraction {fraction} leaves no validation or no training examples "
                        f"of {num_examples}")
    return slice(0, num_examples - held_out), slice(num_examples - held_out, num_examples)


def epoch_permutation(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """Indices (steps, batch_size) of one shuffled epoch; the last partial batch is dropped."""
    steps = num_examples // batch_size
    return jax.random.permutation(key, num_examples)[: steps * batch_size].reshape(steps, batch_size)


def eval_batches(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and validity masks covering every example exactly once, the last batch padded."""
    steps = -(-num_examples // batch_size)
    flat = np.arange(steps * batch_size)
    mask = flat < num_examples
    return np.where(mask, flat, 0).reshape(steps, batch_size), mask.reshape(steps, batch_size)
