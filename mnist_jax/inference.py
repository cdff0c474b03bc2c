"""Jitted batched prediction: one function shared by evaluate, predict, serve and training's final evaluation.

Inputs are padded to a power-of-two batch (at most `batch_size`), so any number of images costs a handful of
compilations, and every example is predicted exactly once (the padding is dropped from the result). Several
models (an ensemble) are applied inside the same jitted function and their probabilities averaged; with
test-time augmentation, so are each model's predictions of the fixed views in `augment.TEST_TIME_VIEWS`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax.augment import TEST_TIME_VIEWS, View, apply_view
from mnist_jax.checkpoint import RestoredModel
from mnist_jax.config import UserError

PredictFn = Callable[[np.ndarray], np.ndarray]
# The `--tta` flag's help, shared by the tools that offer it.
TEST_TIME_AUGMENTATION_HELP = (f"test-time augmentation: average each model's predictions over {len(TEST_TIME_VIEWS)} "
                               f"fixed views (small shifts, rotations and zooms), {len(TEST_TIME_VIEWS)}x the compute")


def check_same_task(models: Sequence[RestoredModel]) -> None:
    """Models can be averaged only when they classify the same images into the same classes."""
    first = models[0]
    for model in models[1:]:
        if (model.config.dataset, model.class_names, model.image_shape) != (
                first.config.dataset, first.class_names, first.image_shape):
            raise UserError(
                f"ensemble members must share a dataset: {first.config.dataset} {first.image_shape} with "
                f"{len(first.class_names)} classes vs {model.config.dataset} {model.image_shape} with "
                f"{len(model.class_names)} classes")


def make_predict_fn(models: RestoredModel | Sequence[RestoredModel], batch_size: int = 1000,
                    test_time_augmentation: bool = False) -> PredictFn:
    """Returns predict(uint8 images (N, H, W, C) or (N, H, W)) -> float32 probabilities (N, classes).

    Given several models, the probabilities are their mean (each model its own architecture and variables);
    `test_time_augmentation` averages over the views of `augment.TEST_TIME_VIEWS` too (one pass per view).
    """
    models = [models] if isinstance(models, RestoredModel) else list(models)
    check_same_task(models)
    first = models[0]
    return predict_fn_for([m.module for m in models], [m.variables for m in models], first.image_shape,
                          len(first.class_names), batch_size, test_time_augmentation)


def predict_fn_for(modules: Sequence[nn.Module], member_variables: Sequence[Any], image_shape: tuple[int, ...],
                   num_classes: int, batch_size: int = 1000, test_time_augmentation: bool = False) -> PredictFn:
    """`make_predict_fn` for modules and their variables that need not come from a checkpoint (training's final
    evaluation passes its live model), so both report the very same numbers."""
    modules, image_shape = list(modules), tuple(image_shape)
    variables = jax.device_put(list(member_variables))
    views = TEST_TIME_VIEWS if test_time_augmentation else (View(),)

    @jax.jit
    def probabilities(all_variables, images: jax.Array) -> jax.Array:
        # The identity view is the images themselves, so plain prediction is untouched by the warp code.
        inputs = [images if view == View() else apply_view(images, view) for view in views]
        members = [jax.nn.softmax(module.apply(v, x, train=False), axis=-1)
                   for x in inputs for module, v in zip(modules, all_variables)]
        return sum(members[1:], members[0]) / len(members)

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim == len(image_shape):  # (N, H, W): add the channel axis
            images = images[..., None]
        if images.shape[1:] != image_shape:
            raise ValueError(f"images of shape {images.shape[1:]} given to a model of {image_shape}")
        count = len(images)
        chunk = min(batch_size, 1 << max(count - 1, 0).bit_length())  # power-of-two buckets: few compilations
        padded = np.zeros((-(-count // chunk) * chunk, *image_shape), np.uint8)
        padded[:count] = images
        outputs = [probabilities(variables, jnp.asarray(padded[i : i + chunk])) for i in range(0, len(padded), chunk)]
        return np.concatenate(jax.device_get(outputs))[:count] if outputs else np.zeros((0, num_classes))

    return predict
