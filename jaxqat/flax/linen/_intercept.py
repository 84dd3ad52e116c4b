"""Interception of Linen module methods and of the JAX ops they call.

How an unmodified Linen model gets quantized:

1. :func:`flax.linen.intercept_methods` runs :meth:`Context.interceptor`
   around every method call of every module inside the quantized model. It
   keeps a thread-local stack of *frames*: the module being run, its path
   and the rule that matched it.
2. While a quantized model runs, a few public JAX functions are replaced by
   wrappers (:data:`OPS`): ``jax.lax.dot_general``,
   ``jax.lax.conv_general_dilated``, ``jax.numpy.einsum``, ``jax.numpy.dot``,
   ``jax.numpy.matmul`` (also where the ``@`` operator reaches it, JAX's
   internal ``tensor_contractions.matmul``) and ``jax.numpy.take``. The
   wrappers do nothing unless the current thread is inside a module matched
   by a rule.
3. Inside a matched module, an operand of one of those ops that *is* one of
   the module's own parameters (identity check against the leaves of
   ``module.variables["params"]``), or an array derived from one by
   ``jax.numpy.asarray`` (how Flax's ``promote_dtype`` casts) or by a
   transpose (``kernel.T``, ``kernel.transpose()``, ``jnp.transpose``), is a
   weight. It is fake-quantized, in the parameter's own layout, with the
   rule's ``weight`` spec, and the other floating operand with the rule's
   ``act`` spec, in that order (input, then weight, then the float op). This
   covers Flax's ``Dense``, ``DenseGeneral``, ``Conv``, ``Einsum``, ``Embed``
   (``__call__`` and ``attend``) and the attention built on them, and modules
   from other libraries that call those functions on their own parameters
   (GPT-2's Conv1D). For Flax's own layers the kernel is also recognised by
   position when a cast hid it (a masked ``Conv``).
4. A layer run through a nested ``Module.apply`` inside the model (the tied
   output head ``nn.Dense(V).apply({"params": {"kernel": emb.T}}, h)``) is
   quantized too: its path is the enclosing layer's path plus its name, and
   its quantizer state lives in the enclosing layer's scope under that name.

5. Conversion (:mod:`jaxqat.flax.linen._serve`) runs the same machinery in
   three more modes: ``inspect`` records every quantizer's spec and scale
   shape, ``convert`` resolves each quantizer's serving
   :class:`~jaxqat.core.Encoding` and quantizes each weight operand (in the
   op's dtype and the parameter's layout) to a :class:`~jaxqat.core.QTensor`
   in the ``served`` collection, and ``served`` runs the converted model: a
   quantized weight is no longer in ``params``; ``Module.param`` hands the
   layer a stand-in (its dequantized codes, only used if the layer reads the
   weight outside an intercepted op, and removed by XLA otherwise; a model
   that reads the weight from ``Module.variables``, as the tied heads of the
   HF Flax ports do, finds the same stand-in there) and the
   intercepted op is replaced by the core's integer kernel
   (:func:`jaxqat.core.quantized_dot_general`, ``quantized_einsum``,
   ``quantized_conv_general_dilated``, ``quantized_take``) with the input as
   the left operand (dimension numbers and output axes remapped when the
   weight is the left operand or transposed), or, where the integer path does
   not apply, by the fake-quant arithmetic of the core (the fake-quantized
   input and the dequantized weight in the original op): bit for bit the
   fake-quant model.

Functions imported by name before the model runs
(``from jax.lax import dot_general``) are not intercepted: such a module
gets a :class:`~jaxqat.core.QuantizationWarning` at ``init`` naming it, and
stays float (and ``report`` says why). The ``@`` operator is: it calls JAX's
internal ``matmul``, which is wrapped as ``jax.numpy.matmul`` is.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import threading
import warnings
from typing import Any, Callable, Optional

from flax.core import lift as flax_lift
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src.numpy import indexing as jnp_indexing  # Array.__getitem__ calls its rewriting_take
import numpy as np
import opt_einsum

from jaxqat import core
from jaxqat.core._report import is_broadcast_table
from jaxqat.flax.linen import _quantizer


# Layers that hold parameters but no matmul/conv: never warned about.
_ELEMENTWISE_MODULES = ("flax.linen.normalization", "flax.linen.activation",
                        "flax.linen.stochastic")
# Flax layers whose kernel is the right-hand operand of their one op.
_KERNEL_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)

# --------------------------------------------------------------------------
# Thread-local state.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class LayerRecord:
  """What one run saw of a layer (for warnings and :func:`report`)."""
  kind: str  # the module's class name
  rule: Optional[core.Rule]  # None: no rule matched
  params: dict = dataclasses.field(default_factory=dict)  # name -> shape
  elementwise: bool = False
  quantized: dict = dataclasses.field(default_factory=dict)  # weight name -> resolved spec
  act: Optional[core.QuantSpec] = None


@dataclasses.dataclass
class Frame:
  """One running method of one module."""
  module: nn.Module
  path: str
  rule: Optional[core.Rule]  # None: not quantized
  context: "Context"
  store: _quantizer.Store
  key: tuple = ()  # non-empty: run by a nested Module.apply, state under this key
  aliases: list = dataclasses.field(default_factory=list)  # (array, param name, perm)

  def own_params(self) -> list[tuple[str, Any]]:
    """The module's direct parameter arrays (not its children's), unboxed."""
    params = self.module.variables.get("params", {})
    served = self.context.placeholders.get(self.path, {})
    out = list(served.items())
    for k, v in params.items():
      if isinstance(v, collections.abc.Mapping) or k in served:
        continue
      out.append((k, nn.meta.unbox(v)))
    return out

  def param_name(self, x) -> Optional[tuple[str, Optional[tuple]]]:
    """``(name, perm)`` if ``x`` is ``transpose(param, perm)`` (perm None: the param)."""
    for name, p in self.own_params():
      if x is p:
        return name, None
    for a, name, perm in self.aliases:
      if x is a:
        return name, perm
    return None


@dataclasses.dataclass
class NestedRun:
  """A ``Module.apply`` run inside a quantized model."""
  owner: Frame  # the enclosing layer of the quantized model
  key: tuple  # where its state lives in the owner's scope


class _State(threading.local):

  def __init__(self):
    self.contexts: list[Context] = []
    self.frames: list[Frame] = []
    self.nested: list[NestedRun] = []
    self.in_op = 0


_STATE = _State()


def current_context() -> Optional["Context"]:
  """The innermost quantized model running in this thread, or None."""
  return _STATE.contexts[-1] if _STATE.contexts else None


@contextlib.contextmanager
def _guard():
  """Turns interception off while jaxqat's own code (or the real op) runs."""
  _STATE.in_op += 1
  try:
    yield
  finally:
    _STATE.in_op -= 1


def _join(*parts) -> str:
  return "/".join(str(p) for p in parts if p != "")


class Context:
  """One run (init or apply) of a quantized model: mode, rules, layer records.

  Args:
    ruleset: the rules (a fresh RuleSet, so that hits are counted per run).
    mode: one of :data:`~jaxqat.flax.linen._quantizer.MODES`.
    root: the Linen path of the wrapped model (layer paths are relative to it).
  """

  def __init__(self, ruleset: core.RuleSet, mode: str, root: tuple[str, ...], *,
               integer: bool = True, pack: bool = True):
    self.ruleset = ruleset
    self.mode = mode
    self.root = tuple(root)
    self.integer = integer  # served mode: allow the integer kernels
    self.pack = pack  # convert mode: pack 2/4-bit codes
    self.placeholders: dict[str, dict] = {}  # served mode: path -> {param name: stand-in}
    self.layers: dict[str, LayerRecord] = {}
    self.order: dict[str, int] = {}  # path -> order of first call (model order)
    self.looked_up: set[tuple[str, str]] = set()  # (layer path, param) read by a row lookup
    self._rules: dict[str, Optional[core.Rule]] = {}

  def path_of(self, module: nn.Module) -> str:
    path = tuple(module.scope.path)
    if path[:len(self.root)] == self.root:
      path = path[len(self.root):]
    return _join(*path)

  def match(self, path: str) -> Optional[core.Rule]:
    if path not in self._rules:
      self._rules[path] = self.ruleset.match(path)
    return self._rules[path]

  def locate(self, module: nn.Module) -> tuple[str, _quantizer.Store, tuple]:
    """The layer path of ``module``, where its state lives, and its nested key."""
    nested = _STATE.nested[-1] if _STATE.nested else None
    if nested is None or nested.owner.context is not self:
      return self.path_of(module), _quantizer.Store(module), ()
    key = nested.key + tuple(str(p) for p in module.scope.path)
    return _join(nested.owner.path, *key), _quantizer.Store(nested.owner.module, key), key

  def interceptor(self, next_fun, args, kwargs, context):
    """A :func:`flax.linen.intercept_methods` interceptor."""
    module = context.module
    path, store, key = self.locate(module)
    rule = self.match(path)
    active = rule is not None and not rule.skip and (rule.weight is not None or rule.act is not None)
    frame = Frame(module, path, rule if active else None, self, store, key)
    self.order.setdefault(path, len(self.order))
    _STATE.frames.append(frame)
    try:
      if isinstance(module, nn.OptimizedLSTMCell) and context.method_name == "__call__":
        out = _lstm_cell_step(module, *args, **kwargs)
      else:
        out = next_fun(*args, **kwargs)
    finally:
      _STATE.frames.pop()
    if context.method_name != "setup":
      with _guard():
        own = frame.own_params()
      if own or path in self.layers:
        rec = self.layers.setdefault(path, LayerRecord(type(module).__name__, rule))
        rec.params.update((k, tuple(jnp.shape(v))) for k, v in own)
        # Flax's norms and activations, and any layer whose parameters are all
        # vectors or broadcast tables with a leading 1 (a model's own RMSNorm,
        # LayerScale, class token, (1, N, D) position table): no matmul weight.
        rec.elementwise = (type(module).__module__ in _ELEMENTWISE_MODULES
                           or all(len(shape) <= 1 or is_broadcast_table(shape)
                                  for shape in rec.params.values()))
    return out

  def record(self, frame: Frame, name: str, spec: Optional[core.QuantSpec], act=None):
    rec = self.layers.setdefault(frame.path, LayerRecord(type(frame.module).__name__, frame.rule))
    if name is not None:
      rec.quantized[name] = spec
    if act is not None:
      rec.act = act

  def warn(self, where: str):
    """Warns about matched layers with parameters but no quantized weight."""
    for path, rec in self.layers.items():
      active = rec.rule is not None and not rec.rule.skip and rec.rule.weight is not None
      if active and rec.params and not rec.quantized and not rec.elementwise:
        warnings.warn(
            f"jaxqat: layer {_quantizer.describe(path)} ({rec.kind}) of the {where} matches rule "
            f"{rec.rule.pattern!r} but none of its parameters reached an intercepted op "
            f"({', '.join(OPS)}); it stays float", core.QuantizationWarning, stacklevel=4)
    if not any(rec.quantized or rec.act is not None for rec in self.layers.values()):
      warnings.warn(f"jaxqat: no layer of the {where} was quantized (no rule matched a layer "
                    "with a weight that reaches an intercepted op); it runs in float",
                    core.QuantizationWarning, stacklevel=4)


def _lstm_cell_step(module, *args, **kwargs):
  """``nn.OptimizedLSTMCell``'s step as ``nn.LSTMCell`` computes it, in the cell's own scope.

  The optimized cell concatenates its gates' kernels (``DenseParams``
  children ``ii``...``ho``) before one matmul per operand, so no kernel
  reaches an intercepted op as a parameter. ``nn.LSTMCell`` has the same
  fields, children and parameters (names, shapes, initializers) and the
  same gates, one ``Dense`` per gate and operand: run in the optimized
  cell's scope, its children quantize as any ``Dense`` (one scale per gate
  and unit, the step input and the state quantized), in QAT, calibration
  and serving alike. Float values agree with the optimized cell's up to the
  summation order of the split matmuls.
  """
  return inspect.unwrap(nn.LSTMCell.__call__)(module, *args, **kwargs)


def _filter_names(f):
  """The collection names of a Flax collection filter made of names (else None)."""
  if f is False or f is None:
    return ()
  if isinstance(f, str):
    return (f,)
  if isinstance(f, (tuple, list)) and all(isinstance(c, str) for c in f):
    return tuple(f)
  return None


def _scan_filters(filters: tuple, mode: str) -> tuple:
  """The collection filters of a ``flax.core.lift.scan`` with jaxqat's collections lifted.

  ``filters`` is what ``lift.scan`` hands ``pack``: ``(variable_broadcast,
  variable_carry, *variable_axes groups)``. A scan that broadcasts its params
  over time steps -- ``nn.RNN``, or a user's ``nn.scan(cell,
  variable_broadcast="params", ...)`` in class or method form -- scans one
  cell for every step with no other collection visible, so the cell's
  quantizers could neither be created nor read. They are shared by the steps
  as the parameters are: broadcast with them, except that calibration
  carries ``quant_stats`` through the steps (each step's input updates the
  observers). Returned unchanged where the scan does not broadcast
  ``params``, already names a jaxqat collection, or uses filters other than
  names.
  """
  if len(filters) < 2:
    return filters
  broadcast, carry = _filter_names(filters[0]), _filter_names(filters[1])
  groups = [_filter_names(f) for f in filters[2:]]
  ours = (_quantizer.STATS, _quantizer.PARAMS, SERVED, ENCODINGS)
  if broadcast is None or carry is None or any(g is None for g in groups) or (
      "params" not in broadcast) or any(c in broadcast + carry + sum(groups, ()) for c in ours):
    return filters
  if mode == "calibrate":
    return (broadcast + ours[1:], carry + ours[:1]) + tuple(filters[2:])
  return (broadcast + ours, filters[1]) + tuple(filters[2:])


def _wrap_pack(orig: Callable) -> Callable:
  """``flax.core.lift.pack``, which every lifted transform calls: scans get :func:`_scan_filters`."""

  @functools.wraps(orig)
  def pack(fn, in_filters, out_filters, *args, **kwargs):
    name = kwargs.get("name", args[1] if len(args) > 1 else None)
    context = _STATE.contexts[-1] if _STATE.contexts else None
    if name == "scan" and context is not None:
      in_filters = _scan_filters(tuple(in_filters), context.mode)
      out_filters = _scan_filters(tuple(out_filters), context.mode)
    return orig(fn, in_filters, out_filters, *args, **kwargs)

  return pack


@contextlib.contextmanager
def active(context: Context):
  """Runs a quantized model: pushes ``context`` and installs the op wrappers."""
  if _STATE.contexts:
    raise ValueError(
        "jaxqat: a quantized model runs inside another quantized model: the model is quantized "
        "already; quantize the float model once")
  _STATE.contexts.append(context)
  try:
    with _patched(), nn.intercept_methods(context.interceptor):
      yield
  finally:
    _STATE.contexts.pop()


# --------------------------------------------------------------------------
# Quantizing an op whose operand is a parameter.
# --------------------------------------------------------------------------


def _act_name(weight_name: str) -> str:
  return "input" if weight_name in ("kernel", "embedding") else f"{weight_name}_input"


def _inverse(perm) -> tuple:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)


def _quantize_operands(frame: Frame, ops: list, weights: dict, act_index: Optional[int]) -> list:
  """Fake-quantizes the activation operand, then the weight operands.

  Args:
    frame: the matched module's frame.
    ops: the op's two array operands.
    weights: operand index -> (param name, output axes in the parameter's
      layout, perm: the operand is ``transpose(param, perm)``, or None).
    act_index: index of the activation operand, or None.

  Returns:
    The new operands.
  """
  rule, ctx = frame.rule, frame.context
  mode = ctx.mode
  kind = type(frame.module).__name__
  ops = list(ops)
  if mode in (CONVERT, INSPECT):
    _record_operands(frame, ops, weights, act_index)
    return ops
  act = None
  if act_index is not None and rule.act is not None and len(weights) == 1:
    (wname, _, _), = weights.values()
    name = _act_name(wname)
    where = f"layer {_quantizer.describe(frame.path)} ({kind}) input activation '{name}'"
    act = rule.act
    ops[act_index] = _quantizer.quantize_activation(frame.store, name, ops[act_index], act,
                                                    mode, where)
  for i, (wname, out_axes, perm) in weights.items():
    spec = None
    if rule.weight is not None:
      spec = rule.weight.resolve_output_channel(out_axes)
      where = f"layer {_quantizer.describe(frame.path)} ({kind}) weight '{wname}'"
      w = ops[i] if perm is None else jnp.transpose(ops[i], _inverse(perm))
      w = _quantizer.quantize_weight(frame.store, wname, w, spec, mode, where)
      ops[i] = w if perm is None else jnp.transpose(w, perm)
    ctx.record(frame, wname if spec is not None else None, spec, act)
  return ops


def _qat(frame: Frame, op: str, ops: list, weights: dict, act_index: Optional[int], kw: dict):
  """The op of a quantized layer in QAT (``quant`` mode): :func:`jaxqat.core.qat_op`.

  The quantizers hand over their ranges instead of fake-quantizing
  (:func:`_quantizer.ranges`) and ``qat_op`` runs the rule's compute mode:
  the fake-quant values with a lean backward, or the integer forward. One
  weight per op is routed: the right operand of a convolution, either
  operand of a ``dot_general`` (a left one moves to the right and the result
  is transposed back), untransposed or a transpose of the parameter (a tied
  head's ``x @ embedding.T``: the ranges, computed in the parameter's layout,
  are transposed with it). Two weights in one op, a block format through a
  transpose and stochastic rounding keep the fake-quantized operands
  (``"fake"`` only).

  Returns:
    ``_Done(result)``, or None to fall back to :func:`_quantize_operands`.

  Raises:
    ValueError: if the rule asks for ``compute="integer"`` and the op cannot
      take it (naming the layer and the reason).
  """
  rule, ctx = frame.rule, frame.context
  kind = type(frame.module).__name__
  where = f"layer {_quantizer.describe(frame.path)} ({kind})"
  if rule.compute != "integer" and any((frame.path, w[0]) in ctx.looked_up
                                       for w in weights.values()):
    # A table this run also looked up (a tied embedding): the lookup keeps its fake-quantized
    # table anyway, and the lean op's recomputation would only add memory (see QuantEmbed.attend
    # in NNX).
    return None
  if rule.compute == "integer" and len(weights) == 1 and rule.weight is not None:
    (i, (_, out_axes, _)), = weights.items()
    reason = core._integer.spec_reason(  # pylint: disable=protected-access
        rule.act, rule.weight.resolve_output_channel(out_axes), jnp.ndim(ops[i]),
        conv=op.startswith("conv"))
    if reason is not None:  # what the specs alone rule out: at init already
      raise ValueError(f"jaxqat: {where}: compute='integer' cannot run this layer in integer "
                       f"arithmetic: {reason}")
  if ctx.mode != "quant" or frame.store.initializing:
    return None
  routed = len(weights) == 1 and rule.weight is not None
  if routed:
    (i, (wname, out_axes, perm)), = weights.items()
    routed = (op == "dot_general" or i == 1) and act_index in (1 - i, None)
  act = weight = None
  tracked = False
  if routed:
    if act_index is not None and rule.act is not None:
      act = _quantizer.ranges(_quantizer.quantize_activation, frame.store, _act_name(wname),
                              ops[act_index], rule.act, ctx.mode, f"{where} input activation "
                              f"'{_act_name(wname)}'")
    spec = rule.weight.resolve_output_channel(out_axes)
    param = ops[i] if perm is None else jnp.transpose(ops[i], _inverse(perm))
    weight = _quantizer.ranges(_quantizer.quantize_weight, frame.store, wname, param, spec,
                               ctx.mode, f"{where} weight '{wname}'")
    routed = ("stochastic" not in (act, weight)
              and (perm is None or weight is None or not weight[0].is_block))
    # A fixed-range weight that is not frozen: its range is this kernel's (core.weight_range).
    stats = frame.store.get(_quantizer.STATS, wname)
    tracked = (weight is not None and spec.learning == "fixed" and not spec.is_block
               and stats is not None and _quantizer.FROZEN not in stats)
  if not routed:
    if rule.compute == "integer":
      raise ValueError(f"jaxqat: {where}: compute='integer' cannot run this layer in integer "
                       "arithmetic: it is not one weight operand of a dot_general (or the "
                       "kernel of a convolution), or it rounds stochastically")
    return None
  ctx.record(frame, wname, spec, rule.act if act_index is not None else None)
  compute = rule.compute
  if act is None and rule.act is not None and act_index is not None:
    compute = "fake"  # the input stays float (calibration saw no finite value)
  if perm is not None and weight is not None:
    wspec, rest = core._integer.ranges_in_layout(  # pylint: disable=protected-access
        weight[0], weight[1:], perm, jnp.ndim(param))
    weight = (wspec, *rest)
  x, w = ops[1 - i], ops[i]
  kw, out_perm = dict(kw), None
  if op == "dot_general":
    kw["dimension_numbers"], out_perm = core._integer.weight_on_right(  # pylint: disable=protected-access
        kw["dimension_numbers"], i, jnp.ndim(x), jnp.ndim(w))
  try:
    y = core.qat_op(op, x, w, act=act, weight=weight, compute=compute, weight_tracked=tracked,
                    **kw)
  except ValueError as e:
    raise ValueError(f"jaxqat: {where}: {e}") from None
  return _Done(y if out_perm is None else jnp.transpose(y, out_perm))


def _qat_bound(frame: Frame, op: str, bound, weights: dict, act_index: Optional[int]):
  """A lax op of a quantized layer outside the served mode: :func:`_qat`, or fake-quantized operands."""
  a, b = bound.arguments["lhs"], bound.arguments["rhs"]
  kw = {k: v for k, v in bound.arguments.items() if k not in ("lhs", "rhs")}
  if kw.get("out_sharding") is None:
    kw.pop("out_sharding", None)
    done = _qat(frame, op, [a, b], weights, act_index, kw)
    if done is not None:
      return done
  a, b = _quantize_operands(frame, [a, b], weights, act_index)
  bound.arguments["lhs"], bound.arguments["rhs"] = a, b
  return bound


def _kernel_by_position(frame: Frame, x, name: str = "kernel") -> bool:
  """For Flax's own layers: is ``x`` shaped like the layer's kernel?"""
  if not isinstance(frame.module, _KERNEL_LAYERS):
    return False
  p = dict(frame.own_params()).get(name)
  return p is not None and tuple(jnp.shape(x)) == tuple(p.shape)


def _others(ndim: int, contracted) -> tuple[int, ...]:
  contracted = {a % ndim for a in contracted}
  return tuple(i for i in range(ndim) if i not in contracted)


def _weight(frame: Frame, x, out_axes) -> Optional[tuple]:
  """``(name, out axes in the parameter's layout, perm)`` if ``x`` is a weight."""
  found = frame.param_name(x)
  if found is None:
    return None
  name, perm = found
  if perm is not None:
    out_axes = tuple(sorted(perm[a] for a in out_axes))
  return name, tuple(out_axes), perm


def _binary(frame: Frame, a, b, contract_a, contract_b):
  """Finds the weights among (a, b): index -> (name, out_axes, perm)."""
  weights = {}
  for i, (x, contract) in enumerate(((a, contract_a), (b, contract_b))):
    w = _weight(frame, x, _others(jnp.ndim(x), contract))
    if w is not None:
      weights[i] = w
  if not weights and _kernel_by_position(frame, b):
    weights[1] = ("kernel", _others(jnp.ndim(b), contract_b), None)
  return weights


def _act_index(weights, ops) -> Optional[int]:
  if len(weights) != 1:
    return None
  (i,) = weights
  j = 1 - i
  return j if jnp.issubdtype(jnp.result_type(ops[j]), jnp.floating) else None


def _dot_general(frame, orig, bound):
  a, b = bound.arguments["lhs"], bound.arguments["rhs"]
  (ca, cb), _ = bound.arguments["dimension_numbers"]
  weights = _binary(frame, a, b, ca, cb)
  if not weights:
    return None
  act_index = _act_index(weights, [a, b])
  if frame.context.mode == SERVED:
    kw = {k: v for k, v in bound.arguments.items() if k not in ("lhs", "rhs")}
    call = lambda ops: orig(*ops, **kw)  # noqa: E731
    dn = ((ca, cb), tuple(bound.arguments["dimension_numbers"][1]))
    return _Done(_served(frame, [a, b], weights, act_index, call,
                         _int_dot_general(dn, bound.arguments.get("precision"),
                                          bound.arguments.get("preferred_element_type"))))
  return _qat_bound(frame, "dot_general", bound, weights, act_index)


_TRANSPOSE_LAYOUTS = core._integer._TRANSPOSE_LAYOUTS  # pylint: disable=protected-access


def _conv(frame, orig, bound, kind: str = "conv"):
  """``lax.conv_general_dilated``; ``kind`` ``"local"`` or ``"transpose"``: its other forms.

  ``lax.conv_general_dilated_local`` (``nn.ConvLocal``) has a kernel
  ``(*out spatial, in * prod(filter), features)`` that contracts one axis;
  every other axis (each location's and feature's column) gets its own scale
  under ``PerOutputChannel()``, as a Dense column does.
  ``lax.conv_transpose`` (``nn.ConvTranspose``) calls the convolution inside
  JAX, out of jaxqat's reach: it is quantized here, one scale per output
  channel (the kernel's ``I`` axis when ``transpose_kernel`` swaps them),
  through ``core.qat_op("conv_transpose")`` in both compute modes (served:
  ``core.quantized_conv_transpose``). ``ConvLocal`` has no integer kernel:
  it runs on the fake-quantized operands (served: the dequantize path).
  """
  lhs, rhs = bound.arguments["lhs"], bound.arguments["rhs"]
  layout = bound.arguments.get("dimension_numbers")
  if kind == "transpose" and layout is None:
    layout = _TRANSPOSE_LAYOUTS.get(jnp.ndim(lhs))
  dn = jax.lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), layout)
  if kind == "local":
    w = _weight(frame, rhs, _others(jnp.ndim(rhs), (dn.rhs_spec[1],)))
  elif kind == "transpose":
    w = _weight(frame, rhs, (dn.rhs_spec[1 if bound.arguments.get("transpose_kernel") else 0],))
  else:
    w = _weight(frame, rhs, (dn.rhs_spec[0],))
    if w is None and _kernel_by_position(frame, rhs):
      w = ("kernel", (dn.rhs_spec[0],), None)
  if w is None:
    return None
  weights = {1: w}
  act_index = _act_index(weights, [lhs, rhs])
  if frame.context.mode == SERVED:
    bound.apply_defaults()
    kw = {k: v for k, v in bound.arguments.items() if k not in ("lhs", "rhs")}
    call = lambda ops: orig(*ops, **kw)  # noqa: E731
    kernel = {"conv": _int_conv, "transpose": _int_conv_transpose}.get(kind)
    return _Done(_served(frame, [lhs, rhs], weights, act_index, call,
                         None if kernel is None else kernel(kw)))
  if kind != "local":
    return _qat_bound(frame, "conv_general_dilated" if kind == "conv" else "conv_transpose",
                      bound, weights, act_index)
  if frame.rule.compute == "integer" and frame.context.mode == "quant":
    raise ValueError(f"jaxqat: layer {_quantizer.describe(frame.path)}: compute='integer' "
                     f"cannot run this layer in integer arithmetic: it computes with "
                     f"lax.{orig.__name__}, which has no integer kernel; use compute='fake'")
  lhs, rhs = _quantize_operands(frame, [lhs, rhs], weights, act_index)
  bound.arguments["lhs"], bound.arguments["rhs"] = lhs, rhs
  return bound


def _dot(frame, orig, bound):
  names = list(bound.arguments)
  a, b = bound.arguments[names[0]], bound.arguments[names[1]]
  nb = jnp.ndim(b)
  weights = _binary(frame, a, b, (-1,), (nb - 2 if nb >= 2 else 0,))
  if not weights and isinstance(frame.module, nn.Embed) and nb == 2:
    emb = dict(frame.own_params()).get("embedding")
    if emb is not None and tuple(jnp.shape(b)) == tuple(emb.shape)[::-1]:
      weights[1] = ("embedding", (0,), (1, 0))  # Embed.attend: query @ embedding.T
  if not weights:
    return None
  act_index = _act_index(weights, [a, b])
  if frame.context.mode == SERVED:
    kw = {k: v for k, v in bound.arguments.items() if k not in names[:2]}
    call = lambda ops: orig(*ops, **kw)  # noqa: E731
    dn = _dot_dims(orig, a, b)
    fn = None if dn is None else _int_dot_general(dn, kw.get("precision"),
                                                  kw.get("preferred_element_type"))
    return _Done(_served(frame, [a, b], weights, act_index, call, fn))
  dn = _dot_dims(orig, a, b)
  kw = {k: v for k, v in bound.arguments.items() if k not in names[:2] and v is not None}
  # A table that the layer also looks up (Embed.attend) takes the core op for the integer
  # forward only: in "fake" the lookup and the head share one fake-quantized table, which
  # costs less memory than the lean op's recomputation (see QuantEmbed.attend in NNX).
  table = isinstance(frame.module, nn.Embed) and frame.rule.compute != "integer"
  if (dn is not None and not table and set(kw) <= {"precision", "preferred_element_type"}
      and jnp.result_type(a) == jnp.result_type(b)):
    done = _qat(frame, "dot_general", [a, b], weights, act_index, dict(kw, dimension_numbers=dn))
    if done is not None:
      return done
  elif frame.rule.compute == "integer" and frame.context.mode == "quant":
    raise ValueError(f"jaxqat: layer {_quantizer.describe(frame.path)}: compute='integer' "
                     f"cannot run this layer in integer arithmetic: this jnp.{orig.__name__} "
                     "is not a dot_general of one weight (a batched matmul, mixed dtypes or an "
                     "output sharding)")
  a, b = _quantize_operands(frame, [a, b], weights, act_index)
  bound.arguments[names[0]], bound.arguments[names[1]] = a, b
  return bound


def _dot_dims(orig, a, b) -> Optional[tuple]:
  """The ``dot_general`` dimension numbers of ``jnp.dot``/``jnp.matmul(a, b)``, or None.

  None for a scalar operand and for ``matmul``'s broadcast batch of two
  operands of rank > 2.
  """
  na, nb = jnp.ndim(a), jnp.ndim(b)
  if na >= 1 and nb >= 1 and (orig.__name__ == "dot" or nb <= 2 or na == 1):
    return (((na - 1,), (nb - 2 if nb >= 2 else 0,)), ((), ()))
  return None


def _take(frame, orig, bound):
  a = bound.arguments["a"]
  axis = bound.arguments.get("axis")
  if axis is None:
    return None
  w = _weight(frame, a, (axis % jnp.ndim(a),))
  if w is None:
    return None
  if frame.context.mode == SERVED:
    kw = {k: v for k, v in bound.arguments.items() if k not in ("a", "indices")}
    indices = bound.arguments["indices"]
    call = lambda ops: orig(ops[0], ops[1], **kw)  # noqa: E731
    return _Done(_served(frame, [a, indices], {0: w}, None, call, _direct_take(indices, kw)))
  frame.context.looked_up.add((frame.path, w[0]))
  (a, _) = _quantize_operands(frame, [a, bound.arguments["indices"]], {0: w}, None)
  bound.arguments["a"] = a
  return bound


def _row_ids(idx):
  """The integer index array of ``table[ids]`` (or ``table[ids, ...]``/``table[ids, :]``), or None."""
  if isinstance(idx, tuple):
    if not idx or any(not (i is Ellipsis or (isinstance(i, slice) and i == slice(None)))
                      for i in idx[1:]):
      return None
    idx = idx[0]
  if isinstance(idx, (jax.Array, np.ndarray)) and jnp.issubdtype(idx.dtype, jnp.integer):
    return idx
  return None


def _getitem(frame, orig, bound):
  """``table[ids]`` of a weight: a row lookup, quantized per row as ``jnp.take`` is."""
  a = bound.arguments["arr"]
  ids = _row_ids(bound.arguments["idx"])
  if ids is None or jnp.ndim(a) < 2:
    return None
  w = _weight(frame, a, (0,))
  if w is None:
    return None
  if frame.context.mode == SERVED:
    kw = {k: v for k, v in bound.arguments.items() if k not in ("arr", "idx")}
    idx = bound.arguments["idx"]
    call = lambda ops: orig(ops[0], idx, **kw)  # noqa: E731
    return _Done(_served(frame, [a, ids], {0: w}, None, call, lambda *_: None))
  frame.context.looked_up.add((frame.path, w[0]))
  (a, _) = _quantize_operands(frame, [a, ids], {0: w}, None)
  bound.arguments["arr"] = a
  return bound


def _einsum(frame, orig, args, kwargs):
  if len(args) != 3 or not isinstance(args[0], str):
    return None
  subscripts, a, b = args
  weights = {}
  try:
    inputs, result, _ = opt_einsum.parser.parse_einsum_input((subscripts, a, b))
    terms = inputs.split(",")
  except Exception:  # pylint: disable=broad-except  (leave odd equations to jnp.einsum)
    return None
  for i, (x, term) in enumerate(((a, terms[0]), (b, terms[1]))):
    out_axes = tuple(k for k, c in enumerate(term) if c in result)
    w = _weight(frame, x, out_axes)
    if w is None and i == 1 and not weights and _kernel_by_position(frame, x):
      w = ("kernel", out_axes, None)
    if w is not None:
      weights[i] = w
  if not weights:
    return None
  act_index = _act_index(weights, [a, b])
  if frame.context.mode == SERVED:
    call = lambda ops: orig(subscripts, *ops, **kwargs)  # noqa: E731
    return _Done(_served(frame, [a, b], weights, act_index, call,
                         _int_einsum(subscripts, kwargs.get("precision"),
                                     kwargs.get("preferred_element_type"))))
  given = {k: v for k, v in kwargs.items() if v is not None}
  if set(given) <= {"precision", "preferred_element_type"}:
    done = _qat(frame, "einsum", [a, b], weights, act_index, dict(given, subscripts=subscripts))
    if done is not None:
      return done
  elif frame.rule.compute == "integer":
    raise ValueError(f"jaxqat: layer {_quantizer.describe(frame.path)}: compute='integer' "
                     f"does not take einsum arguments {sorted(given)}")
  a, b = _quantize_operands(frame, [a, b], weights, act_index)
  return (subscripts, a, b), kwargs


# --------------------------------------------------------------------------
# Conversion (inspect / convert modes) and the served model (served mode).
# --------------------------------------------------------------------------

SERVED = "served"  # the converted model's collection: QTensors and input Encodings
ENCODINGS = "quant_encodings"  # convert / inspect output: every quantizer's Encoding
CONVERT, INSPECT = "convert", "inspect"
SERVING_MODES = (CONVERT, INSPECT, SERVED)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizerEncoding:
  """One quantizer's encoding as ``convert`` / ``inspect`` record it.

  Attributes:
    encoding: the :class:`~jaxqat.core.Encoding` (``inspect``: a zero scale
      of the right shape), or ``None`` for an input that stays float.
    kind: ``"param"`` or ``"activation"``.
    spec: the quantizer's resolved QuantSpec (as the model holds it).
  """

  encoding: Optional[core.Encoding]
  kind: str = dataclasses.field(metadata=dict(static=True))
  spec: core.QuantSpec = dataclasses.field(metadata=dict(static=True))


class _Done:
  """A handler's final result (served mode): the wrapper returns it as is."""

  def __init__(self, value):
    self.value = value


def _nearest(spec: core.QuantSpec) -> core.QuantSpec:
  """Serving rounds half to even, as the fake-quant model does without a ``quant`` RNG."""
  return spec.replace(rounding="nearest_even") if spec.rounding == "stochastic" else spec


def _serving(enc: core.Encoding) -> core.Encoding:
  return dataclasses.replace(enc, spec=_nearest(enc.spec))


def _zero_encoding(spec: core.QuantSpec, shape) -> core.Encoding:
  scale = None if spec.is_block else jnp.zeros(spec.scale_shape(shape), jnp.float32)
  return core.Encoding(scale, None, spec)


def _resolve(spec, state, where, weight=None) -> core.Encoding:
  try:
    return core.encoding_from_state(spec, state, weight=weight, name=where)
  except ValueError as e:
    raise ValueError(f"jaxqat: convert: {e}") from None


def record_activation(store: _quantizer.Store, name: str, x, spec: core.QuantSpec, mode: str,
                      where: str) -> None:
  """``inspect`` / ``convert`` of an input quantizer (the input passes through).

  ``convert`` stores the serving Encoding in ``served`` (none for an input
  that calibration found no data for: it stays float) and every quantizer's
  in ``quant_encodings``.

  Raises:
    ValueError: naming ``where`` if the quantizer has no state or was never
      calibrated.
  """
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return
  _quantizer.check_shape(spec, jnp.shape(x), where)
  if mode == INSPECT:
    store.put(ENCODINGS, name, QuantizerEncoding(_zero_encoding(spec, jnp.shape(x)), "activation",
                                                 spec), where, "inspect")
    return
  stats = store.get(_quantizer.STATS, name)
  if stats is None:
    raise _quantizer._missing(where, name)  # pylint: disable=protected-access
  if spec.is_block:
    enc = _resolve(spec, {}, where)
  elif _quantizer.STAYS_FLOAT in stats:
    enc = None
  elif spec.learning == "fixed":
    enc = _resolve(spec, {"scale": stats.get("scale"), "zero_point": stats.get("zero_point")},
                   where)
  else:
    qp = store.get(_quantizer.PARAMS, name) or {}
    enc = _resolve(spec, {"log_scale": qp.get("log_scale"), "offset": qp.get("offset")}, where)
  store.put(ENCODINGS, name, QuantizerEncoding(enc, "activation", spec), where, "convert")
  if enc is not None:
    store.put(SERVED, name, _serving(enc), where, "convert")


def record_weight(store: _quantizer.Store, name: str, w, spec: core.QuantSpec, mode: str,
                  where: str, pack: bool = True) -> None:
  """``inspect`` / ``convert`` of a weight quantizer; ``w`` in the parameter's layout.

  ``convert`` resolves the weight's Encoding as the fake-quant model uses it
  now (a fixed range that is not frozen: the current weight's range) and
  stores ``core.quantize_weight(w, enc)`` in ``served``.

  Raises:
    ValueError: naming ``where`` if the quantizer has no state.
  """
  _quantizer.check_shape(spec, jnp.shape(w), where)
  if mode == INSPECT:
    store.put(ENCODINGS, name, QuantizerEncoding(_zero_encoding(spec, jnp.shape(w)), "param", spec),
              where, "inspect")
    return
  stats = store.get(_quantizer.STATS, name)
  if stats is None:
    raise _quantizer._missing(where, name)  # pylint: disable=protected-access
  weight = None
  if spec.is_block:
    state = {}
  elif spec.learning == "fixed":
    frozen = _quantizer.FROZEN in stats
    state = {"scale": stats["scale"], "zero_point": stats["zero_point"]} if frozen else {}
    weight = None if frozen else w
  else:
    qp = store.get(_quantizer.PARAMS, name)
    if qp is None:
      raise ValueError(f"jaxqat: convert: {where} has no '{_quantizer.PARAMS}/{name}' variable; "
                       "convert the variables of the model's init() and calibrate()")
    state = {"log_scale": qp.get("log_scale"), "offset": qp.get("offset")}
  enc = _resolve(spec, state, where, weight)
  store.put(ENCODINGS, name, QuantizerEncoding(enc, "param", spec), where, "convert")
  store.put(SERVED, name, core.quantize_weight(w, _serving(enc), pack=pack), where, "convert")


def _record_operands(frame: Frame, ops: list, weights: dict, act_index: Optional[int]) -> None:
  """``inspect`` / ``convert`` of an op's quantizers (see :func:`_quantize_operands`)."""
  rule, ctx = frame.rule, frame.context
  kind = type(frame.module).__name__
  act = None
  if act_index is not None and rule.act is not None and len(weights) == 1:
    (wname, _, _), = weights.values()
    name = _act_name(wname)
    where = f"layer {_quantizer.describe(frame.path)} ({kind}) input activation '{name}'"
    act = rule.act
    record_activation(frame.store, name, ops[act_index], act, ctx.mode, where)
  for i, (wname, out_axes, perm) in weights.items():
    spec = None
    if rule.weight is not None:
      spec = rule.weight.resolve_output_channel(out_axes)
      where = f"layer {_quantizer.describe(frame.path)} ({kind}) weight '{wname}'"
      w = ops[i] if perm is None else jnp.transpose(ops[i], _inverse(perm))
      record_weight(frame.store, wname, w, spec, ctx.mode, where, ctx.pack)
    ctx.record(frame, wname if spec is not None else None, spec, act)


def _served(frame: Frame, ops: list, weights: dict, act_index: Optional[int], call: Callable,
            kernel: Optional[Callable]):
  """An intercepted op of the served model.

  Args:
    frame: the matched module's frame.
    ops: the op's two operands (a weight operand is the stand-in of
      ``Module.param``, maybe cast or transposed).
    weights: operand index -> (param name, out axes, perm).
    act_index: the input operand's index, or None.
    call: runs the original op on new operands (same other arguments).
    kernel: ``kernel(x, qt, enc, weight index, perm)`` -> the core kernel's
      result, or None where it does not apply.

  Returns:
    The op's result: the core kernel's, or the original op on the
    fake-quantized input and the dequantized weight(s).
  """
  ctx = frame.context
  qts = {}
  for i, (wname, _, perm) in weights.items():
    qt = frame.store.get(SERVED, wname)
    if isinstance(qt, core.QTensor):
      qts[i] = (qt, perm)
  enc = None
  if act_index is not None and len(weights) == 1:
    (wname, _, _), = weights.values()
    e = frame.store.get(SERVED, _act_name(wname))
    enc = e if isinstance(e, core.Encoding) else None
  if kernel is not None and len(qts) == 1:
    (i, (qt, perm)), = qts.items()
    x = None if act_index is None else ops[act_index]
    y = kernel(x, qt, enc if ctx.integer else None, i, perm)
    if y is not None:
      return y
  ops = list(ops)
  if enc is not None:
    ops[act_index] = core.fake_quantize_input(ops[act_index], enc)
  for i, (qt, perm) in qts.items():
    w = core.dequantize(qt)
    ops[i] = w if perm is None else jnp.transpose(w, perm)
  return call(ops)


def _norm(axes, nd) -> tuple:
  return tuple(int(a) % nd for a in axes)


def _int_dot_general(dimension_numbers, precision, preferred_element_type) -> Callable:
  """The integer kernel for ``dot_general(lhs, rhs, dimension_numbers)`` (either operand a weight)."""
  (lc, rc), (lb, rb) = dimension_numbers

  def kernel(x, qt, enc, i, perm):
    if enc is None:
      return None
    nw, nx = len(qt.shape), jnp.ndim(x)
    wc, wb = (_norm(rc, nw), _norm(rb, nw)) if i == 1 else (_norm(lc, nw), _norm(lb, nw))
    xc, xb = (_norm(lc, nx), _norm(lb, nx)) if i == 1 else (_norm(rc, nx), _norm(rb, nx))
    p = tuple(range(nw)) if perm is None else perm
    pc, pb = tuple(p[a] for a in wc), tuple(p[a] for a in wb)
    if core.integer_reason(qt, enc, pc) is not None:
      return None
    y = core.quantized_dot_general(x, qt, ((xc, pc), (xb, pb)), act=enc, precision=precision,
                                   preferred_element_type=preferred_element_type)
    nb = len(xb)
    x_free = [a for a in range(nx) if a not in xc and a not in xb]
    p_free = [a for a in range(nw) if a not in pc and a not in pb]
    w_pos = [nb + len(x_free) + p_free.index(p[a]) for a in range(nw)
             if a not in wc and a not in wb]
    x_pos = list(range(nb, nb + len(x_free)))
    order = list(range(nb)) + (x_pos + w_pos if i == 1 else w_pos + x_pos)
    return y if order == sorted(order) else jnp.transpose(y, order)

  return kernel


def _int_einsum(subscripts, precision, preferred_element_type) -> Callable:
  """The integer kernel for a two-operand einsum with an explicit output."""

  def kernel(x, qt, enc, i, perm):
    if enc is None or not isinstance(subscripts, str):
      return None
    s = subscripts.replace(" ", "")
    if "->" not in s or "..." in s:
      return None
    ins, out = s.split("->")
    terms = ins.split(",")
    nw = len(qt.shape)
    if len(terms) != 2 or len(terms[i]) != nw:
      return None
    wt, xt = terms[i], terms[1 - i]
    p = tuple(range(nw)) if perm is None else perm
    pt = [""] * nw
    for j, c in enumerate(wt):
      pt[p[j]] = c
    pt = "".join(pt)
    if any(c not in out and (c not in xt or c not in pt) for c in xt + pt):
      return None  # an axis summed within one operand: not one dot_general
    contracting = tuple(k for k, c in enumerate(pt) if c in xt and c not in out)
    if core.integer_reason(qt, enc, contracting) is not None:
      return None
    return core.quantized_einsum(f"{xt},{pt}->{out}", x, qt, act=enc, precision=precision,
                                 preferred_element_type=preferred_element_type)

  return kernel


def _int_conv(kw: dict) -> Callable:
  """The integer kernel for ``conv_general_dilated(x, kernel, **kw)``."""

  def kernel(x, qt, enc, i, perm):
    if enc is None or i != 1 or perm is not None or kw.get("batch_group_count", 1) != 1:
      return None
    dn = jax.lax.conv_dimension_numbers(jnp.shape(x), qt.shape, kw.get("dimension_numbers"))
    if core.integer_reason(qt, enc, tuple(dn.rhs_spec[1:])) is not None or qt.zero_point is not None:
      return None
    return core.quantized_conv_general_dilated(
        x, qt, kw["window_strides"], kw["padding"], kw.get("lhs_dilation"),
        kw.get("rhs_dilation"), kw.get("dimension_numbers"), kw.get("feature_group_count", 1), 1,
        act=enc, precision=kw.get("precision"),
        preferred_element_type=kw.get("preferred_element_type"))

  return kernel


def _int_conv_transpose(kw: dict) -> Callable:
  """The core kernel for ``conv_transpose(x, kernel, **kw)`` (integer where it can be)."""

  def kernel(x, qt, enc, i, perm):
    if enc is None or i != 1 or perm is not None:
      return None
    return core.quantized_conv_transpose(x, qt, act=enc, **kw)

  return kernel


def _direct_take(indices, kw: dict) -> Callable:
  """``core.quantized_take`` (only the looked-up codes dequantized) for a plain ``take``."""

  def kernel(x, qt, enc, i, perm):
    axis = kw.get("axis")
    plain = all(kw.get(k) is None for k in ("mode", "fill_value", "out"))
    if perm is not None or axis is None or not plain:
      return None
    return core.quantized_take(qt, indices, axis=axis)

  return kernel


def _wrap_param(orig: Callable) -> Callable:
  """Served mode: ``Module.param`` of a converted weight returns its stand-in (dequantized codes)."""

  @functools.wraps(orig)
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    ctx = current_context()
    if ctx is None or ctx.mode != SERVED or _STATE.in_op or not _STATE.frames:
      return orig(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    with _guard():
      path, store, _ = ctx.locate(self)
      qt = store.get(SERVED, name)
      if not isinstance(qt, core.QTensor):
        qt = None
      else:
        if self.has_variable("params", name):
          declared = nn.meta.unbox(self.get_variable("params", name))
        else:
          declared = jax.eval_shape(lambda: nn.meta.unbox(
              init_fn(jax.random.key(0), *init_args, **init_kwargs)))
        if tuple(declared.shape) != tuple(qt.shape):
          raise ValueError(
              f"jaxqat: served variables: layer {_quantizer.describe(path)} weight '{name}' is "
              f"{tuple(qt.shape)} in the served variables but the layer declares "
              f"{tuple(declared.shape)}; convert this model again")
        stand_in = core.dequantize(qt).astype(declared.dtype)
        ctx.placeholders.setdefault(path, {})[name] = stand_in
    if qt is None:
      return orig(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    return stand_in

  return param


def _with_stand_ins(ctx: "Context", module: nn.Module, variables):
  """``variables`` with each converted weight's stand-in back in ``params``.

  A served layer's weight lives as codes in ``served``; a model that reads
  it from ``Module.variables`` instead of ``Module.param`` (the tied LM head
  of the HF Flax ports: ``self.transformer.variables["params"]["wte"]
  ["embedding"].T``) finds the dequantized codes there, the same stand-in
  object ``param`` hands out (so an intercepted op still sees the weight).
  """
  served = variables.get(SERVED)
  if not served:
    return variables
  path = ctx.locate(module)[0]

  def merge(params, tree, where):
    out = dict(params)
    for name, value in tree.items():
      if isinstance(value, core.QTensor):
        if name not in out:
          stand_ins = ctx.placeholders.setdefault(_join(*where), {})
          if name not in stand_ins:
            stand_ins[name] = core.dequantize(value)
          out[name] = stand_ins[name]
      elif isinstance(value, collections.abc.Mapping):
        sub = out.get(name, {})
        if isinstance(sub, collections.abc.Mapping):
          out[name] = merge(sub, value, where + (name,))
    return out

  return {**variables, "params": merge(variables.get("params", {}), served, (path,))}


def _wrap_variables(orig: property) -> property:
  """Served mode: ``Module.variables`` holds the converted weights' stand-ins in ``params``."""

  @functools.wraps(orig.fget)
  def variables(self):
    out = orig.fget(self)
    ctx = current_context()
    if ctx is None or ctx.mode != SERVED or _STATE.in_op or not _STATE.frames:
      return out
    with _guard():
      return _with_stand_ins(ctx, self, out)

  return property(variables)


# --------------------------------------------------------------------------
# Installing the wrappers.
# --------------------------------------------------------------------------

OPS = ("jax.lax.dot_general", "jax.lax.conv_general_dilated",
       "jax.lax.conv_general_dilated_local", "jax.lax.conv_transpose", "jax.numpy.einsum",
       "jax.numpy.dot", "jax.numpy.matmul", "x @ w", "jax.numpy.take", "table[ids]")

_HANDLERS = {
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "dot": _dot,
    "matmul": _dot,
    "take": _take,
    "rewriting_take": _getitem,
    "conv_general_dilated_local": functools.partial(_conv, kind="local"),
    "conv_transpose": functools.partial(_conv, kind="transpose"),
}


def _frame() -> Optional[Frame]:
  if _STATE.in_op or not _STATE.frames:
    return None
  frame = _STATE.frames[-1]
  return frame if frame.rule is not None else None


def _wrap_op(name: str, orig: Callable) -> Callable:
  if name == "einsum":

    @functools.wraps(orig)
    def einsum(*args, **kwargs):
      frame = _frame()
      if frame is not None:
        with _guard():
          new = _einsum(frame, orig, args, kwargs)
          if isinstance(new, _Done):
            return new.value
          if new is not None:
            return orig(*new[0], **new[1])
      return orig(*args, **kwargs)

    return einsum

  handler = _HANDLERS[name]
  sig = inspect.signature(orig)

  @functools.wraps(orig)
  def wrapper(*args, **kwargs):
    frame = _frame()
    if frame is not None:
      with _guard():
        try:
          bound = sig.bind(*args, **kwargs)
        except TypeError:
          bound = None
        if bound is not None:
          bound = handler(frame, orig, bound)
          if isinstance(bound, _Done):
            return bound.value
          if bound is not None:
            return orig(*bound.args, **bound.kwargs)
    return orig(*args, **kwargs)

  return wrapper


def _wrap_asarray(orig: Callable) -> Callable:
  """``jnp.asarray`` of a parameter (a dtype cast) is the parameter."""

  @functools.wraps(orig)
  def asarray(a, *args, **kwargs):
    out = orig(a, *args, **kwargs)
    frame = _frame()
    if frame is not None and out is not a:
      with _guard():
        found = frame.param_name(a)
      if found is not None:
        frame.aliases.append((out, found[0], found[1]))
    return out

  return asarray


def _wrap_transpose(orig: Callable) -> Callable:
  """``transpose(param, axes)`` (also ``param.T``) is the parameter, permuted."""

  @functools.wraps(orig)
  def transpose(a, axes=None):
    out = orig(a, axes)
    frame = _frame()
    if frame is not None:
      with _guard():
        found = frame.param_name(a)
        if found is not None:
          nd = jnp.ndim(a)
          perm = tuple(range(nd))[::-1] if axes is None else tuple(int(i) % nd for i in axes)
          if found[1] is not None:  # compose: out = transpose(transpose(p, p0), perm)
            perm = tuple(found[1][i] for i in perm)
          frame.aliases.append((out, found[0], perm))
    return out

  return transpose


def _wrap_apply(orig: Callable) -> Callable:
  """A ``Module.apply`` inside the quantized model: a nested run (see the module doc)."""

  @functools.wraps(orig)
  def apply(self, *args, **kwargs):
    if _STATE.in_op or not _STATE.frames or not _STATE.contexts:
      return orig(self, *args, **kwargs)
    frame = _STATE.frames[-1]
    if frame.context is not _STATE.contexts[-1]:
      return orig(self, *args, **kwargs)
    name = self.name if self.name is not None else type(self).__name__
    if frame.key:
      owner = _STATE.nested[-1].owner
      key = frame.key + (name,)
    else:
      owner, key = frame, (name,)
    _STATE.nested.append(NestedRun(owner, key))
    try:
      return orig(self, *args, **kwargs)
    finally:
      _STATE.nested.pop()

  return apply


def _targets() -> list:
  out = [(jax.lax, "dot_general"), (jax.lax, "conv_general_dilated"),
         (jax.lax, "conv_general_dilated_local"), (jax.lax, "conv_transpose"), (jnp, "einsum"),
         (jnp, "dot"), (jnp, "matmul"), (jnp, "take"), (jnp, "asarray"), (jnp, "transpose"),
         (nn.Module, "apply"), (nn.Module, "param"), (nn.Module, "variables"),
         (flax_lift, "pack"), (jnp_indexing, "rewriting_take")]
  try:  # Array.T and Array.transpose() call this module's transpose
    from jax._src.numpy import lax_numpy  # pylint: disable=g-import-not-at-top
    if callable(getattr(lax_numpy, "transpose", None)):
      out.append((lax_numpy, "transpose"))
  except ImportError:  # pragma: no cover
    pass
  try:  # the ``@`` operator (Array.__matmul__/__rmatmul__) calls this module's matmul
    from jax._src.numpy import tensor_contractions  # pylint: disable=g-import-not-at-top
    if callable(getattr(tensor_contractions, "matmul", None)):
      out.append((tensor_contractions, "matmul"))
  except ImportError:  # pragma: no cover
    pass
  return out


def _wrapped(mod, name: str, orig: Callable) -> Callable:
  if name == "asarray":
    return _wrap_asarray(orig)
  if name == "transpose":
    return _wrap_transpose(orig)
  if name == "apply":
    return _wrap_apply(orig)
  if name == "param":
    return _wrap_param(orig)
  if name == "variables":
    return _wrap_variables(orig)
  if name == "pack":
    return _wrap_pack(orig)
  return _wrap_op(name, orig)


_TARGETS = _targets()
_LOCK = threading.Lock()
_DEPTH = 0
_SAVED: list = []


@contextlib.contextmanager
def _patched():
  """Installs the op wrappers (reference counted; other threads pass through)."""
  global _DEPTH
  with _LOCK:
    if _DEPTH == 0:
      _SAVED[:] = [(mod, name, getattr(mod, name)) for mod, name in _TARGETS]
      for mod, name, orig in _SAVED:
        setattr(mod, name, _wrapped(mod, name, orig))
    _DEPTH += 1
  try:
    yield
  finally:
    with _LOCK:
      _DEPTH -= 1
      if _DEPTH == 0:
        for mod, name, orig in _SAVED:
          setattr(mod, name, orig)
        _SAVED.clear()
