"""On-device augmentation: geometry, ranges, per-example transforms, determinism, and its place in the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax.augment import (TEST_TIME_VIEWS, Augmentation, View, apply_view, deskew, elastic_displacements,
                               gaussian_blur_matrix, random_warp, warp)
from mnist_jax.config import Config, UserError, validate
from mnist_jax.model import build_model

from helpers import (IN_PROCESS, SMALL_MODEL, TINY, copy, make_tiny_images, new_state, run_module, run_tool,
                     train_in_process, train_step)


def images(n=16, seed=0):
    return jnp.asarray(make_tiny_images(np.arange(n) % 10, np.random.default_rng(seed)))


def test_no_rotation_unit_scale_no_shift_is_the_identity():
    batch = images()
    out = jax.vmap(warp)(batch.astype(jnp.float32), jnp.zeros(16), jnp.ones(16), jnp.zeros((16, 2)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(batch, np.float32), atol=1e-4)
    zero = random_warp(jax.random.PRNGKey(0), batch, Augmentation(0.0, 0.0, 0.0))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(batch, np.float32), atol=1e-4)


def test_elastic_distortion_with_zero_alpha_is_the_identity():
    batch = images()
    zero = random_warp(jax.random.PRNGKey(0), batch, Augmentation(elastic_alpha=0.0, elastic_sigma=4.0))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(batch, np.float32), atol=1e-4)
    still = jax.vmap(warp)(batch.astype(jnp.float32), jnp.zeros(16), jnp.ones(16), jnp.zeros((16, 2)),
                           jnp.zeros((16, 2, 28, 28)))
    np.testing.assert_allclose(np.asarray(still), np.asarray(batch, np.float32), atol=1e-4)


def test_the_blur_matrix_is_scipys_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(0).uniform(-1, 1, (28, 28)).astype(np.float32)
    for sigma in (1.0, 4.0, 6.0):
        ours = gaussian_blur_matrix(28, sigma) @ noise @ gaussian_blur_matrix(28, sigma).T
        np.testing.assert_allclose(ours, gaussian_filter(noise, sigma, mode="constant", cval=0.0), atol=1e-5)


def test_elastic_fields_are_smooth_scaled_by_alpha_and_move_pixels():
    key = jax.random.PRNGKey(3)
    field = np.asarray(elastic_displacements(key, 64, 28, 28, alpha=34.0, sigma=4.0))
    doubled = np.asarray(elastic_displacements(key, 64, 28, 28, alpha=68.0, sigma=4.0))
    np.testing.assert_allclose(doubled, 2 * field, rtol=1e-5, atol=1e-6)
    rms = float(np.sqrt((field[:, :, 7:21, 7:21] ** 2).mean()))  # centre: the zero padding damps the edges
    assert 0.8 < rms < 2.5  # Simard's setting moves pixels by about 1.4 px
    neighbour_step = np.abs(np.diff(field, axis=-1)).mean()
    assert neighbour_step < 0.25 * np.abs(field).mean()  # smooth: neighbours move together
    batch = images(8)
    bent = np.asarray(random_warp(key, batch, Augmentation(elastic_alpha=34.0)))
    assert bent.min() >= 0 and bent.max() <= 255
    assert all(not np.allclose(bent[i], np.asarray(batch[i], np.float32), atol=1) for i in range(8))
    np.testing.assert_array_equal(bent, np.asarray(random_warp(key, batch, Augmentation(elastic_alpha=34.0))))


def test_an_integer_shift_moves_pixels_exactly():
    image = jnp.zeros((28, 28, 1)).at[10, 12, 0].set(200.0)
    moved = warp(image, jnp.array(0.0), jnp.array(1.0), jnp.array([3.0, -2.0]))
    assert float(moved[13, 10, 0]) == 200.0 and float(moved.sum()) == 200.0


def test_a_quarter_turn_rotates_about_the_centre():
    image = jnp.zeros((28, 28, 1)).at[5, 13:15, 0].set(100.0)  # a short bar near the top
    turned = np.asarray(warp(image, jnp.deg2rad(90.0), jnp.array(1.0), jnp.zeros(2)))[..., 0]
    ys, xs = np.nonzero(turned > 50)
    assert abs(xs.mean() - 13.5) > 7 and abs(ys.mean() - 13.5) < 1.5  # the bar moved to a side


def test_test_time_views_are_scipys_affine_transforms():
    """Each fixed view against scipy.ndimage.affine_transform with the same rotation and zoom about the centre."""
    from scipy.ndimage import affine_transform

    batch = images(4)
    centre = np.array([13.5, 13.5])
    assert TEST_TIME_VIEWS[0] == View() and len(set(TEST_TIME_VIEWS)) == len(TEST_TIME_VIEWS) == 11
    for view in TEST_TIME_VIEWS:
        angle = np.deg2rad(view.rotation)
        # warp's output pixel p reads the source point M (p - centre - shift) + centre.
        matrix = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) / view.scale
        offset = centre - matrix @ (centre + np.asarray(view.shift))
        ours = np.asarray(apply_view(batch, view))
        assert ours.shape == batch.shape and ours.min() >= 0 and ours.max() <= 255
        for image, warped in zip(np.asarray(batch, np.float64), ours):
            expected = affine_transform(image[..., 0], matrix, offset, order=1, mode="grid-constant", cval=0.0)
            np.testing.assert_allclose(warped[..., 0], expected, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(apply_view(batch, View())), np.asarray(batch, np.float32))


def slant(image: np.ndarray) -> tuple[float, float, float]:
    """Centre of mass (row, column) and slope cov(row, column) / var(row) of one (H, W) image, in float64."""
    rows, cols = np.mgrid[:image.shape[0], :image.shape[1]]
    mass = image.sum()
    centre_y, centre_x = (image * rows).sum() / mass, (image * cols).sum() / mass
    dy, dx = rows - centre_y, cols - centre_x
    return centre_y, centre_x, (image * dy * dx).sum() / (image * dy * dy).sum()


def test_deskew_is_scipys_shear_about_the_centre_of_mass():
    """Against scipy.ndimage.affine_transform with the slope and centre computed in numpy, float64."""
    from scipy.ndimage import affine_transform

    batch = images(8)
    ours = np.asarray(deskew(batch))
    assert ours.shape == batch.shape and ours.min() >= 0 and ours.max() <= 255
    for image, straight in zip(np.asarray(batch, np.float64)[..., 0], ours[..., 0]):
        centre_y, _, slope = slant(image)
        # Output pixel (r, c) reads input (r, c + slope * (r - centre_y)).
        expected = affine_transform(image, np.array([[1.0, 0.0], [slope, 1.0]]), [0.0, -slope * centre_y],
                                    order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(straight, expected, atol=1e-3)


def test_deskew_stands_a_slanted_stroke_upright_and_keeps_its_position():
    image = np.zeros((28, 28), np.uint8)
    for row in range(4, 24):  # a bar leaning right as it goes down: one column per two rows
        column = 8 + row // 2
        image[row, column:column + 3] = 255
    before = slant(image.astype(np.float64))
    straight = np.asarray(deskew(jnp.asarray(image[None, :, :, None])))[0, :, :, 0].astype(np.float64)
    after = slant(straight)
    assert before[2] > 0.4 and abs(after[2]) < 1e-3
    np.testing.assert_allclose(after[:2], before[:2], atol=1e-3)  # centre of mass kept
    np.testing.assert_allclose(straight.sum(), image.sum(), rtol=1e-4)  # no ink lost
    columns = [np.average(np.arange(28), weights=straight[row]) for row in range(4, 24)]
    assert np.ptp(columns) < 1.0  # every row's ink now sits in the same columns (it spanned 10 before)


def test_deskew_leaves_upright_and_blank_images_alone():
    upright = np.zeros((1, 28, 28, 1), np.uint8)
    upright[0, 6:22, 12:16] = 200
    upright[0, 6:9, 8:20] = 120  # a symmetric "T": no slant
    np.testing.assert_allclose(np.asarray(deskew(jnp.asarray(upright))), upright.astype(np.float32), atol=1e-3)
    blank = np.asarray(deskew(jnp.zeros((2, 28, 28, 1), jnp.uint8)))
    assert np.isfinite(blank).all() and not blank.any()


def test_outputs_stay_in_range_and_examples_get_different_transforms():
    batch = jnp.repeat(images(1), 8, axis=0)  # eight copies of one image
    out = np.asarray(random_warp(jax.random.PRNGKey(1), batch, Augmentation(15.0, 0.1, 2.0)))
    assert out.min() >= 0 and out.max() <= 255
    assert len({out[i].tobytes() for i in range(8)}) == 8


def test_the_same_key_gives_the_same_batch():
    limits = Augmentation(10.0, 0.1, 2.0)
    a = random_warp(jax.random.PRNGKey(7), images(), limits)
    b = random_warp(jax.random.PRNGKey(7), images(), limits)
    c = random_warp(jax.random.PRNGKey(8), images(), limits)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_augmentation_in_training_only_and_deterministic_in_the_step():
    config = Config(augment_rotation=10.0, augment_scale=0.1, augment_shift=2.0)
    model = build_model(config, 10, 0.2, 0.3)
    state = new_state(config)
    batch = {"image": images(32), "label": jnp.arange(32) % 10}
    # Evaluation never augments: two calls agree and equal the plain model.
    plain = build_model(Config(), 10, 0.2, 0.3)
    np.testing.assert_array_equal(np.asarray(model.apply(state.variables(), batch["image"])),
                                  np.asarray(plain.apply(state.variables(), batch["image"])))
    a, ma = train_step(config)(copy(state), batch)
    b, mb = train_step(config)(copy(state), batch)
    assert float(ma["loss"]) == float(mb["loss"])
    plain_state = new_state(Config())
    _, unaugmented = train_step(Config())(plain_state, batch)
    assert float(unaugmented["loss"]) != float(ma["loss"])  # training does augment


@pytest.mark.e2e
def test_augmenting_training_run_writes_what_the_model_sees(strong_tiny_run, tmp_path):
    """`train` with augmentation on (here the strong preset's, elastic distortion included) writes
    DIR/augmentations.png; bad augmentation flags are one-line errors."""
    from PIL import Image

    with Image.open(strong_tiny_run / "augmentations.png") as picture:
        assert picture.format == "PNG" and picture.width >= 300 and picture.height >= 300
        pixels = np.asarray(picture.convert("L"), np.float64)
    assert pixels.mean() < 160 and pixels.std() > 50  # bright strokes on dark cells, not lines or text on white
    assert_bad_augmentation_flags_are_refused(run_module, tmp_path)


def test_bad_augmentation_flags_are_one_line_errors(tmp_path):
    """The previous test's command-line part, by the training command's main in this process."""
    assert_bad_augmentation_flags_are_refused(functools.partial(run_tool, IN_PROCESS), tmp_path)


def assert_bad_augmentation_flags_are_refused(run, tmp_path):
    bad = run("mnist_jax.train", "--workdir", tmp_path / "x", "--augment-scale", "1.5")
    assert bad.returncode == 2 and "--augment-scale must be below 1" in bad.stderr
    bad = run("mnist_jax.train", "--workdir", tmp_path / "x", "--augment-elastic-sigma", "0")
    assert bad.returncode == 2 and "--augment-elastic-sigma must be > 0" in bad.stderr


@pytest.mark.e2e  # a kill-and-resume test: the full suite runs it
def test_clean_final_epochs_train_on_plain_images_and_resume_exactly(tiny_data_dir, tmp_path):
    """The last epoch of a clean_final_epochs=1 run equals that epoch trained by an un-augmented config from the
    same epoch-1 checkpoint, and resuming into the clean epoch reproduces the run bit for bit."""
    import dataclasses

    augmented = Config(dataset=TINY, batch_size=32, eval_batch_size=100, epochs=2, augment_rotation=10.0,
                       augment_shift=2.0, **SMALL_MODEL)
    clean_last = dataclasses.replace(augmented, clean_final_epochs=1)
    plain = dataclasses.replace(augmented, augment_rotation=0.0, augment_shift=0.0)

    def run(config, name, start_from=None):
        return train_in_process(config, tiny_data_dir, tmp_path / name, stopped_after_epoch_1_of=start_from)

    clean_history, clean_leaves = run(clean_last, "clean")
    augmented_history, augmented_leaves = run(augmented, "augmented")
    assert clean_history[0] == augmented_history[0]  # epoch 1 augments in both
    assert clean_history[1]["train_loss"] != augmented_history[1]["train_loss"]
    for name, config in (("plain-from-1", plain), ("resumed", clean_last)):
        history, leaves = run(config, name, start_from=tmp_path / "clean")
        assert history == clean_history, name
        for a, b in zip(leaves, clean_leaves):
            np.testing.assert_array_equal(a, b)
    bad = dataclasses.replace(clean_last, clean_final_epochs=3)
    with pytest.raises(UserError, match=r"--clean-final-epochs must be an integer from 0 to --epochs \(2\), got 3"):
        validate(bad)
