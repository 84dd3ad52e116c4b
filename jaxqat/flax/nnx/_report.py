"""``report(model)``: what is quantized in an NNX model, layer by layer and weight by weight."""

from __future__ import annotations

from flax import nnx

from jaxqat import core
from jaxqat.flax.nnx import _intercept
from jaxqat.flax.nnx import _layers
from jaxqat.flax.nnx._convert import _own_params
from jaxqat.flax.nnx._convert import path_str

__all__ = ["report"]


def _float_reason(var) -> str:
  return "bias" if var.ndim == 1 else "not a matmul weight (rank < 2)" if var.ndim < 2 else (
      "not used as a matmul weight")


def report(model: nnx.Module) -> core.QuantizationReport:
  """The :class:`jaxqat.core.QuantizationReport` of a quantized model.

  One :class:`jaxqat.core.LayerReport` per layer that holds weights
  (quantized or not), in model order, with each weight's spec or the reason
  it stays float, and the layer's input spec (``None`` when the input stays
  float; the layer's ``reason`` then says why, e.g. an input quantizer that
  saw no data during :func:`calibrate`).

  Args:
    model: a model returned by :func:`quantize`.

  Returns:
    A :class:`jaxqat.core.QuantizationReport`.

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if ``model`` did not go through :func:`quantize`.

  Examples:
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                             nnx.LayerNorm(3, rngs=nnx.Rngs(0))))
    >>> r = report(m)
    >>> r.quantized_paths(), r["layers/1"].status
    (['layers/0'], 'unsupported')
    >>> [(w.path, w.name, w.reason) for w in r.float_weights()][:2]
    [('layers/0', 'bias', 'bias'), ('layers/1', 'bias', 'no matmul weight (parameters of rank < 2)')]
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  entries = getattr(model, "jaxqat_layers", None)
  if entries is None:
    raise ValueError("model: report needs a model returned by jaxqat.flax.nnx.quantize")
  nodes = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      nodes.setdefault(path_str(path), node)
  model_ran = any(_layers.ran(n) for n in nodes.values())
  layers = []
  for path, layer_type, status, rule, reason in entries:
    node = nodes[path]
    never_ran = (status == "quantized" and model_ran and isinstance(node, _layers._QuantMixin)  # pylint: disable=protected-access
                 and not _layers.ran(node))
    quant, unused = {}, set()
    act, act_reason = None, ""
    if status == "quantized" and hasattr(type(node), "jaxqat_weights"):
      for parts, wq, aq in node.jaxqat_weights():
        if wq is not None and not _intercept.feeds_matmul(node, ".".join(map(str, parts))):
          unused.add(tuple(parts))
          wq = None
        quant[tuple(parts)] = wq
        if aq is not None:
          if aq.disabled:
            act_reason = f"input stays float: {aq.disabled}"
          elif act is None:
            act = aq.spec
    if never_ran:
      status, reason, quant = "unsupported", (
          "never called while the model ran (calibrate, QAT): unused by that data, or another "
          "module reads its weight directly (embedding[...].at[ids].get()), in float; convert "
          "keeps it float"), {}
    weights = []
    for parts, var in _own_params(node):
      parts = tuple(parts)
      wq = quant.get(parts)
      name = ".".join(str(p) for p in parts)
      if wq is not None:
        weights.append(core.WeightReport(name, tuple(var.shape), wq.spec, ""))
      else:
        why = reason if status != "quantized" else _float_reason(var)
        if parts in unused:
          why = ("fed no matmul or convolution when the layer ran (e.g. an added class token "
                 "or position table)")
        weights.append(core.WeightReport(name, tuple(var.shape), None, why))
    how = "; ".join(r for r in (reason, act_reason) if r)
    layers.append(core.LayerReport(path, layer_type, status, weights, act, rule, how))
  return core.QuantizationReport(layers=layers,
                                 unused_rules=list(getattr(model, "jaxqat_unused_rules", ())))
