"""Transfer learning and training on N examples: `python -m mnist_jax.transfer`, `--train-examples`."""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from mnist_jax import data, transfer
from mnist_jax.checkpoint import restore_model
from mnist_jax.config import ARCHITECTURE_FIELDS, PRESETS, Config, UserError, validate
from mnist_jax.evaluate import evaluate
from mnist_jax.predict import predict_files

from helpers import (REPO, TINY, TINY_FLAGS, cli_env, make_tiny_images, read_jsonl, results, snapshot, train_run,
                     trained_once)

FIVE_FLAGS = ("--dataset", "tiny_five", "--epochs", "3", "--train-examples", "160", "--freeze", "features")


def transfer_args(source, data_dir, *flags):
    """The transfer command's arguments after `--workdir DIR`."""
    return ["--from", str(source), "--data-dir", str(data_dir), *TINY_FLAGS, *FIVE_FLAGS, *flags]


def transfer_command(source, workdir, data_dir, *flags):
    return [sys.executable, "-m", "mnist_jax.transfer", "--workdir", str(workdir),
            *transfer_args(source, data_dir, *flags)]


@pytest.fixture(scope="session")
def frozen_run(tiny_run, tiny_variants_dir, tmp_path_factory):
    """tiny_digits (10 classes) -> tiny_five (5 classes) on 160 examples, conv features frozen, 3 epochs."""
    return trained_once(tmp_path_factory, "frozen-transfer-run", *transfer_args(tiny_run, tiny_variants_dir),
                        module="mnist_jax.transfer")


@pytest.fixture(scope="session")
def frozen_run_in_process(tiny_run_in_process, tiny_variants_dir, tmp_path_factory):
    """frozen_run, from tiny_run_in_process by the transfer command's main in a test process."""
    return trained_once(tmp_path_factory, "frozen-transfer-run-in-process",
                        *transfer_args(tiny_run_in_process, tiny_variants_dir), module="mnist_jax.transfer",
                        in_process=True)


def leaves(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_frozen_features_are_bit_identical_and_the_head_is_new(way):
    frozen_run, tiny_run = way.fixture("frozen_run"), way.fixture("tiny_run")
    source, trained = restore_model(str(tiny_run), "best"), restore_model(str(frozen_run), "latest")
    assert trained.step == 15  # 160 examples / batch 32 = 5 steps, 3 epochs
    src, new = source.variables["params"], trained.variables["params"]
    for layer in ("conv1_1", "conv2_1"):
        for name, value in leaves(src[layer]).items():
            np.testing.assert_array_equal(leaves(new[layer])[name], value, err_msg=f"{layer}{name} changed")
    assert not np.array_equal(np.asarray(new["dense1"]["kernel"]), np.asarray(src["dense1"]["kernel"]))
    assert new["head"]["kernel"].shape == (256, 5) and new["head"]["bias"].shape == (5,)
    assert src["head"]["kernel"].shape == (256, 10)
    config = json.loads((frozen_run / "config.json").read_text())
    assert config["transfer_from"] == str(tiny_run) and config["freeze"] == "features"
    assert config["train_examples"] == 160 and config["conv_features"] == [32, 64]
    history = read_jsonl(frozen_run / "metrics.jsonl")
    assert [h["step"] for h in history] == [5, 10, 15]
    assert history[-1]["test_accuracy"] > 0.5  # chance is 0.2: the transferred features carry over
    assert (frozen_run / "curves.png").exists()


def test_evaluate_and_predict_work_on_a_transfer_run(frozen_run_in_process, tiny_variants_dir, tmp_path):
    frozen_run = frozen_run_in_process
    report = evaluate(str(frozen_run), checkpoint="latest", data_dir=str(tiny_variants_dir),
                      out_dir=str(tmp_path / "eval"))
    assert report["accuracy"] == pytest.approx(read_jsonl(frozen_run / "metrics.jsonl")[-1]["test_accuracy"])
    assert len(report["class_names"]) == 5
    path = tmp_path / "digit.png"
    Image.fromarray(make_tiny_images(np.array([3]), np.random.default_rng(0))[0, ..., 0]).save(path)
    [result] = predict_files(str(frozen_run), [str(path)])
    assert len(result["probabilities"]) == 5


@pytest.mark.e2e
def test_killed_transfer_run_resumes_exactly_without_its_source(frozen_run, tiny_run, tiny_variants_dir, tmp_path):
    """kill -9 after the first epoch, delete the source, run the same command: same params and metrics."""
    source = tmp_path / "source"
    shutil.copytree(tiny_run, source)
    workdir = tmp_path / "w"
    command = transfer_command(source, workdir, tiny_variants_dir)
    process = subprocess.Popen(command, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    shutil.rmtree(source)
    result = subprocess.run(command, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert results(read_jsonl(metrics)) == results(read_jsonl(frozen_run / "metrics.jsonl"))
    resumed, reference = restore_model(str(workdir), "latest"), restore_model(str(frozen_run), "latest")
    assert resumed.step == reference.step == 15
    for name, value in leaves(reference.variables).items():
        np.testing.assert_array_equal(leaves(resumed.variables)[name], value, err_msg=name)


def test_full_fine_tune_keeps_the_head_when_classes_agree_and_moves_every_layer(tiny_run_in_process, tiny_data_dir,
                                                                             tmp_path):
    tiny_run = tiny_run_in_process
    requested = Config(dataset=TINY, batch_size=32, eval_batch_size=100, epochs=1, train_examples=64, seed=3)
    config = transfer.plan(str(tmp_path / "w"), str(tiny_run), requested, set(), str(tiny_data_dir))
    assert config.freeze == "none" and config.transfer_from == str(tiny_run)
    train_run(config, tmp_path / "w", tiny_data_dir, devices=None,
              initial_state=transfer.initial_state_from(str(tiny_run)))
    source, trained = restore_model(str(tiny_run), "best"), restore_model(str(tmp_path / "w"), "latest")
    src, new = leaves(source.variables["params"]), leaves(trained.variables["params"])
    assert src.keys() == new.keys()
    for name in src:  # every layer trained, and started from the source (2 steps move it only a little)
        assert not np.array_equal(src[name], new[name]), name
        assert np.abs(src[name] - new[name]).max() < 0.05, name


def test_subset_is_balanced_deterministic_nested_and_from_train(tiny_data_dir):
    labels = np.repeat(np.arange(10), 100)[np.random.default_rng(0).permutation(1000)]
    for size in (10, 25, 100, 999):
        picked = data.balanced_subset(labels, size, 10, seed=7)
        counts = np.bincount(labels[picked], minlength=10)
        assert len(np.unique(picked)) == size and counts.max() - counts.min() <= 1
        np.testing.assert_array_equal(picked, data.balanced_subset(labels.copy(), size, 10, seed=7))
    small, large = data.balanced_subset(labels, 100, 10, 7), data.balanced_subset(labels, 500, 10, 7)
    assert set(small) <= set(large)
    assert not np.array_equal(small, data.balanced_subset(labels, 100, 10, seed=8))
    # Through the loader: the subset is exactly those rows of the train split, the test split untouched.
    images, train_labels = data.load_split_numpy(TINY, "train", str(tiny_data_dir))
    dataset = data.load_dataset(TINY, str(tiny_data_dir), train_examples=50, subset_seed=7)
    keep = data.balanced_subset(train_labels, 50, 10, 7)
    np.testing.assert_array_equal(np.asarray(dataset.train.images), images[keep])
    np.testing.assert_array_equal(np.bincount(np.asarray(dataset.train.labels)), [5] * 10)
    assert dataset.test.labels.shape == (200,)


def test_subset_errors():
    labels = np.repeat(np.arange(10), 3)
    with pytest.raises(UserError, match="larger than the training split"):
        data.balanced_subset(labels, 31, 10, 0)
    with pytest.raises(UserError, match="needs 2 examples of class 9, the training split has 1"):
        data.balanced_subset(np.repeat(np.arange(10), [3] * 9 + [1]), 20, 10, 0)
    with pytest.raises(UserError, match="smaller than --batch-size 128"):
        validate(Config(train_examples=100))
    with pytest.raises(UserError, match="--freeze features needs"):
        validate(Config(freeze="features"))


BAD_CASES = {
    "missing": "no such directory",
    "corrupt": "is not a usable source run",
    "channels": "transfer needs the same image shape and channels",
    "architecture": "the architecture comes from the --from run",
}


def bad_case(case, tiny_run, tmp_path):
    """(source, flags) of one kind of bad input."""
    if case == "missing":
        return tmp_path / "nowhere", ("--dataset", "tiny_five")
    if case == "corrupt":
        (tmp_path / "corrupt" / "checkpoints" / "60").mkdir(parents=True)
        (tmp_path / "corrupt" / "checkpoints" / "60" / "garbage").write_text("not a checkpoint")
        return tmp_path / "corrupt", ("--dataset", "tiny_five")
    if case == "channels":
        return tiny_run, ("--dataset", "tiny_rgb")
    return tiny_run, ("--dataset", "tiny_five", "--conv-features", "16,32")


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_user_error_and_creates_nothing(case, tiny_run_in_process, tiny_variants_dir, tmp_path):
    tiny_run = tiny_run_in_process
    source, flags = bad_case(case, tiny_run, tmp_path)
    before = snapshot(tiny_run)
    with pytest.raises(UserError, match=BAD_CASES[case]):
        transfer.main(["--from", str(source), "--workdir", str(tmp_path / "w"), "--data-dir",
                       str(tiny_variants_dir), "--no-progress", *flags])
    assert not (tmp_path / "w").exists()
    assert snapshot(tiny_run) == before


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(way, tiny_variants_dir, tmp_path):
    tiny_run = way.fixture("tiny_run")
    for flags, expected in ((("--dataset", "tiny_rgb"), BAD_CASES["channels"]),
                            (("--freeze", "everything"), "invalid choice")):
        result = way.run("mnist_jax.transfer", "--from", tiny_run, "--workdir", tmp_path / "w", "--data-dir",
                         tiny_variants_dir, "--no-progress", *flags)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_transfer_inherits_every_architecture_field_of_the_source():
    """The strong preset's architecture (two convs per block, grouped batch norm) comes over whole."""
    source = PRESETS["strong"]
    config = transfer.transfer_config(source, Config(dataset="kmnist"), {"dataset"}, "/runs/src", "features")
    assert {name: getattr(config, name) for name in ARCHITECTURE_FIELDS} == {
        name: getattr(source, name) for name in ARCHITECTURE_FIELDS}
    assert {"convs_per_block", "pooling", "batch_norm_groups"} <= set(ARCHITECTURE_FIELDS)
    assert config.dataset == "kmnist" and config.epochs == Config().epochs and config.freeze == "features"
    with pytest.raises(UserError, match=r"convs_per_block=2 \(asked 1\)"):
        transfer.transfer_config(source, Config(), {"convs_per_block"}, "/runs/src", "none")
