import os

import jax.numpy as jnp
import pytest

from mnist_jax import checkpoint
from mnist_jax.config import Config, UserError

from helpers import assert_trees_equal, corrupt, fixed_batch, meta, save_epochs, train_step, trained_state


def test_save_then_restore_gives_equal_arrays(tmp_path):
    config = Config(batch_norm=True)
    state = trained_state(config)
    manager = checkpoint.open_manager(str(tmp_path))
    checkpoint.save(manager, state, meta(config, 1, [0.5]))
    fresh = trained_state(config, 0)
    restored, restored_meta = checkpoint.restore_latest(str(tmp_path), manager, fresh)
    assert int(restored.step) == int(state.step) == 2
    assert_trees_equal((state.params, state.batch_stats, state.opt_state, state.rng),
                       (restored.params, restored.batch_stats, restored.opt_state, restored.rng))
    assert restored_meta["epoch"] == 1
    # And the restored state keeps training exactly as the original would.
    step = train_step(config)
    a, _ = step(state, fixed_batch())
    b, _ = step(restored, fixed_batch())
    assert_trees_equal(a.params, b.params)


def test_keeps_the_latest_few_and_the_best(tmp_path):
    config = Config()
    _, saved = save_epochs(tmp_path, config, [0.5, 0.9, 0.6, 0.7, 0.65])
    manager = checkpoint.open_manager(str(tmp_path), read_only=True)
    steps_on_disk = sorted(manager.all_steps())
    assert steps_on_disk == [3, 5, 6]  # best (epoch 2 = step 3) plus the latest two
    assert checkpoint.resolve_step(manager, "best") == 3
    assert checkpoint.resolve_step(manager, "latest") == 6
    assert checkpoint.resolve_step(manager, "5") == 5
    with pytest.raises(UserError, match="--checkpoint"):
        checkpoint.resolve_step(manager, "4")


def test_without_validation_best_is_the_latest_never_chosen_on_test(tmp_path):
    config = Config()
    manager = checkpoint.open_manager(str(tmp_path), keep=1)
    state = trained_state(config, 1)
    for epoch, test_accuracy in enumerate([0.5, 0.9, 0.6], start=1):
        state, _ = train_step(config)(state, fixed_batch())
        history = [{"epoch": e, "step": e + 1, "test_accuracy": a} for e, a in enumerate([0.5, 0.9, 0.6][:epoch], 1)]
        checkpoint.save(manager, state, {**meta(config, epoch, [0.0] * epoch), "history": history})
    assert checkpoint.resolve_step(manager, "best") == checkpoint.resolve_step(manager, "latest") == 4
    assert sorted(manager.all_steps()) == [4]  # the test-best epoch 2 was not kept as "best"
    manager.close()


def test_restore_model_for_inference(tmp_path):
    config = Config()
    _, saved = save_epochs(tmp_path, config, [0.5, 0.9, 0.6])
    best = checkpoint.restore_model(str(tmp_path), "best")
    assert best.step == 3 and best.config == config and best.image_shape == (28, 28, 1)
    assert_trees_equal(best.variables["params"], saved[3])
    logits = best.module.apply(best.variables, jnp.zeros((2, 28, 28, 1), jnp.uint8))
    assert logits.shape == (2, 10)
    assert checkpoint.restore_model(str(tmp_path), "latest").step == 4


def test_restore_model_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoints found"):
        checkpoint.restore_model(str(tmp_path / "missing"))


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    config = Config()
    _, saved = save_epochs(tmp_path, config, [0.5, 0.6, 0.7])
    corrupt(tmp_path / "checkpoints" / "4")
    manager = checkpoint.open_manager(str(tmp_path), keep=2)
    restored, restored_meta = checkpoint.restore_latest(str(tmp_path), manager, trained_state(config, 0))
    assert int(restored.step) == 3 and restored_meta["epoch"] == 2
    assert_trees_equal(restored.params, saved[3])
    assert "checkpoint 4 is unreadable" in capsys.readouterr().err
    # Nothing is lost: the corrupt checkpoint is moved aside, not deleted.
    assert len(os.listdir(tmp_path / "checkpoints-corrupt")) == 1
    assert sorted(manager.all_steps()) == [3]
