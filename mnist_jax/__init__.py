"""mnist_jax: convolutional image classification on MNIST with JAX, Flax linen, optax and Orbax."""

__version__ = "0.1.0"
