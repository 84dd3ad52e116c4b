r"""Convolution + BatchNormalization folded for quantization-aware training.

A deployed integer model runs a convolution followed by batch normalization
as *one* convolution with folded weights and bias (Jacob et al. 2018,
sec. 3.2)::

    w_fold = w * gamma / sqrt(moving_var + eps)
    b_fold = beta + gamma * (b - moving_mean) / sqrt(moving_var + eps)

so the weights that get quantized are ``w_fold``, not ``w``.
:class:`QuantConvBatchNorm` trains exactly that with *one* convolution per
step, following the batch-statistics fold of Krishnamoorthi 2018 (sec. 3.2).
During training, with ``sigma = sqrt(moving_var + eps)`` the
moving standard deviation before this step's update:

1. the weights are folded with the *moving* statistics and fake-quantized,
   ``w_q = Q(w * gamma / sigma)`` -- the weights a deployed model uses -- and
   ``y_q = conv(x, w_q)`` is the only convolution;
2. the per-channel fold factor is undone, ``y_raw = y_q * sigma / gamma``,
   an approximation of the raw convolution ``conv(x, w)`` (up to the weight
   quantization error);
3. the batch statistics ``mu_B``, ``sigma_B^2 = var_B + eps`` of ``y_raw``
   update the moving statistics as Keras' BatchNormalization does (moving
   mean of ``y_raw + b``, momentum ``bn.momentum``, biased variance);
4. the output is batch normalization with batch statistics,
   ``gamma * (y_raw - mu_B) / sigma_B + beta``, which equals
   ``y_q * sigma / sigma_B + beta - gamma * mu_B / sigma_B``.

The *folding with correction* variant of Jacob et al. 2018 (appendix,
fig. C.8) gets the batch statistics from an extra float convolution
``conv(x, w)`` instead; undoing the fold on ``y_q`` gives the same
statistics (exactly so without quantization) at the cost of one convolution
instead of two, which is what makes folded QAT about as fast as training
the float model. To keep step 2 invertible, the training fold uses ``gamma``
with its magnitude clamped to at least ``1e-6`` (sign kept, ``0`` counts as
positive); step 4 still multiplies by the true ``gamma``, so the output of a
channel with ``gamma == 0`` is exactly ``beta`` and ``gamma`` keeps a
gradient.

In inference (``training=False``), when the BatchNormalization layer is not
trainable, or after ``freeze_bn=True`` (see
:class:`jaxqat.keras.FreezeQuantizers`), the correction is dropped and the
layer computes ``conv(x, w_q) + b_fold`` with the moving statistics: the
deployed computation. The convolution's bias cancels under batch statistics
and enters ``b_fold``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jaxqat.core._serialize import spec_from_dict
from jaxqat.core._serialize import spec_to_dict
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import ops
from jaxqat.keras._backend import to_numpy
from jaxqat.keras import _layers
from jaxqat.keras._layers import conv_core_op
from jaxqat.keras._layers import quantizer_operand
from jaxqat.keras._layers import quantizer_ranges
from jaxqat.keras._layers import takes_core_op
from jaxqat.keras._quantizer import Quantizer
from jaxqat.keras._quantizer import check_act_spec
from jaxqat.keras._quantizer import run_quantizer

__all__ = ["QuantConvBatchNorm", "can_fold"]

# Smallest |gamma| the training fold uses (sign kept; 0 counts as positive):
# the fold factor gamma / sigma must be invertible to recover the raw
# convolution output. Only channels with |gamma| below it are affected, and
# their output gamma * (...) + beta stays exact.
_GAMMA_MIN = 1e-6

_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
             keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def can_fold(conv, bn) -> Optional[str]:
  """Why ``conv`` followed by ``bn`` cannot be folded (``None`` if it can).

  Examples:
    >>> import keras
    >>> can_fold(keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()) is None
    True
    >>> can_fold(keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.BatchNormalization())
    'the convolution has an activation (relu)'
  """
  if type(conv) not in _FOLDABLE:
    return f"{type(conv).__name__} is not a plain Conv/DepthwiseConv layer"
  if type(bn) is not keras.layers.BatchNormalization:
    return f"{type(bn).__name__} is not a BatchNormalization layer"
  if conv.activation not in (None, keras.activations.linear):
    return f"the convolution has an activation ({conv.activation.__name__})"
  if getattr(conv, "data_format", "channels_last") != "channels_last":
    return "the convolution is channels_first"
  if bn.axis not in (-1, conv.rank + 1):
    return f"BatchNormalization normalizes axis {bn.axis}, not the channel axis"
  if getattr(conv, "lora_enabled", False):
    return "the convolution has LoRA enabled"
  return None


def _as_layer(obj, what):
  if isinstance(obj, dict):
    return keras.saving.deserialize_keras_object(obj)
  if isinstance(obj, keras.layers.Layer):
    return obj.__class__.from_config(obj.get_config())
  raise TypeError(f"QuantConvBatchNorm: {what} must be a Keras layer or its config, got "
                  f"{type(obj).__name__}")


@keras.saving.register_keras_serializable(package="jaxqat")
class QuantConvBatchNorm(keras.layers.Layer):
  """A convolution and its BatchNormalization, folded and quantized (see module doc).

  The float variables keep their names and live in the sublayers ``conv``
  (``kernel``, ``bias``) and ``bn`` (``gamma``, ``beta``, ``moving_mean``,
  ``moving_variance``).

  Args:
    conv: a float Conv1D/2D/3D or DepthwiseConv1D/2D layer (linear
      activation, channels_last), or its serialized config. A fresh copy is
      made from its config (copy the weights with ``set_weights``).
    batchnorm: the BatchNormalization layer (or config) that follows it.
    weight_spec: QuantSpec for the folded kernel, or None.
      ``PerOutputChannel()`` is resolved to the kernel's output-channel axes
      (the last one; the last two for a depthwise kernel) in the
      ``kernel_quantizer``, while the layer's config keeps
      ``PerOutputChannel()``; a literal ``PerChannel(axis)`` is used as given.
    act_spec: QuantSpec for the input activation, or None (not
      ``PerOutputChannel()``).
    observe: forwarded to the quantizers.
    freeze_bn: use the moving statistics in training too (no correction).
    **kwargs: Keras layer arguments; the name defaults to the conv's name.

  Raises:
    ValueError: if the pair cannot be folded (see :func:`can_fold`), or
      ``act_spec`` has granularity ``PerOutputChannel()``.

  Examples:
    >>> import keras, numpy as np
    >>> from jaxqat.core import QuantSpec, PerOutputChannel
    >>> layer = QuantConvBatchNorm(keras.layers.Conv2D(4, 3, name="c"),
    ...                            keras.layers.BatchNormalization(),
    ...                            weight_spec=QuantSpec(granularity=PerOutputChannel()))
    >>> layer(np.ones((2, 6, 6, 3), "float32")).shape
    (2, 4, 4, 4)
    >>> layer.kernel_quantizer.spec.granularity, layer.kernel_quantizer.scale.shape
    (PerChannel(axis=3), (1, 1, 1, 4))
    >>> sorted(v.name for v in layer.bn.weights)
    ['beta', 'gamma', 'moving_mean', 'moving_variance']
  """

  def __init__(self, conv, batchnorm, weight_spec=None, act_spec=None,
               observe: Optional[bool] = None, freeze_bn: bool = False, **kwargs):
    conv = _as_layer(conv, "conv")
    bn = _as_layer(batchnorm, "batchnorm")
    kwargs.setdefault("name", conv.name)
    super().__init__(**kwargs)
    reason = can_fold(conv, bn)
    if reason is not None:
      raise ValueError(f"QuantConvBatchNorm {self.name}: cannot fold: {reason}")
    self.conv = conv
    self.bn = bn
    self.weight_spec = spec_from_dict(weight_spec, where=f"QuantConvBatchNorm {self.name!r} "
                                      "weight_spec")
    self.act_spec = spec_from_dict(act_spec, where=f"QuantConvBatchNorm {self.name!r} act_spec")
    check_act_spec(self.act_spec, f"QuantConvBatchNorm {self.name!r}")
    self.observe = observe
    self.freeze_bn = bool(freeze_bn)
    self.depthwise = isinstance(conv, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D))
    self.input_quantizer = None
    self.kernel_quantizer = None

  def build(self, input_shape):
    if not self.conv.built:  # a deserialized config may come built
      self.conv.build(input_shape)
    out_shape = self.conv.compute_output_shape(input_shape)
    if not self.bn.built:
      self.bn.build(out_shape)
    if self.act_spec is not None:
      self.input_quantizer = Quantizer(self.act_spec, role="act", observe=self.observe,
                                       name="input_quantizer", dtype=self.dtype_policy)
      self.input_quantizer.build(input_shape)
    if self.weight_spec is not None:
      kshape = tuple(self.conv.kernel.shape)
      spec = self.weight_spec.resolve_output_channel(self.channel_axes(kshape))
      self.kernel_quantizer = Quantizer(spec, role="weight", observe=self.observe,
                                        name="kernel_quantizer", dtype=self.dtype_policy)
      self.kernel_quantizer.build(kshape)

  def channel_axes(self, kshape) -> tuple[int, ...]:
    """Output-channel axes of the kernel: the last one, the last two when depthwise.

    These are the axes the batch-norm fold scales (one factor per output
    channel), and what ``PerOutputChannel()`` resolves to.

    Args:
      kshape: the convolution kernel's shape.

    Returns:
      The non-negative axes.
    """
    nd = len(kshape)
    return (nd - 2, nd - 1) if self.depthwise else (nd - 1,)

  # -- folding ---------------------------------------------------------------

  def _conv(self, x, kernel):
    c = self.conv
    if self.depthwise:
      return ops.depthwise_conv(x, kernel, strides=c.strides, padding=c.padding,
                                dilation_rate=c.dilation_rate, data_format=c.data_format)
    return c.convolution_op(x, kernel)

  def _channel_shape(self, kshape):
    if self.depthwise:
      return (1,) * (len(kshape) - 2) + tuple(kshape[-2:])
    return (1,) * (len(kshape) - 1) + (kshape[-1],)

  def _bn_params(self):
    bn = self.bn
    gamma = bn.gamma if bn.scale else ops.ones_like(bn.moving_mean)
    beta = bn.beta if bn.center else ops.zeros_like(bn.moving_mean)
    return (ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta),
            ops.convert_to_tensor(bn.moving_mean), ops.convert_to_tensor(bn.moving_variance))

  def folded_kernel(self, gamma=None, mvar=None):
    """The kernel folded with the moving statistics (float, before fake quant)."""
    if gamma is None:
      gamma, _, _, mvar = self._bn_params()
    kernel = ops.convert_to_tensor(self.conv.kernel)
    factor = ops.divide(gamma, ops.sqrt(ops.add(mvar, self.bn.epsilon)))
    return ops.multiply(kernel, ops.reshape(ops.cast(factor, kernel.dtype),
                                            self._channel_shape(kernel.shape)))

  def folded_bias(self):
    """The bias folded with the moving statistics."""
    gamma, beta, mmean, mvar = self._bn_params()
    b = ops.convert_to_tensor(self.conv.bias) if self.conv.use_bias else ops.zeros_like(mmean)
    inv = ops.divide(gamma, ops.sqrt(ops.add(mvar, self.bn.epsilon)))
    return ops.add(beta, ops.multiply(ops.subtract(b, mmean), inv))

  def init_weight_ranges(self):
    """Sets the kernel quantizer's range from the folded float kernel.

    The fold is computed eagerly in NumPy (float32; no compilation per
    kernel shape), as :meth:`folded_kernel` does in ``keras.ops``.
    """
    if self.kernel_quantizer is None:
      return
    bn = self.bn
    f32 = lambda v: np.asarray(to_numpy(v), np.float32)
    kernel = f32(self.conv.kernel)
    var = f32(bn.moving_variance)
    gamma = f32(bn.gamma) if bn.scale else np.ones_like(var)
    factor = gamma / np.sqrt(var + np.float32(bn.epsilon))
    self.kernel_quantizer.calibrate_from([kernel * factor.reshape(
        self._channel_shape(kernel.shape))])

  def _quantized_conv(self, x, kernel, training):
    """``conv(Q(x), Q(kernel))``: on JAX through ``jaxqat.core.qat_op`` (its lean backward)."""
    iq, kq = self.input_quantizer, self.kernel_quantizer
    if takes_core_op(iq, kq):
      x, kernel = quantizer_operand(iq, x), quantizer_operand(kq, kernel)
      return conv_core_op("fake", self.conv, x, kernel, quantizer_ranges(iq, x, training),
                          quantizer_ranges(kq, kernel, training, tracked=True),
                          depthwise=self.depthwise)
    if iq is not None:
      x = run_quantizer(iq, x, training=training)
    if kq is not None:
      kernel = run_quantizer(kq, kernel, training=training)
    return self._conv(x, kernel)

  def call(self, inputs, training=None):
    x = ops.convert_to_tensor(inputs)
    bn = self.bn
    use_batch = bool(training) and bn.trainable and not self.freeze_bn
    gamma, beta, mmean, mvar = self._bn_params()
    if not use_batch:  # the deployed computation
      y = self._quantized_conv(x, self.folded_kernel(gamma, mvar), training)
      return ops.add(y, ops.cast(self.folded_bias(), y.dtype))
    # Training with batch statistics, one convolution (module doc, steps 1-4).
    # The fold uses gamma with its magnitude clamped away from zero (see
    # _GAMMA_MIN) so that the fold factor can be undone; the statistics are
    # those before this step's update.
    eps = bn.epsilon
    sigma = ops.sqrt(ops.add(mvar, eps))
    gamma_c = ops.where(ops.less(gamma, 0.0), ops.minimum(gamma, -_GAMMA_MIN),
                        ops.maximum(gamma, _GAMMA_MIN))
    kernel = ops.convert_to_tensor(self.conv.kernel)
    w_f = ops.multiply(kernel, ops.reshape(ops.cast(ops.divide(gamma_c, sigma), kernel.dtype),
                                           self._channel_shape(kernel.shape)))
    y_q = self._quantized_conv(x, w_f, training)
    # y_raw = y_q * r approximates conv(x, w); its moments are those of y_q
    # scaled by r (exact algebra, so y_raw is never materialized).
    r = ops.divide(sigma, gamma_c)
    axes = tuple(range(len(y_q.shape) - 1))
    mean_q, var_q = ops.moments(ops.cast(y_q, "float32"), axes=axes)
    # Keras computes the variance as E[y^2] - E[y]^2: a constant channel (common after
    # fake-quantized inputs) can come out slightly negative, and r^2 (up to 1/_GAMMA_MIN^2)
    # turns that into a negative var_b + eps and a NaN output (seen on torch).
    var_q = ops.maximum(var_q, 0.0)
    mean_b = ops.multiply(mean_q, r)
    var_b = ops.multiply(var_q, ops.square(r))
    b = ops.convert_to_tensor(self.conv.bias) if self.conv.use_bias else ops.zeros_like(mmean)
    m = bn.momentum
    bn.moving_mean.assign(ops.stop_gradient(
        ops.add(ops.multiply(mmean, m), ops.multiply(ops.add(mean_b, b), 1.0 - m))))
    bn.moving_variance.assign(ops.stop_gradient(
        ops.add(ops.multiply(mvar, m), ops.multiply(var_b, 1.0 - m))))
    # gamma * (y_raw - mu_B) / sigma_B + beta, as one per-channel affine map of y_q.
    inv_b = ops.divide(gamma, ops.sqrt(ops.add(var_b, eps)))
    scale = ops.cast(ops.multiply(inv_b, r), y_q.dtype)
    shift = ops.cast(ops.subtract(beta, ops.multiply(inv_b, mean_b)), y_q.dtype)
    return ops.add(ops.multiply(y_q, scale), shift)

  def compute_output_shape(self, input_shape):
    return self.conv.compute_output_shape(input_shape)

  def act_quantizers(self) -> list:
    """``[("input", input_quantizer)]`` (as :meth:`jaxqat.keras.QuantLayer.act_quantizers`)."""
    return [("input", self.input_quantizer)]

  def freeze_quantizers(self):
    """Stops range observation in the quantizers (the folded kernel's range is kept)."""
    self.observe = False
    if self.input_quantizer is not None:
      self.input_quantizer.freeze()
    if self.kernel_quantizer is not None:
      self.kernel_quantizer.freeze(self.folded_kernel())

  def get_config(self):
    config = super().get_config()
    config.update({
        "conv": keras.saving.serialize_keras_object(self.conv),
        "batchnorm": keras.saving.serialize_keras_object(self.bn),
        "weight_spec": spec_to_dict(self.weight_spec),
        "act_spec": spec_to_dict(self.act_spec),
        "observe": self.observe,
        "freeze_bn": self.freeze_bn,
    })
    return config



QUANT = (_layers.QuantLayer, QuantConvBatchNorm)


def quant_leaf(layer) -> bool:
  """Whether a walk over a model stops at ``layer`` (``stop=`` of ``_graph.walk``).

  At a quantized layer, whose sublayers are its own -- except an
  embedding-like layer quantized by :func:`~jaxqat.keras._layers.gathered_class`,
  whose sublayers (a vision model's patch projection) are quantized, listed
  and served on their own.
  """
  return isinstance(layer, QUANT) and not _layers.is_gathered(layer)
