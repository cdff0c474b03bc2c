import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import steps
from mnist_jax.config import Config
from mnist_jax.model import build_model
from mnist_jax.optim import learning_rate_schedule

from helpers import copy, fixed_batch, new_state, numpy_softmax, train_step


def test_jitted_initialisation_gives_flaxs_op_by_op_bits():
    """create_train_state jits the init; its variables must be the very bits of Flax's eager `model.init`, or a
    seed would start another run than the one its figures were recorded with. Conv, dense and batch-norm layers,
    each with its initialisers."""
    config = Config(conv_features=(4,), dense_features=(), batch_norm=True)
    key = jax.random.PRNGKey(3)
    state = new_state(config, seed=3)
    init_key, _ = jax.random.split(key)
    model = build_model(config, 10, 0.2, 0.3)
    eager = model.init(init_key, jnp.zeros((1, 28, 28, 1), jnp.uint8), train=False)
    assert set(eager["params"]) == {"conv1_1", "conv1_1_bn", "head"}
    assert jax.tree_util.tree_structure(state.trained_variables()) == jax.tree_util.tree_structure(eager)
    expected = jax.tree_util.tree_leaves_with_path(eager)
    got = jax.tree_util.tree_leaves(state.trained_variables())
    for (path, want), have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    state, batch, step = new_state(), fixed_batch(), train_step(Config())
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 8


def test_train_step_is_pure():
    """Same state and batch in, bitwise the same state and metrics out; the input state is not consulted later."""
    state, batch, step = new_state(), fixed_batch(), train_step(Config())
    a_state, a_metrics = step(copy(state), batch)
    b_state, b_metrics = step(copy(state), batch)
    for x, y in zip(jax.tree_util.tree_leaves((a_state, a_metrics)), jax.tree_util.tree_leaves((b_state, b_metrics))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_step_donates_the_input_state():
    state, batch = new_state(), fixed_batch()
    params_leaf = jax.tree_util.tree_leaves(state.params)[0]
    train_step(Config())(state, batch)
    assert params_leaf.is_deleted()


def test_dropout_and_batch_norm_state_flow():
    config = Config(batch_norm=True, dropout_rate=0.3)
    state, batch = new_state(config), fixed_batch()
    before = copy(state.batch_stats)
    state, _ = train_step(config)(state, batch)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), before, state.batch_stats)
    assert all(jax.tree_util.tree_leaves(changed)), "training must update the running statistics"
    frozen = copy(state.batch_stats)
    steps.eval_step(state, batch, jnp.ones(32))
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), frozen, state.batch_stats)
    assert all(jax.tree_util.tree_leaves(same))


def test_label_smoothing_trains_against_smoothed_targets_and_leaves_evaluation_plain():
    """The step's loss is cross-entropy against 0.9 * one-hot + 0.01, from numpy on the pre-step logits."""
    config = Config(label_smoothing=0.1)
    state, batch = new_state(config), fixed_batch()
    log_probs = np.log(numpy_softmax(state.apply_fn(state.variables(), batch["image"])))
    targets = np.full(log_probs.shape, 0.01)
    targets[np.arange(32), np.asarray(batch["label"])] += 0.9
    plain = -log_probs[np.arange(32), np.asarray(batch["label"])].sum()
    np.testing.assert_allclose(float(steps.eval_step(state, batch, jnp.ones(32))["loss"]), plain, rtol=1e-5)
    _, metrics = train_step(config)(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), -(targets * log_probs).sum(1).mean(), rtol=1e-5)


def test_eval_step_counts_only_unmasked_examples():
    state, batch = new_state(), fixed_batch()
    mask = jnp.arange(32) < 20
    full = steps.eval_step(state, batch, jnp.ones(32))
    part = steps.eval_step(state, batch, mask)
    logits = state.apply_fn(state.variables(), batch["image"][:20])
    expected_loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:20, None], axis=1).sum()
    assert int(part["count"]) == 20 and int(full["count"]) == 32
    assert int(part["correct"]) == int(jnp.sum(jnp.argmax(logits, -1) == batch["label"][:20]))
    np.testing.assert_allclose(float(part["loss"]), float(expected_loss), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup_cosine", "one_cycle"])
def test_every_optimizer_and_schedule_trains(optimizer, schedule):
    config = Config(optimizer=optimizer, schedule=schedule, learning_rate=0.01 if optimizer == "sgd" else 1e-3,
                    epochs=2, warmup_epochs=0.5)
    lr = learning_rate_schedule(config, steps_per_epoch=10)
    values = np.array([float(lr(s)) for s in range(20)])
    assert np.all(values >= 0) and values.max() <= config.learning_rate * (1 + 1e-6)
    if schedule == "constant":
        assert np.all(values == config.learning_rate)
    else:
        assert values[-1] < 0.2 * config.learning_rate  # every non-constant schedule anneals
    if schedule in ("warmup_cosine", "one_cycle"):
        assert values[0] < values[5]  # and warms up first
    state, batch, step = new_state(config), fixed_batch(), train_step(config)
    first = None
    for _ in range(6):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first
