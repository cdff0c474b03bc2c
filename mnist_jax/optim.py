"""Optimiser and learning-rate schedule by name, from the config."""

from __future__ import annotations

import optax

from mnist_jax.config import Config


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
        # Rises for warmup_epochs, then anneals to ~0; the fastest-converging recipe for this model.
        return optax.cosine_onecycle_schedule(total, peak, pct_start=max(warmup, 1) / total)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimiser named by `config.optimizer`, driven by the configured schedule."""
    schedule = learning_rate_schedule(config, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.sgd(schedule, momentum=config.momentum)
    if config.optimizer == "adam":
        return optax.adam(schedule)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")
