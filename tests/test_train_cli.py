"""The training command, run as a user runs it: `python -m mnist_jax.train` in a subprocess (e2e), and its `main`
in this process (the fast tier; its many bad-input cases run only so)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mnist_jax.checkpoint import restore_model
from mnist_jax.train import main as train_main

from helpers import (REPO, TINY_FLAGS, TINY_RUN_FLAGS, assert_tensorboard_equals_metrics, cli_env, corrupt, read_jsonl,
                     results, run_main_in_process, run_module, snapshot)


@pytest.fixture
def finished_run(way):
    """The shared tiny run (3 epochs, lr 0.003) of this test's way, and what its training command printed."""
    workdir = way.fixture("tiny_run")
    return workdir, Path(f"{workdir}.stdout").read_text()


def test_end_to_end_run_writes_every_file(finished_run):
    workdir, stdout = finished_run
    assert "epoch 3/3" in stdout and "final test accuracy" in stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "tiny_digits" and config["epochs"] == 3 and config["batch_size"] == 32
    history = read_jsonl(workdir / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["step"] for h in history] == [20, 40, 60]  # 640 examples / batch 32
    for entry in history:
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_images_per_second",
                "elapsed_seconds"} <= set(entry)
        assert 0 <= entry["train_accuracy"] <= 1 and 0 <= entry["test_accuracy"] <= 1
    assert history[-1]["test_accuracy"] > 0.9  # the tiny task is easy; chance is 0.1
    assert history[0]["elapsed_seconds"] < history[-1]["elapsed_seconds"]
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40", "60"]
    assert not [name for name in os.listdir(workdir) if name.startswith(".tmp")]  # atomic writes left no debris


def test_rerun_of_a_finished_run_changes_nothing(way, finished_run, tiny_data_dir, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished_run[0], workdir)  # a copy: other tests read the shared run meanwhile
    before = snapshot(workdir)
    result = way.run("mnist_jax.train", "--workdir", workdir, "--data-dir", tiny_data_dir, *TINY_FLAGS,
                     *TINY_RUN_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "run complete" in result.stdout
    assert snapshot(workdir) == before


def test_restored_model_reproduces_the_logged_test_accuracy(finished_run, tiny_data_dir):
    from mnist_jax.data import load_split_numpy

    workdir, _ = finished_run
    model = restore_model(str(workdir), "latest")
    images, labels = load_split_numpy("tiny_digits", "test", str(tiny_data_dir))
    predictions = np.argmax(np.asarray(model.module.apply(model.variables, images)), axis=-1)
    logged = read_jsonl(workdir / "metrics.jsonl")[-1]["test_accuracy"]
    assert np.mean(predictions == labels) == pytest.approx(logged, abs=1e-9)


@pytest.mark.e2e
def test_final_tta_reports_what_evaluate_tta_computes(strong_tiny_run, tiny_data_dir, tmp_path):
    """final_tta (on in `strong`): the last epoch's entry and train's final line carry the test-time-augmented
    figures, equal to `evaluate --tta` of the same checkpoint (itself checked against numpy and scipy in
    test_evaluate.py)."""
    workdir = tmp_path / "w"
    shutil.copytree(strong_tiny_run, workdir)  # evaluate writes into the workdir; other tests share the run
    stdout = Path(f"{strong_tiny_run}.stdout").read_text()
    *earlier, last = read_jsonl(workdir / "metrics.jsonl")
    assert earlier and not [key for entry in earlier for key in entry if "tta" in key]  # only the finished model
    for split, name in (("test", "test"), ("train[75%:]", "validation")):  # the validation slice is the tail
        evaluated = run_module("mnist_jax.evaluate", "--workdir", workdir, "--data-dir", tiny_data_dir, "--tta",
                               "--split", split, "--checkpoint", "latest")
        assert evaluated.returncode == 0, evaluated.stderr
        out = workdir / "eval" / f"{split}-tta"
        report = json.loads((out / "report.json").read_text())
        saved = np.load(out / "predictions.npz")
        picked = saved["probabilities"][np.arange(len(saved["labels"])), saved["labels"]].astype(np.float64)
        assert last[f"{name}_tta_accuracy"] == pytest.approx(report["accuracy"], abs=1e-12)
        assert last[f"{name}_tta_loss"] == pytest.approx(-np.log(picked).mean(), rel=1e-6)
        assert last[f"{name}_tta_loss"] != pytest.approx(last[f"{name}_loss"], rel=1e-3)  # the views changed it
    assert (f"final test accuracy {last['test_accuracy']:.2%}, {last['test_tta_accuracy']:.2%} with test-time "
            "augmentation") in stdout


@pytest.mark.e2e
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tiny_run, tiny_data_dir, tmp_path):
    """kill -9 at two different moments, restart each time: same parameters bitwise, same metrics, and TensorBoard's
    event files hold each epoch once, equal to metrics.jsonl (the kills land around the epochs' event files, which
    are written just after metrics.jsonl)."""
    reference_dir = tiny_run
    workdir = tmp_path / "w"
    command = [sys.executable, "-m", "mnist_jax.train", "--workdir", str(workdir), "--data-dir", str(tiny_data_dir),
               *TINY_FLAGS, *TINY_RUN_FLAGS]
    for lines_before_kill, extra_delay in ((1, 0.0), (2, 0.4)):
        process = subprocess.Popen(command, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        metrics = workdir / "metrics.jsonl"
        while time.time() < deadline and process.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= lines_before_kill:
                break
            time.sleep(0.05)
        time.sleep(extra_delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    result = subprocess.run(command, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert results(read_jsonl(workdir / "metrics.jsonl")) == results(read_jsonl(reference_dir / "metrics.jsonl"))
    assert_tensorboard_equals_metrics(workdir)
    resumed, reference = restore_model(str(workdir), "latest"), restore_model(str(reference_dir), "latest")
    assert resumed.step == reference.step == 60
    resumed_leaves, reference_leaves = (jax.tree_util.tree_leaves(m.variables) for m in (resumed, reference))
    assert len(resumed_leaves) == len(reference_leaves) == 8
    for a, b in zip(resumed_leaves, reference_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


BAD_FLAGS = [
    (("--batch-size", "0"), "--batch-size must be a positive integer"),
    (("--batch-size=-5",), "--batch-size must be a positive integer"),
    # These two need the data to check, so against an existing run the settings mismatch is reported first.
    (("--batch-size", "100000"), ("larger than the training split", "holds a run with other settings")),
    (("--epochs", "0"), "--epochs must be a positive integer"),
    (("--learning-rate", "0"), "--learning-rate must be > 0"),
    (("--learning-rate=-1e-3",), "--learning-rate must be > 0"),
    (("--optimizer", "rmsprop"), "unknown optimizer 'rmsprop'"),
    (("--schedule", "step"), "unknown schedule 'step'"),
    (("--pooling", "min"), "unknown pooling 'min'"),
    (("--convs-per-block", "0"), "--convs-per-block must be a positive integer"),
    (("--batch-norm-groups", "0"), "--batch-norm-groups must be a positive integer"),
    (("--label-smoothing", "1"), "--label-smoothing must be in [0, 1)"),
    (("--dataset", "no_such_dataset"), ("unknown dataset 'no_such_dataset'", "holds a run with other settings")),
    (("--epochs", "three"), "invalid int value"),
    (("--devices", "64"), "--devices must be between 1 and"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=["_".join(f) for f, _ in BAD_FLAGS])
def test_bad_input_is_one_line_exit_2_and_leaves_the_workdir_alone(tiny_run_in_process, tiny_data_dir, flags,
                                                                   message):
    workdir = tiny_run_in_process
    before = snapshot(workdir)
    # Against a fresh workdir (nothing may be created) and the finished one (nothing may change). In this process:
    # the same main and error contract as the command, without 30 start-ups of TensorFlow and JAX.
    for target in (workdir.parent / f"fresh-{abs(hash(flags))}", workdir):
        result = run_main_in_process(train_main, "--workdir", target, "--data-dir", tiny_data_dir, *TINY_FLAGS,
                                     *flags)
        assert result.returncode == 2, result.stderr
        messages = message if isinstance(message, tuple) else (message,)
        assert any(m in result.stderr for m in messages), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (workdir.parent / f"fresh-{abs(hash(flags))}").exists()
    assert snapshot(workdir) == before


def test_missing_data_offline_names_data_dir(way, tmp_path):
    result = way.run("mnist_jax.train", "--workdir", tmp_path / "w", "--data-dir", tmp_path / "empty")
    assert result.returncode == 2
    assert "--data-dir" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_resuming_with_another_architecture_or_dataset_is_refused(way, finished_run, tiny_data_dir):
    workdir, _ = finished_run
    before = snapshot(workdir)
    for flags, field in ((("--conv-features", "16,32"), "conv_features"), (("--dataset", "mnist"), "dataset"),
                         (("--learning-rate", "0.1"), "learning_rate")):
        result = way.run("mnist_jax.train", "--workdir", workdir, "--data-dir", tiny_data_dir, *flags)
        assert result.returncode == 2 and field in result.stderr and "new --workdir" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(workdir) == before


def test_corrupt_latest_checkpoint_falls_back_and_finishes_identically(way, finished_run, tiny_data_dir, tmp_path):
    reference_dir, _ = finished_run
    workdir = tmp_path / "w"
    shutil.copytree(reference_dir, workdir)
    corrupt(workdir / "checkpoints" / "60")
    result = way.run("mnist_jax.train", "--workdir", workdir, "--data-dir", tiny_data_dir, *TINY_FLAGS,
                     *TINY_RUN_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "checkpoint 60 is unreadable" in result.stderr and "resumed from" in result.stdout
    assert os.listdir(workdir / "checkpoints-corrupt")  # kept for inspection, not deleted
    assert results(read_jsonl(workdir / "metrics.jsonl")) == results(read_jsonl(reference_dir / "metrics.jsonl"))


def test_help_lists_every_hyperparameter(way):
    result = way.run("mnist_jax.train", "--help")
    assert result.returncode == 0
    for flag in ("--workdir", "--dataset", "--data-dir", "--epochs", "--batch-size", "--learning-rate",
                 "--optimizer", "--schedule", "--seed", "--devices"):
        assert flag in result.stdout
