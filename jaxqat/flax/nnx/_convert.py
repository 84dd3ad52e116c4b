"""``quantize(model, rules)``: convert an existing NNX model, in place.

The converter walks the whole NNX graph (nested modules, ``nnx.List`` /
``nnx.Dict`` / ``nnx.Sequential`` containers, ``nnx.MultiHeadAttention``,
``nnx.vmap``-stacked layers) and builds each layer's **path** by joining
the attribute names and container keys with ``/`` (the keys of
``nnx.state(model)``): ``"encoder/layers/0/attn/query"``. A shared module
is visited once, under its first path.

Candidate layers, matched against the rules (first match wins):

* Flax's ``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed``
  (exact types) become ``QuantLinear`` ... ``QuantEmbed``
  (:mod:`jaxqat.flax.nnx._layers`);
* any other module with a ``__call__`` and its own ``nnx.Param`` of rank >= 2
  (held directly or in ``nnx.List``/``nnx.Dict`` attributes) is
  *intercepted* (:mod:`jaxqat.flax.nnx._intercept`): the matmuls and
  convolutions that its ``__call__`` runs on those parameters are
  quantized. This covers modules from other libraries and Flax layers
  without a dedicated class (``ConvTranspose``, ``LoRA`` ...).

Containers without parameters of their own are never matched, so a rule that
only matches containers is reported as unused.

Conversion is **in place**: the layers keep their identity, parameters
(the same arrays) and paths; their class changes and quantizer children are
added. To keep the float model, convert a copy: ``quantize(nnx.clone(model))``
(``nnx.clone`` shares the weight arrays, which are immutable).

Stacked layers (created with ``nnx.vmap`` and applied with ``nnx.scan``) are
detected: for Flax layers from their configuration (the kernel has more
leading axes than ``in_features``/``kernel_size`` call for), for other
modules from the stacked Flax layers around them (all parameters of the
enclosing stacked block share the leading axes) or from the ``stacked``
argument. Their quantizer state gets the same leading axes (one range per
layer).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Mapping, Optional, Sequence, Union

import jax.numpy as jnp
from flax import nnx

from jaxqat import core
from jaxqat.core import _rules as rules_lib
from jaxqat.flax.nnx import _intercept
from jaxqat.flax.nnx import _layers
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._variables import QuantParam

__all__ = [
    "quantize",
    "default_rules",
    "default_weight_spec",
    "default_act_spec",
    "per_output_channel",
    "QuantizationReport",
    "QuantizationWarning",
    "path_str",
]


class QuantizationWarning(UserWarning):
  """A layer matched a rule but could not be (fully) quantized."""


def per_output_channel(spec: core.QuantSpec) -> core.QuantSpec:
  """Returns a copy of a weight ``spec`` with one scale per output channel.

  The granularity becomes :class:`jaxqat.core.PerOutputChannel`, which each
  quantized layer resolves, when it is created, to the weight axes that its
  matmul/convolution does not contract: the last kernel axis of ``Linear``
  and ``Conv`` (grouped and depthwise included), the batch and
  ``out_features`` axes of a ``LinearGeneral`` kernel, the kernel axes of an
  ``Einsum`` that appear in its output, the rows (axis 0) of an ``Embed``
  table. Modules that are intercepted (not Flax's own layers) use the last
  axis of each parameter (see :func:`quantize`). The Linen front end's
  ``per_output_channel`` gives the same axes for Flax's layers.

  Args:
    spec: a weight QuantSpec (its granularity is replaced).

  Returns:
    ``spec`` with ``granularity=PerOutputChannel()``.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.

  Examples:
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule
    >>> w4 = per_output_channel(QuantSpec(format="int4"))
    >>> w4.granularity
    PerOutputChannel()
    >>> emb = quantize(nnx.Embed(10, 4, rngs=nnx.Rngs(0)), Rule(pattern=".*", weight=w4))
    >>> emb.embedding_quant.spec.granularity, emb.embedding_quant.scale.shape
    (PerChannel(axis=0), (10, 1))
  """
  if not isinstance(spec, core.QuantSpec):
    raise TypeError(f"per_output_channel: spec must be a jaxqat QuantSpec, got "
                    f"{type(spec).__name__}")
  return spec.replace(granularity=core.PerOutputChannel())


def default_weight_spec() -> core.QuantSpec:
  """int8 symmetric (narrow range ``[-127, 127]``) per output channel, absmax.

  The granularity is :class:`jaxqat.core.PerOutputChannel` (see
  :func:`per_output_channel`): each layer resolves it to its own output
  axes -- the last kernel axis of ``Linear``/``Conv``, the batch and output
  axes of ``LinearGeneral``, the kernel axes of an ``Einsum`` that appear in
  its output, the rows of an ``Embed`` table, the last axis of each weight
  of an intercepted module. The same spec as the Linen front end's default.

  Examples:
    >>> default_weight_spec().qmin
    -127
    >>> default_weight_spec().granularity
    PerOutputChannel()
  """
  return per_output_channel(core.QuantSpec(format=core.IntFormat(bits=8, signed=True, narrow=True),
                                           symmetric=True, calibration="absmax"))


def default_act_spec() -> core.QuantSpec:
  """int8 **affine** per tensor, min/max calibration (static range).

  Affine, because most inputs follow a ReLU/GELU or are images in ``[0, 1]``
  and a symmetric grid would waste half of its codes on them.

  Examples:
    >>> default_act_spec().symmetric
    False
  """
  return core.QuantSpec(format="int8", granularity=core.PerTensor(), symmetric=False,
                        calibration="minmax")


def default_rules() -> list[core.Rule]:
  """W8A8: :func:`default_weight_spec` weights, :func:`default_act_spec` inputs.

  Examples:
    >>> [r.pattern for r in default_rules()]
    ['.*']
  """
  return [core.Rule(pattern=".*", weight=default_weight_spec(), act=default_act_spec())]


@dataclasses.dataclass
class QuantizationReport:
  """What :func:`quantize` did, by layer path.

  Attributes:
    quantized: path -> description, for the Flax layers converted to
      quantized layers.
    intercepted: path -> description, for the other modules whose matmuls
      are intercepted (the description names the parameters treated as
      weights).
    skipped: path -> reason, for layers matched by a ``skip`` rule or a
      rule without specs.
    failed: path -> reason, for layers that matched a rule but could not be
      quantized (each also raised a :class:`QuantizationWarning`).
    unmatched: paths of candidate layers no rule matched (left in float).
    unused_rules: the rules that matched no layer.
  """

  quantized: dict = dataclasses.field(default_factory=dict)
  intercepted: dict = dataclasses.field(default_factory=dict)
  skipped: dict = dataclasses.field(default_factory=dict)
  failed: dict = dataclasses.field(default_factory=dict)
  unmatched: list = dataclasses.field(default_factory=list)
  unused_rules: list = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    lines = []
    for title, d in (("quantized", self.quantized), ("intercepted", self.intercepted),
                     ("skipped", self.skipped), ("failed", self.failed)):
      for p, what in d.items():
        lines.append(f"{title:12s} {p or '<root>'}: {what}")
    for p in self.unmatched:
      lines.append(f"{'unmatched':12s} {p or '<root>'}")
    for r in self.unused_rules:
      lines.append(f"{'unused rule':12s} {r.pattern!r}")
    return "\n".join(lines)


def path_str(path: Sequence) -> str:
  """Joins NNX path parts with ``/``.

  Examples:
    >>> path_str(("layers", 0, "linear"))
    'layers/0/linear'
  """
  return "/".join(str(p) for p in path)


_CONTAINERS = (nnx.Dict, nnx.List, nnx.Sequential)


def _has_own_call(node) -> bool:
  for c in type(node).__mro__:
    if c in (nnx.Module, nnx.Pytree, object):
      return False
    if "__call__" in vars(c):
      return True
  return False


def _own_params(node) -> list[tuple[tuple, nnx.Param]]:
  """Params held by ``node`` directly or through nnx.List/nnx.Dict attributes."""
  out = []

  def visit(obj, prefix):
    for key, child in nnx.iter_children(obj):
      if isinstance(child, nnx.Param) and not isinstance(child, QuantParam):
        out.append(((*prefix, key), child))
      elif isinstance(child, (nnx.List, nnx.Dict)):
        visit(child, (*prefix, key))

  visit(node, ())
  return out


def _known_stack_ndim(node, path: str) -> int:
  """Leading stacked axes of a Flax layer's weight, from its configuration."""
  t = type(node)
  if t is nnx.Embed:
    w, want = node.embedding, (node.num_embeddings, node.features)
  elif t is nnx.Linear:
    w, want = node.kernel, (node.in_features, node.out_features)
  elif t is nnx.LinearGeneral:
    w = node.kernel
    want = (*node.batch_axis.values(), *node.in_features, *node.out_features)
  else:  # Conv, Einsum
    w, want = node.kernel, tuple(node.kernel_shape)
  shape = tuple(w.shape)
  k = len(shape) - len(want)
  if k < 0 or tuple(shape[k:]) != tuple(want):
    raise ValueError(f"layer '{path}': {t.__name__} weight of shape {shape} does not match its "
                     f"configuration {tuple(want)} (even with leading stacked axes)")
  return k


def _match_stacked(stacked, path: str) -> Optional[int]:
  if not stacked:
    return None
  for pattern, k in stacked.items():
    if re.fullmatch(pattern, path):
      if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"stacked[{pattern!r}]: must be a non-negative int, got {k!r}")
      return k
  return None


def quantize(
    model: nnx.Module,
    rules: Union[core.RuleSet, Sequence[core.Rule], core.Rule, None] = None,
    *,
    stacked: Optional[Mapping[str, int]] = None,
    return_report: bool = False,
):
  """Converts an NNX model to a quantization-aware model, in place.

  Flax layers (``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``,
  ``Embed``) become their quantized subclasses; other modules with their
  own weights are intercepted (see the module docstring). Weights are
  kept (same ``Variable`` objects, same arrays). All quantizers start in
  ``"calibrate"`` mode: run :func:`calibrate` (or :func:`freeze` for
  weight-only specs) before training or inference.

  A weight spec with ``granularity=PerOutputChannel()`` (the default, see
  :func:`per_output_channel`) is resolved per layer: for Flax's layers to
  the weight axes that the layer's op does not contract (last kernel axis
  of ``Linear``/``Conv``, batch and output axes of ``LinearGeneral``, the
  ``Einsum`` kernel axes in its output, the rows of an ``Embed`` table);
  for intercepted modules, whose quantizers are made before their ops are
  seen, to the **last axis** of each weight (the Linen front end resolves
  those per op as well). The quantizers and checkpoints hold the resolved
  ``PerChannel`` spec.

  Args:
    model: the NNX model (any graph of modules).
    rules: a :class:`jaxqat.core.RuleSet`, a list of :class:`jaxqat.core.Rule`
      or one Rule; ``None`` gives :func:`default_rules` (W8A8). Patterns are
      matched against the layer paths (see the module docstring).
    stacked: optional ``{path_regex: n}``: the number of leading stacked
      axes of the matching intercepted modules, when it cannot be inferred
      from stacked Flax layers around them.
    return_report: also return a :class:`QuantizationReport`.

  Returns:
    ``model`` (converted in place), or ``(model, report)``.

  Raises:
    TypeError: if ``model`` is not an NNX module or ``rules`` are not Rules.
    ValueError: if a spec does not fit a layer (per-channel axis out of
      range, block size not dividing the axis...), naming the layer path;
      or if the model holds quantized layers already.

  Warns:
    UnusedRuleWarning: for each rule that matched no layer.
    QuantizationWarning: for each layer that matched but was not quantized.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> model, report = quantize(model, [Rule(pattern=".*", weight=QuantSpec(format="int4"))],
    ...                          return_report=True)
    >>> sorted(report.quantized)
    ['layers/0', 'layers/2']
    >>> type(model.layers[0]).__name__
    'QuantLinear'
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  ruleset = rules_lib.as_ruleset(rules, default_rules())
  report = QuantizationReport()

  # Collect modules (first path of each), leaving jaxqat's own quantizers out.
  modules: list[tuple[tuple, nnx.Module]] = []
  quant_prefixes: list[tuple] = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer):
      quant_prefixes.append(tuple(path))
    if isinstance(node, nnx.Module):
      modules.append((tuple(path), node))
  modules.sort(key=lambda pn: (len(pn[0]), path_str(pn[0])))  # parents first
  inside_quant = lambda p: any(p[:len(q)] == q for q in quant_prefixes)
  modules = [(p, n) for p, n in modules if not inside_quant(p)]

  # Params per path, to infer stacking of intercepted modules.
  all_params = [(tuple(p), v) for p, v in nnx.iter_graph(model)
                if isinstance(v, nnx.Param) and not isinstance(v, QuantParam)
                and not inside_quant(tuple(p))]
  known_stacks: list[tuple[tuple, int, tuple]] = []

  candidates = []
  for path, node in modules:
    p = path_str(path)
    if isinstance(node, (_layers._QuantMixin, _intercept.InterceptMixin)):
      raise ValueError(f"layer '{p}' is quantized already ({type(node).__name__}); quantize a "
                       "float model")
    if isinstance(node, _layers.ActQuant):
      node.quantizer.path = p
      continue
    if type(node) in _layers.QUANT_LAYERS:
      k = _known_stack_ndim(node, p)
      w = node.embedding if type(node) is nnx.Embed else node.kernel
      known_stacks.append((path, k, tuple(w.shape[:k])))
      candidates.append((path, node, "known", k))
    elif isinstance(node, _CONTAINERS) or isinstance(node, Quantizer):
      continue
    else:
      own = _own_params(node)
      if any(v.ndim >= 2 for _, v in own):
        candidates.append((path, node, "foreign", own))

  def infer_stack(path):
    for i in range(len(path), -1, -1):
      prefix = path[:i]
      inner = [(k, ls) for q, k, ls in known_stacks if q[:i] == prefix and k > 0]
      if not inner:
        continue
      k, ls = inner[0]
      params = [v for q, v in all_params if q[:i] == prefix]
      if all(v.ndim >= k and tuple(v.shape[:k]) == ls for v in params):
        return k
    return 0

  for path, node, kind, extra in candidates:
    p = path_str(path)
    shown = p or "<root>"
    if kind == "foreign":
      # Weights are the parameters of rank >= 2 once the stacked axes are set aside.
      k = _match_stacked(stacked, p)
      k = infer_stack(path) if k is None else k
      extra = [(n, v) for n, v in extra if v.ndim - k >= 2]
      if not extra:
        continue
    rule = ruleset.match(p)
    if rule is None:
      report.unmatched.append(p)
      continue
    if rule.skip or (rule.weight is None and rule.act is None):
      report.skipped[p] = "skip rule" if rule.skip else "rule without weight/act spec"
      continue
    if kind == "known":
      qcls = _layers.QUANT_LAYERS[type(node)]
      if type(node) is nnx.Embed and rule.act is not None:
        pass  # the act spec quantizes the query of Embed.attend only (documented)
      qcls.from_float(node, rule.weight, rule.act, path=shown, stack_ndim=extra)
      report.quantized[p] = _describe(node)
    else:
      if not _has_own_call(node):
        msg = (f"jaxqat: layer '{shown}' ({type(node).__name__}) matched rule {rule.pattern!r} but "
               "has no __call__ to intercept; its parameters stay in float")
        warnings.warn(msg, QuantizationWarning, stacklevel=2)
        report.failed[p] = "no __call__ to intercept"
        continue
      float_own = [(k, v) for k, v in extra if jnp.issubdtype(v.dtype, jnp.floating)]
      if len(float_own) < len(extra):
        bad = [path_str(k) for k, v in extra if not jnp.issubdtype(v.dtype, jnp.floating)]
        warnings.warn(f"jaxqat: layer '{shown}': non-float parameters {bad} are not quantized",
                      QuantizationWarning, stacklevel=2)
      if not float_own:
        report.failed[p] = "no floating point parameters"
        continue
      _intercept.intercept(node, float_own, rule.weight, rule.act, path=shown, stack_ndim=k)
      report.intercepted[p] = _intercept.describe(node)
  report.unused_rules = ruleset.warn_unused("NNX model")
  return (model, report) if return_report else model


def _describe(layer) -> str:
  parts = [type(layer).__name__]
  wq = getattr(layer, layer.quant_attr)
  if wq is not None:
    parts.append(f"weight {wq.describe()}")
  if layer.input_quant is not None:
    parts.append(f"input {layer.input_quant.describe()}")
  if layer.jaxqat_stack:
    parts.append(f"stacked {layer.jaxqat_stack}")
  return ", ".join(parts)
