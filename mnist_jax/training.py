"""Training: `train_and_evaluate`, the loop behind `python -m mnist_jax.train`, `transfer` and `sweep`.

Top to bottom: data (on device) -> model -> train state -> per-epoch loop of jitted steps -> evaluation ->
checkpoint -> metrics.jsonl, curves.png and TensorBoard's event files (`summaries`). The steps live in `steps.py`;
how this platform runs them, in `backend.py`. Training the same config again in the same workdir resumes from the
latest checkpoint and reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from mnist_jax import backend, checkpoint, data, inference, metrics, sharding, steps, summaries, workdir
from mnist_jax.distributed import runlock
from mnist_jax.augment import Augmentation, deskew, random_warp, training_augmentation
from mnist_jax.config import Config, RunOptions, UserError, plural, validate
from mnist_jax.model import CNN, build_model
from mnist_jax.optim import learning_rate_schedule, make_optimizer


def train_and_evaluate(config: Config, options: RunOptions, started: float | None = None) -> list[dict[str, Any]]:
    """Trains (or resumes) the run described by `config` in `options.workdir`; returns the metrics history."""
    started = time.time() if started is None else started
    validate(config)
    mesh = sharding.make_mesh(options.devices, config.batch_size, config.eval_batch_size)
    sharding.check_divisible(config.batch_size, mesh)
    sharding.check_divisible(config.eval_batch_size, mesh, "--eval-batch-size")

    workdir.check_trainable(options.workdir)
    if jax.process_count() == 1:  # a busy workdir fails at once, before the data loads
        runlock.check_free(options.workdir)
    dataset = data.load_dataset(config.dataset, options.data_dir, sharding.replicated(mesh), config.train_examples,
                                config.seed, config.validation_fraction)
    num_train = int(dataset.train.labels.shape[0])
    if config.batch_size > num_train:
        raise UserError(f"--batch-size {config.batch_size} is larger than the training split ({num_train} examples)")
    with runlock.held(options.workdir):  # before the first write to the workdir, until the run ends
        return _train(config, options, started, mesh, dataset)


def _train(config: Config, options: RunOptions, started: float, mesh, dataset: data.Dataset
           ) -> list[dict[str, Any]]:
    """`train_and_evaluate` once its inputs are checked and the workdir is this run's."""
    num_train = int(dataset.train.labels.shape[0])
    steps_per_epoch = num_train // config.batch_size
    model = build_model(config, dataset.num_classes, dataset.mean, dataset.std)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state = steps.create_train_state(model, make_optimizer(config, steps_per_epoch), init_key, dataset.image_shape,
                                     moving_average=config.ema_decay > 0)
    augmentation = training_augmentation(config)

    primary = sharding.is_primary_process()
    if primary:
        workdir.write_config(options.workdir, config)
        if options.plots and augmentation.enabled:
            _plot_augmentations(options.workdir, dataset, model, augmentation, jax.random.fold_in(shuffle_key, 0))
    manager = checkpoint.open_manager(options.workdir, keep=config.keep_checkpoints)
    history: list[dict[str, Any]] = []
    restored = checkpoint.restore_latest(options.workdir, manager, state, sharding.replicated(mesh))
    if restored is not None:
        state, meta = restored
        history = meta["history"]
        print(f"resumed from {options.workdir} at epoch {meta['epoch']} (step {int(state.step)})", flush=True)
    elif options.initial_state is not None:
        state = options.initial_state(state, dataset)
    if primary:
        workdir.write_metrics(options.workdir, history)  # Drops any line written after the last checkpoint.
        if options.tensorboard:  # Each checkpointed epoch once, whenever the last run was killed.
            summaries.sync(options.workdir, history, config.epochs)
    if len(history) >= config.epochs:
        if primary and options.tensorboard and not summaries.has_final(options.workdir):
            _write_final_summary(options.workdir, config, history, model, state, dataset)
        print(f"run complete: {plural(config.epochs, 'epoch')} already trained in {options.workdir}", flush=True)
        manager.close()
        return history
    if history and options.after_epoch is not None and options.after_epoch(history):
        manager.close()  # the caller's verdict on the epochs restored: a sweep's pruned trial stays pruned
        return history

    state = sharding.place_replicated(state, mesh)
    meta_base = {
        "config": dataclasses.asdict(config),
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "mean": dataset.mean,
        "std": dataset.std,
    }
    # Two steps from one config: augmented, then, for the last --clean-final-epochs, on images as evaluation sees
    # them, so the weights and batch-norm statistics settle on those. Each is compiled when first needed.
    last_augmented_epoch = config.epochs - config.clean_final_epochs if augmentation.enabled else 0
    runners: dict[bool, backend.EpochRunner] = {}
    for epoch in range(len(history) + 1, config.epochs + 1):
        augment = epoch <= last_augmented_epoch
        if augment not in runners:
            runners[augment] = backend.EpochRunner(steps.make_train_step(config, augment), state, dataset.train,
                                                   config.batch_size, mesh, options.progress)
        permutation = data.epoch_permutation(jax.random.fold_in(shuffle_key, epoch), num_train, config.batch_size)
        epoch_start = time.time()
        state, step_metrics = runners[augment].run(state, dataset.train, permutation, f"epoch {epoch}/{config.epochs}")
        train_seconds = time.time() - epoch_start

        test = evaluate_split(state, dataset.test, config.eval_batch_size, mesh)
        held_out = {}
        if dataset.validation is not None:  # the best checkpoint is then chosen on it, never on test
            validation = evaluate_split(state, dataset.validation, config.eval_batch_size, mesh)
            held_out = {"validation_loss": validation["loss"], "validation_accuracy": validation["accuracy"]}
        with_tta = {}
        if epoch == config.epochs and config.final_tta:  # once, on the finished model: many evaluations' cost
            for name, split in (("test", dataset.test), ("validation", dataset.validation)):
                if split is not None:
                    tta = evaluate_split_tta(model, state, split, dataset.num_classes)
                    with_tta.update({f"{name}_tta_loss": tta["loss"], f"{name}_tta_accuracy": tta["accuracy"]})
        entry = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": float(np.mean(step_metrics["loss"])),
            "train_accuracy": float(np.mean(step_metrics["accuracy"])),
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
            if options.tensorboard:  # after the checkpoint: a kill in between leaves the epoch to `sync`
                summaries.write_epoch(options.workdir, entry)
                if epoch == config.epochs:
                    _write_final_summary(options.workdir, config, history, model, state, dataset)
            _log_epoch(entry, config.epochs)
        if options.after_epoch is not None and options.after_epoch(history):
            break
    manager.close()
    return history


def evaluate_split(state: steps.TrainState, split: data.Split, batch_size: int, mesh) -> dict[str, float]:
    """Mean loss and accuracy over every example of a split (the last batch padded and masked)."""
    indices, masks = data.eval_batches(int(split.labels.shape[0]), batch_size)
    batch_sharding, settle = sharding.batch_sharded(mesh), backend.settle(mesh)
    totals = []
    for idx, mask in zip(indices, masks):
        batch = steps.take_batch(split, jax.device_put(idx, batch_sharding))
        totals.append(settle(steps.eval_step(state, batch, jax.device_put(mask, batch_sharding))))
    totals = jax.device_get(totals)
    count = sum(float(t["count"]) for t in totals)
    return {
        "loss": sum(float(t["loss"]) for t in totals) / count,
        "accuracy": sum(float(t["correct"]) for t in totals) / count,
    }


def evaluate_split_tta(model: CNN, state: steps.TrainState, split: data.Split, num_classes: int) -> dict[str, float]:
    """Loss and accuracy of the predictions averaged over `augment.TEST_TIME_VIEWS`, by the jitted function that
    `evaluate --tta` uses, so both print the same figure for the same weights."""
    predict = inference.predict_fn_for([model], [_host_variables(state)],
                                       tuple(split.images.shape[1:]), num_classes, test_time_augmentation=True)
    labels = _on_host(split.labels)
    probabilities = predict(_on_host(split.images))
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    return {"loss": float(-np.log(np.maximum(picked, np.finfo(np.float32).tiny)).mean()),
            "accuracy": float(np.mean(probabilities.argmax(axis=-1) == labels))}


def _on_host(array: jax.Array) -> np.ndarray:
    """This process's copy of a replicated array (each device holds all of it, on every host): no collective."""
    return np.asarray(array.addressable_data(0))


def _host_variables(state: steps.TrainState) -> dict[str, Any]:
    """The model's variables as this process's copy: evaluation on one device."""
    return jax.tree_util.tree_map(_on_host, state.variables())


def _write_final_summary(workdir_path: str, config: Config, history: list[dict[str, Any]], model: CNN,
                         state: steps.TrainState, dataset: data.Dataset) -> None:
    """The finished run's TensorBoard images and hyperparameters, with the test split's confusion matrix."""
    predict = inference.predict_fn_for([model], [_host_variables(state)], dataset.image_shape, dataset.num_classes,
                                       config.eval_batch_size)
    labels = _on_host(dataset.test.labels)
    predictions = predict(_on_host(dataset.test.images)).argmax(axis=-1)
    matrix = np.asarray(metrics.confusion_matrix(labels, predictions, dataset.num_classes))
    summaries.write_final(workdir_path, config, history, matrix, list(dataset.class_names))


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


def _plot_augmentations(workdir_path: str, dataset: data.Dataset, model: CNN, augmentation: Augmentation,
                        key: jax.Array) -> None:
    """DIR/augmentations.png: eight training images and three random augmentations of each, deskewed where the
    model deskews (its first layer sees them so)."""
    from mnist_jax.plots import plot_augmentations

    originals = np.asarray(dataset.train.images.addressable_data(0)[:8])  # this process's copy: no collective
    straighten = deskew if model.deskew else (lambda images: images)
    versions = [np.asarray(straighten(random_warp(k, originals, augmentation))).round().astype(np.uint8)
                for k in jax.random.split(key, 3)]
    plot_augmentations(originals, np.stack(versions), os.path.join(workdir_path, "augmentations.png"))


def _plot_curves(workdir_path: str, history: list[dict[str, Any]]) -> None:
    from mnist_jax.plots import plot_curves

    plot_curves(history, os.path.join(workdir_path, workdir.CURVES_FILE))
