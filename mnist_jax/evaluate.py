"""Evaluation: `python -m mnist_jax.evaluate --workdir DIR [--split test] [--checkpoint best]`.

Restores a checkpoint through Orbax, predicts every example of a split once with the jitted predict function,
computes the metrics in JAX, prints a classification report and writes `DIR/eval/<split>/`: report.json,
predictions.npz and four plots.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import numpy as np

from mnist_jax import data, metrics, plots
from mnist_jax.checkpoint import restore_model
from mnist_jax.cli import ArgumentParser, run_cli
from mnist_jax.inference import make_predict_fn
from mnist_jax.workdir import write_atomic

SAMPLE_COUNT = 32


def write_outputs(out_dir: str, report: dict[str, Any], images: np.ndarray, labels: np.ndarray,
                  probabilities: np.ndarray, class_names: list[str]) -> None:
    """report.json, predictions.npz (in the split's order) and the plots, each written atomically."""
    predictions = probabilities.argmax(axis=-1)
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=labels, predictions=predictions, probabilities=probabilities)
    write_atomic(os.path.join(out_dir, "predictions.npz"), buffer.getvalue())
    plots.plot_confusion_matrix(np.asarray(report["confusion_matrix"]), class_names,
                                os.path.join(out_dir, "confusion_matrix.png"))
    plots.plot_samples(images[:SAMPLE_COUNT], labels[:SAMPLE_COUNT], predictions[:SAMPLE_COUNT], class_names,
                       os.path.join(out_dir, "samples.png"))
    plots.plot_mistakes(images, labels, predictions, probabilities, class_names,
                        os.path.join(out_dir, "mistakes.png"))
    plots.plot_per_class(report, class_names, os.path.join(out_dir, "per_class.png"))


def evaluate(workdir: str, split: str = "test", checkpoint: str = "best", data_dir: str | None = None,
             out_dir: str | None = None) -> dict[str, Any]:
    """Evaluates one checkpoint of a workdir on a split; returns the report that report.json holds."""
    model = restore_model(workdir, checkpoint)
    images, labels = data.load_split_numpy(model.config.dataset, split, data.resolve_data_dir(data_dir))
    probabilities = make_predict_fn(model)(images)
    num_classes = len(model.class_names)
    report = metrics.classification_report(labels, probabilities.argmax(axis=-1), num_classes)
    report["checkpoint_step"] = model.step
    report["class_names"] = list(model.class_names)
    out_dir = out_dir or os.path.join(workdir, "eval", split)
    write_outputs(out_dir, report, images, labels, probabilities, list(model.class_names))
    return report


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(
        prog="python -m mnist_jax.evaluate",
        description="Evaluate a trained workdir: accuracy, per-class precision/recall/F1, confusion matrix, plots.",
        epilog="example: python -m mnist_jax.evaluate --workdir runs/mnist --data-dir ../shared/tensorflow_datasets",
    )
    parser.add_argument("--workdir", required=True, help="a training workdir (its checkpoints/ are read)")
    parser.add_argument("--split", default="test", help="tfds split, e.g. test, train, train[:10%%] (default: test)")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step number (default: best)")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR, else tfds's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    report = evaluate(args.workdir, args.split, args.checkpoint, args.data_dir)
    print(metrics.format_report(report, report["class_names"], digits=4))
    out_dir = os.path.join(args.workdir, "eval", args.split)
    print(f"checkpoint step {report['checkpoint_step']}: accuracy {report['accuracy']:.2%} on "
          f"{sum(c['support'] for c in report['per_class']):,} {args.split} examples "
          f"({time.time() - started:.1f} s) -> {out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
