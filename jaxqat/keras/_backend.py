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

__all__ = ["keras", "ops", "backend_name", "is_jax", "to_numpy", "restore_purged_state"]

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
  if backend_name() == "torch" and hasattr(x, "detach"):
    # keras.ops.convert_to_numpy calls np.array(tensor), which NumPy 2 answers with a
    # DeprecationWarning per call (torch's __array__ takes no `copy`): go through .numpy().
    x = x.detach().cpu()
    if str(x.dtype) != "torch.bfloat16":  # NumPy has no bfloat16: Keras' path below
      return x.numpy()
  return np.asarray(keras.ops.convert_to_numpy(x))


_PURGED_STATE = {  # what Keras' JAX trainer puts in `state` before purging the variables
    "fit": ("trainable_variables", "non_trainable_variables", "optimizer_variables",
            "metrics_variables"),
    "evaluate": ("trainable_variables", "non_trainable_variables", "metrics_variables"),
    "predict": ("trainable_variables", "non_trainable_variables"),
}


def restore_purged_state() -> None:
  """Gives the model back its variables when an error is raised inside a JAX fit/predict.

  Keras' JAX trainer detaches every model variable's value ("purge", to save
  memory) before the first step and reattaches them after the epoch; an
  exception raised while the step is traced leaves them detached, so the
  model is unusable afterwards. Called just before jaxqat raises an error at
  trace time (an uncalibrated quantizer), this finds the trainer's ``state``
  in the calling frames and reattaches it, so that the user can fix the
  cause (calibrate) and go on with the same model. No-op elsewhere.
  """
  if not is_jax():
    return
  import sys
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    names = _PURGED_STATE.get(frame.f_code.co_name)
    model = frame.f_locals.get("self")
    state = frame.f_locals.get("state")
    if names and isinstance(model, keras.Model) and isinstance(state, tuple) and \
        len(state) == len(names):
      optimizer = getattr(model, "optimizer", None)
      lists = {"trainable_variables": lambda: model.trainable_variables,
               "non_trainable_variables": lambda: model.non_trainable_variables,
               "optimizer_variables": lambda: optimizer.variables if optimizer else [],
               "metrics_variables": lambda: model.metrics_variables}
      for name, values in zip(names, state):
        for var, value in zip(lists[name](), values):
          if getattr(var, "_value", 0) is None:
            var._value = value  # pylint: disable=protected-access
      return
    frame = frame.f_back
