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

# pylint: disable=import-outside-toplevel

import contextlib
import os

from jaxqat.core._serialize import spec_from_dict
from jaxqat.keras import _graph
from jaxqat.keras import _layers
from jaxqat.keras._backend import keras

__all__ = ["RECORD_VERSION", "mark", "record_of", "save", "restore", "export_encodings",
           "save_encodings", "load_encodings"]

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


def recording_class(base, get_config, registered: str, cache: dict):
  """A subclass of the model class ``base`` with ``get_config``, saved as ``registered``.

  It keeps ``base``'s name, module and docstring (a ``MyModel`` stays an instance of
  ``MyModel``); one class per ``base`` in ``cache``.
  """
  if base not in cache:
    cls = type(base.__name__, (base,), {
        "get_config": get_config, "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__})
    from keras.src.saving import object_registration  # the class -> name half of the registry
    object_registration.GLOBAL_CUSTOM_NAMES[cls] = registered
    cache[base] = cls
  return cache[base]


def register_loader(name: str, key: str, reapply, doc: str):
  """Registers ``jaxqat>name``, whose ``from_config`` loads a recording class's config.

  The config is ``{"model": <the model as its own class>, key: <record>}``;
  ``reapply(model, record)`` redoes what the record says on the loaded model.
  """
  def from_config(cls, config):
    if not isinstance(config, dict) or "model" not in config or key not in config:
      raise ValueError(f"jaxqat>{name}: the config must hold 'model' and {key!r}")
    model = keras.saving.deserialize_keras_object(config["model"])
    return reapply(model, config[key])

  def get_config(self):  # pragma: no cover - required by the registry, never an instance
    raise NotImplementedError

  cls = type(name, (), {"from_config": classmethod(from_config), "get_config": get_config,
                        "__doc__": doc, "__module__": __name__})
  return keras.saving.register_keras_serializable(package="jaxqat", name=name)(cls)


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
  model.__class__ = recording_class(base, _get_config, _REGISTERED, _CLASSES)
  _layers.pin_quantized_loops(model)


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
                                  spec_from_dict(entry["act"], where=where),
                                  compute=entry.get("compute", "fake"))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot quantize {type(layer).__name__} "
                         f"{layer.name!r}: {e}") from e
    layers.append(layer)
  mark(model, record, layers)
  return model


QuantizedModel = register_loader(
    "QuantizedModel", "quantization", reapply,
    """Loads the config of a model returned by ``quantize`` (see the module doc).

  Not a class of models: ``from_config`` returns the model, of its own class.
  """)


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


# -- encodings (AIMET 1.0.0 layout, jaxqat.core) ------------------------------------------
#
# Names: "<layer path>/<weight name>" for weights ("block/dense/kernel"; the
# weight name is the quantizer's name without "_quantizer": "kernel",
# "embeddings", "depthwise_kernel"; a folded Conv+BatchNorm's kernel is
# "<conv name>/kernel", the folded kernel), "<layer path>/input" for input
# quantizers. The layer path is the rule path of jaxqat.keras.quantize: the
# layer's name prefixed by the names of the models/layers holding it, joined
# by "/".


def quant_entries(model) -> list:
  """``(path, layer)`` of every quantized layer (QuantLayer, QuantConvBatchNorm) of ``model``."""
  from jaxqat.keras import _fold
  walk = _graph.walk(model, stop=_fold.quant_leaf)
  return [(path, layer) for _, path, layer in walk if isinstance(layer, _fold.QUANT)]


def weight_quantizers(layer) -> list:
  """``(weight name, quantizer, current weight getter)`` for each weight quantizer of a layer."""
  from jaxqat.keras import _fold
  if isinstance(layer, _fold.QuantConvBatchNorm):
    if layer.kernel_quantizer is None:
      return []
    return [("kernel", layer.kernel_quantizer, layer.folded_kernel)]
  names = dict(layer.quant_weights or ())
  out = []
  for attr, q in getattr(layer, "weight_quantizers", {}).items():
    name = names.get(attr, q.name)
    name = name[:-len("_quantizer")] if name.endswith("_quantizer") else name
    out.append((name, q, lambda layer=layer, attr=attr: getattr(layer, attr)))
  return out


def quantizer_state(q, weight, where: str) -> dict:
  """A Keras quantizer's state by contract name (NumPy), for ``encoding_from_state``.

  A fixed-range weight quantizer that is not frozen gives the range of
  ``weight`` as it computes it now (:meth:`Quantizer.tracked_range`).

  Raises:
    ValueError: naming ``where``, if the quantizer is in ``"float"`` mode or
      needs a range it does not have (never calibrated).
  """
  from jaxqat.keras._backend import ops, to_numpy
  import numpy as np
  if q.mode == "float":
    raise ValueError(f"{where}: the quantizer is in 'float' mode (jaxqat.keras.set_mode); call "
                     "set_mode(model, 'quant') first")
  if not q.has_scale:
    return {}
  observed = q.can_observe and bool(np.all(to_numpy(q.observed) > 0))
  if q.learned:
    if not q.calibrated:
      raise ValueError(f"{where}: no range: the quantizer was never calibrated; call "
                       "jaxqat.keras.calibrate(model, data) first")
    state = {"log_scale": to_numpy(q.log_scale)}
    if q.has_offset:
      state["offset"] = to_numpy(q.offset)
    return state
  if q.role == "weight" and not q.frozen:
    s, z = q.tracked_range(ops.convert_to_tensor(weight))
    return {"scale": to_numpy(s), "zero_point": None if z is None else to_numpy(z)}
  if not (q.calibrated or observed):
    raise ValueError(f"{where}: no range: the quantizer was never calibrated; call "
                     "jaxqat.keras.calibrate(model, data) first")
  return {"scale": to_numpy(q.scale),
          "zero_point": to_numpy(q.zero_point) if q.has_zero_point else None}


def quantizer_encoding(q, weight, where: str):
  """The serving :class:`jaxqat.core.Encoding` of a Keras quantizer (:func:`quantizer_state`)."""
  from jaxqat.core import encoding_from_state
  return encoding_from_state(q.spec, quantizer_state(q, weight, where), name=where)


def _check_model(model, verb):
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
  entries = quant_entries(model)
  if not entries:
    raise ValueError(f"model: {model.name!r} has no quantized layers; call "
                     f"jaxqat.keras.quantize before {verb}")
  return entries


def export_encodings(model) -> dict:
  """Every quantizer's encoding, in the AIMET 1.0.0 layout of :func:`jaxqat.core.encodings_to_dict`.

  Names: ``"<layer path>/<weight name>"`` for weights (``"dense/kernel"``;
  a folded Conv+BatchNorm's entry is its folded kernel) and
  ``"<layer path>/input"`` for input quantizers (and ``"<cell path>/state"``
  for a recurrent cell's state quantizer); the layer path is the rule
  path (layer names from the root, joined by ``/``). A fixed-range weight
  quantizer that is not frozen gives the range of its current weight (what
  the model computes now); an input quantizer left float (it saw no finite
  value in calibration) has no entry.

  Args:
    model: a quantized Keras model (:func:`jaxqat.keras.quantize`).

  Returns:
    The JSON-ready dict.

  Raises:
    TypeError: if ``model`` is not a Keras model.
    ValueError: if it has no quantized layers, or a quantizer has no range
      (never calibrated) or is in ``"float"`` mode; the message names it.

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> q = jqk.quantize(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")]))
    >>> _ = jqk.calibrate(q, np.ones((4, 3), "float32"))
    >>> [e["name"] for e in export_encodings(q)["param_encodings"]]
    ['fc/kernel']
  """
  from jaxqat.core import encodings_to_dict
  params, acts = {}, {}
  for path, layer in _check_model(model, "export_encodings"):
    for role, iq in layer.act_quantizers():
      if iq is not None and iq.float_reason is None:
        acts[f"{path}/{role}"] = quantizer_encoding(iq, None,
                                                    f"layer {path!r} {role} quantizer")
    for name, q, get in weight_quantizers(layer):
      params[f"{path}/{name}"] = quantizer_encoding(q, get(), f"layer {path!r} {name} quantizer")
  return encodings_to_dict(params, acts)


def save_encodings(path, model) -> None:
  """Writes :func:`export_encodings` of ``model`` to a JSON file.

  Args:
    path: the file to write.
    model: a quantized Keras model.

  Raises:
    As :func:`export_encodings`.

  Examples:
    >>> import keras, numpy as np, os, tempfile
    >>> import jaxqat.keras as jqk
    >>> q = jqk.quantize(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    >>> _ = jqk.calibrate(q, np.ones((4, 3), "float32"))
    >>> p = os.path.join(tempfile.mkdtemp(), "enc.json")
    >>> save_encodings(p, q); load_encodings(q, p) is q
    True
  """
  import json
  data = export_encodings(model)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)


def _read_encodings(path_or_dict):
  import json
  if isinstance(path_or_dict, dict):
    return path_or_dict, path_or_dict
  if isinstance(path_or_dict, (str, os.PathLike)):
    text = str(path_or_dict)
    if isinstance(path_or_dict, os.PathLike) or not text.lstrip().startswith("{"):
      if not os.path.exists(text):
        raise FileNotFoundError(f"path_or_dict: no such file {text!r}")
      with open(text, encoding="utf-8") as f:
        text = f.read()
    try:
      return text, json.loads(text)
    except json.JSONDecodeError:
      return text, None  # encodings_from_dict names the JSON error
  raise TypeError(f"path_or_dict: expected a file path, a JSON string or a dict, got "
                  f"{type(path_or_dict).__name__}")


def load_encodings(model, path_or_dict, *, names=None):
  """Sets the quantizer ranges of ``model`` from encodings (all or nothing).

  The whole file is checked first (:func:`jaxqat.core.encodings_from_dict`:
  version, layout, each entry's dtype/bw/is_sym/enc_type/number of scales
  against its quantizer), then applied: a fixed-range quantizer gets
  ``scale``/``zero_point`` (a weight quantizer is then **frozen**, so that it
  keeps the loaded range instead of tracking its weight; ``unfreeze``
  resumes tracking), an LSQ quantizer ``log_scale = log(s)``
  (:func:`jaxqat.core.step_size_to_param`), an LSQ+ one also ``offset =
  -z*s``. Every loaded quantizer counts as calibrated (an input quantizer
  left float becomes quantized again).

  Args:
    model: a quantized Keras model.
    path_or_dict: a JSON file path, a JSON string, or the dict of
      :func:`export_encodings` (or of another front end's
      ``export_encodings``).
    names: optional map from the file's names to this model's names (see
      :func:`export_encodings` for the names).

  Returns:
    ``model``.

  Raises:
    FileNotFoundError: if the path does not exist.
    TypeError: if ``model`` or ``path_or_dict`` has the wrong type.
    ValueError: if the file is malformed or truncated, has an entry the
      model has no quantizer for, lacks an entry for a quantizer that holds
      a range, or an entry does not match its quantizer; the message names
      the entry and nothing is applied.

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
    >>> data = export_encodings(jqk.calibrate(jqk.quantize(m), np.ones((4, 3), "float32")))
    >>> fresh = load_encodings(jqk.quantize(m), data, names={"fc/kernel": "fc/kernel"})
    >>> fc = fresh.get_layer("fc")
    >>> fc.kernel_quantizer.frozen, fc.input_quantizer.calibrated
    (True, True)
  """
  import numpy as np
  from jaxqat.core import encodings_from_dict, step_size_to_param
  entries = _check_model(model, "load_encodings")
  if names is not None and not isinstance(names, dict):
    raise TypeError(f"names: expected a dict from the file's names to the model's, got "
                    f"{type(names).__name__}")
  expected, targets = {}, {}
  for path, layer in entries:
    for role, iq in layer.act_quantizers():
      if iq is not None and iq.has_scale:
        expected[f"{path}/{role}"] = ("activation", iq.spec, tuple(iq.scale_shape))
        targets[f"{path}/{role}"] = iq
    for name, q, _ in weight_quantizers(layer):
      if q.has_scale:
        expected[f"{path}/{name}"] = ("param", q.spec, tuple(q.scale_shape))
        targets[f"{path}/{name}"] = q
  raw, data = _read_encodings(path_or_dict)
  names = dict(names or {})
  encs = encodings_from_dict(raw if data is None else data, expected, names=names, strict=False)
  for section in ("activation_encodings", "param_encodings"):
    for row in data.get(section, []):
      if names.get(row["name"], row["name"]) not in expected:
        raise ValueError(f"encodings entry '{row['name']}': the model has no quantizer of that "
                         "name" + (f" (mapped to '{names[row['name']]}')" if row["name"] in names
                                   else ""))
  missing = [n for n in expected if n not in encs and targets[n].float_reason is None]
  if missing:
    raise ValueError(f"encodings: no entry for the model's quantizer(s) {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}")
  for name, enc in encs.items():
    q = targets[name]
    s = np.asarray(enc.scale, np.float32).reshape(q.scale_shape)
    z = None if enc.zero_point is None else np.asarray(enc.zero_point, np.float32).reshape(
        q.scale_shape)
    if q.learned:
      q.log_scale.assign(np.asarray(step_size_to_param(s), np.float32))
      if q.has_offset:
        q.offset.assign((-(np.zeros_like(s) if z is None else z) * s).astype(np.float32))
      q.float_reason = None
      q.calibrated = True
    else:
      q.set_range(s, z)
      if q.role == "weight":
        q.frozen = True
  return model
