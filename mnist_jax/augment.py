"""On-device augmentation: a random affine warp (rotation, scale, shift) per example, inside the jitted step.

Each example gets its own transform, drawn from the step's PRNG key, so a given seed always sees the same
augmented batches and a resumed run stays bit-identical. Pixels are resampled bilinearly
(`jax.scipy.ndimage.map_coordinates`); what falls outside the image is background (0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates


class AffineRange(NamedTuple):
    """Largest rotation (degrees), relative scale change and shift (pixels); all zero means no augmentation."""

    rotation: float = 0.0
    scale: float = 0.0
    shift: float = 0.0

    @property
    def enabled(self) -> bool:
        return any(value > 0 for value in self)


def warp(image: jax.Array, angle: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """One (H, W, C) image rotated by `angle` (radians) and scaled about its centre, then shifted by (dy, dx)."""
    height, width = image.shape[:2]
    centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    y, x = rows - centre_y - shift[0], cols - centre_x - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source = [(cos * y + sin * x) / scale + centre_y, (-sin * y + cos * x) / scale + centre_x]
    channels = [map_coordinates(image[..., c], source, order=1, mode="constant", cval=0.0)
                for c in range(image.shape[-1])]
    return jnp.stack(channels, axis=-1)


def random_affine(key: jax.Array, images: jax.Array, limits: AffineRange) -> jax.Array:
    """A batch (B, H, W, C) of pixel values, each example warped by its own random transform within `limits`."""
    angle_key, scale_key, shift_key = jax.random.split(key, 3)
    batch = images.shape[0]
    angles = jnp.deg2rad(jax.random.uniform(angle_key, (batch,), minval=-limits.rotation, maxval=limits.rotation))
    scales = jax.random.uniform(scale_key, (batch,), minval=1 - limits.scale, maxval=1 + limits.scale)
    shifts = jax.random.uniform(shift_key, (batch, 2), minval=-limits.shift, maxval=limits.shift)
    warped = jax.vmap(warp)(images.astype(jnp.float32), angles, scales, shifts)
    return jnp.clip(warped, 0.0, 255.0)
