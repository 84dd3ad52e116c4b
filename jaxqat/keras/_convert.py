"""quantize_model: turns a float Keras model into a quantization-aware one.

* Sequential and Functional models are *cloned* (float weights copied): each
  supported layer becomes its quantized class (:mod:`jaxqat.keras._layers`),
  and a Conv/DepthwiseConv followed by its only consumer, a
  BatchNormalization, becomes one :class:`QuantConvBatchNorm`. Nested
  Sequential/Functional models are converted recursively.
* Subclassed models and layers that hold sublayers (``MultiHeadAttention``,
  a transformer block from another library) are converted *in place*: each
  supported sublayer attribute (or list item) is replaced by its quantized
  version, built with the same shape and the same float weights.

Layer paths, matched by the rules: a layer's name, prefixed by the names of
the models / layers that contain it, joined by ``/`` (``"encoder/mha/query"``).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

from jaxqat.core import _rules as rules_lib
from jaxqat.core import _spec as spec_lib
from jaxqat.keras import _fold
from jaxqat.keras import _layers
from jaxqat.keras._backend import keras

__all__ = ["quantize_model", "default_rules", "UnquantizedLayerWarning", "quant_layers"]


class UnquantizedLayerWarning(UserWarning):
  """A layer with weights was left in float because jaxqat cannot quantize it."""


def default_rules(bits: int = 8) -> list:
  """The default scheme: per-output-channel weights and per-tensor input activations.

  Each layer resolves :class:`~jaxqat.core.PerOutputChannel` to its own
  output-channel axes (see :mod:`jaxqat.keras._layers`): the last kernel axis
  of Dense/Conv, both channel axes of a depthwise kernel, the output axes of
  an EinsumDense kernel, the rows of an Embedding table.

  Args:
    bits: the integer width of both.

  Returns:
    ``[Rule(pattern=".*", weight=int<bits> PerOutputChannel(), act=int<bits> per tensor)]``.

  Examples:
    >>> r, = default_rules()
    >>> r.weight.granularity, r.act.format.name
    (PerOutputChannel(), 'int8')
  """
  return [rules_lib.Rule(
      pattern=".*",
      weight=spec_lib.QuantSpec(format=f"int{bits}", granularity=spec_lib.PerOutputChannel()),
      act=spec_lib.QuantSpec(format=f"int{bits}"))]


_SKIP_ATTRS = frozenset({
    "_layers", "_tracker", "_inbound_nodes", "_outbound_nodes", "_operations", "_functional",
    "_metrics", "_seed_generators", "_trainable_variables", "_non_trainable_variables",
    "_compile_metrics", "_compile_loss", "_loss_tracker", "optimizer", "_input_layers",
    "_output_layers", "_self_setattr_tracking", "_build_shapes_dict",
    "_modules", "_parameters", "_buffers", "_torch_params",  # torch.nn.Module internals
})


def _is_model(layer) -> bool:
  return isinstance(layer, keras.Model)


def _is_functional(model) -> bool:
  from keras.src.models.functional import Functional  # no public alias in Keras 3
  return isinstance(model, Functional) and not isinstance(model, keras.Sequential)


def _has_weights(layer) -> bool:
  return bool(layer.weights)


def _rel_path(var, layer) -> str:
  prefix = (getattr(layer, "path", None) or layer.name) + "/"
  return var.path[len(prefix):] if var.path.startswith(prefix) else var.path


def copy_weights(src, dst) -> None:
  """Copies every float variable of ``src`` into the same-named one of ``dst``.

  Variables are matched by their path relative to the layer (``kernel``,
  ``query/bias``...); ``dst`` may have more (the quantizer state).

  Raises:
    ValueError: if a variable of ``src`` has no counterpart of the same shape.
  """
  targets = {_rel_path(v, dst): v for v in dst.weights}
  for v in src.weights:
    key = _rel_path(v, src)
    t = targets.get(key)
    if t is None or tuple(t.shape) != tuple(v.shape):
      raise ValueError(f"layer {src.name!r}: cannot copy variable {key!r} "
                       f"(shape {tuple(v.shape)}) into {type(dst).__name__} {dst.name!r}")
    t.assign(keras.ops.convert_to_numpy(v.value))  # a copy: JAX may donate buffers


class _Context:

  def __init__(self, rules, fold_batchnorm, observe):
    self.rules = rules
    self.fold = fold_batchnorm
    self.observe = observe
    self.quantized: list[str] = []
    self.fused: list[str] = []
    self.left_float: list[str] = []
    self.in_place: list[str] = []
    self.pairs: list = []  # (src, dst) for weight copies after the build

  # -- decisions ------------------------------------------------------------

  def specs_for(self, layer, path):
    """(weight_spec, act_spec) for a supported layer, or None to keep it float."""
    rule = self.rules.match(path)
    if rule is None or rule.skip or (rule.weight is None and rule.act is None):
      return None
    return rule.weight, rule.act

  def note_unsupported(self, layer, path):
    if not _has_weights(layer):
      return
    rule = self.rules.match(path)
    if rule is not None and rule.skip:
      return
    if type(layer).__name__.endswith("Normalization"):
      return  # normalization layers (no matmul) stay float on purpose
    self.left_float.append(f"{path} ({type(layer).__name__})")

  def quant_layer(self, layer, path):
    """A new quantized layer for ``layer`` (unbuilt) or None."""
    qcls = _layers.quantized_class(type(layer))
    if qcls is None:
      return None
    specs = self.specs_for(layer, path)
    if specs is None:
      return None
    config = layer.get_config()
    config.update(weight_spec=specs[0], act_spec=specs[1], observe=self.observe)
    new = qcls.from_config(config)
    self.quantized.append(path)
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
  fused = _fold.QuantConvBatchNorm(conv, bn, weight_spec=weight, act_spec=act,
                                   observe=ctx.observe, name=conv.name)
  ctx.quantized.append(path)
  ctx.fused.append(f"{path}+{bn.name}")
  return fused


def _clone_leaf(layer, ctx, prefix):
  path = prefix + layer.name
  if _is_model(layer):
    return _convert_model(layer, ctx, path + "/")
  if isinstance(layer, keras.layers.InputLayer):
    return layer
  new = ctx.quant_layer(layer, path)
  if new is None:
    new = layer.__class__.from_config(layer.get_config())
    if _layers.quantized_class(type(layer)) is None and not _sublayers(layer):
      ctx.note_unsupported(layer, path)
  ctx.pairs.append((layer, new, path))
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
      ctx.pairs.append((layer, fused.conv, None))
      ctx.pairs.append((nxt, fused.bn, None))
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
      ctx.pairs.append((layer, fused.conv, None))
      ctx.pairs.append((bn, fused.bn, None))
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


def _sublayers(layer):
  """(container, key, sublayer) for the direct sublayer attributes / list items."""
  found = []
  attrs = dict(vars(layer))
  attrs.update(vars(layer).get("_modules", {}) or {})  # torch backend: sublayers live in _modules
  for name, value in list(attrs.items()):
    if name in _SKIP_ATTRS:
      continue
    if isinstance(value, keras.layers.Layer) and value is not layer:
      found.append((layer, name, value))
    elif isinstance(value, (list, tuple)):
      for i, item in enumerate(value):
        if isinstance(item, keras.layers.Layer):
          found.append((value, i, item))
    elif isinstance(value, dict):
      for k, item in value.items():
        if isinstance(item, keras.layers.Layer):
          found.append((value, k, item))
  return found


def _replace(parent, container, key, old, new):
  tracker = parent._tracker
  locked = tracker.locked
  tracker.unlock()
  try:
    tracker.untrack(old)
    if container is parent:
      setattr(parent, key, new)
    elif isinstance(container, tuple):
      raise TypeError(f"layer {parent.name!r}: sublayers in a tuple cannot be replaced")
    else:
      container[key] = new  # TrackedList item assignment does not track: do it here
      tracker.track(new)
  finally:
    if locked:
      tracker.lock()


def _convert_in_place(layer, ctx, prefix, report_self=None):
  """Swaps the supported sublayers of a built layer/subclassed model.

  Returns the number of sublayers quantized. When none was and ``report_self``
  (the layer's own path) is given, the layer itself is reported as float
  (e.g. ``LSTM`` rather than its cell).
  """
  count = 0
  unsupported = []
  for container, key, sub in _sublayers(layer):
    path = prefix + sub.name
    if isinstance(sub, (_layers.QuantLayer, _fold.QuantConvBatchNorm)):
      count += 1
      continue
    if isinstance(sub, keras.layers.InputLayer):
      continue
    if _is_model(sub) and (_is_functional(sub) or isinstance(sub, keras.Sequential)):
      new = _convert_model(sub, ctx, path + "/")
      if new is not sub:
        _replace(layer, container, key, sub, new)
      count += 1
      continue
    if not sub.built:
      continue
    new = ctx.quant_layer(sub, path)
    if new is None and _layers.quantized_class(type(sub)) is not None:
      count += 1  # supported, left float by a rule
      continue
    if new is not None:
      new.build_from_config(sub.get_build_config())
      copy_weights(sub, new)
      _replace(layer, container, key, sub, new)
      ctx.in_place.append(path)
      if isinstance(new, _layers.QuantLayer):
        new.init_weight_ranges()
      count += 1
      continue
    if _sublayers(sub):
      count += _convert_in_place(sub, ctx, path + "/", report_self=path)
    elif _layers.quantized_class(type(sub)) is None:
      unsupported.append((sub, path))
  if count == 0 and report_self is not None:
    ctx.note_unsupported(layer, report_self)
  else:
    for sub, path in unsupported:
      ctx.note_unsupported(sub, path)
  return count


def _convert_model(model, ctx, prefix):
  if isinstance(model, keras.Sequential):
    new = _convert_sequential(model, ctx, prefix)
  elif _is_functional(model):
    new = _convert_functional(model, ctx, prefix)
  else:
    _convert_in_place(model, ctx, prefix)
    return model
  return new


def quant_layers(model) -> list:
  """All quantized layers (QuantLayer, QuantConvBatchNorm) of a model, nested ones included.

  Examples:
    >>> import keras
    >>> m = quantize_model(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    >>> [type(l).__name__ for l in quant_layers(m)]
    ['QuantDense']
  """
  out = []
  seen = set()

  def walk(layer):
    if id(layer) in seen:
      return
    seen.add(id(layer))
    if isinstance(layer, (_layers.QuantLayer, _fold.QuantConvBatchNorm)):
      out.append(layer)
      return
    subs = layer.layers if _is_model(layer) and hasattr(layer, "layers") else []
    for s in list(subs) + [s for _, _, s in _sublayers(layer)]:
      walk(s)

  walk(model)
  return out


def quantize_model(model, rules: Union[rules_lib.RuleSet, Sequence[rules_lib.Rule],
                                       rules_lib.Rule, None] = None,
                   *, fold_batchnorm: bool = True, observe: Optional[bool] = None):
  """Makes a quantization-aware copy of a built Keras model.

  Sequential and Functional models are cloned with their float weights (the
  original is untouched); subclassed models are converted in place and
  returned. Weight quantizer ranges (and LSQ step sizes) are initialized
  from the float weights; activation ranges need
  :func:`jaxqat.keras.calibrate` (or observe during training when their
  spec's method is absmax/minmax/ema and ``learning="fixed"``).

  Supported layers: Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv1D/2D,
  SeparableConv1D/2D, Embedding and their subclasses; Conv+BatchNorm pairs
  are folded (:class:`QuantConvBatchNorm`). Layers holding sublayers (e.g.
  MultiHeadAttention) have their supported sublayers quantized in place.
  Everything else stays float and is listed in an
  :class:`UnquantizedLayerWarning` (when it has weights).

  Args:
    model: a built ``keras.Model``.
    rules: rules selecting layers by path (``re.fullmatch``, first match
      wins): ``Rule(pattern, weight=QuantSpec|None, act=QuantSpec|None,
      skip=False)``. ``None``: :func:`default_rules` (int8 weights with
      ``PerOutputChannel()``, int8 per-tensor input activations). A weight
      spec with ``PerOutputChannel()`` is resolved per layer; a literal
      ``PerChannel(axis)`` is used as given on every layer.
    fold_batchnorm: fold Conv+BatchNorm pairs.
    observe: passed to every quantizer (``None``: their default).

  Returns:
    The quantized model (a new one unless ``model`` is subclassed).

  Raises:
    TypeError: if ``model`` is not a ``keras.Model`` or ``rules`` hold
      something other than Rules.
    ValueError: if the model is not built.

  Warns:
    UnusedRuleWarning: for rules that matched no layer.
    UnquantizedLayerWarning: listing layers with weights left in float.

  Examples:
    >>> import keras
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="hidden"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> q = quantize_model(model, [Rule(pattern="head", skip=True),
    ...                            Rule(pattern=".*", weight=QuantSpec(format="int4"))])
    >>> [type(l).__name__ for l in q.layers]
    ['QuantDense', 'Dense']
    >>> q = quantize_model(model)  # default_rules(): int8, one scale per output channel
    >>> q.get_layer("hidden").kernel_quantizer.scale.shape
    (1, 4)
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model (Sequential, Functional or subclassed), got "
                    f"{type(model).__name__}")
  if not model.built:
    raise ValueError(f"model: {model.name!r} is not built; call it on a batch or use "
                     "model.build(input_shape) before quantize_model")
  ruleset = rules_lib.as_ruleset(rules, default_rules())
  ctx = _Context(ruleset, fold_batchnorm, observe)
  new = _convert_model(model, ctx, "")
  for src, dst, _ in ctx.pairs:
    if dst.built and src.built and src.weights:
      copy_weights(src, dst)
  for src, dst, path in ctx.pairs:
    if isinstance(dst, _layers.QuantLayer) and dst.built:
      dst.init_weight_ranges()
    elif path is not None and not _is_model(dst) and dst.built and _sublayers(dst):
      _convert_in_place(dst, ctx, path + "/", report_self=path)
  for layer in quant_layers(new):
    if isinstance(layer, _fold.QuantConvBatchNorm):
      layer.init_weight_ranges()
  if ctx.in_place and new is not model:
    warnings.warn(
        "jaxqat.keras.quantize_model: sublayers quantized in place inside other layers ("
        + ", ".join(ctx.in_place) + "): their parents' configs do not record this, so a .keras "
        "file of this model does not load back (save the weights with model.save_weights and "
        "rebuild with quantize_model instead)", UserWarning, stacklevel=2)
  ruleset.warn_unused(f"Keras model {model.name!r}")
  if ctx.left_float:
    warnings.warn("jaxqat.keras.quantize_model: left in float (no quantized version): "
                  + ", ".join(ctx.left_float), UnquantizedLayerWarning, stacklevel=2)
  return new
