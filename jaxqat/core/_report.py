"""One report type and one warning class for every front end.

:func:`jaxqat.flax.nnx.report`, :func:`jaxqat.flax.linen.report` and
:func:`jaxqat.keras.report` all return a :class:`QuantizationReport`: one
:class:`LayerReport` per layer that holds weights (quantized or not), each
listing its weights (:class:`WeightReport`) with the spec they are quantized
with, or the reason they are not. Everything jaxqat has to tell the user about
a conversion (a rule that matched nothing, a layer it could not quantize, an
observer that saw no data) is a :class:`QuantizationWarning`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from jaxqat.core import _serialize
from jaxqat.core import _spec as spec_lib

__all__ = ["QuantizationWarning", "WeightReport", "LayerReport", "QuantizationReport",
           "LAYER_STATUSES", "describe_spec"]


class QuantizationWarning(UserWarning):
  """Something was not quantized as asked, or a quantizer's state is suspect.

  The one warning class of jaxqat, in every front end: filter it with
  ``warnings.simplefilter("error", jaxqat.QuantizationWarning)`` to make
  every such case an error.
  """


# A layer's status:
#   "quantized":   at least one weight or its input is quantized;
#   "skipped":     a rule said to keep it float (skip=True, or no specs);
#   "unmatched":   no rule matched its path;
#   "unsupported": jaxqat has no way to quantize it (the reason says why);
#   "failed":      a rule matched but quantizing it failed (the reason says why).
LAYER_STATUSES = ("quantized", "skipped", "unmatched", "unsupported", "failed")


def is_broadcast_table(shape) -> bool:
  """Whether a parameter is an addend broadcast over the batch, not a matmul weight.

  Leading axis 1, rank >= 2: a class token ``(1, 1, D)``, a position table
  ``(1, N, D)``.

  Examples:
    >>> is_broadcast_table((1, 197, 768)), is_broadcast_table((768, 3072))
    (True, False)
  """
  return len(shape) >= 2 and shape[0] == 1


def describe_spec(spec: Optional[spec_lib.QuantSpec]) -> str:
  """A short human description of a spec (``"float"`` for ``None``).

  Examples:
    >>> from jaxqat.core import QuantSpec, PerChannel
    >>> describe_spec(QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq"))
    'int4 per-channel(-1) symmetric lsq'
    >>> describe_spec(None)
    'float'
  """
  if spec is None:
    return "float"
  g = spec.granularity
  if isinstance(g, spec_lib.PerTensor):
    gran = "per-tensor"
  elif isinstance(g, spec_lib.PerChannel):
    gran = "per-channel(" + ",".join(str(a) for a in g.axes) + ")"
  elif isinstance(g, spec_lib.PerBlock):
    gran = f"per-block({g.size}, axis {g.axis})"
  else:
    gran = "per-output-channel"
  sym = "symmetric" if spec.symmetric else "affine"
  return f"{spec.format.name} {gran} {sym} {spec.learning}"


@dataclasses.dataclass(frozen=True)
class WeightReport:
  """One weight of a layer.

  Attributes:
    name: the weight's name in its layer (``"kernel"``, ``"embedding"``).
    shape: its shape.
    spec: the (resolved) spec it is quantized with, or ``None`` if it stays
      float.
    reason: why it stays float (empty when quantized).
  """

  name: str
  shape: tuple
  spec: Optional[spec_lib.QuantSpec] = None
  reason: str = ""

  @property
  def quantized(self) -> bool:
    return self.spec is not None


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One layer that holds weights (or has an input quantizer).

  Attributes:
    path: the layer path the rules were matched against (``""`` is the root).
    layer_type: the layer's class name (before conversion).
    status: one of :data:`LAYER_STATUSES`.
    weights: its weights, quantized or not.
    act: the spec of its input activation, or ``None``.
    rule: the pattern of the rule that matched, or ``None``.
    reason: for a status other than ``"quantized"``, why; for a quantized
      layer, how (e.g. ``"intercepted"``, ``"folded with bn"``), or empty.
  """

  path: str
  layer_type: str
  status: str
  weights: tuple = ()
  act: Optional[spec_lib.QuantSpec] = None
  rule: Optional[str] = None
  reason: str = ""

  def __post_init__(self):
    if self.status not in LAYER_STATUSES:
      raise ValueError(f"LayerReport.status: must be one of {LAYER_STATUSES}, got {self.status!r}")
    object.__setattr__(self, "weights", tuple(self.weights))


@dataclasses.dataclass
class QuantizationReport:
  """What a front end's ``quantize`` did, layer by layer and weight by weight.

  Attributes:
    layers: one :class:`LayerReport` per layer with weights, in model order.
    unused_rules: the patterns of rules that matched no layer.

  Examples:
    >>> from jaxqat.core import QuantSpec
    >>> r = QuantizationReport(layers=[
    ...     LayerReport("dense", "Dense", "quantized",
    ...                 [WeightReport("kernel", (4, 2), QuantSpec()),
    ...                  WeightReport("bias", (2,), None, "bias")]),
    ...     LayerReport("norm", "LayerNorm", "unsupported",
    ...                 [WeightReport("scale", (2,), None, "not a matmul weight")],
    ...                 reason="no quantized version")])
    >>> r.quantized_paths(), r["norm"].status
    (['dense'], 'unsupported')
    >>> [(w.path, w.name) for w in r.float_weights()]
    [('dense', 'bias'), ('norm', 'scale')]
    >>> print(r)  # doctest: +NORMALIZE_WHITESPACE
    layer  type       status       weight  shape   quantized as              input
    dense  Dense      quantized    kernel  (4, 2)  int8 per-tensor symmetric fixed  float
    dense  Dense      quantized    bias    (2,)    float (bias)              float
    norm   LayerNorm  unsupported  scale   (2,)    float (not a matmul weight)  float
  """

  layers: list = dataclasses.field(default_factory=list)
  unused_rules: list = dataclasses.field(default_factory=list)

  def __getitem__(self, path: str) -> LayerReport:
    for layer in self.layers:
      if layer.path == path:
        return layer
    raise KeyError(f"no layer with path {path!r} in the report; paths: "
                   f"{[l.path for l in self.layers]}")

  def __contains__(self, path: str) -> bool:
    return any(l.path == path for l in self.layers)

  def paths(self, status: Optional[str] = None) -> list[str]:
    """Layer paths, optionally only those with ``status``."""
    if status is not None and status not in LAYER_STATUSES:
      raise ValueError(f"status: must be one of {LAYER_STATUSES}, got {status!r}")
    return [l.path for l in self.layers if status is None or l.status == status]

  def quantized_paths(self) -> list[str]:
    """Paths of the layers with status ``"quantized"``."""
    return self.paths("quantized")

  def quantized_weights(self) -> list:
    """``(path, WeightReport)``-like records of every quantized weight.

    Returns:
      A list of :class:`WeightEntry` (``path``, ``name``, ``shape``,
      ``spec``, ``reason``).
    """
    return [WeightEntry(l.path, w.name, w.shape, w.spec, w.reason)
            for l in self.layers for w in l.weights if w.quantized]

  def float_weights(self) -> list:
    """Every weight that stays float, with the reason, as :class:`WeightEntry`."""
    return [WeightEntry(l.path, w.name, w.shape, w.spec, w.reason or l.reason)
            for l in self.layers for w in l.weights if not w.quantized]

  def rows(self) -> list[dict]:
    """One dict per (layer, weight), for tables and ``pandas.DataFrame``."""
    out = []
    for l in self.layers:
      ws = l.weights or (WeightReport("", (), None, ""),)
      for w in ws:
        out.append({
            "layer": l.path or "<root>", "type": l.layer_type, "status": l.status,
            "weight": w.name, "shape": tuple(w.shape),
            "quantized_as": (describe_spec(w.spec) if w.quantized
                             else f"float ({w.reason or l.reason})" if (w.reason or l.reason)
                             else "float"),
            "input": describe_spec(l.act), "rule": l.rule, "reason": l.reason})
    return out

  def to_dict(self) -> dict:
    """A JSON-compatible dict (specs via :func:`jaxqat.core.spec_to_dict`)."""
    return {
        "layers": [{
            "path": l.path, "layer_type": l.layer_type, "status": l.status,
            "rule": l.rule, "reason": l.reason, "act": _serialize.spec_to_dict(l.act),
            "weights": [{"name": w.name, "shape": list(w.shape),
                         "spec": _serialize.spec_to_dict(w.spec), "reason": w.reason}
                        for w in l.weights]} for l in self.layers],
        "unused_rules": list(self.unused_rules),
    }

  def __str__(self) -> str:
    cols = ("layer", "type", "status", "weight", "shape", "quantized_as", "input")
    heads = ("layer", "type", "status", "weight", "shape", "quantized as", "input")
    rows = [[str(r[c]) for c in cols] for r in self.rows()]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = [fmt(heads)] + [fmt(r) for r in rows]
    lines += [f"unused rule {p!r}" for p in self.unused_rules]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class WeightEntry:
  """A weight with the path of its layer (see :meth:`QuantizationReport.float_weights`)."""

  path: str
  name: str
  shape: tuple
  spec: Optional[spec_lib.QuantSpec]
  reason: str


def unused_patterns(rules: Sequence) -> list[str]:
  """The patterns of ``rules`` (for :attr:`QuantizationReport.unused_rules`).

  Examples:
    >>> from jaxqat.core import Rule
    >>> unused_patterns([Rule(pattern="head")])
    ['head']
  """
  return [r.pattern for r in rules]
