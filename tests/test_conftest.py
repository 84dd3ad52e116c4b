"""The root conftest's eager random draws (one compiled draw, sliced) equal JAX's own."""

import os

import jax
import numpy as np
import pytest


@pytest.mark.skipif(os.environ.get("JAXQAT_TEST_FAST_RANDOM", "1") != "1",
                    reason="the fast eager draws are off")
def test_fast_eager_random_draws_equal_jax():
  # The root conftest's originals (its module name may be shadowed by tests/keras/conftest.py).
  orig = jax.random.normal.__globals__.get("_ORIG_RANDOM")
  assert orig is not None and jax.random.normal is not orig["normal"]  # the fast path is on
  cases = [  # (fast draw, JAX's own), on typed and raw keys, odd and multi-axis shapes
      (jax.random.normal(jax.random.key(3), (2, 7, 3)), orig["normal"](jax.random.key(3), (2, 7, 3))),
      (jax.random.uniform(jax.random.PRNGKey(5), (11,), minval=-2, maxval=0.5),
       orig["uniform"](jax.random.PRNGKey(5), (11,), None, -2, 0.5)),
      # Past the first size (2^14), with Keras-like float limits (traced bounds).
      (jax.random.uniform(jax.random.key(7), (160, 128), minval=-0.171, maxval=0.171),
       orig["uniform"](jax.random.key(7), (160, 128), None, -0.171, 0.171)),
      (jax.random.normal(jax.random.key(8), (5, 9), jax.numpy.bfloat16),  # 16-bit floats
       orig["normal"](jax.random.key(8), (5, 9), jax.numpy.bfloat16)),
      (jax.nn.initializers.lecun_normal()(jax.random.key(1), (3, 3, 4, 6)),
       orig["truncated_normal"](jax.random.key(1), -2, 2, (3, 3, 4, 6))
       * np.float32(np.sqrt(1 / 36) / .87962566103423978)),
  ]
  for fast, ref in cases:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(ref))
  # Traced keys take JAX's own path.
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda k: jax.random.normal(k, (2, 7, 3)))(jax.random.key(3))),
      np.asarray(cases[0][1]))
