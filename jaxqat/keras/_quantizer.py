"""The quantizer layer: one tensor's fake quant plus its range state.

A :class:`Quantizer` is a small Keras layer that a quantized layer owns, one
per quantized tensor (``input_quantizer`` for the input activation,
``kernel_quantizer`` for the weight). Its state lives in ``add_weight``
variables, saved with the model:

* ``scale`` -- the step size ``s`` (trainable for LSQ / LSQ+);
* ``zero_point`` -- affine specs only: the integer zero point ``z``
  (non-trainable), or the LSQ+ offset ``β`` (trainable);
* ``initialized`` -- 1 once a range was set (calibration, conversion, or the
  first observed training batch);
* ``range_min`` / ``range_max`` -- observer statistics (non-trainable) of an
  activation quantizer that keeps observing while it trains.

Range sources, by ``spec.learning``:

* ``"fixed"`` weights with ``observe=True`` (absmax/minmax): the range is
  recomputed from the current weight at every call ("last value");
  otherwise the stored ``scale``.
* ``"fixed"`` activations with ``observe=True`` (absmax, minmax, ema): running
  statistics updated in every training call (EMA with ``spec.calibration.
  ema_decay``); inference uses the stored range. ``observe=False``: the range
  from :func:`jaxqat.keras.calibrate` only.
* ``"lsq"`` / ``"lsq_plus"``: learned by ``fit``; initialize them with
  :func:`jaxqat.keras.calibrate` (activations) -- :func:`quantize_model`
  initializes weight step sizes from the float weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from jaxqat.core import _spec as spec_lib
from jaxqat.keras import _ops
from jaxqat.keras._backend import is_jax
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import ops
from jaxqat.keras._backend import to_numpy

__all__ = ["Quantizer", "check_act_spec", "spec_to_config", "spec_from_config"]

_OBSERVABLE = ("absmax", "minmax", "ema")


def spec_to_config(spec: Optional[spec_lib.QuantSpec]) -> Optional[dict]:
  """A QuantSpec as a JSON-compatible dict (``None`` stays ``None``).

  The granularity is stored as ``{"type": "per_tensor"}``,
  ``{"type": "per_channel", "axis": [...]}``, ``{"type": "per_block",
  "size": ..., "axis": ...}`` or ``{"type": "per_output_channel"}`` (kept
  unresolved: the layer resolves it again when it is built).

  Args:
    spec: a :class:`~jaxqat.core.QuantSpec` or ``None``.

  Returns:
    The config dict, or ``None``.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.

  Examples:
    >>> from jaxqat.core import QuantSpec, PerChannel, PerOutputChannel
    >>> spec = QuantSpec(format="int4", granularity=PerChannel(-1))
    >>> spec_from_config(spec_to_config(spec)) == spec
    True
    >>> spec_to_config(QuantSpec(granularity=PerOutputChannel()))["granularity"]
    {'type': 'per_output_channel'}
  """
  if spec is None:
    return None
  if not isinstance(spec, spec_lib.QuantSpec):
    raise TypeError(f"spec: expected a jaxqat QuantSpec, got {type(spec).__name__}")
  g = spec.granularity
  if isinstance(g, spec_lib.PerTensor):
    gran = {"type": "per_tensor"}
  elif isinstance(g, spec_lib.PerChannel):
    gran = {"type": "per_channel", "axis": list(g.axes)}
  elif isinstance(g, spec_lib.PerOutputChannel):
    gran = {"type": "per_output_channel"}
  else:
    gran = {"type": "per_block", "size": g.size, "axis": g.axis}
  return {
      "format": spec.format.name,
      "granularity": gran,
      "symmetric": spec.symmetric,
      "calibration": dataclasses.asdict(spec.calibration),
      "learning": spec.learning,
      "rounding": spec.rounding,
  }


def spec_from_config(config: Any) -> Optional[spec_lib.QuantSpec]:
  """Inverse of :func:`spec_to_config` (a QuantSpec passes through).

  Args:
    config: a dict from :func:`spec_to_config`, a QuantSpec, or ``None``.

  Returns:
    The QuantSpec, or ``None``.

  Raises:
    TypeError: if ``config`` is neither a dict nor a QuantSpec.
    ValueError: if the granularity type is unknown.

  Examples:
    >>> from jaxqat.core import QuantSpec, PerOutputChannel
    >>> spec = QuantSpec(format="int4", granularity=PerOutputChannel())
    >>> spec_from_config(spec_to_config(spec)) == spec
    True
  """
  if config is None or isinstance(config, spec_lib.QuantSpec):
    return config
  if not isinstance(config, dict):
    raise TypeError(f"spec: expected a QuantSpec or its config dict, got {type(config).__name__}")
  g = config["granularity"]
  if g["type"] == "per_tensor":
    gran = spec_lib.PerTensor()
  elif g["type"] == "per_channel":
    axis = g["axis"]
    gran = spec_lib.PerChannel(tuple(axis) if isinstance(axis, (list, tuple)) else axis)
  elif g["type"] == "per_block":
    gran = spec_lib.PerBlock(int(g["size"]), int(g["axis"]))
  elif g["type"] == "per_output_channel":
    gran = spec_lib.PerOutputChannel()
  else:
    raise ValueError(f"spec: unknown granularity type {g['type']!r}; expected one of "
                     "'per_tensor', 'per_channel', 'per_block', 'per_output_channel'")
  return spec_lib.QuantSpec(
      format=config["format"], granularity=gran, symmetric=config["symmetric"],
      calibration=spec_lib.Calibration(**config["calibration"]),
      learning=config["learning"], rounding=config["rounding"])


def check_act_spec(spec: Optional[spec_lib.QuantSpec], where: str, arg: str = "act_spec"):
  """Raises if an activation spec uses the weight-only :class:`~jaxqat.core.PerOutputChannel`.

  Args:
    spec: the activation QuantSpec (or ``None``).
    where: the layer, for the message (``"QuantDense 'dense'"``).
    arg: the argument name, for the message.

  Raises:
    ValueError: if ``spec`` has granularity ``PerOutputChannel()``.

  Examples:
    >>> from jaxqat.core import QuantSpec, PerOutputChannel
    >>> check_act_spec(QuantSpec(granularity=PerOutputChannel()), "QuantDense 'd'")
    Traceback (most recent call last):
    ...
    ValueError: QuantDense 'd': act_spec has granularity PerOutputChannel(), a weight ...
  """
  if spec is not None and spec.is_output_channel:
    raise ValueError(f"{where}: {arg} has granularity PerOutputChannel(), a weight granularity "
                     "(one scale per output channel of a weight); an activation spec takes "
                     "PerTensor() or PerChannel(axis)")


def _ops_range(spec, lo, hi):
  """Step size and zero point from a min/max range, in keras.ops (as the core).

  Symmetric: ``s = max(|lo|, |hi|) / qmax``, ``z = 0``. Affine (Jacob et al.
  2018, sec. 2.1): the range is widened to hold 0, ``s = (hi - lo) / (qmax -
  qmin)``, ``z = clip(round(qmin - lo / s), qmin, qmax)``. An empty or zero
  range gives ``s = 1`` and ``z = clip(0, qmin, qmax)`` (the core's fallback).
  """
  if spec.symmetric:
    amax = ops.maximum(ops.abs(lo), ops.abs(hi))
    s = ops.divide(amax, float(spec.qmax))
    good = ops.logical_and(ops.isfinite(s), s > 0)
    return ops.where(good, ops.maximum(s, _ops.SCALE_EPS), ops.ones_like(s)), None
  lo = ops.minimum(lo, 0.0)
  hi = ops.maximum(hi, 0.0)
  s = ops.divide(ops.subtract(hi, lo), float(spec.qmax - spec.qmin))
  good = ops.logical_and(ops.isfinite(s), s > 0)
  s = ops.where(good, ops.maximum(s, _ops.SCALE_EPS), ops.ones_like(s))
  z = ops.clip(ops.round(ops.subtract(float(spec.qmin), ops.divide(lo, s))), spec.qmin, spec.qmax)
  z = ops.where(good, z, ops.full_like(z, float(min(max(0, spec.qmin), spec.qmax))))
  return s, z


def _reduce_axes(shape, scale_shape):
  """Axes of a tensor of ``shape`` reduced to one value per scale (keepdims layout)."""
  full = (1,) * (len(shape) - len(scale_shape)) + tuple(scale_shape)
  return tuple(i for i, k in enumerate(full) if k == 1)


@keras.saving.register_keras_serializable(package="jaxqat")
class Quantizer(keras.layers.Layer):
  """Fake-quantizes one tensor (an activation or a weight) with its own range state.

  Use it directly as an activation-quantizer layer (e.g. before a residual
  add), or let :func:`jaxqat.keras.quantize_model` create one per tensor.

  Args:
    spec: the :class:`~jaxqat.core.QuantSpec` (or its config dict).
    role: ``"act"`` (the input of a layer; the scale shape ignores the batch
      size) or ``"weight"``.
    observe: update the range from the data during training (see the module
      docstring). ``None``: on for ``learning="fixed"`` with the absmax,
      minmax or ema method, off otherwise.
    **kwargs: Keras layer arguments (``name``, ``dtype``...).

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.
    ValueError: if ``role`` is unknown, ``observe=True`` is asked for a
      method that cannot run inside a training step, or ``spec`` has the
      unresolved granularity ``PerOutputChannel()`` (an activation spec can
      never use it; a weight's is resolved by the layer that owns it).

  Examples:
    >>> import numpy as np
    >>> from jaxqat.core import QuantSpec
    >>> q = Quantizer(QuantSpec(format="int4"), observe=False)
    >>> q.build((None, 3))
    >>> _ = q.scale.assign(np.full((), 0.5, "float32"))
    >>> np.asarray(q(np.array([[-1.3, 0.26, 2.0]], "float32"))).tolist()
    [[-1.5, 0.5, 2.0]]
  """

  def __init__(self, spec=None, role: str = "act", observe: Optional[bool] = None, **kwargs):
    super().__init__(**kwargs)
    spec = spec_from_config(spec) if spec is not None else spec_lib.QuantSpec()
    if role not in ("act", "weight"):
      raise ValueError(f"Quantizer {self.name}: role must be 'act' or 'weight', got {role!r}")
    if role == "act":
      check_act_spec(spec, f"Quantizer {self.name}", "spec")
    elif spec.is_output_channel:
      raise ValueError(
          f"Quantizer {self.name}: spec has granularity PerOutputChannel(), which the quantized "
          "layer that owns the weight resolves to its output-channel axes; give a standalone "
          "weight Quantizer spec.resolve_output_channel(axes) or a PerChannel(axis) spec")
    method = spec.calibration.method
    default_observe = spec.learning == "fixed" and method in _OBSERVABLE and not spec.is_block
    self.can_observe = default_observe
    if observe is None:
      observe = default_observe
    if observe and not default_observe:
      raise ValueError(
          f"Quantizer {self.name}: observe=True needs learning='fixed', a non-block format and "
          f"calibration method in {_OBSERVABLE}; got learning={spec.learning!r}, "
          f"method={method!r}, format={spec.format.name}")
    if spec.rounding != "nearest_even":
      raise ValueError(f"Quantizer {self.name}: rounding={spec.rounding!r} is not supported by the "
                       "Keras front end (needs a per-call PRNG key); use 'nearest_even'")
    self.spec = spec
    self.role = role
    self.observe = bool(observe)
    self.calibrating = False  # set by jaxqat.keras.calibrate (eager only)
    object.__setattr__(self, "_calib_state", None)
    self.supports_masking = True

  # -- state -----------------------------------------------------------------

  @property
  def has_zero_point(self) -> bool:
    return self.spec.is_int and not self.spec.symmetric

  @property
  def has_scale(self) -> bool:
    return not self.spec.is_block

  def _concrete_shape(self, shape):
    return tuple(1 if d is None else int(d) for d in shape)

  def build(self, input_shape):
    spec = self.spec
    shape = self._concrete_shape(input_shape)
    self.tensor_shape = shape
    if not spec.is_block and not is_jax() and not spec.is_int:
      raise NotImplementedError(f"Quantizer {self.name}: format {spec.format.name} runs on the JAX "
                                "backend only; use an integer format on this backend")
    if self.role == "act" and isinstance(spec.granularity, spec_lib.PerChannel):
      if 0 in spec_lib.normalize_axes(spec.granularity.axes, len(shape), f"{self.name}.axis"):
        raise ValueError(f"Quantizer {self.name}: an activation cannot be quantized per channel "
                         "along the batch axis 0")
    if self.role == "act" and isinstance(spec.granularity, spec_lib.PerBlock):
      raise ValueError(f"Quantizer {self.name}: per-block activation ranges are not supported "
                       "(use a block format such as nvfp4, or per-tensor/per-channel)")
    self.scale_shape = spec.scale_shape(shape) if self.has_scale else ()
    learned = spec.learning != "fixed"
    if self.has_scale:
      self.scale = self.add_weight(name="scale", shape=self.scale_shape, initializer="ones",
                                   trainable=learned, dtype="float32")
    if self.has_zero_point:
      self.zero_point = self.add_weight(name="zero_point", shape=self.scale_shape,
                                        initializer="zeros", dtype="float32",
                                        trainable=spec.learning == "lsq_plus")
    self.initialized = self.add_weight(name="initialized", shape=(), initializer="zeros",
                                       trainable=False, dtype="float32")
    if self.role == "act" and self.can_observe:
      self.range_min = self.add_weight(name="range_min", shape=self.scale_shape,
                                       initializer="zeros", trainable=False, dtype="float32")
      self.range_max = self.add_weight(name="range_max", shape=self.scale_shape,
                                       initializer="zeros", trainable=False, dtype="float32")

  # -- ranges ----------------------------------------------------------------

  def set_range(self, scale, zero_point=None):
    """Stores a calibrated range (``zero_point``: the integer zero point).

    For LSQ+ the offset is stored as ``β = -z s``.

    Args:
      scale: the step size, shape ``spec.scale_shape`` (or broadcastable).
      zero_point: the integer zero point, or None (0).
    """
    if not self.built:
      raise ValueError(f"Quantizer {self.name}: build the layer before setting its range")
    if not self.has_scale:
      self.initialized.assign(np.ones((), "float32"))
      return
    s = np.broadcast_to(np.asarray(scale, "float32"), self.scale_shape).copy()
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
      raise ValueError(f"Quantizer {self.name}: calibrated scale must be finite and > 0, got {s}")
    self.scale.assign(s)
    if self.has_zero_point:
      z = np.zeros_like(s) if zero_point is None else np.broadcast_to(
          np.asarray(zero_point, "float32"), self.scale_shape)
      self.zero_point.assign(-z * s if self.spec.learning == "lsq_plus" else z)
    if self.role == "act" and self.can_observe:
      lo, hi = self._range_from_scale(s, None if zero_point is None else np.asarray(zero_point))
      self.range_min.assign(lo)
      self.range_max.assign(hi)
    self.initialized.assign(np.ones((), "float32"))

  def _range_from_scale(self, s, z):
    spec = self.spec
    if spec.symmetric or z is None:
      return (-s * spec.qmax).astype("float32"), (s * spec.qmax).astype("float32")
    z = np.broadcast_to(z, s.shape)
    return ((spec.qmin - z) * s).astype("float32"), ((spec.qmax - z) * s).astype("float32")

  def calibrate_from(self, arrays):
    """Sets the range with the core observer of ``spec.calibration`` over ``arrays``.

    Args:
      arrays: an iterable of concrete arrays (NumPy or backend tensors).
    """
    from jaxqat.core import calibrate as core_calibrate
    import jax.numpy as jnp
    batches = [jnp.asarray(to_numpy(a), jnp.float32) for a in arrays]
    if not batches:
      raise ValueError(f"Quantizer {self.name}: no data to calibrate from")
    s, z = core_calibrate(self.spec, batches)
    self.set_range(np.asarray(s), None if self.spec.symmetric else np.asarray(z))

  def _collect(self, x):
    """Calibration mode: feeds one batch to the core observer (eager)."""
    from jaxqat.core import observer
    import jax.numpy as jnp
    xj = jnp.asarray(to_numpy(x), jnp.float32)
    obs = observer(self.spec)
    state = self._calib_state if self._calib_state is not None else obs.init(xj)
    # object.__setattr__: keep Keras from wrapping the state dict in a TrackedDict.
    object.__setattr__(self, "_calib_state", obs.update(dict(state), xj))

  def finish_calibration(self) -> bool:
    """Computes and stores the range collected in calibration mode.

    Returns:
      Whether any batch was seen.
    """
    self.calibrating = False
    if self._calib_state is None:
      return False
    from jaxqat.core import observer
    s, z = observer(self.spec).compute(dict(self._calib_state))
    object.__setattr__(self, "_calib_state", None)
    self.set_range(np.asarray(s), None if self.spec.symmetric else np.asarray(z))
    return True

  def _dynamic_weight_range(self, x):
    """absmax/minmax range of the current weight, in keras.ops (cheap inside a train step).

    Same formula as the core observers (:func:`_ops_range`); the step size can differ from
    the core's by one ulp (the core divides exactly, XLA may multiply by a reciprocal).
    """
    axes = _reduce_axes(tuple(x.shape), self.scale_shape)
    xc = ops.cast(ops.convert_to_tensor(x), "float32")
    lo = ops.reshape(ops.min(xc, axis=axes, keepdims=True), self.scale_shape)
    hi = ops.reshape(ops.max(xc, axis=axes, keepdims=True), self.scale_shape)
    return _ops_range(self.spec, lo, hi)

  def _observe_act(self, x):
    spec = self.spec
    xc = ops.cast(x, "float32")
    axes = _reduce_axes(tuple(x.shape), self.scale_shape)
    bmin = ops.reshape(ops.min(xc, axis=axes, keepdims=True), self.scale_shape)
    bmax = ops.reshape(ops.max(xc, axis=axes, keepdims=True), self.scale_shape)
    init = self.initialized
    method = spec.calibration.method
    if method == "ema":
      d = float(spec.calibration.ema_decay)
      new_min = ops.where(init > 0, d * self.range_min + (1.0 - d) * bmin, bmin)
      new_max = ops.where(init > 0, d * self.range_max + (1.0 - d) * bmax, bmax)
    else:
      new_min = ops.where(init > 0, ops.minimum(self.range_min, bmin), bmin)
      new_max = ops.where(init > 0, ops.maximum(self.range_max, bmax), bmax)
    new_min = ops.stop_gradient(new_min)
    new_max = ops.stop_gradient(new_max)
    s, z = _ops_range(spec, new_min, new_max)
    self.range_min.assign(new_min)
    self.range_max.assign(new_max)
    self.scale.assign(s)
    if z is not None:
      self.zero_point.assign(z)
    self.initialized.assign(ops.ones((), "float32"))
    return s, z

  # -- forward ---------------------------------------------------------------

  def call(self, x, training=None):
    if self.calibrating:
      self._collect(x)
      return x
    spec = self.spec
    where = f"layer {self.name!r}"
    if spec.is_block:
      return _ops.quant_dequant(x, spec, None, None, where=where)
    z = self.zero_point if self.has_zero_point else None
    s = self.scale
    if spec.learning == "fixed" and self.observe:
      if self.role == "weight":
        s, z = self._dynamic_weight_range(x)
      elif training:
        s, z = self._observe_act(x)
    if not is_jax():
      s = ops.convert_to_tensor(s)
      z = None if z is None else ops.convert_to_tensor(z)
    if spec.learning == "lsq" and z is not None:
      z = None
    return _ops.quant_dequant(x, spec, s, z, where=where)

  def compute_output_shape(self, input_shape):
    return input_shape

  def freeze(self, weight=None):
    """Stops observing; the range in use becomes the stored one.

    Args:
      weight: for a weight quantizer, the current weight (its range is
        stored); ignored for activations, which keep their statistics.
    """
    if not self.observe:
      return
    if self.role == "weight" and self.built and self.has_scale and weight is not None:
      s, z = self._dynamic_weight_range(ops.convert_to_tensor(weight))
      self.set_range(to_numpy(s), None if z is None else to_numpy(z))
    self.observe = False

  def unfreeze(self):
    """Resumes observing (only for quantizers that can observe)."""
    self.observe = self.can_observe

  def get_config(self):
    config = super().get_config()
    config.update({"spec": spec_to_config(self.spec), "role": self.role, "observe": self.observe})
    return config
