"""Training and evaluation plots written as PNG files.

Figures are built from ``matplotlib.figure.Figure`` with an explicit Agg
canvas, never through pyplot, so plotting is headless, touches no global
state and is safe to call from anywhere (tests, training loops, threads).
Every file is written atomically: a crash never leaves a half-written PNG.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike

from mnist_jax.workdir import write_atomic

DPI = 110
MISTAKE_COLOUR = "tab:red"
CORRECT_COLOUR = "black"
SPLIT_STYLES = {  # history key prefix -> (legend label, colour)
    "train": ("train", "tab:blue"),
    "validation": ("validation", "tab:green"),
    "test": ("test", "tab:orange"),
}


def _new_figure(width_inches: float, height_inches: float) -> Figure:
    """A figure bound to the non-interactive Agg canvas."""
    figure = Figure(figsize=(width_inches, height_inches), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_atomically(figure: Figure, path: str | os.PathLike[str], **savefig_options: Any) -> None:
    """Render to memory, then replace ``path`` in one step: readers see the old file or the complete new one."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, **savefig_options)
    write_atomic(os.fspath(path), buffer.getvalue())


def _as_image_batch(images: ArrayLike) -> np.ndarray:
    """(N, H, W) from (N, H, W) or (N, H, W, 1)."""
    batch = np.asarray(images)
    if batch.ndim == 4 and batch.shape[-1] == 1:
        batch = batch[..., 0]
    if batch.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W) or (N, H, W, 1), got {np.asarray(images).shape}")
    return batch


def _message_figure(title: str, message: str) -> Figure:
    """A figure that states why there is nothing to plot, so the file still exists."""
    figure = _new_figure(6.0, 3.0)
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title, fontsize=13)
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, transform=axes.transAxes)
    return figure


def _image_grid(
    images: np.ndarray, titles: Sequence[str], colours: Sequence[str], columns: int, suptitle: str
) -> Figure:
    """Images in a grid with one coloured title each."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    title_lines = max(title.count("\n") + 1 for title in titles)
    figure = _new_figure(max(4.0, 1.5 * columns), max(3.0, 0.8 + rows * (1.3 + 0.25 * title_lines)))
    figure.suptitle(suptitle, fontsize=12)
    for index, (image, title, colour) in enumerate(zip(images, titles, colours)):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(image, cmap="gray", interpolation="nearest")
        axes.set_title(title, color=colour, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
        if colour == MISTAKE_COLOUR:
            for spine in axes.spines.values():
                spine.set_edgecolor(MISTAKE_COLOUR)
                spine.set_linewidth(2)
    return figure


def figure_pixels(figure: Figure) -> np.ndarray:
    """A figure rendered as (height, width, 3) uint8 RGB pixels, for image summaries."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def plot_curves(history: list[dict[str, float]], path: str | os.PathLike[str]) -> None:
    """Loss and accuracy per epoch for train/test (and validation when recorded)."""
    save_atomically(curves_figure(history), path)


def curves_figure(history: list[dict[str, float]]) -> Figure:
    """`plot_curves`' figure."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [entry["epoch"] for entry in history]
    figure = _new_figure(11.0, 4.5)
    figure.suptitle("Training curves", fontsize=13)
    for panel, (metric, label) in enumerate((("loss", "Loss"), ("accuracy", "Accuracy"))):
        axes = figure.add_subplot(1, 2, panel + 1)
        for split, (split_label, colour) in SPLIT_STYLES.items():
            key = f"{split}_{metric}"
            if all(key in entry for entry in history):
                # Markers keep a single-epoch history visible as points.
                axes.plot(epochs, [entry[key] for entry in history], marker="o", label=split_label, color=colour)
        axes.set_title(f"{label} per epoch")
        axes.set_xlabel("Epoch")
        axes.set_ylabel(label)
        # Half-epoch padding keeps a single epoch from getting fractional ticks.
        axes.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def plot_confusion_matrix(matrix: ArrayLike, class_names: list[str], path: str | os.PathLike[str]) -> None:
    """Confusion matrix heat map with the count written in every cell; rows are true classes."""
    save_atomically(confusion_matrix_figure(matrix, class_names), path)


def confusion_matrix_figure(matrix: ArrayLike, class_names: list[str]) -> Figure:
    """`plot_confusion_matrix`'s figure."""
    counts = np.asarray(matrix)
    num_classes = len(class_names)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"matrix shape {counts.shape} does not match {num_classes} class names")
    side = max(5.0, 0.6 * num_classes + 2.5)
    figure = _new_figure(side + 1.0, side)
    axes = figure.add_subplot()
    heat_map = axes.imshow(counts, cmap="Blues", vmin=0)
    figure.colorbar(heat_map, ax=axes, label="Count")
    # White text on dark cells, black on light cells, so every count stays legible.
    dark_cell_threshold = counts.max() / 2.0 if counts.size else 0.0
    for (row, col), value in np.ndenumerate(counts):
        colour = "white" if value > dark_cell_threshold else "black"
        axes.text(col, row, f"{value:g}", ha="center", va="center", color=colour, fontsize=9)
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, labels=class_names)
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    total = counts.sum()
    accuracy = np.trace(counts) / total if total else 0.0
    axes.set_title(f"Confusion matrix ({total:g} examples, accuracy {accuracy:.2%})")
    return figure


def plot_examples(images: ArrayLike, labels: ArrayLike, class_names: list[str], path: str | os.PathLike[str],
                  columns: int = 8, title: str = "Examples") -> None:
    """A grid of images, each titled with its class."""
    batch = _as_image_batch(images)
    labels = np.asarray(labels).reshape(-1)
    if len(batch) != len(labels) or len(batch) == 0:
        raise ValueError(f"expected as many labels as images (at least one), got {len(labels)} and {len(batch)}")
    figure = _image_grid(batch, [class_names[label] for label in labels], [CORRECT_COLOUR] * len(batch), columns,
                         title)
    save_atomically(figure, path)


def plot_class_balance(counts: dict[str, ArrayLike], class_names: list[str], path: str | os.PathLike[str]) -> None:
    """Examples per class in each split ({split name: counts}), as grouped bars, each split labelled with its size."""
    positions = np.arange(len(class_names))
    bar_width = 0.8 / max(1, len(counts))
    figure = _new_figure(max(6.0, 0.6 * len(class_names) + 2.0), 4.0)
    axes = figure.add_subplot()
    for index, (split, split_counts) in enumerate(counts.items()):
        split_counts = np.asarray(split_counts)
        if len(split_counts) != len(class_names):
            raise ValueError(f"{split}: {len(split_counts)} counts for {len(class_names)} classes")
        colour = SPLIT_STYLES.get(split, (split, None))[1]
        offset = (index - (len(counts) - 1) / 2) * bar_width
        axes.bar(positions + offset, split_counts, bar_width, color=colour,
                 label=f"{split} ({int(split_counts.sum()):,} examples)")
    axes.set_xticks(positions, labels=class_names)
    axes.set_ylim(0.0, 1.25 * max(max(np.max(c) for c in counts.values()), 1))  # headroom: the legend covers no bar
    axes.set_xlabel("Class")
    axes.set_ylabel("Examples")
    axes.set_title("Examples per class")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper center", ncols=len(counts))
    save_atomically(figure, path)


def plot_samples(
    images: ArrayLike,
    labels: ArrayLike,
    predictions: ArrayLike,
    class_names: list[str],
    path: str | os.PathLike[str],
    columns: int = 8,
) -> None:
    """A grid of images titled "true / pred", with mistakes in red."""
    batch = _as_image_batch(images)
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if not len(batch) == len(labels) == len(predictions):
        raise ValueError("images, labels and predictions must have the same length")
    if len(batch) == 0:
        figure = _message_figure("Sample predictions", "No images to show")
    else:
        titles = [f"{class_names[true]} / {class_names[pred]}" for true, pred in zip(labels, predictions)]
        colours = [CORRECT_COLOUR if true == pred else MISTAKE_COLOUR for true, pred in zip(labels, predictions)]
        mistakes = int(np.sum(labels != predictions))
        suptitle = f"Sample predictions (true / predicted) - {mistakes} of {len(batch)} wrong, in red"
        figure = _image_grid(batch, titles, colours, columns, suptitle)
    save_atomically(figure, path)


def most_confident_mistakes(
    labels: ArrayLike, predictions: ArrayLike, probabilities: ArrayLike, count: int
) -> np.ndarray:
    """Indices of wrong predictions, most confident (highest predicted-class probability) first."""
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    probabilities = np.asarray(probabilities)
    wrong = np.flatnonzero(labels != predictions)
    confidence = probabilities[wrong, predictions[wrong]]
    order = np.argsort(-confidence, kind="stable")
    return wrong[order][:count]


def plot_mistakes(
    images: ArrayLike,
    labels: ArrayLike,
    predictions: ArrayLike,
    probabilities: ArrayLike,
    class_names: list[str],
    path: str | os.PathLike[str],
    count: int = 24,
) -> None:
    """The most confident wrong predictions: the errors most worth looking at."""
    batch = _as_image_batch(images)
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    probabilities = np.asarray(probabilities)
    indices = most_confident_mistakes(labels, predictions, probabilities, count)
    if len(indices) == 0:
        figure = _message_figure("Most confident mistakes", f"No mistakes: all {len(labels)} predictions correct")
    else:
        titles = [
            f"true {class_names[labels[i]]} / pred {class_names[predictions[i]]}\np = {probabilities[i, predictions[i]]:.3f}"
            for i in indices
        ]
        total_wrong = int(np.sum(labels != predictions))
        suptitle = f"Most confident mistakes ({len(indices)} of {total_wrong} wrong, sorted by confidence)"
        figure = _image_grid(batch[indices], titles, [MISTAKE_COLOUR] * len(indices), 6, suptitle)
    save_atomically(figure, path)


def plot_per_class(report: dict[str, Any], class_names: list[str], path: str | os.PathLike[str]) -> None:
    """Grouped precision/recall/F1 bars per class, to spot the weak classes."""
    per_class = report["per_class"]
    if len(class_names) != len(per_class):
        raise ValueError(f"got {len(class_names)} class names for {len(per_class)} classes")
    positions = np.arange(len(per_class))
    bar_width = 0.27
    figure = _new_figure(max(6.0, 0.8 * len(per_class) + 2.0), 4.5)
    axes = figure.add_subplot()
    for offset, (key, label, colour) in zip(
        (-bar_width, 0.0, bar_width),
        (("precision", "Precision", "tab:blue"), ("recall", "Recall", "tab:orange"), ("f1", "F1", "tab:green")),
    ):
        axes.bar(positions + offset, [entry[key] for entry in per_class], bar_width, label=label, color=colour)
    axes.set_xticks(positions, labels=class_names)
    axes.set_ylim(0.0, 1.25)  # headroom so the legend never covers a bar
    axes.set_xlabel("Class")
    axes.set_ylabel("Score")
    axes.set_title(
        f"Per-class precision, recall and F1 (accuracy {report['accuracy']:.2%}, macro F1 {report['macro_avg']['f1']:.3f})"
    )
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper center", ncols=3)
    save_atomically(figure, path)


def plot_augmentations(originals: ArrayLike, augmented: ArrayLike, path: str | os.PathLike[str]) -> None:
    """What the model sees in training: each column an original, the rows below it random augmentations of it.

    `augmented` has shape (versions, N, H, W[, 1]) for N originals of shape (N, H, W[, 1]).
    """
    originals = _as_image_batch(originals)
    versions = [_as_image_batch(v) for v in np.asarray(augmented)]
    images = np.concatenate([originals, *versions])
    titles = ["original"] * len(originals) + [f"augmented {i + 1}" for i in range(len(versions))
                                              for _ in range(len(originals))]
    figure = _image_grid(images, titles, ["black"] * len(images), len(originals),
                         "Training augmentation: each example warped by its own random transform")
    save_atomically(figure, path)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_sweep(rows: list[dict[str, Any]], names: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Each trial's validation accuracy (bars, in the rows' order) and its test accuracy at the same epoch (markers);
    a trial whose `state` is not complete says so."""
    count = len(rows)
    labels = [f"{row['trial']}: " + " ".join(f"{name}={_short(row[name])}" for name in names)
              + (f" ({row['state']})" if row.get("state", "complete") != "complete" else "") for row in rows]
    # Wide enough for the longest label beside a plot of the usual width.
    figure = _new_figure(6.0 + 0.07 * max(map(len, labels)), 1.2 + 0.32 * count)
    axes = figure.add_subplot()
    positions = np.arange(count)[::-1]  # rank 1 at the top
    validation = np.array([row["validation_accuracy"] for row in rows]) * 100
    test = np.array([row["test_accuracy"] for row in rows]) * 100
    axes.barh(positions, validation, color=SPLIT_STYLES["validation"][1], label="validation (ranks the trials)")
    axes.scatter(test, positions, color=SPLIT_STYLES["test"][1], zorder=3, label="test at that epoch")
    axes.set_yticks(positions, labels, fontsize=8)
    low = min(validation.min(), test.min())
    axes.set_xlim(max(0.0, low - max(0.5, 0.1 * (100 - low))), 100)
    axes.set_xlabel("accuracy (%)")
    axes.set_title(f"Sweep: {count} trial{'s' if count != 1 else ''} ranked on validation accuracy")
    axes.legend(loc="lower right", fontsize=8)
    save_atomically(figure, path)
