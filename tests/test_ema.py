"""The moving average of the weights (`--ema-decay`): its formula, that evaluation and inference use it, that it is
checkpointed and resumes exactly, and that runs without it are untouched."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import checkpoint, steps
from mnist_jax.checkpoint import restore_model
from mnist_jax.config import Config, UserError, validate

from helpers import (SMALL_MODEL, TINY, copy, fixed_batch, meta, new_state, non_donating_train_step, train_in_process,
                     train_step)

BN = Config(batch_norm=True, ema_decay=0.9)


def test_average_follows_its_formula_for_params_and_batch_statistics():
    """After t steps the average is sum_s d^(t-s) v_s / sum_s d^(t-s) over the steps' variables v_1..v_t: the
    initial random weights carry no weight at all."""
    state = new_state(BN)
    assert state.variables() is state.ema and set(state.ema) == {"params", "batch_stats"}
    plain_step = non_donating_train_step(BN)  # not donating: the test keeps each state
    history = []
    for step in range(1, 6):
        state, _ = plain_step(state, fixed_batch(seed=step))
        history.append(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), state.trained_variables()))
    weights = np.array([0.9 ** (5 - s) for s in range(1, 6)])
    expected = jax.tree_util.tree_map(lambda *vs: sum(w * v for w, v in zip(weights, vs)) / weights.sum(), *history)
    for got, want in zip(jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    first = new_state(BN)
    first, _ = plain_step(first, fixed_batch(seed=1))
    for got, want in zip(jax.tree_util.tree_leaves(first.ema), jax.tree_util.tree_leaves(first.trained_variables())):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # d_1 = 0: the first step's variables
    differs = [bool(np.any(np.asarray(a) != np.asarray(b)))
               for a, b in zip(jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(state.trained_variables()))]
    assert all(differs), "the average lags the trained variables"


def test_evaluation_uses_the_average_and_training_the_trained_weights():
    state = new_state(BN)
    for seed in range(3):
        state, _ = train_step(BN)(state, fixed_batch(seed=seed))
    batch = fixed_batch(seed=9)
    totals = steps.eval_step(state, batch, jnp.ones(32))
    logits = state.apply_fn(state.ema, batch["image"])
    expected = float(np.sum(np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"])))
    assert float(totals["correct"]) == expected
    raw_logits = state.apply_fn(state.trained_variables(), batch["image"])
    assert not np.allclose(np.asarray(logits), np.asarray(raw_logits))


def test_without_a_decay_there_is_no_average_and_the_step_is_unchanged():
    state = new_state(Config())
    assert state.ema is None and state.variables() == state.trained_variables()
    averaged_config = dataclasses.replace(Config(), ema_decay=0.5)
    averaged = new_state(averaged_config)
    a, _ = train_step(Config())(copy(state), fixed_batch())
    b, _ = train_step(averaged_config)(averaged, fixed_batch())
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the average never feeds back into training


def test_checkpoint_keeps_the_average_and_inference_restores_it(tmp_path):
    state = new_state(BN)
    for seed in range(2):
        state, _ = train_step(BN)(state, fixed_batch(seed=seed))
    manager = checkpoint.open_manager(str(tmp_path))
    checkpoint.save(manager, state, meta(BN, 1, [0.5]))
    restored, _ = checkpoint.restore_latest(str(tmp_path), manager, new_state(BN))
    manager.close()
    for a, b in zip(jax.tree_util.tree_leaves(restored.ema), jax.tree_util.tree_leaves(state.ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = restore_model(str(tmp_path), "latest")
    for a, b in zip(jax.tree_util.tree_leaves(model.variables), jax.tree_util.tree_leaves(state.ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.e2e  # a kill-and-resume test: the full suite runs it
def test_a_run_with_an_average_resumes_bit_for_bit(tiny_data_dir, tmp_path):
    config = Config(dataset=TINY, batch_size=32, eval_batch_size=100, epochs=2, batch_norm=True, ema_decay=0.95,
                    **SMALL_MODEL)

    history, leaves = train_in_process(config, tiny_data_dir, tmp_path / "whole")
    resumed_history, resumed_leaves = train_in_process(config, tiny_data_dir, tmp_path / "resumed",
                                                       stopped_after_epoch_1_of=tmp_path / "whole")
    assert resumed_history == history
    for a, b in zip(resumed_leaves, leaves):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_bad_decay_is_refused(decay, tmp_path):
    with pytest.raises(UserError, match=f"--ema-decay must be in \\[0, 1\\), got {decay}"):
        validate(Config(ema_decay=decay))


def test_bad_decay_on_the_command_line_is_one_line_exit_2(way, tmp_path):
    result = way.run("mnist_jax.train", "--workdir", tmp_path / "x", "--ema-decay", "1")
    assert result.returncode == 2 and result.stderr == "error: --ema-decay must be in [0, 1), got 1.0\n"
    assert not (tmp_path / "x").exists()
