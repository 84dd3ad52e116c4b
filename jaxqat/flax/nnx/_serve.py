"""Serving NNX models: ``convert``, the size report, encodings files, ``jax.export``.

:func:`convert` turns a calibrated (or QAT-trained) model into a **served
model**: a new NNX model in which every quantized Flax layer holds its
weight as integer codes and scales (a :class:`ServedWeight`, the leaves of
a :class:`jaxqat.core.QTensor`) and its input range as a
:class:`ServedEncoding`, and computes with the core kernels
(:func:`jaxqat.core.quantized_dot_general` and friends). The QAT model is
not modified.

**Served layers keep Flax's logic.** ``ServedLinear`` subclasses
``nnx.Linear`` (and so on for ``LinearGeneral``, ``Einsum``, ``Conv``,
``Embed``): Flax's own ``__call__`` runs (padding modes, feature groups,
batch axes, bias, masks), reading ``self.kernel[...]``, which returns the
quantized weight; the layer's ``promote_dtype`` hook promotes the input as
Flax does and attaches the input encoding, and the layer's ``dot_general``
/ ``einsum_op`` / ``conv_general_dilated`` is the core kernel. A custom
``dot_general`` of the float layer is therefore replaced.

**State.** The codes, scales and zero points are :class:`ServedArray`
variables (not ``nnx.Param``: optimizers and ``nnx.grad(wrt=nnx.Param)``
skip them); the spec, the dequantized dtype and the packing are static
(graph definition). ``nnx.state``, ``nnx.split``/``nnx.merge``, ``nnx.jit``
and :func:`jaxqat.flax.nnx.save`/``restore`` work as for any model. The
state paths are the float model's: ``layers/0/kernel/values``,
``layers/0/kernel/scale``, ``layers/0/input_encoding/scale``.

**Parity.** A weight is quantized in the dtype Flax promotes it to before
the op (the layer's ``dtype``, else the parameter's), with the range the
fake-quant model uses at this moment (a fixed-range weight quantizer that
is not frozen: the current weight's range), so with weight-only
quantization (or ``integer=False``) the served model computes the fake-quant
model's arithmetic, bit for bit. With static integer input quantization
(the default W8A8) matmuls and convolutions run on int8 codes with int32
accumulation; the difference to the fake-quant model is bounded by
:func:`jaxqat.core.integer_error_bound`.

**Names** of layers and of their encodings
(:func:`jaxqat.flax.nnx.export_encodings`): see
:mod:`jaxqat.flax.nnx._encodings`.

**Intercepted modules** (:func:`jaxqat.flax.nnx.intercept`): each weight
variable keeps its path and holds the unpacked codes (a :class:`ServedArray`),
its scales live in ``jaxqat_served_weights``, its input ranges in
``jaxqat_served_inputs``; the call dequantizes the codes in a copy of the
module and replays the interception with the served input encodings (a
float copy of the weight exists only inside the call). With ``integer=True``
a matmul or convolution of such a weight and a statically quantized integer
input runs :func:`jaxqat.core.qat_op`'s integer forward (int8 x int8 ->
int32, one rescale): the op a QAT model trained with ``compute="integer"``
runs, bit for bit. Other ops, and ``integer=False``, compute what the
fake-quant module computes, bit for bit. Run
:func:`~jaxqat.flax.nnx.calibrate` before converting a module whose ``PerOutputChannel()`` weights are resolved per
op. A module intercepted only to read the weights of its quantized layers
(``quantize(..., methods=...)`` without weights of its own, e.g. a tied
head reading ``self.embed.embedding``) is refused, naming the layer: the
served layers hold codes, not float weights. Code that reads a quantized
layer's ``kernel`` directly outside of an intercepted method breaks
likewise.

**Stacked** (``nnx.vmap``) layers are converted slice by slice: their codes
and scales carry the stacked leading axes and are sliced by ``nnx.scan``
like any variable.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqat import core
from jaxqat.flax.nnx import _intercept
from jaxqat.flax.nnx import _layers
from jaxqat.flax.nnx._convert import is_quantized
from jaxqat.flax.nnx._convert import path_str
from jaxqat.flax.nnx._encodings import act_encoding as _act_encoding
from jaxqat.flax.nnx._encodings import check_modes as _check_modes
from jaxqat.flax.nnx._encodings import get_param as _param
from jaxqat.flax.nnx._encodings import owners as _owners
from jaxqat.flax.nnx._encodings import promoted_weight as _promoted_weight
from jaxqat.flax.nnx._encodings import weight_encoding as _weight_encoding

__all__ = [
    "ServedArray",
    "ServedWeight",
    "ServedEncoding",
    "ServedLinear",
    "ServedLinearGeneral",
    "ServedEinsum",
    "ServedConv",
    "ServedEmbed",
    "ServedActQuant",
    "convert",
    "size_report",
    "export_serving",
    "served_meta",
]


# --------------------------------------------------------------------------
# State of served layers.
# --------------------------------------------------------------------------


class ServedArray(nnx.Variable):
  """A fixed array of a served model: weight codes, scales, zero points, input ranges.

  Not an ``nnx.Param``: optimizers and ``nnx.grad(..., wrt=nnx.Param)`` leave
  it alone.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> isinstance(ServedArray(jnp.zeros((2,), jnp.int8)), nnx.Param)
    False
  """


def _var(x):
  return nnx.data(None) if x is None else ServedArray(x)


def _get(v):
  return None if v is None else v[...]


class ServedWeight(nnx.Module):
  """A served layer's weight: the leaves of a :class:`jaxqat.core.QTensor`.

  ``values`` (codes, packed or not), ``scale``, ``zero_point`` and
  ``tensor_scale`` are :class:`ServedArray` variables (or ``None``);
  ``spec``, ``dtype`` (what dequantization returns), ``packed`` and
  ``float_dtype`` (the float model's parameter dtype, for
  :func:`size_report`) are static. ``weight[...]`` returns the operand the
  served layer's op takes.

  Args:
    qt: the quantized weight (with leading stacked axes for ``nnx.vmap``
      layers).
    float_dtype: the float parameter's dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quantize
    >>> w = ServedWeight(quantize(jnp.ones((2, 3)), 0.1, spec=QuantSpec()), jnp.float32)
    >>> w.values[...].dtype, w.shape
    (dtype('int8'), (2, 3))
  """

  def __init__(self, qt: core.QTensor, float_dtype):
    self.values = ServedArray(qt.values)
    self.scale = _var(qt.scale)
    self.zero_point = _var(qt.zero_point)
    self.tensor_scale = _var(qt.tensor_scale)
    self.spec = qt.spec
    self.dtype = np.dtype(qt.dtype)
    self.packed = int(qt.packed)
    self.float_dtype = np.dtype(float_dtype)

  def qtensor(self) -> core.QTensor:
    """The :class:`jaxqat.core.QTensor` (of the current, possibly scan-sliced, leaves)."""
    return core.QTensor(self.values[...], _get(self.scale), _get(self.zero_point),
                        _get(self.tensor_scale), spec=self.spec, dtype=self.dtype,
                        packed=self.packed)

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape (one entry per weight element)."""
    return tuple(self.qtensor().shape)

  def __getitem__(self, index):
    stack = _layers._stack()  # pylint: disable=protected-access
    if stack and any(v is self for v in vars(stack[-1]).values()):
      if index is not Ellipsis:
        raise TypeError("ServedWeight: only weight[...] is supported (a served weight holds "
                        "codes; use .qtensor() or jaxqat.core.dequantize)")
      return _Operand(self.qtensor())  # its own layer's op
    # Read directly by another module (``embedder.embedding[...].at[ids].get()``,
    # ``h @ embed.embedding[:].T``): the fake-quant model read the float weight there,
    # the served model has only codes.
    warnings.warn(
        "jaxqat: a served weight is read directly by a module other than its layer (not "
        "through the layer's call): the served model uses its dequantized codes there, where "
        "the fake-quant model read the float weight, so the two differ by that weight's "
        "rounding; keep the layer float (Rule(pattern=..., skip=True)) to serve the float "
        "weight", core.QuantizationWarning, stacklevel=2)
    return core.dequantize(self.qtensor())[index]


class ServedEncoding(nnx.Module):
  """A served input range: a :class:`jaxqat.core.Encoding` as variables.

  Args:
    enc: the encoding (with leading stacked axes for ``nnx.vmap`` layers).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import Encoding, QuantSpec
    >>> e = ServedEncoding(Encoding(jnp.float32(0.5), None, QuantSpec()))
    >>> float(e.encoding().scale)
    0.5
  """

  def __init__(self, enc: core.Encoding):
    self.scale = _var(enc.scale)
    self.zero_point = _var(enc.zero_point)
    self.spec = enc.spec

  def encoding(self) -> core.Encoding:
    """The :class:`jaxqat.core.Encoding`."""
    return core.Encoding(_get(self.scale), _get(self.zero_point), self.spec)


class _Operand:
  """The weight operand a served layer's op receives (through Flax's code)."""

  def __init__(self, qt: core.QTensor):
    self.qt = qt
    self.act = None
    self.integer = True

  @property
  def shape(self):
    return self.qt.shape

  @property
  def ndim(self):
    return len(self.qt.shape)

  @property
  def dtype(self):
    return self.qt.dtype

  def __mul__(self, mask):
    return self  # Conv's mask: applied to the weight before it was quantized

  __imul__ = __mul__


# --------------------------------------------------------------------------
# Served layers.
# --------------------------------------------------------------------------


def _served_promote(args, /, **kwargs):
  """``promote_dtype`` hook of served layers: Flax's promotion, then the input encoding."""
  stack = _layers._stack()  # pylint: disable=protected-access
  layer = stack[-1] if stack else None
  if not isinstance(layer, _ServedMixin):
    raise RuntimeError("jaxqat: a served layer's promote_dtype hook was called outside of the "
                       "layer's __call__")
  stand = tuple(jnp.zeros((), a.dtype) if isinstance(a, _Operand) else a for a in args)
  out = list(layer.jaxqat_float_promote(stand, **kwargs))
  act = layer.input_encoding.encoding() if layer.input_encoding is not None else None
  op = None
  for i, a in enumerate(args):
    if isinstance(a, _Operand):
      out[i] = op = a
  if op is not None:
    op.act, op.integer = act, layer.jaxqat_integer
  elif act is not None and len(out) > 1:
    out[0] = core.fake_quantize_input(out[0], act)
  return tuple(out)


def _reshard(y, out_sharding):
  return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)


def _served_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                        out_sharding=None):
  y = core.quantized_dot_general(x, w.qt, dimension_numbers, act=w.act, precision=precision,
                                 preferred_element_type=preferred_element_type,
                                 integer=w.integer)
  return _reshard(y, out_sharding)


def _served_einsum(subscripts, x, w, precision=None, preferred_element_type=None,
                   out_sharding=None):
  y = core.quantized_einsum(subscripts, x, w.qt, act=w.act, precision=precision,
                            preferred_element_type=preferred_element_type, integer=w.integer)
  return _reshard(y, out_sharding)


def _served_conv(x, w, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 precision=None, preferred_element_type=None, out_sharding=None):
  y = core.quantized_conv_general_dilated(
      x, w.qt, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, act=w.act, precision=precision,
      preferred_element_type=preferred_element_type, integer=w.integer)
  return _reshard(y, out_sharding)


class _ServedMixin(nnx.Module):
  """Served version of a quantized Flax layer (see the module docstring)."""

  weight_attr = "kernel"
  op_attr = "dot_general"
  op_fn = staticmethod(_served_dot_general)

  def __call__(self, *args, **kwargs):
    with _layers._active(self):  # pylint: disable=protected-access
      return super().__call__(*args, **kwargs)

  def jaxqat_serve(self, qt, act, integer: bool, float_dtype) -> None:
    """Turns this (cloned, quantized) layer into its served form, in place."""
    if qt is not None:
      setattr(self, self.weight_attr, ServedWeight(qt, float_dtype))
      if self.op_attr is not None:
        setattr(self, self.op_attr, self.op_fn)
      if hasattr(self, "dot_general_cls"):
        self.dot_general_cls = None
    self.input_encoding = ServedEncoding(act) if act is not None else nnx.data(None)
    self.jaxqat_integer = bool(integer)
    self.promote_dtype = _served_promote


class ServedLinear(_ServedMixin, nnx.Linear):
  """A served ``nnx.Linear`` (made by :func:`convert`): integer kernel codes."""


class ServedLinearGeneral(_ServedMixin, nnx.LinearGeneral):
  """A served ``nnx.LinearGeneral`` (made by :func:`convert`)."""


class ServedEinsum(_ServedMixin, nnx.Einsum):
  """A served ``nnx.Einsum`` (made by :func:`convert`)."""

  op_attr = "einsum_op"
  op_fn = staticmethod(_served_einsum)


class ServedConv(_ServedMixin, nnx.Conv):
  """A served ``nnx.Conv`` (made by :func:`convert`), grouped and depthwise included."""

  op_attr = "conv_general_dilated"
  op_fn = staticmethod(_served_conv)


class ServedEmbed(_ServedMixin, nnx.Embed):
  """A served ``nnx.Embed`` (made by :func:`convert`).

  Lookups gather the codes of the requested rows and dequantize only those
  (:func:`jaxqat.core.quantized_take`); :meth:`attend` runs the integer
  matmul when the query is statically quantized.
  """

  weight_attr = "embedding"
  op_attr = None  # __call__ and attend are served here

  def __call__(self, inputs, out_sharding=None):
    if not isinstance(self.embedding, ServedWeight):
      return super().__call__(inputs, out_sharding=out_sharding)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    qt = self.embedding.qtensor()
    if self.num_embeddings == 1:
      return jnp.broadcast_to(core.dequantize(qt), inputs.shape + (self.features,))
    return _reshard(core.quantized_take(qt, inputs, axis=0), out_sharding)

  def attend(self, query, out_sharding=None):
    with _layers._active(self):  # pylint: disable=protected-access
      if not isinstance(self.embedding, ServedWeight):
        return super().attend(query, out_sharding=out_sharding)
      query, op = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    if op.integer and core.integer_reason(op.qt, op.act, (1,)) is None:
      y = core.quantized_dot_general(query, op.qt, dims, act=op.act)
    else:  # the fake-quant layer's arithmetic: jnp.dot(query, embedding.T)
      y = jnp.dot(core.fake_quantize_input(query, op.act), core.dequantize(op.qt).T)
    return _reshard(y, out_sharding)


class ServedActQuant(nnx.Module):
  """A served :class:`~jaxqat.flax.nnx.ActQuant`: fake-quantizes with a fixed encoding.

  ``input_encoding`` is a :class:`ServedEncoding`, or ``None`` when the
  quantizer saw no data during calibration (the input stays float).
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns ``x`` quantized and dequantized with the served range."""
    if self.input_encoding is None:
      return x
    return core.fake_quantize_input(x, self.input_encoding.encoding())


class _ServedWeightQuant(nnx.Module):
  """A served intercepted weight's scales; as its "quantizer", the identity.

  The served module's weight variable holds the (unpacked) codes; the call
  dequantizes them and runs the interception of :mod:`._intercept` with this
  object in place of the weight quantizer (the weight is quantized already).
  With ``serves_integer`` (``convert(..., integer=True)``) a matmul or
  convolution of the weight and a statically quantized input runs
  :func:`jaxqat.core.qat_op`'s integer forward with these scales (:meth:`ranges`):
  the codes of the dequantized weight are its codes, so this is the op of a
  QAT model trained with ``compute="integer"``, bit for bit.
  """

  def __init__(self, qt: core.QTensor, stack_shape, serves_integer: bool = False):
    self.serves_integer = bool(serves_integer)
    self.scale = _var(qt.scale)
    self.zero_point = _var(qt.zero_point)
    self.tensor_scale = _var(qt.tensor_scale)
    self.spec = qt.spec
    self.dtype = np.dtype(qt.dtype)
    self.stack_shape = tuple(stack_shape)
    self.shape = tuple(qt.shape)[len(self.stack_shape):]  # as a Quantizer's: one layer's
    self.mode = "quant"
    self.output_channel_spec = None

  def qtensor(self, codes) -> core.QTensor:
    return core.QTensor(codes, _get(self.scale), _get(self.zero_point), _get(self.tensor_scale),
                        spec=self.spec, dtype=self.dtype, packed=0)

  def __call__(self, x, *, spec=None):
    return x

  def ranges(self, x, *, spec=None):
    """``(spec, scale, zero_point, None)``: the served range, as ``core.qat_op`` takes it."""
    del x, spec
    return (self.spec, _get(self.scale), _get(self.zero_point), None)

  def tracks(self, spec=None) -> bool:
    del spec
    return False


class _ServedInputQuant(nnx.Module):
  """A served intercepted weight's input range (fake-quantizes the other matmul operand)."""

  def __init__(self, enc: core.Encoding):
    self.input_encoding = ServedEncoding(enc)
    self.mode = "quant"

  def __call__(self, x):
    return core.fake_quantize_input(x, self.input_encoding.encoding())

  def ranges(self, x):
    """``(spec, scale, zero_point, None)``: the served input range, as ``core.qat_op`` takes it."""
    del x
    enc = self.input_encoding.encoding()
    return (enc.spec, enc.scale, enc.zero_point, None)


class ServedInterceptMixin(nnx.Module):
  """Mixed into a served intercepted module's class (see :func:`convert`)."""


def _served_intercept_class(cls: type) -> type:
  """The served class of an intercepted class ``cls`` (same methods)."""
  return _intercept._intercept_class(cls.jaxqat_float_type, cls.jaxqat_methods, cls.jaxqat_also,  # pylint: disable=protected-access
                                     mixin=ServedInterceptMixin, prefix="Served",
                                     call_fn=_served_intercepted_call)




def _served_intercepted_call(self, method, args, kwargs, secondary: bool = False):
  """Dequantizes the codes in a copy of the module and runs the interception on it.

  The copy's weights are the dequantized codes (the fake-quant weights, bit
  for bit), its weight "quantizers" the identity and its input quantizers
  the served encodings, so the call computes what the fake-quant module
  computes. Served intercepted modules inside it are treated the same way:
  the fake-quant call read their weights quantized where it multiplied by
  them (a root module's ``h @ self.embedder.table[...].T``), never their
  codes. State the call changes (batch statistics...) is written back.
  """
  graphdef, state = nnx.split(self)
  tmp = nnx.merge(graphdef, state)
  skip = set()  # paths of codes (dequantized in the copy)
  for path, node in list(nnx.iter_graph(tmp)):
    if isinstance(node, ServedInterceptMixin):
      skip.update(tuple(path) + tuple(parts) for _, parts in node.jaxqat_params)
      _unserve(node)
  out = _intercept._intercepted_call(tmp, method, args, kwargs, secondary)  # pylint: disable=protected-access
  new = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(tmp))}
  for p, var in nnx.to_flat_state(nnx.state(self)):
    p = tuple(p)
    if not p or p in skip or "jaxqat_served_weights" in p or "jaxqat_served_inputs" in p:
      continue
    nv = new.get(p)
    if nv is not None and nv[...] is not var[...]:
      _param(self, p)[...] = nv[...]
  return out


def _unserve(node) -> None:
  """Turns a served intercepted module (a copy) into an intercepted one of dequantized codes."""
  cls = type(node)
  ws, ins = node.jaxqat_served_weights, node.jaxqat_served_inputs
  for name, parts in node.jaxqat_params:
    if ws is not None and name in ws:
      codes = _param(node, parts)[...]  # a new variable: merge may share the module's own
      _layers.set_path(node, tuple(parts), ServedArray(core.dequantize(ws[name].qtensor(codes))))
  del node.jaxqat_served_weights, node.jaxqat_served_inputs
  node.__class__ = _intercept._intercept_class(cls.jaxqat_float_type, cls.jaxqat_methods,  # pylint: disable=protected-access
                                               cls.jaxqat_also)
  node.jaxqat_weight_quant = ws
  node.jaxqat_input_quant = ins


SERVED_LAYERS: dict[type, type] = {
    _layers.QuantLinear: ServedLinear,
    _layers.QuantLinearGeneral: ServedLinearGeneral,
    _layers.QuantEinsum: ServedEinsum,
    _layers.QuantConv: ServedConv,
    _layers.QuantEmbed: ServedEmbed,
}


def is_served(model: nnx.Module) -> bool:
  """Whether ``model`` holds served layers (made by :func:`convert`)."""
  return any(isinstance(n, (ServedWeight, ServedEncoding, _ServedMixin, ServedActQuant,
                            ServedInterceptMixin)) for _, n in nnx.iter_graph(model))


# --------------------------------------------------------------------------
# convert.
# --------------------------------------------------------------------------


def _intercept_plan(node, where: str) -> dict:
  """``{param name: (QTensor or None, input Encoding or None)}`` of an intercepted module."""
  plan = {}
  for name, parts in node.jaxqat_params:
    wq = node.jaxqat_weight_quant.get(name) if node.jaxqat_weight_quant is not None else None
    aq = node.jaxqat_input_quant.get(name) if node.jaxqat_input_quant is not None else None
    qt = None
    if not _intercept.feeds_matmul(node, name):
      wq = None  # added, not multiplied, in the fake-quant call: served float too
    if wq is not None:  # unpacked: the codes keep the weight's shape and path
      _, qt = _weight_encoding(wq, _param(node, parts)[...], f"{where}/{name}", False)
    plan[name] = (qt, wq, _act_encoding(aq, f"{where}/{name}", "convert"))
  return plan


def _serve_intercepted(node, plan: dict, integer: bool) -> None:
  """Turns a (cloned) intercepted module into its served form, in place."""
  cls = type(node)
  ws, ins = {}, {}
  for name, parts in node.jaxqat_params:
    qt, wq, act = plan[name]
    if qt is not None:
      _layers.set_path(node, tuple(parts), ServedArray(qt.values))
      ws[name] = _ServedWeightQuant(qt, wq.stack_shape, integer)
    if act is not None:
      ins[name] = _ServedInputQuant(act)
  del node.jaxqat_weight_quant, node.jaxqat_input_quant
  node.__class__ = _served_intercept_class(cls)
  node.jaxqat_served_weights = nnx.Dict(ws) if ws else nnx.data(None)
  node.jaxqat_served_inputs = nnx.Dict(ins) if ins else nnx.data(None)



def convert(model: nnx.Module, *, integer: bool = True, pack: bool = True) -> nnx.Module:
  """Converts a calibrated or QAT model into a served model (a new model).

  Every quantized Flax layer becomes its served class (``ServedLinear`` ...):
  its weight is replaced by integer codes and scales (:class:`ServedWeight`;
  no float copy of the weight remains), its input quantizer by a fixed
  :class:`ServedEncoding`; intercepted modules hold codes too (their ops on
  a statically quantized input run the integer forward when ``integer``);
  an :class:`~jaxqat.flax.nnx.ActQuant` becomes a :class:`ServedActQuant`. Skipped layers stay float. The weight's range is
  the one the fake-quant model uses now: stored (frozen fixed range, LSQ
  step size) or, for a fixed-range weight quantizer that is not frozen,
  the current weight's. An input quantizer that saw no data during
  calibration (``disabled``) leaves its input float. ``model`` is not
  modified (the served model shares nothing mutable with it).

  Args:
    model: a quantized NNX model (:func:`jaxqat.flax.nnx.quantize`), with
      its activation quantizers calibrated, every quantizer in ``"quant"``
      mode.
    integer: run matmuls and convolutions on int8 codes with int32
      accumulation where the input is statically quantized to <= 8 bits per
      tensor (see :mod:`jaxqat.core._integer`); ``False`` always dequantizes
      the weight (bit for bit the fake-quant model).
    pack: store int4/int2 codes packed along the weight's last axis.

  Returns:
    The served model (same structure and paths; call it as the QAT model).

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if ``model`` is not quantized or is served already; if a
      quantizer is not in ``"quant"`` mode; if an input quantizer was never
      calibrated; if a module is intercepted only to read its quantized
      layers' weights (see the module docstring). Each message names the
      layer; nothing is modified.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize, calibrate
    >>> x = jnp.linspace(-1, 1, 8).reshape(2, 4)
    >>> model = calibrate(quantize(nnx.Linear(4, 3, rngs=nnx.Rngs(0))), [x])
    >>> served = convert(model)
    >>> type(served).__name__, served.kernel.values[...].dtype
    ('ServedLinear', dtype('int8'))
    >>> bool(jnp.allclose(served(x), model(x), atol=1e-5))
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  if is_served(model):
    raise ValueError("model: the model is served already (made by convert); convert the QAT "
                     "model")
  if not is_quantized(model):
    raise ValueError("model: convert needs a quantized model; run "
                     "jaxqat.flax.nnx.quantize(model, rules) (and calibrate) first")
  _check_modes(model, "convert")
  plans: dict[tuple, tuple] = {}
  model_ran = any(_layers.ran(n) for _, n in _owners(model))
  for path, node in _owners(model):
    where = path_str(path) or "<root>"
    if isinstance(node, _intercept.InterceptMixin):
      if not node.jaxqat_params:
        raise ValueError(
            f"convert: layer '{where}' ({type(node).jaxqat_float_type.__name__}) is intercepted "
            "only to read the weights of its quantized layers (quantize(..., methods=...)); "
            "convert does not support that (the served layers hold codes, not float weights)")
      plans[path] = ("intercept", _intercept_plan(node, where))
      continue
    if isinstance(node, _layers.ActQuant):
      plans[path] = ("act", _act_encoding(node.quantizer, where, "convert"))
      continue
    wq = getattr(node, node.quant_attr)
    if model_ran and not _layers.ran(node):
      wq = None  # never called: its weight was read directly, in float (see report)
    act = _act_encoding(node.input_quant, where, "convert")
    qt, float_dtype = None, None
    if wq is not None:
      w = _promoted_weight(node)
      float_dtype = getattr(node, node.weight_attr)[...].dtype
      _, qt = _weight_encoding(wq, w, where, bool(pack))
    plans[path] = ("layer", qt, act, float_dtype)
  served = nnx.clone(model)
  for path, node in list(_owners(served)):
    plan = plans[path]
    if plan[0] == "intercept":
      _serve_intercepted(node, plan[1], integer)
      continue
    if plan[0] == "act":
      del node.quantizer
      node.__class__ = ServedActQuant
      node.input_encoding = ServedEncoding(plan[1]) if plan[1] is not None else nnx.data(None)
      continue
    _, qt, act, float_dtype = plan
    quant_attr = node.quant_attr
    node.__class__ = SERVED_LAYERS[type(node)]
    delattr(node, quant_attr)
    del node.input_quant
    if hasattr(node, "jaxqat_stack"):
      del node.jaxqat_stack
    node.jaxqat_serve(qt, act, integer, float_dtype)
  for attr in ("jaxqat_layers", "jaxqat_unused_rules"):
    if attr in vars(served):
      delattr(served, attr)
  return served


# --------------------------------------------------------------------------
# Size report, serving export, checkpoint metadata.
# --------------------------------------------------------------------------


def size_report(served: nnx.Module) -> core.SizeReport:
  """The per-weight size table of a served model and its compression ratio.

  One row per served weight (codes, scales and zero points against the
  float parameter's bytes) and per float parameter of rank >= 2 other than
  a ``bias`` (the weights of layers left float); biases and other vectors
  are not listed.

  Args:
    served: a model made by :func:`convert` (a float or QAT model gives
      its float weights).

  Returns:
    A :class:`jaxqat.core.SizeReport` (``str()`` prints the table).

  Raises:
    TypeError: if ``served`` is not an NNX module.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), Rule(pattern=".*",
    ...                                                      weight=QuantSpec()))
    >>> r = size_report(convert(m))
    >>> r.rows[0].layer, r.rows[0].format, round(r.ratio, 4)
    ('kernel', 'int8', 0.2501)
  """
  if not isinstance(served, nnx.Module):
    raise TypeError(f"served: expected a flax.nnx.Module, got {type(served).__name__}")
  rows = []
  for path, node in nnx.iter_graph(served):
    if isinstance(node, ServedWeight):
      rows.append(core.size_row(path_str(path), node.qtensor(), node.float_dtype))
    elif isinstance(node, ServedInterceptMixin) and node.jaxqat_served_weights is not None:
      for name, parts in node.jaxqat_params:
        if name in node.jaxqat_served_weights:
          qt = node.jaxqat_served_weights[name].qtensor(_param(node, parts)[...])
          rows.append(core.size_row(path_str(tuple(path) + tuple(parts)), qt, qt.dtype))
    elif (isinstance(node, nnx.Param) and node[...].ndim >= 2 and path
          and str(path[-1]) != "bias"):
      rows.append(core.size_row(path_str(path), node[...], node[...].dtype))
  return core.SizeReport(rows)


def export_serving(served: nnx.Module, *example_args: Any, batch_polymorphic: bool = False,
                   platforms=None, **example_kwargs: Any) -> bytes:
  """Serializes the served model's forward pass with :mod:`jax.export`.

  The model's state (codes, scales, float parameters of float layers) is
  baked into the program as constants; reload it with
  :func:`jaxqat.core.load_serving` and call it without the model's code.

  Args:
    served: a model made by :func:`convert` (any NNX model works).
    *example_args: example inputs (arrays or ``jax.ShapeDtypeStruct``).
    batch_polymorphic: make every input's leading axis symbolic.
    platforms: target platforms (default: the current backend).
    **example_kwargs: the model's keyword arguments: arrays (inputs of the
      program, given by name) or Python values such as ``train=False``
      (fixed into the program).

  Returns:
    The serialized program (bytes).

  Raises:
    TypeError: if ``served`` is not an NNX module.
    ValueError: if no example argument is given.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule, load_serving
    >>> from jaxqat.flax.nnx import quantize
    >>> served = convert(quantize(nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
    ...                           Rule(pattern=".*", weight=QuantSpec())))
    >>> x = jnp.ones((3, 4))
    >>> bool((load_serving(export_serving(served, x))(x) == served(x)).all())
    True
  """
  if not isinstance(served, nnx.Module):
    raise TypeError(f"served: expected a flax.nnx.Module, got {type(served).__name__}")
  graphdef, state = nnx.split(served)

  def forward(*args, **kwargs):
    return nnx.merge(graphdef, state)(*args, **kwargs)

  return core.export_serving(forward, *example_args, batch_polymorphic=batch_polymorphic,
                             platforms=platforms, **example_kwargs)


def served_meta(model: nnx.Module) -> dict:
  """The static description of a model's served weights and encodings (for checkpoints)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, ServedWeight):
      out[path_str(path)] = {"kind": "weight", "fingerprint": core.spec_fingerprint(node.spec),
                             "dtype": node.dtype.name, "packed": node.packed}
    elif isinstance(node, _ServedWeightQuant):
      out[path_str(path)] = {"kind": "intercepted weight", "dtype": node.dtype.name,
                             "fingerprint": core.spec_fingerprint(node.spec)}
    elif isinstance(node, ServedEncoding):
      out[path_str(path)] = {"kind": "encoding", "fingerprint": core.spec_fingerprint(node.spec)}
  return out
