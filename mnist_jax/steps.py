"""The train and eval steps: pure, jitted functions of (state, batch).

`train_step` is the heart of the project: state in, state out, no side effects. The training state carries
everything a resumed run needs (params, batch-norm statistics, optimiser state, step, PRNG key, and the moving
average of the weights when the run keeps one), so a restored state continues bit for bit where it stopped.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from mnist_jax.data import Split

Batch = dict[str, jax.Array]  # {"image": uint8 (B, H, W, C), "label": int32 (B,)}
Metrics = dict[str, jax.Array]


def model_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The variables `apply_fn` takes: params, and batch statistics when the model has them."""
    if batch_stats:
        return {"params": params, "batch_stats": batch_stats}
    return {"params": params}


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state, tx, apply_fn) plus batch-norm statistics, a PRNG key and,
    with `ema_decay` > 0, `ema`: an exponential moving average of the variables, which is what evaluation uses."""

    batch_stats: Any
    rng: jax.Array
    ema: Any = None  # {"params", ["batch_stats"]} averaged over the steps; None when ema_decay is 0
    ema_decay: float = struct.field(pytree_node=False, default=0.0)
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)

    def trained_variables(self) -> dict[str, Any]:
        """The variables the optimiser trains: params, and batch statistics when the model has them."""
        return model_variables(self.params, self.batch_stats)

    def variables(self) -> dict[str, Any]:
        """The variables evaluation and inference use: the moving average when the run keeps one."""
        return self.ema if self.ema is not None else self.trained_variables()


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, key: jax.Array, image_shape: tuple[int, ...],
    ema_decay: float = 0.0, label_smoothing: float = 0.0,
) -> TrainState:
    """Initialises the model's variables and the optimiser from one PRNG key (and the moving average, if kept).
    `label_smoothing` is a property of the training loss, carried by the state so the step stays (state, batch)."""
    init_key, state_key = jax.random.split(key)
    variables = init_variables(model, init_key, tuple(image_shape))
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        rng=state_key,
        ema_decay=ema_decay,
        label_smoothing=label_smoothing,
    )
    return restart_moving_average(state)


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """The model's initial variables from one jitted program instead of Flax's ~90 op-by-op ones: the same bits,
    compiled in 3.5 s instead of 5.7 s cold for the default model on a 2-core CPU (5.3 s instead of 9.4 s for
    `strong`). The model is a static argument (linen modules hash by their fields), so a process that builds the
    same architecture again, as a sweep's trials or a resume do, reuses the program."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.uint8), train=False)


def restart_moving_average(state: TrainState) -> TrainState:
    """`state` whose moving average, if it keeps one, starts from its current variables (copies: the step
    donates the state, and one buffer must not be donated twice)."""
    if state.ema_decay == 0:
        return state
    return state.replace(ema=jax.tree_util.tree_map(jnp.copy, state.trained_variables()))


def moving_average(state: TrainState) -> dict[str, Any]:
    """The average after step t = `state.step`: ema <- d_t * ema + (1 - d_t) * variables.

    d_t = d (1 - d^(t-1)) / (1 - d^t) is Adam's bias correction in recursive form: the result is the exponential
    average with decay d of the steps' variables only, weights d^(t-s) renormalised to sum to one, so the random
    initial weights never enter it (d_1 = 0) and `ema_decay` means what it says from the first step on.
    """
    decay, step = state.ema_decay, state.step.astype(jnp.float32)
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


def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimisation step; dropout and augmentation draw from the state's key folded with the step number."""
    dropout_key = jax.random.fold_in(state.rng, state.step)
    augment_key = jax.random.fold_in(dropout_key, 1)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(
            variables, batch["image"], train=True, rngs={"dropout": dropout_key, "augment": augment_key},
            mutable=["batch_stats"],
        )
        loss, correct = _loss_and_accuracy(logits, batch["label"], state.label_smoothing)
        return loss.mean(), (correct.mean(), updates)

    (loss, (accuracy, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    if state.ema is not None:
        state = state.replace(ema=moving_average(state))
    return state, {"loss": loss, "accuracy": accuracy}


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = """Jitted `_train_step`: (state, batch) -> (new state, {"loss", "accuracy"}); state donated."""


def take_batch(split: Split, indices: jax.Array) -> Batch:
    """Gathers a batch on the device from a split held there."""
    return {"image": split.images[indices], "label": split.labels[indices]}


@functools.partial(jax.jit, donate_argnums=0)
def train_epoch_on_device(state: TrainState, split: Split, permutation: jax.Array) -> tuple[TrainState, Metrics]:
    """A whole epoch as one `lax.scan` over the permutation's rows: no host round trip per step.

    Fastest on GPU/TPU. On XLA:CPU it runs several times slower than per-step dispatch (see the README's
    performance section), so `train.py` picks the path by backend.
    """
    return jax.lax.scan(lambda s, idx: _train_step(s, take_batch(split, idx)), state, permutation)


@jax.jit
def eval_step(state: TrainState, batch: Batch, mask: jax.Array) -> Metrics:
    """Sums of loss and correct predictions over the batch's valid (unpadded) examples."""
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    loss, correct = _loss_and_accuracy(logits, batch["label"])
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


# XLA:CPU runs this model's convolutions single-threaded and leaves bias adds, pooling gradients and the optax
# update as separate loops; YNNPACK library fusions fold those into multi-threaded dot and convolution kernels.
# Which fusions pay depends on the CPU (README, "Performance", has the tables). Dots, elementwise ops and
# reductions everywhere: 1.2-1.5x over none on Zen 3 and on the Xeon. YNNPACK's convolutions only on AMD with
# AVX-512 (Zen 4: +20-42%), and there not for batch-norm models, which keep XLA's defaults (their eltwise fusion
# writes the normalisation's broadcasts out as whole tensors). On Zen 3 and on an Intel Xeon with AVX-512 YNNPACK's
# convolutions are slow (one kernel gradient took 685 of a 1,160 ms `strong` step on Zen 3): without them `strong`
# trained 2.2x and 1.3x as fast.
_YNN_FUSIONS = ("DOT", "ELTWISE", "REDUCE")


def ynn_fusion_options(*kinds: str) -> dict[str, str]:
    """XLA:CPU compiler options that put these kinds of op (DOT, ELTWISE, REDUCE, INDIVIDUAL_CONVOLUTION) into
    YNNPACK library fusions; no kinds turns YNNPACK fusions off."""
    return {"xla_cpu_experimental_ynn_fusion_type": ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in kinds)}


def _cpuinfo_value(key: str, cpuinfo_path: str) -> str | None:
    """The value of the first `key : value` line of /proc/cpuinfo; None where there is none (not Linux)."""
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                name, colon, value = line.partition(":")
                if colon and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags the kernel reports for this CPU; empty where it does not say (not Linux)."""
    return frozenset((_cpuinfo_value("flags", cpuinfo_path) or "").split())


def cpu_vendor(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor as the kernel reports it (`AuthenticAMD`, `GenuineIntel`); '' where it does not say."""
    return _cpuinfo_value("vendor_id", cpuinfo_path) or ""


def compiler_options(backend: str, batch_norm: bool = False, flags: frozenset[str] | None = None,
                     vendor: str | None = None) -> dict[str, str]:
    """XLA options for the step functions on this CPU (`flags` and `vendor`, default this machine's); none on
    GPU/TPU.

    YNNPACK fusions of dots, elementwise ops and reductions; plus convolutions on AMD CPUs with AVX-512, where
    batch-norm models keep XLA's defaults instead. The choice depends on the CPU alone (never on a timing), so a seed
    gives one result on a machine. A CPU whose flags are unknown (not Linux, ARM) is treated as that AMD one."""
    if backend != "cpu":
        return {}
    flags = cpu_flags() if flags is None else flags
    vendor = cpu_vendor() if vendor is None else vendor
    if not flags or ("avx512f" in flags and vendor == "AuthenticAMD"):
        return {} if batch_norm else ynn_fusion_options(*_YNN_FUSIONS, "INDIVIDUAL_CONVOLUTION")
    return ynn_fusion_options(*_YNN_FUSIONS)


def compile_for_backend(jitted: Any, state: TrainState, *example_args: Any) -> Any:
    """Ahead-of-time compiles a jitted step for these arguments with the backend's XLA options for this model."""
    options = compiler_options(jax.default_backend(), batch_norm=bool(state.batch_stats))
    return jitted.lower(state, *example_args).compile(options)


def uses_on_device_epoch(backend: str) -> bool:
    """Whether a whole-epoch scan beats per-step dispatch on this backend (it does not on CPU)."""
    return backend != "cpu"
