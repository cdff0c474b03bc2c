"""TensorBoard event files (WORKDIR/tensorboard/), read back by TensorBoard's own reader: each epoch's scalars equal
its metrics.jsonl entry, each epoch once, also when a run resumes after losing a checkpoint or after a kill between a
checkpoint and its event file; a finished run adds its curves, confusion matrix and hyperparameters."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mnist_jax import summaries
from mnist_jax.train import main as train_main

from helpers import (TINY_FLAGS, TINY_RUN_FLAGS, assert_tensorboard_equals_metrics, read_jsonl, results,
                     run_main_in_process, tensorboard_events)


def retrain(workdir: Path, data_dir: Path):
    result = run_main_in_process(train_main, "--workdir", workdir, "--data-dir", data_dir, *TINY_FLAGS,
                                 *TINY_RUN_FLAGS)
    assert result.returncode == 0, result.stderr
    return result


def test_tags_group_the_splits_by_metric():
    assert summaries.tag("validation_accuracy") == "accuracy/validation"
    assert summaries.tag("test_tta_loss") == "loss/test_tta"
    assert summaries.tag("learning_rate") == "learning_rate"
    assert set(summaries.scalars({"epoch": 2, "step": 40, "elapsed_seconds": 9.0, "train_loss": 0.5})) == {"loss/train"}


def test_a_finished_run_logs_every_epoch_and_its_final_images_and_hyperparameters(way):
    from tensorboard.plugins.hparams import plugin_data_pb2

    workdir = way.fixture("tiny_run")
    assert_tensorboard_equals_metrics(workdir)
    events = tensorboard_events(workdir)
    assert sorted(events.Tags()["images"]) == ["confusion_matrix/test", "curves"]
    for name in ("curves", "confusion_matrix/test"):
        (image,) = events.Images(name)
        assert image.step == 3 and image.width > 300 and image.height > 300
        assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(data)
               for tag, data in events.PluginTagToContent("hparams").items()}
    hparams = content["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["learning_rate"].number_value == 0.003 and hparams["dataset"].string_value == "tiny_digits"
    assert hparams["conv_features"].string_value == "32,64" and hparams["batch_norm"].bool_value is False
    metrics = {info.name.tag for info in content["_hparams_/experiment"].experiment.metric_infos}
    assert metrics == {"loss/train", "accuracy/train", "loss/test", "accuracy/test"}
    assert not [name for name in os.listdir(workdir / "tensorboard") if name.startswith(".")]  # no staging left


def test_resuming_after_a_lost_checkpoint_rewrites_its_epochs_once(tiny_run_in_process, tiny_data_dir, tmp_path):
    """Epochs 2 and 3 were logged but their checkpoints are gone (unreadable, moved aside): they are trained again,
    and the event files then hold the new epochs 2 and 3, not both versions."""
    workdir = tmp_path / "w"
    shutil.copytree(tiny_run_in_process, workdir)
    old_files = set(os.listdir(workdir / "tensorboard"))
    for step in ("40", "60"):
        shutil.rmtree(workdir / "checkpoints" / step)
    result = retrain(workdir, tiny_data_dir)
    assert "resumed from" in result.stdout and "epoch 3/3" in result.stdout
    assert_tensorboard_equals_metrics(workdir)
    new_files = set(os.listdir(workdir / "tensorboard"))
    assert len(old_files) == len(new_files) == 4 and len(old_files & new_files) == 1  # only epoch 1's file stayed
    assert summaries.has_final(str(workdir))
    assert results(read_jsonl(workdir / "metrics.jsonl")) == results(read_jsonl(tiny_run_in_process / "metrics.jsonl"))


def test_a_kill_between_the_last_checkpoint_and_its_event_files_is_repaired(tiny_run_in_process, tiny_data_dir,
                                                                            tmp_path):
    """The last checkpoint is saved, then the run dies before epoch 3's event file and the final one are in place,
    maybe in the middle of staging one: running the command again writes what is missing, once."""
    workdir = tmp_path / "w"
    shutil.copytree(tiny_run_in_process, workdir)
    board = workdir / "tensorboard"
    for name in os.listdir(board):
        if name.endswith((".epoch-00003", ".final")):
            os.remove(board / name)
    staged = board / ".staging-killed"
    staged.mkdir()
    (staged / "events.out.tfevents.0.host.epoch-00003").write_bytes(b"\x10\x00")  # a half-written file
    assert summaries.written_epochs(str(workdir)) == [1, 2] and not summaries.has_final(str(workdir))
    result = retrain(workdir, tiny_data_dir)
    assert "run complete" in result.stdout
    assert not staged.exists()
    assert_tensorboard_equals_metrics(workdir)
    assert summaries.has_final(str(workdir))
    assert sorted(tensorboard_events(workdir).Tags()["images"]) == ["confusion_matrix/test", "curves"]


def test_the_confusion_matrix_image_counts_the_logged_test_accuracy(tiny_run_in_process, tiny_data_dir, tmp_path,
                                                                    monkeypatch):
    """The matrix drawn into the final file is that of the finished model on the test split: its trace over its
    total is the last logged test accuracy."""
    drawn = []
    monkeypatch.setattr(summaries, "write_final", lambda workdir, config, history, matrix, names: drawn.append(matrix))
    workdir = tmp_path / "w"
    shutil.copytree(tiny_run_in_process, workdir)
    for name in os.listdir(workdir / "tensorboard"):
        if name.endswith(".final"):
            os.remove(workdir / "tensorboard" / name)
    retrain(workdir, tiny_data_dir)
    (matrix,) = drawn
    assert matrix.shape == (10, 10) and matrix.sum() == 200  # tiny_digits' test split
    last = read_jsonl(workdir / "metrics.jsonl")[-1]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(last["test_accuracy"], abs=1e-9)
