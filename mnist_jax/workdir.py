"""The workdir's files: config.json, metrics.jsonl, curves.png, checkpoints/; which config a run in it uses; and
the folders that are not a run but are mistaken for one (a run's checkpoints/, a sweep). Every write is atomic.

Writes go to a temporary file in the same directory followed by `os.replace`, so a run killed at any moment
leaves each file either as it was or complete. The temporary file is created as `open` creates files, so what
lands in the workdir has the user's umask like any other program's output (`tempfile`'s are private, 0600).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import secrets
import shlex
from typing import IO, Any, Iterator

from mnist_jax.config import Config, UserError, changed_flags, incompatible_fields, plural

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints-corrupt"
SWEEP_PLAN_FILE = "study.json"  # a sweep's folder: the study it holds (mnist_jax.tuning), results.csv, a run per trial
SWEEP_RESULTS_FILE = "results.csv"
NAMES_SHOWN = 4  # runs a hint names before "and N more"


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False) -> Iterator[IO]:
    """A new file that replaces `path` in one step when the block ends, or vanishes when it raises."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    while True:
        temporary = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
        try:  # 0o666 less the umask, as open() makes files; O_EXCL: never another writer's temporary file
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(descriptor, "wb" if binary else "w") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomic(path: str, data: str | bytes) -> None:
    """Replaces `path` with `data` in one step."""
    with atomic_file(path, binary=isinstance(data, bytes)) as handle:
        handle.write(data)


def read_config(workdir: str) -> Config | None:
    """The config a workdir was started with, or None for a new workdir."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return Config.from_dict(json.load(handle))
    except (ValueError, TypeError) as error:
        raise UserError(f"{path} is not a valid config ({error}); use a new --workdir")


def write_config(workdir: str, config: Config) -> None:
    write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json())


def write_metrics(workdir: str, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl: one JSON object per finished epoch, rewritten from the checkpointed history."""
    lines = "".join(json.dumps(entry) + "\n" for entry in history)
    write_atomic(os.path.join(workdir, METRICS_FILE), lines)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def resolve_config(workdir: str, requested: Config, chosen: set[str]) -> Config:
    """The config to run in `workdir`: its saved one when resuming, else `requested`.

    `chosen` names the fields the user set: on a resume each must agree with the saved value (the others are taken
    from it), so a resumed run never silently continues with other settings.
    """
    saved = read_config(workdir)
    if saved is None:
        return requested
    effective = dataclasses.replace(saved, **{name: getattr(requested, name) for name in chosen})
    differing = incompatible_fields(saved, effective)
    if differing == ["epochs"] and effective.epochs > saved.epochs:
        raise UserError(f"{workdir} holds a run of {plural(saved.epochs, 'epoch')}, the length its learning-rate "
                        f"schedule was made for, so it cannot be trained longer in place; to train on, start a new "
                        f"run from its best weights on a new schedule of {plural(effective.epochs, 'epoch')}: "
                        f"{continue_command(workdir, saved, effective.epochs)}")
    if differing:
        details = ", ".join(f"{n}={getattr(saved, n)!r} (asked {getattr(effective, n)!r})" for n in differing)
        raise UserError(f"{workdir} holds a run with other settings: {details}; use a new --workdir")
    return saved


def continue_command(workdir: str, saved: Config, epochs: int) -> str:
    """The transfer command that trains a run further: a new run from its best checkpoint (its architecture and
    weights; a fresh optimiser state) on a new schedule of `epochs`, with every other training setting of the run
    that differs from the default spelt out (add --data-dir where the data needs it)."""
    def carried(field: dataclasses.Field) -> bool:  # the run's training settings (freeze: transfer's own flag)
        metadata = field.metadata
        return field.name != "epochs" and not metadata["architecture"] and (metadata["flag"] or field.name == "freeze")

    flags = ["--epochs", str(epochs), *changed_flags(saved, carried)]
    target = os.path.normpath(workdir) + "-more"
    return (f"python -m mnist_jax.transfer --from {shlex.quote(os.path.normpath(workdir))} "
            f"--workdir {shlex.quote(target)} {shlex.join(flags)}")


# --------------------------------------------------------------------------------------------- not a run
def enclosing_run(path: str) -> str | None:
    """The run whose checkpoints (or quarantined checkpoints) `path` is or lies in, else None."""
    path = os.path.normpath(path)
    while os.path.basename(path) not in ("", os.curdir, os.pardir):
        parent = os.path.dirname(path) or os.curdir
        if os.path.basename(path) in (CHECKPOINT_DIR, QUARANTINE_DIR) and os.path.isfile(
                os.path.join(parent, CONFIG_FILE)):
            return parent
        path = parent
    return None


def runs_inside(path: str) -> list[str]:
    """The runs (folders with checkpoints/) directly inside `path`, by name."""
    if not os.path.isdir(path):
        return []
    with os.scandir(path) as entries:
        return sorted(os.path.join(path, entry.name) for entry in entries
                      if entry.is_dir() and os.path.isdir(os.path.join(entry.path, CHECKPOINT_DIR)))


def best_trial(sweep_dir: str) -> str | None:
    """The trial a sweep ranks first (the first row of its results.csv), or None before it has results."""
    try:
        with open(os.path.join(sweep_dir, SWEEP_RESULTS_FILE), newline="") as handle:
            first = next(csv.DictReader(handle), None)
    except (OSError, csv.Error):
        return None
    trial = (first or {}).get("trial")
    return os.path.join(sweep_dir, trial) if trial and os.path.isdir(os.path.join(sweep_dir, trial)) else None


def not_a_run(path: str) -> str | None:
    """What `path` is when a reading tool finds no checkpoints in it but it is a slip for a run nearby: a run's
    checkpoints folder, a sweep, or a folder of runs; None otherwise."""
    run = enclosing_run(path)
    if run is not None:
        return f"{path} is inside the checkpoints of the run {run}: use {run}"
    runs = runs_inside(path)
    if not runs:
        return None
    names = [os.path.basename(run) for run in runs]
    listed = ", ".join(names[:NAMES_SHOWN]) + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN
                                               else "")
    if os.path.isfile(os.path.join(path, SWEEP_PLAN_FILE)):
        best = best_trial(path)
        pick = f"{best} (the best on validation)" if best else os.path.join(path, names[0])
        return f"{path} is a sweep, not a run: use one of its trials ({listed}), e.g. {pick}"
    return f"{path} holds no run of its own but {len(runs)} in its folders ({listed}): use one of them"


def check_trainable(path: str) -> None:
    """Refuses to train in a run's checkpoints or in a sweep's own folder: either would mix a new run into
    another's files."""
    run = enclosing_run(path)
    if run is not None:
        raise UserError(f"--workdir {path} is inside the checkpoints of the run {run}; give the new run a folder "
                        "of its own")
    if os.path.isfile(os.path.join(path, SWEEP_PLAN_FILE)):
        raise UserError(f"--workdir {path} is a sweep's folder (it holds {SWEEP_PLAN_FILE}); its trials train with "
                        "python -m mnist_jax.sweep: give the new run a folder of its own")
