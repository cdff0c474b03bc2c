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

from mnist_jax.augment import AffineRange, random_affine
from mnist_jax.config import Config
from mnist_jax.data import normalize


class CNN(nn.Module):
    """Conv blocks (conv 3x3 -> [batch norm] -> relu -> avg-pool 2), then dense blocks, then the classifier."""

    num_classes: int
    mean: float
    std: float
    conv_features: Sequence[int] = (32, 64)
    dense_features: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    batch_norm: bool = False
    dtype: str = "float32"  # computation dtype; parameters are float32 either way
    augment: AffineRange = AffineRange()  # random affine warps in training only, from the 'augment' PRNG stream

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """uint8 images (B, H, W, C) -> logits (B, num_classes)."""
        if train and self.augment.enabled:
            images = random_affine(self.make_rng("augment"), images, self.augment)
        x = normalize(images, self.mean, self.std).astype(self.dtype)
        for width in self.conv_features:
            x = nn.Conv(width, kernel_size=(3, 3), dtype=self.dtype)(x)
            x = self._maybe_batch_norm(x, train)
            x = nn.relu(x)
            x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
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
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)


def build_model(config: Config, num_classes: int, mean: float, std: float) -> CNN:
    """The CNN a config describes, for a dataset with these classes and pixel statistics."""
    return CNN(
        num_classes=num_classes,
        mean=mean,
        std=std,
        conv_features=tuple(config.conv_features),
        dense_features=tuple(config.dense_features),
        dropout_rate=config.dropout_rate,
        batch_norm=config.batch_norm,
        dtype=config.dtype,
        augment=AffineRange(config.augment_rotation, config.augment_scale, config.augment_shift),
    )


def head_name(config: Config) -> str:
    """The classifier's parameter collection: linen names the last Dense after the hidden ones."""
    return f"Dense_{len(config.dense_features)}"


def feature_layer_names(config: Config) -> tuple[str, ...]:
    """The convolutional feature extractor's parameter collections: every Conv, and the batch norms that follow
    them (linen numbers BatchNorm layers in call order, so the first len(conv_features) belong to the convs)."""
    convs = tuple(f"Conv_{i}" for i in range(len(config.conv_features)))
    norms = tuple(f"BatchNorm_{i}" for i in range(len(config.conv_features))) if config.batch_norm else ()
    return convs + norms


def count_params(params) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
