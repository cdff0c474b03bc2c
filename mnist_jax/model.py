"""The model: a configurable Flax linen CNN; by default the Flax MNIST example's architecture.

Default: conv 32 3x3 -> relu -> avg-pool 2 -> conv 64 3x3 -> relu -> avg-pool 2 -> dense 256 -> relu -> dense 10.
The model takes raw uint8 pixels and normalises them itself, so training, evaluation, prediction and serving
can never disagree about preprocessing.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnist_jax.augment import Augmentation, deskew, random_warp
from mnist_jax.config import Config
from mnist_jax.data import normalize


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
    augment: Augmentation = Augmentation()  # random warps in training only, from the 'augment' PRNG stream

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """uint8 images (B, H, W, C) -> logits (B, num_classes)."""
        if train and self.augment.enabled:
            images = random_warp(self.make_rng("augment"), images, self.augment)
        if self.deskew:
            images = deskew(images)
        x = normalize(images, self.mean, self.std).astype(self.dtype)
        for width in self.conv_features:
            for _ in range(self.convs_per_block):
                x = nn.Conv(width, kernel_size=(3, 3), dtype=self.dtype)(x)
                x = self._maybe_batch_norm(x, train)
                x = nn.relu(x)
            pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
            x = pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in self.dense_features:
            x = nn.Dense(width, dtype=self.dtype)(x)
            x = self._maybe_batch_norm(x, train)
            x = nn.relu(x)
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)

    def _maybe_batch_norm(self, x: jax.Array, train: bool) -> jax.Array:
        if not self.batch_norm:
            return x
        return BatchNorm(groups=self.batch_norm_groups, dtype=self.dtype)(x, train)


class BatchNorm(nn.Module):
    """Batch norm whose training statistics come from `groups` equal slices of the batch ("ghost" batch norm).

    With one group this is `flax.linen.BatchNorm` (same variables, names and maths). With the batch split over
    N devices, N groups keep every statistic on its own device instead of all-reducing each layer's mean and
    variance forward and backward (a few percent of step time on two CPU devices), and the result depends on
    `groups`, never on the device count. Running averages (used at evaluation) average the groups.

    The normalisation is one multiply-add per element, `x * a + b`, with the per-channel `a` and `b` folded from
    the statistics, scale and bias first: 7% more training steps a second for the `strong` preset on a 2-core
    CPU than `(x - mean) * rsqrt(var + eps) * scale + bias`, whose broadcasts XLA:CPU runs as separate passes.
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
        augment=Augmentation(config.augment_rotation, config.augment_scale, config.augment_shift,
                             config.augment_elastic_alpha, config.augment_elastic_sigma),
    )


def head_name(config: Config) -> str:
    """The classifier's parameter collection: linen names the last Dense after the hidden ones."""
    return f"Dense_{len(config.dense_features)}"


def feature_layer_names(config: Config) -> tuple[str, ...]:
    """The convolutional feature extractor's parameter collections: every Conv, and the batch norms that follow
    them (linen numbers BatchNorm layers in call order, so the first len(conv_features) * convs_per_block belong
    to the convs)."""
    num_convs = len(config.conv_features) * config.convs_per_block
    convs = tuple(f"Conv_{i}" for i in range(num_convs))
    norms = tuple(f"BatchNorm_{i}" for i in range(num_convs)) if config.batch_norm else ()
    return convs + norms


def count_params(params) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
