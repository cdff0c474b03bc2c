"""Evaluation: `python -m mnist_jax.evaluate --workdir DIR [--split test] [--checkpoint best]`, or of an
ensemble: `python -m mnist_jax.evaluate --ensemble DIR [DIR ...] --workdir OUT`; `--tta` adds test-time
augmentation.

Restores a checkpoint through Orbax, predicts every example of a split once with the jitted predict function,
computes the metrics in JAX, prints a classification report and writes `DIR/eval/<split>/` (`<split>-tta/` with
test-time augmentation): report.json, predictions.npz and four plots.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import numpy as np

from mnist_jax import data, metrics, plots
from mnist_jax.checkpoint import RestoredModel, restore_model
from mnist_jax.cli import ArgumentParser, run_cli
from mnist_jax.config import UserError, plural
from mnist_jax.inference import TEST_TIME_AUGMENTATION_HELP, make_predict_fn
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


def eval_dir(workdir: str, split: str, test_time_augmentation: bool = False) -> str:
    """Where an evaluation's outputs go: `eval/<split>/`, or `eval/<split>-tta/`, so neither overwrites the other."""
    return os.path.join(workdir, "eval", split + ("-tta" if test_time_augmentation else ""))


def evaluate(workdir: str, split: str = "test", checkpoint: str = "best", data_dir: str | None = None,
             out_dir: str | None = None, test_time_augmentation: bool = False) -> dict[str, Any]:
    """Evaluates one checkpoint of a workdir on a split; returns the report that report.json holds."""
    model = restore_model(workdir, checkpoint)
    return evaluate_models([model], split, data_dir, out_dir or eval_dir(workdir, split, test_time_augmentation),
                           test_time_augmentation)


def evaluate_ensemble(member_dirs: list[str], out_workdir: str, split: str = "test", checkpoint: str = "best",
                      data_dir: str | None = None, test_time_augmentation: bool = False) -> dict[str, Any]:
    """Evaluates the average of several runs' probabilities (each run's `checkpoint`) into OUT/eval/<split>/."""
    if os.path.abspath(out_workdir) in {os.path.abspath(d) for d in member_dirs}:
        raise UserError(f"--workdir {out_workdir} is one of the ensemble's members; give the ensemble its own")
    models = [restore_model(member, checkpoint) for member in member_dirs]
    return evaluate_models(models, split, data_dir, eval_dir(out_workdir, split, test_time_augmentation),
                           test_time_augmentation)


def evaluate_models(models: list[RestoredModel], split: str, data_dir: str | None, out_dir: str,
                    test_time_augmentation: bool = False) -> dict[str, Any]:
    """Predicts a split with the models' averaged probabilities, computes the metrics, writes every output."""
    first = models[0]
    # make_predict_fn also checks that the members classify the same images into the same classes.
    predict = make_predict_fn(models, test_time_augmentation=test_time_augmentation)
    images, labels = data.load_split_numpy(first.config.dataset, split, data.resolve_data_dir(data_dir))
    probabilities = predict(images)
    report = metrics.classification_report(labels, probabilities.argmax(axis=-1), len(first.class_names))
    report["class_names"] = list(first.class_names)
    report["test_time_augmentation"] = test_time_augmentation
    report["members"] = [{"workdir": os.path.abspath(m.workdir), "checkpoint_step": m.step} for m in models]
    if len(models) == 1:
        report["checkpoint_step"] = first.step
    write_outputs(out_dir, report, images, labels, probabilities, list(first.class_names))
    return report


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(
        prog="python -m mnist_jax.evaluate",
        description="Evaluate a trained workdir: accuracy, per-class precision/recall/F1, confusion matrix, plots.",
        epilog="example: python -m mnist_jax.evaluate --workdir runs/mnist",
    )
    parser.add_argument("--workdir", required=True,
                        help="a training workdir (its checkpoints/ are read); with --ensemble, the directory "
                             "the ensemble's eval/<split>/ is written to")
    parser.add_argument("--ensemble", nargs="+", metavar="DIR",
                        help="training workdirs whose averaged probabilities are evaluated (same dataset)")
    parser.add_argument("--split", default="test", help="tfds split, e.g. test, train, train[:10%%] (default: test)")
    parser.add_argument("--checkpoint", default="best",
                        help="best, latest or a step number, for every member (default: best)")
    parser.add_argument("--tta", action="store_true",
                        help=TEST_TIME_AUGMENTATION_HELP + "; outputs go to eval/<split>-tta/")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR, else tfds's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.ensemble:
        report = evaluate_ensemble(args.ensemble, args.workdir, args.split, args.checkpoint, args.data_dir,
                                   test_time_augmentation=args.tta)
        source = f"ensemble of {len(args.ensemble)}"
    else:
        report = evaluate(args.workdir, args.split, args.checkpoint, args.data_dir, test_time_augmentation=args.tta)
        source = f"checkpoint step {report['checkpoint_step']}"
    if args.tta:
        source += ", test-time augmentation"
    print(metrics.format_report(report, report["class_names"], digits=4))
    out_dir = eval_dir(args.workdir, args.split, args.tta)
    print(f"{source}: accuracy {report['accuracy']:.2%} on "
          f"{plural(sum(c['support'] for c in report['per_class']), args.split + ' example')} "
          f"({time.time() - started:.1f} s) -> {out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
