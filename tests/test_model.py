import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax.config import Config
from mnist_jax.model import CNN, BatchNorm, build_model, count_params, normalize


def init(model, shape=(2, 28, 28, 1)):
    return model.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.uint8), train=False)


def init_shapes(model, shape=(2, 28, 28, 1)):
    """What `init` returns, as shapes and dtypes: traced, never compiled (for the tests of the structure alone)."""
    return jax.eval_shape(lambda: init(model, shape))


def apply_shape(model, variables, shape):
    """The shape of the model's output for uint8 images of `shape`, traced, never compiled."""
    return jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(shape, jnp.uint8)).shape


def jitted(method, **static):
    """A module's bound `init` or `apply` with its static keyword arguments, jitted: for a model of many layers no
    other test builds, one compiled program instead of Flax's one per operation (the same values)."""
    return jax.jit(functools.partial(method, **static))


def test_default_model_shapes_and_parameter_count():
    model = build_model(Config(), num_classes=10, mean=0.13, std=0.31)
    variables = init_shapes(model)
    assert apply_shape(model, variables, (5, 28, 28, 1)) == (5, 10)
    # The Flax MNIST example's CNN: 824,458 parameters on 1-channel images; 825,034 (the figure often quoted)
    # is the same network on 3-channel input, where the first conv has 3*9*32 weights instead of 9*32.
    assert count_params(variables["params"]) == 824_458
    assert count_params(init_shapes(model, (1, 28, 28, 3))["params"]) == 825_034


def test_layer_structure_matches_flax_example():
    params = init_shapes(build_model(Config(), 10, 0.0, 1.0))["params"]
    shapes = {name: {k: v.shape for k, v in layer.items()} for name, layer in params.items()}
    assert shapes == {
        "conv1_1": {"kernel": (3, 3, 1, 32), "bias": (32,)},
        "conv2_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "dense1": {"kernel": (3136, 256), "bias": (256,)},
        "head": {"kernel": (256, 10), "bias": (10,)},
    }


def test_configurable_depth_width_batch_norm_and_dropout():
    config = Config(conv_features=(8, 16, 32), dense_features=(64, 32), batch_norm=True, dropout_rate=0.5)
    model = build_model(config, num_classes=7, mean=0.0, std=1.0)
    variables = jitted(model.init, train=False)(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1), jnp.uint8))
    assert "batch_stats" in variables
    assert sorted(variables["params"]) == ["conv1_1", "conv1_1_bn", "conv2_1", "conv2_1_bn", "conv3_1", "conv3_1_bn",
                                           "dense1", "dense1_bn", "dense2", "dense2_bn", "head"]
    images = jax.random.randint(jax.random.PRNGKey(1), (4, 28, 28, 1), 0, 256).astype(jnp.uint8)
    train_apply = jitted(model.apply, train=True, mutable=("batch_stats",))
    logits, _ = train_apply(variables, images, rngs={"dropout": jax.random.PRNGKey(2)})
    assert logits.shape == (4, 7)
    # Dropout is active in training and off in evaluation.
    a, _ = train_apply(variables, images, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not jnp.allclose(logits, a)
    eval_apply = jitted(model.apply, train=False)
    e1 = eval_apply(variables, images)
    e2 = eval_apply(variables, images)
    assert jnp.array_equal(e1, e2)


def test_model_normalises_raw_pixels():
    """The model owns normalisation: feeding uint8 pixels equals feeding pre-normalised floats to the layers."""
    model = CNN(num_classes=10, mean=0.5, std=0.25, conv_features=(4,), dense_features=())
    variables = init(model)
    images = jnp.full((1, 28, 28, 1), 255, jnp.uint8)
    # (255/255 - 0.5) / 0.25 = 2: the first conv must see a constant image of 2.0.
    conv = variables["params"]["conv1_1"]
    x = jnp.full((1, 28, 28, 1), 2.0)
    expected = jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
    hidden = model.apply(variables, images, capture_intermediates=True)[1]["intermediates"]["conv1_1"]["__call__"][0]
    assert jnp.allclose(hidden, expected, atol=1e-5)


def test_deskew_runs_inside_the_model_at_evaluation_and_after_training_augmentation(monkeypatch):
    """`--deskew true` equals the plain model applied to deskewed pixels, in evaluation and in a training step,
    where the slant is removed from the augmented image (so it also straightens what augmentation slanted)."""
    from mnist_jax import model as model_module
    from mnist_jax.augment import Augmentation, deskew

    plain = build_model(Config(), num_classes=10, mean=0.13, std=0.31)
    straight = build_model(Config(deskew=True), num_classes=10, mean=0.13, std=0.31)
    variables = init(plain)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)), jnp.uint8)
    expected = plain.apply(variables, deskew(images))
    np.testing.assert_allclose(straight.apply(variables, images), expected, atol=1e-5)
    assert not np.allclose(plain.apply(variables, images), expected, atol=1e-3)

    # A fixed stand-in for the random warp (a 3-pixel roll) makes the order visible: deskew must come after it.
    monkeypatch.setattr(model_module, "random_warp", lambda key, x, limits: jnp.roll(x, 3, axis=2))
    shifting = Augmentation(shift=2.0)  # the train step hands its augmentation to the model
    trained = straight.apply(variables, images, train=True, augmentation=shifting,
                             rngs={"augment": jax.random.PRNGKey(3)})
    np.testing.assert_allclose(trained, plain.apply(variables, deskew(jnp.roll(images, 3, axis=2))), atol=1e-5)


@pytest.mark.parametrize("classes", [2, 10, 47])
def test_number_of_classes(classes):
    model = build_model(Config(), classes, 0.0, 1.0)
    assert apply_shape(model, init_shapes(model), (3, 28, 28, 1)) == (3, classes)


def test_convs_per_block_stacks_convs_before_each_pooling():
    params = init_shapes(build_model(Config(conv_features=(8, 16), convs_per_block=2, dense_features=(32,)), 10, 0.0,
                                     1.0))
    shapes = {name: layer["kernel"].shape for name, layer in params["params"].items()}
    assert shapes == {"conv1_1": (3, 3, 1, 8), "conv1_2": (3, 3, 8, 8), "conv2_1": (3, 3, 8, 16),
                      "conv2_2": (3, 3, 16, 16), "dense1": (7 * 7 * 16, 32), "head": (32, 10)}


def test_max_pooling_keeps_each_window_maximum():
    config = Config(conv_features=(4,), dense_features=(), pooling="max")
    model = build_model(config, 10, 0.0, 1.0)
    variables = init(model)
    images = jax.random.randint(jax.random.PRNGKey(3), (2, 28, 28, 1), 0, 256).astype(jnp.uint8)
    _, captured = model.apply(variables, images, capture_intermediates=True)
    conv = jax.nn.relu(captured["intermediates"]["conv1_1"]["__call__"][0])
    expected = conv.reshape(2, 14, 2, 14, 2, 4).max(axis=(2, 4)).reshape(2, -1)
    head = variables["params"]["head"]
    np.testing.assert_allclose(model.apply(variables, images), expected @ head["kernel"] + head["bias"], rtol=1e-5,
                               atol=1e-4)


def _apply_norm(norm, x, variables, train):
    return norm.apply(variables, x, train, mutable=["batch_stats"] if train else False)


def test_one_group_batch_norm_is_flax_batch_norm():
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 5, 5, 3)) * 3 + 1
    ours, theirs = BatchNorm(groups=1), nn.BatchNorm(momentum=0.9)
    variables = ours.init(jax.random.PRNGKey(0), x, False)
    assert jax.tree_util.tree_map(jnp.shape, variables) == jax.tree_util.tree_map(
        jnp.shape, theirs.init(jax.random.PRNGKey(0), x, use_running_average=True))
    y, updates = _apply_norm(ours, x, variables, True)
    y_ref, updates_ref = theirs.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(updates["batch_stats"][name], updates_ref["batch_stats"][name], rtol=1e-5)
    trained = {"params": variables["params"], **updates}
    np.testing.assert_allclose(_apply_norm(ours, x, trained, False),
                               theirs.apply(trained, x, use_running_average=True), atol=1e-5)


def test_grouped_batch_norm_normalises_each_slice_with_its_own_statistics():
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 4, 4, 3)) * jnp.array([1.0, 2.0, 5.0]) + 7
    norm = BatchNorm(groups=2)
    variables = norm.init(jax.random.PRNGKey(0), x, False)
    y, updates = _apply_norm(norm, x, variables, True)
    halves = [np.asarray(x[:4], np.float64), np.asarray(x[4:], np.float64)]
    expected = [(h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-5) for h in halves]
    np.testing.assert_allclose(y, np.concatenate(expected), atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * np.mean([h.mean((0, 1, 2)) for h in halves], 0),
                               rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"],
                               0.9 + 0.1 * np.mean([h.var((0, 1, 2)) for h in halves], 0), rtol=1e-5)


def test_normalize_matches_an_independent_formula():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_allclose(np.asarray(normalize(pixels, 0.13, 0.31)), (pixels / 255.0 - 0.13) / 0.31,
                               rtol=1e-6, atol=1e-6)
