"""Imports Keras once, with a clear message when its backend is missing.

Keras 3 picks its backend from ``KERAS_BACKEND`` (or ``~/.keras/keras.json``)
at import time and fails deep inside its own modules when that backend is not
installed (Keras defaults to TensorFlow). Every module of :mod:`jaxqat.keras`
imports ``keras`` from here.
"""

from __future__ import annotations

import os

try:
  import keras  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
  _wanted = os.environ.get("KERAS_BACKEND", "tensorflow (the Keras default)")
  raise ImportError(
      f"jaxqat.keras: could not import keras with the configured backend {_wanted!r} ({e}). "
      "Set KERAS_BACKEND=jax (or torch) before importing keras, or install the backend."
  ) from e

import numpy as np

__all__ = ["keras", "ops", "backend_name", "is_jax", "to_numpy"]

ops = keras.ops


def backend_name() -> str:
  """The Keras backend in use: ``"jax"``, ``"torch"``, ``"tensorflow"``...

  Examples:
    >>> backend_name() in ("jax", "torch", "tensorflow", "numpy", "openvino")
    True
  """
  return keras.backend.backend()


def is_jax() -> bool:
  """Whether Keras runs on the JAX backend (the layers then call the core directly)."""
  return backend_name() == "jax"


def to_numpy(x) -> np.ndarray:
  """A concrete backend tensor or Keras variable as a NumPy array."""
  if isinstance(x, keras.Variable):
    x = x.value
  return np.asarray(keras.ops.convert_to_numpy(x))
