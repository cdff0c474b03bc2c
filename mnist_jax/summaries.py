"""TensorBoard event files of a run, in WORKDIR/tensorboard/: `tensorboard --logdir WORKDIR` shows them.

Process 0 writes them from the host values that go to metrics.jsonl (never from inside a jitted function), with
tensorboardX, which needs no TensorFlow. TensorBoard's step is the epoch. Each finished epoch is one event file:
its scalars, written after the epoch's checkpoint is saved. When the run ends, one more file holds the training
curves, the test confusion matrix and the hyperparameters (TensorBoard's HParams tab compares runs on them).

Every file is written into a staging folder and renamed into place whole, like the workdir's other files. A run that
starts or resumes first makes the folder match its checkpointed history (`sync`): it removes the files of epochs no
checkpoint holds any more and writes the epochs whose file a kill left unwritten. So the folder holds each epoch
exactly once, as metrics.jsonl does, whatever moment a run was killed at.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

TENSORBOARD_DIR = "tensorboard"
EPOCH_SUFFIX = ".epoch-"  # events.out.tfevents.<time>.<host>.epoch-00003: epoch 3's scalars
FINAL_SUFFIX = ".final"  # events.out.tfevents.<time>.<host>.final: the images and hyperparameters
STAGING_PREFIX = ".staging-"
NOT_SCALARS = ("epoch", "step", "elapsed_seconds")  # the step axis itself, and a clock that restarts on resume
METRICS = ("loss", "accuracy")


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, TENSORBOARD_DIR)


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: `test_accuracy` -> `accuracy/test`, so TensorBoard shows every
    split's accuracy in one section and every loss in another; other keys keep their name."""
    for metric in METRICS:
        if key.endswith("_" + metric):
            return f"{metric}/{key.removesuffix('_' + metric)}"
    return key


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """{tag: value} of one metrics.jsonl entry."""
    return {tag(key): float(value) for key, value in entry.items() if key not in NOT_SCALARS}


def hyperparameters(config: Any) -> dict[str, str | float | int | bool]:
    """A Config as HParams values: tuples (layer widths) become their flag text, e.g. "32,64"."""
    return {name: ",".join(map(str, value)) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(config).items()}


# ------------------------------------------------------------------------------------------------ writing
def _write_file(workdir: str, suffix: str, add: Callable[[Any], None]) -> None:
    """One event file: `add(writer)` writes it in a staging folder, then it is renamed into place complete."""
    from tensorboardX import SummaryWriter

    directory = tensorboard_dir(workdir)
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(dir=directory, prefix=STAGING_PREFIX)
    try:
        writer = SummaryWriter(logdir=staging, filename_suffix=suffix)
        add(writer)
        writer.close()
        (name,) = os.listdir(staging)
        with open(os.path.join(staging, name), "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_epoch(workdir: str, entry: dict[str, Any]) -> None:
    """The event file of one finished epoch: every scalar of its metrics.jsonl entry at step `epoch`."""
    def add(writer) -> None:
        for name, value in scalars(entry).items():
            writer.add_scalar(name, value, entry["epoch"])

    _write_file(workdir, f"{EPOCH_SUFFIX}{entry['epoch']:05d}", add)


def write_final(workdir: str, config: Any, history: list[dict[str, Any]], confusion_matrix: np.ndarray,
                class_names: list[str]) -> None:
    """The event file of a finished run: the curves and the test confusion matrix as images, and the
    hyperparameters with the run's loss and accuracy tags as HParams metrics, all at the last epoch."""
    from tensorboardX.summary import hparams

    from mnist_jax import plots

    epoch = history[-1]["epoch"]
    images = {"curves": plots.curves_figure(history),
              "confusion_matrix/test": plots.confusion_matrix_figure(confusion_matrix, class_names)}
    metrics = {name: value for name, value in scalars(history[-1]).items() if name.split("/")[0] in METRICS}

    def add(writer) -> None:
        for name, figure in images.items():
            writer.add_image(name, plots.figure_pixels(figure), epoch, dataformats="HWC")
        for summary in hparams(hyperparameters(config), metrics):
            writer.file_writer.add_summary(summary, epoch)

    _write_file(workdir, FINAL_SUFFIX, add)


# ------------------------------------------------------------------------------------------------ resuming
def _event_files(workdir: str) -> list[str]:
    directory = tensorboard_dir(workdir)
    return sorted(name for name in os.listdir(directory) if "tfevents" in name) if os.path.isdir(directory) else []


def written_epochs(workdir: str) -> list[int]:
    """The epochs whose event file is in place, in order."""
    return sorted(int(name.rpartition(EPOCH_SUFFIX)[2]) for name in _event_files(workdir) if EPOCH_SUFFIX in name)


def has_final(workdir: str) -> bool:
    return any(name.endswith(FINAL_SUFFIX) for name in _event_files(workdir))


def sync(workdir: str, history: list[dict[str, Any]], epochs: int) -> None:
    """Makes WORKDIR/tensorboard/ hold the epochs of `history` (the checkpointed one), each once.

    Removes staging folders a kill left behind, the files of epochs past `history` (their checkpoint failed to
    restore: they are trained again) and the final file of a history shorter than `epochs`; writes the file of every
    epoch of `history` that has none (a kill between its checkpoint and its event file).
    """
    directory = tensorboard_dir(workdir)
    if not os.path.isdir(directory):
        if not history:
            return
        os.makedirs(directory)
    trained = {entry["epoch"] for entry in history}
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif EPOCH_SUFFIX in name and int(name.rpartition(EPOCH_SUFFIX)[2]) not in trained:
            os.remove(path)
        elif name.endswith(FINAL_SUFFIX) and len(history) < epochs:
            os.remove(path)
    present = set(written_epochs(workdir))
    for entry in history:
        if entry["epoch"] not in present:
            write_epoch(workdir, entry)
