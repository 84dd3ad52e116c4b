"""Test configuration shared by the tests and the doctests."""

import os

# Keras would default to TensorFlow (not installed); tests run on JAX unless told otherwise.
os.environ.setdefault("KERAS_BACKEND", "jax")

# The suite is dominated by XLA:CPU compilation of many small programs, not by running them:
# optimisation level 0 cuts its CPU time by 25-40% (measured on tests/flax and
# tests/integration). It can change the order of float reductions, so a trained model's
# figures differ slightly from a run at XLA's default level (a chaotic 2-bit training moved
# by 0.4 points): the figures asserted in the tests were measured with this flag, and every
# exactness test compares programs compiled alike. Benchmarks run at XLA's default level.
# Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
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
