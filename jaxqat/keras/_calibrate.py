"""The Keras verbs on quantizer state: calibrate, freeze, unfreeze, set_mode, check_finite.

Each takes a model returned by :func:`jaxqat.keras.quantize` and acts on the
:class:`~jaxqat.keras.Quantizer` layers of its quantized layers (nested
models and sublayers included), as the front-end contract
(``docs/contract.md``) says. Changing a quantizer's Python-level state
(mode, frozen) changes what the model traces, so each verb drops the model's
compiled train/test/predict functions; the next ``fit``/``predict`` retraces.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np

from jaxqat.keras import _convert
from jaxqat.keras import _fold
from jaxqat.keras import _layers
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import to_numpy
from jaxqat.keras._quantizer import MODES

__all__ = ["calibrate", "freeze", "unfreeze", "set_mode", "check_finite", "quantizers",
           "CheckFinite", "FreezeQuantizers"]


def _weight_pairs(layer):
  """``(quantizer, current weight)`` for each weight quantizer of a quantized layer."""
  if isinstance(layer, _fold.QuantConvBatchNorm):
    if layer.kernel_quantizer is not None:
      yield layer.kernel_quantizer, layer.folded_kernel
    return
  for attr, q in getattr(layer, "weight_quantizers", {}).items():
    yield q, (lambda layer=layer, attr=attr: getattr(layer, attr))


def _act_quantizers(layers) -> list:
  """The activation quantizers of quantized layers (inputs; a recurrent cell's state too)."""
  out = []
  for layer in layers:
    out.extend(q for _, q in layer.act_quantizers() if q is not None)
  return out


@contextlib.contextmanager
def _unrolled(model):
  """Unrolls the RNN layers that run quantized cells (calibration observes eagerly)."""
  loops = _layers.quantized_loops(model)
  saved = [l.unroll for l in loops]
  try:
    for l in loops:
      l.unroll = True
    yield
  finally:
    for l, u in zip(loops, saved):
      l.unroll = u


def quantizers(model) -> list:
  """Every :class:`Quantizer` of a model's quantized layers (inputs first, then weights).

  Args:
    model: a quantized Keras model.

  Returns:
    The quantizer layers.

  Examples:
    >>> import keras
    >>> import jaxqat.keras as jqk
    >>> q = jqk.quantize(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    >>> [x.role for x in quantizers(q)]
    ['act', 'weight']
  """
  layers = _convert.quant_layers(model)
  out = _act_quantizers(layers)
  for layer in layers:
    out.extend(q for q, _ in _weight_pairs(layer))
  return out


def _quant_layers(model, verb):
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
  layers = _convert.quant_layers(model)
  if not layers:
    raise ValueError(f"model: {model.name!r} has no quantized layers; call "
                     f"jaxqat.keras.quantize before {verb}")
  return layers


def _reset_compiled(model):
  for name in ("train_function", "test_function", "predict_function"):
    if getattr(model, name, None) is not None:
      setattr(model, name, None)


def _batches(data, batch_size, steps):
  """The model inputs of each batch of ``data``, read as ``model.predict`` reads it."""
  from keras.src.trainers import data_adapters  # the adapter model.predict uses
  from keras.src.trainers.data_adapters import data_adapter_utils
  if isinstance(data, (str, bytes)) or data is None:
    raise TypeError(f"data: expected what model.predict accepts (an array, a dict or list of "
                    f"arrays, a PyDataset, a generator...), got {type(data).__name__}")
  if isinstance(data, (list, tuple)) and len(data) == 0:
    raise ValueError("data: empty; calibrate needs at least one batch")
  try:
    adapter = data_adapters.get_data_adapter(x=data, batch_size=batch_size,
                                             steps_per_epoch=steps, shuffle=False)
  except ValueError as e:
    if "at least one batch" in str(e) or "empty" in str(e).lower():
      raise ValueError("data: yielded no batch to calibrate on") from None
    raise TypeError(f"data: expected what model.predict accepts (an array, a dict or list of "
                    f"arrays, a PyDataset, a generator...): {e}") from None
  adapter.on_epoch_begin()
  seen = 0
  for batch in adapter.get_numpy_iterator():
    if steps is not None and seen >= steps:
      break
    x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(batch)
    seen += 1
    yield x
  adapter.on_epoch_end()


def calibrate(model, data, *, steps: Optional[int] = None, batch_size: int = 32,
              verbose: int = 0):
  """Sets every activation range of a quantized model from data.

  Runs the model in float (every quantizer passes its input through) on
  ``steps`` batches while each activation quantizer feeds its input to the
  core observer of its spec (absmax, minmax, ema, percentile, mse or
  entropy; non-finite values are ignored), then stores the ranges: fixed
  specs get ``scale``/``zero_point``, learned ones ``log_scale`` (from
  :func:`jaxqat.core.init_step_size`, which floors a ~0 range)
  and the LSQ+ ``offset = -z·s``. Weight quantizers are initialised from the
  current weights. The model is left quantized, ready for inference or QAT.

  Args:
    model: a model returned by :func:`jaxqat.keras.quantize`.
    data: whatever ``model.predict`` accepts: an array (cut into
      ``batch_size`` batches), a dict of named inputs, a list/tuple of
      arrays for a multi-input model, a ``keras.utils.PyDataset``, a
      generator of ``x`` or ``(x, y[, sample_weight])`` batches.
    steps: the number of batches to use (``None``: all of ``data``).
    batch_size: batch size when ``data`` holds arrays.
    verbose: 1 shows a ``keras.utils.Progbar``.

  Returns:
    ``model``.

  Raises:
    TypeError: if ``model`` is not a Keras model or ``data`` is not
      something ``model.predict`` accepts.
    ValueError: if ``steps`` or ``batch_size`` is not a positive int, the
      model has no quantized layer, or ``data`` yields no batch.
    FloatingPointError: if a quantizer's state or a quantized layer's weight
      is not finite afterwards (the message names the layers).

  Warns:
    QuantizationWarning: for each activation quantizer that saw no finite
      value (named; it stays float).

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> q = jqk.calibrate(jqk.quantize(model), np.linspace(-2, 2, 16, dtype="float32").reshape(4, 4))
    >>> round(float(q.get_layer("d").input_quantizer.scale.numpy()) * 127, 5)  # absmax 2 -> 2/127
    2.0
  """
  layers = _quant_layers(model, "calibrate")
  for name, value in (("steps", steps), ("batch_size", batch_size)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name}: must be a positive int{' or None' if name == 'steps' else ''}, "
                       f"got {value!r}")
  acts = _act_quantizers(layers)
  weights = [q for l in layers for q, _ in _weight_pairs(l)]
  modes = {id(q): q.mode for q in acts + weights}
  for q in acts:
    q.start_calibration()
  for q in weights:
    q.mode = "float"
  bar = keras.utils.Progbar(steps, unit_name="batch") if verbose else None
  seen = 0
  try:
    with _unrolled(model):
      for x in _batches(data, batch_size, steps):
        model(x, training=False)
        seen += 1
        if bar is not None:
          bar.update(seen)
  finally:
    for q in acts:
      q.calibrating = False
    for q in acts + weights:
      q.mode = modes[id(q)]
  if seen == 0:
    for q in acts:
      object.__setattr__(q, "_calib_state", None)
    raise ValueError("data: yielded no batch to calibrate on")
  for q in acts:
    q.finish_calibration()
  for layer in layers:
    layer.init_weight_ranges()
  check_finite(model)
  _reset_compiled(model)
  return model


def freeze(model):
  """Stores the current weight ranges and stops tracking them (and any observing).

  Each fixed-range weight quantizer stores the range of its current weight
  (:func:`jaxqat.core.weight_range`; the folded kernel for a folded
  Conv+BatchNorm) and uses it from then on; activation quantizers created
  with ``observe=True`` stop observing. Learned step sizes keep training.
  Saved with the model.

  Args:
    model: a quantized model.

  Returns:
    ``model``.

  Raises:
    TypeError: if ``model`` is not a Keras model.
    ValueError: if it has no quantized layer.

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> m = jqk.quantize(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")]))
    >>> q = jqk.freeze(m).get_layer("d").kernel_quantizer
    >>> amax = np.abs(m.get_layer("d").kernel.numpy()).max(0)  # per output channel
    >>> q.frozen, bool(np.allclose(q.scale.numpy() * 127, amax))
    (True, True)
  """
  layers = _quant_layers(model, "freeze")
  for q in _act_quantizers(layers):
    q.freeze()
  for layer in layers:
    for q, weight in _weight_pairs(layer):
      q.freeze(weight())
  _reset_compiled(model)
  return model


def unfreeze(model):
  """Resumes weight-range tracking (and observing, where it was asked for).

  Args:
    model: a quantized model.

  Returns:
    ``model``.

  Raises:
    TypeError: if ``model`` is not a Keras model.
    ValueError: if it has no quantized layer.

  Examples:
    >>> import keras
    >>> import jaxqat.keras as jqk
    >>> m = jqk.quantize(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")]))
    >>> jqk.unfreeze(jqk.freeze(m)).get_layer("d").kernel_quantizer.frozen
    False
  """
  _quant_layers(model, "unfreeze")
  for q in quantizers(model):
    q.unfreeze()
  _reset_compiled(model)
  return model


def set_mode(model, mode: str):
  """Runs a quantized model quantized (``"quant"``) or in float (``"float"``), for comparison.

  In ``"float"`` mode every quantizer passes its input through: the model
  computes exactly its float version (folded Conv+BatchNorm layers compute
  the convolution and batch normalization in float). Saved with the model.

  Args:
    model: a quantized model.
    mode: ``"quant"`` or ``"float"``.

  Returns:
    ``model``.

  Raises:
    TypeError: if ``model`` is not a Keras model.
    ValueError: if ``mode`` is not one of those, or the model has no
      quantized layer.

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> q = jqk.set_mode(jqk.quantize(model), "float")
    >>> x = np.array([[0.3, -1.1]], "float32")
    >>> bool(np.allclose(q.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6))
    True
  """
  if mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
  _quant_layers(model, "set_mode")
  for q in quantizers(model):
    q.mode = mode
  _reset_compiled(model)
  return model


def _nonfinite(values) -> int:
  a = np.asarray(values, np.float64)
  return int(a.size - np.count_nonzero(np.isfinite(a)))


def check_finite(model) -> None:
  """Raises, naming each layer, if a quantizer's state or a quantized weight is not finite.

  Args:
    model: a quantized model.

  Raises:
    FloatingPointError: listing each quantized layer with a non-finite
      quantizer variable (``scale``, ``log_scale``, ``offset``...) or float
      weight, and how many values are not finite.

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> m = jqk.quantize(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")]))
    >>> check_finite(m)
    >>> _ = m.get_layer("d").bias.assign(np.array([np.nan], "float32"))
    >>> check_finite(m)
    Traceback (most recent call last):
    ...
    FloatingPointError: non-finite values in quantized layers: ...d/bias (1 of 1)
  """
  bad = []
  for layer in _quant_layers(model, "check_finite"):
    for v in layer.weights:
      n = _nonfinite(to_numpy(v))
      if n:
        bad.append(f"{v.path} ({n} of {math.prod(v.shape)})")
  if bad:
    raise FloatingPointError("non-finite values in quantized layers: " + ", ".join(bad))


def _sync(model):
  """Writes the JAX trainer's state back into the variables (no-op elsewhere)."""
  sync = getattr(model, "jax_state_sync", None)
  if sync is not None:
    sync()


class CheckFinite(keras.callbacks.Callback):
  """Stops ``fit`` with an error naming the layers when training turns non-finite.

  After each batch whose loss is NaN or inf, and after each epoch, checks
  every quantized layer's quantizer state and weights
  (:func:`check_finite`) and raises ``FloatingPointError`` naming the
  offending variables, instead of letting NaN propagate silently (Keras'
  ``TerminateOnNaN`` only stops). A non-finite loss with finite state (bad
  data, an overflow in a float layer) is reported as such.

  Examples:
    >>> cb = CheckFinite()
    >>> isinstance(cb, keras.callbacks.Callback)
    True
  """

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is None or math.isfinite(float(loss)):
      return
    _sync(self.model)
    check_finite(self.model)
    raise FloatingPointError(f"loss is {float(loss)} at batch {batch}, but every quantizer state "
                             "and quantized weight is finite: check the data and float layers")

  def on_epoch_end(self, epoch, logs=None):
    _sync(self.model)
    check_finite(self.model)


class FreezeQuantizers(keras.callbacks.Callback):
  """Calls :func:`freeze` (and freezes folded BatchNorm statistics) after some epochs of ``fit``.

  After ``freeze_after`` epochs, :func:`jaxqat.keras.freeze` stores the
  weight ranges and stops tracking (the usual QAT schedule of Jacob et al.
  2018 / Krishnamoorthi 2018). After ``freeze_bn_after`` epochs, folded
  Conv+BatchNorm layers switch to the moving statistics (no batch-statistics
  correction). The train function is rebuilt so the change takes effect in
  the next epoch. LSQ step sizes are trainable weights and keep training.

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
    _sync(self.model)
    if self.freeze_after is not None and epochs_done >= self.freeze_after:
      freeze(self.model)
    if self.freeze_bn_after is not None and epochs_done >= self.freeze_bn_after:
      for layer in _convert.quant_layers(self.model):
        if isinstance(layer, _fold.QuantConvBatchNorm):
          layer.freeze_bn = True
    self.model.make_train_function(force=True)

  def on_train_begin(self, logs=None):
    if self.freeze_after == 0 or self.freeze_bn_after == 0:
      self._apply(0)

  def on_epoch_end(self, epoch, logs=None):
    done = epoch + 1
    if done in (self.freeze_after, self.freeze_bn_after):
      self._apply(done)
