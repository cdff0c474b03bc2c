import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import checkpoint, steps
from mnist_jax.config import Config, UserError
from mnist_jax.model import build_model
from mnist_jax.optim import make_optimizer

from test_steps import fixed_batch


def trained_state(config=Config(), n_steps=2):
    model = build_model(config, 10, 0.2, 0.3)
    state = steps.create_train_state(model, make_optimizer(config, 10), jax.random.PRNGKey(0), (28, 28, 1))
    for _ in range(n_steps):
        state, _ = steps.train_step(state, fixed_batch())
    return state


def meta(config, epoch, accuracy):
    # Epoch e ends at step e + 1 in these tests (one step before the first save, then one per epoch).
    history = [{"epoch": e, "step": e + 1, "validation_accuracy": accuracy[e - 1], "test_accuracy": 1 - accuracy[e - 1]}
               for e in range(1, epoch + 1)]
    return {"config": config.__dict__ | {"conv_features": list(config.conv_features),
                                         "dense_features": list(config.dense_features)},
            "class_names": [str(i) for i in range(10)], "image_shape": [28, 28, 1],
            "mean": 0.2, "std": 0.3, "epoch": epoch, "history": history}


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_epochs(workdir, config, accuracies):
    manager = checkpoint.open_manager(str(workdir), keep=2)
    state = trained_state(config, 1)
    saved = {}
    for epoch in range(1, len(accuracies) + 1):
        state, _ = steps.train_step(state, fixed_batch())
        checkpoint.save(manager, state, meta(config, epoch, accuracies))
        saved[int(state.step)] = jax.tree_util.tree_map(np.asarray, state.params)
    manager.close()
    return state, saved


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
    a, _ = steps.train_step(state, fixed_batch())
    b, _ = steps.train_step(restored, fixed_batch())
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
        state, _ = steps.train_step(state, fixed_batch())
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


def corrupt(step_dir):
    """Truncates every data file of a checkpoint, as a disk fault or a bad copy would."""
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as handle:
                handle.truncate(0)


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
