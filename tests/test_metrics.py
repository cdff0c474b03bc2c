"""Metrics must agree with scikit-learn's reference implementation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from mnist_jax.metrics import classification_report, confusion_matrix, format_report

TOLERANCE = 1e-6


def assert_matches_sklearn(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> None:
    class_range = list(range(num_classes))
    report = classification_report(labels, predictions, num_classes)

    expected_matrix = sk_metrics.confusion_matrix(labels, predictions, labels=class_range)
    np.testing.assert_array_equal(np.asarray(confusion_matrix(labels, predictions, num_classes)), expected_matrix)
    assert report["confusion_matrix"] == expected_matrix.tolist()

    precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
        labels, predictions, labels=class_range, zero_division=0
    )
    assert [entry["class"] for entry in report["per_class"]] == class_range
    np.testing.assert_allclose([e["precision"] for e in report["per_class"]], precision, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose([e["recall"] for e in report["per_class"]], recall, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose([e["f1"] for e in report["per_class"]], f1, atol=TOLERANCE, rtol=0)
    assert [e["support"] for e in report["per_class"]] == support.tolist()

    assert report["accuracy"] == pytest.approx(sk_metrics.accuracy_score(labels, predictions), abs=TOLERANCE)
    for average in ("macro", "weighted"):
        expected = sk_metrics.precision_recall_fscore_support(
            labels, predictions, labels=class_range, average=average, zero_division=0
        )
        actual = report[f"{average}_avg"]
        assert actual["precision"] == pytest.approx(expected[0], abs=TOLERANCE)
        assert actual["recall"] == pytest.approx(expected[1], abs=TOLERANCE)
        assert actual["f1"] == pytest.approx(expected[2], abs=TOLERANCE)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("size,num_classes", [(7, 3), (100, 10), (2000, 10), (513, 4)])
def test_random_predictions_match_sklearn(seed: int, size: int, num_classes: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size)
    # Mix correct and random predictions so scores are neither all 0 nor all 1.
    predictions = np.where(rng.random(size) < 0.6, labels, rng.integers(0, num_classes, size))
    assert_matches_sklearn(labels, predictions, num_classes)


def test_perfect_predictions() -> None:
    labels = np.arange(50) % 10
    report = classification_report(labels, labels, 10)
    assert_matches_sklearn(labels, labels, 10)
    assert report["accuracy"] == 1.0
    assert all(e["precision"] == e["recall"] == e["f1"] == 1.0 for e in report["per_class"])
    assert report["confusion_matrix"] == (np.eye(10, dtype=int) * 5).tolist()


def test_class_never_predicted_has_zero_precision_not_nan() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0, 2])
    predictions = np.array([0, 1, 1, 1, 1, 0, 0])  # class 2 never predicted
    report = classification_report(labels, predictions, 3)
    assert_matches_sklearn(labels, predictions, 3)
    assert report["per_class"][2]["precision"] == 0.0
    assert report["per_class"][2]["f1"] == 0.0
    assert report["per_class"][2]["support"] == 3


def test_class_absent_from_labels_has_zero_recall_not_nan() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    predictions = np.array([0, 2, 1, 1, 2])  # class 2 predicted but never true
    report = classification_report(labels, predictions, 3)
    assert_matches_sklearn(labels, predictions, 3)
    assert report["per_class"][2] == {"class": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Class 3 neither true nor predicted: all zeros, still counted in the macro average.
    report4 = classification_report(labels, predictions, 4)
    assert_matches_sklearn(labels, predictions, 4)
    assert report4["macro_avg"]["recall"] == pytest.approx((1 / 2 + 2 / 3) / 4, abs=TOLERANCE)


def test_single_example() -> None:
    assert_matches_sklearn(np.array([3]), np.array([3]), 10)
    assert_matches_sklearn(np.array([3]), np.array([5]), 10)
    assert classification_report([3], [5], 10)["accuracy"] == 0.0


def test_all_one_class() -> None:
    labels = np.full(20, 4)
    predictions = np.full(20, 4)
    assert_matches_sklearn(labels, predictions, 10)
    wrong = np.full(20, 7)
    assert_matches_sklearn(labels, wrong, 10)
    report = classification_report(labels, wrong, 10)
    assert report["confusion_matrix"][4][7] == 20
    assert all(not np.isnan(value) for value in report["macro_avg"].values())


def test_confusion_matrix_is_int32_rows_true_columns_predicted() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1]), np.array([1, 1, 1]), 2)
    assert matrix.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(matrix), [[0, 2], [0, 1]])


def test_report_is_plain_python_and_json_serialisable() -> None:
    report = classification_report(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)
    assert set(report) == {"accuracy", "per_class", "macro_avg", "weighted_avg", "confusion_matrix"}
    assert type(report["accuracy"]) is float
    assert type(report["per_class"][0]["support"]) is int
    assert type(report["confusion_matrix"][0][0]) is int
    assert json.loads(json.dumps(report)) == report


def test_format_report_matches_sklearn_text_layout() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 60)
    predictions = np.where(rng.random(60) < 0.5, labels, rng.integers(0, 4, 60))
    text = format_report(classification_report(labels, predictions, 4))
    expected = sk_metrics.classification_report(labels, predictions, labels=range(4), zero_division=0)
    assert text == expected


def test_format_report_uses_class_names() -> None:
    report = classification_report([0, 1], [0, 1], 2)
    text = format_report(report, class_names=["cat", "dog"])
    assert "cat" in text and "dog" in text and "weighted avg" in text
    with pytest.raises(ValueError):
        format_report(report, class_names=["only-one"])
