"""Exported models run by their own runtimes, as a user's app would run them: LiteRT for .tflite, ONNX Runtime
for .onnx, TensorFlow for a SavedModel. Each gives `predict(uint8 images (N, H, W, C)) -> probabilities (N,
classes)`, so export's verification, `predict --model` and the latency benchmark share one way in. LiteRT and ONNX
Runtime come with the `[export]` extra (TensorFlow is in the core); each is imported only when a file needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from importlib import metadata
from typing import Callable, Iterator

import numpy as np

from mnist_jax import extras
from mnist_jax.config import UserError, one_line

PredictFn = Callable[[np.ndarray], np.ndarray]
RUNTIME_PACKAGES = {"tflite": "ai-edge-litert", "onnx": "onnxruntime", "savedmodel": "tensorflow-cpu"}
EXTRA_RUNTIMES = {"tflite": "ai_edge_litert", "onnx": "onnxruntime"}  # the modules the [export] extra brings
MANIFEST = "export.json"  # written by export beside its files: class_names, checkpoint, checks


def runtime_kind(path: str) -> str:
    """'tflite', 'onnx' or 'savedmodel', from the path; one line for anything else."""
    if path.endswith(".tflite"):
        return "tflite"
    if path.endswith(".onnx"):
        return "onnx"
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "savedmodel"
    raise UserError(f"{path}: not an exported model (expected a .tflite or .onnx file, or a SavedModel folder)")


def runtime_version(kind: str) -> str:
    """'package version' of the runtime that runs this kind of file, for the export manifest."""
    package = RUNTIME_PACKAGES[kind]
    return f"{package} {metadata.version(package)}"


def load(path: str, threads: int | None = None) -> PredictFn:
    """The predict function of an exported file (`threads`: the runtime's intra-op threads; None: its default)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    kind = runtime_kind(path)
    if kind in EXTRA_RUNTIMES:
        extras.require("export", f"running {path}", [EXTRA_RUNTIMES[kind]])
    try:
        return {"tflite": _tflite, "onnx": _onnx, "savedmodel": _savedmodel}[kind](path, threads)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001  (each runtime raises its own types for a bad file)
        raise UserError(f"{path}: cannot be loaded by {RUNTIME_PACKAGES[kind]}: {one_line(str(error))}")


def class_names(path: str) -> tuple[str, ...] | None:
    """The class names of an exported model, from the export.json of the folder export wrote it to (the file's
    folder, or the one above a SavedModel's version folder); None when there is no such manifest."""
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (folder, os.path.dirname(folder)):
        try:
            with open(os.path.join(candidate, MANIFEST)) as file:
                names = json.load(file).get("class_names")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(names, list) and all(isinstance(name, str) for name in names):
            return tuple(names)
    return None


def tflite_operators(path_or_bytes: str | bytes) -> set[str]:
    """The TFLite operator names a .tflite uses (builtin ones are upper-case words such as CONV_2D)."""
    interpreter = _tflite_interpreter(path_or_bytes, None, delegates=False)
    return {op["op_name"] for op in interpreter._get_ops_details()}  # noqa: SLF001 (LiteRT's only op listing)


def _tflite_interpreter(path_or_bytes: str | bytes, threads: int | None, delegates: bool = True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    source = {"model_content": path_or_bytes} if isinstance(path_or_bytes, bytes) else {"model_path": path_or_bytes}
    # Without the default (XNNPACK) delegate, the listing shows the file's own operators, not one DELEGATE node.
    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with quiet_native_stderr():  # LiteRT announces its XNNPACK delegate from C++
        interpreter = Interpreter(**source, num_threads=threads, experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
    return interpreter


def _tflite(path: str, threads: int | None) -> PredictFn:
    interpreter = _tflite_interpreter(path, threads)
    (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
    batch = int(entry["shape"][0])

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.uint8)
        outputs = []
        for start in range(0, len(images), batch):  # the phone-friendly file takes a fixed batch (one image)
            interpreter.set_tensor(entry["index"], images[start:start + batch])
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(exit_["index"]).copy())
        return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0, exit_["shape"][-1]), np.float32)
    return predict


def _onnx(path: str, threads: int | None) -> PredictFn:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: np.asarray(images, np.uint8)})[0]


def _savedmodel(path: str, threads: int | None) -> PredictFn:
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda images: serve(images=tf.constant(np.asarray(images, np.uint8)))["probabilities"].numpy()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silences what native code writes to stderr meanwhile: TF's converter and LiteRT print their progress from
    C++, and our users get our one-line messages instead (Python errors still propagate as exceptions)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
