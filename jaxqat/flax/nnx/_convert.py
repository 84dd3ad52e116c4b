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
* any other module with its own ``nnx.Param`` of rank >= 2 (held directly or
  in ``nnx.List``/``nnx.Dict`` attributes) is *intercepted*
  (:mod:`jaxqat.flax.nnx._intercept`): the matmuls and convolutions that its
  ``__call__`` (or, without ``__call__``, its public methods; or the methods
  named by ``quantize(..., methods=...)``) runs on those parameters are
  quantized. This covers modules from other libraries and Flax layers
  without a dedicated class (``ConvTranspose``, ``LoRA`` ...).
* a module named in ``methods`` is intercepted even without weights of its
  own: it quantizes the weights of its quantized layers that it reads
  directly (tied output heads).

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

import re
import warnings
from typing import Mapping, Optional, Sequence, Union

import jax.numpy as jnp
from flax import nnx

from jaxqat import core
from jaxqat.core import _rules as rules_lib
from jaxqat.flax.nnx import _intercept
from jaxqat.flax.nnx import _layers

__all__ = ["quantize", "path_str"]


def path_str(path: Sequence) -> str:
  """Joins NNX path parts with ``/``.

  Examples:
    >>> path_str(("layers", 0, "linear"))
    'layers/0/linear'
  """
  return "/".join(str(p) for p in path)


_CONTAINERS = (nnx.Dict, nnx.List, nnx.Sequential)


def _own_params(node) -> list[tuple[tuple, nnx.Param]]:
  """Params held by ``node`` directly or through nnx.List/nnx.Dict attributes."""
  out = []

  def visit(obj, prefix):
    for key, child in nnx.iter_children(obj):
      if isinstance(child, nnx.Param):
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




def _match_methods(methods, path: str) -> Optional[tuple[str, ...]]:
  if not methods:
    return None
  for pattern, names in methods.items():
    if re.fullmatch(pattern, path):
      names = (names,) if isinstance(names, str) else tuple(names)
      if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"methods[{pattern!r}]: must be a method name or a sequence of names, "
                         f"got {names!r}")
      return names
  return None


def is_quantized(model: nnx.Module) -> bool:
  """Whether ``model`` went through :func:`quantize` (or holds quantized layers)."""
  if hasattr(model, "jaxqat_layers"):
    return True
  return any(isinstance(node, (_layers._QuantMixin, _intercept.InterceptMixin))  # pylint: disable=protected-access
             for _, node in nnx.iter_graph(model))


def quantize(
    model: nnx.Module,
    rules: Union[core.RuleSet, Sequence[core.Rule], core.Rule, None] = None,
    *,
    stacked: Optional[Mapping[str, int]] = None,
    methods: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
) -> nnx.Module:
  """Converts an NNX model to a quantization-aware model, in place.

  Flax layers (``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``,
  ``Embed``) become their quantized subclasses; other modules with their
  own weights are intercepted (see the module docstring and
  :mod:`jaxqat.flax.nnx._intercept`). Weights are kept (same ``Variable``
  objects, same arrays): the object you pass *is* the quantized model; to
  keep a float copy, quantize ``nnx.clone(model)``.

  The model is usable right away in ``"quant"`` mode when the rules only
  quantize weights (fixed-range weight ranges track the weights; learned
  step sizes start from the current weights). Activation quantizers need
  :func:`calibrate`: running the model before raises a ``ValueError`` naming
  the layer.

  A weight spec with ``PerOutputChannel()`` (the default) is resolved to the
  weight axes that the layer's op does not contract: the last kernel axis of
  ``Linear``/``Conv``, the batch and output axes of ``LinearGeneral``, the
  ``Einsum`` kernel axes in its output, the rows of an ``Embed`` table; for
  intercepted modules, per op (see :mod:`jaxqat.flax.nnx._intercept`).

  Args:
    model: the NNX model (any graph of modules), not quantized yet.
    rules: a :class:`jaxqat.core.RuleSet`, a list of :class:`jaxqat.core.Rule`
      or one Rule; ``None`` gives :func:`jaxqat.core.default_rules` (W8A8).
      Patterns are matched against the layer paths (see the module
      docstring).
    stacked: optional ``{path_regex: n}``: the number of leading stacked
      axes of the matching intercepted modules, when it cannot be inferred
      from stacked Flax layers around them.
    methods: optional ``{path_regex: name or names}``: intercept these
      methods of the matching modules (instead of ``__call__``, or of every
      public method for a module with weights and no ``__call__``). A
      module matched here is intercepted even without weights of its own: it
      then quantizes the weights of its quantized layers that it reads
      directly, e.g. a root module computing ``h @ self.embed.embedding.T``
      (a tied output head): ``methods={"": "__call__"}``.

  Returns:
    ``model`` (converted in place).

  Raises:
    TypeError: if ``model`` is not an NNX module or ``rules`` are not Rules.
    ValueError: if ``model`` is quantized already; if a spec does not fit a
      layer (per-channel axis out of range, block size not dividing the
      axis...), naming the layer path; for a bad ``stacked``/``methods``.

  Warns:
    QuantizationWarning: for each rule that matched no layer, for each layer
      that matched but could not be quantized, and when no layer at all was
      quantized.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> model = quantize(model, [Rule(pattern=".*", weight=QuantSpec(format="int4"))])
    >>> type(model.layers[0]).__name__, model(jnp.ones((1, 4))).shape
    ('QuantLinear', (1, 2))
    >>> quantize(model)
    Traceback (most recent call last):
    ...
    ValueError: model: the model is quantized already (quantize() converts in place); quantize a float model, e.g. nnx.clone of the float model taken before quantize
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  if methods is not None and not isinstance(methods, Mapping):
    raise TypeError(f"methods: expected a mapping {{path_regex: method names}}, got "
                    f"{type(methods).__name__}")
  if is_quantized(model):
    raise ValueError("model: the model is quantized already (quantize() converts in place); "
                     "quantize a float model, e.g. nnx.clone of the float model taken before "
                     "quantize")
  ruleset = rules_lib.as_ruleset(rules, core.default_rules())
  entries: list[tuple] = []

  modules: list[tuple[tuple, nnx.Module]] = [
      (tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)]
  modules.sort(key=lambda pn: (len(pn[0]), path_str(pn[0])))  # parents first
  all_params = [(tuple(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
  known_stacks: list[tuple[tuple, int, tuple]] = []

  candidates = []
  for path, node in modules:
    p = path_str(path)
    if isinstance(node, _layers.ActQuant):
      node.quantizer.path = p
      continue
    own = _own_params(node)
    if type(node) in _layers.QUANT_LAYERS:
      k = _known_stack_ndim(node, p)
      w = node.embedding if type(node) is nnx.Embed else node.kernel
      known_stacks.append((path, k, tuple(w.shape[:k])))
      candidates.append((path, node, "known", k, own))
    elif isinstance(node, _CONTAINERS):
      continue
    else:
      candidates.append((path, node, "foreign", None, own))

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

  def entry(p, node, status, rule=None, reason=""):
    t = getattr(type(node), "jaxqat_float_type", None) or getattr(type(node), "float_type", None)
    name = t.__name__ if t is not None and t is not nnx.Module else type(node).__name__
    entries.append((p, name, status, rule.pattern if rule else None, reason))

  for path, node, kind, k, own in candidates:
    p = path_str(path)
    shown = p or "<root>"
    names = _match_methods(methods, p)
    weights = []
    if kind == "foreign":
      k = _match_stacked(stacked, p)
      k = infer_stack(path) if k is None else k
      weights = [(n, v) for n, v in own if v.ndim - k >= 2]
      if not weights:
        if names is not None:  # reads the weights of its quantized layers
          _intercept.intercept(node, [], None, None, path=shown, methods=names)
        elif own:
          entry(p, node, "unsupported", reason="no matmul weight (parameters of rank < 2)")
        continue
    rule = ruleset.match(p)
    if rule is None:
      entry(p, node, "unmatched", reason="no rule matched")
      continue
    if rule.skip or (rule.weight is None and rule.act is None):
      entry(p, node, "skipped", rule, "skip rule" if rule.skip else "rule without weight/act spec")
      continue
    if kind == "known":
      _layers.QUANT_LAYERS[type(node)].from_float(node, rule.weight, rule.act, path=shown,
                                                  stack_ndim=k, compute=rule.compute)
      entry(p, node, "quantized", rule)
      continue
    float_w = [(n, v) for n, v in weights if jnp.issubdtype(v.dtype, jnp.floating)]
    if len(float_w) < len(weights):
      bad = [path_str(n) for n, v in weights if not jnp.issubdtype(v.dtype, jnp.floating)]
      warnings.warn(f"jaxqat: layer '{shown}': non-float parameters {bad} are not quantized",
                    core.QuantizationWarning, stacklevel=2)
    if not float_w:
      entry(p, node, "failed", rule, "no floating point parameters")
      continue
    methods_here = names if names is not None else _intercept.default_methods(type(node))
    if not methods_here:
      msg = (f"jaxqat: layer '{shown}' ({type(node).__name__}) matched rule {rule.pattern!r} but "
             "has no __call__ and no public method to intercept; its parameters stay in float "
             "(pass methods={path: names})")
      warnings.warn(msg, core.QuantizationWarning, stacklevel=2)
      entry(p, node, "failed", rule, "no method to intercept")
      continue
    also = _intercept.secondary_methods(type(node)) if names is None else ()
    _intercept.intercept(node, float_w, rule.weight, rule.act, path=shown, stack_ndim=k,
                         methods=methods_here, also=also, compute=rule.compute)
    how = "intercepted " + ", ".join(methods_here) + ("; also " + ", ".join(also) if also else "")
    entry(p, node, "quantized", rule, how)
  unused = ruleset.warn_unused("NNX model")
  model.jaxqat_layers = tuple(entries)
  from jaxqat.flax.nnx import _sharding  # pylint: disable=import-outside-toplevel
  _sharding.follow_weight_shardings(model)  # annotated weights: their scales follow
  model.jaxqat_unused_rules = tuple(r.pattern for r in unused)
  if not any(e[2] == "quantized" for e in entries):
    warnings.warn("jaxqat: no layer of the model was quantized (no rule matched a layer with "
                  "weights, or every match was skipped); see jaxqat.flax.nnx.report(model)",
                  core.QuantizationWarning, stacklevel=2)
  return model
