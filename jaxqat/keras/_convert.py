"""quantize: turns a float Keras model into a quantization-aware one.

How the model is converted (the report says which path each layer took):

* **Sequential and Functional models are copied** (the original is
  untouched): each supported layer becomes its quantized class
  (:mod:`jaxqat.keras._layers`) with the float weights, a Conv/DepthwiseConv
  whose only consumer is a BatchNormalization becomes one
  :class:`QuantConvBatchNorm`, op nodes (``h + 3.0``, ``keras.ops`` calls) are
  kept, and every other layer is re-created from its config. When a layer
  cannot be re-created from its config (a third-party layer whose
  ``get_config()`` holds a key its ``__init__`` does not take), the copy is
  abandoned and the model is **converted in place** instead, with a
  :class:`~jaxqat.core.QuantizationWarning`.
* **Functional subclasses** (a model-zoo backbone) are rebuilt through their
  own class (``type(model).from_config(model.get_config())``, float weights
  copied), so the copy is still an instance of that class, then converted in
  place; if the class cannot be rebuilt, the model itself is converted in
  place.
* **Subclassed models are converted in place** (``quantize`` returns the
  object it was given).
* Layers **inside** other layers (MultiHeadAttention's projections, the
  sublayers of a transformer block or of a subclassed model) are always
  converted in place: the layer object stays where it is and its class
  becomes the quantized class (:func:`jaxqat.keras._layers.quantize_in_place`),
  so nothing needs rewiring, third-party parents included.

Conversions in place are recorded in the model's saved config (the specs and
the locator of each layer, see :mod:`jaxqat.keras._saving`), so a ``.keras``
file reloads the quantized model.

Layer paths, matched by the rules: a layer's name, prefixed by the names of
the models / layers that contain it, joined by ``/`` (``"encoder/mha/query"``).
"""

from __future__ import annotations

import warnings
from typing import Sequence, Union

from jaxqat.core import _defaults
from jaxqat.core import _rules as rules_lib
from jaxqat.core._report import QuantizationWarning
from jaxqat.core._serialize import spec_to_dict
from jaxqat.keras import _fold
from jaxqat.keras import _graph
from jaxqat.keras import _layers
from jaxqat.keras import _saving
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import to_numpy

__all__ = ["quantize", "quant_layers", "copy_weights"]

_QUANT = _fold.QUANT  # quantized layers (QuantLayer, QuantConvBatchNorm)


def _is_model(layer) -> bool:
  return isinstance(layer, keras.Model)


def _is_plain_graph(model) -> bool:
  from keras.src.models.functional import Functional
  return type(model) in (keras.Sequential, Functional)


def _rel_path(var, layer) -> str:
  prefix = (getattr(layer, "path", None) or layer.name) + "/"
  return var.path[len(prefix):] if var.path.startswith(prefix) else var.path


def copy_weights(src, dst) -> None:
  """Copies every float variable of ``src`` into the same-named one of ``dst``.

  Variables are matched by their path relative to the layer (``kernel``,
  ``query/bias``...); ``dst`` may have more (the quantizer state). When the
  paths differ only by the names Keras gave sublayers (``dense_3`` in one,
  ``dense_4`` in the other) and both hold the same variables in the same
  order, they are matched by position.

  Raises:
    ValueError: if a variable of ``src`` has no counterpart of the same shape.
  """
  targets = {_rel_path(v, dst): v for v in dst.weights}
  pairs = []
  for v in src.weights:
    key = _rel_path(v, src)
    t = targets.get(key)
    if t is None or tuple(t.shape) != tuple(v.shape):
      if [tuple(w.shape) for w in src.weights] == [tuple(w.shape) for w in dst.weights]:
        pairs = list(zip(src.weights, dst.weights))  # same variables, other sublayer names
        break
      raise ValueError(f"layer {src.name!r}: cannot copy variable {key!r} "
                       f"(shape {tuple(v.shape)}) into {type(dst).__name__} {dst.name!r}")
    pairs.append((v, t))
  for v, t in pairs:
    t.assign(to_numpy(v))  # a copy: JAX may donate buffers


class _NoCopy(Exception):
  """A layer of a Sequential/Functional model cannot be re-created from its config."""


class _Context:

  def __init__(self, rules, fold_batchnorm):
    self.rules = rules
    self.fold = fold_batchnorm
    self.observe = None
    self.how_model = "copied"  # how the model to convert was obtained (see _target)
    self.how = {}        # id(layer) -> how it was quantized ("copied as ...", "folded with ...")
    self.notes = {}      # id(layer) -> why it stays float
    self.pairs = []      # (src, dst) for weight copies after the build
    self.in_place = []   # record entries of the layers converted in place
    self.in_place_layers = []
    self.copied = []     # (src, dst, path): layers re-created from their config
    self.paths = {}      # id(layer in the copy) -> its path in the original model

  def path_of(self, layer, path):
    """The path of ``layer`` in the model given to quantize (a copy's sublayers may have
    other auto-generated names than the original's: the rules see the original's)."""
    return self.paths.get(id(layer), path)

  def map_paths(self):
    """Maps every sublayer of a re-created layer to the path of its original."""
    for src, dst, path in self.copied:
      names = {repr(loc): p for loc, p, _ in _graph.walk(src)}
      for loc, p, sub in _graph.walk(dst):
        self.paths[id(sub)] = f"{path}/{names.get(repr(loc), p)}"

  def reset(self):
    self.how.clear()
    self.pairs.clear()
    self.copied.clear()

  def specs_for(self, layer, path):
    """(weight_spec, act_spec) for a supported layer, or None to keep it float."""
    rule = self.rules.match(path)
    if rule is None or rule.skip or (rule.weight is None and rule.act is None):
      return None
    return rule.weight, rule.act

  def compute_for(self, layer, path, qcls) -> str:
    """The rule's compute mode for ``layer``, checked (raised, not reported, if impossible)."""
    rule = self.rules.match(path)
    compute = rule.compute
    _layers.check_compute(qcls, layer, weight_spec=rule.weight, act_spec=rule.act,
                          compute=compute, where=f"layer {path!r}")
    return compute

  def quant_layer(self, layer, path):
    """A new quantized layer for ``layer`` (unbuilt) or None."""
    qcls = _layers.quantized_class(type(layer))
    if qcls is None:
      return None
    specs = self.specs_for(layer, path)
    if specs is None:
      return None
    config = layer.get_config()
    config.update(weight_spec=specs[0], act_spec=specs[1], observe=self.observe,
                  compute=self.compute_for(layer, path, qcls))
    try:
      new = qcls.from_config(config)
    except Exception as e:  # a derived key in a third-party config, say
      raise _NoCopy(f"layer {path!r} ({type(layer).__name__}) cannot be re-created from its "
                    f"config ({type(e).__name__}: {str(e)[:200]})") from e
    self.how[id(new)] = f"copied as {qcls.__name__}"
    return new


def _fusable_pairs(model, ctx, prefix):
  """conv -> bn pairs in a functional graph where bn is the conv's only consumer."""
  pairs = {}
  if not ctx.fold:
    return pairs
  outputs = {id(t) for t in keras.tree.flatten(model.outputs)}
  for layer in model.layers:
    if not isinstance(layer, keras.layers.BatchNormalization):
      continue
    nodes = layer._inbound_nodes
    if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
      continue
    src_tensor = nodes[0].input_tensors[0]
    conv = src_tensor._keras_history.operation
    if not isinstance(conv, keras.layers.Layer) or _fold.can_fold(conv, layer) is not None:
      continue
    if len(conv._inbound_nodes) != 1 or len(conv._outbound_nodes) != 1:
      continue
    if id(src_tensor) in outputs:
      continue
    if ctx.specs_for(conv, prefix + conv.name) is None:
      continue
    pairs[id(conv)] = layer
  return pairs


def _make_fused(conv, bn, ctx, path):
  weight, act = ctx.specs_for(conv, path)
  if ctx.rules.match(path).compute != "fake":
    raise _layers.ComputeModeError(
        f"layer {path!r}: compute='integer' cannot run a Conv folded with its BatchNormalization "
        "(QuantConvBatchNorm has no integer forward); quantize with fold_batchnorm=False")
  fused = _fold.QuantConvBatchNorm(conv, bn, weight_spec=weight, act_spec=act,
                                   observe=ctx.observe, name=conv.name)
  ctx.how[id(fused)] = "copied as QuantConvBatchNorm"
  return fused


def _clone_leaf(layer, ctx, prefix):
  if not isinstance(layer, keras.layers.Layer):
    return layer  # an op node (h + 3.0, a keras.ops call): stateless, shared by both graphs
  path = prefix + layer.name
  if _is_model(layer):
    return _convert_model(layer, ctx, path + "/")
  if isinstance(layer, keras.layers.InputLayer):
    return layer
  new = ctx.quant_layer(layer, path)
  if new is None:
    try:
      new = layer.__class__.from_config(layer.get_config())
    except Exception as e:  # a derived key in a third-party config, say
      raise _NoCopy(f"layer {path!r} ({type(layer).__name__}) cannot be re-created from its "
                    f"config ({type(e).__name__}: {str(e)[:200]})") from e
    ctx.copied.append((layer, new, path))
  ctx.pairs.append((layer, new))
  return new


def _convert_sequential(model, ctx, prefix):
  layers = list(model.layers)
  new_layers = []
  i = 0
  while i < len(layers):
    layer = layers[i]
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    if (ctx.fold and nxt is not None and _fold.can_fold(layer, nxt) is None
        and ctx.specs_for(layer, prefix + layer.name) is not None):
      fused = _make_fused(layer, nxt, ctx, prefix + layer.name)
      ctx.pairs.append((layer, fused.conv))
      ctx.pairs.append((nxt, fused.bn))
      new_layers.append(fused)
      i += 2
      continue
    new_layers.append(_clone_leaf(layer, ctx, prefix))
    i += 1
  inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
  new = keras.Sequential([*inputs, *new_layers], name=model.name)
  return new


def _convert_functional(model, ctx, prefix):
  pairs = _fusable_pairs(model, ctx, prefix)
  bn_ids = {id(bn) for bn in pairs.values()}
  skipped_bn = set()

  def clone_fn(layer):
    if id(layer) in pairs:
      bn = pairs[id(layer)]
      fused = _make_fused(layer, bn, ctx, prefix + layer.name)
      ctx.pairs.append((layer, fused.conv))
      ctx.pairs.append((bn, fused.bn))
      return fused
    if id(layer) in bn_ids:
      marker = keras.layers.Identity(name=layer.name)
      skipped_bn.add(id(marker))
      return marker
    return _clone_leaf(layer, ctx, prefix)

  def call_fn(layer, *args, **kwargs):
    if id(layer) in skipped_bn:
      return args[0]
    return layer(*args, **kwargs)

  return keras.models.clone_model(model, clone_function=clone_fn, call_function=call_fn)


def _convert_model(model, ctx, prefix):
  """A converted copy of a Sequential/Functional model (nested ones: same), else _NoCopy."""
  if isinstance(model, keras.Sequential) and _is_plain_graph(model):
    return _convert_sequential(model, ctx, prefix)
  if _is_plain_graph(model):
    return _convert_functional(model, ctx, prefix)
  why = "a subclassed model is converted in place"
  try:
    new = _rebuild(model) if _graph.is_functional(model) else None
  except Exception as e:  # noqa: BLE001 - any failure of a foreign class: no copy
    new, why = None, f"{type(e).__name__}: {str(e)[:200]}"
  if new is None:
    raise _NoCopy(f"nested model {prefix[:-1]!r} ({type(model).__name__}) cannot be copied "
                  f"({why})")
  ctx.how[id(new)] = f"rebuilt as {type(model).__name__}"
  return new


def _rebuild(model):
  """A float copy of a Functional subclass through its own class (its config, its weights)."""
  cls = type(model)
  new = cls.from_config(model.get_config())
  src, dst = model.weights, new.weights
  if [tuple(v.shape) for v in src] != [tuple(v.shape) for v in dst]:
    raise ValueError(f"{cls.__name__}.from_config(get_config()) gives a model with other weights")
  for s, d in zip(src, dst):
    d.assign(to_numpy(s))
  return new


def _target(model, ctx):
  """The model to convert in place (a copy where possible) and how it was obtained."""
  if _is_plain_graph(model):
    try:
      new = _convert_model(model, ctx, "")
    except _NoCopy as e:
      ctx.reset()
      return model, f"converted in place: the model could not be copied ({e})"
    for src, dst in ctx.pairs:
      if dst.built and src.built and src.weights:
        copy_weights(src, dst)
    ctx.map_paths()
    for layer in quant_layers(new):
      layer.init_weight_ranges()
    return new, "copied"
  if _graph.is_functional(model):
    try:
      return _rebuild(model), f"rebuilt as {type(model).__name__} and converted in place"
    except Exception as e:  # noqa: BLE001 - any failure of a foreign class: convert in place
      return model, (f"converted in place: {type(model).__name__} could not be rebuilt from its "
                     f"config ({type(e).__name__}: {str(e)[:200]})")
  return model, "converted in place (subclassed model)"


def _in_place_class(layer):
  cls = type(layer)
  if _layers.quantized_class(cls) is not None:
    return True
  return _layers.gathered_class(cls) is not None and bool(_layers.gathered_weights(layer))


def _convert_in_place(root, ctx, how):
  """Quantizes, in place, every supported layer under ``root`` that is still float."""
  for loc, path, layer in _graph.walk(root, stop=_fold.quant_leaf):
    if isinstance(layer, _QUANT) or not _in_place_class(layer):
      continue
    path = ctx.path_of(layer, path)
    specs = ctx.specs_for(layer, path)
    if specs is None:
      continue
    if not layer.built:
      ctx.notes[id(layer)] = ("failed", "it is not built (never called), so its weights do not "
                              "exist yet")
      continue
    qcls = _layers.quantized_class(type(layer)) or _layers.gathered_class(type(layer))
    compute = ctx.compute_for(layer, path, qcls)
    try:
      _layers.quantize_in_place(layer, *specs, observe=ctx.observe, compute=compute)
    except _layers.ComputeModeError:
      raise
    except (TypeError, ValueError) as e:
      ctx.notes[id(layer)] = ("failed", str(e))
      continue
    ctx.how[id(layer)] = how
    ctx.in_place.append({"at": loc, "path": path, "weight": spec_to_dict(specs[0]),
                         "act": spec_to_dict(specs[1]), "compute": compute})
    ctx.in_place_layers.append(layer)


def _float_status(root, loc, path, layer, ctx):
  """(status, reason, rule pattern) of a layer with weights that stays float."""
  rule = ctx.rules.match(path)
  pattern = None if rule is None else rule.pattern
  if id(layer) in ctx.notes:
    status, reason = ctx.notes[id(layer)]
    return status, reason, pattern
  if _in_place_class(layer):
    if rule is None:
      return "unmatched", "no rule matches its path", None
    return "skipped", "its rule keeps it float", pattern
  name = type(layer).__name__
  if isinstance(layer, keras.layers.BatchNormalization):
    parent = _graph.locate(root, loc[:-1]) if len(loc) > 1 else root
    if not (isinstance(parent, keras.Sequential) or _graph.is_functional(parent)):
      return "unsupported", (
          f"not folded: it sits inside {type(parent).__name__} {parent.name!r}, whose call graph "
          "jaxqat cannot see (Conv+BatchNorm pairs are folded in Sequential/Functional graphs); "
          "the convolution before it is quantized unfolded"), pattern
    if not ctx.fold:
      return "unsupported", "normalization (no matmul), not folded: fold_batchnorm=False", pattern
    if ctx.how_model != "copied":
      return "unsupported", ("normalization (no matmul), not folded: the model was converted in "
                             "place, and folding rewires the graph (done only in copies)"), pattern
    return "unsupported", ("normalization (no matmul), not folded: its input is not the only "
                           "output of a foldable convolution"), pattern
  if "Normalization" in name:
    return "unsupported", "normalization (no matmul): kept float", pattern
  return "unsupported", f"{name} has no quantized version", pattern


def _statuses(root, ctx, how):
  """The record entries of every layer with weights (quantized or not)."""
  out = []
  items = [([], "", root)] if _graph.own_weights(root) else []
  items += list(_graph.walk(root, stop=_fold.quant_leaf))
  for loc, path, layer in items:
    path = ctx.path_of(layer, path)
    rule = ctx.rules.match(path)
    if isinstance(layer, _QUANT):
      reason = ctx.how.get(id(layer), how)
      if isinstance(layer, _fold.QuantConvBatchNorm):
        reason = f"folded with {layer.bn.name}; {reason}"
      out.append({"at": loc, "path": path, "type": _layers.float_class(layer).__name__,
                  "status": "quantized", "reason": reason,
                  "rule": None if rule is None else rule.pattern})
    elif _graph.own_weights(layer):
      status, reason, pattern = _float_status(root, loc, path, layer, ctx)
      out.append({"at": loc, "path": path, "type": type(layer).__name__, "status": status,
                  "reason": reason, "rule": pattern})
  return out


def quant_layers(model) -> list:
  """All quantized layers (QuantLayer, QuantConvBatchNorm) of a model, nested ones included.

  Examples:
    >>> import keras
    >>> m = quantize(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    >>> [type(l).__name__ for l in quant_layers(m)]
    ['QuantDense']
  """
  return [layer for _, _, layer in _graph.walk(model, stop=_fold.quant_leaf)
          if isinstance(layer, _QUANT)]


def _check_float(model):
  if _saving.record_of(model) is not None:
    raise ValueError(f"model: {model.name!r} is quantized already (by jaxqat.keras.quantize); "
                     "quantize the float model instead (jaxqat.keras.set_mode(model, 'float') "
                     "runs this one in float)")
  for _, path, layer in _graph.walk(model, stop=_fold.quant_leaf):
    if isinstance(layer, _QUANT):  # a standalone Quantizer layer is the user's, not ours
      raise ValueError(f"model: {model.name!r} is quantized already (layer {path!r} is a "
                       f"{type(layer).__name__}); quantize the float model instead")


def quantize(model, rules: Union[rules_lib.RuleSet, Sequence[rules_lib.Rule], rules_lib.Rule,
                                 None] = None, *, fold_batchnorm: bool = True):
  """Makes a built Keras model quantization-aware (see the module doc for how).

  Sequential and Functional models are copied with their float weights (the
  original is untouched) unless a layer cannot be re-created from its config;
  Functional subclasses are rebuilt through their own class; subclassed
  models are converted in place and returned. Weight ranges are set from the
  float weights; activation ranges need :func:`jaxqat.keras.calibrate`.

  Quantized: Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv1D/2D,
  SeparableConv1D/2D, Embedding and their subclasses, wherever they are
  (inside MultiHeadAttention, transformer blocks, subclassed models); Conv+
  BatchNorm pairs of a Sequential/Functional graph are folded
  (:class:`QuantConvBatchNorm`); embedding-like layers of other libraries
  (a class name containing ``Embedding`` with a table it slices) get their
  tables fake-quantized per row when read. Every layer with weights, quantized
  or not, is in :func:`jaxqat.keras.report` with the reason.

  Args:
    model: a built ``keras.Model``.
    rules: rules selecting layers by path (``re.fullmatch``, first match
      wins). ``None``: :func:`jaxqat.core.default_rules` (W8A8: int8 narrow
      symmetric weights per output channel, int8 affine per-tensor inputs).
    fold_batchnorm: fold Conv+BatchNorm pairs.

  Returns:
    The quantized model: a copy of the same class for Sequential/Functional
    models (and Functional subclasses that rebuild from their config), else
    ``model`` itself. Its class is a subclass of the original's that records
    the conversion in the saved config.

  Raises:
    TypeError: if ``model`` is not a ``keras.Model`` or ``rules`` hold
      something other than Rules.
    ValueError: if the model is not built, or is quantized already.
      Also (a ``ComputeModeError``) if a rule asks for ``compute="integer"``
      on a layer that cannot run it: the message names the layer and why
      (see :class:`jaxqat.keras.QuantLayer`).

  Warns:
    QuantizationWarning: for rules that matched no layer, layers with
      weights left float for want of a quantized version, a model in which
      nothing was quantized, and a Sequential/Functional model (or
      Functional subclass) converted in place because it could not be
      copied (the float model given is then the quantized one).

  Examples:
    >>> import keras
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="hidden"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> q = quantize(model, [Rule(pattern="head", skip=True),
    ...                      Rule(pattern=".*", weight=QuantSpec(format="int4"))])
    >>> [type(l).__name__ for l in q.layers]
    ['QuantDense', 'Dense']
    >>> q = quantize(model)  # default_rules(): W8A8, one scale per output channel
    >>> q.get_layer("hidden").kernel_quantizer.spec.granularity
    PerChannel(axis=1)
    >>> from jaxqat.keras import report
    >>> isinstance(q, keras.Sequential), report(q)["head"].status
    (True, 'quantized')
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model (Sequential, Functional or subclassed), got "
                    f"{type(model).__name__}")
  if not model.built:
    raise ValueError(f"model: {model.name!r} is not built; call it on a batch or use "
                     "model.build(input_shape) before quantize")
  _check_float(model)
  ruleset = rules_lib.as_ruleset(rules, _defaults.default_rules())
  ctx = _Context(ruleset, fold_batchnorm)
  target, how = _target(model, ctx)
  ctx.how_model = how
  if target is model and (_is_plain_graph(model) or _graph.is_functional(model)):
    warnings.warn(f"jaxqat.keras.quantize: model {model.name!r} was {how}: the float model is "
                  "now the quantized one", QuantizationWarning, stacklevel=2)
  _convert_in_place(target, ctx, "converted in place, inside the copy" if how == "copied" else how)
  unused = [r.pattern for r in ruleset.unused()]
  ruleset.warn_unused(f"Keras model {model.name!r}")
  layers = _statuses(target, ctx, how)
  record = {"version": _saving.RECORD_VERSION, "how": how, "fold_batchnorm": fold_batchnorm,
            "rules": [{"pattern": r.pattern, "weight": spec_to_dict(r.weight),
                       "act": spec_to_dict(r.act), "skip": r.skip, "compute": r.compute}
                      for r in ruleset.rules],
            "in_place": ctx.in_place, "layers": layers, "unused_rules": unused}
  _saving.mark(target, record, ctx.in_place_layers)
  left = [f"{e['path']} ({e['type']}: {e['reason']})" for e in layers
          if e["status"] in ("unsupported", "failed") and "ormalization" not in e["type"]]
  if left:
    warnings.warn("jaxqat.keras.quantize: layers with weights left float: " + "; ".join(left),
                  QuantizationWarning, stacklevel=2)
  if not any(e["status"] == "quantized" for e in layers):
    warnings.warn(f"jaxqat.keras.quantize: no layer of model {model.name!r} was quantized (no "
                  "rule matched a supported layer); see jaxqat.keras.report(model)",
                  QuantizationWarning, stacklevel=2)
  return target
