"""Turn a user's image file into an MNIST-style 28x28 digit.

A model trained on MNIST only works on inputs prepared the way MNIST was:
light ink on a dark background, the digit's bounding box scaled so its
longer side is 20 px (aspect ratio kept), and the digit placed so its
centre of mass sits at the centre of a 28x28 frame.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MNIST_SIZE = 28
DIGIT_BOX_SIZE = 20
FRAME_CENTRE = (MNIST_SIZE - 1) / 2.0  # 13.5: the centre between the middle pixels
LIGHT_BACKGROUND_THRESHOLD = 127.0
INK_FRACTION_OF_MAX = 0.1  # pixels fainter than this (relative to the strongest ink) don't extend the crop
MIN_INK_CONTRAST = 10.0  # below this (on 0..255) the image is treated as blank
SIXTEEN_BIT_TO_EIGHT_BIT = 255.0 / 65535.0
MAX_PIXELS = 50_000_000  # larger images are refused before decoding: they would take seconds and gigabytes


class ImageError(ValueError):
    """An image that cannot be turned into a digit, with a one-line user-readable reason."""

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        self.reason = " ".join(str(reason).split())  # keep the message on one line
        self.path = None if path is None else str(path)
        message = self.reason if self.path is None else f"cannot use image '{self.path}': {self.reason}"
        super().__init__(message)


def _to_grayscale_array(image: Image.Image) -> np.ndarray:
    """Grayscale float32 in [0, 255] for any Pillow mode, flattening transparency onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: rescale the 16-bit range instead of clipping it.
        values = np.asarray(image, dtype=np.float64) * SIXTEEN_BIT_TO_EIGHT_BIT
        return np.clip(values, 0.0, 255.0).astype(np.float32)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 255.0)
    has_transparency = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_transparency:
        image = _flatten_transparency(image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32)


def _flatten_transparency(rgba: Image.Image) -> Image.Image:
    """Composite over a background that contrasts with the visible strokes.

    Transparent pixels are background. Dark ink (the common case, e.g. a black
    pen on a transparent canvas) goes over white; light ink goes over black,
    so a white stroke on a transparent canvas does not vanish into white.
    """
    if rgba.getchannel("A").getextrema() == (255, 255):
        return rgba  # fully opaque (e.g. a browser canvas export): nothing to flatten
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
    luminance = np.asarray(rgba.convert("L"), dtype=np.float64)
    visible_weight = alpha.sum()
    visible_is_light = visible_weight > 0 and (luminance * alpha).sum() / visible_weight > LIGHT_BACKGROUND_THRESHOLD
    background_value = 0 if visible_is_light and alpha.min() < 255 else 255
    background = Image.new("RGBA", rgba.size, (background_value,) * 3 + (255,))
    return Image.alpha_composite(background, rgba)


def load_image_bytes(data: bytes, name: str = "<upload>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ...) to float32 grayscale in [0, 255].

    The one decoder behind files and uploads, so the CLI and the server see the
    same pixels. Transparent pixels become background (white behind dark
    strokes, black behind light ones); ``to_mnist`` then decides the polarity
    from the border. Images over ``max_pixels`` are refused before decoding.
    """
    if not data:
        raise ImageError("empty file: no image data", name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image too large ({width}x{height} pixels; at most {max_pixels} allowed)", name)
            image.load()
            upright = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
            gray = _to_grayscale_array(upright)
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format (expected PNG or JPEG)", name) from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise ImageError(f"unreadable image ({error})", name) from None
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError("image has no pixels", name)
    return gray


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as float32 grayscale in [0, 255] (see ``load_image_bytes``)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ImageError("file not found", path) from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file", path) from None
    except OSError as error:
        raise ImageError(f"cannot read file ({error.strerror or error})", path) from None
    return load_image_bytes(data, str(path))


def _outer_frame(gray: np.ndarray) -> np.ndarray:
    """The one-pixel border, which for a photographed or drawn digit is background."""
    return np.concatenate([gray[0, :], gray[-1, :], gray[1:-1, 0], gray[1:-1, -1]])


def _ink_intensity(gray: np.ndarray) -> np.ndarray:
    """Ink as positive values on a zero background, whatever the original polarity."""
    gray = gray.astype(np.float32)
    if np.median(_outer_frame(gray)) > LIGHT_BACKGROUND_THRESHOLD:
        gray = 255.0 - gray
    # Subtracting the background level makes grey paper or a dim screen count as 0.
    background_level = np.median(_outer_frame(gray))
    return np.clip(gray - background_level, 0.0, None)


def _ink_bounding_box(ink: np.ndarray) -> tuple[slice, slice]:
    """Rows/cols covering every pixel with a meaningful share of the strongest ink."""
    mask = ink > INK_FRACTION_OF_MAX * ink.max()
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _resize_longer_side(patch: np.ndarray, longer_side: int) -> np.ndarray:
    """Scale so the longer side equals ``longer_side``, keeping the aspect ratio, antialiased."""
    height, width = patch.shape
    scale = longer_side / max(height, width)
    new_height = max(1, int(round(height * scale)))
    new_width = max(1, int(round(width * scale)))
    resized = Image.fromarray(patch.astype(np.float32)).resize(
        (new_width, new_height), resample=Image.Resampling.LANCZOS
    )
    # Lanczos can ring slightly below zero / above the peak; clip back.
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 255.0)


def _centre_of_mass(weights: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted (row, col) centre."""
    rows, cols = np.indices(weights.shape)
    total = weights.sum()
    return float((rows * weights).sum() / total), float((cols * weights).sum() / total)


def _paste_centred_by_mass(digit: np.ndarray) -> np.ndarray:
    """Place the digit in a 28x28 frame with its centre of mass near the frame centre.

    The offset is rounded to whole pixels, as MNIST did, and clamped so no ink
    is pushed off the frame.
    """
    height, width = digit.shape
    centre_row, centre_col = _centre_of_mass(digit)
    top = int(np.floor(FRAME_CENTRE - centre_row + 0.5))
    left = int(np.floor(FRAME_CENTRE - centre_col + 0.5))
    top = min(max(top, 0), MNIST_SIZE - height)
    left = min(max(left, 0), MNIST_SIZE - width)
    frame = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    frame[top : top + height, left : left + width] = digit
    return frame


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Convert a grayscale image of one digit into a 28x28 uint8 MNIST-style array."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"expected a non-empty 2-D grayscale image, got shape {gray.shape}")
    ink = _ink_intensity(gray)
    if ink.max() < MIN_INK_CONTRAST:
        raise ImageError("image is blank: no digit found (too little contrast with the background)")
    rows, cols = _ink_bounding_box(ink)
    # Stretch so the strongest stroke is full white, like MNIST's digits.
    cropped = ink[rows, cols] * (255.0 / ink.max())
    digit = _resize_longer_side(cropped, DIGIT_BOX_SIZE)
    if digit.sum() <= 0:
        raise ImageError("image is blank: no digit found after resizing")
    frame = _paste_centred_by_mass(digit)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def preprocess_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file and return the 28x28 uint8 MNIST-style digit it contains."""
    gray = load_image(path)
    try:
        return to_mnist(gray)
    except ImageError as error:
        raise ImageError(error.reason, path) from None

