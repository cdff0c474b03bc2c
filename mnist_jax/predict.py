"""Prediction from image files: `python -m mnist_jax.predict --workdir DIR IMAGE [IMAGE ...] [--json]`, or with an
exported model and no JAX in the loop: `python -m mnist_jax.predict --model model.tflite|model.onnx IMAGE ...`.

Each file goes through `images.preprocess_file` (the way MNIST itself was made: grayscale, inverted when the
background is light, cropped, longer side scaled to 20 px, centred by centre of mass in 28x28), then all of
them through one jitted batched prediction (`--tta` averages it over small fixed shifts, rotations and zooms,
as `evaluate --tta` does); with `--model`, through the file's own runtime (`runtimes`). Each result names its class
(`Sneaker` for fashion_mnist's 7) beside the class index. A file that cannot be read gets an error entry, the
others are still classified, and the exit code is 1.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np

from mnist_jax.checkpoint import restore_model
from mnist_jax.export import runtimes
from mnist_jax.cli import ArgumentParser, run_cli
from mnist_jax.config import UserError
from mnist_jax.images import ImageError, preprocess_file
from mnist_jax.inference import TEST_TIME_AUGMENTATION_HELP, make_predict_fn

TOP_K = 3


def load_predictor(workdir: str | None, checkpoint: str = "best", test_time_augmentation: bool = False,
                   model_file: str | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[str, ...] | None]:
    """The batched predict function and the class names of a workdir's checkpoint, or of `model_file`, an exported
    .tflite or .onnx run by its runtime (its names from the export.json beside it; None without one)."""
    if model_file is not None:
        if test_time_augmentation:
            raise UserError("--tta needs --workdir: an exported model holds plain prediction only")
        return runtimes.load(model_file), runtimes.class_names(model_file)
    model = restore_model(workdir, checkpoint)
    return make_predict_fn(model, test_time_augmentation=test_time_augmentation), model.class_names


def classify_files(predict: Callable[[np.ndarray], np.ndarray], class_names: Sequence[str] | None,
                   paths: list[str]) -> list[dict[str, Any]]:
    """One result per path, in order: {"file", "prediction" (the class index), "class_name", "probabilities"} or
    {"file", "error"}. Without class names (or with the wrong count), a class's name is its index."""
    digits, errors = {}, {}
    for path in paths:
        try:
            digits[path] = preprocess_file(path)
        except ImageError as error:
            errors[path] = str(error)
    probabilities = predict(np.stack(list(digits.values()))[..., None]) if digits else []
    by_path = dict(zip(digits, probabilities))
    results = []
    for path in paths:
        if path in errors:
            results.append({"file": path, "error": errors[path]})
        else:
            p = by_path[path]
            index = int(np.argmax(p))
            results.append({"file": path, "prediction": index, "class_name": class_name(index, class_names, len(p)),
                            "probabilities": [float(x) for x in p]})
    return results


def predict_files(workdir: str | None, paths: list[str], checkpoint: str = "best",
                  test_time_augmentation: bool = False, model_file: str | None = None) -> list[dict[str, Any]]:
    """`classify_files` with the model of `load_predictor`."""
    return classify_files(*load_predictor(workdir, checkpoint, test_time_augmentation, model_file), paths)


def class_name(index: int, class_names: Sequence[str] | None, num_classes: int) -> str:
    """The class's name, or its index as text where the names are unknown or do not fit the model's output."""
    return class_names[index] if class_names and len(class_names) == num_classes else str(index)


def format_result(result: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """'file: 7 (99.2%)   top 3: 7 99.2%, 1 0.5%, 9 0.2%' (the class names, e.g. 'Sneaker', where the run has
    them) or 'error: ...'."""
    if "error" in result:
        return f"error: {result['error']}"
    p = np.asarray(result["probabilities"])
    top = np.argsort(-p, kind="stable")[:TOP_K]
    ranked = ", ".join(f"{class_name(int(i), class_names, len(p))} {p[i]:.1%}" for i in top)
    predicted = result["prediction"]
    return (f"{result['file']}: {class_name(predicted, class_names, len(p))} ({p[predicted]:.1%})   "
            f"top {TOP_K}: {ranked}")


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(
        prog="python -m mnist_jax.predict",
        description="Classify image files (PNG/JPEG, any size; dark ink on light paper or light on dark).",
        epilog="example: python -m mnist_jax.predict --workdir runs/mnist my_digit.png another.jpg",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="a training workdir")
    model.add_argument("--model", help="an exported model instead: a .tflite or .onnx file (python -m mnist_jax.export)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--checkpoint", default="best",
                        help="best, latest or a step number (default: best); with --workdir")
    parser.add_argument("--tta", action="store_true", help=TEST_TIME_AUGMENTATION_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON array instead of text lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    predict, class_names = load_predictor(args.workdir, args.checkpoint, args.tta, args.model)
    results = classify_files(predict, class_names, args.images)
    if args.json:
        print(json.dumps(results))
    else:
        for result in results:
            print(format_result(result, class_names))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    run_cli(main)
