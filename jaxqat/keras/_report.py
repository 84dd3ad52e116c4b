"""report: what ``quantize`` did to a Keras model, layer by layer and weight by weight."""

from __future__ import annotations

from jaxqat.core._report import LayerReport
from jaxqat.core._report import QuantizationReport
from jaxqat.core._report import WeightReport
from jaxqat.keras import _fold
from jaxqat.keras import _graph
from jaxqat.keras import _layers
from jaxqat.keras import _saving
from jaxqat.keras._backend import keras

__all__ = ["report"]

_QUANT = _fold.QUANT  # quantized layers (QuantLayer, QuantConvBatchNorm)


def _weight_name(var, layer) -> str:
  prefix = (getattr(layer, "path", None) or layer.name) + "/"
  return var.path[len(prefix):] if var.path.startswith(prefix) else var.name


def _float_reason(var) -> str:
  if var.name == "bias":
    return "bias (kept float)"
  return "not a matmul weight" if len(var.shape) < 2 else "not read as a quantized weight"


def _quant_layer(layer, path, entry) -> LayerReport:
  quantizers = {id(getattr(layer, attr)): q
                for attr, q in getattr(layer, "weight_quantizers", {}).items()}
  weights = []
  for var in _graph.own_weights(layer):
    q = quantizers.get(id(var))
    weights.append(WeightReport(_weight_name(var, layer), tuple(var.shape),
                                None if q is None else q.spec,
                                "" if q is not None else _float_reason(var)))
  act = layer.input_quantizer.spec if layer.input_quantizer is not None else None
  return LayerReport(path, entry.get("type", _layers.float_class(layer).__name__), "quantized",
                     weights, act, entry.get("rule"), entry.get("reason", ""))


def _folded(layer, path, entry) -> LayerReport:
  conv, bn = layer.conv, layer.bn
  spec = layer.kernel_quantizer.spec if layer.kernel_quantizer is not None else None
  folded = f"folded into the kernel and bias with {bn.name}"
  weights = [WeightReport("kernel", tuple(conv.kernel.shape), spec,
                          "" if spec is not None else "its rule keeps it float")]
  for owner in (conv, bn):
    for var in _graph.own_weights(owner):
      if var is not conv.kernel:
        weights.append(WeightReport(_weight_name(var, owner), tuple(var.shape), None, folded))
  act = layer.input_quantizer.spec if layer.input_quantizer is not None else None
  return LayerReport(path, f"{type(conv).__name__}+{type(bn).__name__}", "quantized", weights,
                     act, entry.get("rule"), entry.get("reason", f"folded with {bn.name}"))


def _float_layer(layer, path, entry) -> LayerReport:
  if entry:
    status, reason = entry["status"], entry["reason"]
  else:
    status, reason = "unmatched", "not seen by jaxqat.keras.quantize"
  if status == "quantized":  # recorded quantized, float now: the file and model disagree
    status, reason = "failed", "recorded as quantized, but the layer is float"
  weights = [WeightReport(_weight_name(v, layer), tuple(v.shape), None, reason)
             for v in _graph.own_weights(layer)]
  return LayerReport(path, type(layer).__name__, status, weights, None,
                     entry.get("rule") if entry else None, reason)


def report(model) -> QuantizationReport:
  """One entry per layer with weights of a (quantized) Keras model, quantized or not.

  Quantized layers are described from the model itself (each weight's
  resolved spec, the input spec); layers left float carry the status and
  reason recorded by :func:`jaxqat.keras.quantize` (kept across save/load).
  Quantizer state is not listed as weights.

  Args:
    model: a Keras model, usually one returned by ``quantize``.

  Returns:
    A :class:`jaxqat.core.QuantizationReport`.

  Raises:
    TypeError: if ``model`` is not a Keras model.

  Examples:
    >>> import keras
    >>> import jaxqat.keras as jqk
    >>> inp = keras.Input((4, 3))
    >>> h = keras.layers.LSTM(2, name="lstm")(inp)
    >>> h = keras.layers.LayerNormalization(name="norm")(h)
    >>> m = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    >>> r = jqk.report(jqk.quantize(m))
    >>> r["head"].status, [w.name for w in r["head"].weights if w.quantized]
    ('quantized', ['kernel'])
    >>> [w.name for w in r["lstm/lstm_cell"].weights if w.quantized]  # the cell, in place
    ['kernel', 'recurrent_kernel']
    >>> r["norm"].status, r["norm"].reason
    ('unsupported', 'normalization (no matmul): kept float')
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
  record = _saving.record_of(model) or {}
  entries = {repr(e["at"]): e for e in record.get("layers", [])}
  items = [([], "", model)] if _graph.own_weights(model) else []
  items += list(_graph.walk(model, stop=_fold.quant_leaf))
  layers = []
  for loc, path, layer in items:
    entry = entries.get(repr(loc), {})
    path = entry.get("path", path)  # the path the rules saw (stable across save/load)
    if isinstance(layer, _fold.QuantConvBatchNorm):
      layers.append(_folded(layer, path, entry))
    elif isinstance(layer, _layers.QuantLayer):
      layers.append(_quant_layer(layer, path, entry))
    elif _graph.own_weights(layer):
      layers.append(_float_layer(layer, path, entry))
  return QuantizationReport(layers=layers, unused_rules=list(record.get("unused_rules", [])))
