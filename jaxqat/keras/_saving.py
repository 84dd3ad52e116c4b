"""Saving quantized Keras models: the conversion travels in the ``.keras`` config.

:func:`jaxqat.keras.quantize` gives the model it returns a class derived from
the model's own (a ``MyModel`` stays an instance of ``MyModel``) that records
the conversion: the rules (as :func:`jaxqat.core.spec_to_dict` dicts), the
locator and specs of every layer converted in place, and the status of every
layer with weights. Its ``get_config()`` is::

    {"model": <the model serialized as its own class, every layer converted in
               place shown as its float class>,
     "quantization": <the record>}

registered as ``jaxqat>QuantizedModel``. Loading that config (with
``keras.saving.load_model``, :func:`restore`, or as a nested object, e.g. the
backbone argument of a task model) deserializes the float model through its
own class, re-applies the recorded in-place conversions, and returns the
quantized model, whose weights (quantizer state included) and optimizer state
Keras then loads. No ``custom_objects`` are needed beyond those the float
model needs, and ``safe_mode`` stays on.
"""

from __future__ import annotations

import contextlib
import os

from jaxqat.core._serialize import spec_from_dict
from jaxqat.keras import _graph
from jaxqat.keras import _layers
from jaxqat.keras._backend import keras

__all__ = ["RECORD_VERSION", "mark", "record_of", "save", "restore"]

RECORD_VERSION = 1
_REGISTERED = "jaxqat>QuantizedModel"
_CLASSES: dict = {}


def record_of(model):
  """The conversion record of a model returned by ``quantize`` (``None`` otherwise)."""
  return vars(model).get("_jaxqat_record")


@contextlib.contextmanager
def _as_float_classes(model):
  """Shows ``model`` and its layers converted in place as their float classes."""
  layers = [model] + list(vars(model).get("_jaxqat_inplace", ()))
  classes = [type(l) for l in layers]
  try:
    model.__class__ = vars(model)["_jaxqat_base"]
    for layer in layers[1:]:
      layer.__class__ = _layers.float_class(layer)
    yield
  finally:
    for layer, cls in zip(layers, classes):
      layer.__class__ = cls


def _get_config(self):
  with _as_float_classes(self):
    inner = keras.saving.serialize_keras_object(self)
  inner.pop("compile_config", None)  # compiled once, after the conversion is re-applied
  return {"model": inner, "quantization": record_of(self)}


def _quantized_class(base):
  if base not in _CLASSES:
    cls = type(base.__name__, (base,), {
        "get_config": _get_config, "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__})
    from keras.src.saving import object_registration  # the class -> name half of the registry
    object_registration.GLOBAL_CUSTOM_NAMES[cls] = _REGISTERED
    _CLASSES[base] = cls
  return _CLASSES[base]


def mark(model, record, in_place_layers) -> None:
  """Gives ``model`` the recording class and its conversion record.

  Args:
    model: the converted model.
    record: the JSON-compatible record (see :func:`jaxqat.keras.quantize`).
    in_place_layers: the layer objects converted in place.
  """
  base = type(model)
  object.__setattr__(model, "_jaxqat_base", base)
  object.__setattr__(model, "_jaxqat_record", record)
  object.__setattr__(model, "_jaxqat_inplace", list(in_place_layers))
  model.__class__ = _quantized_class(base)


def reapply(model, record):
  """Re-applies a record's in-place conversions to a freshly loaded float model.

  Raises:
    ValueError: if the record has another version, or names a layer the
      model does not have or that cannot be quantized.
  """
  if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
    raise ValueError(f"jaxqat quantization record: expected version {RECORD_VERSION}, got "
                     f"{record.get('version') if isinstance(record, dict) else record!r}")
  layers = []
  for entry in record["in_place"]:
    where = f"jaxqat quantization record, layer {entry.get('path')!r}"
    try:
      layer = _graph.locate(model, entry["at"])
    except ValueError as e:
      raise ValueError(f"{where}: the loaded model has {e}") from e
    if not isinstance(layer, _layers.QuantLayer):
      try:
        _layers.quantize_in_place(layer, spec_from_dict(entry["weight"], where=where),
                                  spec_from_dict(entry["act"], where=where))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot quantize {type(layer).__name__} "
                         f"{layer.name!r}: {e}") from e
    layers.append(layer)
  mark(model, record, layers)
  return model


@keras.saving.register_keras_serializable(package="jaxqat", name="QuantizedModel")
class QuantizedModel:
  """Loads the config of a model returned by ``quantize`` (see the module doc).

  Not a class of models: ``from_config`` returns the model, of its own class.
  """

  @classmethod
  def from_config(cls, config):
    if not isinstance(config, dict) or "model" not in config or "quantization" not in config:
      raise ValueError("jaxqat>QuantizedModel: the config must hold 'model' and 'quantization'")
    model = keras.saving.deserialize_keras_object(config["model"])
    return reapply(model, config["quantization"])

  def get_config(self):  # pragma: no cover - required by the registry, never an instance
    raise NotImplementedError


def save(path, model) -> None:
  """Saves a quantized model to a ``.keras`` file (weights, quantizer state, conversion).

  Args:
    path: a file path ending in ``.keras``.
    model: a model returned by :func:`jaxqat.keras.quantize`, or a model
      holding one (a task model around a quantized backbone).

  Raises:
    ValueError: if ``path`` does not end in ``.keras``.
    TypeError: if ``model`` is not a Keras model.

  Examples:
    >>> import keras, tempfile, os
    >>> from jaxqat.keras import quantize
    >>> q = quantize(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    >>> path = os.path.join(tempfile.mkdtemp(), "q.keras")
    >>> save(path, q)
    >>> type(restore(path).layers[0]).__name__
    'QuantDense'
  """
  if not str(path).endswith(".keras"):
    raise ValueError(f"path: must end in '.keras', got {str(path)!r}")
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a Keras model, got {type(model).__name__}")
  model.save(path)


def restore(path):
  """Loads a model saved by :func:`save` (or ``model.save``), quantized.

  ``keras.saving.load_model`` with ``safe_mode=True``; the float model's own
  custom classes must be importable (registered), as for any ``.keras`` file.

  Args:
    path: the ``.keras`` file.

  Returns:
    The quantized model, compiled if it was when saved.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if the file's record does not match the model it holds.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"path: no such file {str(path)!r}")
  return keras.saving.load_model(path, safe_mode=True)
