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


# Eager jax.random draws compile one XLA program per shape (about a second each on the CI's
# CPU): the tests' example inputs and Flax's initializers at module construction paid for
# dozens of them, at collection time in both xdist workers. With threefry's partitionable
# bits (JAX's default), a draw of n values is the first n values of any longer draw from the
# same key (for 16-bit floats too: each value takes the low half of its 32-bit word), so an
# eager float32, bfloat16 or float16 draw of up to _FLAT[-1] values is sliced from one
# compiled draw of the next size in _FLAT: the same bits, one compile per function, dtype
# and size. The bounds (Keras's uniform limits differ per layer) are traced arguments, as in
# JAX's own jitted draws, not compile-time constants. Anything else (traced keys, other
# dtypes or key implementations, a mesh, array bounds) takes JAX's own path.
# tests/test_conftest.py checks the equality. JAXQAT_TEST_FAST_RANDOM=0 turns it off.
import functools  # noqa: E402

import numpy as np  # noqa: E402
from jax._src import core as _jcore  # noqa: E402
from jax._src import random as _jrandom  # noqa: E402

_FLAT = (1 << 14, 1 << 17, 1 << 20)  # drawing 2^20 values takes ~10 ms
_ORIG_RANDOM = {name: getattr(_jrandom, name) for name in ("normal", "truncated_normal", "uniform")}


_FAST_DTYPES = (np.dtype(np.float32), np.dtype(jax.numpy.bfloat16), np.dtype(np.float16))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _flat_draw(name, key, bounds, size, dtype):
  if name == "uniform":
    return _ORIG_RANDOM[name](key, (size,), dtype, *bounds)
  return _ORIG_RANDOM[name](key, *bounds, (size,), dtype)


def _fast_key(key):
  if isinstance(key, _jcore.Tracer) or not isinstance(key, jax.Array):
    return False
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.shape == () and str(jax.random.key_impl(key)) == "threefry2x32"
  return (key.dtype == np.uint32 and key.shape == (2,)
          and jax.config.jax_default_prng_impl == "threefry2x32")


def _fast(name, key, bounds, shape, dtype, out_sharding):
  try:
    shape = tuple(int(d) for d in shape)
    dtype = np.dtype(np.float32 if dtype is None else dtype)
  except (TypeError, ValueError):
    return None
  n = int(np.prod(shape, dtype=np.int64))
  if (out_sharding is not None or not 0 < n <= _FLAT[-1] or jax.config.jax_enable_x64
      or dtype not in _FAST_DTYPES
      or not all(type(b) in (int, float) for b in bounds)
      or not jax.config.jax_threefry_partitionable or not _jcore.trace_state_clean()
      or not jax.sharding.get_abstract_mesh().empty or not _fast_key(key)):
    return None
  flat = _flat_draw(name, key, bounds, next(size for size in _FLAT if n <= size), dtype)
  return jax.numpy.asarray(np.asarray(flat)[:n].reshape(shape))


def _normal(key, shape=(), dtype=None, *, out_sharding=None):
  out = _fast("normal", key, (), shape, dtype, out_sharding)
  return _ORIG_RANDOM["normal"](key, shape, dtype, out_sharding=out_sharding) if out is None else out


def _truncated_normal(key, lower, upper, shape=None, dtype=None, *, out_sharding=None):
  out = None if shape is None else _fast("truncated_normal", key, (lower, upper), shape, dtype,
                                         out_sharding)
  return (_ORIG_RANDOM["truncated_normal"](key, lower, upper, shape, dtype,
                                           out_sharding=out_sharding) if out is None else out)


def _uniform(key, shape=(), dtype=None, minval=0.0, maxval=1.0, *, out_sharding=None):
  out = _fast("uniform", key, (minval, maxval), shape, dtype, out_sharding)
  return (_ORIG_RANDOM["uniform"](key, shape, dtype, minval, maxval, out_sharding=out_sharding)
          if out is None else out)


if os.environ.get("JAXQAT_TEST_FAST_RANDOM", "1") == "1":
  for _mod in (jax.random, _jrandom):
    _mod.normal, _mod.truncated_normal, _mod.uniform = _normal, _truncated_normal, _uniform


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
