"""The workdir's files: config.json, metrics.jsonl, curves.png, checkpoints/; and which config a run in it uses.
Every write is atomic.

Writes go to a temporary file in the same directory followed by `os.replace`, so a run killed at any moment
leaves each file either as it was or complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

from mnist_jax.config import Config, UserError, incompatible_fields

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def write_atomic(path: str, data: str | bytes) -> None:
    """Replaces `path` with `data` in one step."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=directory, delete=False, prefix=".tmp-") as handle:
        try:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)


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
    if differing:
        details = ", ".join(f"{n}={getattr(saved, n)!r} (asked {getattr(effective, n)!r})" for n in differing)
        raise UserError(f"{workdir} holds a run with other settings: {details}; use a new --workdir")
    return saved
