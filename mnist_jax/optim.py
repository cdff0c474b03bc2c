"""Optimiser and learning-rate schedule by name, from the config."""

from __future__ import annotations

import jax
import optax

from mnist_jax.config import Config
from mnist_jax.model import is_feature_layer


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """The schedule named by `config.schedule`, over the whole run (epochs * steps_per_epoch steps)."""
    total = config.epochs * steps_per_epoch
    peak = config.learning_rate
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        return optax.constant_schedule(peak)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(peak, decay_steps=total)
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=warmup, decay_steps=total)
    if config.schedule == "one_cycle":
        # Rises for warmup_epochs, then anneals to ~0: the default recipe's schedule.
        return optax.cosine_onecycle_schedule(total, peak, pct_start=max(warmup, 1) / total)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimiser named by `config.optimizer`, driven by the configured schedule, with `config.freeze` applied.

    `--freeze features` freezes the convolutional layers (`model.is_feature_layer`): they get
    `optax.set_to_zero()`, so their updates are exactly zero (no weight decay either), they stay bit-identical, and
    their optimiser state is empty.
    """
    tx = _base_optimizer(config, steps_per_epoch)
    if config.freeze == "none":
        return tx

    def labels(params):
        return {name: jax.tree_util.tree_map(lambda _: "frozen" if is_feature_layer(name) else "trained", subtree)
                for name, subtree in params.items()}

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _base_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.sgd(schedule, momentum=config.momentum)
    if config.optimizer == "adam":
        return optax.adam(schedule)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")
