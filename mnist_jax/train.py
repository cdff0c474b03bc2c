"""Training: `python -m mnist_jax.train --workdir DIR [flags]`, and the library function behind it.

Top to bottom: data (on device) -> model -> train state -> per-epoch loop of jitted steps -> evaluation ->
checkpoint -> metrics.jsonl. The steps themselves live in `steps.py`. Running the same command again on the
same workdir resumes from the latest checkpoint and reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

if __name__ == "__main__":  # glibc reads its malloc tunables at start-up: restart now, before the heavy imports
    from mnist_jax.hostmem import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from mnist_jax import checkpoint, data, inference, sharding, steps, workdir
from mnist_jax.cli import ArgumentParser, add_config_flags, add_preset_flag, config_from_args, given_fields, run_cli
from mnist_jax.config import Config, UserError, incompatible_fields, validate
from mnist_jax.augment import Augmentation, deskew, random_warp
from mnist_jax.model import build_model
from mnist_jax.optim import learning_rate_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run, as opposed to what to train: none of it changes the results (beyond float tolerance)."""

    workdir: str
    data_dir: str | None = None
    devices: int | None = None  # None: every device JAX sees
    progress: bool = True
    plots: bool = True
    # Initial state of a fresh run, given the freshly initialised state and the data (transfer learning sets it).
    # Called only when no checkpoint exists: a resumed run's initial values come from its own checkpoints.
    init_params: Callable[[steps.TrainState, data.Dataset], steps.TrainState] | None = None


def resolve_config(workdir_path: str, requested: Config, given_fields: set[str]) -> Config:
    """The config to run: the workdir's saved one when resuming (flags must then agree with it), else `requested`."""
    saved = workdir.read_config(workdir_path)
    if saved is None:
        return requested
    effective = dataclasses.replace(saved, **{name: getattr(requested, name) for name in given_fields})
    differing = incompatible_fields(saved, effective)
    if differing:
        details = ", ".join(f"{n}={getattr(saved, n)!r} (asked {getattr(effective, n)!r})" for n in differing)
        raise UserError(f"{workdir_path} holds a run with other settings: {details}; use a new --workdir")
    return saved


def evaluate_split(state: steps.TrainState, split: data.Split, batch_size: int, mesh) -> dict[str, float]:
    """Mean loss and accuracy over every example of a split (the last batch padded and masked)."""
    indices, masks = data.eval_batches(int(split.labels.shape[0]), batch_size)
    batch_sharding, lockstep = sharding.batch_sharded(mesh), sharding.needs_lockstep(mesh)
    totals = []
    for idx, mask in zip(indices, masks):
        idx = jax.device_put(idx, batch_sharding)
        totals.append(steps.eval_step(state, steps.take_batch(split, idx), jax.device_put(mask, batch_sharding)))
        if lockstep:
            jax.block_until_ready(totals[-1])
    totals = jax.device_get(totals)
    count = sum(float(t["count"]) for t in totals)
    return {
        "loss": sum(float(t["loss"]) for t in totals) / count,
        "accuracy": sum(float(t["correct"]) for t in totals) / count,
    }


def evaluate_split_tta(model, state: steps.TrainState, split: data.Split, num_classes: int) -> dict[str, float]:
    """Loss and accuracy of the predictions averaged over `augment.TEST_TIME_VIEWS`, by the jitted function that
    `evaluate --tta` uses, so both print the same figure for the same weights."""
    def host(array: jax.Array) -> np.ndarray:  # replicated: each device holds all of it, on every host
        return np.asarray(array.addressable_data(0))

    predict = inference.predict_fn_for([model], [jax.tree_util.tree_map(host, state.variables())],
                                       tuple(split.images.shape[1:]), num_classes, test_time_augmentation=True)
    labels = host(split.labels)
    probabilities = predict(host(split.images))
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    return {"loss": float(-np.log(np.maximum(picked, np.finfo(np.float32).tiny)).mean()),
            "accuracy": float(np.mean(probabilities.argmax(axis=-1) == labels))}


def _log_epoch(entry: dict[str, Any], epochs: int) -> None:
    print(
        f"epoch {entry['epoch']}/{epochs}  "
        f"train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.2%}  "
        + (f"val loss {entry['validation_loss']:.4f} acc {entry['validation_accuracy']:.2%}  "
           if "validation_accuracy" in entry else "")
        + f"test loss {entry['test_loss']:.4f} acc {entry['test_accuracy']:.2%}  "
        f"{entry['train_images_per_second']:,.0f} img/s  {entry['elapsed_seconds']:.1f} s",
        flush=True,
    )


def train_and_evaluate(config: Config, options: RunOptions, started: float | None = None) -> list[dict[str, Any]]:
    """Trains (or resumes) the run described by `config` in `options.workdir`; returns the metrics history."""
    started = time.time() if started is None else started
    validate(config)
    mesh = sharding.make_mesh(options.devices, config.batch_size, config.eval_batch_size)
    sharding.check_divisible(config.batch_size, mesh)
    sharding.check_divisible(config.eval_batch_size, mesh, "--eval-batch-size")
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    dataset = data.load_dataset(config.dataset, options.data_dir, replicated, config.train_examples, config.seed,
                                config.validation_fraction)
    num_train = int(dataset.train.labels.shape[0])
    if config.batch_size > num_train:
        raise UserError(f"--batch-size {config.batch_size} is larger than the training split ({num_train} examples)")
    steps_per_epoch = num_train // config.batch_size

    model = build_model(config, dataset.num_classes, dataset.mean, dataset.std)
    tx = make_optimizer(config, steps_per_epoch)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state = steps.create_train_state(model, tx, init_key, dataset.image_shape, config.ema_decay,
                                     config.label_smoothing)

    primary = sharding.is_primary_process()
    if primary:
        workdir.write_config(options.workdir, config)
        if options.plots and model.augment.enabled:
            _plot_augmentations(options.workdir, dataset, model, jax.random.fold_in(shuffle_key, 0))
    manager = checkpoint.open_manager(options.workdir, keep=config.keep_checkpoints)
    history: list[dict[str, Any]] = []
    restored = checkpoint.restore_latest(options.workdir, manager, state)
    if restored is not None:
        state, meta = restored
        history = meta["history"]
        print(f"resumed from {options.workdir} at epoch {meta['epoch']} (step {int(state.step)})", flush=True)
    elif options.init_params is not None:
        state = options.init_params(state, dataset)
    if primary:
        workdir.write_metrics(options.workdir, history)  # Drops any line written after the last checkpoint.
    if len(history) >= config.epochs:
        print(f"run complete: {config.epochs} epochs already trained in {options.workdir}", flush=True)
        manager.close()
        return history

    state = jax.device_put(state, replicated)
    on_device = steps.uses_on_device_epoch(jax.default_backend())
    lockstep = sharding.needs_lockstep(mesh)
    take = jax.jit(steps.take_batch, out_shardings=batch_sharding)
    meta_base = {
        "config": dataclasses.asdict(config),
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "mean": dataset.mean,
        "std": dataset.std,
    }
    if not on_device:  # steps.train_step, compiled once with this backend's XLA options
        example_batch = take(dataset.train, np.arange(config.batch_size))
        train_fn = steps.compile_for_backend(steps.train_step, state, example_batch)
    augmenting = model.augment.enabled
    for epoch in range(len(history) + 1, config.epochs + 1):
        if augmenting and epoch > config.epochs - config.clean_final_epochs:
            # The last epochs see images as evaluation does, so weights and batch-norm statistics settle on them.
            augmenting = False
            state = state.replace(apply_fn=model.clone(augment=Augmentation()).apply)
            if not on_device:
                train_fn = steps.compile_for_backend(steps.train_step, state, example_batch)
        permutation = data.epoch_permutation(jax.random.fold_in(shuffle_key, epoch), num_train, config.batch_size)
        if not on_device:
            permutation = np.asarray(permutation)  # rows go to the device with each step: no slicing dispatch
        epoch_start = time.time()
        if on_device:
            state, step_metrics = steps.train_epoch_on_device(state, dataset.train, permutation)
        else:
            step_metrics = []
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", leave=False,
                       disable=not options.progress, unit="step", file=sys.stderr, mininterval=1.0)
            for i in bar:
                state, metrics = train_fn(state, take(dataset.train, permutation[i]))
                step_metrics.append(metrics)
                if lockstep:
                    jax.block_until_ready(metrics)
        step_metrics = jax.device_get(step_metrics)
        train_seconds = time.time() - epoch_start
        test = evaluate_split(state, dataset.test, config.eval_batch_size, mesh)
        held_out = {}
        if dataset.validation is not None:  # the best checkpoint is then chosen on it, never on test
            validation = evaluate_split(state, dataset.validation, config.eval_batch_size, mesh)
            held_out = {"validation_loss": validation["loss"], "validation_accuracy": validation["accuracy"]}
        with_tta = {}
        if epoch == config.epochs and config.final_tta:  # once, on the finished model: 11 evaluations' cost
            for name, split in (("test", dataset.test), ("validation", dataset.validation)):
                if split is not None:
                    tta = evaluate_split_tta(model, state, split, dataset.num_classes)
                    with_tta.update({f"{name}_tta_loss": tta["loss"], f"{name}_tta_accuracy": tta["accuracy"]})
        entry = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": float(np.mean(_field(step_metrics, "loss"))),
            "train_accuracy": float(np.mean(_field(step_metrics, "accuracy"))),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            **held_out,
            **with_tta,
            "learning_rate": float(schedule(int(state.step) - 1)),
            "train_images_per_second": steps_per_epoch * config.batch_size / train_seconds,
            "elapsed_seconds": time.time() - started,
        }
        history.append(entry)
        checkpoint.save(manager, state, {**meta_base, "epoch": epoch, "history": history})
        if primary:
            workdir.write_metrics(options.workdir, history)
            if options.plots:
                _plot_curves(options.workdir, history)
            _log_epoch(entry, config.epochs)
    manager.close()
    return history


def _field(step_metrics, name: str) -> np.ndarray:
    """Per-step values of one metric, whether the epoch ran per step (a list) or as a scan (stacked arrays)."""
    if isinstance(step_metrics, dict):
        return np.asarray(step_metrics[name])
    return np.asarray([m[name] for m in step_metrics])


def _plot_augmentations(workdir_path: str, dataset: data.Dataset, model, key: jax.Array) -> None:
    """DIR/augmentations.png: eight training images and three random augmentations of each, deskewed where the
    model deskews (its first layer sees them so)."""
    from mnist_jax.plots import plot_augmentations

    originals = np.asarray(dataset.train.images[:8])
    straighten = deskew if model.deskew else (lambda images: images)
    versions = [np.asarray(straighten(random_warp(k, originals, model.augment))).round().astype(np.uint8)
                for k in jax.random.split(key, 3)]
    plot_augmentations(originals, np.stack(versions), os.path.join(workdir_path, "augmentations.png"))


def _plot_curves(workdir_path: str, history: list[dict[str, Any]]) -> None:
    from mnist_jax.plots import plot_curves

    plot_curves(history, os.path.join(workdir_path, workdir.CURVES_FILE))


def build_parser(prog: str, description: str, epilog: str) -> ArgumentParser:
    """The training flags (run options plus one flag per Config field), shared by `train` and `transfer`."""
    parser = ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--workdir", required=True, help="run directory: config, metrics, checkpoints, plots")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR, else tfds's default)")
    parser.add_argument("--devices", type=int,
                        help="devices to split each batch over (default: all JAX sees; on CPU, one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per epoch)")
    add_preset_flag(parser)
    add_config_flags(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser(
        prog="python -m mnist_jax.train",
        description="Train the CNN on a tfds image dataset; running it again on the same --workdir resumes.",
        epilog="example: python -m mnist_jax.train --workdir runs/mnist --data-dir ../shared/tensorflow_datasets",
    ).parse_args(argv)


def run_options(args: argparse.Namespace) -> RunOptions:
    """The RunOptions the shared flags describe."""
    return RunOptions(workdir=args.workdir, data_dir=args.data_dir, devices=args.devices,
                      progress=not args.no_progress)


def report_final(history: list[dict[str, Any]], started: float, workdir_path: str) -> None:
    if history:
        last = history[-1]
        tta = (f", {last['test_tta_accuracy']:.2%} with test-time augmentation" if "test_tta_accuracy" in last
               else "")
        print(f"final test accuracy {last['test_accuracy']:.2%}{tta} "
              f"({time.time() - started:.1f} s) -> {workdir_path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    sharding.use_every_cpu_core()
    given = given_fields(args)
    if sharding.initialize_distributed():
        print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices", flush=True)
    requested = config_from_args(args)
    validate(requested)  # Bad values are reported as such, even when the workdir holds another run.
    config = resolve_config(args.workdir, requested, given)
    options = run_options(args)
    if config.transfer_from:  # a transfer run resumed (or restarted before its first checkpoint) by `train`
        from mnist_jax.transfer import initializer

        options = dataclasses.replace(options, init_params=initializer(config.transfer_from))
    report_final(train_and_evaluate(config, options, started), started, args.workdir)
    return 0


if __name__ == "__main__":
    run_cli(main)
