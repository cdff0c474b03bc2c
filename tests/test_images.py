"""User images must come out looking like MNIST digits: 28x28, light on dark,
20 px bounding box, centre of mass at the frame centre."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from mnist_jax.images import ImageError, load_image, preprocess_file, to_mnist

FRAME_CENTRE = 13.5


def draw_seven_like(size: tuple[int, int], box: tuple[int, int, int, int], stroke: int) -> np.ndarray:
    """A light-on-dark '7'-ish digit (bar + diagonal + crossbar) as uint8 (height, width)."""
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    draw.line([(left, top), (right, top)], fill=255, width=stroke)
    draw.line([(right, top), (left + (right - left) // 3, bottom)], fill=255, width=stroke)
    middle = (top + bottom) // 2
    draw.line([(left + (right - left) // 3, middle), (right - (right - left) // 6, middle)], fill=255, width=stroke)
    return np.asarray(image)


def draw_zero_like(size: tuple[int, int], box: tuple[int, int, int, int], stroke: int) -> np.ndarray:
    """A light-on-dark tall ring, like a '0', as uint8 (height, width)."""
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).ellipse(box, outline=255, width=stroke)
    return np.asarray(image)


def ink_bounding_box(digit: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero((digit > 0).any(axis=1))
    cols = np.flatnonzero((digit > 0).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def assert_mnist_like(digit: np.ndarray) -> None:
    assert digit.shape == (28, 28)
    assert digit.dtype == np.uint8
    height, width = ink_bounding_box(digit)
    assert abs(max(height, width) - 20) <= 1, (height, width)
    centre_row, centre_col = ndimage.center_of_mass(digit.astype(np.float64))
    assert abs(centre_row - FRAME_CENTRE) <= 1.0 and abs(centre_col - FRAME_CENTRE) <= 1.0
    # Light ink on a dark background: dark border, bright strokes.
    border = np.concatenate([digit[0], digit[-1], digit[:, 0], digit[:, -1]])
    assert border.max() == 0
    assert digit.max() == 255


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return path


@pytest.fixture
def seven() -> np.ndarray:
    # Blurred so edges are antialiased, like a real scan or drawing app export.
    sharp = Image.fromarray(draw_seven_like((120, 160), (35, 30, 85, 130), stroke=12))
    return np.asarray(sharp.filter(ImageFilter.GaussianBlur(2)))


def test_light_on_dark(tmp_path: Path, seven: np.ndarray) -> None:
    digit = preprocess_file(save(seven, tmp_path / "light.png"))
    assert_mnist_like(digit)


def test_dark_on_white_gives_same_result_as_light_on_dark(tmp_path: Path, seven: np.ndarray) -> None:
    light = preprocess_file(save(seven, tmp_path / "light.png"))
    dark = preprocess_file(save(255 - seven, tmp_path / "dark.png"))
    assert_mnist_like(dark)
    assert np.abs(light.astype(int) - dark.astype(int)).max() <= 2


def test_tall_digit_keeps_aspect_ratio(seven: np.ndarray) -> None:
    digit = to_mnist(seven)
    height, width = ink_bounding_box(digit)
    # Drawn box is ~100 tall and ~50 wide (plus stroke); the ratio must survive scaling.
    assert height == 20
    assert 10 <= width <= 14


def test_grey_paper_background_is_removed() -> None:
    ring = draw_zero_like((100, 80), (15, 10, 65, 90), stroke=10).astype(np.float32)
    photo_like = 200.0 - ring * (150.0 / 255.0)  # dark-grey ink on light-grey paper
    assert_mnist_like(to_mnist(photo_like))
    np.testing.assert_array_equal(to_mnist(photo_like), to_mnist(ring))


@pytest.mark.parametrize("ink_value", [0, 255])
def test_rgba_with_transparent_background(tmp_path: Path, ink_value: int) -> None:
    ring = draw_zero_like((100, 80), (15, 10, 65, 90), stroke=10)
    rgba = np.zeros(ring.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = ink_value  # fully transparent pixels carry the same colour as the ink
    rgba[..., 3] = ring  # ink is opaque, background fully transparent, edges antialiased
    digit = preprocess_file(save(rgba, tmp_path / "transparent.png"))
    assert_mnist_like(digit)
    assert correlation(digit, to_mnist(ring)) > 0.99


def test_off_centre_in_large_canvas() -> None:
    canvas = draw_seven_like((500, 300), (360, 20, 460, 200), stroke=18)  # width 500, height 300
    digit = to_mnist(canvas)
    assert_mnist_like(digit)


def test_tiny_image_is_upscaled() -> None:
    tiny = draw_zero_like((10, 10), (2, 1, 7, 8), stroke=1)
    digit = to_mnist(tiny)
    assert_mnist_like(digit)


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "1", "I;16", "JPEG"])
def test_file_formats_give_the_same_digit(tmp_path: Path, seven: np.ndarray, mode: str) -> None:
    reference = to_mnist(seven)
    dark_on_white = 255 - seven
    if mode == "I;16":
        path = tmp_path / "sixteen.png"
        Image.fromarray(dark_on_white.astype(np.uint16) * 257).save(path)
        assert Image.open(path).mode.startswith("I")
    elif mode == "JPEG":
        path = tmp_path / "photo.jpg"
        Image.fromarray(dark_on_white).convert("RGB").save(path, quality=90)
    else:
        path = save(dark_on_white, tmp_path / f"mode_{mode}.png", mode)
    gray = load_image(path)
    assert gray.dtype == np.float32 and gray.shape == seven.shape
    assert 0.0 <= gray.min() and gray.max() <= 255.0
    if mode in ("L", "RGB", "I;16"):  # lossless encodings must read back the same intensities
        np.testing.assert_allclose(gray, dark_on_white, atol=0.51)
    digit = preprocess_file(path)
    assert_mnist_like(digit)
    assert correlation(digit, reference) > 0.97


def test_mnist_like_round_trip(tmp_path: Path) -> None:
    # An already-MNIST-style digit: soft tall ring, 20 px high, centred at 13.5.
    rows, cols = np.indices((28, 28)).astype(np.float64)
    radius = np.sqrt(((rows - FRAME_CENTRE) / 8.5) ** 2 + ((cols - FRAME_CENTRE) / 5.0) ** 2)
    original = np.clip(255.0 * (1.0 - np.abs(radius - 1.0) / 0.18), 0, 255).astype(np.uint8)
    assert ink_bounding_box(original)[0] in (19, 20, 21)
    digit = preprocess_file(save(original, tmp_path / "mnist_like.png"))
    assert_mnist_like(digit)
    assert correlation(digit, original) > 0.9


def test_blank_image_is_rejected_with_file_name(tmp_path: Path) -> None:
    path = save(np.full((40, 40), 255, dtype=np.uint8), tmp_path / "blank_page.png")
    with pytest.raises(ImageError, match="blank_page.png"):
        preprocess_file(path)
    with pytest.raises(ImageError, match="blank"):
        to_mnist(np.zeros((28, 28)))


def test_text_file_with_png_name(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="x.png") as error:
        preprocess_file(path)
    assert "\n" not in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does_not_exist.png"):
        load_image(tmp_path / "does_not_exist.png")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg"):
        preprocess_file(path)


def test_truncated_png(tmp_path: Path, seven: np.ndarray) -> None:
    path = save(seven, tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(path)


def test_image_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)
    assert str(ImageError("bad\nthing", "a.png")) == "cannot use image 'a.png': bad thing"
