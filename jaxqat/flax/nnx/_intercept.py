"""Quantizing modules that are not Flax's own layers, by jaxpr interception.

Models from other libraries define modules that call ``jnp.einsum``,
``jnp.matmul``/``@``, ``jnp.dot``, ``jax.lax.dot_general`` or
``jax.lax.conv_general_dilated`` (directly or through ``lax.conv_transpose``
and friends) on their own parameters. Swapping Flax's layer classes does not
reach them, and patching ``jax.numpy`` functions misses aliases, the ``@``
operator and operands that were transposed or cast first. jaxqat works one
level lower, on the primitives:

1. The module's class is swapped (in place) for a subclass whose
   intercepted methods (``__call__`` by default; see ``methods`` below)
   trace the original method with ``jax.make_jaxpr``, on a copy of the
   module made with ``nnx.split``/``nnx.merge`` so that state updates inside
   the call (batch statistics, RNG counters, nested quantizers) are returned
   as outputs and written back with ``nnx.update``.
2. The jaxpr is evaluated again, primitive by primitive, in the caller's
   trace (so it works eagerly and under ``jit``, ``grad``, ``nnx.scan`` and
   ``nnx.vmap``). A dataflow pass labels every value computed from a weight
   by layout-only primitives (reshape, transpose, convert_element_type,
   broadcast, squeeze, slice, copy, rev; through nested ``jit`` calls). When
   a ``dot_general`` or ``conv_general_dilated`` consumes a labeled value,
   it is fed the same layout ops applied to the **fake-quantized weight**
   (the weight quantizer runs on the weight in its own layout, so per-channel
   axes refer to the weight's axes), and its other operand is fake-quantized
   by the weight's **input quantizer**.
3. The weights of an intercepted module are its own parameters of rank >= 2
   (quantizers created at conversion, in two ``nnx.Dict`` attributes,
   ``jaxqat_weight_quant`` and ``jaxqat_input_quant``, keyed by the
   parameter's name: ``"w"``, ``"layers.0"``) **and the weights of the
   quantized layers inside it** that it reads directly instead of calling
   the layer (a tied output head ``h @ self.embed.embedding[...].T``, a
   ``kernel`` read from a layer that is never called). Those use the layer's
   own quantizers (``embedding_quant``/``kernel_quant`` and
   ``input_quant``), so one weight has one quantizer wherever it is used.

**Which methods.** A module with its own ``__call__`` has ``__call__``
intercepted; a module with weights and no ``__call__`` (an embedder with
``encode``/``decode``) has every public method its class defines
intercepted. A module with a ``__call__`` also has its other public methods
intercepted, as secondary methods (SAM 2's random position encoding is
called as ``pe(size)`` and as ``pe.forward_with_coords(points)``, both a
matmul on its Gaussian matrix): without that, the fake-quant model would
read the weight in float there while the served model holds only codes. A
secondary method whose result holds objects other than arrays and plain
Python values (a cache module it creates) runs in float. A method called
while the same module is being intercepted (``__call__`` calling
``self.encode``) runs inside that interception, not in one of its own.
``quantize(model, rules, methods={path_regex: names})`` chooses the methods
explicitly (no secondary methods then), for any module, including one
without weights of its own (a root module computing
``h @ self.embed.embedding.T``).

**Output channels.** A weight spec with ``PerOutputChannel()`` is resolved
**per op**: the dataflow pass follows each weight axis through the layout
ops to the ``dot_general``/convolution, and the output channels are the
weight axes it does not contract (for an einsum kernel ``(D, heads,
head_dim)`` contracted over ``D``: one scale per ``(head, head_dim)``; for a
convolution, the kernel's output-feature axis). Before the first call the
quantizer assumes the last axis; a fixed-range weight (whose range tracks the
weight) simply uses the op's axes; a learned or frozen one gets its state
re-made by :func:`jaxqat.flax.nnx.calibrate`, which records the axes of
every op while it runs the data (before that, such an op raises a
``ValueError`` asking for ``calibrate``).

Limits (documented behaviour, with warnings): matmuls between two
activations (no weight operand, e.g. attention scores) are left in float
-- quantize them by hand with :class:`~jaxqat.flax.nnx.ActQuant`; a weight
that reaches a matmul only through a non-layout op (e.g. ``w * mask``,
``w / norm(w)``) or inside ``scan``/``while``/``cond``/custom-gradient
functions is not identified (a warning names the module's own parameters
that ``__call__`` never fed to a matmul); input quantizers of intercepted
modules are per tensor (the operand layout inside an einsum is not known in
advance).

**Lookups and other uses of a weight.** A row lookup of a weight
(``jnp.take``, ``table[ids]``: a ``gather`` with the weight as operand) reads
it fake-quantized, one scale per row under ``PerOutputChannel()``, as
``nnx.Embed`` and Linen's ``take`` do (an ``nnx.Embed`` subclass with its own
``__call__``, Gemma's ``ScaledEmbed``, is intercepted and looks up the
quantized table); its input quantizer, which no matmul fed, stays unused
without a warning. A weight that feeds a matmul or a lookup (in this call, or
in an earlier call of the module: ``decode`` before ``encode``) is read
fake-quantized by its other uses too (an add), since the served model holds
its codes only. A weight that feeds neither (a position table added to the
activations, a class token) stays float, in the fake-quant and the served
model alike.

**The op: core.qat_op, both compute modes.** In training (``"quant"``
mode) a ``dot_general`` or convolution on a weight runs
:func:`jaxqat.core.qat_op`, as Flax's own layers do: with
``compute="fake"`` its lean backward keeps the float operands and the ranges
and recomputes the fake quantization (the same values and gradients as
fake-quantizing the operands first, bit for bit; XLA's memory of a W4A4 LSQ
step of a 4-layer MLP of such modules went from 1.49x to 1.08x the float
step's), with ``compute="integer"`` its int8 x int8 -> int32 forward. The
weight's range is computed in its own layout and carried through the layout
ops between it and the op (a transpose, a reshape, the ``rev`` of
``nnx.ConvTranspose``), so that its scales sit on the operand's axes; a
weight used as the left operand of a ``dot_general`` is moved to the right
and the result transposed back. ``"fake"`` keeps the fake-quantized operands
of step 2 where the lean op would change the values (a weight cast before
the op, a block format through layout ops) or cannot take the op (two
weights in one matmul, a kernel on a convolution's input side, an explicit
output sharding), and for a table that is also looked up (a tied embedder:
the lookup keeps its fake-quantized table anyway, and the recomputation only
adds memory). ``"integer"`` refuses the first ones (and a weight-only rule,
per-block or float formats, scales along a contracted axis) with a
``ValueError`` naming the layer, the weight and the reason.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from jaxqat import core
from jaxqat.core._report import is_broadcast_table
from jaxqat.core._rules import COMPUTE_MODES
from jaxqat.flax.nnx import _layers
from jaxqat.flax.nnx._quantizer import ACT
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._quantizer import WEIGHT

__all__ = ["InterceptMixin", "intercept", "default_methods", "take_resolutions"]

# Primitives that move/cast a weight without changing what it means.
_LAYOUT = frozenset({
    "reshape", "transpose", "convert_element_type", "broadcast_in_dim", "squeeze",
    "expand_dims", "copy", "copy_p", "rev", "reduce_precision", "slice", "dynamic_slice",
})
_SAME_AXES = frozenset({"convert_element_type", "copy", "copy_p", "rev", "reduce_precision",
                        "slice", "dynamic_slice"})
_MATMUL = frozenset({"dot_general", "conv_general_dilated"})
_CASTS = frozenset({"convert_element_type", "reduce_precision"})
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})

_W = "jaxqat_weight_quant"
_A = "jaxqat_input_quant"

# Output axes seen by intercepted ops, by quantizer uid (see the module docstring);
# read and cleared by calibrate, which re-makes the quantizers whose axes differ.
_RESOLVED: dict[int, tuple[int, ...]] = {}


def take_resolutions() -> dict[int, tuple[int, ...]]:
  """Returns and clears the per-op output-channel axes recorded since the last call."""
  out = dict(_RESOLVED)
  _RESOLVED.clear()
  return out


def _key(parts) -> str:
  return ".".join(str(p) for p in parts)


class InterceptMixin(nnx.Module):
  """Mixed into a foreign module's class by :func:`intercept`."""

  def jaxqat_weights(self):
    """``[(param_path_parts, weight_quantizer_or_None, input_quantizer_or_None)]``."""
    out = []
    for name, parts in self.jaxqat_params:
      wq = self.jaxqat_weight_quant.get(name) if self.jaxqat_weight_quant is not None else None
      aq = self.jaxqat_input_quant.get(name) if self.jaxqat_input_quant is not None else None
      out.append((parts, wq, aq))
    return out


_CLASSES: dict[tuple, type] = {}


# ids of the module copies whose call is being traced by an interception (this thread).
_TRACING = threading.local()


def _tracing() -> set:
  if not hasattr(_TRACING, "ids"):
    _TRACING.ids = set()
  return _TRACING.ids


def _wrapper(method: str, call_fn, secondary: bool = False):
  def call(self, *args, **kwargs):
    if id(self) in _tracing():  # called by an intercepted method of this module: inside it
      return getattr(type(self).jaxqat_float_type, method)(self, *args, **kwargs)
    return (call_fn or _intercepted_call)(self, method, args, kwargs, secondary=secondary)

  call.__name__ = method
  return call


def _intercept_class(cls: type, methods: tuple[str, ...], also: tuple[str, ...] = (), *,
                     mixin: Optional[type] = None, prefix: str = "Intercepted",
                     call_fn=None) -> type:
  """The subclass of ``cls`` whose ``methods`` call ``call_fn(self, method, args, kwargs)``.

  ``also`` are secondary methods (see the module docstring). Defaults:
  :class:`InterceptMixin` and the interception of this module; the served
  form of an intercepted module (:mod:`._serve`) passes its own.
  """
  mixin = InterceptMixin if mixin is None else mixin
  key = (cls, methods, also, mixin)
  if key not in _CLASSES:
    ns = {m: _wrapper(m, call_fn) for m in methods}
    ns.update({m: _wrapper(m, call_fn, secondary=True) for m in also})
    ns.update({"__module__": mixin.__module__, "jaxqat_float_type": cls,
               "jaxqat_methods": methods, "jaxqat_also": also})
    # A legacy graph-mode module (``pytree=False``) keeps that mode: a pytree subclass would
    # treat the attributes its instances set before the swap as static (no state found).
    _CLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), ns,
                         pytree=getattr(cls, "_pytree__is_pytree", True))
  return _CLASSES[key]


def default_methods(cls: type) -> tuple[str, ...]:
  """The methods intercepted by default: ``__call__``, else the public methods of ``cls``.

  Examples:
    >>> from flax import nnx
    >>> class Embedder(nnx.Module):
    ...   def encode(self, ids): ...
    ...   def decode(self, h): ...
    >>> default_methods(Embedder)
    ('decode', 'encode')
  """
  if _defines_call(cls):
    return ("__call__",)
  return _public_methods(cls)


def secondary_methods(cls: type) -> tuple[str, ...]:
  """The other public methods of a class with ``__call__`` (see the module docstring).

  Examples:
    >>> from flax import nnx
    >>> class PosEnc(nnx.Module):
    ...   def __call__(self, size): ...
    ...   def forward_with_coords(self, xy): ...
    >>> secondary_methods(PosEnc)
    ('forward_with_coords',)
  """
  return _public_methods(cls) if _defines_call(cls) else ()


def _own_classes(cls: type):
  for c in cls.__mro__:
    if c in (nnx.Module, nnx.Pytree, object):
      break
    yield c


def _defines_call(cls: type) -> bool:
  return any("__call__" in vars(c) for c in _own_classes(cls))


def _public_methods(cls: type) -> tuple[str, ...]:
  names = set()
  for c in _own_classes(cls):
    for name, v in vars(c).items():
      if not name.startswith("_") and inspect.isfunction(v):
        names.add(name)
  return tuple(sorted(names))


_get_param = _layers.get_path


def intercept(module: nnx.Module, params, weight_spec: Optional[core.QuantSpec],
              act_spec: Optional[core.QuantSpec], *, path: str = "", stack_ndim: int = 0,
              methods: Optional[Sequence[str]] = None, also: Optional[Sequence[str]] = None,
              compute: str = "fake"):
  """Makes ``module`` quantize the matmuls/convolutions on its weights.

  Converts in place (see the module docstring): the class becomes a
  subclass with intercepting methods and the quantizer state is added.
  Usually called by :func:`jaxqat.flax.nnx.quantize`.

  Args:
    module: the module.
    params: ``[(name_parts, nnx.Param)]``, its own parameters to treat as
      weights (may be empty: the module then only quantizes the weights of
      its quantized sub-layers that it reads directly).
    weight_spec: QuantSpec for the weights, or None. ``PerOutputChannel()``
      is resolved per op (see the module docstring).
    act_spec: QuantSpec for the other operand of each matmul, or None. Must
      be per tensor or a block format.
    path: the module path (for messages).
    stack_ndim: leading stacked axes of the parameters.
    methods: the method names to intercept; default :func:`default_methods`.
    also: secondary methods (default :func:`secondary_methods` when
      ``methods`` is None).
    compute: ``"fake"`` or ``"integer"`` (:attr:`jaxqat.core.Rule.compute`):
      with ``"integer"`` each ``dot_general``/convolution on a weight runs
      :func:`jaxqat.core.qat_op`'s integer forward (see the module docstring).

  Returns:
    ``module``.

  Raises:
    ValueError: if a spec does not fit a parameter, ``act_spec`` is per
      channel or ``PerOutputChannel()``, a method does not exist, or
      ``compute="integer"`` with specs that rule it out, naming the layer and
      parameter.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec
    >>> class Proj(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.array([[0.5, -1.0], [0.26, 2.0]]))
    ...   def __call__(self, x):
    ...     return jnp.einsum("bi,io->bo", x, self.w[...])
    >>> m = Proj()
    >>> m = intercept(m, [(("w",), m.w)], QuantSpec(format="int4"), None)
    >>> m(jnp.array([[1.0, 0.0]]))   # per-tensor range 2.0: step 2/7
    Array([[ 0.5714286, -0.8571429]], dtype=float32)
  """
  if stack_ndim < 0:
    raise ValueError(f"layer '{path}': stack_ndim must be >= 0, got {stack_ndim}")
  if also is None:
    also = secondary_methods(type(module)) if methods is None else ()
  methods = tuple(methods) if methods is not None else default_methods(type(module))
  also = tuple(m for m in also if m not in methods)
  if not methods:
    raise ValueError(f"layer '{path}' ({type(module).__name__}): no method to intercept (no "
                     "__call__ and no public method); pass methods={path: names} to quantize")
  for m in methods:
    if not callable(getattr(type(module), m, None)):
      raise ValueError(f"methods: layer '{path}' ({type(module).__name__}) has no method {m!r}")
  if act_spec is not None and act_spec.is_output_channel:
    raise ValueError(f"layer '{path}': the activation spec has granularity PerOutputChannel(), "
                     "which is for weights only; intercepted modules quantize matmul inputs "
                     "per tensor (PerTensor()) or per block")
  if act_spec is not None and isinstance(act_spec.granularity, core.PerChannel):
    raise ValueError(f"layer '{path}': intercepted modules quantize matmul inputs per tensor; "
                     f"got an activation spec with {act_spec.granularity}")
  if compute not in COMPUTE_MODES:
    raise ValueError(f"layer '{path}': compute must be one of {COMPUTE_MODES}, got "
                     f"{compute!r}")
  if compute == "integer" and params:
    reason = core._integer.spec_reason(  # pylint: disable=protected-access
        act_spec, weight_spec if weight_spec is None or not weight_spec.is_output_channel
        else weight_spec.resolve_output_channel((-1,)), 2)
    if reason is not None:
      raise ValueError(f"layer '{path}': compute='integer' cannot run this layer in integer "
                       f"arithmetic: {reason}")
  wqs, aqs, names = {}, {}, []
  for parts, var in params:
    name = _key(parts)
    shape = tuple(var.shape)
    if len(shape) < stack_ndim:
      raise ValueError(f"layer '{path}': parameter '{name}' of shape {shape} has fewer than "
                       f"{stack_ndim} stacked axes")
    stack, inner = shape[:stack_ndim], shape[stack_ndim:]
    where = f"{path}/{name}" if path else name
    if weight_spec is not None:
      spec = weight_spec.resolve_output_channel((-1,))  # provisional: see the docstring
      wq = Quantizer(spec, role=WEIGHT, shape=inner, stack_shape=stack, path=where,
                     weight=var[...])
      wq.output_channel_spec = weight_spec if weight_spec.is_output_channel else None
      wqs[name] = wq
    if act_spec is not None:
      aqs[name] = Quantizer(act_spec, role=ACT, shape=(1, 1), stack_shape=stack, path=where,
                            optional=_TABLE if is_broadcast_table(inner) else False)
    names.append((name, tuple(parts)))
  for attr in (_W, _A, "jaxqat_params"):
    if attr in vars(module):
      raise ValueError(f"layer '{path}': attribute '{attr}' exists already")
  module.__class__ = _intercept_class(type(module), methods, also)
  module.jaxqat_params = tuple(names)
  module.jaxqat_path = path
  module.jaxqat_matmul_weights = None  # names seen feeding a matmul (None: never called)
  module.jaxqat_lookup_weights = None  # names seen looked up (gathered rows)
  module.jaxqat_stack_ndim = stack_ndim
  module.jaxqat_compute = compute
  module.jaxqat_weight_quant = nnx.Dict(wqs) if wqs else nnx.data(None)
  module.jaxqat_input_quant = nnx.Dict(aqs) if aqs else nnx.data(None)
  return module


_TABLE = ("a broadcast table (leading axis 1: a class token, a (1, N, D) position table) that "
          "fed no matmul during calibration; it stays float")


def reresolve(module, name: str, axes: tuple[int, ...]) -> bool:
  """Re-makes the weight quantizer ``name`` of ``module`` for output ``axes``.

  Returns:
    Whether the quantizer changed.
  """
  old = module.jaxqat_weight_quant[name]
  spec = old.output_channel_spec.resolve_output_channel(axes)
  if spec == old.spec:
    return False
  parts = dict(module.jaxqat_params)[name]
  new = Quantizer(spec, role=WEIGHT, shape=old.shape, stack_shape=old.stack_shape,
                  path=old.path, weight=_get_param(module, parts)[...])
  new.output_channel_spec = old.output_channel_spec
  new.mode = old.mode
  if old.frozen:
    new.store_weight_range(_get_param(module, parts)[...])
  module.jaxqat_weight_quant[name] = new
  return True


# --------------------------------------------------------------------------
# The call: trace, then re-evaluate with quantized matmul operands.
# --------------------------------------------------------------------------


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


class _Weight:
  """A weight seen by an intercepted call: its quantizers, rank and compute mode."""

  def __init__(self, name, wq, aq, own, rank, compute="fake", table=False):
    self.name, self.wq, self.aq, self.own, self.rank = name, wq, aq, own, rank
    self.compute = compute
    self.table = table  # also looked up (an embedding table)


def _weights_of(self) -> dict:
  """``{param parts: _Weight}``: own weights and those of quantized layers inside."""
  out = {}
  for name, parts in self.jaxqat_params:
    wq = self.jaxqat_weight_quant.get(name) if self.jaxqat_weight_quant is not None else None
    aq = self.jaxqat_input_quant.get(name) if self.jaxqat_input_quant is not None else None
    rank = _get_param(self, parts).ndim - self.jaxqat_stack_ndim
    out[tuple(parts)] = _Weight(name, wq, aq, True, rank, getattr(self, "jaxqat_compute", "fake"),
                                name in (getattr(self, "jaxqat_lookup_weights", None) or ()))
  for path, node in nnx.iter_graph(self):
    path = tuple(path)
    if path and path[0] in (_W, _A):
      continue
    if not path or not isinstance(node, nnx.Module) or not hasattr(type(node), "jaxqat_weights"):
      continue
    for parts, wq, aq in node.jaxqat_weights():
      if wq is None or wq.stack_shape:  # stacked layers are read inside their scan
        continue
      out.setdefault(path + tuple(parts),
                     _Weight(_key(path + tuple(parts)), wq, aq, False, len(wq.shape),
                             getattr(node, "jaxqat_compute", "fake"),
                             isinstance(node, _layers.QuantEmbed)))
  return out


def _plain(x) -> bool:
  return x is None or isinstance(x, (bool, int, float, complex, str, bytes))


def _intercepted_call(self, method, args, kwargs, secondary: bool = False):
  float_call = getattr(type(self).jaxqat_float_type, method)
  weights = _weights_of(self)
  quants = [q for w in weights.values() for q in (w.wq, w.aq) if q is not None]
  if all(q.mode == "float" for q in quants):
    return float_call(self, *args, **kwargs)

  def qfilter(path, value):
    return bool(path) and path[0] in (_W, _A)

  graphdef, qstate, rest = nnx.split(self, qfilter, ...)
  rest_leaves, rest_def = jax.tree_util.tree_flatten_with_path(rest)
  rest_paths = [tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
                      for k in kp[:-1]) for kp, _ in rest_leaves]
  rest_vals = [v for _, v in rest_leaves]
  arg_leaves, arg_def = jax.tree_util.tree_flatten((args, kwargs))
  dyn_idx = [i for i, leaf in enumerate(arg_leaves) if _is_array(leaf)]
  n_rest = len(rest_vals)

  def inner(*flat):
    state = jax.tree_util.tree_unflatten(rest_def, flat[:n_rest])
    leaves = list(arg_leaves)
    for i, v in zip(dyn_idx, flat[n_rest:]):
      leaves[i] = v
    a, kw = jax.tree_util.tree_unflatten(arg_def, leaves)
    m = nnx.merge(graphdef, qstate, state)
    _tracing().add(id(m))
    try:
      out = float_call(m, *a, **kw)
    finally:
      _tracing().discard(id(m))
    ran[:] = [tuple(p) for p, n in nnx.iter_graph(m) if p and _layers.ran(n)]
    _, _, new_rest = nnx.split(m, qfilter, ...)
    leaves, out_tree[0] = jax.tree_util.tree_flatten(out)
    out_static[:] = [None if _is_array(leaf) else leaf for leaf in leaves]
    out_is_array[:] = [_is_array(leaf) for leaf in leaves]
    return [leaf for leaf in leaves if _is_array(leaf)], new_rest

  ran: list = []  # the quantized layers inside that ran (on the traced copy)
  out_tree: list = [None]  # the output's structure, its leaves that are not arrays
  out_static: list = []
  out_is_array: list = []

  in_vals = rest_vals + [arg_leaves[i] for i in dyn_idx]
  closed, out_shape = jax.make_jaxpr(inner, return_shape=True)(*in_vals)
  odd = [type(v).__name__ for v, a in zip(out_static, out_is_array) if not a and not _plain(v)]
  if odd:
    if secondary:  # e.g. a method that builds a cache module: not a forward pass
      return float_call(self, *args, **kwargs)
    raise TypeError(f"jaxqat: layer '{self.jaxqat_path}': intercepted method {method!r} returns "
                    f"{odd[0]} values; an intercepted method may return arrays and plain "
                    "Python values (pass methods={path: names} to quantize to choose others)")
  out_def = jax.tree_util.tree_structure(out_shape)

  labels = [weights.get(p) for p in rest_paths] + [None] * len(dyn_idx)
  interp = _Interpreter(f"layer '{self.jaxqat_path}'" if self.jaxqat_path else "<root>")
  prior = getattr(self, "jaxqat_matmul_weights", None)  # what earlier calls saw (None: none)
  seen = {w.name for w in weights.values() if w.own} & set(prior or ())  # by other calls (decode)
  outs = interp.run(closed.jaxpr, closed.consts, in_vals, labels, seen)
  arrays, new_rest = jax.tree_util.tree_unflatten(out_def, outs)
  it = iter(arrays)
  out = jax.tree_util.tree_unflatten(
      out_tree[0], [next(it) if a else v for v, a in zip(out_static, out_is_array)])
  for p in ran:  # as if they had run on this module itself
    try:
      _layers.mark_ran(_get_param(self, p))
    except (AttributeError, KeyError, IndexError, TypeError):
      pass
  # Write back only the state the call changed (batch statistics, observers, RNG counts):
  # state it passed through may belong to another trace (captured by a closure).
  for p, new, old in zip(rest_paths, jax.tree_util.tree_leaves(new_rest), rest_vals):
    if new is not old:
      _get_param(self, p)[...] = new
  _record_matmul_weights(self, {w.name for w in weights.values() if w.own} & interp.used)
  looked_up = {w.name for w in weights.values() if w.own} & interp.looked_up
  if looked_up - set(getattr(self, "jaxqat_lookup_weights", None) or ()):
    _layers.set_static(self, "jaxqat_lookup_weights", tuple(sorted(
        set(getattr(self, "jaxqat_lookup_weights", None) or ()) | looked_up)))
  unused = [w.name for p, w in weights.items() if w.own and w.name not in interp.used
            and w.name not in (prior or ())
            and not is_broadcast_table(_get_param(self, p).shape[self.jaxqat_stack_ndim:])]
  if unused and method == "__call__":
    warnings.warn(
        f"jaxqat: layer '{self.jaxqat_path}' ({type(self).jaxqat_float_type.__name__}): "
        f"parameters {unused} feed no matmul/convolution that jaxqat can identify (see "
        "jaxqat.flax.nnx._intercept); they stay in float", core.QuantizationWarning, stacklevel=3)
  return out


def _record_matmul_weights(module, names: set) -> None:
  """Adds ``names`` to the weights ``module`` was seen to feed to a matmul (a static attribute).

  ``convert`` and ``report`` keep the other weights float, as the fake-quant
  call uses them (a class token, a position table added to the activations).
  """
  prev = getattr(module, "jaxqat_matmul_weights", None)
  _layers.set_static(module, "jaxqat_matmul_weights", tuple(sorted(set(prev or ()) | names)))


def feeds_matmul(module, name: str) -> bool:
  """Whether weight ``name`` of an intercepted module fed a matmul (True if never called)."""
  used = getattr(module, "jaxqat_matmul_weights", None)
  return used is None or name in used


class _Labeled:
  """A value derived from a weight by layout ops: how to redo them on the quantized weight."""

  def __init__(self, weight: _Weight, root, ops, axes):
    self.weight = weight
    self.root = root  # the weight's value as it entered the call
    self.ops = ops  # [(eqn, other invals)] layout ops applied since
    self.axes = axes  # per axis of this value: the frozenset of weight axes it holds


def _reshape_axes(old_shape, new_shape, axes):
  po, pn = np.cumprod((1,) + tuple(old_shape)), np.cumprod((1,) + tuple(new_shape))
  out = []
  for j in range(len(new_shape)):
    s = frozenset()
    for i in range(len(old_shape)):
      if max(po[i], pn[j]) < min(po[i + 1], pn[j + 1]):
        s |= axes[i]
    out.append(s)
  return out


def _layout_axes(eqn, in_shape, axes):
  """The weight axes of a layout op's output, from its input's."""
  name = eqn.primitive.name
  p = eqn.params
  out_shape = eqn.outvars[0].aval.shape
  if name in _SAME_AXES:
    return list(axes)
  if name == "transpose":
    return [axes[i] for i in p["permutation"]]
  if name == "squeeze":
    drop = {d % len(in_shape) for d in p["dimensions"]}
    return [a for i, a in enumerate(axes) if i not in drop]
  if name == "expand_dims":
    out = list(axes)
    for d in sorted(p["dimensions"]):
      out.insert(d, frozenset())
    return out
  if name == "broadcast_in_dim":
    out = [frozenset()] * len(out_shape)
    for i, d in enumerate(p["broadcast_dimensions"]):
      if in_shape[i] == out_shape[d]:
        out[d] = axes[i]
    return out
  return _reshape_axes(in_shape, out_shape, axes)


class _Interpreter:
  """Evaluates a jaxpr, quantizing matmul operands derived from weights."""

  def __init__(self, where: str):
    self.where = where
    self.used: set[str] = set()
    self.looked_up: set[str] = set()  # weights gathered (row lookups) in this call
    self._cache: dict = {}
    self._to_matmul: set[str] = set()

  def run(self, jaxpr, consts, args, weights, to_matmul=frozenset()):
    labeled = []
    for a, w in zip(args, weights):
      if w is None:
        labeled.append(None)
        continue
      k = a.ndim - w.rank
      axes = [frozenset({i - k}) if i >= k else frozenset() for i in range(a.ndim)]
      labeled.append(_Labeled(w, a, [], axes))
    self._to_matmul = set(to_matmul) | _reaching_matmuls(
        jaxpr, [None if l is None else l.weight for l in labeled])
    outs, _ = self.eval(jaxpr, consts, args, labeled)
    return outs

  def _resolved_spec(self, lv: _Labeled, out_axes):
    """The weight spec for an op with ``out_axes`` (None: the quantizer's own)."""
    w = lv.weight
    spec = None
    oc = getattr(w.wq, "output_channel_spec", None)
    if oc is not None and out_axes is not None:
      rank = w.rank
      axes = tuple(sorted(a - rank for a in out_axes))
      spec = oc.resolve_output_channel(axes)
      if spec == w.wq.spec:
        spec = None
      else:
        _RESOLVED[w.wq.uid] = axes
        if w.wq.mode == "quant" and (w.wq.frozen or w.wq.spec.learning != "fixed"):
          raise ValueError(
              f"{self.where}: weight '{w.name}' is used by an op whose output channels are "
              f"its axes {axes}, not the last axis assumed when it was quantized; run "
              "jaxqat.flax.nnx.calibrate(model, data), which resolves PerOutputChannel() per "
              "op, before using it with a learned or frozen range")
    return spec

  def _quantized(self, lv: _Labeled, out_axes):
    """The quantized weight for an op with ``out_axes``, through ``lv``'s layout ops."""
    w = lv.weight
    spec = self._resolved_spec(lv, out_axes)
    key = (id(lv.root), spec)
    if key not in self._cache:
      self._cache[key] = w.wq(lv.root, spec=spec)
    val = self._cache[key]
    for eqn, rest in lv.ops:
      val = _bind(eqn, [val] + rest)[0]
    return val

  def _out_axes(self, eqn, i, lv: _Labeled):
    """The weight axes that the matmul ``eqn`` does not contract on operand ``i``."""
    rank = lv.weight.rank
    if eqn.primitive.name == "dot_general":
      (lc, rc), _ = eqn.params["dimension_numbers"]
      contracted = set().union(*[lv.axes[d] for d in (lc if i == 0 else rc)])
      return frozenset(range(rank)) - contracted
    if i != 1:
      return None
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    return lv.axes[rhs_spec[0]]

  def _no_integer(self, lv: _Labeled, reason: str):
    return ValueError(f"jaxqat: {self.where}: compute='integer' cannot run weight "
                      f"'{lv.weight.name}' in integer arithmetic: {reason}")

  def _routed(self, eqn, invals, inlabs, compute: str):
    """``[output]`` of a matmul on a weight through :func:`jaxqat.core.qat_op`, or None.

    ``core.qat_op`` runs the rule's compute mode: the fake-quant values with
    its lean backward (it keeps the float operands and the ranges, not
    fake-quantized copies and clip masks), or the integer forward. The
    weight's ranges are computed in its own layout and carried through the
    layout ops that led from it to the op (a transpose, a reshape, the
    ``rev`` of a transposed convolution), so that its scales sit on the
    operand's axes; a weight on the left of a ``dot_general`` is moved to the
    right and the result transposed back.

    None (the operands are fake-quantized by the quantizers, as before) while
    a quantizer calibrates or is float, in served models, and, for
    ``"fake"``, where the lean op would not give the same values (a weight
    cast before the op: the fake-quant values are those of the uncast
    weight; a block format through layout ops) or cannot take the op (two
    weights in one matmul, a kernel on a convolution's input side, an
    explicit output sharding), and for a table that is also looked up (a tied
    embedding read as a head): the lookup keeps its fake-quantized table
    anyway, and the lean op's recomputation only adds one (Gemma's tied
    embedder, 8192 x 256, XLA's estimate of the step: W8A8 1.05x float as
    before against 1.12x, W4A4 LSQ 1.12x against 1.26x).

    Raises:
      ValueError: for ``"integer"``, where the op cannot take the integer
        path (naming the layer, the weight and the reason).
    """
    name = eqn.primitive.name
    idx = [i for i in (0, 1) if inlabs[i] is not None]
    lv = inlabs[idx[0]]
    w = lv.weight
    # A served weight (convert's codes, dequantized in the call's copy) takes the integer op
    # where convert(..., integer=True) allows it and the op can, else the dequantize path.
    serving = getattr(w.wq, "serves_integer", None)
    if serving is not None:
      if not serving or w.aq is None or w.wq.stack_shape:
        return None
      compute = "integer"
    elif (not isinstance(w.wq, Quantizer) or w.wq.mode != "quant"
          or not isinstance(w.aq, (Quantizer, type(None)))):
      return None
    integer = compute == "integer"
    if w.aq is not None and w.aq.mode != "quant":
      return None
    if len(idx) != 1:
      if integer and not serving:
        raise self._no_integer(lv, f"both operands of its {name} are weights")
      return None
    i = idx[0]
    if name != "dot_general" and i != 1:
      if integer and not serving:
        raise self._no_integer(lv, "it is the input operand of its convolution, not the kernel")
      return None
    if w.aq is None and integer:
      raise self._no_integer(lv, "the input is not quantized (weight-only)")
    x = invals[1 - i]
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return None
    act = None if w.aq is None else w.aq.ranges(x)
    if act is None and integer:
      return None
    spec = self._resolved_spec(lv, self._out_axes(eqn, i, lv)) or w.wq.spec
    if spec.is_block and integer:
      if serving:
        return None
      raise self._no_integer(lv, "the weight is quantized per block")
    p = dict(eqn.params)
    out_sharding = p.pop("out_sharding", None)
    casts = any(e.primitive.name in _CASTS for e, _ in lv.ops)
    table = w.table or w.name in self.looked_up
    if not integer and (casts or table or (spec.is_block and lv.ops) or out_sharding is not None):
      return None
    wspec, scale, zp, offset = w.wq.ranges(lv.root, spec=spec)
    if lv.ops:
      chan = frozenset() if isinstance(wspec.granularity, core.PerTensor) else frozenset(
          core.normalize_axes(wspec.granularity.axes, w.rank, "granularity.axis"))
      keep = [j for j, axes in enumerate(lv.axes) if axes & chan]
      scale, zp, offset = (_along_operand(lv, t, keep) for t in (scale, zp, offset))
      wspec = wspec.replace(granularity=core.PerChannel(tuple(keep)) if keep
                            else core.PerTensor())
    tracked = w.wq.tracks(wspec)
    wop = invals[i]
    kw = dict(act=act, weight=(wspec, scale, zp, offset), compute=compute,
              weight_tracked=tracked)
    try:
      if name == "dot_general":
        dn, perm = core._integer.weight_on_right(  # pylint: disable=protected-access
            p.pop("dimension_numbers"), i, jnp.ndim(x), jnp.ndim(wop))
        y = core.qat_op(name, x, wop, dimension_numbers=dn, **kw, **p)
        y = y if perm is None else jnp.transpose(y, perm)
      else:
        y = core.qat_op(name, x, wop, **kw, **p)
    except ValueError as e:
      if serving:
        return None
      if not integer:
        raise
      raise self._no_integer(lv, str(e).split("arithmetic: ", 1)[-1]) from None
    if out_sharding is not None:
      y = jax.sharding.reshard(y, out_sharding)
    return [y]

  def eval(self, jaxpr, consts, args, labeled):
    env: dict[Any, Any] = {}
    lab: dict[Any, _Labeled] = {}

    def read(v):
      return v.val if isinstance(v, jex_core.Literal) else env[v]

    def rlab(v):
      return None if isinstance(v, jex_core.Literal) else lab.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a, l in zip(jaxpr.invars, args, labeled):
      env[v] = a
      if l is not None:
        lab[v] = l

    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      inlabs = [rlab(v) for v in eqn.invars]
      name = eqn.primitive.name
      out_labs = [None] * len(eqn.outvars)
      if not any(l is not None for l in inlabs):
        outs = _bind(eqn, invals)
      elif name in _MATMUL and any(l is not None for l in inlabs[:2]):
        ops = list(invals)
        ws = [l for l in inlabs[:2] if l is not None]
        outs = self._routed(eqn, invals, inlabs, ws[0].weight.compute)
        if outs is not None:
          self.used.update(l.weight.name for l in ws)
          for v, o in zip(eqn.outvars, outs):
            env[v] = o
          continue
        for i in (0, 1):
          l = inlabs[i]
          if l is not None:
            if l.weight.wq is not None:
              ops[i] = self._quantized(l, self._out_axes(eqn, i, l))
          elif ws[0].weight.aq is not None:
            ops[i] = ws[0].weight.aq(invals[i])
        self.used.update(l.weight.name for l in ws)
        outs = _bind(eqn, ops)
      elif name in _INLINE and "jaxpr" in eqn.params:
        inner = eqn.params["jaxpr"]
        outs, out_labs = self.eval(getattr(inner, "jaxpr", inner), getattr(inner, "consts", ()),
                                   invals, inlabs)
      elif _is_lookup(name, inlabs) and inlabs[0].weight.wq is not None:
        # A row lookup (``jnp.take``, ``table[ids]``) reads the quantized table, one scale
        # per looked-up row under PerOutputChannel(), as the Embed layers and Linen's take.
        l = inlabs[0]
        rows = frozenset().union(*[l.axes[a] for a in eqn.params["dimension_numbers"]
                                   .start_index_map])
        outs = _bind(eqn, [self._quantized(l, rows)] + invals[1:])
        self.used.add(l.weight.name)
        self.looked_up.add(l.weight.name)
        if getattr(l.weight.aq, "optional", None) is False:
          _layers.set_static(l.weight.aq, "optional", _LOOKUP)
      elif name in _LAYOUT and inlabs[0] is not None and not any(inlabs[1:]):
        outs = _bind(eqn, invals)
        l = inlabs[0]
        axes = _layout_axes(eqn, eqn.invars[0].aval.shape, l.axes)
        out_labs = [_Labeled(l.weight, l.root, l.ops + [(eqn, invals[1:])], axes)]
      else:
        # Any other use (a lookup, an add) of a weight that a matmul here quantizes reads it
        # quantized too: the served model holds its codes only (Gemma's tied embedder
        # gathers rows in ``encode`` and multiplies in ``decode``).
        ops = [self._quantized(l, None) if l is not None and l.weight.wq is not None
               and l.weight.name in self._to_matmul else x for x, l in zip(invals, inlabs)]
        outs = _bind(eqn, ops)
      for v, o, l in zip(eqn.outvars, outs, out_labs):
        env[v] = o
        if l is not None:
          lab[v] = l
    return [read(v) for v in jaxpr.outvars], [rlab(v) for v in jaxpr.outvars]


_LOOKUP = ("the table was only looked up during calibration (no matmul read it): there is no "
           "input to quantize")


def _along_operand(lv: _Labeled, t, keep):
  """A range ``t`` (broadcast against the weight) laid out as the op's operand ``lv``.

  The range is broadcast to the weight's shape and taken through the same
  layout ops (dtype conversions left out: a range stays float32), then cut
  to one entry along every operand axis that holds no channel axis.
  """
  if t is None or not jnp.ndim(t):
    return t
  full = jnp.broadcast_to(t, jnp.shape(lv.root))
  for eqn, rest in lv.ops:
    if eqn.primitive.name not in _CASTS:
      full = _bind(eqn, [full] + rest)[0]
  return full[tuple(slice(None) if j in keep else slice(0, 1) for j in range(full.ndim))]


def _is_lookup(name: str, labels) -> bool:
  """Whether an equation gathers from a weight (operand 0) with unlabeled indices."""
  return name == "gather" and labels[0] is not None and not any(
      l is not None for l in labels[1:])


def _reaching_matmuls(jaxpr, weights) -> set:
  """Names of the weights (``_Weight`` per input, or None) that reach a matmul of ``jaxpr``.

  The labels of :meth:`_Interpreter.eval` without evaluating: through layout ops
  and nested calls.
  """
  names: set = set()

  def walk(jaxpr, labels):
    lab = {v: w for v, w in zip(jaxpr.invars, labels) if w is not None}
    for eqn in jaxpr.eqns:
      inl = [None if isinstance(v, jex_core.Literal) else lab.get(v) for v in eqn.invars]
      if not any(w is not None for w in inl):
        continue
      name = eqn.primitive.name
      if name in _MATMUL and any(w is not None for w in inl[:2]):
        names.update(w.name for w in inl[:2] if w is not None)
      elif _is_lookup(name, inl):
        names.add(inl[0].name)
      elif name in _INLINE and "jaxpr" in eqn.params:
        inner = eqn.params["jaxpr"]
        for v, w in zip(eqn.outvars, walk(getattr(inner, "jaxpr", inner), inl)):
          if w is not None:
            lab[v] = w
      elif name in _LAYOUT and inl[0] is not None and not any(w is not None for w in inl[1:]):
        lab[eqn.outvars[0]] = inl[0]
    return [None if isinstance(v, jex_core.Literal) else lab.get(v) for v in jaxpr.outvars]

  walk(jaxpr, weights)
  return names


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]
