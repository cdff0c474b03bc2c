"""Classification metrics computed in JAX.

Everything is derived from a single confusion matrix so that accuracy,
per-class scores and averages are guaranteed to be mutually consistent.
Zero divisions yield 0.0 (never NaN), matching scikit-learn's
``zero_division=0`` with ``labels=range(num_classes)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

_AVERAGE_ROW_NAMES = ("macro avg", "weighted avg")


@partial(jax.jit, static_argnames="num_classes")
def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> jax.Array:
    """Count (true, predicted) pairs; rows are true classes, columns predictions.

    Pairs with a value outside ``[0, num_classes)`` are ignored rather than
    silently wrapped into another cell.
    """
    labels = jnp.asarray(labels, dtype=jnp.int32).reshape(-1)
    predictions = jnp.asarray(predictions, dtype=jnp.int32).reshape(-1)
    in_range = (labels >= 0) & (labels < num_classes) & (predictions >= 0) & (predictions < num_classes)
    flat_index = jnp.where(in_range, labels * num_classes + predictions, 0)
    counts = jnp.bincount(flat_index, weights=in_range.astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """Divide, returning 0 where the denominator is 0 (sklearn's zero_division=0)."""
    safe_denominator = jnp.where(denominator == 0, 1.0, denominator)
    return jnp.where(denominator == 0, 0.0, numerator / safe_denominator)


@jax.jit
def _scores_from_confusion(matrix: jax.Array) -> dict[str, jax.Array]:
    """All report numbers from one confusion matrix, in one compiled function."""
    matrix = matrix.astype(jnp.float32)
    true_positives = jnp.diag(matrix)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    total = matrix.sum()

    precision = _safe_divide(true_positives, predicted_count)
    recall = _safe_divide(true_positives, support)
    # 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall
    # when defined, and is 0 exactly when sklearn reports 0.
    f1 = _safe_divide(2.0 * true_positives, predicted_count + support)

    def weighted(values: jax.Array) -> jax.Array:
        return _safe_divide(jnp.sum(values * support), total)

    return {
        "accuracy": _safe_divide(true_positives.sum(), total),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(jnp.int32),
        "macro_precision": precision.mean(),
        "macro_recall": recall.mean(),
        "macro_f1": f1.mean(),
        "weighted_precision": weighted(precision),
        "weighted_recall": weighted(recall),
        "weighted_f1": weighted(f1),
    }


def _to_float(value: ArrayLike) -> float:
    """A float32 result as the shortest decimal that round-trips to it: 0.9891, not 0.9890999794006348."""
    return float(str(np.float32(value)))


def classification_report(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1 as plain Python types.

    Plain types make the result directly JSON-serialisable and easy to log.
    """
    matrix = confusion_matrix(labels, predictions, num_classes)
    scores = jax.device_get(_scores_from_confusion(matrix))
    per_class = [
        {
            "class": class_index,
            "precision": _to_float(scores["precision"][class_index]),
            "recall": _to_float(scores["recall"][class_index]),
            "f1": _to_float(scores["f1"][class_index]),
            "support": int(scores["support"][class_index]),
        }
        for class_index in range(num_classes)
    ]
    return {
        "accuracy": _to_float(scores["accuracy"]),
        "per_class": per_class,
        "macro_avg": {
            "precision": _to_float(scores["macro_precision"]),
            "recall": _to_float(scores["macro_recall"]),
            "f1": _to_float(scores["macro_f1"]),
        },
        "weighted_avg": {
            "precision": _to_float(scores["weighted_precision"]),
            "recall": _to_float(scores["weighted_recall"]),
            "f1": _to_float(scores["weighted_f1"]),
        },
        "confusion_matrix": np.asarray(matrix).astype(int).tolist(),
    }


def format_report(report: dict[str, Any], class_names: list[str] | None = None, digits: int = 2) -> str:
    """Render a report as a text table laid out like scikit-learn's.

    Familiar layout lets readers compare numbers with sklearn output at a glance.
    """
    per_class = report["per_class"]
    if class_names is None:
        class_names = [str(entry["class"]) for entry in per_class]
    if len(class_names) != len(per_class):
        raise ValueError(f"got {len(class_names)} class names for {len(per_class)} classes")

    total_support = sum(entry["support"] for entry in per_class)
    name_width = max([len(name) for name in class_names] + [len(name) for name in _AVERAGE_ROW_NAMES])
    column_width = max(10, digits + 2)
    headers = ("precision", "recall", "f1-score", "support")

    def score_row(name: str, precision: float, recall: float, f1: float, support: int) -> str:
        numbers = "".join(f"{value:>{column_width}.{digits}f}" for value in (precision, recall, f1))
        return f"{name:>{name_width}} {numbers}{support:>{column_width}}"

    lines = [" " * (name_width + 1) + "".join(f"{header:>{column_width}}" for header in headers), ""]
    for name, entry in zip(class_names, per_class):
        lines.append(score_row(name, entry["precision"], entry["recall"], entry["f1"], entry["support"]))
    lines.append("")
    accuracy_cell = f"{report['accuracy']:>{column_width}.{digits}f}"
    lines.append(f"{'accuracy':>{name_width}} " + " " * (2 * column_width) + accuracy_cell + f"{total_support:>{column_width}}")
    for row_name, key in zip(_AVERAGE_ROW_NAMES, ("macro_avg", "weighted_avg")):
        average = report[key]
        lines.append(score_row(row_name, average["precision"], average["recall"], average["f1"], total_support))
    return "\n".join(lines) + "\n"
