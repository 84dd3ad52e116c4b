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

Served layers: :class:`ServedDense` (Dense), :class:`ServedEinsumDense`,
:class:`ServedConv` (Conv1D/2D/3D, and a folded Conv+BatchNorm:
the folded kernel's codes and the folded bias), :class:`ServedDepthwiseConv`
(DepthwiseConv1D/2D, folded or not) and :class:`ServedEmbedding`.

What a served layer computes, per backend:

* **JAX**: the core kernels (:func:`jaxqat.core.quantized_dot_general`,
  :func:`~jaxqat.core.quantized_einsum`,
  :func:`~jaxqat.core.quantized_conv_general_dilated`,
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

Supported quantizers: integer formats (int2..int16, uint*; per tensor, per
channel, or per block on JAX). Float (fp8...) and block (nvfp4, mx) formats
are refused by :func:`convert` (they serve through the NNX/Linen front
ends).
"""

from __future__ import annotations

# pylint: disable=import-outside-toplevel,protected-access

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
           "ServedEinsumDense", "ServedConv", "ServedDepthwiseConv", "ServedEmbedding"]

_QUANT = (_layers.QuantLayer, _fold.QuantConvBatchNorm)


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


_JITTED: dict = {}  # see ServedLayer._kernel


def _traced(x) -> bool:
  import jax
  return isinstance(x, jax.core.Tracer)


class ServedLayer(keras.layers.Layer):
  """Base of the served layers: integer weight codes, scales and the input's range.

  Built from the configuration :func:`convert` writes; the values are
  assigned by :func:`convert` (or loaded from a ``.keras`` file).

  Args:
    layer: the float layer (or its serialized config) whose arguments
      (activation, strides, padding, equation...) the served layer uses; it is
      never built, so it holds no weights.
    weight: ``{"name", "shape", "spec", "packed", "codes_dtype", "stored_shape",
      "scale_shape", "zero_point", "dtype"}``: the quantized weight
      (``spec`` ``None``: a float weight of ``shape`` and ``dtype``).
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

  def _add(self, attr, name, shape, dtype, default):
    """Creates ``self.<attr>``, initialised from convert's values when it gave them."""
    value = (vars(self).get("_init_values") or {}).get(attr)
    init = default if value is None else (lambda shape, dtype=None, v=value: v)
    setattr(self, attr, self.add_weight(name=name, shape=tuple(shape), dtype=dtype,
                                        initializer=init, trainable=False))

  def build(self, input_shape=None):
    w = self.weight_info
    name = w["name"]
    if self.wspec is None:
      self._add("weight", name, w["shape"], w["dtype"], "zeros")
    else:
      self._add("codes", f"{name}_codes", w["stored_shape"], w["codes_dtype"], "zeros")
      self._add("scale", f"{name}_scale", w["scale_shape"], "float32", "ones")
      if w["zero_point"]:
        self._add("zero_point", f"{name}_zero_point", w["scale_shape"], "int32", "zeros")
    a = self.act_info
    if a is not None and a.get("scale_shape") is not None:
      self._add("input_scale", "input_scale", a["scale_shape"], "float32", "ones")
      if a["zero_point"]:
        self._add("input_zero_point", "input_zero_point", a["scale_shape"], "int32", "zeros")
    if self.bias_shape is not None:
      self._add("bias", "bias", self.bias_shape, w["dtype"], "zeros")
    object.__setattr__(self, "_init_values", None)
    self.built = True

  # -- the weight and the input range ------------------------------------------------

  @property
  def weight_name(self) -> str:
    return self.weight_info["name"]

  def qtensor(self):
    """The weight as a :class:`jaxqat.core.QTensor` (JAX arrays), or ``None`` if float."""
    if self.wspec is None:
      return None
    import jax.numpy as jnp
    from jaxqat.core import QTensor
    val = lambda v: v.value if isinstance(v, keras.Variable) else jnp.asarray(v)  # noqa: E731
    zp = val(self.zero_point) if self.weight_info["zero_point"] else None
    return QTensor(values=val(self.codes), scale=val(self.scale), zero_point=zp, spec=self.wspec,
                   dtype=jnp.dtype(self.weight_info["dtype"]),
                   packed=int(self.weight_info["packed"]))

  def qtensor_numpy(self):
    """The weight as a :class:`jaxqat.core.QTensor` read from the variables (any backend)."""
    if self.wspec is None:
      return None
    import jax.numpy as jnp
    from jaxqat.core import QTensor
    w = self.weight_info
    zp = jnp.asarray(to_numpy(self.zero_point)) if w["zero_point"] else None
    return QTensor(values=jnp.asarray(to_numpy(self.codes)),
                   scale=jnp.asarray(to_numpy(self.scale)),
                   zero_point=zp, spec=self.wspec, dtype=jnp.dtype(w["dtype"]),
                   packed=int(w["packed"]))

  def encoding(self):
    """The input's :class:`jaxqat.core.Encoding` (JAX arrays), or ``None`` (float input)."""
    if self.aspec is None:
      return None
    from jaxqat.core import Encoding
    if not hasattr(self, "input_scale"):
      return Encoding(None, None, self.aspec)
    zp = self.input_zero_point.value if self.act_info["zero_point"] else None
    return Encoding(self.input_scale.value, zp, self.aspec)

  def _ops_input(self, x):
    """The fake-quantized input in keras.ops (non-JAX backends)."""
    if self.aspec is None:
      return x
    zp = None
    if self.act_info["zero_point"]:
      zp = ops.cast(ops.convert_to_tensor(self.input_zero_point), "float32")
    return _ops.quant_dequant(x, self.aspec, ops.convert_to_tensor(self.input_scale), zp,
                              where=f"served layer {self.name!r} input")

  def _ops_weight(self):
    """The dequantized weight in keras.ops: ``(q - z) * s``, as the fake-quant forward pass."""
    w = self.weight_info
    if self.wspec is None:
      return ops.convert_to_tensor(self.weight)
    codes = ops.convert_to_tensor(self.codes)
    if w["packed"]:
      codes = _unpack_ops(codes, int(w["packed"]), self.wspec.format.signed, w["shape"])
    q = ops.cast(codes, "float32")
    s = ops.convert_to_tensor(self.scale)
    z = ops.cast(ops.convert_to_tensor(self.zero_point), "float32") if w["zero_point"] else None
    blocked = isinstance(self.wspec.granularity, spec_lib.PerBlock)
    if blocked:
      q, expand, shape = _ops._to_block_layout(q, s, self.wspec)
      s = expand(s)
      z = None if z is None else expand(z)
    y = ops.multiply(q if z is None else ops.subtract(q, z), s)
    if blocked:
      y = ops.reshape(y, shape)
    return ops.cast(y, w["dtype"])

  def _finish(self, y):
    if self.bias_shape is not None:
      y = ops.add(y, self._bias_for(y))
    act = getattr(self._float, "activation", None)
    return y if act is None else act(y)

  def _bias_for(self, y):
    return ops.convert_to_tensor(self.bias)

  def _kernel(self):
    """``_jax_op``, jitted when called eagerly: one compilation per layer configuration
    (shared by the layers of equal configurations, e.g. a reloaded model's) instead of one
    per op."""
    key = (type(self).__name__, json.dumps(self.float_config, sort_keys=True, default=str),
           self.integer)
    fn = _JITTED.get(key)
    if fn is None:
      import jax
      fn = _JITTED[key] = jax.jit(self._jax_op)
    return fn

  def call(self, inputs):
    if is_jax() and self.wspec is not None:
      op = self._jax_op if _traced(inputs) else self._kernel()
      return self._finish(op(inputs, self.qtensor(), self.encoding()))
    if is_jax():
      from jaxqat.core import fake_quantize_input
      x = fake_quantize_input(inputs, self.encoding())
    else:
      x = self._ops_input(inputs)
    return self._finish(self._ops_op(x, self._ops_weight()))

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

  def _ops_op(self, x, w):
    return ops.matmul(x, w)


@_register
class ServedEinsumDense(ServedLayer):
  """A served :class:`keras.layers.EinsumDense` (see :class:`ServedLayer`)."""

  def _jax_op(self, x, w, act):
    from jaxqat.core import quantized_einsum
    return quantized_einsum(self._float.equation, ops.convert_to_tensor(x), w, act=act,
                            integer=self.integer)

  def _ops_op(self, x, w):
    return ops.einsum(self._float.equation, x, w)


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


class _ConvBias:
  def _bias_for(self, y):
    fl = self._float
    c = int(self.bias_shape[0])
    shape = ((1,) * (fl.rank + 1) + (c,) if fl.data_format == "channels_last"
             else (1, c) + (1,) * fl.rank)
    return ops.reshape(ops.convert_to_tensor(self.bias), shape)

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

  def _ops_op(self, x, w):
    fl = self._float
    x, padding = self._causal(x)
    return ops.conv(x, w, strides=list(fl.strides), padding=padding,
                    dilation_rate=fl.dilation_rate, data_format=fl.data_format)


@_register
class ServedDepthwiseConv(_ConvBias, ServedLayer):
  """A served :class:`keras.layers.DepthwiseConv1D`/``2D`` (see :class:`ServedLayer`)."""

  def _jax_op(self, x, w, act):
    import dataclasses
    import jax.numpy as jnp
    from jaxqat.core import quantized_conv_general_dilated
    x = ops.convert_to_tensor(x)
    dn, strides, dilation = _conv_args(self._float, x)
    # As Keras' depthwise_conv: kernel (..., C, M) -> (..., 1, C*M), C feature groups.
    shape = tuple(w.shape)
    nd = len(shape)
    conv_shape = shape[:-2] + (1, shape[-2] * shape[-1])
    values = w.values.reshape(w.values.shape[:-2] + (1, -1))
    full = (1,) * (nd - 2) + shape[-2:]

    def to_conv(t):
      if t is None or not t.ndim:
        return t
      return jnp.broadcast_to(t, full).reshape((1,) * (nd - 1) + (conv_shape[-1],))

    spec = w.spec
    if isinstance(spec.granularity, spec_lib.PerChannel):
      spec = spec.replace(granularity=spec_lib.PerChannel(axis=nd - 1))
    wc = dataclasses.replace(w, values=values, scale=to_conv(w.scale),
                             zero_point=to_conv(w.zero_point), spec=spec)
    chan = x.shape[-1] if self._float.data_format == "channels_last" else x.shape[1]
    return quantized_conv_general_dilated(
        x, wc, strides, self._float.padding, rhs_dilation=dilation, dimension_numbers=dn,
        feature_group_count=chan, act=act, integer=self.integer)

  def _ops_op(self, x, w):
    fl = self._float
    return ops.depthwise_conv(x, w, strides=fl.strides, padding=fl.padding,
                              dilation_rate=fl.dilation_rate, data_format=fl.data_format)


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
)
_QUANT_KEYS = ("weight_spec", "act_spec", "observe")


def _act_plan(layer, path):
  """(act info, values) of a layer's input range, or (None, {})."""
  iq = layer.input_quantizer
  if iq is None or iq.float_reason is not None:
    return None, {}
  where = f"layer {path!r} input quantizer"
  if iq.spec.is_block:
    _saving.quantizer_state(iq, None, where)  # refuses 'float' mode
    return {"spec": spec_to_dict(iq.spec.replace(learning="fixed")), "scale_shape": None,
            "zero_point": False}, {}
  enc = _saving.quantizer_encoding(iq, None, where)
  values = {"input_scale": np.asarray(enc.scale, np.float32)}
  if enc.zero_point is not None:
    values["input_zero_point"] = np.asarray(enc.zero_point, np.int32)
  info = {"spec": spec_to_dict(enc.spec), "scale_shape": list(np.shape(values["input_scale"])),
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


def _weight_plan(name, q, w, dtype, path, pack):
  """(weight info, values) of one weight: its codes and scales, or the float weight."""
  import jax.numpy as jnp
  w = np.asarray(to_numpy(w))
  if q is None:
    return ({"name": name, "shape": list(w.shape), "spec": None, "dtype": dtype},
            {"weight": w.astype(dtype)})
  where = f"layer {path!r} {name} quantizer"
  if not q.spec.is_int or q.spec.is_block:
    raise NotImplementedError(f"{where}: format {q.spec.format.name}: jaxqat.keras.convert "
                              "stores integer codes only (int2..int16, uint*)")
  enc = _saving.quantizer_encoding(q, w, where)
  qt = _quantize_weight_jit()(jnp.asarray(w, jnp.dtype(dtype)), enc, pack=pack)
  values = {"codes": np.asarray(qt.values), "scale": np.asarray(qt.scale, np.float32)}
  if qt.zero_point is not None:
    values["zero_point"] = np.asarray(qt.zero_point, np.int32)
  info = {"name": name, "shape": list(qt.shape), "spec": spec_to_dict(enc.spec),
          "packed": int(qt.packed), "codes_dtype": str(np.asarray(qt.values).dtype),
          "stored_shape": list(np.shape(qt.values)), "scale_shape": list(np.shape(qt.scale)),
          "zero_point": qt.zero_point is not None, "dtype": dtype}
  return info, values


def _float_layer(layer, fcls):
  config = {k: v for k, v in layer.get_config().items() if k not in _QUANT_KEYS}
  if "lora_rank" in config:
    config["lora_rank"] = None
  return fcls.from_config(config)


def _plan(layer, path, integer, pack):
  """(served class, constructor kwargs, values) for a quantized layer; raises if it cannot serve."""
  if isinstance(layer, _fold.QuantConvBatchNorm):
    fl = layer.conv.__class__.from_config(layer.conv.get_config())
    cls = ServedDepthwiseConv if layer.depthwise else ServedConv
    q, kernel = layer.kernel_quantizer, layer.folded_kernel()
    bias = to_numpy(layer.folded_bias())
  else:
    kinds = [k for k in _KINDS if type(layer) is k[0]]
    if not kinds:
      raise NotImplementedError(f"layer {path!r}: {type(layer).__name__} has no served version "
                                "(jaxqat.keras.convert serves Dense, EinsumDense, Conv1D/2D/3D, "
                                "DepthwiseConv1D/2D, Embedding and folded Conv+BatchNorm)")
    _, fcls, cls = kinds[0]
    if getattr(layer, "lora_enabled", False):
      raise NotImplementedError(f"layer {path!r}: LoRA is enabled; merge it into the kernel "
                                "before converting")
    fl = _float_layer(layer, fcls)
    attr, _ = layer.quant_weights[0]
    q = layer.weight_quantizers.get(attr)
    kernel = getattr(layer, attr)
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else to_numpy(bias)
  name = "embeddings" if cls is ServedEmbedding else "kernel"
  dtype = str(np.asarray(to_numpy(kernel)).dtype)
  act, act_values = _act_plan(layer, path)
  weight, values = _weight_plan(name, q, kernel, dtype, path, pack)
  values.update(act_values)
  if bias is not None:
    values["bias"] = np.asarray(bias, dtype)
  kwargs = dict(layer=fl, weight=weight, act=act,
                bias_shape=None if bias is None else list(np.shape(bias)), integer=integer,
                name=layer.name, dtype=layer.dtype_policy)
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
    base = vars(model).get("_jaxqat_base", type(model))
    if not (issubclass(base, keras.Sequential) or _graph.is_functional(model)):
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
    model: a Sequential or Functional model returned by
      :func:`jaxqat.keras.quantize` (nested Sequential/Functional models
      included), calibrated.
    integer: allow the integer path (int8 x int8 -> int32) on the JAX
      backend; ``False`` serves with the dequantize path (equal to the
      fake-quant model bit for bit).
    pack: store 2- and 4-bit codes packed two to a byte (int8) along the
      last weight axis (when it divides).

  Returns:
    A new Sequential/Functional model with served layers; ``model`` is not
    modified.

  Raises:
    TypeError: if ``model`` is not a Keras model, is subclassed, or
      ``integer``/``pack`` are not bools.
    ValueError: if the model has no quantized layers, or a quantizer has no
      range (never calibrated) or is in ``"float"`` mode (message names the
      layer); nothing is built.
    NotImplementedError: for a quantized layer without a served version
      (SeparableConv, a generated subclass, LoRA), a quantized layer inside
      another layer, or a non-integer weight format (message names it).

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
  cloner = _Cloner(integer, pack)
  cloner.check(model)
  served = cloner.graph(model)
  cloner.fill()
  return served


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
    if isinstance(layer, ServedLayer):
      n += 1
      qt = layer.qtensor_numpy()
      w = layer.weight_info
      rows.append(size_row(f"{path}/{w['name']}",
                           qt if qt is not None else to_numpy(layer.weight), w["dtype"]))
      if layer.bias_shape is not None:
        rows.append(size_row(f"{path}/bias", to_numpy(layer.bias), w["dtype"]))
    else:
      for v in _graph.own_weights(layer):
        a = to_numpy(v)
        rows.append(size_row(f"{path}/{v.name}", a, a.dtype))
  if not n:
    raise ValueError(f"served: {served.name!r} has no served layers (use jaxqat.keras.convert)")
  return SizeReport(rows)




def export_serving(served, *example_args, batch_polymorphic: bool = False) -> bytes:
  """Serializes the served model's forward pass with :mod:`jax.export` (JAX backend only).

  Wraps :func:`jaxqat.core.export_serving` around a stateless call of the
  served model (``training=False``) whose weights (the int8 codes and
  scales) are baked into the program; reload with
  :func:`jaxqat.core.load_serving`.

  Args:
    served: a model returned by :func:`convert` (any Keras model works).
    *example_args: the model's inputs (arrays or ``jax.ShapeDtypeStruct``).
    batch_polymorphic: make the leading axis of every input symbolic.

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

  def forward(*args):
    out, _ = served.stateless_call(tv, ntv, *args, training=False)
    return out

  return core_export(forward, *example_args, batch_polymorphic=batch_polymorphic)
