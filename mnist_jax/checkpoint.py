"""Checkpoints: Orbax saves the whole training state each epoch; runs resume; models restore for inference.

A checkpoint holds two items: `state` (params, batch statistics, optimiser state, step, PRNG key, and the moving
average of the variables when the run keeps one) and `meta` (JSON: epoch, metrics history, normalisation constants,
class names, config). Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from mnist_jax.config import Config, UserError, one_line
from mnist_jax.model import build_model
from mnist_jax.steps import TrainState, model_variables
from mnist_jax.workdir import CHECKPOINT_DIR, QUARANTINE_DIR, not_a_run

class UnreadableCheckpoint(UserError):
    """A checkpoint that cannot be read, and the newest one of the same workdir that can (None: none can)."""

    def __init__(self, directory: str, step: int, reason: str, readable: int | None) -> None:
        self.step, self.readable = step, readable
        self.problem = f"checkpoint {step} in {directory} is unreadable ({reason})"
        hint = (f"the newest readable one is {readable}: pass --checkpoint {readable}" if readable is not None
                else "no other checkpoint in it is readable")
        super().__init__(f"{self.problem}; {hint}")


def failure_reason(error: BaseException) -> str:
    """Why a checkpoint could not be read, as one whole line: the first line of the root cause (TensorStore's
    names the file and the fault, where its wrapper adds a many-line spec), shortened only at a word boundary."""
    while error.__cause__ is not None:
        error = error.__cause__
    name, text = type(error).__name__, one_line(str(error))
    return (text if name in ("Exception", "ValueError") else f"{name}: {text}") if text else name


def selection_metric(metrics: dict[str, Any]) -> float:
    """What "best" means: the highest validation accuracy when the run holds out a validation slice. Without one
    there is no honest way to choose (picking on test would leak the test set into the result), so "best" is
    then the latest epoch."""
    if "validation_accuracy" in metrics:
        return metrics["validation_accuracy"]
    return float(metrics.get("epoch", 0))


def open_manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager keeping the last `keep` checkpoints plus the best one by `selection_metric`."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=selection_metric, n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=False,
    )
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)


def _state_tree(state: TrainState) -> dict[str, Any]:
    tree = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }
    if state.ema is not None:  # only then: checkpoints of runs without it keep their layout
        tree["ema"] = state.ema
    return tree


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir holds any saved step (read from the directory listing: nothing is created)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Saves the state under its step number, with the latest epoch's metrics for best-checkpoint tracking."""
    step = int(state.step)
    # Saved as host arrays, without the device layout: a run trained on two devices restores on one, and back.
    tree = jax.device_get(_state_tree(state))
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        metrics=meta["history"][-1],
    )
    manager.wait_until_finished()


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Any:
    """The saved state's tree of array metadata (shapes and dtypes), read without reading the arrays."""
    path = os.path.join(manager.directory, str(step), "state")
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
    if metadata is None:  # Orbax reports a metadata file it cannot parse as none at all
        raise ValueError(f"the array metadata in {path} cannot be read")
    return metadata.tree


def _restore_step(manager: ocp.CheckpointManager, step: int, target: TrainState | None,
                  placement: jax.sharding.Sharding | None = None):
    """(state tree, meta) of one checkpoint, laid out like `target`'s state (on `placement` when given: each
    process reads and places only its own devices' part), or without a target on this process's first device (a
    checkpoint written on any device topology, by any number of processes, then loads for inference here)."""
    meta = read_meta(manager, step)
    if target is not None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_tree(target))
        if placement is not None:
            abstract = jax.tree_util.tree_map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement)
                if isinstance(leaf, jax.ShapeDtypeStruct) else leaf, abstract)  # a Python int (step) stays one
    else:
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device),
            _saved_tree(manager, step))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return state, meta


def restore_latest(workdir: str, manager: ocp.CheckpointManager, target: TrainState,
                   placement: jax.sharding.Sharding | None = None):
    """(state, meta) from the newest readable checkpoint, or None when there is none; its arrays on `placement`
    (default: where `target`'s are).

    A checkpoint that fails to restore is moved aside to `checkpoints-corrupt/` (never deleted) with a warning,
    and the previous one is tried: the run continues from the last good epoch instead of crashing or silently
    starting over.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            tree, meta = _restore_step(manager, step, target, placement)
        except Exception as error:  # noqa: BLE001 -- any failure to read means this checkpoint is unusable.
            _quarantine(workdir, manager, step, error)
            continue
        state = target.replace(
            step=tree["step"],
            params=tree["params"],
            batch_stats=tree["batch_stats"],
            opt_state=tree["opt_state"],
            rng=tree["rng"],
            ema=tree.get("ema"),
        )
        return state, meta
    return None


def _quarantine(workdir: str, manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    source = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    destination = os.path.join(workdir, QUARANTINE_DIR, f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    shutil.move(source, destination)
    manager.reload()
    print(f"warning: checkpoint {step} is unreadable ({failure_reason(error)}); moved to {destination}",
          file=sys.stderr)


def unreadable(manager: ocp.CheckpointManager, step: int, error: Exception, directory: str) -> UnreadableCheckpoint:
    """The error of a reading tool (evaluate, predict, serve, export) for a checkpoint of `directory` that fails to
    restore. They read and never move anything, so they name the newest checkpoint that restores rather than use it
    unasked: `--checkpoint best` on a corrupt newest one must not quietly become another model."""
    for other in sorted(manager.all_steps(), reverse=True):
        if other == step:
            continue
        try:
            _restore_step(manager, other, target=None)
        except Exception:  # noqa: BLE001
            continue
        return UnreadableCheckpoint(directory, step, failure_reason(error), other)
    return UnreadableCheckpoint(directory, step, failure_reason(error), None)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON half of a checkpoint, without reading its arrays."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def resolve_step(manager: ocp.CheckpointManager, which: str) -> int:
    """'latest', 'best' (by `selection_metric` over the checkpoints on disk) or an explicit step number."""
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"no checkpoints in {manager.directory}")
    if which == "latest":
        return max(steps)
    if which == "best":
        history = read_meta(manager, max(steps))["history"]
        scored = [(selection_metric(entry), entry["step"]) for entry in history if entry.get("step") in steps]
        return max(scored)[1] if scored else max(steps)
    if which.isdigit() and int(which) in steps:
        return int(which)
    raise UserError(f"--checkpoint must be best, latest or one of the saved steps {sorted(steps)}, got {which!r}")


@dataclasses.dataclass(frozen=True)
class RestoredModel:
    """A trained model ready for inference: `module.apply(variables, uint8_images)` gives logits."""

    module: nn.Module
    variables: dict[str, Any]
    config: Config
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]
    step: int
    workdir: str = ""


def restore_model(workdir: str, checkpoint: str = "best") -> RestoredModel:
    """Restores the model (module, variables, config) of a workdir's checkpoint for evaluation or prediction."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise UserError(not_a_run(workdir) or f"no checkpoints found: {directory} does not exist (train with "
                        f"--workdir {workdir} first)")
    manager = open_manager(workdir, read_only=True)
    step = max(manager.all_steps(), default=0)  # "best" reads the newest one's history first
    try:
        step = resolve_step(manager, checkpoint)
        tree, meta = _restore_step(manager, step, target=None)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 -- any failure to read means this checkpoint is unusable.
        raise unreadable(manager, step, error, directory) from None
    config = Config.from_dict(meta["config"])
    module = build_model(config, len(meta["class_names"]), meta["mean"], meta["std"])
    # The moving average, when kept, is the run's model: what it evaluated and chose "best" on.
    variables = tree["ema"] if "ema" in tree else model_variables(tree["params"], tree.get("batch_stats"))
    return RestoredModel(
        module=module,
        variables=variables,
        config=config,
        class_names=tuple(meta["class_names"]),
        image_shape=tuple(meta["image_shape"]),
        step=step,
        workdir=workdir,
    )
