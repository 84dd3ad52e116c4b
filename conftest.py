"""Test configuration shared by the tests and the doctests."""

import os

# Keras would default to TensorFlow (not installed); tests run on JAX unless told otherwise.
os.environ.setdefault("KERAS_BACKEND", "jax")

# The suite is dominated by XLA:CPU compiling many small programs that run once: compile
# with LLVM's cheap pipeline (the HLO passes, and so the numerics, are unchanged; measured:
# the EfficientNet-style Keras test 74 s -> 56 s). Benchmarks do not load this file.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402

# Catch silent dtype upcasts (equinox's habit).
jax.config.update("jax_numpy_dtype_promotion", "strict")
