"""Every plot must produce a complete, sensibly sized PNG, including edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_jax import plots
from mnist_jax.metrics import classification_report
from mnist_jax.plots import (
    most_confident_mistakes,
    plot_confusion_matrix,
    plot_curves,
    plot_mistakes,
    plot_per_class,
    plot_samples,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = [str(digit) for digit in range(10)]


def assert_valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()  # decodes every pixel, so a truncated file fails here
        assert image.format == "PNG"
        width, height = image.size
    assert 300 <= width <= 4000 and 300 <= height <= 4000, (width, height)
    # No temporary files left behind by the atomic write.
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []
    return width, height


def assert_not_blank(path: Path) -> None:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5.0


def make_history(epochs: int, with_validation: bool) -> list[dict[str, float]]:
    history = []
    for epoch in range(1, epochs + 1):
        entry = {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "train_accuracy": 1.0 - 0.5 / epoch,
            "test_loss": 1.2 / epoch,
            "test_accuracy": 1.0 - 0.6 / epoch,
        }
        if with_validation:
            entry |= {"validation_loss": 1.1 / epoch, "validation_accuracy": 1.0 - 0.55 / epoch}
        history.append(entry)
    return history


@pytest.fixture(scope="module")
def predictions_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    count = 40
    labels = rng.integers(0, 10, count)
    predictions = np.where(rng.random(count) < 0.7, labels, rng.integers(0, 10, count))
    logits = rng.normal(size=(count, 10))
    logits[np.arange(count), predictions] += 3.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = rng.integers(0, 256, (count, 28, 28)).astype(np.uint8)
    return {"images": images, "labels": labels, "predictions": predictions, "probabilities": probabilities}


@pytest.mark.parametrize("epochs,with_validation", [(1, False), (5, False), (5, True)])
def test_plot_curves(tmp_path: Path, epochs: int, with_validation: bool) -> None:
    path = tmp_path / "curves.png"
    plot_curves(make_history(epochs, with_validation), path)
    width, height = assert_valid_png(path)
    assert width > height  # two panels side by side
    assert_not_blank(path)


def test_plot_curves_rejects_empty_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_curves([], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_plot_confusion_matrix(tmp_path: Path, predictions_data: dict[str, np.ndarray]) -> None:
    report = classification_report(predictions_data["labels"], predictions_data["predictions"], 10)
    path = tmp_path / "confusion.png"
    plot_confusion_matrix(np.array(report["confusion_matrix"]), CLASS_NAMES, path)
    assert_valid_png(path)
    assert_not_blank(path)
    with pytest.raises(ValueError):
        plot_confusion_matrix(np.zeros((3, 3)), CLASS_NAMES, tmp_path / "bad.png")


@pytest.mark.parametrize("channel_axis", [False, True])
def test_plot_samples(tmp_path: Path, predictions_data: dict[str, np.ndarray], channel_axis: bool) -> None:
    images = predictions_data["images"][:16]
    if channel_axis:
        images = images[..., None]
    path = tmp_path / "samples.png"
    plot_samples(images, predictions_data["labels"][:16], predictions_data["predictions"][:16], CLASS_NAMES, path)
    assert_valid_png(path)


def test_plot_samples_single_image(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    plot_samples(np.zeros((1, 28, 28)), [3], [3], CLASS_NAMES, path)
    assert_valid_png(path)


def test_plot_samples_marks_mistakes_in_red(tmp_path: Path) -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    correct, wrong = tmp_path / "correct.png", tmp_path / "wrong.png"
    plot_samples(images, [1, 2], [1, 2], CLASS_NAMES, correct)
    plot_samples(images, [1, 2], [1, 7], CLASS_NAMES, wrong)

    def red_pixel_count(path: Path) -> int:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB")).astype(int)
        return int(np.sum((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)))

    assert red_pixel_count(correct) == 0
    assert red_pixel_count(wrong) > 20


def test_most_confident_mistakes_order() -> None:
    labels = np.array([0, 1, 2, 3, 4])
    predictions = np.array([1, 1, 0, 0, 0])  # wrong at 0, 2, 3, 4
    probabilities = np.full((5, 3), 0.1)
    probabilities[[0, 2, 3, 4], [1, 0, 0, 0]] = [0.5, 0.9, 0.7, 0.95]
    probabilities[1, 1] = 0.99  # correct, must never appear
    np.testing.assert_array_equal(most_confident_mistakes(labels, predictions, probabilities, 10), [4, 2, 3, 0])
    np.testing.assert_array_equal(most_confident_mistakes(labels, predictions, probabilities, 2), [4, 2])


def test_plot_mistakes(tmp_path: Path, predictions_data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "mistakes.png"
    plot_mistakes(
        predictions_data["images"][..., None],
        predictions_data["labels"],
        predictions_data["predictions"],
        predictions_data["probabilities"],
        CLASS_NAMES,
        path,
        count=12,
    )
    assert_valid_png(path)


def test_plot_mistakes_without_mistakes(tmp_path: Path, predictions_data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "mistakes.png"
    labels = predictions_data["labels"]
    plot_mistakes(predictions_data["images"], labels, labels, predictions_data["probabilities"], CLASS_NAMES, path)
    assert_valid_png(path)
    assert_not_blank(path)


def test_plot_per_class(tmp_path: Path, predictions_data: dict[str, np.ndarray]) -> None:
    report = classification_report(predictions_data["labels"], predictions_data["predictions"], 10)
    path = tmp_path / "per_class.png"
    plot_per_class(report, CLASS_NAMES, path)
    assert_valid_png(path)
    assert_not_blank(path)


def test_write_is_atomic_when_rendering_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "curves.png"
    plot_curves(make_history(2, False), path)
    original_bytes = path.read_bytes()

    def failing_savefig(self, *args, **kwargs) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots.Figure, "savefig", failing_savefig)
    with pytest.raises(RuntimeError):
        plot_curves(make_history(3, False), path)
    assert path.read_bytes() == original_bytes  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # temp file cleaned up


def test_creates_missing_output_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "curves.png"
    plot_curves(make_history(1, True), path)
    assert_valid_png(path)


def test_plot_examples(tmp_path: Path, predictions_data: dict[str, np.ndarray]) -> None:
    path = tmp_path / "examples.png"
    plots.plot_examples(predictions_data["images"][:16], predictions_data["labels"][:16], CLASS_NAMES, path)
    assert_valid_png(path)
    assert_not_blank(path)
    with pytest.raises(ValueError, match="as many labels as images"):
        plots.plot_examples(predictions_data["images"][:4], predictions_data["labels"][:3], CLASS_NAMES, path)


def test_plot_class_balance(tmp_path: Path) -> None:
    path = tmp_path / "balance.png"
    plots.plot_class_balance({"train": np.arange(10) + 50, "test": np.full(10, 9)}, CLASS_NAMES, path)
    assert_valid_png(path)
    assert_not_blank(path)
    with pytest.raises(ValueError, match="9 counts for 10 classes"):
        plots.plot_class_balance({"train": np.ones(9)}, CLASS_NAMES, path)


def test_figures_render_to_the_pixels_their_png_holds(tmp_path: Path) -> None:
    """What TensorBoard gets (`figure_pixels`) is the image `plot_curves` writes."""
    history = make_history(3, with_validation=True)
    plot_curves(history, tmp_path / "curves.png")
    pixels = plots.figure_pixels(plots.curves_figure(history))
    with Image.open(tmp_path / "curves.png") as image:
        written = np.asarray(image.convert("RGB"))
    assert pixels.dtype == np.uint8 and pixels.shape == written.shape
    assert np.abs(pixels.astype(int) - written.astype(int)).mean() < 1.0
