"""Jitted batched prediction for a restored model: one function shared by evaluate, predict and serve.

Inputs are padded to a power-of-two batch (at most `batch_size`), so any number of images costs a handful of
compilations, and every example is predicted exactly once (the padding is dropped from the result).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax.checkpoint import RestoredModel

PredictFn = Callable[[np.ndarray], np.ndarray]


def make_predict_fn(model: RestoredModel, batch_size: int = 1000) -> PredictFn:
    """Returns predict(uint8 images (N, H, W, C) or (N, H, W)) -> float32 probabilities (N, classes)."""
    variables = jax.device_put(model.variables)

    @jax.jit
    def probabilities(images: jax.Array) -> jax.Array:
        return jax.nn.softmax(model.module.apply(variables, images, train=False), axis=-1)

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim == len(model.image_shape):  # (N, H, W): add the channel axis
            images = images[..., None]
        if images.shape[1:] != model.image_shape:
            raise ValueError(f"images of shape {images.shape[1:]} given to a model of {model.image_shape}")
        count = len(images)
        chunk = min(batch_size, 1 << max(count - 1, 0).bit_length())  # power-of-two buckets: few compilations
        padded = np.zeros((-(-count // chunk) * chunk, *model.image_shape), np.uint8)
        padded[:count] = images
        outputs = [probabilities(jnp.asarray(padded[i : i + chunk])) for i in range(0, len(padded), chunk)]
        return np.concatenate(jax.device_get(outputs))[:count] if outputs else np.zeros((0, len(model.class_names)))

    return predict
