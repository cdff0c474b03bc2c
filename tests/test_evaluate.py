"""`python -m mnist_jax.evaluate` on a trained workdir, and its metrics against scikit-learn."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from mnist_jax.augment import TEST_TIME_VIEWS, apply_view
from mnist_jax.checkpoint import restore_model
from mnist_jax.data import load_split_numpy
from mnist_jax.config import UserError
from mnist_jax.evaluate import evaluate
from mnist_jax.evaluate import main as evaluate_main
from mnist_jax.inference import check_same_task

from helpers import TINY, TINY_FLAGS, numpy_softmax, run_main_in_process, run_module, trained_once

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


def test_evaluate_cli_writes_every_file_in_split_order(way, tiny_data_dir, tmp_path):
    tiny_run = tmp_path / "run"
    shutil.copytree(way.fixture("tiny_run"), tiny_run)  # evaluate writes into the workdir; other tests share the run
    result = way.run("mnist_jax.evaluate", "--workdir", tiny_run, "--data-dir", tiny_data_dir, "--checkpoint",
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


def test_evaluate_every_example_once_with_a_partial_last_batch(tiny_run_in_process, tiny_data_dir, tmp_path):
    report = evaluate(str(tiny_run_in_process), "train[:333]", "best", str(tiny_data_dir), out_dir=str(tmp_path))
    assert sum(row["support"] for row in report["per_class"]) == 333
    assert len(np.load(tmp_path / "predictions.npz")["labels"]) == 333


@pytest.mark.parametrize("args, message", [
    (("--workdir", "/nonexistent/run"), "no checkpoints found"),
    (("--checkpoint", "12345"), "--checkpoint must be best, latest or one of the saved steps"),
    (("--split", "validation"), "has no split 'validation'"),
    (("--split", "test[:200%]"), "bad split 'test[:200%]': Error parsing split"),
    (("--split", "test[5:2]"), "split 'test[5:2]' of dataset 'tiny_digits' holds no examples"),
])
def test_evaluate_bad_input(tiny_run_in_process, tiny_data_dir, args, message):
    # `python -m mnist_jax.evaluate ...`, in this process (the command's main and error contract, no start-up)
    result = run_main_in_process(evaluate_main, "--workdir", tiny_run_in_process, "--data-dir", tiny_data_dir, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_real_mnist(mnist_run, shared_data_dir):
    report = evaluate(str(mnist_run), "test", "best", str(shared_data_dir))
    assert report["accuracy"] > 0.97  # one epoch of the default recipe on 20,000 images; chance is 0.1
    saved = np.load(mnist_run / "eval" / "test" / "predictions.npz")
    assert_matches_sklearn(report, saved["labels"], saved["predictions"], 10)


@pytest.fixture(scope="session")
def second_tiny_run(tmp_path_factory, tiny_data_dir):
    """Another model of the same task (another seed, a wider net): an ensemble member unlike tiny_run."""
    return trained_once(tmp_path_factory, "second-tiny-run", "--data-dir", tiny_data_dir, *TINY_FLAGS,
                        "--epochs", "2", "--seed", "1", "--conv-features", "16,32")


def test_ensemble_of_one_equals_that_models_evaluation(way, tiny_data_dir, tmp_path):
    tiny_run = way.fixture("tiny_run")
    result = way.run("mnist_jax.evaluate", "--ensemble", tiny_run, "--workdir", tmp_path / "one",
                     "--data-dir", tiny_data_dir)
    assert result.returncode == 0, result.stderr
    assert "ensemble of 1: accuracy" in result.stdout
    single = evaluate(str(tiny_run), "test", "best", str(tiny_data_dir), out_dir=str(tmp_path / "single"))
    out = tmp_path / "one" / "eval" / "test"
    ensemble = json.loads((out / "report.json").read_text())
    assert ensemble == json.loads(json.dumps(single))
    for key in ("labels", "predictions", "probabilities"):
        np.testing.assert_array_equal(np.load(out / "predictions.npz")[key],
                                      np.load(tmp_path / "single" / "predictions.npz")[key])
    assert all((out / name).exists() for name in PLOTS)


@pytest.mark.e2e
def test_ensemble_averages_its_members_probabilities(tiny_run, second_tiny_run, tiny_data_dir, tmp_path):
    result = run_module("mnist_jax.evaluate", "--ensemble", tiny_run, second_tiny_run, "--workdir", tmp_path / "ens",
                        "--data-dir", tiny_data_dir)
    assert result.returncode == 0, result.stderr
    assert "ensemble of 2: accuracy" in result.stdout
    images, labels = load_split_numpy(TINY, "test", str(tiny_data_dir))
    members = []
    for path in (tiny_run, second_tiny_run):  # each member applied on its own, softmax in numpy
        model = restore_model(str(path), "best")
        members.append(numpy_softmax(model.module.apply(model.variables, images)))
    expected = np.mean(members, axis=0)
    saved = np.load(tmp_path / "ens" / "eval" / "test" / "predictions.npz")
    np.testing.assert_allclose(saved["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(saved["predictions"], expected.argmax(-1))
    report = json.loads((tmp_path / "ens" / "eval" / "test" / "report.json").read_text())
    assert [m["workdir"] for m in report["members"]] == [str(tiny_run), str(second_tiny_run)]
    assert "checkpoint_step" not in report
    assert_matches_sklearn(report, labels, saved["predictions"], 10)


@pytest.mark.e2e
def test_test_time_augmentation_averages_every_view_of_every_member(tiny_run, second_tiny_run, tiny_data_dir,
                                                                     tmp_path):
    result = run_module("mnist_jax.evaluate", "--ensemble", tiny_run, second_tiny_run, "--workdir", tmp_path / "ens",
                        "--tta", "--data-dir", tiny_data_dir)
    assert result.returncode == 0, result.stderr
    assert "ensemble of 2, test-time augmentation: accuracy" in result.stdout
    images, labels = load_split_numpy(TINY, "test", str(tiny_data_dir))
    models = [restore_model(str(path), "best") for path in (tiny_run, second_tiny_run)]
    expected = np.mean([numpy_softmax(m.module.apply(m.variables, apply_view(images, view)))
                        for view in TEST_TIME_VIEWS for m in models], axis=0)
    out = tmp_path / "ens" / "eval" / "test-tta"
    saved = np.load(out / "predictions.npz")
    np.testing.assert_allclose(saved["probabilities"], expected, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["test_time_augmentation"] is True
    assert_matches_sklearn(report, labels, saved["predictions"], 10)
    assert all((out / name).exists() for name in PLOTS)
    assert not (tmp_path / "ens" / "eval" / "test").exists()  # a plain evaluation's outputs are never overwritten


def test_ensemble_members_must_share_a_dataset(way, tiny_data_dir, tmp_path):
    tiny_run = way.fixture("tiny_run")
    model = restore_model(str(tiny_run), "best")
    other = dataclasses.replace(model, config=dataclasses.replace(model.config, dataset="tiny_five"),
                                class_names=model.class_names[:5])
    with pytest.raises(UserError, match="ensemble members must share a dataset: tiny_digits"):
        check_same_task([model, other])
    result = way.run("mnist_jax.evaluate", "--ensemble", tiny_run, "--workdir", tiny_run,
                     "--data-dir", tiny_data_dir)
    assert result.returncode == 2 and "is one of the ensemble's members" in result.stderr
    missing = way.run("mnist_jax.evaluate", "--ensemble", tiny_run, tmp_path / "nope", "--workdir", tmp_path / "o")
    assert missing.returncode == 2 and "no checkpoints found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
