"""Quantized Keras layers: the float layer plus quantizer sublayers.

Each quantized layer subclasses its float Keras layer, so it keeps the float
variables under their own names and shapes (``kernel``, ``bias``,
``embeddings``...) and the float layer's ``call``. During a call it

1. fake-quantizes its input with ``input_quantizer`` (when it has an
   activation spec), then
2. runs the float layer's own ``call`` with each quantized weight attribute
   temporarily bound to the fake-quantized weight (``kernel_quantizer`` etc.).

The float ``call`` is therefore reused untouched (padding, strides, groups,
LoRA, subclasses of Dense/Embedding with their own ``call``), and saving
writes the float variables exactly as the float layer would, plus the
quantizer sublayers' variables.

Gradients follow the textbook straight-through estimator of the core: the
input gradient of ``x @ Q(W)`` is ``g @ Q(W)^T`` (the quantized weight).

Per-output-channel weight specs: a weight spec with granularity
:class:`~jaxqat.core.PerOutputChannel` (the default of
:func:`jaxqat.keras.quantize`) is resolved, per layer and weight, to
``PerChannel(axes)`` with ``axes`` the weight axes the layer does not
contract: the last kernel axis for Dense/Conv/pointwise kernels, the last two
(input channel x multiplier) for depthwise kernels, the kernel axes that
appear in the output for EinsumDense (``PerTensor()`` when there are none),
and axis 0 (one scale per token) for Embedding. The weight's
:class:`Quantizer` holds the resolved spec; the layer's ``weight_spec`` (and
its config) keeps ``PerOutputChannel()``. A literal ``PerChannel(axis)`` means
that axis on every layer: ``PerChannel(-1)`` is the last kernel axis, so on a
depthwise kernel it gives one scale per depth multiplier, not per output
channel. (Earlier versions mapped ``PerChannel(-1)`` to the output-channel
axes; use ``PerOutputChannel()`` for that now.)
"""

from __future__ import annotations

import inspect
from typing import Optional

from jaxqat.core import _spec as spec_lib
from jaxqat.core._rules import COMPUTE_MODES
from jaxqat.core._serialize import spec_from_dict
from jaxqat.core._serialize import spec_to_dict
from jaxqat.keras._backend import backend_name
from jaxqat.keras._backend import is_jax
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import ops
from jaxqat.keras._quantizer import Quantizer
from jaxqat.keras._quantizer import _unwrap
from jaxqat.keras._quantizer import check_act_spec
from jaxqat.keras._quantizer import run_quantizer

__all__ = [
    "QuantLayer",
    "QuantDense",
    "QuantEinsumDense",
    "QuantConv1D",
    "QuantConv2D",
    "QuantConv3D",
    "QuantDepthwiseConv1D",
    "QuantDepthwiseConv2D",
    "QuantSeparableConv1D",
    "QuantSeparableConv2D",
    "QuantConv1DTranspose",
    "QuantConv2DTranspose",
    "QuantConv3DTranspose",
    "QuantEmbedding",
    "QuantSimpleRNNCell",
    "QuantLSTMCell",
    "QuantGRUCell",
    "QuantConvLSTMCell",
    "quantized_class",
    "gathered_class",
    "gathered_weights",
    "quantize_in_place",
    "float_class",
    "check_compute",
    "ComputeModeError",
    "FLOAT_TO_QUANT",
]


def _einsum_output_axes(equation: str, kernel_rank: int) -> tuple[int, ...]:
  lhs, out = equation.replace(" ", "").split("->")
  _, kernel = lhs.split(",")
  return tuple(i for i, c in enumerate(kernel[-kernel_rank:]) if c in out)


class ComputeModeError(ValueError):
  """A layer cannot run the compute mode its rule asks for (raised, never reported)."""


def _integer_backend_reason() -> Optional[str]:
  if is_jax():
    return None
  return (f"the integer forward (int8 x int8 -> int32, jaxqat.core.qat_op) needs the JAX "
          f"backend; Keras runs on {backend_name()!r} here: use compute='fake' on this backend")


def check_compute(qcls, layer, *, weight_spec, act_spec, compute: str, where: str,
                  specs: bool = True) -> None:
  """Raises if ``layer`` cannot run ``compute`` (see :class:`QuantLayer`).

  Args:
    qcls: the quantized class the layer has or gets (``None``: none).
    layer: the layer (float or quantized; built, for the spec check).
    weight_spec: the layer's weight spec (``PerOutputChannel()`` allowed).
    act_spec: the layer's input spec.
    compute: ``"fake"`` or ``"integer"``.
    where: the layer, for the message (``"layer 'block/dense'"``).
    specs: also check the specs against the built layer's kernel.

  Raises:
    ComputeModeError: naming the layer and why (its class, LoRA, the Keras
      backend, or what :func:`jaxqat.core.qat_op` cannot take: a
      weight-only layer, a float or block format, more than 8 bits, a
      per-channel input, kernel scales along a contracted axis, an affine
      conv kernel).

  Examples:
    >>> import keras
    >>> from jaxqat.core import QuantSpec
    >>> check_compute(QuantEmbedding, keras.layers.Embedding(4, 2), weight_spec=QuantSpec(),
    ...               act_spec=None, compute="integer", where="layer 'emb'")
    Traceback (most recent call last):
    ...
    jaxqat.keras._layers.ComputeModeError: layer 'emb': compute='integer' cannot run this layer in integer arithmetic: QuantEmbedding has no integer forward (it runs Dense, EinsumDense, Conv1D/2D/3D, Conv1D/2D/3DTranspose, DepthwiseConv1D/2D and SeparableConv1D/2D layers)
  """
  if compute == "fake":
    return
  reason = None
  if qcls is None or qcls.integer_op is None or qcls.call is not QuantLayer.call:
    name = type(layer).__name__ if qcls is None else qcls.__name__
    reason = (f"{name} has no integer forward (it runs Dense, EinsumDense, Conv1D/2D/3D, "
              "Conv1D/2D/3DTranspose, DepthwiseConv1D/2D and SeparableConv1D/2D layers)")
  elif getattr(layer, "lora_enabled", False):
    reason = "LoRA is enabled (the integer forward has no LoRA term)"
  else:
    reason = _integer_backend_reason()
  if reason is None and specs and layer.built:
    from jaxqat.core import _integer  # pylint: disable=import-outside-toplevel
    attr = qcls.quant_weights[0][0]
    shape = tuple(getattr(layer, attr).shape)
    channel = tuple(qcls.channel_axes(layer, attr, shape))
    wspec = None if weight_spec is None else weight_spec.resolve_output_channel(channel)
    reason = _integer.spec_reason(act_spec, wspec, len(shape),
                                  tuple(i for i in range(len(shape)) if i not in channel),
                                  conv=qcls.integer_op.startswith("conv"))
  if reason is not None:
    raise ComputeModeError(f"{where}: compute='integer' cannot run this layer in integer "
                           f"arithmetic: {reason}")


class QuantLayer:
  """Mixin that adds weight and input quantization to a Keras layer.

  Subclasses list ``quant_weights``: ``(attribute, quantizer_name)`` pairs,
  the attribute holding the float variable that the float ``call`` reads.

  **Compute modes** (:attr:`jaxqat.core.Rule.compute`). ``"fake"`` runs the
  float layer's ``call`` on fake-quantized operands. ``"integer"`` (Dense,
  EinsumDense, Conv1D/2D/3D, Conv1D/2D/3DTranspose, DepthwiseConv1D/2D and
  the depthwise convolution of SeparableConv1D/2D, whose pointwise one is
  weight-only; JAX backend) runs the layer's matmul,
  einsum or convolution through :func:`jaxqat.core.qat_op`: int8 x int8 ->
  int32 with one rescale in the forward, the same straight-through backward
  as ``"fake"``. It needs integer specs of <= 8 bits for the input (per
  tensor) and the kernel (per tensor or per output channel; a conv kernel
  symmetric). Otherwise, or on another backend, constructing or building
  the layer raises a :class:`ComputeModeError` (a ``ValueError``) naming the
  layer and the reason. While a quantizer calibrates or is set to float the
  layer runs the fake path.

  Args:
    weight_spec: the QuantSpec for the weights (``None``: float weights).
      ``PerOutputChannel()`` is resolved per weight (see the module doc).
    act_spec: the QuantSpec for the input activation (``None``: float input).
    observe: forwarded to the :class:`Quantizer` sublayers (``None``:
      their default).
    compute: ``"fake"`` (default) or ``"integer"``.
    *args, **kwargs: the float layer's arguments.

  Raises:
    ValueError: if ``act_spec`` has granularity ``PerOutputChannel()``, or
      ``compute`` is unknown.
    ComputeModeError: if the layer cannot run ``compute="integer"``.
  """

  quant_weights: tuple[tuple[str, str], ...] = ()
  quantize_input: bool = True
  integer_op: Optional[str] = None  # the jaxqat.core.qat_op op of compute="integer"

  def __init__(self, *args, weight_spec=None, act_spec=None, observe: Optional[bool] = None,
               compute: str = "fake", **kwargs):
    super().__init__(*args, **kwargs)
    self._init_quant(weight_spec, act_spec, observe, compute)

  def _init_quant(self, weight_spec, act_spec, observe, compute="fake"):
    """The quantization state of ``__init__`` (also set on a layer converted in place)."""
    where = f"{type(self).__name__} {self.name!r}"
    self.weight_spec = spec_from_dict(weight_spec, where=f"{where} weight_spec")
    act_spec = spec_from_dict(act_spec, where=f"{where} act_spec")
    check_act_spec(act_spec, f"{type(self).__name__} {self.name!r}")
    self.act_spec = act_spec if self.quantize_input else None
    self.observe = observe
    if compute not in COMPUTE_MODES:
      raise ValueError(f"{where}: compute must be one of {COMPUTE_MODES}, got {compute!r}")
    self.compute = compute
    check_compute(type(self), self, weight_spec=self.weight_spec, act_spec=self.act_spec,
                  compute=compute, where=where, specs=False)
    self.input_quantizer = None
    sig = inspect.signature(super().call)
    self._super_takes_training = "training" in sig.parameters

  # -- the core op (JAX): jaxqat.core.qat_op, both compute modes -------------

  def _core_ranges(self, inputs, training):
    """``(act, weight, x, w)`` for :func:`jaxqat.core.qat_op`, or None to run the float ``call``.

    ``weight`` and ``w`` are lists, one entry per quantized weight, for a
    layer of several (SeparableConv: depthwise, pointwise).

    On the JAX backend a layer with a core op (Dense, EinsumDense, Conv,
    DepthwiseConv, SeparableConv, ConvTranspose) runs it through ``qat_op`` in
    both compute modes, as the
    NNX and Linen layers do: with ``compute="fake"`` its lean backward keeps
    ``x``, ``w`` and the ranges and recomputes the fake quantization, instead
    of keeping the fake-quantized operands and clip masks of the plain
    composition (same values and gradients). Elsewhere (other backends, LoRA,
    a quantizer calibrating or set to float) the float layer's ``call`` runs
    on fake-quantized operands.
    """
    if (self.integer_op is None or getattr(self, "lora_enabled", False)
        or not hasattr(self, "weight_quantizers")):
      return None
    iq = self.input_quantizer
    wqs = [self.weight_quantizers.get(attr) for attr, _ in self.quant_weights]
    if not takes_core_op(iq, *wqs):
      return None
    x = quantizer_operand(iq, ops.convert_to_tensor(inputs))
    ws = [quantizer_operand(q, _unwrap(getattr(self, attr)))
          for q, (attr, _) in zip(wqs, self.quant_weights)]
    ranges = [quantizer_ranges(q, w, training, tracked=True) for q, w in zip(wqs, ws)]
    if len(ws) == 1:  # one weight (all but SeparableConv): the weight and its ranges themselves
      (ws,), (ranges,) = ws, ranges
    return quantizer_ranges(iq, x, training), ranges, x, ws

  def _core_op(self, x, w, act, weight):
    """The layer's op through :func:`jaxqat.core.qat_op` (operands from ``_core_ranges``)."""
    raise NotImplementedError

  def _bias_activation(self, y):
    """The float ``call``'s bias and activation after the op (Dense, EinsumDense)."""
    if self.bias is not None:
      y = ops.add(y, self.bias)
    return y if self.activation is None else self.activation(y)

  # -- per-layer channel axes ------------------------------------------------

  def channel_axes(self, attr: str, shape) -> tuple[int, ...]:
    """Output-channel axes of the weight held in ``attr`` (default: last axis).

    Args:
      attr: the attribute holding the weight (``"_kernel"``...).
      shape: the weight's shape.

    Returns:
      The non-negative axes the layer does not contract (may be empty).
    """
    return (len(shape) - 1,)

  def weight_spec_for(self, attr: str, shape) -> spec_lib.QuantSpec:
    """The weight spec of ``attr`` with ``PerOutputChannel()`` resolved.

    Args:
      attr: the attribute holding the weight.
      shape: the weight's shape.

    Returns:
      ``weight_spec.resolve_output_channel(channel_axes(attr, shape))``:
      other granularities (``PerChannel(-1)`` included) are kept as given.
    """
    return self.weight_spec.resolve_output_channel(self.channel_axes(attr, shape))

  def build(self, input_shape):
    super().build(input_shape)
    self._build_quantizers(input_shape)

  def _build_quantizers(self, input_shape):
    """Creates the input and weight quantizers (the float weights exist already)."""
    if self.act_spec is not None:
      self.input_quantizer = Quantizer(self.act_spec, role="act", observe=self.observe,
                                       name="input_quantizer", dtype=self.dtype_policy)
      self.input_quantizer.build(input_shape)
    self.weight_quantizers = {}
    if self.weight_spec is not None:
      for attr, qname in self.quant_weights:
        var = getattr(self, attr)
        q = Quantizer(self.weight_spec_for(attr, var.shape), role="weight",
                      observe=self.observe, name=qname, dtype=self.dtype_policy)
        q.build(var.shape)
        setattr(self, qname, q)
        self.weight_quantizers[attr] = q
    check_compute(type(self), self, weight_spec=self.weight_spec, act_spec=self.act_spec,
                  compute=self.compute, where=f"{type(self).__name__} {self.name!r}")

  def act_quantizers(self) -> list:
    """``(name, quantizer)`` of each quantized activation: ``("input", input_quantizer)``.

    A recurrent cell adds ``("state", state_quantizer)``. Quantizers are
    ``None`` where the activation stays float.
    """
    return [("input", self.input_quantizer)]

  def float_weight(self, attr: str):
    """The float variable held in ``attr``."""
    return getattr(self, attr)

  def init_weight_ranges(self):
    """Sets every weight quantizer's range from the current float weights.

    Uses the core observer of each weight spec's calibration method (run
    eagerly; the result is exact on every backend).
    """
    for attr, q in getattr(self, "weight_quantizers", {}).items():
      if q.has_scale:  # block formats (nvfp4, MX) derive their scales from the data
        q.calibrate_from([getattr(self, attr)])

  def quantized_weight(self, attr: str, training=None):
    """The fake-quantized weight of ``attr`` (the float one if unquantized)."""
    var = getattr(self, attr)
    q = getattr(self, "weight_quantizers", {}).get(attr)
    if q is None:
      return var
    return run_quantizer(q, ops.convert_to_tensor(var), training=training)

  def call(self, inputs, *args, training=None, **kwargs):
    core = self._core_ranges(inputs, training)
    if core is not None:
      act, weight, x, w = core
      return self._core_op(x, w, act, weight)
    if self.input_quantizer is not None:
      inputs = run_quantizer(self.input_quantizer, inputs, training=training)
    if self._super_takes_training:
      kwargs["training"] = training
    quantizers = getattr(self, "weight_quantizers", {})
    if not quantizers:
      return super().call(inputs, *args, **kwargs)
    saved = {}
    try:
      for attr, q in quantizers.items():
        var = getattr(self, attr)
        saved[attr] = var
        object.__setattr__(self, attr, run_quantizer(q, ops.convert_to_tensor(var),
                                                     training=training))
      return super().call(inputs, *args, **kwargs)
    finally:
      for attr, var in saved.items():
        object.__setattr__(self, attr, var)

  def freeze_quantizers(self):
    """Stops range observation in every quantizer of this layer (saved in the config)."""
    self.observe = False
    for _, q in self.act_quantizers():
      if q is not None:
        q.freeze()
    for attr, q in getattr(self, "weight_quantizers", {}).items():
      q.freeze(getattr(self, attr))

  def get_config(self):
    config = super().get_config()
    config.update({
        "weight_spec": spec_to_dict(self.weight_spec),
        "act_spec": spec_to_dict(self.act_spec),
        "observe": self.observe,
        "compute": self.compute,
    })
    return config


_DOC = """Quantized :class:`keras.layers.{base}`: {what}.

  Takes the float layer's arguments plus ``weight_spec``, ``act_spec`` and
  ``observe`` (see :class:`QuantLayer`).

  Examples:
    >>> import numpy as np
    >>> from jaxqat.core import QuantSpec
    >>> layer = {name}({example}, weight_spec=QuantSpec(format="int4"))
    >>> y = layer(np.ones({shape}, "float32"))
    >>> layer.kernel_quantizer.scale.shape == layer.kernel_quantizer.spec.scale_shape(layer.{attr}.shape)
    True
"""


def _register(cls):
  return keras.saving.register_keras_serializable(package="jaxqat")(cls)


def takes_core_op(*quantizers) -> bool:
  """Whether an op with these quantizers (None: operand left float) runs ``core.qat_op``.

  On the JAX backend, when something is quantized and no quantizer is
  calibrating or set to float (those run the float layer's ``call``).
  """
  return (is_jax() and any(q is not None for q in quantizers)
          and all(q is None or q.active for q in quantizers))


def quantizer_operand(q, t):
  """``t`` as quantizer ``q``'s own ``__call__`` receives it (a float cast to its compute dtype).

  The float path calls the quantizer layer, and Keras casts its floating
  input to the layer's compute dtype (``mixed_bfloat16``: bfloat16); the core
  op gets its operands so too. ``t`` is returned as it is when ``q`` is None.
  """
  if q is None:
    return t
  dtype = keras.backend.standardize_dtype(t.dtype)
  if "float" in dtype and dtype != q.compute_dtype:
    return ops.cast(t, q.compute_dtype)
  return t


def quantizer_ranges(q, t, training, tracked: bool = False):
  """``(spec, scale, zero_point, offset)`` of quantizer ``q`` for tensor ``t``, or None.

  The operand entry :func:`jaxqat.core.qat_op` takes; with ``tracked`` (a
  weight) it ends with whether ``q`` tracks ``t`` unclipped
  (:attr:`Quantizer.tracks_unclipped`, ``qat_op``'s ``weight_tracked``).
  """
  if q is None:
    return None
  rng = q.current_range(t, training)
  out = (q.spec,) + tuple(None if r is None else _unwrap(r) for r in rng)
  return out + (q.tracks_unclipped,) if tracked else out


def core_op(compute, op, x, w, act, weight, **kw):
  """``jaxqat.core.qat_op`` in ``compute`` mode; ``weight`` from :func:`quantizer_ranges`."""
  from jaxqat.core import qat_op  # pylint: disable=import-outside-toplevel
  return qat_op(op, x, w, act=act, weight=None if weight is None else weight[:-1],
                compute=compute, weight_tracked=bool(weight and weight[-1]), **kw)


def conv_core_op(compute, conv, x, w, act, weight, depthwise: bool = False):
  """The convolution of the Keras layer ``conv`` (no bias) through :func:`core_op`.

  As Keras's JAX backend runs it: ``conv_general_dilated`` with the layer's
  strides, padding (``"causal"``: the past padded), dilation and feature
  groups; a depthwise kernel as a grouped one (:func:`depthwise_as_grouped`).
  """
  if depthwise and weight is not None:
    spec, *ranges, tracked = weight
    spec, shape, ranges = depthwise_as_grouped(spec, tuple(w.shape), *ranges)
    w, weight = ops.reshape(w, shape), (spec, *ranges, tracked)
  elif depthwise:
    shape = tuple(w.shape)
    w = ops.reshape(w, shape[:-2] + (1, shape[-2] * shape[-1]))
  padding = conv.padding.upper()
  if padding == "CAUSAL":  # Conv1D: the past padded by the convolution (x is quantized unpadded)
    padding = ((conv.dilation_rate[0] * (conv.kernel_size[0] - 1), 0),)
  channels = x.shape[-1] if conv.data_format == "channels_last" else x.shape[1]
  return core_op(compute, "conv_general_dilated", x, w, act, weight,
                 window_strides=tuple(conv.strides), padding=padding,
                 rhs_dilation=tuple(conv.dilation_rate), dimension_numbers=_layout(conv),
                 feature_group_count=int(channels) // int(w.shape[-2]))


def _layout(conv) -> tuple:
  """The ``conv_general_dilated`` dimension numbers of a Keras convolution (``IO`` kernel)."""
  spatial = "DHW"[3 - conv.rank:]
  lhs = "N" + spatial + "C" if conv.data_format == "channels_last" else "NC" + spatial
  return (lhs, spatial + "IO", lhs)


@_register
class QuantDense(QuantLayer, keras.layers.Dense):
  quant_weights = (("_kernel", "kernel_quantizer"),)
  integer_op = "dot_general"

  def _core_op(self, x, w, act, weight):
    dims = (((len(x.shape) - 1,), (0,)), ((), ()))
    return self._bias_activation(core_op(self.compute, self.integer_op, x, w, act, weight,
                                         dimension_numbers=dims))


@_register
class QuantEinsumDense(QuantLayer, keras.layers.EinsumDense):
  quant_weights = (("_kernel", "kernel_quantizer"),)
  integer_op = "einsum"

  def channel_axes(self, attr, shape):
    return _einsum_output_axes(self.equation, len(shape))

  def _core_op(self, x, w, act, weight):
    return self._bias_activation(core_op(self.compute, self.integer_op, x, w, act, weight,
                                         subscripts=self.equation))


class _CoreConv:
  """The core op of Conv1D/2D/3D: the float layers' convolution, bias, activation."""

  integer_op = "conv_general_dilated"
  depthwise = False

  def _conv(self, x, w, act, weight):
    return conv_core_op(self.compute, self, x, w, act, weight, depthwise=self.depthwise)

  def _core_op(self, x, w, act, weight):
    y = self._conv(x, w, act, weight)
    if self.use_bias:
      y = ops.add(y, channel_bias(self, self.bias))
    return y if self.activation is None else self.activation(y)


def channel_bias(conv, bias):
  """A Keras convolution's bias ``(C,)`` laid out to add to its output (``conv.data_format``)."""
  shape = ((1,) * (conv.rank + 1) + (-1,) if conv.data_format == "channels_last"
           else (1, -1) + (1,) * conv.rank)
  return ops.reshape(bias, shape)


@_register
class QuantConv1D(_CoreConv, QuantLayer, keras.layers.Conv1D):
  quant_weights = (("_kernel", "kernel_quantizer"),)


@_register
class QuantConv2D(_CoreConv, QuantLayer, keras.layers.Conv2D):
  quant_weights = (("_kernel", "kernel_quantizer"),)


@_register
class QuantConv3D(_CoreConv, QuantLayer, keras.layers.Conv3D):
  quant_weights = (("_kernel", "kernel_quantizer"),)


class _DepthwiseAxes:
  def channel_axes(self, attr, shape):
    nd = len(shape)
    if attr in ("kernel", "depthwise_kernel"):
      return (nd - 2, nd - 1)
    return (nd - 1,)


def depthwise_as_grouped(spec, shape, *tensors):
  """A depthwise kernel ``(k..., C, M)`` laid out as a grouped convolution's ``(k..., 1, C*M)``.

  Keras's JAX backend runs ``DepthwiseConv1D/2D`` so: ``C`` feature groups,
  ``M`` (the depth multiplier) output channels each. Per-channel ranges over
  ``(C, M)`` (or one of them) follow the kernel, one per output channel, and
  a per-channel spec becomes per output channel (the last axis).

  Args:
    spec: the kernel's QuantSpec.
    shape: the kernel's shape ``(k..., C, M)``.
    *tensors: ranges in broadcast layout (scale, zero point, offset), None or
      scalars (per tensor) are returned as they are.

  Returns:
    ``(spec, grouped kernel shape, [tensors])``.

  Examples:
    >>> import numpy as np
    >>> from jaxqat.core import PerChannel, QuantSpec
    >>> spec, shape, (s,) = depthwise_as_grouped(QuantSpec(granularity=PerChannel((2, 3))),
    ...                                          (3, 3, 2, 2), np.array([[[[1., 2.], [3., 4.]]]]))
    >>> spec.granularity, shape, np.asarray(s).tolist()
    (PerChannel(axis=3), (3, 3, 1, 4), [[[[1.0, 2.0, 3.0, 4.0]]]])
  """
  nd = len(shape)
  c, m = int(shape[-2]), int(shape[-1])

  def flat(t):
    if t is None or not len(t.shape):
      return t
    return ops.reshape(ops.broadcast_to(t, (1,) * (nd - 2) + (c, m)), (1,) * (nd - 1) + (c * m,))

  if isinstance(spec.granularity, spec_lib.PerChannel):
    spec = spec.replace(granularity=spec_lib.PerChannel(nd - 1))
  return spec, tuple(int(d) for d in shape[:-2]) + (1, c * m), [flat(t) for t in tensors]


@_register
class QuantDepthwiseConv1D(_CoreConv, _DepthwiseAxes, QuantLayer,
                           keras.layers.DepthwiseConv1D):
  quant_weights = (("kernel", "kernel_quantizer"),)
  depthwise = True


@_register
class QuantDepthwiseConv2D(_CoreConv, _DepthwiseAxes, QuantLayer,
                           keras.layers.DepthwiseConv2D):
  quant_weights = (("kernel", "kernel_quantizer"),)
  depthwise = True


class _CoreSeparable(_CoreConv):
  """The core op of SeparableConv1D/2D: Keras's ``separable_conv`` as two core convolutions.

  The depthwise convolution of the quantized input runs ``qat_op`` in the
  layer's compute mode; the 1x1 convolution of its output with the pointwise
  kernel is weight-only (the layer quantizes no activation in between), so it
  runs ``"fake"`` in both modes, as the served layer
  (:class:`~jaxqat.keras.ServedSeparableConv`) dequantizes it.
  """

  depthwise = True

  def _conv(self, x, w, act, weight):
    (dw, pw), (dw_range, pw_range) = w, weight
    d = conv_core_op(self.compute, self, x, dw, act, dw_range, depthwise=True)
    return core_op("fake", "conv_general_dilated", d, pw, None, pw_range,
                   window_strides=(1,) * self.rank, padding="VALID",
                   rhs_dilation=tuple(self.dilation_rate), dimension_numbers=_layout(self))


@_register
class QuantSeparableConv1D(_CoreSeparable, _DepthwiseAxes, QuantLayer,
                           keras.layers.SeparableConv1D):
  quant_weights = (("depthwise_kernel", "depthwise_kernel_quantizer"),
                   ("pointwise_kernel", "pointwise_kernel_quantizer"))


@_register
class QuantSeparableConv2D(_CoreSeparable, _DepthwiseAxes, QuantLayer,
                           keras.layers.SeparableConv2D):
  quant_weights = (("depthwise_kernel", "depthwise_kernel_quantizer"),
                   ("pointwise_kernel", "pointwise_kernel_quantizer"))


def transpose_args(conv, x_shape, w_shape) -> dict:
  """The ``lax.conv_transpose`` arguments of the Keras layer ``conv`` (a ConvNDTranspose).

  As Keras's JAX backend runs it: ``transpose_kernel=True`` and Keras's
  padding (``output_padding`` included), computed by the same helper Keras
  uses.
  """
  # pylint: disable=import-outside-toplevel
  from keras.src.backend.common.backend_utils import compute_conv_transpose_padding_args_for_jax
  from keras.src.backend.jax import nn as jax_nn  # the same private helpers Keras uses
  pads = compute_conv_transpose_padding_args_for_jax(
      input_shape=tuple(x_shape), kernel_shape=tuple(w_shape), strides=conv.strides,
      padding=conv.padding, output_padding=conv.output_padding,
      dilation_rate=conv.dilation_rate)
  dn = jax_nn._convert_to_lax_conv_dimension_numbers(  # pylint: disable=protected-access
      conv.rank, conv.data_format, transpose=False)
  return dict(strides=tuple(conv.strides), padding=tuple(tuple(p) for p in pads),
              rhs_dilation=tuple(conv.dilation_rate), dimension_numbers=dn,
              transpose_kernel=True)


def transpose_core_op(compute, conv, x, w, act, weight):
  """The transposed convolution of the Keras layer ``conv`` (no bias) through :func:`core_op`."""
  return core_op(compute, "conv_transpose", x, w, act, weight,
                 **transpose_args(conv, x.shape, w.shape))


class _TransposeAxes:
  """A transposed convolution's kernel is ``(k..., filters, in_channels)``: the filters (the
  output channels) are axis -2."""

  def channel_axes(self, attr, shape):
    return (len(shape) - 2,)


class _CoreConvTranspose(_CoreConv):
  """The core op of Conv1D/2D/3DTranspose: ``core.qat_op("conv_transpose")``."""

  integer_op = "conv_transpose"

  def _conv(self, x, w, act, weight):
    return transpose_core_op(self.compute, self, x, w, act, weight)


@_register
class QuantConv1DTranspose(_CoreConvTranspose, _TransposeAxes, QuantLayer,
                           keras.layers.Conv1DTranspose):
  quant_weights = (("kernel", "kernel_quantizer"),)


@_register
class QuantConv2DTranspose(_CoreConvTranspose, _TransposeAxes, QuantLayer,
                           keras.layers.Conv2DTranspose):
  quant_weights = (("kernel", "kernel_quantizer"),)


@_register
class QuantConv3DTranspose(_CoreConvTranspose, _TransposeAxes, QuantLayer,
                           keras.layers.Conv3DTranspose):
  quant_weights = (("kernel", "kernel_quantizer"),)


class _EmbeddingAxes:
  quantize_input = False  # the input holds token ids

  def channel_axes(self, attr, shape):
    return (0,)


@_register
class QuantEmbedding(_EmbeddingAxes, QuantLayer, keras.layers.Embedding):
  quant_weights = (("_embeddings", "embeddings_quantizer"),)


class _RNNCell:
  """What a quantized recurrent cell (SimpleRNNCell, LSTMCell, GRUCell) quantizes.

  A cell runs two matmuls per step: ``x_t @ kernel`` and ``h_{t-1} @
  recurrent_kernel`` (each holding every gate's columns). Both kernels are
  quantized (``PerOutputChannel()``: one scale per column, i.e. per gate and
  unit, as a Flax cell's per-gate Dense layers get), and both matmul inputs:
  ``x_t`` by ``input_quantizer`` and the recurrent state ``h_{t-1}`` by
  ``state_quantizer`` (the same activation spec; an LSTM's carry ``c``
  feeds no matmul and stays float). The cell's own ``call`` runs on these
  operands, so its gates, activations, dropout and ``implementation`` are
  Keras's. (A GRU with ``reset_after=False`` multiplies the quantized state
  by its reset gate before the candidate's matmul; that product is not on
  the grid.)

  The RNN layer that runs a quantized cell is kept off cuDNN (its
  ``use_cudnn`` is set to False: the cuDNN kernel reads the float weights
  and never calls the cell), and :func:`jaxqat.keras.calibrate` unrolls it
  while observing, so that every step's input and state are seen. Running
  statistics in training (``observe=True``) cannot be updated from inside the
  RNN's loop; such cells get ``observe=False`` with a warning, and their
  ranges come from ``calibrate``.
  """

  def _init_quant(self, weight_spec, act_spec, observe, compute="fake"):
    if observe:
      import warnings  # pylint: disable=import-outside-toplevel
      from jaxqat.core._report import QuantizationWarning  # pylint: disable=import-outside-toplevel
      warnings.warn(f"{type(self).__name__} {self.name!r}: observe=True cannot update running "
                    "range statistics inside the RNN's loop; its input and state ranges come "
                    "from jaxqat.keras.calibrate", QuantizationWarning, stacklevel=3)
      observe = False
    super()._init_quant(weight_spec, act_spec, observe, compute)
    self.state_quantizer = None

  def _build_quantizers(self, input_shape):
    super()._build_quantizers(input_shape)
    if self.act_spec is not None:
      self.state_quantizer = Quantizer(self.act_spec, role="act", observe=self.observe,
                                       name="state_quantizer", dtype=self.dtype_policy)
      self.state_quantizer.build(self._state_shape(input_shape))

  def _state_shape(self, input_shape):
    """The shape of ``h_{t-1}`` (a step input's, with the cell's units as its channels)."""
    shape = (None,) if input_shape is None else tuple(input_shape)
    units = getattr(self, "units", None) or self.filters  # ConvLSTM cells have filters
    if len(shape) <= 2:
      return (shape[0], units)
    if getattr(self, "data_format", "channels_last") == "channels_first":
      return (shape[0], units) + shape[2:]
    return shape[:-1] + (units,)

  def act_quantizers(self) -> list:
    return super().act_quantizers() + [("state", self.state_quantizer)]

  def call(self, inputs, states, training=None, **kwargs):
    sq = self.state_quantizer
    fn = None if sq is None else (lambda h: run_quantizer(sq, h, training=training))
    return run_with_state_operand(self, fn, super().call, (inputs, states),
                                  dict(kwargs, training=training))


def run_with_state_operand(cell, fn, call, args, kwargs):
  """Runs a recurrent cell's step ``call(inputs, states, ...)`` with ``h_{t-1}`` read as ``fn(h)``.

  ``fn`` None runs the step as given. A :class:`GRUStateOperand` cell reads
  ``fn`` through its step's hook, at its recurrent matmuls only (its
  ``h_{t-1}`` also mixes into the new state); other cells get ``states``
  (positional or keyword) with the first entry replaced, in the same form (a
  list/tuple or a single tensor).
  """
  if fn is None:
    return call(*args, **kwargs)
  if isinstance(cell, GRUStateOperand):
    cell.state_operand = fn
    try:
      return call(*args, **kwargs)
    finally:
      cell.state_operand = None

  def first(states):
    if not isinstance(states, (list, tuple)):
      return fn(states)
    new = [fn(states[0]), *states[1:]]
    return tuple(new) if isinstance(states, tuple) else new

  if len(args) > 1:
    args = (args[0], first(args[1])) + tuple(args[2:])
  elif "states" in kwargs:
    kwargs = dict(kwargs, states=first(kwargs["states"]))
  return call(*args, **kwargs)


class GRUStateOperand:
  """GRUCell's step with its recurrent matmuls reading ``state_operand(h_{t-1})``.

  A GRU's previous state is both a matmul operand and a term of the new
  state (``h = z * h_{t-1} + (1 - z) * hh``): only the operand is quantized,
  so the cell cannot simply be handed a quantized state as an LSTM can. This
  is Keras's ``GRUCell`` step (``implementation=2``: one matmul per operand;
  ``reset_after=False`` multiplies the reset gate into the state before the
  candidate's matmul, whose operand is then ``state_operand(r * h)``), with
  the operand hook; with no hook (``state_operand`` None) it is Keras's.
  """

  state_operand = None

  def call(self, inputs, states, training=False):
    nested = isinstance(states, (list, tuple))
    h_tm1 = states[0] if nested else states
    op = self.state_operand or (lambda h: h)
    if training and 0.0 < self.dropout < 1.0:
      inputs = inputs * self.get_dropout_mask(inputs)
    h_in = h_tm1
    if training and 0.0 < self.recurrent_dropout < 1.0:
      h_in = h_tm1 * self.get_recurrent_dropout_mask(h_tm1)
    u = self.units
    matrix_x = ops.matmul(inputs, self.kernel)
    input_bias = recurrent_bias = None
    if self.use_bias:
      if self.reset_after:
        input_bias, recurrent_bias = (ops.squeeze(b, axis=0) for b in ops.split(self.bias, 2))
      else:
        input_bias = self.bias
      matrix_x = ops.add(matrix_x, input_bias)
    x_z, x_r, x_h = ops.split(matrix_x, 3, axis=-1)
    if self.reset_after:
      inner = ops.matmul(op(h_in), self.recurrent_kernel)
      if recurrent_bias is not None:
        inner += recurrent_bias
    else:
      inner = ops.matmul(op(h_in), self.recurrent_kernel[:, :2 * u])
    z = self.recurrent_activation(x_z + inner[:, :u])
    r = self.recurrent_activation(x_r + inner[:, u:2 * u])
    if self.reset_after:
      recurrent_h = r * inner[:, 2 * u:]
    else:
      recurrent_h = ops.matmul(op(r * h_in), self.recurrent_kernel[:, 2 * u:])
    hh = self.activation(x_h + recurrent_h)
    h = z * h_tm1 + (1 - z) * hh
    return h, ([h] if nested else h)


_CELL_WEIGHTS = (("kernel", "kernel_quantizer"), ("recurrent_kernel", "recurrent_kernel_quantizer"))


_CELL_DOC = """Quantized :class:`keras.layers.{base}`: both kernels, the step input and the state.

  Takes the float cell's arguments plus ``weight_spec``, ``act_spec`` and
  ``observe`` (see :class:`QuantLayer` and ``_RNNCell``); run it inside a
  ``keras.layers.RNN`` (or let :func:`jaxqat.keras.quantize` convert the
  cell of a ``{layer}`` layer).

  Examples:
    >>> import numpy as np
    >>> from jaxqat.core import PerOutputChannel, QuantSpec
    >>> cell = {name}(3, weight_spec=QuantSpec(format="int4", granularity=PerOutputChannel()))
    >>> y = keras.layers.RNN(cell)(np.ones((2, 5, 4), "float32"))
    >>> cell.kernel_quantizer.scale.shape, cell.recurrent_kernel_quantizer.scale.shape
    ((1, {cols}), (1, {cols}))
"""


@_register
class QuantSimpleRNNCell(_RNNCell, QuantLayer, keras.layers.SimpleRNNCell):
  __doc__ = _CELL_DOC.format(base="SimpleRNNCell", layer="SimpleRNN", name="QuantSimpleRNNCell",
                             cols=3)
  quant_weights = _CELL_WEIGHTS


@_register
class QuantLSTMCell(_RNNCell, QuantLayer, keras.layers.LSTMCell):
  __doc__ = _CELL_DOC.format(base="LSTMCell", layer="LSTM", name="QuantLSTMCell", cols=12)
  quant_weights = _CELL_WEIGHTS


@_register
class QuantGRUCell(_RNNCell, QuantLayer, GRUStateOperand, keras.layers.GRUCell):
  __doc__ = _CELL_DOC.format(base="GRUCell", layer="GRU", name="QuantGRUCell", cols=9)
  quant_weights = _CELL_WEIGHTS


from keras.src.layers.rnn.conv_lstm import ConvLSTMCell as _ConvLSTMCell  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@_register
class QuantConvLSTMCell(_RNNCell, QuantLayer, _ConvLSTMCell):
  """Quantized cell of ``keras.layers.ConvLSTM1D/2D/3D``: both kernels, the step input and ``h``.

  As the other recurrent cells (``_RNNCell``): the input and recurrent
  convolutions' kernels get one scale per output channel (per gate and
  filter), ``x_t`` and ``h_{t-1}`` are quantized, the carry stays float.

  Examples:
    >>> import numpy as np
    >>> import jaxqat.keras as jqk
    >>> q = jqk.quantize(keras.Sequential([keras.Input((4, 6, 2)),
    ...                                    keras.layers.ConvLSTM1D(3, 3, name="c")]))
    >>> cell = q.get_layer("c").cell
    >>> type(cell).__name__, cell.recurrent_kernel_quantizer.scale.shape
    ('QuantConvLSTMCell', (1, 1, 12))
  """
  quant_weights = _CELL_WEIGHTS


def rnn_cells(layer) -> list:
  """The cells an RNN layer runs (a StackedRNNCells' cells flattened); ``[]`` for other layers."""
  if not isinstance(layer, keras.layers.RNN):
    return []
  todo, out = [layer.cell], []
  while todo:
    cell = todo.pop(0)
    if isinstance(cell, keras.layers.StackedRNNCells):
      todo = list(cell.cells) + todo
    else:
      out.append(cell)
  return out


def quantized_loops(model, quantized=None) -> list:
  """The RNN layers of ``model`` that run a quantized (or served) cell.

  Args:
    model: a Keras model or layer.
    quantized: the predicate of a quantized cell (default: a :class:`QuantLayer`
      or a layer served in place).

  Returns:
    The RNN layers (Bidirectional's forward and backward layers included).
  """
  from jaxqat.keras import _graph  # pylint: disable=import-outside-toplevel
  quantized = quantized or (lambda c: isinstance(c, QuantLayer) or "_jaxqat_served" in vars(c))
  layers = [model] + [l for _, _, l in _graph.walk(model)]
  return [l for l in layers if any(quantized(c) for c in rnn_cells(l))]


def pin_quantized_loops(model) -> None:
  """Keeps every RNN layer of ``model`` that runs a quantized cell off cuDNN.

  LSTM and GRU layers (``use_cudnn="auto"``) hand their float weights to a
  fused cuDNN kernel on GPU when they can, which never calls the cell:
  their quantization would silently not run.
  """
  for layer in quantized_loops(model):
    if getattr(layer, "use_cudnn", False) is not False:
      layer.use_cudnn = False


_EXAMPLES = {
    QuantDense: ("Dense", "a weight (kernel) and input quantized dense layer", "3", "(2, 4)", "kernel"),
    QuantEinsumDense: ("EinsumDense", "quantized einsum projection", '"ab,bc->ac", output_shape=3',
                       "(2, 4)", "kernel"),
    QuantConv1D: ("Conv1D", "quantized 1-D convolution", "2, 3", "(1, 8, 4)", "kernel"),
    QuantConv2D: ("Conv2D", "quantized 2-D convolution", "2, 3", "(1, 8, 8, 4)", "kernel"),
    QuantConv3D: ("Conv3D", "quantized 3-D convolution", "2, 3", "(1, 4, 4, 4, 2)", "kernel"),
    QuantDepthwiseConv1D: ("DepthwiseConv1D", "quantized depthwise 1-D convolution "
                           "(one scale per output channel)", "3", "(1, 8, 4)", "kernel"),
    QuantDepthwiseConv2D: ("DepthwiseConv2D", "quantized depthwise 2-D convolution "
                           "(one scale per output channel)", "3", "(1, 8, 8, 4)", "kernel"),
    QuantSeparableConv1D: ("SeparableConv1D", "quantized separable 1-D convolution (both "
                           "kernels quantized)", "2, 3", "(1, 8, 4)", None),
    QuantSeparableConv2D: ("SeparableConv2D", "quantized separable 2-D convolution (both "
                           "kernels quantized)", "2, 3", "(1, 8, 8, 4)", None),
    QuantConv1DTranspose: ("Conv1DTranspose", "quantized transposed 1-D convolution (one "
                           "scale per filter: kernel axis -2)", "2, 3", "(1, 8, 4)", "kernel"),
    QuantConv2DTranspose: ("Conv2DTranspose", "quantized transposed 2-D convolution (one "
                           "scale per filter: kernel axis -2)", "2, 3", "(1, 8, 8, 4)", "kernel"),
    QuantConv3DTranspose: ("Conv3DTranspose", "quantized transposed 3-D convolution (one "
                           "scale per filter: kernel axis -2)", "2, 3", "(1, 4, 4, 4, 2)",
                           "kernel"),
    QuantEmbedding: ("Embedding", "quantized embedding table (one scale per token; the "
                     "integer input is not quantized)", "10, 4", "(2, 3)", "embeddings"),
}

for _cls, (_base, _what, _ex, _shape, _attr) in _EXAMPLES.items():
  if _attr is None:
    _cls.__doc__ = f"Quantized :class:`keras.layers.{_base}`: {_what}.\n\n" + (
        "  Takes the float layer's arguments plus ``weight_spec``, ``act_spec`` and\n"
        "  ``observe`` (see :class:`QuantLayer`).\n\n  Examples:\n"
        "    >>> import numpy as np\n    >>> from jaxqat.core import QuantSpec\n"
        f"    >>> layer = {_cls.__name__}({_ex}, weight_spec=QuantSpec(format='int4'))\n"
        f"    >>> layer(np.ones({_shape}, 'float32')).shape[-1]\n    2\n")
  elif _cls is QuantEmbedding:
    _cls.__doc__ = f"Quantized :class:`keras.layers.{_base}`: {_what}.\n\n" + (
        "  Takes the float layer's arguments plus ``weight_spec`` and ``observe``\n"
        "  (see :class:`QuantLayer`).\n\n  Examples:\n"
        "    >>> import numpy as np\n    >>> from jaxqat.core import QuantSpec, PerOutputChannel\n"
        "    >>> spec = QuantSpec(granularity=PerOutputChannel())\n"
        f"    >>> layer = QuantEmbedding({_ex}, weight_spec=spec)\n"
        f"    >>> layer(np.zeros({_shape}, 'int32')).shape\n    (2, 3, 4)\n"
        "    >>> layer.embeddings_quantizer.scale.shape  # one scale per token\n    (10, 1)\n")
  else:
    _cls.__doc__ = _DOC.format(base=_base, what=_what, name=_cls.__name__, example=_ex,
                               shape=_shape, attr=_attr)


# Float Keras class -> quantized class, most specific first.
FLOAT_TO_QUANT = {
    keras.layers.Dense: QuantDense,
    keras.layers.EinsumDense: QuantEinsumDense,
    keras.layers.Conv1D: QuantConv1D,
    keras.layers.Conv2D: QuantConv2D,
    keras.layers.Conv3D: QuantConv3D,
    keras.layers.DepthwiseConv1D: QuantDepthwiseConv1D,
    keras.layers.DepthwiseConv2D: QuantDepthwiseConv2D,
    keras.layers.SeparableConv1D: QuantSeparableConv1D,
    keras.layers.SeparableConv2D: QuantSeparableConv2D,
    keras.layers.Conv1DTranspose: QuantConv1DTranspose,
    keras.layers.Conv2DTranspose: QuantConv2DTranspose,
    keras.layers.Conv3DTranspose: QuantConv3DTranspose,
    keras.layers.Embedding: QuantEmbedding,
    keras.layers.SimpleRNNCell: QuantSimpleRNNCell,
    keras.layers.LSTMCell: QuantLSTMCell,
    keras.layers.GRUCell: QuantGRUCell,
    _ConvLSTMCell: QuantConvLSTMCell,
}

_DYNAMIC: dict = {}


def quantized_class(cls: type) -> Optional[type]:
  """The quantized class for a float Keras layer class (``None`` if unsupported).

  Exact Keras classes map to the classes above. A *subclass* of a supported
  layer (say a ``ReversibleEmbedding(keras.layers.Embedding)`` from another
  library) gets a generated class ``Quant<Name>`` that puts the quantization
  mixin in front of it, so its own ``call`` runs with quantized weights. The
  generated class of an ``Embedding`` subclass also quantizes the other
  weights of rank >= 2 the layer owns (an untied ``ReversibleEmbedding``'s
  ``reverse_embeddings``, a language model's output projection: one scale per
  output column). The generated class is registered as serializable under
  ``jaxqat>Quant<registered name of cls>``; to load a saved model that uses
  one, call ``quantized_class(cls)`` in the loading process first.

  Args:
    cls: a Keras layer class.

  Returns:
    The quantized class, or ``None`` when ``cls`` has no quantized version.

  Examples:
    >>> import keras
    >>> quantized_class(keras.layers.Dense).__name__
    'QuantDense'
    >>> class MyDense(keras.layers.Dense):
    ...   pass
    >>> quantized_class(MyDense).__name__
    'QuantMyDense'
    >>> quantized_class(keras.layers.LSTM) is None
    True
  """
  if not isinstance(cls, type):
    raise TypeError(f"cls: expected a Keras layer class, got {cls!r}")
  if issubclass(cls, QuantLayer):
    return cls
  if cls in FLOAT_TO_QUANT:
    return FLOAT_TO_QUANT[cls]
  if cls in _DYNAMIC:
    return _DYNAMIC[cls]
  for base, qcls in FLOAT_TO_QUANT.items():
    if issubclass(cls, base):
      mixins = tuple(m for m in qcls.__mro__[1:]
                     if m in (_DepthwiseAxes, _EmbeddingAxes, _RNNCell, _TransposeAxes))
      after = (GRUStateOperand,) if base is keras.layers.GRUCell else ()
      attrs = {"quant_weights": qcls.quant_weights, "__module__": cls.__module__,
               "__doc__": f"Quantized {cls.__name__} (generated by jaxqat.keras.quantized_class)."}
      if base is keras.layers.EinsumDense:
        attrs["channel_axes"] = QuantEinsumDense.channel_axes
      if base is keras.layers.Embedding:  # its other tables too (an untied output projection)
        attrs.update(quant_weights=_EmbeddingSubclass.quant_weights,
                     channel_axes=_EmbeddingSubclass.channel_axes)
      new = type(f"Quant{cls.__name__}", mixins + (QuantLayer,) + after + (cls,), attrs)
      registered = keras.saving.get_registered_name(cls)
      new = keras.saving.register_keras_serializable(
          package="jaxqat", name=f"Quant<{registered}>")(new)
      _DYNAMIC[cls] = new
      return new
  return None


class _EmbeddingSubclass:
  """What a generated subclass of ``keras.layers.Embedding`` quantizes.

  Its table (``_embeddings``, one scale per row) and every other weight of
  rank >= 2 it owns, such as the ``reverse_embeddings`` of an untied
  ``ReversibleEmbedding`` -- a language model's output projection, read as
  the kernel of ``inputs @ reverse_embeddings`` (one scale per output
  column, the last axis).
  """

  @property
  def quant_weights(self):
    own = (("_embeddings", "embeddings_quantizer"),)
    if not self.built:
      return own
    return own + tuple((a, f"{a.lstrip('_')}_quantizer") for a in gathered_weights(self)
                       if a not in ("_embeddings", "embeddings"))

  def channel_axes(self, attr, shape):
    return (0,) if attr == "_embeddings" else (len(shape) - 1,)


# -- layers whose weights are gathered (position embeddings and the like) ------


class _GatheredAxes:
  quantize_input = False  # the input holds ids or positions, or is only added to

  def channel_axes(self, attr, shape):
    return (0,)


_GATHERED: dict = {}


def gathered_weights(layer) -> tuple[str, ...]:
  """The attributes of ``layer`` holding its own trainable weights of rank >= 2.

  These are the weights a layer *reads by index* when its class is
  embedding-like (see :func:`gathered_class`).

  Args:
    layer: a built Keras layer.

  Returns:
    The attribute names, in attribute order.
  """
  own = {id(v) for v in layer._trainable_variables}
  return tuple(name for name, value in vars(layer).items()
               if isinstance(value, keras.Variable) and id(value) in own
               and len(value.shape) >= 2)


def is_gathered(layer) -> bool:
  """Whether ``layer`` was quantized by :func:`gathered_class` (its sublayers are not its own)."""
  return type(layer) in _GATHERED.values()


def gathered_class(cls: type) -> Optional[type]:
  """A quantized class for an embedding-like layer class jaxqat does not know.

  A layer class whose name contains ``"Embedding"`` and that is not a
  :class:`keras.layers.Embedding` (a position-embedding layer holding a
  ``(sequence, dim)`` table it slices, say) gets a generated class whose
  weights of rank >= 2 are fake-quantized with one scale per row (axis 0)
  whenever the layer's own ``call`` reads them. Its input is not quantized.
  Its sublayers are not its own: a projection it holds (a vision model's
  patch-embedding convolution) is quantized, reported and served as a layer
  of its own.
  The generated class is not registered: layers converted this way are saved
  as their float class and re-quantized on load (see
  :func:`jaxqat.keras.quantize`).

  Args:
    cls: a Keras layer class.

  Returns:
    The generated class, or ``None`` when ``cls`` is not embedding-like.

  Examples:
    >>> import keras
    >>> class PositionEmbedding(keras.layers.Layer):
    ...   pass
    >>> gathered_class(PositionEmbedding).__name__
    'QuantPositionEmbedding'
    >>> gathered_class(keras.layers.LayerNormalization) is None
    True
  """
  if "Embedding" not in cls.__name__ or issubclass(cls, (QuantLayer, keras.layers.Embedding)):
    return None
  if cls not in _GATHERED:
    _GATHERED[cls] = type(f"Quant{cls.__name__}", (_GatheredAxes, QuantLayer, cls), {
        "quant_weights": None, "__module__": cls.__module__,
        "__doc__": f"Quantized {cls.__name__} (weights fake-quantized per row when read)."})
  return _GATHERED[cls]


# -- conversion in place ----------------------------------------------------------


def quantize_in_place(layer, weight_spec, act_spec, observe: Optional[bool] = None,
                      compute: str = "fake"):
  """Turns a built float layer into its quantized class, keeping the object.

  The object stays the same (its parent, the graph node that calls it and
  every attribute that refers to it need no rewiring): its class becomes
  :func:`quantized_class` (or :func:`gathered_class`) of its class, its
  quantizers are built, and its weight ranges are set from the float
  weights. The float weights are untouched. :func:`float_class` gives back
  the class it had.

  Args:
    layer: a built Keras layer with a quantized version.
    weight_spec: the weight QuantSpec (or ``None``).
    act_spec: the input QuantSpec (or ``None``).
    observe: forwarded to the quantizers.
    compute: ``"fake"`` or ``"integer"`` (see :class:`QuantLayer`).

  Returns:
    ``layer``, now quantized.

  Raises:
    TypeError: if the layer's class has no quantized version.
    ValueError: if the layer is not built, or is quantized already.
    ComputeModeError: if the layer cannot run ``compute`` (the layer is left
      as it was).

  Examples:
    >>> import keras, numpy as np
    >>> from jaxqat.core import QuantSpec
    >>> dense = keras.layers.Dense(2)
    >>> _ = dense(np.ones((1, 3), "float32"))
    >>> quantize_in_place(dense, QuantSpec(format="int4"), None) is dense
    True
    >>> type(dense).__name__, float_class(dense).__name__, dense.kernel_quantizer.spec.format.name
    ('QuantDense', 'Dense', 'int4')
  """
  if isinstance(layer, QuantLayer):
    raise ValueError(f"layer {layer.name!r} is quantized already ({type(layer).__name__})")
  if not layer.built:
    raise ValueError(f"layer {layer.name!r} is not built: call it once before quantizing it")
  cls = type(layer)
  qcls = quantized_class(cls) or gathered_class(cls)
  if qcls is None:
    raise TypeError(f"layer {layer.name!r}: {cls.__name__} has no quantized version")
  check_compute(qcls, layer, weight_spec=spec_from_dict(weight_spec), act_spec=spec_from_dict(
      act_spec), compute=compute, where=f"layer {layer.name!r}")
  build_config = layer.get_build_config() or {}
  input_shape = build_config.get("input_shape")
  weights = gathered_weights(layer) if qcls.quant_weights is None else None
  layer.__class__ = qcls
  object.__setattr__(layer, "_jaxqat_float_class", cls)
  if weights is not None:
    object.__setattr__(layer, "quant_weights", tuple((a, f"{a}_quantizer") for a in weights))
  tracker = getattr(layer, "_tracker", None)
  locked = tracker is not None and tracker.locked
  if locked:
    tracker.unlock()
  try:
    layer._init_quant(weight_spec, act_spec, observe, compute)
    if layer.act_spec is not None and input_shape is None:
      raise ValueError(f"layer {layer.name!r}: its input shape is unknown (it was built without "
                       "being called), so its input quantizer cannot be built")
    layer._build_quantizers(input_shape)
  finally:
    if locked:
      tracker.lock()
  # The quantized call takes `training` (to pass it on when the float call does).
  layer._call_signature = inspect.signature(layer.call)
  layer.call_signature_parameters = list(layer._call_signature.parameters)
  layer._call_has_training_arg = True
  if isinstance(getattr(layer, "_call_has_context_arg", None), dict):
    layer._call_has_context_arg["training"] = True
  if hasattr(layer, "_track_variables"):  # torch backend: refresh the module's parameters
    layer._track_variables()
  layer.init_weight_ranges()
  return layer


def float_class(layer) -> type:
  """The class a layer had before :func:`quantize_in_place` (its own class otherwise)."""
  return vars(layer).get("_jaxqat_float_class", type(layer))
