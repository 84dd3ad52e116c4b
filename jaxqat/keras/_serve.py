r"""convert: a quantization-aware Keras model to a served integer model.

:func:`convert` returns a **new** Keras model (the QAT model is untouched)
in which every quantized layer is replaced by a served layer holding its
weight as integer codes (``int8``; 2- and 4-bit codes packed along the last
axis into ``int8`` bytes) with float32 step sizes and int32 zero points, and
the fixed range of its input (``input_scale``/``input_zero_point``). No
float copy of a quantized weight is left: the served model's weights, and
its ``.keras`` file, hold only the codes and scales (biases and the layers
that stayed float keep their float weights). The served layers are
registered under the ``jaxqat>`` package, so the served model saves and
loads as ``.keras`` with ``safe_mode`` on and no ``custom_objects``.

Quantized layers that a rebuilt graph cannot hold -- those inside custom
(subclassed) layers, such as the attention projections of a model zoo's
transformer block, and quantized subclasses of supported layers or
embedding-like layers -- are **served in place** on a copy of the model
instead (:mod:`jaxqat.keras._serve_inplace`): the copy keeps its own class and
every layer object; each quantized layer holds codes and scales in place of
its float weights. Dense, EinsumDense and convolution layers run the kernels
of their served classes (below); other layers keep their own ``call``, with the
weights dequantized when it runs and the input fake-quantized by its fixed
range (the dequantize path: the QAT model's values in inference, computed in
float).

Served layers: :class:`ServedDense` (Dense), :class:`ServedEinsumDense`,
:class:`ServedConv` (Conv1D/2D/3D, and a folded Conv+BatchNorm:
the folded kernel's codes and the folded bias), :class:`ServedConvTranspose`
(Conv1D/2D/3DTranspose), :class:`ServedDepthwiseConv`
(DepthwiseConv1D/2D, folded or not), :class:`ServedSeparableConv`
(SeparableConv1D/2D: a served depthwise and a served pointwise kernel) and
:class:`ServedEmbedding`.

What a served layer computes, per backend:

* **JAX**: the core kernels (:func:`jaxqat.core.quantized_dot_general`,
  :func:`~jaxqat.core.quantized_einsum`,
  :func:`~jaxqat.core.quantized_conv_general_dilated`,
  :func:`~jaxqat.core.quantized_conv_transpose`,
  :func:`~jaxqat.core.quantized_take`), the input as the left operand. With a
  statically quantized integer input (the default W8A8) and ``integer=True``
  this is an int8 x int8 ``dot_general``/convolution with int32
  accumulation and one rescale, within
  :func:`jaxqat.core.integer_error_bound` of the fake-quant model;
  weight-only layers and ``integer=False`` take the dequantize path, equal
  to the fake-quant model bit for bit.
* **Other backends (torch)**: ``keras.ops``: the weight codes are
  dequantized on the fly with the fake-quant arithmetic (``(q - z) * s``,
  after unpacking with bit operations), the input is fake-quantized with its
  fixed range, and the float layer's own op runs (``ops.matmul``,
  ``ops.einsum``, ``ops.conv``, ``ops.depthwise_conv``, ``ops.take``): bit
  for bit the torch fake-quant model for fixed-range quantizers
  (``integer`` is ignored; there is no integer matmul on this path).

Supported weight formats: integer (int2..int16, uint*; per tensor, per
channel, or per block on JAX), float (fp8 e4m3/e5m2, fp6, fp4; per tensor or
per channel) and block formats (nvfp4, mxfp4, mxfp6, mxfp8). Keras variables
and ``.keras`` files have no 8- or 4-bit float dtypes, so float codes and
8-bit block scales (e8m0, e4m3) are stored as their bit patterns in
``uint8`` (one byte per fp8 code), fp4 codes packed two to a byte; the served
layer decodes them exactly (a bitcast on JAX, a table of the 16 or 256 bit
patterns in keras.ops) and computes on the dequantize path, equal to the
fake-quant model bit for bit.
"""

from __future__ import annotations

# pylint: disable=import-outside-toplevel,protected-access

import dataclasses
import inspect
import json

import numpy as np

from jaxqat.core import _spec as spec_lib
from jaxqat.core._serialize import spec_from_dict
from jaxqat.core._serialize import spec_to_dict
from jaxqat.keras import _fold
from jaxqat.keras import _graph
from jaxqat.keras import _layers
from jaxqat.keras import _ops
from jaxqat.keras import _saving
from jaxqat.keras._backend import backend_name
from jaxqat.keras._backend import is_jax
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import ops
from jaxqat.keras._backend import to_numpy
from jaxqat.keras._quantizer import Quantizer

__all__ = ["convert", "size_report", "export_serving", "ServedLayer", "ServedDense",
           "ServedEinsumDense", "ServedConv", "ServedDepthwiseConv", "ServedSeparableConv",
           "ServedEmbedding"]

_QUANT = _fold.QUANT  # quantized layers (QuantLayer, QuantConvBatchNorm)


def _register(cls):
  return keras.saving.register_keras_serializable(package="jaxqat")(cls)


def _unpack_ops(p, bits: int, signed: bool, shape):
  """:func:`jaxqat.core.unpack` in keras.ops (int8 bytes -> codes, last axis x ``8 // bits``)."""
  per = 8 // bits
  b = ops.bitwise_and(ops.cast(p, "int32"), 255)
  parts = [ops.bitwise_and(ops.right_shift(b, i * bits), (1 << bits) - 1) for i in range(per)]
  v = ops.stack(parts, axis=-1)
  if signed:
    v = ops.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
  return ops.reshape(v, tuple(shape))


def _float_dtype(name: str) -> np.dtype:
  """The ml_dtypes dtype named ``name`` (``"float8_e4m3fn"``, ``"float4_e2m1fn"``...)."""
  import ml_dtypes
  return np.dtype(getattr(ml_dtypes, name))


def _lut(name: str) -> np.ndarray:
  """The float32 value of every bit pattern of the 4- or 8-bit float dtype ``name`` (exact)."""
  n = 16 if name.startswith("float4") else 256
  return np.arange(n, dtype=np.uint8).view(_float_dtype(name)).astype(np.float32)


def _stored(qt, pack: bool, prefix: str = ""):
  """(info, values) of a QTensor as a served layer stores it in Keras variables.

  Integer codes are stored as they are (packed or not). Keras variables and
  ``.keras`` files have no 8- or 4-bit float dtypes, so float codes (fp8,
  fp6 held in e4m3, fp4) and 8-bit block scales (e8m0, e4m3) are stored as
  their bit patterns in ``uint8``; fp4 codes are packed two to an ``int8``
  byte along the last axis (as int4) when ``pack`` and the axis divides.
  ``codes_format``/``scale_format`` name the float dtypes to decode them to.
  """
  from jaxqat.core import pack as pack_codes
  codes = np.asarray(qt.values)
  info = {"packed": int(qt.packed), "codes_format": None, "scale_format": None}
  if not qt.spec.is_int:
    info["codes_format"] = codes.dtype.name
    codes = codes.view(np.uint8)
    if (info["codes_format"].startswith("float4") and pack and codes.ndim
        and codes.shape[-1] % 2 == 0):
      codes, info["packed"] = np.asarray(pack_codes(codes, 4)), 4
  scale = np.asarray(qt.scale)
  if scale.dtype.itemsize == 1:  # an 8-bit float block scale
    info["scale_format"] = scale.dtype.name
    scale = scale.view(np.uint8)
  else:
    scale = scale.astype(np.float32)
  values = {"codes": codes, "scale": scale}
  if qt.zero_point is not None:
    values["zero_point"] = np.asarray(qt.zero_point, np.int32)
  if qt.tensor_scale is not None:
    values["tensor_scale"] = np.asarray(qt.tensor_scale, np.float32)
  info.update({"codes_dtype": str(codes.dtype), "stored_shape": list(codes.shape),
               "scale_dtype": str(scale.dtype), "scale_shape": list(scale.shape),
               "zero_point": qt.zero_point is not None,
               "tensor_scale": qt.tensor_scale is not None})
  return info, {prefix + k: v for k, v in values.items()}


_JITTED: dict = {}  # see ServedLayer._kernel
_ROLES = ("codes", "scale", "zero_point", "tensor_scale")


def _traced(x) -> bool:
  import jax
  return isinstance(x, jax.core.Tracer)


class StoredWeights:
  """Mixin of a layer holding quantized weights as codes and scales, and its input's range.

  The host lists its weights in ``_slots()`` (``(attribute prefix, weight
  info, spec)``; the info as :func:`convert` writes it) and sets ``act_info``
  and ``aspec``; :meth:`_add_stored` creates the variables
  (``<prefix>codes``, ``<prefix>scale``...), the other methods read them.
  """

  def _slots(self) -> list:
    raise NotImplementedError

  def _slot(self, prefix: str):
    return {p: (w, s) for p, w, s in self._slots()}[prefix]

  def _add_stored(self):
    """Creates the variables of every weight slot and of the input range (see ``_slots``).

    Not autocast: under mixed precision the codes and scales keep their stored dtypes (the
    dequantized weight is cast once, at the end).
    """
    for p, w, spec in self._slots():
      name = w["name"]
      if spec is None:
        self._add(p + "weight", name, w["shape"], w["dtype"], "zeros")
        continue
      self._add(p + "codes", f"{name}_codes", w["stored_shape"], w["codes_dtype"], "zeros", False)
      self._add(p + "scale", f"{name}_scale", w["scale_shape"], w.get("scale_dtype", "float32"),
                "ones", False)
      if w["zero_point"]:
        self._add(p + "zero_point", f"{name}_zero_point", w["scale_shape"], "int32", "zeros",
                  False)
      if w.get("tensor_scale"):
        self._add(p + "tensor_scale", f"{name}_tensor_scale", (), "float32", "ones", False)
    for role, a, _ in self._act_slots():
      if a is not None and a.get("scale_shape") is not None:
        self._add(f"{role}_scale", f"{role}_scale", a["scale_shape"], "float32", "ones", False)
        if a["zero_point"]:
          self._add(f"{role}_zero_point", f"{role}_zero_point", a["scale_shape"], "int32",
                    "zeros", False)

  def _act_slots(self) -> list:
    """``(role, info, spec)`` of each quantized activation: the input (a recurrent cell's
    state too); its range variables are ``<role>_scale`` and ``<role>_zero_point``."""
    return [("input", self.act_info, self.aspec)]

  def _act_slot(self, role: str):
    return {r: (a, spec) for r, a, spec in self._act_slots()}[role]

  def _add(self, attr, name, shape, dtype, default, autocast=True):
    """Creates ``self.<attr>``, initialised from convert's values when it gave them."""
    value = (vars(self).get("_init_values") or {}).get(attr)
    init = default if value is None else (lambda shape, dtype=None, v=value: v)
    setattr(self, attr, self.add_weight(name=name, shape=tuple(shape), dtype=dtype,
                                        initializer=init, trainable=False, autocast=autocast))

  def _stored_arrays(self, prefix: str = "", read=None) -> dict:
    """The stored arrays of one weight by role (``codes``, ``scale``...; absent ones ``None``)."""
    w, _ = self._slot(prefix)
    read = read or (lambda v: v.value)
    present = {"codes": True, "scale": True, "zero_point": w["zero_point"],
               "tensor_scale": w.get("tensor_scale", False)}
    return {r: read(getattr(self, prefix + r)) if present[r] else None for r in _ROLES}

  def _decode(self, arrays: dict, prefix: str = ""):
    """The :class:`jaxqat.core.QTensor` of one weight from its stored (JAX) arrays."""
    import jax.numpy as jnp
    from jax import lax
    from jaxqat.core import QTensor, unpack
    w, spec = self._slot(prefix)
    codes, scale = arrays["codes"], arrays["scale"]
    cf, sf, packed = w.get("codes_format"), w.get("scale_format"), int(w["packed"])
    if cf and cf.startswith("float4"):  # no 4-bit bitcast: the exact value of each pattern
      idx = unpack(codes, 4, signed=False) if packed else codes
      codes = jnp.asarray(_lut(cf))[idx.astype(jnp.int32)].astype(_float_dtype(cf))
    elif cf:
      codes = lax.bitcast_convert_type(codes, _float_dtype(cf))
    if sf:
      scale = lax.bitcast_convert_type(scale, _float_dtype(sf))
    return QTensor(values=codes, scale=scale, zero_point=arrays["zero_point"],
                   tensor_scale=arrays["tensor_scale"], spec=spec, dtype=jnp.dtype(w["dtype"]),
                   packed=0 if cf else packed)

  def qtensor(self, prefix: str = ""):
    """A weight as a :class:`jaxqat.core.QTensor` (JAX arrays), or ``None`` if float.

    Args:
      prefix: ``""`` for the layer's (first) weight, ``"pointwise_"`` for a
        separable convolution's pointwise kernel.
    """
    if self._slot(prefix)[1] is None:
      return None
    return self._decode(self._stored_arrays(prefix), prefix)

  def qtensor_numpy(self, prefix: str = ""):
    """A weight as a :class:`jaxqat.core.QTensor` read from the variables (any backend)."""
    if self._slot(prefix)[1] is None:
      return None
    import functools
    import jax
    import jax.numpy as jnp
    arrays = self._stored_arrays(prefix, lambda v: jnp.asarray(to_numpy(v)))
    key = json.dumps(["decode", prefix, self._slot(prefix)[0]], sort_keys=True, default=str)
    if key not in _JITTED:  # one compilation per storage layout, not one per op
      _JITTED[key] = jax.jit(functools.partial(self._decode, prefix=prefix))
    return _JITTED[key](arrays)

  def stored_bytes(self, prefix: str = "") -> int:
    """Bytes the layer's variables hold for one weight (codes, scales, zero points)."""
    w, spec = self._slot(prefix)
    if spec is None:
      return int(np.asarray(to_numpy(getattr(self, prefix + "weight"))).nbytes)
    arrays = self._stored_arrays(prefix, lambda v: np.asarray(to_numpy(v)))
    return int(sum(a.nbytes for a in arrays.values() if a is not None))

  def encoding(self, role: str = "input"):
    """The :class:`jaxqat.core.Encoding` (JAX arrays) of the input (or of ``role``), or ``None``.

    ``None`` when that activation is float. ``role`` is ``"input"``, or
    ``"state"`` for a recurrent cell served in place.
    """
    info, spec = self._act_slot(role)
    if spec is None:
      return None
    from jaxqat.core import Encoding
    if not hasattr(self, f"{role}_scale"):
      return Encoding(None, None, spec)
    zp = getattr(self, f"{role}_zero_point").value if info["zero_point"] else None
    return Encoding(getattr(self, f"{role}_scale").value, zp, spec)

  def _ops_input(self, x, role: str = "input"):
    """The fake-quantized input (or ``role`` activation) in keras.ops (non-JAX backends)."""
    info, spec = self._act_slot(role)
    if spec is None:
      return x
    zp = None
    if info["zero_point"]:
      zp = ops.cast(ops.convert_to_tensor(getattr(self, f"{role}_zero_point")), "float32")
    return _ops.quant_dequant(x, spec, ops.convert_to_tensor(getattr(self, f"{role}_scale")), zp,
                              where=f"served layer {self.name!r} {role}")

  def _ops_weight(self, prefix: str = ""):
    """A dequantized weight in keras.ops: ``(q - z) * s`` as :func:`jaxqat.core.dequantize`.

    Float codes and 8-bit scales are decoded through the exact table of
    their bit patterns; block formats multiply by block scale times tensor
    scale.
    """
    w, spec = self._slot(prefix)
    if spec is None:
      return ops.convert_to_tensor(getattr(self, prefix + "weight"))
    codes = ops.convert_to_tensor(getattr(self, prefix + "codes"))
    cf, sf, packed = w.get("codes_format"), w.get("scale_format"), int(w["packed"])
    if packed:
      codes = _unpack_ops(codes, packed, not cf and spec.format.signed, w["shape"])
    q = ops.take(_lut(cf), ops.cast(codes, "int32")) if cf else ops.cast(codes, "float32")
    s = ops.convert_to_tensor(getattr(self, prefix + "scale"))
    s = ops.take(_lut(sf), ops.cast(s, "int32")) if sf else s
    if w.get("tensor_scale"):
      s = ops.multiply(s, ops.convert_to_tensor(getattr(self, prefix + "tensor_scale")))
    z = None
    if w["zero_point"]:
      z = ops.cast(ops.convert_to_tensor(getattr(self, prefix + "zero_point")), "float32")
    blocked = isinstance(spec.granularity, spec_lib.PerBlock)
    if blocked:
      q, expand, shape = _ops._to_block_layout(q, s, spec)
      s = expand(s)
      z = None if z is None else expand(z)
    y = ops.multiply(q if z is None else ops.subtract(q, z), s)
    if blocked:
      y = ops.reshape(y, shape)
    return ops.cast(y, w["dtype"])



class ServedLayer(StoredWeights, keras.layers.Layer):
  """Base of the served layers: weight codes, scales and the input's range.

  Built from the configuration :func:`convert` writes; the values are
  assigned by :func:`convert` (or loaded from a ``.keras`` file).

  Args:
    layer: the float layer (or its serialized config) whose arguments
      (activation, strides, padding, equation...) the served layer uses; it is
      never built, so it holds no weights.
    weight: ``{"name", "shape", "spec", "packed", "codes_dtype", "codes_format",
      "stored_shape", "scale_dtype", "scale_format", "scale_shape",
      "zero_point", "tensor_scale", "dtype"}``: the quantized weight and how
      it is stored (see :func:`convert`); ``spec`` ``None``: a float weight of
      ``shape`` and ``dtype``.
    act: ``{"spec", "scale_shape", "zero_point"}`` of the input's fixed range,
      or ``None`` (float input).
    bias_shape: the float bias's shape, or ``None``.
    integer: allow the integer path (JAX backend).
    **kwargs: Keras layer arguments.
  """

  def __init__(self, layer, weight, act=None, bias_shape=None, integer: bool = True, **kwargs):
    kwargs["trainable"] = False
    super().__init__(**kwargs)
    if isinstance(layer, keras.layers.Layer):
      layer = keras.saving.serialize_keras_object(layer)
    self.float_config = layer
    # Not tracked: an unbuilt float layer, read for its arguments only.
    object.__setattr__(self, "_float", keras.saving.deserialize_keras_object(layer))
    self.weight_info = dict(weight)
    self.act_info = None if act is None else dict(act)
    self.bias_shape = None if bias_shape is None else tuple(bias_shape)
    self.integer = bool(integer)
    self.wspec = spec_from_dict(weight.get("spec"), where=f"{self.name} weight spec")
    self.aspec = None if act is None else spec_from_dict(act["spec"], where=f"{self.name} act")
    self.supports_masking = True

  def _slots(self) -> list:
    """``(attribute prefix, weight info, spec)`` of each weight (prefix ``""``: ``codes``...)."""
    return [("", self.weight_info, self.wspec)]

  def build(self, input_shape=None):
    self._add_stored()
    if self.bias_shape is not None:
      self._add("bias", "bias", self.bias_shape, self.weight_info["dtype"], "zeros")
    object.__setattr__(self, "_init_values", None)
    self.built = True

  @property
  def weight_name(self) -> str:
    return self.weight_info["name"]

  def _finish(self, y):
    if self.bias_shape is not None:
      y = ops.add(y, self._bias_for(y))
    act = getattr(self._float, "activation", None)
    return y if act is None else act(y)

  def _bias_for(self, y):
    return ops.convert_to_tensor(self.bias)

  def _serve_jax(self, x, arrays, act):
    """The JAX forward (before bias and activation) from the stored arrays of each weight."""
    return self._jax_op(x, self._decode(arrays[""]), act)

  def _kernel(self):
    """``_serve_jax``, jitted when called eagerly: one compilation per layer configuration
    (shared by the layers of equal configurations, e.g. a reloaded model's) instead of one
    per op."""
    key = json.dumps([type(self).__name__, self.float_config, [w for _, w, _ in self._slots()],
                      self.integer], sort_keys=True, default=str)
    fn = _JITTED.get(key)
    if fn is None:
      import jax
      fn = _JITTED[key] = jax.jit(self._serve_jax)
    return fn

  def call(self, inputs):
    if is_jax() and self.wspec is not None:
      fn = self._serve_jax if _traced(inputs) else self._kernel()
      arrays = {p: self._stored_arrays(p) for p, _, spec in self._slots() if spec is not None}
      return self._finish(fn(inputs, arrays, self.encoding()))
    if is_jax():
      from jaxqat.core import fake_quantize_input
      x = fake_quantize_input(inputs, self.encoding())
    else:
      x = self._ops_input(inputs)
    return self._finish(self._ops_op(x))

  def compute_output_shape(self, input_shape):
    return self._float.compute_output_shape(input_shape)

  def get_config(self):
    config = super().get_config()
    config.update({"layer": self.float_config, "weight": self.weight_info, "act": self.act_info,
                   "bias_shape": None if self.bias_shape is None else list(self.bias_shape),
                   "integer": self.integer})
    return config


@_register
class ServedDense(ServedLayer):
  """A served :class:`keras.layers.Dense` (see :class:`ServedLayer`)."""

  def _jax_op(self, x, w, act):
    from jaxqat.core import quantized_dot_general
    x = ops.convert_to_tensor(x)
    return quantized_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), act=act,
                                 integer=self.integer)

  def _ops_op(self, x):
    return ops.matmul(x, self._ops_weight())


@_register
class ServedEinsumDense(ServedLayer):
  """A served :class:`keras.layers.EinsumDense` (see :class:`ServedLayer`)."""

  def _jax_op(self, x, w, act):
    from jaxqat.core import quantized_einsum
    return quantized_einsum(self._float.equation, ops.convert_to_tensor(x), w, act=act,
                            integer=self.integer)

  def _ops_op(self, x):
    return ops.einsum(self._float.equation, x, self._ops_weight())


def _conv_args(layer, x):
  """The arguments Keras' JAX ``ops.conv`` gives ``lax.conv_general_dilated``."""
  from keras.src.backend.jax import nn as jax_nn  # the same private helpers Keras uses
  n = x.ndim - 2
  dn = jax_nn._convert_to_lax_conv_dimension_numbers(n, layer.data_format, transpose=False)
  strides = jax_nn._convert_to_spatial_operand(layer.strides, n, layer.data_format,
                                               include_batch_and_channels=False)
  dilation = jax_nn._convert_to_spatial_operand(layer.dilation_rate, n, layer.data_format,
                                                include_batch_and_channels=False)
  return dn, strides, dilation


def _depthwise(fl, x, w, act, integer):
  """Keras' JAX ``depthwise_conv`` of layer ``fl`` with a quantized kernel (the core kernel).

  As Keras, the kernel ``(..., C, M)`` becomes ``(..., 1, C*M)`` with ``C``
  feature groups; per-channel scales follow it. Per-block scales do not
  survive that reshape: the kernel is then dequantized first (the fake-quant
  arithmetic).
  """
  from jax import lax
  from jaxqat.core import dequantize, fake_quantize_input, quantized_conv_general_dilated
  x = ops.convert_to_tensor(x)
  dn, strides, dilation = _conv_args(fl, x)
  chan = x.shape[-1] if fl.data_format == "channels_last" else x.shape[1]
  kw = dict(rhs_dilation=dilation, dimension_numbers=dn, feature_group_count=chan)
  if isinstance(w.spec.granularity, spec_lib.PerBlock):
    conv_shape = _layers.depthwise_as_grouped(w.spec, tuple(w.shape))[1]
    return lax.conv_general_dilated(fake_quantize_input(x, act),
                                    dequantize(w).reshape(conv_shape), strides, fl.padding, **kw)
  spec, _, (scale, zero_point) = _layers.depthwise_as_grouped(w.spec, tuple(w.shape), w.scale,
                                                              w.zero_point)
  values = w.values.reshape(w.values.shape[:-2] + (1, -1))
  wc = dataclasses.replace(w, values=values, scale=scale, zero_point=zero_point, spec=spec)
  return quantized_conv_general_dilated(x, wc, strides, fl.padding, act=act, integer=integer, **kw)


class _ConvBias:
  def _bias_for(self, y):
    return _layers.channel_bias(self._float, ops.convert_to_tensor(self.bias))

  def _causal(self, x):
    fl = self._float
    if getattr(fl, "padding", None) == "causal":
      return ops.pad(x, fl._compute_causal_padding()), "valid"
    return x, fl.padding


@_register
class ServedConv(_ConvBias, ServedLayer):
  """A served :class:`keras.layers.Conv1D`/``Conv2D``/``Conv3D`` (see :class:`ServedLayer`)."""

  def _jax_op(self, x, w, act):
    from jaxqat.core import quantized_conv_general_dilated
    x, padding = self._causal(ops.convert_to_tensor(x))
    dn, strides, dilation = _conv_args(self._float, x)
    chan = x.shape[-1] if self._float.data_format == "channels_last" else x.shape[1]
    return quantized_conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=dn,
        feature_group_count=chan // w.shape[-2], act=act, integer=self.integer)

  def _ops_op(self, x):
    fl = self._float
    x, padding = self._causal(x)
    return ops.conv(x, self._ops_weight(), strides=list(fl.strides), padding=padding,
                    dilation_rate=fl.dilation_rate, data_format=fl.data_format)


@_register
class ServedConvTranspose(_ConvBias, ServedLayer):
  """A served :class:`keras.layers.Conv1DTranspose`/``2D``/``3D`` (see :class:`ServedLayer`)."""

  def _jax_op(self, x, w, act):
    from jaxqat.core import quantized_conv_transpose
    x = ops.convert_to_tensor(x)
    return quantized_conv_transpose(x, w, act=act, integer=self.integer,
                                    **_layers.transpose_args(self._float, x.shape, w.shape))

  def _ops_op(self, x):
    fl = self._float
    return ops.conv_transpose(x, self._ops_weight(), strides=fl.strides, padding=fl.padding,
                              output_padding=fl.output_padding, dilation_rate=fl.dilation_rate,
                              data_format=fl.data_format)


@_register
class ServedDepthwiseConv(_ConvBias, ServedLayer):
  """A served :class:`keras.layers.DepthwiseConv1D`/``2D`` (see :class:`ServedLayer`)."""

  def _jax_op(self, x, w, act):
    return _depthwise(self._float, x, w, act, self.integer)

  def _ops_op(self, x):
    fl = self._float
    return ops.depthwise_conv(x, self._ops_weight(), strides=fl.strides, padding=fl.padding,
                              dilation_rate=fl.dilation_rate, data_format=fl.data_format)


def separable(fl, x, depthwise, pointwise, act, integer):
  """Keras' JAX ``separable_conv`` of layer ``fl`` with quantized kernels (the core kernels).

  The depthwise convolution of the input (:func:`_depthwise`: integer with a
  statically quantized input and ``integer``), then the 1x1 convolution of its
  float output with the pointwise kernel (weight-only: dequantized).
  """
  from jaxqat.core import quantized_conv_general_dilated
  d = _depthwise(fl, x, depthwise, act, integer)
  dn, _, dilation = _conv_args(fl, d)
  return quantized_conv_general_dilated(d, pointwise, (1,) * (d.ndim - 2), "valid",
                                        rhs_dilation=dilation, dimension_numbers=dn,
                                        integer=integer)


@_register
class ServedSeparableConv(_ConvBias, ServedLayer):
  """A served :class:`keras.layers.SeparableConv1D`/``2D``: two served kernels, a float bias.

  As Keras' ``separable_conv``: the depthwise convolution of the (quantized)
  input, then a 1x1 convolution of its float output with the pointwise
  kernel (weight-only: the layer quantizes no activation in between).

  Args:
    layer, weight, act, bias_shape, integer: as :class:`ServedLayer`;
      ``weight`` is the depthwise kernel.
    pointwise: the pointwise kernel's description (as ``weight``); its
      variables are ``pointwise_codes``, ``pointwise_scale``...
    **kwargs: Keras layer arguments.
  """

  def __init__(self, layer, weight, pointwise=None, **kwargs):
    super().__init__(layer, weight, **kwargs)
    if not isinstance(pointwise, dict):
      raise TypeError(f"pointwise: expected the pointwise kernel's description (a dict), got "
                      f"{type(pointwise).__name__}")
    self.pointwise_info = dict(pointwise)
    self.pspec = spec_from_dict(pointwise.get("spec"), where=f"{self.name} pointwise spec")

  def _slots(self):
    return super()._slots() + [("pointwise_", self.pointwise_info, self.pspec)]

  def _serve_jax(self, x, arrays, act):
    return separable(self._float, x, self._decode(arrays[""]),
                     self._decode(arrays["pointwise_"], "pointwise_"), act, self.integer)

  def _ops_op(self, x):
    fl = self._float
    return ops.separable_conv(x, self._ops_weight(), self._ops_weight("pointwise_"),
                              strides=fl.strides, padding=fl.padding,
                              dilation_rate=fl.dilation_rate, data_format=fl.data_format)

  def get_config(self):
    config = super().get_config()
    config["pointwise"] = self.pointwise_info
    return config


@_register
class ServedEmbedding(ServedLayer):
  """A served :class:`keras.layers.Embedding`: only the looked-up rows are dequantized."""

  def call(self, inputs):
    if inputs.dtype != "int32" and inputs.dtype != "int64":
      inputs = ops.cast(inputs, "int32")
    if is_jax() and self.wspec is not None:
      from jaxqat.core import quantized_take
      out = quantized_take(self.qtensor(), ops.convert_to_tensor(inputs), axis=0)
    else:
      out = ops.take(self._ops_weight(), inputs, axis=0)
    return ops.cast(out, self.compute_dtype)

  def compute_mask(self, inputs, mask=None):
    if not getattr(self._float, "mask_zero", False):
      return None
    return ops.not_equal(inputs, 0)

  def compute_output_shape(self, input_shape):
    return (*input_shape, int(self.weight_info["shape"][-1]))


# -- convert ----------------------------------------------------------------------------

_KINDS = (  # exact QAT class -> (float class, served class); most specific first
    (_layers.QuantEmbedding, keras.layers.Embedding, ServedEmbedding),
    (_layers.QuantEinsumDense, keras.layers.EinsumDense, ServedEinsumDense),
    (_layers.QuantDense, keras.layers.Dense, ServedDense),
    (_layers.QuantDepthwiseConv1D, keras.layers.DepthwiseConv1D, ServedDepthwiseConv),
    (_layers.QuantDepthwiseConv2D, keras.layers.DepthwiseConv2D, ServedDepthwiseConv),
    (_layers.QuantConv1D, keras.layers.Conv1D, ServedConv),
    (_layers.QuantConv2D, keras.layers.Conv2D, ServedConv),
    (_layers.QuantConv3D, keras.layers.Conv3D, ServedConv),
    (_layers.QuantConv1DTranspose, keras.layers.Conv1DTranspose, ServedConvTranspose),
    (_layers.QuantConv2DTranspose, keras.layers.Conv2DTranspose, ServedConvTranspose),
    (_layers.QuantConv3DTranspose, keras.layers.Conv3DTranspose, ServedConvTranspose),
    (_layers.QuantSeparableConv1D, keras.layers.SeparableConv1D, ServedSeparableConv),
    (_layers.QuantSeparableConv2D, keras.layers.SeparableConv2D, ServedSeparableConv),
)
_QUANT_KEYS = ("weight_spec", "act_spec", "observe", "compute")  # QuantLayer arguments


def _act_plan(layer, path, role: str = "input"):
  """(act info, values) of a layer's input range (or its ``role`` activation's), or (None, {})."""
  iq = dict(layer.act_quantizers()).get(role)
  if iq is None or iq.float_reason is not None:
    return None, {}
  where = f"layer {path!r} {role} quantizer"
  if iq.spec.is_block:
    _saving.quantizer_state(iq, None, where)  # refuses 'float' mode
    return {"spec": spec_to_dict(iq.spec.replace(learning="fixed")), "scale_shape": None,
            "zero_point": False}, {}
  enc = _saving.quantizer_encoding(iq, None, where)
  values = {f"{role}_scale": np.asarray(enc.scale, np.float32)}
  if enc.zero_point is not None:
    values[f"{role}_zero_point"] = np.asarray(enc.zero_point, np.int32)
  info = {"spec": spec_to_dict(enc.spec), "scale_shape": list(np.shape(values[f"{role}_scale"])),
          "zero_point": enc.zero_point is not None}
  return info, values


def _quantize_weight_jit():
  """:func:`jaxqat.core.quantize_weight`, jitted (one compilation per weight shape)."""
  import jax
  from jaxqat.core import quantize_weight
  global _QW_JIT
  if _QW_JIT is None:
    _QW_JIT = jax.jit(quantize_weight, static_argnames=("pack",))
  return _QW_JIT


_QW_JIT = None


def _weight_plan(name, q, w, dtype, path, pack, prefix=""):
  """(weight info, values) of one weight: its stored codes and scales, or the float weight."""
  import jax.numpy as jnp
  w = np.asarray(to_numpy(w))
  if q is None:
    return ({"name": name, "shape": list(w.shape), "spec": None, "dtype": dtype},
            {prefix + "weight": w.astype(dtype)})
  # The QAT layer quantizes the weight in its quantizer's compute dtype (bfloat16 under
  # mixed_bfloat16: the range and the codes of bfloat16(w)); so do its codes and dequantized
  # values here.
  cdt = getattr(q, "compute_dtype", None)
  if cdt and np.issubdtype(w.dtype, np.floating) and np.dtype(cdt) != w.dtype:
    w, dtype = w.astype(np.dtype(cdt)), str(np.dtype(cdt))
  enc = _saving.quantizer_encoding(q, w, f"layer {path!r} {name} quantizer")
  qt = _quantize_weight_jit()(jnp.asarray(w, jnp.dtype(dtype)), enc, pack=pack)
  info, values = _stored(qt, pack, prefix)
  info.update({"name": name, "shape": list(qt.shape), "spec": spec_to_dict(enc.spec),
               "dtype": dtype})
  return info, values


def _float_layer(layer, fcls):
  config = {k: v for k, v in layer.get_config().items() if k not in _QUANT_KEYS}
  if "lora_rank" in config:
    config["lora_rank"] = None
  return fcls.from_config(config)


def graph_servable(layer) -> bool:
  """Whether convert rebuilds ``layer`` (a quantized layer of a graph) as a served layer class."""
  return isinstance(layer, _fold.QuantConvBatchNorm) or any(type(layer) is k[0] for k in _KINDS)


def _plan(layer, path, integer, pack):
  """(served class, constructor kwargs, values) for a quantized layer; raises if it cannot serve."""
  if isinstance(layer, _fold.QuantConvBatchNorm):
    fl = layer.conv.__class__.from_config(layer.conv.get_config())
    cls = ServedDepthwiseConv if layer.depthwise else ServedConv
    weights = [("kernel", layer.kernel_quantizer, layer.folded_kernel())]
    bias = to_numpy(layer.folded_bias())
  else:
    kinds = [k for k in _KINDS if type(layer) is k[0]]
    if not kinds:
      raise NotImplementedError(f"layer {path!r}: {type(layer).__name__} has no served version "
                                "(jaxqat.keras.convert serves Dense, EinsumDense, Conv1D/2D/3D, "
                                "Conv1D/2D/3DTranspose, DepthwiseConv1D/2D, SeparableConv1D/2D, "
                                "Embedding and folded Conv+BatchNorm)")
    _, fcls, cls = kinds[0]
    if getattr(layer, "lora_enabled", False):
      raise NotImplementedError(f"layer {path!r}: LoRA is enabled; merge it into the kernel "
                                "before converting")
    fl = _float_layer(layer, fcls)
    names = {ServedEmbedding: ("embeddings",),
             ServedSeparableConv: ("depthwise_kernel", "pointwise_kernel")}.get(cls, ("kernel",))
    weights = [(n, layer.weight_quantizers.get(attr), getattr(layer, attr))
               for n, (attr, _) in zip(names, layer.quant_weights)]
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else to_numpy(bias)
  dtype = str(np.asarray(to_numpy(weights[0][2])).dtype)
  act, values = _act_plan(layer, path)
  infos = []
  for prefix, (name, q, kernel) in zip(("", "pointwise_"), weights):
    info, vals = _weight_plan(name, q, kernel, dtype, path, pack, prefix)
    infos.append(info)
    values.update(vals)
  if bias is not None:
    values["bias"] = np.asarray(bias, dtype)
  kwargs = dict(layer=fl, weight=infos[0], act=act,
                bias_shape=None if bias is None else list(np.shape(bias)), integer=integer,
                name=layer.name, dtype=layer.dtype_policy)
  if cls is ServedSeparableConv:
    kwargs["pointwise"] = infos[1]
  return cls, kwargs, values


class _Cloner:
  """Rebuilds a Sequential/Functional graph with served layers (plans made first)."""

  def __init__(self, integer, pack):
    self.integer, self.pack = integer, pack
    self.plans = {}    # id(QAT layer) -> (cls, kwargs, values)
    self.cache = {}    # id(QAT layer) -> its clone
    self.assign = []   # (served layer, values)
    self.copies = []   # (float layer, its clone)

  def check(self, model, prefix=""):
    """Makes every plan (so that errors come before anything is built)."""
    if not is_graph_model(model):
      raise TypeError(f"model: convert takes a Sequential or Functional model; {prefix or ''}"
                      f"{model.name!r} is a subclassed {type(model).__name__}")
    for layer in model.layers:
      path = prefix + layer.name
      if isinstance(layer, _QUANT):
        if id(layer) not in self.plans:
          self.plans[id(layer)] = _plan(layer, path, self.integer, self.pack)
      elif isinstance(layer, (keras.Sequential,)) or _graph.is_functional(layer):
        self.check(layer, path + "/")
      else:
        inner = [p for _, p, l in _graph.walk(layer) if isinstance(l, _QUANT)]
        if inner:
          raise NotImplementedError(
              f"layer {path!r} ({type(layer).__name__}) holds quantized sublayers "
              f"({', '.join(path + '/' + p for p in inner[:3])}); convert serves quantized "
              "layers of Sequential/Functional graphs (nested graphs included)")

  def clone(self, layer):
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.layers.InputLayer):
      return layer  # an op node of a Functional graph: stateless, shared
    if id(layer) in self.cache:
      return self.cache[id(layer)]
    if id(layer) in self.plans:
      cls, kwargs, values = self.plans[id(layer)]
      new = cls(**kwargs)
      object.__setattr__(new, "_init_values", values)  # the variables start with these
      self.assign.append((new, values))
    elif isinstance(layer, keras.Sequential) or _graph.is_functional(layer):
      new = self.graph(layer)
    else:
      new = layer.__class__.from_config(layer.get_config())
      self.copies.append((layer, new))
    self.cache[id(layer)] = new
    return new

  def graph(self, model):
    from keras.src.models.functional import Functional  # no public alias in Keras 3
    if isinstance(model, keras.Sequential):
      inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
      return keras.Sequential([*inputs, *[self.clone(l) for l in model.layers]],
                              name=model.name)
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name), model.input)
    outputs = model._run_through_graph(inputs, operation_fn=self.clone)
    return Functional(inputs, outputs, name=model.name)

  def fill(self):
    for layer, values in self.assign:
      if not layer.built:  # a layer the graph never called: build it from its config
        layer.build()
    for src, dst in self.copies:
      if src.weights:
        dst.set_weights([to_numpy(v) for v in src.weights])
      if isinstance(src, Quantizer):  # a standalone activation quantizer: its Python state too
        for attr in ("calibrated", "frozen", "mode", "float_reason", "observe"):
          setattr(dst, attr, getattr(src, attr))


def convert(model, *, integer: bool = True, pack: bool = True):
  """Turns a calibrated or QAT Keras model into a served model (see the module doc).

  A fixed-range weight quantizer that is not frozen converts with the range
  of the current weight (what the QAT model computes now); an input
  quantizer left float (it saw no finite value in calibration) stays float.

  Args:
    model: a model returned by :func:`jaxqat.keras.quantize`, calibrated:
      Sequential or Functional (nested ones included) are rebuilt as a
      graph; a subclassed model, or one whose quantized layers sit inside
      custom layers, is served in place on a copy that keeps its class.
    integer: allow the integer path (int8 x int8 -> int32) on the JAX
      backend; ``False`` serves with the dequantize path (equal to the
      fake-quant model bit for bit).
    pack: store 2- and 4-bit codes packed two to a byte (int8) along the
      last weight axis (when it divides).

  Returns:
    A new Sequential/Functional model with served layers; ``model`` is not
    modified. If a quantized layer sits inside a custom layer, or is of a
    class without a served class (a subclass of a supported layer, an
    embedding-like layer), every quantized layer is served in place on a
    copy of ``model`` instead (see the module doc), which keeps the model's
    class and saves and loads as ``.keras``; there, Dense, EinsumDense and
    convolution layers (the exact Keras classes) take the integer path as
    their graph-served layers do, and the others dequantize their weights.

  Raises:
    TypeError: if ``model`` is not a Keras model, is subclassed, or
      ``integer``/``pack`` are not bools; or if a model to serve in place
      can be neither deep-copied nor saved and loaded.
    ValueError: if the model has no quantized layers, or a quantizer has no
      range (never calibrated) or is in ``"float"`` mode (message names the
      layer); nothing is returned.
    NotImplementedError: for LoRA, or a folded Conv+BatchNorm in a model
      served in place (message names the layer).

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> q = jqk.quantize(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")]))
    >>> _ = jqk.calibrate(q, np.ones((4, 8), "float32"))
    >>> served = convert(q)
    >>> sorted((v.name, str(v.dtype)) for v in served.get_layer("fc").weights)[:3]
    [('bias', 'float32'), ('input_scale', 'float32'), ('input_zero_point', 'int32')]
    >>> served.get_layer("fc").codes.dtype
    'int8'
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
  for name, v in (("integer", integer), ("pack", pack)):
    if not isinstance(v, bool):
      raise TypeError(f"{name}: expected a bool, got {v!r}")
  if not _saving.quant_entries(model):
    raise ValueError(f"model: {model.name!r} has no quantized layers; call "
                     "jaxqat.keras.quantize (and calibrate) before convert")
  from jaxqat.keras import _serve_inplace  # it builds on this module
  if _serve_inplace.needs_in_place(model):
    return _serve_inplace.serve_copy(model, pack, integer)
  cloner = _Cloner(integer, pack)
  cloner.check(model)
  served = cloner.graph(model)
  cloner.fill()
  return served


def is_graph_model(model) -> bool:
  """Whether ``model`` is Sequential or Functional (its class before ``quantize``'s record)."""
  base = vars(model).get("_jaxqat_base", type(model))
  return issubclass(base, keras.Sequential) or _graph.is_functional(model)


def _served_layers(model):
  return [(p, l) for _, p, l in _graph.walk(model, stop=lambda l: isinstance(l, ServedLayer))]


def size_report(served):
  """Per-weight sizes of a served model and its compression ratio.

  One row per weight: a served layer's quantized weight (codes, scales and
  zero points; ``"<layer path>/<weight name>"``), its bias, and every
  variable of the layers that stayed float. Input ranges (a few bytes per
  layer) are not weights and are not counted.

  Args:
    served: a model returned by :func:`convert`.

  Returns:
    :class:`jaxqat.core.SizeReport` (``ratio``, ``float_bytes``,
    ``quant_bytes``, ``to_dicts()``; ``print`` it for a table).

  Raises:
    TypeError: if ``served`` is not a Keras model.
    ValueError: if it has no served layers.

  Examples:
    >>> import keras, numpy as np
    >>> from jaxqat.keras import quantize, calibrate
    >>> q = calibrate(quantize(keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])),
    ...               np.ones((4, 64), "float32"))
    >>> r = size_report(convert(q))
    >>> [row.format for row in r.rows], round(r.ratio, 3)  # codes, 64 scales and a float bias
    (['int8_narrow', 'float32'], 0.277)
  """
  from jaxqat.core import SizeReport, size_row
  if not isinstance(served, keras.Model):
    raise TypeError(f"served: expected a keras.Model, got {type(served).__name__}")
  rows, n = [], 0
  for path, layer in _served_layers(served):
    if isinstance(layer, StoredWeights) and not isinstance(layer, ServedLayer):
      n += 1  # served in place: its stored weights, then the float weights it kept
      stored = set()
      for prefix, w, _ in layer._slots():
        row = size_row(f"{path}/{w['name']}", layer.qtensor_numpy(prefix), w["dtype"])
        rows.append(dataclasses.replace(row, quant_bytes=layer.stored_bytes(prefix)))
        stored |= {id(getattr(layer, prefix + r)) for r in _ROLES if hasattr(layer, prefix + r)}
      stored |= {id(getattr(layer, f"{role}_{a}")) for role, _, _ in layer._act_slots()
                 for a in ("scale", "zero_point") if hasattr(layer, f"{role}_{a}")}
      for v in _graph.own_weights(layer):
        if id(v) not in stored:
          a = to_numpy(v)
          rows.append(size_row(f"{path}/{v.name}", a, a.dtype))
    elif isinstance(layer, ServedLayer):
      n += 1
      for prefix, w, spec in layer._slots():
        name = f"{path}/{w['name']}"
        if spec is None:
          rows.append(size_row(name, to_numpy(getattr(layer, prefix + "weight")), w["dtype"]))
        else:  # the bytes the variables hold (fp4 codes packed two to a byte)
          row = size_row(name, layer.qtensor_numpy(prefix), w["dtype"])
          rows.append(dataclasses.replace(row, quant_bytes=layer.stored_bytes(prefix)))
      if layer.bias_shape is not None:
        rows.append(size_row(f"{path}/bias", to_numpy(layer.bias), w["dtype"]))
    else:
      for v in _graph.own_weights(layer):
        a = to_numpy(v)
        rows.append(size_row(f"{path}/{v.name}", a, a.dtype))
  if not n:
    raise ValueError(f"served: {served.name!r} has no served layers (use jaxqat.keras.convert)")
  return SizeReport(rows)




def export_serving(served, *example_args, batch_polymorphic: bool = False,
                   **example_kwargs) -> bytes:
  """Serializes the served model's forward pass with :mod:`jax.export` (JAX backend only).

  Wraps :func:`jaxqat.core.export_serving` around a stateless call of the
  served model (``training=False``) whose weights (the int8 codes and
  scales) are baked into the program; reload with
  :func:`jaxqat.core.load_serving`.

  Args:
    served: a model returned by :func:`convert` (any Keras model works).
    *example_args: the model's inputs (arrays or ``jax.ShapeDtypeStruct``).
    batch_polymorphic: make the leading axis of every input symbolic.
    **example_kwargs: keyword arguments of the model's ``call``: arrays
      (inputs of the program, given by name, e.g. a ``mask``) or Python
      values (fixed into the program).

  Returns:
    The serialized program (bytes).

  Raises:
    RuntimeError: if Keras does not run on the JAX backend (jax.export needs
      ``KERAS_BACKEND=jax``).
    TypeError: if ``served`` is not a Keras model.
    ValueError: if there are no example arguments.

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> from jaxqat.core import load_serving
    >>> q = jqk.quantize(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]))
    >>> x = np.ones((2, 8), "float32")
    >>> served = convert(jqk.calibrate(q, x))
    >>> blob = export_serving(served, x)
    >>> bool((np.asarray(load_serving(blob)(x)) == np.asarray(served(x))).all())
    True
  """
  if not is_jax():
    raise RuntimeError(f"export_serving: jax.export needs the JAX backend; Keras runs on "
                       f"{backend_name()!r}: set KERAS_BACKEND=jax before importing keras")
  if not isinstance(served, keras.Model):
    raise TypeError(f"served: expected a keras.Model, got {type(served).__name__}")
  from jaxqat.core import export_serving as core_export
  tv = [v.value for v in served.trainable_variables]
  ntv = [v.value for v in served.non_trainable_variables]

  params = inspect.signature(served.call).parameters
  if "training" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
    example_kwargs.setdefault("training", False)

  def forward(*args, **kwargs):
    out, _ = served.stateless_call(tv, ntv, *args, **kwargs)
    return out

  return core_export(forward, *example_args, batch_polymorphic=batch_polymorphic,
                     **example_kwargs)
