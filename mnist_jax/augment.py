"""On-device augmentation: a random affine warp (rotation, scale, shift) and optional elastic distortion per
example, inside the jitted step.

Each example gets its own transform, drawn from the step's PRNG key, so a given seed always sees the same
augmented batches and a resumed run stays bit-identical. Pixels are resampled bilinearly
(`jax.scipy.ndimage.map_coordinates`); what falls outside the image is background (0).

Elastic distortion follows Simard et al. (2003), "Best practices for convolutional neural networks applied to
visual document analysis": every pixel gets a random displacement drawn uniformly from [-1, 1] per axis, the
displacement field is smoothed with a Gaussian of width `elastic_sigma` pixels and scaled by `elastic_alpha`
(they used alpha 34, sigma 4 on MNIST: displacements of about 1.4 pixels RMS that bend strokes the way hands do).

Test-time augmentation reuses `warp` with a fixed set of small transforms (`TEST_TIME_VIEWS`) whose predictions
inference averages.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from mnist_jax.config import Config


class View(NamedTuple):
    """One fixed transform for test-time augmentation: rotation (degrees), scale, shift (dy, dx) in pixels."""

    rotation: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)


# The identity first, then one-pixel shifts, rotations of 3 and 6 degrees and a 7% zoom either way: chosen on the
# validation slices of three `strong` runs, never on test (docs/accuracy.md).
TEST_TIME_VIEWS: tuple[View, ...] = (
    View(),
    View(shift=(-1.0, 0.0)), View(shift=(1.0, 0.0)), View(shift=(0.0, -1.0)), View(shift=(0.0, 1.0)),
    View(rotation=-6.0), View(rotation=6.0), View(rotation=-3.0), View(rotation=3.0),
    View(scale=0.93), View(scale=1.07),
)


class Augmentation(NamedTuple):
    """Largest rotation (degrees), relative scale change and shift (pixels), and the elastic field's scale and
    smoothness (pixels); rotation, scale, shift and elastic_alpha all zero means no augmentation."""

    rotation: float = 0.0
    scale: float = 0.0
    shift: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0

    @property
    def enabled(self) -> bool:
        return max(self.rotation, self.scale, self.shift, self.elastic_alpha) > 0


def training_augmentation(config: Config) -> Augmentation:
    """The random warps a run trains with (its `--augment-*` flags)."""
    return Augmentation(config.augment_rotation, config.augment_scale, config.augment_shift,
                        config.augment_elastic_alpha, config.augment_elastic_sigma)


def warp(image: jax.Array, angle: jax.Array, scale: jax.Array, shift: jax.Array,
         displacement: jax.Array | None = None) -> jax.Array:
    """One (H, W, C) image rotated by `angle` (radians) and scaled about its centre, then shifted by (dy, dx);
    `displacement` (2, H, W), if given, moves each output pixel's source point by a further (dy, dx)."""
    height, width = image.shape[:2]
    centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    y, x = rows - centre_y - shift[0], cols - centre_x - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source = [(cos * y + sin * x) / scale + centre_y, (-sin * y + cos * x) / scale + centre_x]
    if displacement is not None:
        source = [source[0] + displacement[0], source[1] + displacement[1]]
    channels = [map_coordinates(image[..., c], source, order=1, mode="constant", cval=0.0)
                for c in range(image.shape[-1])]
    return jnp.stack(channels, axis=-1)


def gaussian_blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) matrix G with G @ v equal to `scipy.ndimage.gaussian_filter1d(v, sigma, mode="constant")`:
    a normalised Gaussian truncated at 4 sigma, zeros beyond the edges. Built once, at trace time."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    offsets = np.arange(size)[None, :] - np.arange(size)[:, None]  # column minus row
    inside = np.abs(offsets) <= radius
    return np.where(inside, taps[np.clip(offsets + radius, 0, 2 * radius)], 0.0).astype(np.float32)


def elastic_displacements(key: jax.Array, batch: int, height: int, width: int, alpha: float,
                          sigma: float) -> jax.Array:
    """(batch, 2, H, W) smooth random displacement fields in pixels: uniform noise, Gaussian-smoothed (two small
    matrix products per field, cheaper than a convolution at this size), times alpha."""
    noise = jax.random.uniform(key, (batch, 2, height, width), minval=-1.0, maxval=1.0)
    blur_rows, blur_cols = gaussian_blur_matrix(height, sigma), gaussian_blur_matrix(width, sigma)
    return alpha * jnp.einsum("ij,bcjk,lk->bcil", blur_rows, noise, blur_cols)


def random_warp(key: jax.Array, images: jax.Array, limits: Augmentation) -> jax.Array:
    """A batch (B, H, W, C) of pixel values, each example warped by its own random transform within `limits`."""
    angle_key, scale_key, shift_key = jax.random.split(key, 3)
    batch, height, width = images.shape[:3]
    angles = jnp.deg2rad(jax.random.uniform(angle_key, (batch,), minval=-limits.rotation, maxval=limits.rotation))
    scales = jax.random.uniform(scale_key, (batch,), minval=1 - limits.scale, maxval=1 + limits.scale)
    shifts = jax.random.uniform(shift_key, (batch, 2), minval=-limits.shift, maxval=limits.shift)
    pixels = images.astype(jnp.float32)
    if limits.elastic_alpha > 0:
        # A key of its own, folded in rather than split off, so affine-only runs keep their random stream.
        fields = elastic_displacements(jax.random.fold_in(key, 3), batch, height, width, limits.elastic_alpha,
                                       limits.elastic_sigma)
        warped = jax.vmap(warp)(pixels, angles, scales, shifts, fields)
    else:
        warped = jax.vmap(warp)(pixels, angles, scales, shifts)
    return jnp.clip(warped, 0.0, 255.0)


def deskew(images: jax.Array) -> jax.Array:
    """A batch (B, H, W, C) of pixel values with each example's slant removed: every row is shifted sideways in
    proportion to its height above or below the centre of mass, by the slope that makes the pixels' row-column
    covariance zero (the classic MNIST preprocessing, "deskewing" in the results table of MNIST's home page).
    Position, height and stroke width are kept; a blank image stays blank."""
    pixels = images.astype(jnp.float32)
    batch, height, width = pixels.shape[:3]
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    ink = pixels.sum(-1)
    mass = jnp.maximum(ink.sum((1, 2)), 1e-6)
    centre_y = (ink * rows).sum((1, 2)) / mass
    centre_x = (ink * cols).sum((1, 2)) / mass
    dy = rows - centre_y[:, None, None]
    dx = cols - centre_x[:, None, None]
    var_y = (ink * dy * dy).sum((1, 2)) / mass
    cov_yx = (ink * dy * dx).sum((1, 2)) / mass
    slope = jnp.where(var_y > 1e-6, cov_yx / jnp.maximum(var_y, 1e-6), 0.0)
    # Output pixel (r, c) reads input (r, c + slope * (r - centre_y)): a horizontal shear about the centre of mass.
    fields = jnp.stack([jnp.zeros_like(dy), jnp.broadcast_to(slope[:, None, None] * dy, dy.shape)], axis=1)
    warped = jax.vmap(warp)(pixels, jnp.zeros((batch,)), jnp.ones((batch,)), jnp.zeros((batch, 2)), fields)
    return jnp.clip(warped, 0.0, 255.0)


def apply_view(images: jax.Array, view: View) -> jax.Array:
    """A batch (B, H, W, C) of pixel values, every example warped by the same fixed `view`."""
    batch = images.shape[0]
    warped = jax.vmap(warp)(images.astype(jnp.float32), jnp.full((batch,), np.deg2rad(view.rotation), jnp.float32),
                            jnp.full((batch,), view.scale, jnp.float32),
                            jnp.broadcast_to(jnp.asarray(view.shift, jnp.float32), (batch, 2)))
    return jnp.clip(warped, 0.0, 255.0)
