"""Test configuration shared by the tests and the doctests."""

import os
import shutil
import tempfile

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

# The two xdist workers compile many of the same small programs (eager ops, observers,
# initialisers): they share one XLA compilation cache for the run (the same executables,
# so the same results). JAXQAT_TEST_XLA_CACHE=0 turns it off.
# Keyed by the controller's pid: an xdist worker's parent, a plain run's own.
_RUN_ID = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"jaxqat-test-xla-{_RUN_ID}")
if os.environ.get("JAXQAT_TEST_XLA_CACHE", "1") == "1":
  jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a plain run) cleans up
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


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
