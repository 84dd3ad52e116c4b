"""Test configuration shared by the tests and the doctests."""

import os

# Keras would default to TensorFlow (not installed); tests run on JAX unless told otherwise.
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

# Catch silent dtype upcasts (equinox's habit).
jax.config.update("jax_numpy_dtype_promotion", "strict")
