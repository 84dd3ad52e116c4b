"""Quantizing modules that are not Flax's own layers, by jaxpr interception.

Models from other libraries define modules that call ``jnp.einsum``,
``jnp.matmul``/``@``, ``jnp.dot``, ``jax.lax.dot_general`` or
``jax.lax.conv_general_dilated`` (directly or through ``lax.conv_transpose``
and friends) on their own parameters. Swapping Flax's layer classes does not
reach them, and patching ``jax.numpy`` functions misses aliases, the ``@``
operator and operands that were transposed or cast first. jaxqat works one
level lower, on the primitives:

1. The module's class is swapped (in place) for a subclass whose
   ``__call__`` traces the original ``__call__`` with ``jax.make_jaxpr``,
   on a copy of the module made with ``nnx.split``/``nnx.merge`` so that
   state updates inside the call (batch statistics, RNG counters, nested
   quantizers) are returned as outputs and written back with ``nnx.update``.
2. The jaxpr is evaluated again, primitive by primitive, in the caller's
   trace (so it works eagerly and under ``jit``, ``grad``, ``nnx.scan`` and
   ``nnx.vmap``). A dataflow pass labels every value computed from one of the
   module's own parameters by layout-only primitives (reshape, transpose,
   convert_element_type, broadcast, squeeze, expand_dims, slice, copy, rev;
   through nested ``jit`` calls). When a ``dot_general`` or
   ``conv_general_dilated`` consumes a labeled value, it is fed the same
   layout ops applied to the **fake-quantized parameter** (weight quantizer,
   applied on the parameter in its own layout so per-channel axes refer to
   the parameter's axes), and its other operand is fake-quantized by the
   parameter's **input quantizer**.
3. Quantizer state lives in the module, created at conversion: two
   ``nnx.Dict`` attributes, ``jaxqat_weight_quant`` and
   ``jaxqat_input_quant``, keyed by the parameter's name (``"w"``,
   ``"layers.0"`` for a parameter in a list). For stacked modules (created
   with ``nnx.vmap``) the state has the parameters' leading axes, so it is
   sliced with them inside ``nnx.scan``.

Limits (documented behaviour, with warnings): matmuls between two
activations (no parameter operand, e.g. attention scores) are left in float
-- quantize them by hand with :class:`~jaxqat.flax.nnx.ActQuant`; a
parameter that reaches a matmul only through a non-layout op (e.g. ``w *
mask``, ``w / norm(w)``) or inside ``scan``/``while``/``cond``/custom-gradient
functions is not identified, and a warning names the parameters whose
quantizer was never used; input quantizers of intercepted modules are per
tensor (the operand layout inside an einsum is not known in advance).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from jaxqat import core
from jaxqat.flax.nnx._quantizer import ACT
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._quantizer import WEIGHT

__all__ = ["InterceptMixin", "intercept", "describe"]

# Primitives that move/cast a weight without changing what it means.
_LAYOUT = frozenset({
    "reshape", "transpose", "convert_element_type", "broadcast_in_dim", "squeeze",
    "expand_dims", "copy", "copy_p", "rev", "reduce_precision", "slice", "dynamic_slice",
})
_MATMUL = frozenset({"dot_general", "conv_general_dilated"})
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})

_W = "jaxqat_weight_quant"
_A = "jaxqat_input_quant"


def _key(parts) -> str:
  return ".".join(str(p) for p in parts)


class InterceptMixin(nnx.Module):
  """Mixed into a foreign module's class by :func:`intercept`."""

  def __call__(self, *args, **kwargs):
    return _intercepted_call(self, args, kwargs)

  def jaxqat_quantizers(self):
    """``[(quantizer, weight_or_None)]`` for :func:`freeze`."""
    out = []
    for name, parts in self.jaxqat_params:
      wq = self.jaxqat_weight_quant.get(name) if self.jaxqat_weight_quant is not None else None
      if wq is not None:
        out.append((wq, _get_param(self, parts)[...]))
      aq = self.jaxqat_input_quant.get(name) if self.jaxqat_input_quant is not None else None
      if aq is not None:
        out.append((aq, None))
    return out


_CLASSES: dict[type, type] = {}


def _intercept_class(cls: type) -> type:
  if cls not in _CLASSES:
    _CLASSES[cls] = type(f"Intercepted{cls.__name__}", (InterceptMixin, cls),
                         {"__module__": __name__, "jaxqat_float_type": cls})
  return _CLASSES[cls]


def _get_param(module, parts):
  obj = module
  for p in parts:
    obj = obj[p] if isinstance(obj, (nnx.List, nnx.Dict)) else getattr(obj, p)
  return obj


def intercept(module: nnx.Module, params, weight_spec: Optional[core.QuantSpec],
              act_spec: Optional[core.QuantSpec], *, path: str = "", stack_ndim: int = 0):
  """Makes ``module`` quantize the matmuls/convolutions on its own parameters.

  Converts in place (see the module docstring): the class becomes a
  subclass with an intercepting ``__call__`` and the quantizer state is
  added. Usually called by :func:`jaxqat.flax.nnx.quantize`.

  Args:
    module: the module.
    params: ``[(name_parts, nnx.Param)]``, the parameters to treat as weights.
    weight_spec: QuantSpec for the weights, or None. The quantizers are made
      here, before any matmul is seen, so a ``PerOutputChannel()``
      granularity resolves to the **last axis** of each parameter
      (``PerChannel(-1)``, stacked axes excluded) -- the output axis of the
      usual ``x @ w`` layout, but not of ``w @ x`` or of an einsum that
      contracts the last axis. (The Linen front end, which sees each op,
      resolves it per op; here, give an explicit ``PerChannel`` when the
      last axis is not the output axis.)
    act_spec: QuantSpec for the other operand of each matmul, or None. Must
      be per tensor or a block format.
    path: the module path (for messages).
    stack_ndim: leading stacked axes of the parameters.

  Returns:
    ``module``.

  Raises:
    ValueError: if a spec does not fit a parameter, or ``act_spec`` is per
      channel or ``PerOutputChannel()``, naming the layer and parameter.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec
    >>> class Proj(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.array([[0.5, -1.0], [0.26, 2.0]]))
    ...   def __call__(self, x):
    ...     return jnp.einsum("bi,io->bo", x, self.w[...])
    >>> m = intercept(Proj(), [(("w",), Proj().w)], QuantSpec(format="int4"), None)
    >>> m.jaxqat_weight_quant["w"].freeze(m.w[...])   # step 2/7
    >>> m(jnp.array([[1.0, 0.0]]))
    Array([[ 0.5714286, -0.8571429]], dtype=float32)
  """
  if stack_ndim < 0:
    raise ValueError(f"layer '{path}': stack_ndim must be >= 0, got {stack_ndim}")
  if act_spec is not None and act_spec.is_output_channel:
    raise ValueError(f"layer '{path}': the activation spec has granularity PerOutputChannel(), "
                     "which is for weights only; intercepted modules quantize matmul inputs "
                     "per tensor (PerTensor()) or per block")
  if weight_spec is not None and weight_spec.is_output_channel:
    weight_spec = weight_spec.resolve_output_channel((-1,))  # see the docstring
  if act_spec is not None and isinstance(act_spec.granularity, core.PerChannel):
    raise ValueError(f"layer '{path}': intercepted modules quantize matmul inputs per tensor; "
                     f"got an activation spec with {act_spec.granularity}")
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
      wqs[name] = Quantizer(weight_spec, role=WEIGHT, shape=inner, stack_shape=stack, path=where)
    if act_spec is not None:
      aqs[name] = Quantizer(act_spec, role=ACT, shape=(1, 1), stack_shape=stack, path=where)
    names.append((name, tuple(parts)))
  for attr in (_W, _A, "jaxqat_params"):
    if attr in vars(module):
      raise ValueError(f"layer '{path}': attribute '{attr}' exists already")
  module.__class__ = _intercept_class(type(module))
  module.jaxqat_params = tuple(names)
  module.jaxqat_path = path
  module.jaxqat_stack_ndim = stack_ndim
  module.jaxqat_weight_quant = nnx.Dict(wqs) if wqs else nnx.data(None)
  module.jaxqat_input_quant = nnx.Dict(aqs) if aqs else nnx.data(None)
  return module


def describe(module) -> str:
  """One line: the weights intercepted and their specs (for reports)."""
  names = [n for n, _ in module.jaxqat_params]
  parts = [f"{type(module).jaxqat_float_type.__name__} weights {names}"]
  if module.jaxqat_weight_quant is not None:
    parts.append(f"weight {next(iter(module.jaxqat_weight_quant.values())).describe()}")
  if module.jaxqat_input_quant is not None:
    parts.append(f"input {next(iter(module.jaxqat_input_quant.values())).describe()}")
  if module.jaxqat_stack_ndim:
    parts.append(f"stacked axes {module.jaxqat_stack_ndim}")
  return ", ".join(parts)


# --------------------------------------------------------------------------
# The call: trace, then re-evaluate with quantized matmul operands.
# --------------------------------------------------------------------------


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def _quant_filter(path, value) -> bool:
  return bool(path) and path[0] in (_W, _A)


def _all_float(module) -> bool:
  for d in (module.jaxqat_weight_quant, module.jaxqat_input_quant):
    if d is not None and any(q.mode != "float" for q in d.values()):
      return False
  return True


def _intercepted_call(self, args, kwargs):
  float_call = type(self).jaxqat_float_type.__call__
  if _all_float(self):
    return float_call(self, *args, **kwargs)
  graphdef, qstate, rest = nnx.split(self, _quant_filter, ...)
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
    out = float_call(m, *a, **kw)
    _, _, new_rest = nnx.split(m, _quant_filter, ...)
    return out, new_rest

  in_vals = rest_vals + [arg_leaves[i] for i in dyn_idx]
  closed, out_shape = jax.make_jaxpr(inner, return_shape=True)(*in_vals)
  out_def = jax.tree_util.tree_structure(out_shape)

  # Which jaxpr inputs are the module's own weights.
  path_to_name = {parts: name for name, parts in self.jaxqat_params}
  labels = [path_to_name.get(p) for p in rest_paths] + [None] * len(dyn_idx)
  wq = self.jaxqat_weight_quant
  aq = self.jaxqat_input_quant
  interp = _Interpreter(
      weight_quant={n: wq[n] for n in wq} if wq is not None else {},
      input_quant={n: aq[n] for n in aq} if aq is not None else {},
  )
  qvals = [interp.quant_weight(lab, v) if lab is not None else None
           for lab, v in zip(labels, in_vals)]
  outs, _, _ = interp.eval(closed.jaxpr, closed.consts, in_vals, labels, qvals)
  out, new_rest = jax.tree_util.tree_unflatten(out_def, outs)
  nnx.update(self, new_rest)
  unused = [n for n, _ in self.jaxqat_params if n not in interp.used]
  if unused:
    warnings.warn(
        f"jaxqat: layer '{self.jaxqat_path}' ({type(self).jaxqat_float_type.__name__}): "
        f"parameters {unused} feed no matmul/convolution that jaxqat can identify (see "
        "jaxqat.flax.nnx._intercept); they stay in float", stacklevel=3)
  return out


class _Interpreter:
  """Evaluates a jaxpr, quantizing matmul operands derived from weights."""

  def __init__(self, weight_quant: dict, input_quant: dict):
    self.weight_quant = weight_quant
    self.input_quant = input_quant
    self.used: set[str] = set()

  def quant_weight(self, name, value):
    q = self.weight_quant.get(name)
    return q(value) if q is not None else value

  def quant_input(self, name, value):
    q = self.input_quant.get(name)
    return q(value) if q is not None else value

  def eval(self, jaxpr, consts, args, labels, qvals):
    env: dict[Any, Any] = {}
    lab: dict[Any, Optional[str]] = {}
    qenv: dict[Any, Any] = {}

    def read(v):
      return v.val if isinstance(v, jex_core.Literal) else env[v]

    def rlab(v):
      return None if isinstance(v, jex_core.Literal) else lab.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a, l, q in zip(jaxpr.invars, args, labels, qvals):
      env[v] = a
      if l is not None:
        lab[v], qenv[v] = l, q

    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      inlabs = [rlab(v) for v in eqn.invars]
      name = eqn.primitive.name
      if not any(inlabs):
        outs = _bind(eqn, invals)
        out_labs = [None] * len(outs)
        out_q = [None] * len(outs)
      elif name in _MATMUL:
        ops = list(invals)
        w_names = [l for l in inlabs[:2] if l is not None]
        for i in (0, 1):
          if inlabs[i] is not None:
            ops[i] = qenv[eqn.invars[i]]
          else:
            ops[i] = self.quant_input(w_names[0], invals[i])
        self.used.update(w_names)
        outs = _bind(eqn, ops)
        out_labs = [None] * len(outs)
        out_q = [None] * len(outs)
      elif name in _INLINE and "jaxpr" in eqn.params:
        inner = eqn.params["jaxpr"]
        inner_jaxpr = getattr(inner, "jaxpr", inner)
        inner_consts = getattr(inner, "consts", ())
        inq = [qenv.get(v) if l is not None else None for v, l in zip(eqn.invars, inlabs)]
        outs, out_labs, out_q = self.eval(inner_jaxpr, inner_consts, invals, inlabs, inq)
      elif name in _LAYOUT and inlabs[0] is not None and not any(inlabs[1:]):
        outs = _bind(eqn, invals)
        out_q = _bind(eqn, [qenv[eqn.invars[0]]] + invals[1:])
        out_labs = [inlabs[0]] * len(outs)
      else:
        outs = _bind(eqn, invals)
        out_labs = [None] * len(outs)
        out_q = [None] * len(outs)
      for v, o, l, q in zip(eqn.outvars, outs, out_labs, out_q):
        env[v] = o
        if l is not None:
          lab[v], qenv[v] = l, q
    return ([read(v) for v in jaxpr.outvars], [rlab(v) for v in jaxpr.outvars],
            [qenv.get(v) if rlab(v) is not None else None for v in jaxpr.outvars])


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]
