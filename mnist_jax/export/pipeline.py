"""Export: a checkpoint -> files that run without JAX, each verified by its own runtime, and `export.json`.

Top to bottom: restore the model -> find ONNX Runtime Web when `web` is asked for (`webruntime`; missing, it is bad
input: nothing is written) -> JAX's probabilities on the test split (the reference) -> per format: write it
into a staging folder, load it with its runtime, predict the whole test split, compare with JAX -> move it into
place only when it passes -> the manifest. A format that fails leaves nothing under its name, and the others are
still written.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mnist_jax import data
from mnist_jax.export import onnx_graph, runtimes, tf_formats, webapp, webruntime
from mnist_jax.checkpoint import RestoredModel, restore_model
from mnist_jax.config import UserError, one_line
from mnist_jax.inference import make_predict_fn
from mnist_jax.workdir import write_atomic

FORMATS = ("tflite", "tflite_fp16", "tflite_int8", "onnx", "savedmodel", "web")
FILE_NAMES = {"tflite": "model.tflite", "tflite_fp16": "model_fp16.tflite", "tflite_int8": "model_int8.tflite",
              "onnx": "model.onnx", "savedmodel": "savedmodel", "web": "web"}
RUNTIME_OF = {"tflite": "tflite", "tflite_fp16": "tflite", "tflite_int8": "tflite", "onnx": "onnx",
              "savedmodel": "savedmodel", "web": "onnx"}
QUANTISED = {"tflite_fp16", "tflite_int8"}
FLOAT_TOLERANCE = 1e-4  # float32 formats: largest probability difference from JAX on any test image
QUANTISED_ACCURACY_TOLERANCE = 0.003  # fp16 and int8: test accuracy within 0.3 percentage points of JAX's
CALIBRATION_IMAGES = 300  # training images that calibrate int8 quantisation (never test images)
EXPECTED_SHAPE = (28, 28, 1)
MANIFEST = runtimes.MANIFEST
SERVING_VERSION = "1"  # TF Serving loads numbered versions: savedmodel/1/


class FormatFailed(Exception):
    """One format could not be produced or failed its check; the message names the cause."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """What every format is compared with: the test split and JAX's probabilities for it."""

    images: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    calibration: np.ndarray

    @property
    def accuracy(self) -> float:
        return float((self.probabilities.argmax(-1) == self.labels).mean())


def parse_formats(text: str) -> tuple[str, ...]:
    """'all' or a comma-separated list of FORMATS, in FORMATS' order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return FORMATS
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise UserError(f"--formats: unknown format {', '.join(unknown) or repr(text)} (choose from all, "
                        f"{', '.join(FORMATS)})")
    return tuple(name for name in FORMATS if name in names)


def export(workdir: str, checkpoint: str = "best", formats: tuple[str, ...] = FORMATS, out: str | None = None,
           data_dir: str | None = None, onnxruntime_web: str | None = None,
           log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, str]]:
    """Writes every format it can into `out` (default `workdir/export`) with the manifest; returns the manifest
    and {format: why it failed} for the others."""
    model = restore_model(workdir, checkpoint)
    if model.image_shape != EXPECTED_SHAPE:
        raise UserError(f"export needs a model of 28x28 grayscale images; {workdir} holds one of "
                        f"{'x'.join(map(str, model.image_shape))}")
    out = out or os.path.join(workdir, "export")
    web_runtime = webruntime.locate(onnxruntime_web, log=log) if "web" in formats else None
    reference = reference_predictions(model, data.resolve_data_dir(data_dir))
    os.makedirs(out, exist_ok=True)
    for leftover in glob.glob(os.path.join(out, ".staging-*")):  # an export killed before its clean-up
        shutil.rmtree(leftover, ignore_errors=True)
    log(f"exporting checkpoint {model.step} of {workdir} -> {out} (JAX test accuracy {reference.accuracy:.2%} on "
        f"{len(reference.labels):,} images)")
    entries, failures = [], {}
    for name in formats:
        started = time.time()
        try:
            entry = _export_one(name, model, reference, out, web_runtime)
        except FormatFailed as error:
            failures[name] = str(error)
            print(f"error: {name}: {error}", file=sys.stderr, flush=True)
            continue
        entries.append(entry)
        log(_summary_line(entry, time.time() - started))
    entries += _earlier_entries(out, model.step, done=set(formats), log=log)
    entries.sort(key=lambda entry: FORMATS.index(entry["format"]))
    manifest = build_manifest(model, entries)
    write_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest, failures


def _earlier_entries(out: str, step: int, done: set[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The entries of an earlier export into `out` for formats not exported now: kept when they come from the same
    checkpoint and their files are unchanged; otherwise their files are removed, so that the folder holds only
    files of one checkpoint, each listed in the manifest."""
    try:
        with open(os.path.join(out, MANIFEST)) as file:
            earlier = json.load(file)
    except (OSError, ValueError):
        return []
    kept = []
    for entry in earlier.get("files", []):
        if entry.get("format") not in FILE_NAMES or entry["format"] in done:
            continue
        path = os.path.join(out, FILE_NAMES[entry["format"]])
        if not os.path.exists(path):
            continue
        if earlier.get("checkpoint_step") != step:
            reason = f"exported from checkpoint {earlier.get('checkpoint_step')}, not {step}"
        elif _sha256(path) != entry.get("sha256"):
            reason = "changed since it was exported"
        else:
            kept.append(entry)
            continue
        _remove(path)
        log(f"removed {entry['path']}: {reason}")
    return kept


def reference_predictions(model: RestoredModel, data_dir: str | None) -> Reference:
    images, labels = data.load_split_numpy(model.config.dataset, "test", data_dir)
    train_images, _ = data.load_split_numpy(model.config.dataset, "train", data_dir)
    chosen = np.random.default_rng(0).choice(len(train_images), min(CALIBRATION_IMAGES, len(train_images)),
                                             replace=False)
    return Reference(images, labels, make_predict_fn(model)(images), train_images[np.sort(chosen)])


def _export_one(name: str, model: RestoredModel, reference: Reference, out: str,
                web_runtime: Path | None) -> dict[str, Any]:
    """Writes one format in a staging folder beside its final place, checks it, then moves it in."""
    final = os.path.join(out, FILE_NAMES[name])
    _remove(final)  # a format that fails now must not leave an older file that the manifest no longer lists
    with tempfile.TemporaryDirectory(dir=out, prefix=f".staging-{name}-") as staging:
        staged = os.path.join(staging, FILE_NAMES[name])
        try:
            with runtimes.quiet_native_stderr():
                model_file = _write(name, model, reference, staged, web_runtime)
            predicted = runtimes.load(model_file)(reference.images)
        except FormatFailed:
            raise
        except UserError as error:  # e.g. a file its runtime cannot load
            raise FormatFailed(str(error)) from None
        except Exception as error:  # noqa: BLE001  (converters raise many types; the cause is their message)
            raise FormatFailed(f"cannot be produced: {_first_line(error)}") from None
        entry = _check(name, predicted, reference)
        os.replace(staged, final)
    entry.update(format=name, path=FILE_NAMES[name] + ("/" if os.path.isdir(final) else ""), bytes=_size(final),
                 sha256=_sha256(final))
    if name == "web":
        entry["browser_runtime"] = f"{webruntime.PACKAGE} {webruntime.VERSION}"
    return entry


def _write(name: str, model: RestoredModel, reference: Reference, path: str, web_runtime: Path | None) -> str:
    """Writes format `name` at `path`; returns the model file its runtime loads."""
    if name in tf_formats.TFLITE_KINDS:
        content = tf_formats.tflite_bytes(model.module, model.variables, model.image_shape, name, reference.calibration)
        foreign = sorted(op for op in runtimes.tflite_operators(content)
                         if not op.isupper() or op.startswith(("STABLEHLO", "FLEX", "CUSTOM", "DELEGATE")))
        if foreign:
            raise FormatFailed(f"uses operators the stock LiteRT runtime lacks: {', '.join(foreign)}")
        with open(path, "wb") as file:  # in the staging folder: the move into place is what makes it atomic
            file.write(content)
        return path
    if name == "savedmodel":
        version = os.path.join(path, SERVING_VERSION)
        tf_formats.write_savedmodel(model.module, model.variables, model.image_shape, version)
        return version
    try:
        onnx_bytes = onnx_graph.to_onnx(model.module, model.variables, model.image_shape)
    except onnx_graph.UnsupportedModel as error:
        raise FormatFailed(str(error)) from None
    if name == "onnx":
        with open(path, "wb") as file:
            file.write(onnx_bytes)
        return path
    webapp.write_web_folder(path, onnx_bytes, web_runtime)
    return os.path.join(path, webapp.MODEL_FILE)


def _check(name: str, predicted: np.ndarray, reference: Reference) -> dict[str, Any]:
    """The manifest's verification fields; FormatFailed when the format misses its bound."""
    expected = reference.probabilities
    if predicted.shape != expected.shape:
        raise FormatFailed(f"predicts shape {predicted.shape}, JAX {expected.shape}")
    agreement = float((predicted.argmax(-1) == expected.argmax(-1)).mean())
    difference = float(np.abs(predicted - expected).max())
    accuracy = float((predicted.argmax(-1) == reference.labels).mean())
    count = len(reference.labels)
    if name in QUANTISED:
        if abs(accuracy - reference.accuracy) > QUANTISED_ACCURACY_TOLERANCE:
            raise FormatFailed(f"test accuracy {accuracy:.2%} is more than {QUANTISED_ACCURACY_TOLERANCE:.1%} "
                               f"from JAX's {reference.accuracy:.2%}")
    elif agreement < 1.0 or difference > FLOAT_TOLERANCE:
        raise FormatFailed(f"differs from JAX: same class on {round(agreement * count)}/{count} test images, "
                           f"largest probability difference {difference:.1e} (allowed {FLOAT_TOLERANCE:.0e})")
    return {"runtime": runtimes.runtime_version(RUNTIME_OF[name]), "test_accuracy": round(accuracy, 6),
            "agreement_with_jax": round(agreement, 6), "max_abs_probability_difference": float(f"{difference:.3g}")}


def build_manifest(model: RestoredModel, entries: list[dict[str, Any]]) -> dict[str, Any]:
    height, width, channels = model.image_shape
    return {
        "checkpoint_step": model.step,
        "dataset": model.config.dataset,
        "class_names": list(model.class_names),
        "input": {
            "name": tf_formats.INPUT_NAME,
            "shape": ["N", height, width, channels],
            "dtype": "uint8",
            "pixels": f"{height}x{width} grayscale, 0-255, white digit on black, the digit's longer side scaled to 20 "
                      "px and its centre of mass at the image centre (as MNIST's digits; "
                      "mnist_jax.images.to_mnist does this). The TFLite files take a batch of 1.",
        },
        "output": {"name": tf_formats.OUTPUT_NAME, "shape": ["N", len(model.class_names)], "dtype": "float32",
                   "meaning": "class probabilities (softmax), in class_names' order"},
        "files": [{key: entry[key] for key in ("format", "path", "bytes", "sha256", "runtime", "test_accuracy",
                                               "agreement_with_jax", "max_abs_probability_difference")}
                  | ({"browser_runtime": entry["browser_runtime"]} if "browser_runtime" in entry else {})
                  for entry in entries],
    }


def _summary_line(entry: dict[str, Any], seconds: float) -> str:
    return (f"{entry['format']:<12} {entry['path']:<18} {entry['bytes'] / 1e6:6.2f} MB  test accuracy "
            f"{entry['test_accuracy']:.2%}  same class as JAX {entry['agreement_with_jax']:.2%}  max |dp| "
            f"{entry['max_abs_probability_difference']:.1e}  ({entry['runtime']}, {seconds:.1f} s)")


def _sha256(path: str) -> str:
    """A file's sha256; a folder's is that of its `sha256sum` listing, as
    `cd DIR && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum` prints it."""
    if os.path.isfile(path):
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    files = sorted("./" + os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
                   for root, _, names in os.walk(path) for name in names)
    listing = "".join(f"{_sha256(os.path.join(path, name))}  {name}\n" for name in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _first_line(error: Exception) -> str:
    text = one_line(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
