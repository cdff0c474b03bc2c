"""The model through jax2tf: a TF SavedModel for TF Serving, and TFLite files for LiteRT on phones.

jax2tf wraps the jitted prediction as one `XlaCallModule` op of StableHLO, which JAX writes and TF reads: the two
must agree on the StableHLO version, so pyproject.toml pins them together and the tests convert a model. TFLite's
converter lowers that op to builtin TFLite operators only for a fixed batch (with a free one, average pooling is
left as a StableHLO op that phones' runtime lacks and int8 quantisation fails), so the TFLite files take one
image; the SavedModel keeps the batch free.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import jax
import numpy as np

from mnist_jax.model import CNN

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
TFLITE_KINDS = ("tflite", "tflite_fp16", "tflite_int8")


def probability_function(module: CNN, variables: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """uint8 images -> softmax probabilities, the variables closed over (they become the file's constants)."""
    def probabilities(images: jax.Array) -> jax.Array:
        return jax.nn.softmax(module.apply(variables, images, train=False), axis=-1)
    return probabilities


def _tf_function(module: CNN, variables: dict[str, Any], image_shape: tuple[int, ...], batch: int | None):
    import tensorflow as tf
    from jax.experimental import jax2tf

    polymorphic = None if batch else ["(b, " + ", ".join(map(str, image_shape)) + ")"]
    converted = jax2tf.convert(probability_function(module, variables), polymorphic_shapes=polymorphic)
    signature = [tf.TensorSpec((batch, *image_shape), tf.uint8, name=INPUT_NAME)]
    return tf.function(lambda images: {OUTPUT_NAME: converted(images)}, input_signature=signature, autograph=False)


def write_savedmodel(module: CNN, variables: dict[str, Any], image_shape: tuple[int, ...], path: str) -> None:
    """A SavedModel at `path` whose `serving_default` maps `images` uint8 (N, ...) to `probabilities`."""
    import tensorflow as tf

    holder = tf.Module()
    holder.serve = _tf_function(module, variables, image_shape, batch=None)
    tf.saved_model.save(holder, path, signatures={"serving_default": holder.serve})


def tflite_bytes(module: CNN, variables: dict[str, Any], image_shape: tuple[int, ...], kind: str,
                 calibration_images: Iterable[np.ndarray] = ()) -> bytes:
    """A .tflite of batch 1 with builtin operators only: float32, float16 weights (`tflite_fp16`), or full-integer
    int8 (`tflite_int8`, calibrated on `calibration_images`; uint8 pixels in, dequantised float32 probabilities
    out)."""
    import tensorflow as tf

    function = _tf_function(module, variables, image_shape, batch=1)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex (TF) ops: phones lack them
    if kind == "tflite_fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "tflite_int8":
        images = [np.asarray(image, np.uint8)[None] for image in calibration_images]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image] for image in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif kind != "tflite":
        raise ValueError(f"unknown TFLite kind {kind!r}")
    with warnings.catch_warnings():  # the input is uint8 pixels already: there are no input statistics to give
        warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
        return converter.convert()
