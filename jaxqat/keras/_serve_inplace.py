"""Serving quantized layers in place: inside custom layers, and subclasses of Keras layers.

:func:`jaxqat.keras.convert` rebuilds the graph of a Sequential/Functional
model with served layers. Two kinds of quantized layers cannot be rebuilt
that way, and are *served in place* instead, on a private copy of the model
(its ``.keras`` round trip, so the QAT model is untouched):

* the quantized layers inside a custom (subclassed) layer -- the attention
  projections of a ``keras_hub`` transformer block, say -- which the parent
  creates and calls itself;
* quantized subclasses of supported layers (a ``ReversibleEmbedding``) and
  embedding-like layers (a position embedding), whose own ``call`` jaxqat
  does not know.

A layer served in place keeps its object. Its quantized float weights are
dropped and replaced by their codes and scales (stored as in a
:class:`~jaxqat.keras.ServedLayer`: 2- and 4-bit codes packed, float codes as
bit patterns), its quantizer sublayers by the fixed range of its input. How
it computes:

* a ``Dense``, ``EinsumDense``, ``Conv1D/2D/3D``, ``DepthwiseConv1D/2D``,
  ``SeparableConv1D/2D`` or ``Conv1D/2D/3DTranspose`` (the exact Keras
  class: the projections of a ``keras_hub`` transformer block, a subclassed
  model's own layers), on the
  JAX backend with ``convert(..., integer=True)``, runs the kernel its
  graph-served layer runs (:class:`~jaxqat.keras.ServedDense`...): with a
  statically quantized integer input, an int8 x int8 -> int32 op with one
  rescale, then the layer's bias and activation -- the served graph model's
  values;
* every other layer (subclasses of supported layers, embedding-like layers,
  recurrent cells), other backends and
  ``integer=False`` dequantize the weights (``(q - z) * s``, the fake-quant
  arithmetic), fake-quantize the input with its fixed range and run the
  layer's own float ``call``: the values of the QAT model in inference, bit
  for bit, computed in float.

The served model records these layers (their locators and storage) in its
``.keras`` config, as :func:`jaxqat.keras.quantize` records its in-place
conversions: loading it rebuilds the float model through its own classes,
serves the recorded layers in place again and loads the codes.
"""

from __future__ import annotations

# pylint: disable=protected-access

import contextlib
import copy
import inspect
import json
import os
import re
import tempfile

import numpy as np

from jaxqat.core._serialize import spec_from_dict
from jaxqat.keras import _fold
from jaxqat.keras import _graph
from jaxqat.keras import _layers
from jaxqat.keras import _saving
from jaxqat.keras import _serve
from jaxqat.keras._backend import is_jax
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import ops
from jaxqat.keras._backend import to_numpy

RECORD_VERSION = 1
_REGISTERED = "jaxqat>ServedModel"
_CLASSES: dict = {}    # float layer class -> its in-place served class
_MODELS: dict = {}     # model class -> its recording class


class InPlaceServed(_serve.StoredWeights):
  """Mixin put in front of the float class of a layer served in place (see the module doc)."""

  integer = False

  def _slots(self) -> list:
    return [(e["prefix"], e["info"], spec_from_dict(e["info"]["spec"]))
            for e in self._jaxqat_served["weights"]]

  def _act_slots(self) -> list:
    return super()._act_slots() + [("state", self._jaxqat_served.get("state"),
                                    vars(self).get("state_spec"))]

  def _served_input(self, x, role: str = "input"):
    if self._act_slot(role)[1] is None:
      return x
    if is_jax():
      from jaxqat.core import fake_quantize_input
      return fake_quantize_input(x, self.encoding(role))
    return self._ops_input(x, role)

  def _integer_op(self):
    """The served class whose JAX op this layer runs (see the module doc), or ``None``."""
    served = _integer_classes().get(vars(self).get("_jaxqat_float_class"))
    entry = self._jaxqat_served
    if served is None or not entry.get("integer") or not is_jax() or self.aspec is None:
      return None
    return served if all(spec is not None for _, _, spec in self._slots()) else None

  def _integer_call(self, served, x):
    """The layer's forward through ``served``'s JAX op, then its float bias and activation."""
    prefixes = [e["prefix"] for e in self._jaxqat_served["weights"]]
    arrays = {p: self._stored_arrays(p) for p in prefixes}
    if served is _serve.ServedSeparableConv:  # two kernels: depthwise, pointwise
      def fn(x, arrays, act):
        dw, pw = (self._decode(arrays[p], p) for p in prefixes)
        return _serve.separable(self, x, dw, pw, act, True)
    else:
      op, (prefix,) = _Op(served, self), prefixes
      fn = lambda x, arrays, act: op(x, self._decode(arrays[prefix], prefix), act)  # noqa: E731
    if not _serve._traced(x):  # eager: one compiled program per layer configuration
      import jax  # pylint: disable=import-outside-toplevel
      key = json.dumps(["in place", served.__name__, self.get_config(),
                        self._jaxqat_served["weights"]], sort_keys=True, default=str)
      if key not in _serve._JITTED:
        _serve._JITTED[key] = jax.jit(fn)
      fn = _serve._JITTED[key]
    y = fn(ops.convert_to_tensor(x), arrays, self.encoding())
    bias = getattr(self, "bias", None)
    if bias is not None:
      bias = ops.convert_to_tensor(bias)
      if hasattr(self, "rank") and hasattr(self, "data_format"):  # a convolution's channels
        bias = _layers.channel_bias(self, bias)
      y = ops.add(y, bias)
    activation = getattr(self, "activation", None)
    return y if activation is None else activation(y)

  def call(self, *args, **kwargs):
    served = self._integer_op() if args else None
    if served is not None:
      return self._integer_call(served, args[0])
    if args:
      args = (self._served_input(args[0]),) + args[1:]
    state = None  # a recurrent cell's h_{t-1}, at its recurrent matmuls
    if vars(self).get("state_spec") is not None:
      state = lambda h: self._served_input(h, "state")  # noqa: E731
    saved = {}
    try:
      for e in self._jaxqat_served["weights"]:
        saved[e["attr"]] = vars(self).get(e["attr"])
        w = self._ops_weight(e["prefix"])
        if getattr(self, "autocast", True) and self.compute_dtype != e["info"]["dtype"]:
          w = ops.cast(w, self.compute_dtype)  # as Keras autocasts a float variable it reads
        object.__setattr__(self, e["attr"], w)
      return _layers.run_with_state_operand(self, state, super().call, args, kwargs)
    finally:
      for attr, value in saved.items():
        object.__setattr__(self, attr, value)

  # The float class may save its weights by attribute (Keras's Dense, EinsumDense and
  # Embedding do, for their own quantization): these layers hold other variables.
  def save_own_variables(self, store):
    keras.layers.Layer.save_own_variables(self, store)

  def load_own_variables(self, store):
    keras.layers.Layer.load_own_variables(self, store)


class _Op(_serve._ConvBias):  # pylint: disable=too-few-public-methods
  """A served class's JAX op (its ``_jax_op``) on the arguments of a layer served in place.

  The served classes read their float layer's arguments (strides, padding,
  equation...) from ``_float``: here the layer itself.
  """

  def __init__(self, served, layer):
    self._fn, self._float, self.integer = served._jax_op, layer, True

  def __call__(self, x, w, act):
    return self._fn(self, x, w, act)


def _integer_classes() -> dict:
  """Float class -> the served class whose JAX op its layers served in place run."""
  return {fcls: served for _, fcls, served in _serve._KINDS if served is not _serve.ServedEmbedding}


def served_class(float_cls: type) -> type:
  """The in-place served class of a float layer class (generated once per class)."""
  if float_cls not in _CLASSES:
    name = f"InPlaceServed{float_cls.__name__}"
    step = (_layers.GRUStateOperand,) if issubclass(float_cls, keras.layers.GRUCell) else ()
    _CLASSES[float_cls] = type(name, (InPlaceServed,) + step + (float_cls,), {
        "__module__": float_cls.__module__,
        "__doc__": f"{float_cls.__name__} served in place (see jaxqat.keras.convert)."})
  return _CLASSES[float_cls]


def plan(layer, path: str, pack: bool, integer: bool = False):
  """``(entry, values)``: how ``layer`` (a QuantLayer) is stored when served in place.

  ``integer`` (convert's) is recorded in the entry: whether the layer may run
  its served class's integer op (see the module doc).

  Raises:
    NotImplementedError: for LoRA.
    ValueError: if a quantizer has no range or is set to float (as convert).
  """
  if getattr(layer, "lora_enabled", False):
    raise NotImplementedError(f"layer {path!r}: LoRA is enabled; merge it into the kernel "
                              "before converting")
  names = dict(layer.quant_weights or ())
  weights, values = [], {}
  for attr, q in getattr(layer, "weight_quantizers", {}).items():
    name = names.get(attr, q.name)
    name = name[:-len("_quantizer")] if name.endswith("_quantizer") else name
    w = getattr(layer, attr)
    dtype = str(np.asarray(to_numpy(w)).dtype)
    prefix = f"{name}_"
    info, vals = _serve._weight_plan(name, q, w, dtype, path, pack, prefix)
    weights.append({"attr": attr, "prefix": prefix, "info": info})
    values.update(vals)
  act, act_values = _serve._act_plan(layer, path)
  values.update(act_values)
  entry = {"weights": weights, "act": act, "integer": bool(integer)}
  if any(role == "state" for role, _ in layer.act_quantizers()):  # a recurrent cell
    entry["state"], state_values = _serve._act_plan(layer, path, "state")
    values.update(state_values)
  return entry, values


def apply(layer, entry: dict, values=None) -> None:
  """Serves ``layer`` in place (a QuantLayer, or its float class when loading a served model).

  Drops its quantizer sublayers and its quantized float weights, creates the
  codes, scales and input range (from ``values``, or zeros for the loader to
  fill), and gives it :func:`served_class` of its float class.
  """
  float_cls = _layers.float_class(layer)
  if issubclass(float_cls, _layers.QuantLayer):  # a quantized class built by quantize's graph
    float_cls = float_cls.__bases__[-1]          # rebuild: (mixins..., QuantLayer, float class)
  tracker = layer._tracker
  locked = tracker.locked
  tracker.unlock()
  try:
    quantizers = [q for _, q in layer.act_quantizers()] if hasattr(
        layer, "act_quantizers") else []
    quantizers += list(getattr(layer, "weight_quantizers", {}).values())
    for q in quantizers:
      if q is not None:
        tracker.untrack(q)
    for attr in ["input_quantizer", "state_quantizer", "weight_quantizers"] + [
        qname for _, qname in (getattr(layer, "quant_weights", None) or ())]:
      if attr in vars(layer):
        object.__delattr__(layer, attr)
      (vars(layer).get("_modules") or {}).pop(attr, None)  # torch: sublayers live in _modules
    for e in entry["weights"]:
      var = getattr(layer, e["attr"])
      layer._untrack_variable(var)
      object.__setattr__(layer, e["attr"], None)
    layer.__class__ = served_class(float_cls)
    object.__setattr__(layer, "_jaxqat_float_class", float_cls)
    object.__setattr__(layer, "_jaxqat_served", entry)
    object.__setattr__(layer, "act_info", entry["act"])
    object.__setattr__(layer, "aspec", None if entry["act"] is None else spec_from_dict(
        entry["act"]["spec"], where=f"{layer.name} act"))
    object.__setattr__(layer, "state_spec", None if entry.get("state") is None else
                       spec_from_dict(entry["state"]["spec"], where=f"{layer.name} state"))
    object.__setattr__(layer, "_init_values", values)
    layer._add_stored()
    object.__setattr__(layer, "_init_values", None)
  finally:
    if locked:
      tracker.lock()
  # Keras binds call arguments with the signature it read at construction: the float call's.
  sig = inspect.signature(float_cls.call.__get__(layer))
  layer._call_signature = sig
  layer.call_signature_parameters = list(sig.parameters)
  layer._call_has_training_arg = "training" in sig.parameters
  if isinstance(getattr(layer, "_call_has_context_arg", None), dict):
    layer._call_has_context_arg["training"] = "training" in sig.parameters
  if hasattr(layer, "_track_variables"):  # torch backend: refresh the module's parameters
    layer._track_variables()


def needs_in_place(model) -> bool:
  """Whether ``model`` holds a quantized layer that convert must serve in place."""
  if not _serve.is_graph_model(model):
    return True  # a subclassed model: no graph to rebuild
  for _, _, layer in _graph.walk(model, stop=_fold.quant_leaf):
    if isinstance(layer, _layers.QuantLayer) and not _serve.graph_servable(layer):
      return True
    if isinstance(layer, _serve._QUANT) or isinstance(layer, keras.Sequential) or \
        _graph.is_functional(layer):
      continue
    if any(isinstance(l, _serve._QUANT) for _, _, l in _graph.walk(layer)):
      return True
  return False


def private_copy(model):
  """A copy of ``model`` to serve in place: ``copy.deepcopy``, else its ``.keras`` round trip.

  Raises:
    TypeError: if the model can be neither deep-copied nor saved and loaded
      (the message gives both reasons).
  """
  try:
    return copy.deepcopy(model)
  except Exception as e:  # pylint: disable=broad-except
    first = e
  try:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "model.keras")
      _saving.save(path, model)
      return _saving.restore(path)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"model: convert serves {model.name!r} on a copy (some of its quantized "
                    "layers are served in place), but the model can be neither deep-copied "
                    f"({_brief(first)}) nor saved and loaded ({_brief(e)}); a model of custom "
                    "classes saves and loads when they are registered "
                    "(@keras.saving.register_keras_serializable())") from e


def _brief(e: Exception, limit: int = 400) -> str:
  """``Type: message`` of ``e`` without the configs Keras's loading errors print in full."""
  text = str(e)
  for marker in ("\n\nconfig=", "Full object config:", "\nconfig="):
    text = text.split(marker, 1)[0]
  text = " ".join(text.split())
  if len(text) > limit:
    text = text[:limit] + "..."
  missing = sorted(set(re.findall(r"Could not locate class '([^']+)'", str(e))))
  if missing:  # the root cause, printed by Keras after the configs
    text += f" (Keras could not locate class {', '.join(repr(m) for m in missing)})"
  return f"{type(e).__name__}: {text}"


def serve_copy(model, pack: bool, integer: bool = False):
  """convert's route for a model with layers to serve in place: every quantized layer of a copy.

  Raises:
    NotImplementedError: for a folded Conv+BatchNorm (convert it with
      ``fold_batchnorm=False`` models only) or LoRA.
    ValueError: as :func:`plan`.
    TypeError: if the model cannot be copied (:func:`private_copy`).
  """
  for _, path, layer in _graph.walk(model, stop=_fold.quant_leaf):
    if isinstance(layer, _serve._QUANT) and not isinstance(layer, _layers.QuantLayer):
      raise NotImplementedError(
          f"layer {path!r}: a folded Conv+BatchNorm cannot be served in a model whose other "
          "quantized layers are served in place (inside custom layers, or of classes without "
          "a served class); quantize it with fold_batchnorm=False")
  served = private_copy(model)
  todo = [(layer, *plan(layer, path, pack, integer)) for _, path, layer in _graph.walk(
      served, stop=_fold.quant_leaf) if isinstance(layer, _layers.QuantLayer)]
  for layer, entry, values in todo:
    apply(layer, entry, values)
  base = vars(served).get("_jaxqat_base", type(served))
  for attr in ("_jaxqat_base", "_jaxqat_record", "_jaxqat_inplace"):  # quantize's record
    vars(served).pop(attr, None)
  served.__class__ = base
  mark(served)
  return served


# -- the served model's record ---------------------------------------------------------------


def _layers_in_place(model) -> list:
  return [(loc, path, layer) for loc, path, layer in _graph.walk(model)
          if isinstance(layer, InPlaceServed)]


@contextlib.contextmanager
def _as_float_classes(model):
  """Shows ``model`` as its own class and its layers served in place as their float classes."""
  layers = [layer for _, _, layer in _layers_in_place(model)]
  classes = [type(l) for l in layers]
  base = type(model)
  try:
    model.__class__ = vars(model)["_jaxqat_served_base"]
    for layer in layers:
      layer.__class__ = _layers.float_class(layer)
    yield
  finally:
    model.__class__ = base
    for layer, cls in zip(layers, classes):
      layer.__class__ = cls


def _get_config(self):
  with _as_float_classes(self):
    inner = keras.saving.serialize_keras_object(self)
  inner.pop("compile_config", None)
  return {"model": inner, "serving": vars(self)["_jaxqat_serving"]}


def mark(model) -> None:
  """Records the layers of ``model`` served in place, so that its ``.keras`` file reloads."""
  record = {"version": RECORD_VERSION, "layers": [
      {"at": loc, "path": path, **vars(layer)["_jaxqat_served"]}
      for loc, path, layer in _layers_in_place(model)]}
  object.__setattr__(model, "_jaxqat_served_base", type(model))
  object.__setattr__(model, "_jaxqat_serving", record)
  model.__class__ = _saving.recording_class(type(model), _get_config, _REGISTERED, _MODELS)
  _layers.pin_quantized_loops(model)


def _reapply(model, record):
  """Serves a loaded float model's recorded layers in place again (the loader of ServedModel)."""
  if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
    raise ValueError(f"jaxqat>ServedModel: expected record version {RECORD_VERSION}, got "
                     f"{record.get('version') if isinstance(record, dict) else record!r}")
  for entry in record["layers"]:
    try:
      layer = _graph.locate(model, entry["at"])
    except ValueError as e:
      raise ValueError(f"jaxqat>ServedModel, layer {entry.get('path')!r}: the loaded model "
                       f"has {e}") from e
    apply(layer, {k: entry[k] for k in ("weights", "act", "state", "integer") if k in entry})
  mark(model)
  return model


ServedModel = _saving.register_loader(
    "ServedModel", "serving", _reapply,
    """Loads the config of a served model with layers served in place (see the module doc).

  Not a class of models: ``from_config`` returns the model, of its own class.
  """)
