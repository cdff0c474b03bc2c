"""On-device augmentation: geometry, ranges, per-example transforms, determinism, and its place in the step."""

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import steps
from mnist_jax.augment import AffineRange, random_affine, warp
from mnist_jax.config import Config
from mnist_jax.model import build_model
from mnist_jax.optim import make_optimizer

from conftest import make_tiny_images


def images(n=16, seed=0):
    return jnp.asarray(make_tiny_images(np.arange(n) % 10, np.random.default_rng(seed)))


def test_no_rotation_unit_scale_no_shift_is_the_identity():
    batch = images()
    out = jax.vmap(warp)(batch.astype(jnp.float32), jnp.zeros(16), jnp.ones(16), jnp.zeros((16, 2)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(batch, np.float32), atol=1e-4)
    zero = random_affine(jax.random.PRNGKey(0), batch, AffineRange(0.0, 0.0, 0.0))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(batch, np.float32), atol=1e-4)


def test_an_integer_shift_moves_pixels_exactly():
    image = jnp.zeros((28, 28, 1)).at[10, 12, 0].set(200.0)
    moved = warp(image, jnp.array(0.0), jnp.array(1.0), jnp.array([3.0, -2.0]))
    assert float(moved[13, 10, 0]) == 200.0 and float(moved.sum()) == 200.0


def test_a_quarter_turn_rotates_about_the_centre():
    image = jnp.zeros((28, 28, 1)).at[5, 13:15, 0].set(100.0)  # a short bar near the top
    turned = np.asarray(warp(image, jnp.deg2rad(90.0), jnp.array(1.0), jnp.zeros(2)))[..., 0]
    ys, xs = np.nonzero(turned > 50)
    assert abs(xs.mean() - 13.5) > 7 and abs(ys.mean() - 13.5) < 1.5  # the bar moved to a side


def test_outputs_stay_in_range_and_examples_get_different_transforms():
    batch = jnp.repeat(images(1), 8, axis=0)  # eight copies of one image
    out = np.asarray(random_affine(jax.random.PRNGKey(1), batch, AffineRange(15.0, 0.1, 2.0)))
    assert out.min() >= 0 and out.max() <= 255
    assert len({out[i].tobytes() for i in range(8)}) == 8


def test_the_same_key_gives_the_same_batch():
    limits = AffineRange(10.0, 0.1, 2.0)
    a = random_affine(jax.random.PRNGKey(7), images(), limits)
    b = random_affine(jax.random.PRNGKey(7), images(), limits)
    c = random_affine(jax.random.PRNGKey(8), images(), limits)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_augmentation_in_training_only_and_deterministic_in_the_step():
    config = Config(augment_rotation=10.0, augment_scale=0.1, augment_shift=2.0)
    model = build_model(config, 10, 0.2, 0.3)
    state = steps.create_train_state(model, make_optimizer(config, 10), jax.random.PRNGKey(0), (28, 28, 1))
    batch = {"image": images(32), "label": jnp.arange(32) % 10}
    # Evaluation never augments: two calls agree and equal the plain model.
    plain = build_model(Config(), 10, 0.2, 0.3)
    np.testing.assert_array_equal(np.asarray(model.apply(state.variables(), batch["image"])),
                                  np.asarray(plain.apply(state.variables(), batch["image"])))
    copy = lambda tree: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)  # noqa: E731
    a, ma = steps.train_step(copy(state), batch)
    b, mb = steps.train_step(copy(state), batch)
    assert float(ma["loss"]) == float(mb["loss"])
    plain_state = steps.create_train_state(plain, make_optimizer(Config(), 10), jax.random.PRNGKey(0), (28, 28, 1))
    _, unaugmented = steps.train_step(plain_state, batch)
    assert float(unaugmented["loss"]) != float(ma["loss"])  # training does augment


def test_training_cli_with_augmentation_writes_what_the_model_sees(tiny_data_dir, tmp_path):
    from PIL import Image

    from conftest import TINY_FLAGS, run_module

    result = run_module("mnist_jax.train", "--workdir", tmp_path / "w", "--data-dir", tiny_data_dir, *TINY_FLAGS,
                        "--epochs", "1", "--augment-rotation", "10", "--augment-scale", "0.1", "--augment-shift", "2")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "w" / "augmentations.png") as picture:
        assert picture.format == "PNG" and picture.width >= 300 and picture.height >= 300
    bad = run_module("mnist_jax.train", "--workdir", tmp_path / "x", "--augment-scale", "1.5")
    assert bad.returncode == 2 and "--augment-scale must be below 1" in bad.stderr
