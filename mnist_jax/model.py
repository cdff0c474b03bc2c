"""The model: a configurable Flax linen CNN; by default the Flax MNIST example's architecture.

Default: conv 32 3x3 -> relu -> avg-pool 2 -> conv 64 3x3 -> relu -> avg-pool 2 -> dense 256 -> relu -> dense 10.
The model takes raw uint8 pixels and normalises them itself, so training, evaluation, prediction and serving
can never disagree about preprocessing. Its layers have names that say where they sit (`conv1_1` is block 1's
first conv, `conv1_1_bn` its batch norm, `dense1` the first hidden dense layer, `dense1_dropout` its dropout,
`head` the classifier), so transfer learning selects layers by name. linen derives each layer's initial weights and
dropout masks from its name, so a seed's run depends on these names and on nothing else of the module's code.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnist_jax.augment import Augmentation, deskew, random_warp
from mnist_jax.config import Config

HEAD = "head"


def normalize(images: jax.Array, mean: float, std: float) -> jax.Array:
    """uint8 pixels -> float32 with the training split's zero mean and unit variance."""
    return (images.astype(jnp.float32) * (1.0 / 255.0) - mean) * (1.0 / std)


class CNN(nn.Module):
    """Conv blocks ((conv 3x3 -> [batch norm] -> relu) x convs_per_block -> avg- or max-pool 2), then dense blocks
    (dense -> [batch norm] -> relu -> [dropout]), then the classifier."""

    num_classes: int
    mean: float
    std: float
    conv_features: Sequence[int] = (32, 64)
    convs_per_block: int = 1
    pooling: str = "avg"
    dense_features: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    batch_norm: bool = False
    batch_norm_groups: int = 1
    deskew: bool = False  # remove each image's slant first, after any training augmentation
    dtype: str = "float32"  # computation dtype; parameters are float32 either way

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False,
                 augmentation: Augmentation | None = None) -> jax.Array:
        """uint8 images (B, H, W, C) -> logits (B, num_classes). In training, `augmentation` (the train step's)
        warps each image at random first, from the 'augment' PRNG stream."""
        if train and augmentation is not None and augmentation.enabled:
            images = random_warp(self.make_rng("augment"), images, augmentation)
        if self.deskew:
            images = deskew(images)
        x = normalize(images, self.mean, self.std).astype(self.dtype)
        for block, width in enumerate(self.conv_features, start=1):
            for position in range(1, self.convs_per_block + 1):
                name = f"conv{block}_{position}"
                x = nn.Conv(width, kernel_size=(3, 3), dtype=self.dtype, name=name)(x)
                x = self._maybe_batch_norm(x, train, name)
                x = nn.relu(x)
            pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
            x = pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for number, width in enumerate(self.dense_features, start=1):
            name = f"dense{number}"
            x = nn.Dense(width, dtype=self.dtype, name=name)(x)
            x = self._maybe_batch_norm(x, train, name)
            x = nn.relu(x)
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"{name}_dropout")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD)(x).astype(jnp.float32)

    def _maybe_batch_norm(self, x: jax.Array, train: bool, layer: str) -> jax.Array:
        if not self.batch_norm:
            return x
        return BatchNorm(groups=self.batch_norm_groups, dtype=self.dtype, name=f"{layer}_bn")(x, train)


class BatchNorm(nn.Module):
    """Batch norm whose training statistics come from `groups` equal slices of the batch ("ghost" batch norm).

    With one group this is `flax.linen.BatchNorm` (same variables, names and maths; tested). With the batch split
    over N devices, N groups keep every statistic on its own device instead of all-reducing each layer's mean and
    variance forward and backward, and the result depends on `groups`, never on the device count. Running
    averages (used at evaluation) average the groups.

    The normalisation is one multiply-add per element, `x * a + b`, with the per-channel `a` and `b` folded from
    the statistics, scale and bias first: XLA:CPU runs the broadcasts of `(x - mean) * rsqrt(var + eps) * scale
    + bias` as separate passes over the activations.
    """

    groups: int = 1
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if not train:
            multiplier = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
            offset = bias - running_mean.value * multiplier
            return (x.astype(jnp.float32) * multiplier + offset).astype(self.dtype)
        grouped = x.reshape((self.groups, -1) + x.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, grouped.ndim - 1))
        mean = grouped.mean(axes, keepdims=True)
        var = jnp.maximum((grouped * grouped).mean(axes, keepdims=True) - mean * mean, 0.0)
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        offset = bias - mean * multiplier
        if not self.is_initializing():
            keep = self.momentum
            running_mean.value = keep * running_mean.value + (1 - keep) * mean.reshape(-1, features).mean(0)
            running_var.value = keep * running_var.value + (1 - keep) * var.reshape(-1, features).mean(0)
        return (grouped * multiplier + offset).reshape(x.shape).astype(self.dtype)


def build_model(config: Config, num_classes: int, mean: float, std: float) -> CNN:
    """The CNN a config describes, for a dataset with these classes and pixel statistics."""
    return CNN(
        num_classes=num_classes,
        mean=mean,
        std=std,
        conv_features=tuple(config.conv_features),
        convs_per_block=config.convs_per_block,
        pooling=config.pooling,
        dense_features=tuple(config.dense_features),
        dropout_rate=config.dropout_rate,
        batch_norm=config.batch_norm,
        batch_norm_groups=config.batch_norm_groups,
        deskew=config.deskew,
        dtype=config.dtype,
    )


def is_feature_layer(name: str) -> bool:
    """Whether a layer belongs to the convolutional feature extractor (the convs and their batch norms)."""
    return name.startswith("conv")


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def initial_variables(model: CNN, key: jax.Array, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """The model's initial variables, from one jitted program (the same bits as Flax's op-by-op `init`).

    The model is a static argument (linen modules hash by their fields), so a process that builds the same
    architecture again, as a sweep's trials or a resume do, reuses the program.
    """
    return model.init(key, jnp.zeros((1, *image_shape), jnp.uint8), train=False)


def count_params(params: Any) -> int:
    """The number of scalars in a parameter tree."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
