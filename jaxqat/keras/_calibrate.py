"""Calibration of activation ranges, and a callback that freezes ranges in ``fit``."""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from jaxqat.keras import _convert
from jaxqat.keras import _fold
from jaxqat.keras import _layers
from jaxqat.keras._backend import keras

__all__ = ["calibrate", "FreezeQuantizers", "quantizers"]


def quantizers(model) -> list:
  """Every :class:`Quantizer` of a model's quantized layers (inputs first, then weights)."""
  out = []
  for layer in _convert.quant_layers(model):
    if layer.input_quantizer is not None:
      out.append(layer.input_quantizer)
  for layer in _convert.quant_layers(model):
    if isinstance(layer, _fold.QuantConvBatchNorm):
      if layer.kernel_quantizer is not None:
        out.append(layer.kernel_quantizer)
    else:
      out.extend(getattr(layer, "weight_quantizers", {}).values())
  return out


def _batches(data, batch_size):
  if isinstance(data, np.ndarray) or (hasattr(data, "shape") and hasattr(data, "dtype")):
    n = data.shape[0]
    for i in range(0, n, batch_size):
      yield data[i:i + batch_size]
    return
  if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
    raise TypeError("data: expected an array of inputs or an iterable of batches (x or (x, y)), "
                    f"got {type(data).__name__}")
  for item in data:
    if isinstance(item, (tuple, list)) and not isinstance(item, dict):
      item = item[0]
    yield item


def calibrate(model, data, steps: Optional[int] = None, *, batch_size: int = 32,
              verbose: int = 1) -> int:
  """Sets every activation range of a quantized model from data.

  Puts the activation quantizers in calibration mode (they pass their input
  through unchanged and feed it to the core observer of their spec's
  calibration method: absmax, minmax, ema, percentile, mse or entropy), runs
  the model on ``steps`` batches in inference mode with a progress bar, then
  stores the computed step sizes / zero points (LSQ step sizes and LSQ+
  offsets are initialized from them). Weight ranges are re-initialized from
  the current weights.

  Args:
    model: a model returned by :func:`quantize_model`.
    data: an array of inputs (cut into ``batch_size`` batches), or an
      iterable of batches ``x`` or ``(x, y[, sample_weight])`` (a
      ``keras.utils.PyDataset``, a generator, a ``tf.data.Dataset``...).
    steps: the number of batches to use (``None``: all of ``data``).
    batch_size: batch size when ``data`` is an array.
    verbose: 1 shows a ``keras.utils.Progbar``; 0 is silent.

  Returns:
    The number of batches seen.

  Raises:
    TypeError: if ``model`` is not a Keras model or ``data`` is not iterable.
    ValueError: if ``steps`` is not positive, the model has no quantizers, or
      ``data`` yields no batch.

  Examples:
    >>> import keras, numpy as np
    >>> from jaxqat.keras import quantize_model, calibrate
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> q = quantize_model(model)
    >>> calibrate(q, np.linspace(-2, 2, 16, dtype="float32").reshape(4, 4), verbose=0)
    1
    >>> round(float(q.layers[0].input_quantizer.scale.numpy()) * 127, 5)  # absmax 2 -> 2/127
    2.0
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
  if steps is not None and (not isinstance(steps, int) or steps < 1):
    raise ValueError(f"steps: must be a positive int or None, got {steps!r}")
  layers = _convert.quant_layers(model)
  if not layers:
    raise ValueError(f"model: {model.name!r} has no quantized layers; call quantize_model first")
  acts = [l.input_quantizer for l in layers if l.input_quantizer is not None]
  for q in acts:
    q.calibrating = True
    object.__setattr__(q, "_calib_state", None)
  bar = keras.utils.Progbar(steps, unit_name="batch") if verbose else None
  seen = 0
  try:
    for x in _batches(data, batch_size):
      if steps is not None and seen >= steps:
        break
      model(x, training=False)
      seen += 1
      if bar is not None:
        bar.update(seen)
  finally:
    for q in acts:
      q.calibrating = False
  if seen == 0:
    raise ValueError("data: yielded no batch to calibrate on")
  for q in acts:
    q.finish_calibration()
  for layer in layers:
    layer.init_weight_ranges()
  _reset_compiled(model)
  return seen


def _reset_compiled(model):
  for name in ("train_function", "test_function", "predict_function"):
    if getattr(model, name, None) is not None:
      setattr(model, name, None)


class FreezeQuantizers(keras.callbacks.Callback):
  """Freezes quantizer ranges (and BatchNorm statistics) after some epochs of ``fit``.

  After ``freeze_after`` epochs the observing quantizers stop updating
  (activation statistics keep their values; dynamic weight ranges are
  stored), the usual QAT schedule of Jacob et al. 2018 / Krishnamoorthi 2018.
  After ``freeze_bn_after`` epochs, folded Conv+BatchNorm layers switch to the
  moving statistics (no batch-statistics correction). The train function is
  rebuilt so the change takes effect in the next epoch. LSQ step sizes are
  trainable weights and keep training.

  Args:
    freeze_after: epochs after which quantizer ranges freeze (``None``: never).
    freeze_bn_after: epochs after which folded BatchNorms freeze (``None``: never).

  Raises:
    ValueError: if an epoch count is negative.

  Examples:
    >>> cb = FreezeQuantizers(freeze_after=2, freeze_bn_after=3)
    >>> cb.freeze_after, cb.freeze_bn_after
    (2, 3)
  """

  def __init__(self, freeze_after: Optional[int] = 1, freeze_bn_after: Optional[int] = None):
    super().__init__()
    for name, value in (("freeze_after", freeze_after), ("freeze_bn_after", freeze_bn_after)):
      if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"FreezeQuantizers: {name} must be a non-negative int or None, "
                         f"got {value!r}")
    self.freeze_after = freeze_after
    self.freeze_bn_after = freeze_bn_after

  def _apply(self, epochs_done):
    changed = False
    layers = _convert.quant_layers(self.model)
    if self.freeze_after is not None and epochs_done >= self.freeze_after:
      for layer in layers:
        layer.freeze_quantizers()
      changed = True
    if self.freeze_bn_after is not None and epochs_done >= self.freeze_bn_after:
      for layer in layers:
        if isinstance(layer, _fold.QuantConvBatchNorm) and not layer.freeze_bn:
          layer.freeze_bn = True
          changed = True
    if changed:
      self.model.make_train_function(force=True)

  def on_train_begin(self, logs=None):
    if self.freeze_after == 0 or self.freeze_bn_after == 0:
      self._apply(0)

  def on_epoch_end(self, epoch, logs=None):
    done = epoch + 1
    if done in (self.freeze_after, self.freeze_bn_after):
      self._apply(done)
