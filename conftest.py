"""Test configuration shared by the tests and the doctests."""

import os

# Keras would default to TensorFlow (not installed); tests run on JAX unless told otherwise.
os.environ.setdefault("KERAS_BACKEND", "jax")

# XLA's LLVM optimisation level 0 would cut the suite's compile-bound CPU time by 25-40%,
# but it changes float results of separately compiled programs (initialisers by an ulp, a
# 4-bit QAT run by a point), so the suite runs at XLA's default level. JAXQAT_TEST_XLA_O0=1
# turns it on for quick local iterations.
if (os.environ.get("JAXQAT_TEST_XLA_O0", "0") == "1"
    and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Catch silent dtype upcasts (equinox's habit).
jax.config.update("jax_numpy_dtype_promotion", "strict")


# Long tests first: with pytest-xdist, a long test collected last would run alone at the
# end while the other worker idles. Subprocess re-runs (other backends, simulated devices)
# and tests marked slow are scheduled before the rest; the order within each group is kept.
_LONG_FIRST = ("test_keras_backends.py", "test_sharding.py")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  def rank(item):
    if any(name in item.nodeid for name in _LONG_FIRST):
      return 0
    return 1 if item.get_closest_marker("slow") else 2

  items.sort(key=rank)
