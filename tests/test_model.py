import jax
import jax.numpy as jnp
import pytest

from mnist_jax.config import Config
from mnist_jax.model import CNN, build_model, count_params


def init(model, shape=(2, 28, 28, 1)):
    return model.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.uint8), train=False)


def test_default_model_shapes_and_parameter_count():
    model = build_model(Config(), num_classes=10, mean=0.13, std=0.31)
    variables = init(model)
    logits = model.apply(variables, jnp.zeros((5, 28, 28, 1), jnp.uint8))
    assert logits.shape == (5, 10)
    # The Flax MNIST example's CNN: 824,458 parameters on 1-channel images; 825,034 (the figure often quoted)
    # is the same network on 3-channel input, where the first conv has 3*9*32 weights instead of 9*32.
    assert count_params(variables["params"]) == 824_458
    assert count_params(init(model, (1, 28, 28, 3))["params"]) == 825_034


def test_layer_structure_matches_flax_example():
    params = init(build_model(Config(), 10, 0.0, 1.0))["params"]
    shapes = {name: {k: v.shape for k, v in layer.items()} for name, layer in params.items()}
    assert shapes == {
        "Conv_0": {"kernel": (3, 3, 1, 32), "bias": (32,)},
        "Conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (3136, 256), "bias": (256,)},
        "Dense_1": {"kernel": (256, 10), "bias": (10,)},
    }


def test_configurable_depth_width_batch_norm_and_dropout():
    config = Config(conv_features=(8, 16, 32), dense_features=(64, 32), batch_norm=True, dropout_rate=0.5)
    model = build_model(config, num_classes=7, mean=0.0, std=1.0)
    variables = init(model)
    assert "batch_stats" in variables
    assert len([k for k in variables["params"] if k.startswith("Conv")]) == 3
    images = jax.random.randint(jax.random.PRNGKey(1), (4, 28, 28, 1), 0, 256).astype(jnp.uint8)
    logits, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                            mutable=["batch_stats"])
    assert logits.shape == (4, 7)
    # Dropout is active in training and off in evaluation.
    a, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)}, mutable=["batch_stats"])
    assert not jnp.allclose(logits, a)
    e1 = model.apply(variables, images, train=False)
    e2 = model.apply(variables, images, train=False)
    assert jnp.array_equal(e1, e2)


def test_model_normalises_raw_pixels():
    """The model owns normalisation: feeding uint8 pixels equals feeding pre-normalised floats to the layers."""
    model = CNN(num_classes=10, mean=0.5, std=0.25, conv_features=(4,), dense_features=())
    variables = init(model)
    images = jnp.full((1, 28, 28, 1), 255, jnp.uint8)
    # (255/255 - 0.5) / 0.25 = 2: the first conv must see a constant image of 2.0.
    conv = variables["params"]["Conv_0"]
    x = jnp.full((1, 28, 28, 1), 2.0)
    expected = jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
    hidden = model.apply(variables, images, capture_intermediates=True)[1]["intermediates"]["Conv_0"]["__call__"][0]
    assert jnp.allclose(hidden, expected, atol=1e-5)


@pytest.mark.parametrize("classes", [2, 10, 47])
def test_number_of_classes(classes):
    model = build_model(Config(), classes, 0.0, 1.0)
    assert model.apply(init(model), jnp.zeros((3, 28, 28, 1), jnp.uint8)).shape == (3, classes)
