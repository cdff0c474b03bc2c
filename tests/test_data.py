import socket

import jax
import numpy as np
import pytest

from mnist_jax import data
from mnist_jax.config import UserError

from helpers import TINY


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
    assert str(tmp_path) in str(error.value) and "no network" in str(error.value)
    assert type(tfds.builder("mnist", data_dir=str(tmp_path))).download_and_prepare is download  # the one it calls


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
