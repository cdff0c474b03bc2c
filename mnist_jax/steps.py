"""The train and eval steps: pure functions of (state, batch), jitted once with their settings bound.

`train_step` is the heart of the project: state in, state out, no side effects, and each training-only setting
(label smoothing, the moving-average decay, the augmentation) an explicit argument. `make_train_step(config)` binds
them from the run's config and jits the result, once per run. The training state carries everything a resumed
run needs (params, batch-norm statistics, optimiser state, step, PRNG key, and the moving average of the weights
when the run keeps one), so a restored state continues bit for bit where it stopped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mnist_jax.augment import Augmentation, training_augmentation
from mnist_jax.config import Config
from mnist_jax.data import Split
from mnist_jax.model import initial_variables

Batch = dict[str, jax.Array]  # {"image": uint8 (B, H, W, C), "label": int32 (B,)}
Metrics = dict[str, jax.Array]
TrainStep = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]


def model_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The variables `apply_fn` takes: params, and batch statistics when the model has them."""
    if batch_stats:
        return {"params": params, "batch_stats": batch_stats}
    return {"params": params}


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state, tx, apply_fn) plus batch-norm statistics, a PRNG key and, when
    the run keeps one, `ema`: an exponential moving average of the variables, which is what evaluation uses."""

    batch_stats: Any
    rng: jax.Array
    ema: Any = None  # {"params", ["batch_stats"]} averaged over the steps; None without a moving average

    def trained_variables(self) -> dict[str, Any]:
        """The variables the optimiser trains: params, and batch statistics when the model has them."""
        return model_variables(self.params, self.batch_stats)

    def variables(self) -> dict[str, Any]:
        """The variables evaluation and inference use: the moving average when the run keeps one."""
        return self.ema if self.ema is not None else self.trained_variables()


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple[int, ...], moving_average: bool = False) -> TrainState:
    """Initialises the model's variables and the optimiser from one PRNG key, and with `moving_average` the
    average of the weights (from the initial ones; the first step replaces them)."""
    init_key, state_key = jax.random.split(key)
    variables = initial_variables(model, init_key, tuple(image_shape))
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        rng=state_key,
    )
    return state.replace(ema=_copy(state.trained_variables())) if moving_average else state


def restart_moving_average(state: TrainState) -> TrainState:
    """`state` whose moving average, if it keeps one, starts again from its current variables."""
    if state.ema is None:
        return state
    return state.replace(ema=_copy(state.trained_variables()))


def _copy(variables: Any) -> Any:
    # Copies, not the same buffers: the step donates the state, and one buffer must not be donated twice.
    return jax.tree_util.tree_map(jnp.copy, variables)


def moving_average(state: TrainState, decay: float) -> dict[str, Any]:
    """The average after step t = `state.step`: ema <- d_t * ema + (1 - d_t) * variables.

    d_t = d (1 - d^(t-1)) / (1 - d^t) is Adam's bias correction in recursive form: the result is the exponential
    average with decay d of the steps' variables only, weights d^(t-s) renormalised to sum to one, so the random
    initial weights never enter it (d_1 = 0) and the decay means what it says from the first step on.
    """
    step = state.step.astype(jnp.float32)
    step_decay = decay * (1.0 - decay ** (step - 1.0)) / (1.0 - decay ** step)
    return jax.tree_util.tree_map(lambda average, new: step_decay * average + (1.0 - step_decay) * new,
                                  state.ema, state.trained_variables())


def _loss_and_accuracy(logits: jax.Array, labels: jax.Array,
                       label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy (against (1 - s) * one_hot + s / num_classes when smoothing, in training only)
    and whether the prediction is right."""
    if label_smoothing == 0:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == labels
    return loss, correct


def train_step(state: TrainState, batch: Batch, *, label_smoothing: float = 0.0, ema_decay: float = 0.0,
               augmentation: Augmentation | None = None) -> tuple[TrainState, Metrics]:
    """One optimisation step; dropout and augmentation draw from the state's key folded with the step number.

    `label_smoothing` shapes the training loss only; `ema_decay` > 0 updates the moving average (the state must
    keep one); `augmentation` warps each training image at random (None: the images as they are).
    """
    dropout_key = jax.random.fold_in(state.rng, state.step)
    augment_key = jax.random.fold_in(dropout_key, 1)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(
            variables, batch["image"], train=True, augmentation=augmentation,
            rngs={"dropout": dropout_key, "augment": augment_key}, mutable=["batch_stats"],
        )
        loss, correct = _loss_and_accuracy(logits, batch["label"], label_smoothing)
        return loss.mean(), (correct.mean(), updates)

    (loss, (accuracy, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    if ema_decay > 0:
        state = state.replace(ema=moving_average(state, ema_decay))
    return state, {"loss": loss, "accuracy": accuracy}


def make_train_step(config: Config, augment: bool = True) -> TrainStep:
    """`train_step` with the run's settings bound, jitted, the state donated: (state, batch) -> (state, metrics).

    `augment=False` gives the step of `--clean-final-epochs`: the same settings, without the augmentation.
    """
    settings = {"label_smoothing": config.label_smoothing, "ema_decay": config.ema_decay,
                "augmentation": training_augmentation(config) if augment else None}
    return jax.jit(functools.partial(train_step, **settings), donate_argnums=0)


def take_batch(split: Split, indices: jax.Array) -> Batch:
    """Gathers a batch on the device from a split held there."""
    return {"image": split.images[indices], "label": split.labels[indices]}


@jax.jit
def eval_step(state: TrainState, batch: Batch, mask: jax.Array) -> Metrics:
    """Sums of loss and correct predictions over the batch's valid (unpadded) examples."""
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    loss, correct = _loss_and_accuracy(logits, batch["label"])
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
