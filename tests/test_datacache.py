"""The decoded-split cache: tfds's arrays, read without TensorFlow once cached; never stale, never fatal."""

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mnist_jax import data, datacache

from helpers import TINY, cli_env, write_tiny_dataset


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty cache of this test's own."""
    monkeypatch.setenv(datacache.CACHE_VARIABLE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def load(split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    """`data.load_split_numpy` as a new process would run it: without the split already in memory."""
    data._load_split_cached.cache_clear()
    try:
        return data.load_split_numpy(TINY, split, str(data_dir))
    finally:
        data._load_split_cached.cache_clear()


def decoded_by_tfds(split: str, data_dir, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    with monkeypatch.context() as patch:
        patch.setenv(datacache.CACHE_VARIABLE, "off")
        return load(split, data_dir)


def digest(images: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def first_read_caches_the_split(cache, tiny_data_dir, monkeypatch):
    """Reads the test split with the cache on: the arrays tfds decodes, and one cache entry for them. Returns what
    tfds decoded."""
    expected = decoded_by_tfds("test", tiny_data_dir, monkeypatch)
    assert not cache.exists()  # off means off
    images, labels = load("test", tiny_data_dir)
    np.testing.assert_array_equal(images, expected[0])
    np.testing.assert_array_equal(labels, expected[1])
    [entry] = cache.iterdir()
    assert entry.name.startswith("tiny_digits-1.0.0-test-") and entry.suffix == ".npz"
    return expected


def test_a_cached_split_is_read_back_without_decoding(cache, tiny_data_dir, monkeypatch):
    """In this process (the fast tier's part of the next test): the first read caches the split, the next read
    returns the same arrays without tfds decoding anything."""
    import tensorflow_datasets as tfds

    expected = first_read_caches_the_split(cache, tiny_data_dir, monkeypatch)

    def decoding(*args, **kwargs):
        pytest.fail("a cached split was decoded again")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", decoding)
    monkeypatch.setattr(tfds, "as_numpy", decoding)
    assert digest(*load("test", tiny_data_dir)) == digest(*expected)


@pytest.mark.e2e
def test_a_new_process_reads_the_cached_split_without_tensorflow(cache, tiny_data_dir, monkeypatch):
    expected = first_read_caches_the_split(cache, tiny_data_dir, monkeypatch)
    read = ("import sys; from mnist_jax import data; "
            f"images, labels = data.load_split_numpy({TINY!r}, 'test', {str(tiny_data_dir)!r}); "
            "import hashlib; print('tensorflow' in sys.modules, "
            "hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest())")
    result = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=120,
                            env={**cli_env(), datacache.CACHE_VARIABLE: str(cache)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", digest(*expected)]


def test_a_sliced_split_is_its_own_entry_and_equals_the_slice(cache, tiny_data_dir, monkeypatch):
    full_images, full_labels = decoded_by_tfds("train", tiny_data_dir, monkeypatch)
    for _ in range(2):  # decoded, then cached
        images, labels = load("train[100:250]", tiny_data_dir)
        np.testing.assert_array_equal(images, full_images[100:250])
        np.testing.assert_array_equal(labels, full_labels[100:250])
    assert [entry.name.split("-")[2] for entry in cache.iterdir()] == ["train_100_250_"]


def test_a_re_prepared_dataset_is_decoded_again(cache, tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    write_tiny_dataset(data_dir, train=20, test=30, seed=0)
    first = load("test", data_dir)
    shutil.rmtree(data_dir)
    write_tiny_dataset(data_dir, train=20, test=30, seed=5)  # same name, version and size; other images
    second = load("test", data_dir)
    assert digest(*second) != digest(*first)
    assert digest(*second) == digest(*decoded_by_tfds("test", data_dir, monkeypatch))
    assert len(list(cache.iterdir())) == 2


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _garbage(path):
    path.write_bytes(b"not an npz file")


def _too_few_examples(path):
    with np.load(path) as entry:
        np.savez(path, images=entry["images"][:-1], labels=entry["labels"][:-1])


def _wrong_dtype(path):
    with np.load(path) as entry:
        np.savez(path, images=entry["images"].astype(np.float32), labels=entry["labels"])


@pytest.mark.parametrize("spoil", [_truncate, _garbage, _too_few_examples, _wrong_dtype])
def test_an_unsound_entry_is_decoded_again_and_replaced(cache, tiny_data_dir, monkeypatch, spoil):
    expected = decoded_by_tfds("test", tiny_data_dir, monkeypatch)
    load("test", tiny_data_dir)
    [entry] = cache.iterdir()
    spoil(entry)
    assert digest(*load("test", tiny_data_dir)) == digest(*expected)
    with np.load(entry) as repaired:  # the entry is whole again
        assert digest(repaired["images"], repaired["labels"]) == digest(*expected)
    assert [path.name for path in cache.iterdir()] == [entry.name]  # and no temporary file is left


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, tiny_data_dir, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(datacache.CACHE_VARIABLE, str(tmp_path / "a-file" / "cache"))  # mkdir fails
    expected = decoded_by_tfds("test", tiny_data_dir, monkeypatch)
    assert digest(*load("test", tiny_data_dir)) == digest(*expected)


def test_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.delenv(datacache.CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datacache.cache_dir() == tmp_path / "xdg" / "mnist_jax" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datacache.cache_dir() == tmp_path / "home" / ".cache" / "mnist_jax" / "data"
    monkeypatch.setenv(datacache.CACHE_VARIABLE, str(tmp_path / "mine"))
    assert datacache.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(datacache.CACHE_VARIABLE, "off")
    assert datacache.cache_dir() is None and datacache.entry_path(str(tmp_path), "test") is None


def test_writing_leaves_a_whole_entry_or_none(tmp_path, monkeypatch):
    """A write that fails half-way (here: the disk is full) leaves neither the entry nor its temporary file."""
    path = tmp_path / "cache" / "entry.npz"

    def disk_full(file, **arrays):
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    datacache._write(path, np.zeros((2, 28, 28, 1), np.uint8), np.zeros(2, np.int32))
    assert list(path.parent.iterdir()) == []
