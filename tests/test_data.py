import shutil
import socket

import jax
import numpy as np
import pytest

from mnist_jax import data
from mnist_jax.config import UserError

from helpers import (REAL_DATA_VARIABLE, REPO, SHARED_DATA, TINY, TINY_FLAGS, real_data_dir, real_data_missing,
                     run_main_in_process, run_module)


def test_loader_reads_a_tfds_dataset_onto_the_device(tiny_data_dir):
    dataset = data.load_dataset(TINY, str(tiny_data_dir))
    assert dataset.train.images.shape == (640, 28, 28, 1) and dataset.train.images.dtype == np.uint8
    assert dataset.test.labels.shape == (200,) and dataset.test.labels.dtype == np.int32
    assert dataset.num_classes == 10 and dataset.image_shape == (28, 28, 1)
    assert isinstance(dataset.train.images, jax.Array)
    images = np.asarray(dataset.train.images) / 255.0
    assert dataset.mean == pytest.approx(images.mean()) and dataset.std == pytest.approx(images.std())


def test_loader_keeps_the_split_order(tiny_data_dir):
    images, labels = data.load_split_numpy(TINY, "test", str(tiny_data_dir))
    again, labels_again = data.load_split_numpy(TINY, "test", str(tiny_data_dir))
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert np.bincount(labels).tolist() == [20] * 10


def test_data_dir_falls_back_to_the_environment(monkeypatch, tiny_data_dir):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tiny_data_dir))
    assert data.resolve_data_dir(None) == str(tiny_data_dir)
    assert data.resolve_data_dir("/explicit") == "/explicit"
    assert data.load_split_numpy(TINY, "train", data.resolve_data_dir(None))[0].shape[0] == 640


def test_unknown_dataset_is_a_user_error(tiny_data_dir):
    with pytest.raises(UserError, match="unknown dataset 'no_such_set'"):
        data.load_dataset("no_such_set", str(tiny_data_dir))


def test_missing_dataset_offline_fails_at_once_naming_data_dir(monkeypatch, tmp_path):
    """Offline, a dataset missing from --data-dir is a UserError before any download or network attempt (tfds
    alone would retry its download for minutes): both fail the test here if they are tried."""
    import tensorflow_datasets as tfds

    def attempted(what):
        def fail(*args, **kwargs):
            pytest.fail(f"{what} attempted for a missing dataset while offline")
        return fail

    monkeypatch.setenv("MNIST_JAX_OFFLINE", "1")
    download = attempted("download_and_prepare")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, attempted(f"socket.{name}"))
    monkeypatch.setattr(socket.socket, "connect", attempted("socket.connect"))
    with pytest.raises(UserError, match="--data-dir") as error:
        data.load_dataset("mnist", str(tmp_path))
    assert str(error.value).startswith(f"dataset 'mnist' is not prepared in {tmp_path} (no {tmp_path}/mnist/")
    assert "no network" in str(error.value)
    assert type(tfds.builder("mnist", data_dir=str(tmp_path))).download_and_prepare is download  # the one it calls


@pytest.mark.e2e
def test_without_data_dir_the_error_names_tfds_default_folder(monkeypatch, tmp_path):
    """No --data-dir and no $TFDS_DATA_DIR: the message names the folder tfds looked in, ~/tensorflow_datasets."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    result = run_module("mnist_jax.train", "--workdir", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: dataset 'mnist' is not prepared in {tmp_path / 'tensorflow_datasets'} "
                                    f"(no {tmp_path / 'tensorflow_datasets' / 'mnist'}/"), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", ["tfds/tiny_digits", "tfds/tiny_digits/1.0.0", "tfds/tiny_digits/", "."])
def test_a_data_dir_a_level_off_is_named_with_the_one_that_holds_the_dataset(given, tiny_data_dir, tmp_path):
    """One or two levels too deep (the dataset's own folder, its version folder), or one too high; through the
    training command, which then creates nothing."""
    from mnist_jax.train import main as train_main

    shutil.copytree(tiny_data_dir, tmp_path / "tfds", ignore=shutil.ignore_patterns("*.lock", ".done"))
    given = f"{tmp_path}/{given}"
    result = run_main_in_process(train_main, "--workdir", tmp_path / "run", "--data-dir", given, *TINY_FLAGS)
    assert result.returncode == 2
    assert result.stderr == (f"error: dataset 'tiny_digits' is not in the data dir {given} but in "
                             f"{tmp_path / 'tfds'}: pass --data-dir {tmp_path / 'tfds'} (the folder that holds "
                             "tiny_digits/)\n")
    assert not (tmp_path / "run").exists()


def test_a_data_dir_too_deep_is_named_for_a_tfds_dataset_too(shared_data_dir):
    """A registered dataset (mnist) takes the other path: found by name, not prepared where pointed; no download
    starts even where a network exists."""
    for given in (shared_data_dir / "mnist", shared_data_dir / "mnist" / "3.0.1"):
        with pytest.raises(UserError) as error:
            data.load_split_numpy("mnist", "test", str(given))
        assert str(error.value) == (f"dataset 'mnist' is not in the data dir {given} but in {shared_data_dir}: pass "
                                    f"--data-dir {shared_data_dir} (the folder that holds mnist/)")


def test_the_slow_tests_real_data_dir_is_a_documented_knob(monkeypatch, tmp_path):
    """$MNIST_JAX_TEST_DATA_DIR points the `slow` tests at real MNIST anywhere; their skip message names it."""
    monkeypatch.delenv(REAL_DATA_VARIABLE, raising=False)
    assert real_data_dir() == SHARED_DATA
    monkeypatch.setenv(REAL_DATA_VARIABLE, str(tmp_path))
    assert real_data_dir() == tmp_path
    assert real_data_missing(tmp_path) == (f"real MNIST not available: no {tmp_path / 'mnist'}; set "
                                           f"{REAL_DATA_VARIABLE} to a tfds data dir that holds mnist prepared")
    (tmp_path / "mnist").mkdir()
    assert real_data_missing(tmp_path) is None
    readme = (REPO / "README.md").read_text()
    assert f"{REAL_DATA_VARIABLE}=" in readme


def test_epoch_permutation_is_a_keyed_shuffle_without_repeats():
    key = jax.random.PRNGKey(0)
    perm = np.asarray(data.epoch_permutation(key, 1000, 128))
    assert perm.shape == (7, 128)
    assert len(set(perm.ravel().tolist())) == 7 * 128
    np.testing.assert_array_equal(perm, np.asarray(data.epoch_permutation(key, 1000, 128)))
    assert not np.array_equal(perm, np.asarray(data.epoch_permutation(jax.random.PRNGKey(1), 1000, 128)))


def test_eval_batches_cover_every_example_exactly_once():
    indices, masks = data.eval_batches(1003, 100)
    assert indices.shape == masks.shape == (11, 100)
    np.testing.assert_array_equal(np.sort(indices[masks]), np.arange(1003))
    assert masks.sum() == 1003
