"""Runs written before the model's layers had names (linen's Conv_0, BatchNorm_0, Dense_0, ...) still restore,
resume and evaluate, and a seed still starts from the weights it always started from.

tests/data/pre_rename_run was written by the code of commit 5c27fd1, before the rename: `train_and_evaluate` of its
config.json on tiny_digits (two epochs, checkpoints at steps 2 and 4; two conv blocks of two convs, grouped batch
norm, dropout, augmentation, label smoothing and a moving average, so every kind of layer and state is in it), and
`initial_variables_seed7.npz`: that code's initial variables of the same model from PRNGKey(7). Its checkpoints are
kept as `saved-checkpoints/` (a name no .gitignore rule covers) and copied into a workdir for each test.
"""

import json
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnist_jax import checkpoint, steps, workdir
from mnist_jax.config import RunOptions
from mnist_jax.evaluate import evaluate
from mnist_jax.model import build_model, initial_variables
from mnist_jax.optim import make_optimizer
from mnist_jax.training import train_and_evaluate

from helpers import REPO

PRE_RENAME_RUN = REPO / "tests" / "data" / "pre_rename_run"
SAVED_CHECKPOINTS = PRE_RENAME_RUN / "saved-checkpoints"
# Written out by hand rather than computed, so the test does not share the code it checks.
NEW_NAMES = {"Conv_0": "conv1_1", "Conv_1": "conv1_2", "Conv_2": "conv2_1", "Conv_3": "conv2_2",
             "BatchNorm_0": "conv1_1_bn", "BatchNorm_1": "conv1_2_bn", "BatchNorm_2": "conv2_1_bn",
             "BatchNorm_3": "conv2_2_bn", "BatchNorm_4": "dense1_bn", "Dense_0": "dense1", "Dense_1": "head"}
TIMING_FIELDS = {"train_images_per_second", "elapsed_seconds"}


def renamed_path(path: str) -> str:
    for old, new in NEW_NAMES.items():
        path = path.replace(f"'{old}'", f"'{new}'")
    return path


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture
def config():
    return workdir.read_config(str(PRE_RENAME_RUN))


def copy_of_the_run(workdir):
    """The pre-rename run as a workdir: its config, metrics and checkpoints/."""
    shutil.copytree(PRE_RENAME_RUN, workdir, ignore=shutil.ignore_patterns("saved-checkpoints"))
    shutil.copytree(SAVED_CHECKPOINTS, workdir / "checkpoints")
    return workdir


def test_a_seed_draws_the_initial_weights_it_drew_before_the_rename(config):
    model = build_model(config, 10, 0.2, 0.3)
    ours = leaves_by_path(initial_variables(model, jax.random.PRNGKey(7), (28, 28, 1)))
    recorded = np.load(PRE_RENAME_RUN / "initial_variables_seed7.npz")
    assert sorted(renamed_path(path) for path in recorded.files) == sorted(ours)
    for path in recorded.files:  # the same bits on the machine that wrote them; other CPUs may round differently
        np.testing.assert_allclose(ours[renamed_path(path)], recorded[path], rtol=1e-6, atol=1e-7, err_msg=path)


def test_a_pre_rename_checkpoint_restores_every_array_to_its_named_place(config, tmp_path):
    copy_of_the_run(tmp_path / "run")
    raw = ocp.StandardCheckpointer().restore(SAVED_CHECKPOINTS / "4" / "state")  # old names, as saved
    model = build_model(config, 10, 0.2, 0.3)
    fresh = steps.create_train_state(model, make_optimizer(config, 2), jax.random.PRNGKey(0), (28, 28, 1),
                                     moving_average=True)
    manager = checkpoint.open_manager(str(tmp_path / "run"))
    state, meta = checkpoint.restore_latest(str(tmp_path / "run"), manager, fresh)
    manager.close()
    assert meta["epoch"] == 2 and int(state.step) == 4
    for name in ("params", "batch_stats", "ema"):
        restored = leaves_by_path(getattr(state, name))
        expected = {renamed_path(path): leaf for path, leaf in leaves_by_path(raw[name]).items()}
        assert restored.keys() == expected.keys(), name
        for path, leaf in expected.items():
            np.testing.assert_array_equal(restored[path], leaf, err_msg=f"{name}{path}")
    # The optimiser's moments are keyed by layer too (Orbax saved its NamedTuples' fields as dict keys).
    restored = {re.sub(r"\.(\w+)", r"['\1']", path): leaf for path, leaf in leaves_by_path(state.opt_state).items()}
    expected = {renamed_path(path): leaf for path, leaf in leaves_by_path(raw["opt_state"]).items()}
    assert restored.keys() == expected.keys() and "[0]['mu']['conv1_1']['kernel']" in expected
    for path, leaf in expected.items():
        np.testing.assert_array_equal(restored[path], leaf, err_msg=f"opt_state{path}")


@pytest.mark.e2e  # a kill-and-resume test: the full suite runs it
def test_a_pre_rename_run_resumes_to_the_figures_it_recorded(config, tiny_data_dir, tmp_path):
    """Killed after epoch 1 (its step-4 checkpoint removed), the run resumes under the new names and ends where the
    old code ended it (exactly on the machine that wrote it; CPUs with other kernels round differently)."""
    shutil.rmtree(copy_of_the_run(tmp_path / "run") / "checkpoints" / "4")
    history = train_and_evaluate(config, RunOptions(workdir=str(tmp_path / "run"), data_dir=str(tiny_data_dir),
                                                    devices=1, progress=False, plots=False))
    recorded = [json.loads(line) for line in (PRE_RENAME_RUN / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history] == [2, 4]
    for ours, theirs in zip(history, recorded):
        for key, value in theirs.items():
            if key not in TIMING_FIELDS:
                assert ours[key] == pytest.approx(value, rel=1e-4), key
    resumed = checkpoint.restore_model(str(tmp_path / "run"), "latest")
    assert "conv1_1" in resumed.variables["params"] and "Conv_0" not in resumed.variables["params"]


def test_a_pre_rename_run_evaluates(tiny_data_dir, tmp_path):
    report = evaluate(str(copy_of_the_run(tmp_path / "run")), checkpoint="latest", data_dir=str(tiny_data_dir),
                      out_dir=str(tmp_path / "eval"))
    recorded = json.loads((PRE_RENAME_RUN / "metrics.jsonl").read_text().splitlines()[-1])
    assert report["checkpoint_step"] == 4
    assert report["accuracy"] == pytest.approx(recorded["test_accuracy"], abs=0.01)  # at most 2 of 200 images
