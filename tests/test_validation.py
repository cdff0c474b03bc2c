"""A validation slice held out of the training split, and the best checkpoint chosen on it (never on test)."""

import json

import numpy as np
import pytest

from mnist_jax import checkpoint, data
from mnist_jax.config import Config, UserError

from helpers import TINY, train_run


def test_validation_slice_is_the_disjoint_stable_tail_of_train(tiny_data_dir):
    full_images, full_labels = data.load_split_numpy(TINY, "train", str(tiny_data_dir))
    dataset = data.load_dataset(TINY, str(tiny_data_dir), validation_fraction=0.1)
    train, validation = np.asarray(dataset.train.labels), np.asarray(dataset.validation.labels)
    assert len(train) == 576 and len(validation) == 64
    # Together they are the training split, in order: disjoint, nothing lost, nothing from test.
    np.testing.assert_array_equal(np.concatenate([train, validation]), full_labels)
    np.testing.assert_array_equal(np.asarray(dataset.validation.images), full_images[576:])
    again = data.load_dataset(TINY, str(tiny_data_dir), validation_fraction=0.1)
    np.testing.assert_array_equal(np.asarray(again.validation.images), np.asarray(dataset.validation.images))
    # Pixel statistics come from the training part only.
    assert dataset.mean == pytest.approx(full_images[:576].mean() / 255.0)
    assert data.load_dataset(TINY, str(tiny_data_dir)).validation is None


def test_bad_validation_fractions(way, tmp_path):
    with pytest.raises(UserError, match="leaves no validation"):
        data.validation_slice(10, 0.01)
    result = way.run("mnist_jax.train", "--workdir", tmp_path / "w", "--validation-fraction", "1.5")
    assert result.returncode == 2 and "--validation-fraction must be in [0, 1)" in result.stderr
    assert not (tmp_path / "w").exists()


def test_metrics_carry_validation_and_best_is_chosen_on_it(tiny_data_dir, tmp_path):
    config = Config(dataset=TINY, batch_size=32, eval_batch_size=100, epochs=3, learning_rate=0.003,
                    validation_fraction=0.25)
    history = train_run(config, tmp_path, tiny_data_dir)
    assert [h["step"] for h in history] == [15, 30, 45]  # 480 training examples / 32
    for entry in history:
        assert 0 <= entry["validation_accuracy"] <= 1 and 0 <= entry["validation_loss"] < 10  # a mean cross-entropy
    with open(tmp_path / "metrics.jsonl") as handle:
        assert [json.loads(line)["validation_accuracy"] for line in handle] == [h["validation_accuracy"]
                                                                               for h in history]
    manager = checkpoint.open_manager(str(tmp_path), read_only=True)
    best = checkpoint.resolve_step(manager, "best")
    by_validation = max((h["validation_accuracy"], h["step"]) for h in history)[1]
    assert best == by_validation
    # The selection never reads test accuracy: a history whose test accuracies disagree still picks by validation.
    assert checkpoint.selection_metric({"validation_accuracy": 0.5, "test_accuracy": 0.9}) == 0.5
