"""`python -m mnist_jax.evaluate` on a trained workdir, and its metrics against scikit-learn."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from mnist_jax.checkpoint import restore_model
from mnist_jax.data import load_split_numpy
from mnist_jax.evaluate import evaluate

from conftest import TINY, run_module

PLOTS = ("confusion_matrix.png", "samples.png", "mistakes.png", "per_class.png")


def assert_matches_sklearn(report, labels, predictions, classes):
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(classes), zero_division=0)
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-9)
    for k, row in enumerate(report["per_class"]):
        assert row["class"] == k and row["support"] == support[k]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[k], recall[k], f1[k]), abs=1e-6)
    assert report["confusion_matrix"] == confusion_matrix(labels, predictions, labels=range(classes)).tolist()
    macro = precision_recall_fscore_support(labels, predictions, labels=range(classes), average="macro",
                                            zero_division=0)
    assert [report["macro_avg"][k] for k in ("precision", "recall", "f1")] == pytest.approx(macro[:3], abs=1e-6)


def test_evaluate_cli_writes_every_file_in_split_order(tiny_run, tiny_data_dir):
    result = run_module("mnist_jax.evaluate", "--workdir", tiny_run, "--data-dir", tiny_data_dir, "--checkpoint",
                        "latest")
    assert result.returncode == 0, result.stderr
    assert "weighted avg" in result.stdout and "accuracy" in result.stdout
    out = tiny_run / "eval" / "test"
    report = json.loads((out / "report.json").read_text())
    assert {"accuracy", "per_class", "macro_avg", "weighted_avg", "confusion_matrix", "checkpoint_step"} <= set(report)
    assert report["checkpoint_step"] == 60
    saved = np.load(out / "predictions.npz")
    images, labels = load_split_numpy(TINY, "test", str(tiny_data_dir))
    np.testing.assert_array_equal(saved["labels"], labels)  # the split's order, every example once
    model = restore_model(str(tiny_run), "latest")
    logits = np.asarray(model.module.apply(model.variables, images))
    np.testing.assert_array_equal(saved["predictions"], logits.argmax(-1))
    assert saved["probabilities"].shape == (200, 10)
    np.testing.assert_allclose(saved["probabilities"].sum(-1), 1, rtol=1e-5)
    assert_matches_sklearn(report, labels, saved["predictions"], 10)
    for name in PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and 300 <= image.width <= 4000 and 300 <= image.height <= 4000


def test_evaluate_every_example_once_with_a_partial_last_batch(tiny_run, tiny_data_dir, tmp_path):
    report = evaluate(str(tiny_run), "train[:333]", "best", str(tiny_data_dir), out_dir=str(tmp_path))
    assert sum(row["support"] for row in report["per_class"]) == 333
    assert len(np.load(tmp_path / "predictions.npz")["labels"]) == 333


@pytest.mark.parametrize("args, message", [
    (("--workdir", "/nonexistent/run"), "no checkpoints found"),
    (("--checkpoint", "12345"), "--checkpoint must be best, latest or one of the saved steps"),
    (("--split", "validation"), "has no split 'validation'"),
])
def test_evaluate_bad_input(tiny_run, tiny_data_dir, args, message):
    result = run_module("mnist_jax.evaluate", "--workdir", tiny_run, "--data-dir", tiny_data_dir, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_real_mnist(mnist_run, shared_data_dir):
    report = evaluate(str(mnist_run), "test", "best", str(shared_data_dir))
    assert report["accuracy"] > 0.97  # one epoch of the default recipe; chance is 0.1
    saved = np.load(mnist_run / "eval" / "test" / "predictions.npz")
    assert_matches_sklearn(report, saved["labels"], saved["predictions"], 10)
