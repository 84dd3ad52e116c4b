"""The quantizer layer: one tensor's fake quant plus its range state.

A :class:`Quantizer` is a small Keras layer that a quantized layer owns, one
per quantized tensor (``input_quantizer`` for the input activation,
``kernel_quantizer`` for the weight). Its state lives in ``add_weight``
variables, saved with the model, under the names of the front-end contract
(``docs/contract.md``):

* ``scale`` -- fixed step size ``s`` (``learning="fixed"``; non-trainable);
* ``zero_point`` -- integer zero point ``z`` (fixed affine integer specs;
  non-trainable);
* ``log_scale`` -- learned step size stored as ``θ = log s``
  (``learning="lsq"``/``"lsq_plus"``; trainable): the forward pass uses
  ``s = jaxqat.core.param_to_step_size(θ)``, so no optimizer can make it
  zero or negative;
* ``offset`` -- learned LSQ+ offset ``β`` (``x ≈ s·q + β``; affine
  ``lsq_plus`` specs; trainable);
* ``range_min`` / ``range_max`` / ``observed`` -- observer statistics of an
  activation quantizer created with ``observe=True`` (non-trainable).

Python-level state, saved in the ``.keras`` file with the variables:
``calibrated`` (a range was set), ``frozen`` (weights: the stored range is
used instead of tracking the weight), ``mode`` (``"quant"`` or ``"float"``)
and ``float_reason`` (why an activation quantizer stays float, e.g. it saw no
finite value during calibration).

Range sources:

* fixed-range weights recompute their range from the current weight at every
  call (:func:`jaxqat.core.weight_range` on the JAX backend; the same
  formula in ``keras.ops`` elsewhere), with no gradient through the range,
  until :meth:`Quantizer.freeze` stores it; :meth:`Quantizer.unfreeze`
  resumes tracking;
* activations are calibrated (:func:`jaxqat.keras.calibrate`), then fixed.
  ``observe=True`` (absmax, minmax or ema) keeps updating running statistics
  in every training call; non-finite values are ignored, as by the core
  observers. Such a quantizer, uncalibrated, starts from its first training
  batch (documented first-batch initialisation);
* LSQ / LSQ+ step sizes and offsets are learned by ``fit``, initialised from
  the calibrated range (activations) or the weight (weights).

Running a quantizer that needs a range before it has one (an activation
quantizer before :func:`jaxqat.keras.calibrate`) raises a ``ValueError``
naming the layer, at trace time; it never uses a silent step size of 1.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

from jaxqat.core import _spec as spec_lib
from jaxqat.core._report import QuantizationWarning
from jaxqat.core._serialize import spec_from_dict
from jaxqat.core._serialize import spec_to_dict
from jaxqat.core._step_size import STEP_SIZE_MAX
from jaxqat.core._step_size import STEP_SIZE_MIN
from jaxqat.keras import _ops
from jaxqat.keras._backend import backend_name
from jaxqat.keras._backend import is_jax
from jaxqat.keras._backend import keras
from jaxqat.keras._backend import ops
from jaxqat.keras._backend import restore_purged_state
from jaxqat.keras._backend import to_numpy

__all__ = ["Quantizer", "check_act_spec", "run_quantizer", "MODES"]

_OBSERVABLE = ("absmax", "minmax", "ema")
MODES = ("quant", "float")

_LOG_MIN = math.log(STEP_SIZE_MIN)
_LOG_MAX = math.log(STEP_SIZE_MAX)


def _in_symbolic_scope() -> bool:
  """Whether Keras is only inferring shapes (building a Functional graph)."""
  from keras.src.backend.common import global_state  # no public accessor in Keras 3
  return global_state.get_global_attribute("symbolic_scope") is not None


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
  qmin)`` (``hi/n - lo/n`` where the width overflows), ``z = clip(round(qmin -
  lo / s), qmin, qmax)``. An empty or zero range gives ``s = 1`` and ``z =
  clip(0, qmin, qmax)`` (the core's fallback).
  """
  if spec.symmetric:
    return _ops_symmetric_scale(spec, ops.maximum(ops.abs(lo), ops.abs(hi))), None
  lo = ops.minimum(lo, 0.0)
  hi = ops.maximum(hi, 0.0)
  n = float(spec.qmax - spec.qmin)
  width = ops.subtract(hi, lo)
  s = ops.where(ops.isfinite(width), ops.divide(width, n),
                ops.subtract(ops.divide(hi, n), ops.divide(lo, n)))
  good = ops.logical_and(ops.isfinite(s), s > 0)
  s = ops.where(good, ops.maximum(s, _ops.SCALE_EPS), ops.ones_like(s))
  z = ops.clip(ops.round(ops.subtract(float(spec.qmin), ops.divide(lo, s))), spec.qmin, spec.qmax)
  z = ops.where(good, z, ops.full_like(z, float(min(max(0, spec.qmin), spec.qmax))))
  return s, z


def _ops_symmetric_scale(spec, amax):
  """``amax / qmax``, or 1 where that is not finite and > 0 (the core's symmetric range)."""
  s = ops.divide(amax, float(spec.qmax))
  good = ops.logical_and(ops.isfinite(s), s > 0)
  return ops.where(good, ops.maximum(s, _ops.SCALE_EPS), ops.ones_like(s))


def _ops_weight_range(spec, w, axes, scale_shape):
  """:func:`jaxqat.core.weight_range` (absmax/minmax/ema of one tensor) in keras.ops.

  One reduction over the finite entries per bound, non-finite values
  replaced by the reduction's identity (``nan_to_num``): symmetric, the
  largest finite ``|w|`` (0 when none); affine, the finite min and max
  (+-inf when none). A single tensor's EMA is its min/max.
  """
  w = ops.cast(ops.stop_gradient(w), "float32")
  inf = float("inf")
  if spec.symmetric:
    amax = ops.max(ops.nan_to_num(ops.abs(w), nan=0.0, posinf=0.0), axis=axes, keepdims=True)
    return ops.reshape(_ops_symmetric_scale(spec, amax), scale_shape), None
  lo = ops.min(ops.nan_to_num(w, nan=inf, posinf=inf, neginf=inf), axis=axes, keepdims=True)
  hi = ops.max(ops.nan_to_num(w, nan=-inf, posinf=-inf, neginf=-inf), axis=axes, keepdims=True)
  s, z = _ops_range(spec, lo, hi)
  return ops.reshape(s, scale_shape), ops.reshape(z, scale_shape)


def _torch_weight_range(spec, w, axes, scale_shape):
  """:func:`_ops_weight_range` in torch ops (the same float operations, no Keras dispatch).

  Eager torch pays Keras' argument conversion on each of the ~15 small ops
  of a range; a weight's range is recomputed at every training step.
  """
  import torch  # pylint: disable=import-outside-toplevel
  w = w.detach().float()
  inf = float("inf")
  reduce = lambda t, f: f(t, dim=axes, keepdim=True) if axes else t  # noqa: E731
  if spec.symmetric:
    amax = reduce(w.abs().nan_to_num_(nan=0.0, posinf=0.0), torch.amax)
    s = amax / float(spec.qmax)
    good = torch.isfinite(s).logical_and_(s > 0)
    return torch.where(good, s.clamp_min(_ops.SCALE_EPS), 1.0).reshape(scale_shape), None
  lo = reduce(w.nan_to_num(nan=inf, posinf=inf, neginf=inf), torch.amin).clamp_max_(0.0)
  hi = reduce(w.nan_to_num(nan=-inf, posinf=-inf, neginf=-inf), torch.amax).clamp_min_(0.0)
  n = float(spec.qmax - spec.qmin)
  width = hi - lo
  s = torch.where(torch.isfinite(width), width / n, hi / n - lo / n)
  good = torch.isfinite(s).logical_and_(s > 0)
  s = torch.where(good, s.clamp_min(_ops.SCALE_EPS), 1.0)
  z = torch.round(float(spec.qmin) - lo / s).clamp_(spec.qmin, spec.qmax)
  z = torch.where(good, z, float(min(max(0, spec.qmin), spec.qmax)))
  return s.reshape(scale_shape), z.reshape(scale_shape)


def _reduce_axes(shape, scale_shape):
  """Axes of a tensor of ``shape`` reduced to one value per scale (keepdims layout)."""
  full = (1,) * (len(shape) - len(scale_shape)) + tuple(scale_shape)
  return tuple(i for i, k in enumerate(full) if k == 1)


def _finite_min_max(x, axes, scale_shape):
  """Per-group min, max and finite count of ``x``, ignoring NaN and +-inf (as the core)."""
  xc = ops.cast(x, "float32")
  fin = ops.isfinite(xc)
  big = float(np.finfo(np.float32).max)
  lo = ops.min(ops.where(fin, xc, big), axis=axes, keepdims=True)
  hi = ops.max(ops.where(fin, xc, -big), axis=axes, keepdims=True)
  cnt = ops.sum(ops.cast(fin, "float32"), axis=axes, keepdims=True)
  return (ops.reshape(lo, scale_shape), ops.reshape(hi, scale_shape),
          ops.reshape(cnt, scale_shape))


def _np_min_max_update(state, x, scale_shape, ema_decay):
  """The core's min/max statistics (:func:`jaxqat.core.observer`), in NumPy.

  Same rules as the core: per group (one per step size) the count, min and
  max of the finite entries; a group without a finite entry keeps its state;
  ``ema`` averages the batch min/max with ``ema_decay``. Used for the
  absmax/minmax/ema methods of integer specs, where it is exact and needs no
  compilation per tensor shape.
  """
  x = np.asarray(x, np.float32)
  axes = _reduce_axes(x.shape, scale_shape)
  fin = np.isfinite(x)
  cnt = np.sum(fin, axis=axes, keepdims=True, dtype=np.float32).reshape(scale_shape)
  mn = np.min(np.where(fin, x, np.inf), axis=axes, keepdims=True).reshape(scale_shape)
  mx = np.max(np.where(fin, x, -np.inf), axis=axes, keepdims=True).reshape(scale_shape)
  if state is None:
    state = {k: np.zeros(scale_shape, np.float32) for k in ("count", "min", "max")}
  seen, has = state["count"] > 0, cnt > 0
  if ema_decay is None:
    new_min = np.where(seen, np.minimum(state["min"], mn), mn)
    new_max = np.where(seen, np.maximum(state["max"], mx), mx)
  else:
    d, e = np.float32(ema_decay), np.float32(1.0 - ema_decay)
    new_min = np.where(seen, d * state["min"] + e * mn, mn)
    new_max = np.where(seen, d * state["max"] + e * mx, mx)
  return {"count": (state["count"] + cnt).astype(np.float32),
          "min": np.where(has, new_min, state["min"]).astype(np.float32),
          "max": np.where(has, new_max, state["max"]).astype(np.float32)}


def _np_range(spec, state):
  """Step size and zero point of a min/max state, as the core computes them (float32, exact)."""
  lo, hi = state["min"].astype(np.float32), state["max"].astype(np.float32)
  seen = state["count"] > 0
  one = np.float32(1.0)
  with np.errstate(all="ignore"):
    if spec.symmetric:
      s = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(spec.qmax)
      good = np.isfinite(s) & (s > 0)
      s = np.where(good, np.maximum(s, np.float32(_ops.SCALE_EPS)), one)
      z = np.zeros_like(s)
    else:
      lo0, hi0 = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
      n = np.float32(spec.qmax - spec.qmin)
      width = hi0 - lo0
      s = np.where(np.isfinite(width), width / n, hi0 / n - lo0 / n)
      good = np.isfinite(s) & (s > 0)
      s = np.where(good, np.maximum(s, np.float32(_ops.SCALE_EPS)), one)
      z = np.clip(np.round(np.float32(spec.qmin) - lo0 / s), spec.qmin, spec.qmax)
      z = np.where(good, z, np.float32(min(max(0, spec.qmin), spec.qmax)))
  fallback = 0.0 if spec.symmetric else float(min(max(0, spec.qmin), spec.qmax))
  return (np.where(seen, s, one).astype(np.float32),
          np.where(seen, z, np.float32(fallback)).astype(np.float32))


@keras.saving.register_keras_serializable(package="jaxqat")
class Quantizer(keras.layers.Layer):
  """Fake-quantizes one tensor (an activation or a weight) with its own range state.

  Use it directly as an activation-quantizer layer (e.g. before a residual
  add), or let :func:`jaxqat.keras.quantize` create one per tensor.

  Args:
    spec: the :class:`~jaxqat.core.QuantSpec` (or its
      :func:`~jaxqat.core.spec_to_dict` dict).
    role: ``"act"`` (the input of a layer; the scale shape ignores the batch
      size) or ``"weight"``.
    observe: activations only: keep updating the range from the data in
      training calls (absmax, minmax or ema with ``learning="fixed"``).
      ``None``/``False``: the range is calibrated, then fixed (the default).
      Ignored for weights, which track the current weight until frozen.
    **kwargs: Keras layer arguments (``name``, ``dtype``...).

  Raises:
    TypeError: if ``spec`` is not a QuantSpec or its dict.
    ValueError: if ``role`` is unknown, ``observe=True`` is asked for a spec
      that cannot observe inside a training step, or ``spec`` has the
      unresolved granularity ``PerOutputChannel()`` (an activation spec can
      never use it; a weight's is resolved by the layer that owns it).

  Examples:
    >>> import numpy as np
    >>> from jaxqat.core import QuantSpec
    >>> q = Quantizer(QuantSpec(format="int4"), name="q")
    >>> q.build((None, 3))
    >>> q.call(np.zeros((1, 3), "float32"))  # q(x) raises the same, wrapped by Keras
    Traceback (most recent call last):
    ...
    ValueError: Quantizer 'q' (act, int4, learning='fixed') has no range yet: call ...
    >>> q.set_range(np.float32(0.5))
    >>> np.asarray(q(np.array([[-1.3, 0.26, 2.0]], "float32"))).tolist()
    [[-1.5, 0.5, 2.0]]
  """

  def __init__(self, spec=None, role: str = "act", observe: Optional[bool] = None, **kwargs):
    super().__init__(**kwargs)
    spec = (spec_from_dict(spec, where=f"Quantizer {self.name!r} spec") if spec is not None
            else spec_lib.QuantSpec())
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
    self.can_observe = (role == "act" and spec.learning == "fixed" and method in _OBSERVABLE
                        and not spec.is_block)
    if role == "weight":
      observe = False  # weights track the current weight until frozen
    if observe and not self.can_observe:
      raise ValueError(
          f"Quantizer {self.name}: observe=True needs an activation quantizer with "
          f"learning='fixed', a non-block format and calibration method in {_OBSERVABLE}; got "
          f"learning={spec.learning!r}, method={method!r}, format={spec.format.name}")
    if spec.rounding != "nearest_even":
      raise ValueError(f"Quantizer {self.name}: rounding={spec.rounding!r} is not supported by the "
                       "Keras front end (needs a per-call PRNG key); use 'nearest_even'")
    self.spec = spec
    self.role = role
    self.observe_requested = bool(observe)
    self.observe = bool(observe)
    self.calibrated = False
    self.frozen = False
    self.mode = "quant"
    self.float_reason: Optional[str] = None
    self.calibrating = False  # set by jaxqat.keras.calibrate (eager only)
    object.__setattr__(self, "_calib_state", None)
    self.supports_masking = True

  # -- state -----------------------------------------------------------------

  @property
  def learned(self) -> bool:
    """Whether the step size is learned (``log_scale``)."""
    return self.spec.learning != "fixed"

  @property
  def has_zero_point(self) -> bool:
    """Whether the quantizer holds an integer zero point (fixed affine integer spec)."""
    return self.spec.is_int and not self.spec.symmetric and not self.learned

  @property
  def has_offset(self) -> bool:
    """Whether the quantizer learns an LSQ+ offset (affine ``lsq_plus`` spec)."""
    return self.spec.is_int and not self.spec.symmetric and self.spec.learning == "lsq_plus"

  @property
  def has_scale(self) -> bool:
    """Whether the quantizer holds a step size (block formats carry their own scales)."""
    return not self.spec.is_block

  @property
  def tracks_unclipped(self) -> bool:
    """Whether it tracks its weight on a grid that weight cannot leave (no STE clip mask).

    A fixed-range weight quantizer that is not frozen recomputes its range
    from the weight each call; with a signed symmetric absmax integer spec
    (:func:`jaxqat.core.unclipped_weight`) no element clips, so its backward
    passes the gradient through unmasked (the same gradient for finite
    weights, without the mask pass).
    """
    from jaxqat.core import unclipped_weight  # pylint: disable=import-outside-toplevel
    return self.role == "weight" and not self.frozen and unclipped_weight(self.spec)

  @property
  def needs_range(self) -> bool:
    """Whether running it needs a calibrated/initialised range."""
    if not self.has_scale:
      return False
    return self.learned or self.role == "act" or self.frozen

  @property
  def where(self) -> str:
    """The quantizer's path in the model, for messages (``"dense/input_quantizer"``)."""
    return getattr(self, "path", None) or self.name

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
    if self.has_scale and self.learned:
      self.log_scale = self.add_weight(name="log_scale", shape=self.scale_shape,
                                       initializer="zeros", trainable=True, dtype="float32")
      self.log_scale.jaxqat_quant_param = True  # routed by jaxqat.keras.qat_optimizer
    elif self.has_scale:
      self.scale = self.add_weight(name="scale", shape=self.scale_shape, initializer="ones",
                                   trainable=False, dtype="float32")
    if self.has_zero_point:
      self.zero_point = self.add_weight(name="zero_point", shape=self.scale_shape,
                                        initializer="zeros", trainable=False, dtype="float32")
    if self.has_offset:
      self.offset = self.add_weight(name="offset", shape=self.scale_shape, initializer="zeros",
                                    trainable=True, dtype="float32")
      self.offset.jaxqat_quant_param = True
    if self.can_observe:
      self.range_min = self.add_weight(name="range_min", shape=self.scale_shape,
                                       initializer="zeros", trainable=False, dtype="float32")
      self.range_max = self.add_weight(name="range_max", shape=self.scale_shape,
                                       initializer="zeros", trainable=False, dtype="float32")
      self.observed = self.add_weight(name="observed", shape=self.scale_shape,
                                      initializer="zeros", trainable=False, dtype="float32")

  # -- Python state saved with the variables ----------------------------------

  def _flags(self) -> np.ndarray:
    reason = 0 if self.float_reason is None else 1
    return np.array([self.calibrated, self.frozen, self.mode == "float", reason,
                     self.observe], np.int32)

  def save_own_variables(self, store):
    super().save_own_variables(store)
    store["jaxqat_flags"] = self._flags()

  def load_own_variables(self, store):
    keys = list(store.keys())
    flags = None
    if "jaxqat_flags" in keys:
      flags = np.asarray(store["jaxqat_flags"])
      keys.remove("jaxqat_flags")
    own = self._trainable_variables + self._non_trainable_variables
    if len(keys) != len(own):
      raise ValueError(f"Quantizer {self.where!r}: the file holds {len(keys)} variables, the "
                       f"quantizer has {len(own)} ({[v.name for v in own]}); was it saved with "
                       "another QuantSpec?")
    for i, v in enumerate(own):
      v.assign(store[str(i)])
    if flags is not None:
      self.calibrated, self.frozen = bool(flags[0]), bool(flags[1])
      self.mode = "float" if flags[2] else "quant"
      self.float_reason = "left float when it was saved" if flags[3] else None
      self.observe = bool(flags[4]) and self.can_observe
    else:  # saved by an earlier jaxqat: a range was set before saving
      self.calibrated = True

  # -- ranges ----------------------------------------------------------------

  def step_size(self):
    """The step size in use (``param_to_step_size(log_scale)`` when learned), a tensor."""
    if not self.has_scale:
      return None
    if self.learned:
      if is_jax():
        from jaxqat.core import param_to_step_size
        return param_to_step_size(_unwrap(self.log_scale))
      if backend_name() == "torch":  # scalar clip bounds: one fast op each way
        return ops.convert_to_tensor(self.log_scale).clamp(_LOG_MIN, _LOG_MAX).exp()
      return ops.exp(ops.clip(ops.convert_to_tensor(self.log_scale), _LOG_MIN, _LOG_MAX))
    return ops.convert_to_tensor(self.scale)

  def set_range(self, scale, zero_point=None):
    """Stores a range: the step size ``scale`` and the integer ``zero_point``.

    Fixed specs store them (``scale``, ``zero_point``). Learned specs
    initialise ``log_scale = log(jaxqat.core.init_step_size(scale))`` and, for LSQ+, the
    offset ``β = -z·s``. The quantizer counts as calibrated afterwards.

    Args:
      scale: the step size, shape ``spec.scale_shape`` (or broadcastable).
      zero_point: the integer zero point, or None (0).

    Raises:
      ValueError: if the quantizer is not built, or ``scale`` is not finite
        and > 0 (the message names the quantizer).
    """
    if not self.built:
      raise ValueError(f"Quantizer {self.where!r}: build the layer before setting its range")
    self.float_reason = None
    if not self.has_scale:
      self.calibrated = True
      return
    s = np.broadcast_to(np.asarray(to_numpy(scale), "float32"), self.scale_shape).copy()
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
      raise ValueError(f"Quantizer {self.where!r}: step size must be finite and > 0, got {s}")
    z = (np.zeros_like(s) if zero_point is None
         else np.broadcast_to(np.asarray(to_numpy(zero_point), "float32"), self.scale_shape))
    if not np.all(np.isfinite(z)):
      raise ValueError(f"Quantizer {self.where!r}: zero point must be finite, got {z}")
    if self.learned:
      from jaxqat.core import init_step_size, step_size_to_param  # pylint: disable=import-outside-toplevel
      s_init = np.asarray(init_step_size(s, self.role))
      self.log_scale.assign(np.asarray(step_size_to_param(s_init)))  # the core's log, as NNX/Linen
      if self.has_offset:
        self.offset.assign((-z * s_init).astype("float32"))
    else:
      self.scale.assign(s)
      if self.has_zero_point:
        self.zero_point.assign(z.astype("float32"))
    if self.can_observe:
      lo, hi = self._range_from_scale(s, z)
      self.range_min.assign(lo)
      self.range_max.assign(hi)
      self.observed.assign(np.ones(self.scale_shape, "float32"))
    self.calibrated = True

  def _range_from_scale(self, s, z):
    spec = self.spec
    if spec.symmetric:
      return (-s * spec.qmax).astype("float32"), (s * spec.qmax).astype("float32")
    return ((spec.qmin - z) * s).astype("float32"), ((spec.qmax - z) * s).astype("float32")

  def calibrate_from(self, arrays):
    """Sets the range with the core observer of ``spec.calibration`` over ``arrays``.

    Args:
      arrays: an iterable of concrete arrays (NumPy or backend tensors).

    Raises:
      ValueError: if ``arrays`` is empty.
    """
    self.start_calibration()
    for a in arrays:
      self._collect(a)
    if self._calib_state is None:
      raise ValueError(f"Quantizer {self.where!r}: no data to calibrate from")
    self.finish_calibration()

  def start_calibration(self):
    """Calibration mode: calls pass their input through and feed the core observer."""
    self.calibrating = True
    object.__setattr__(self, "_calib_state", None)

  @property
  def _numpy_stats(self) -> bool:
    """Whether calibration runs the core's min/max statistics in NumPy (exact, no compile)."""
    return (self.spec.is_int and self.spec.calibration.method in _OBSERVABLE
            and not isinstance(self.spec.granularity, spec_lib.PerBlock))

  def _collect(self, x):
    """Feeds one batch to the core observer (eager)."""
    if self._numpy_stats:
      cal = self.spec.calibration
      state = _np_min_max_update(self._calib_state, to_numpy(x), self.scale_shape,
                                 cal.ema_decay if cal.method == "ema" else None)
      object.__setattr__(self, "_calib_state", state)
      return
    from jaxqat.core import observer
    import jax.numpy as jnp
    xj = jnp.asarray(to_numpy(x), jnp.float32)
    obs = observer(self.spec)
    state = self._calib_state if self._calib_state is not None else obs.init(xj)
    # object.__setattr__: keep Keras from wrapping the state dict in a TrackedDict.
    object.__setattr__(self, "_calib_state", obs.update(dict(state), xj))

  def finish_calibration(self) -> bool:
    """Computes and stores the range collected in calibration mode.

    A quantizer that saw no batch or no finite value gets a
    :class:`~jaxqat.core.QuantizationWarning` naming it and stays float
    (``float_reason`` says why); groups (channels) that saw no finite value
    get the core's fallback step size 1 and a warning.

    Returns:
      Whether a range was set.
    """
    self.calibrating = False
    state = self._calib_state
    object.__setattr__(self, "_calib_state", None)
    if state is None:
      self._leave_float("saw no batch during calibration")
      return False
    count = np.asarray(state["count"])
    if not np.any(count > 0):
      self._leave_float("saw no finite value during calibration")
      return False
    if np.any(count <= 0):
      warnings.warn(f"Quantizer {self.where!r}: {int(np.sum(count <= 0))} of {count.size} "
                    "channels saw no finite value during calibration; they use step size 1",
                    QuantizationWarning, stacklevel=3)
    if self._numpy_stats:
      s, z = _np_range(self.spec, state)
    else:
      from jaxqat.core import observer
      s, z = observer(self.spec).compute(dict(state))
    self.set_range(np.asarray(s), None if self.spec.symmetric else np.asarray(z))
    return True

  def _leave_float(self, why):
    self.float_reason = why
    warnings.warn(f"Quantizer {self.where!r} {why}: it stays float (its input is not quantized)",
                  QuantizationWarning, stacklevel=4)

  def tracked_range(self, w):
    """The range of weight ``w`` by the spec's calibration method, no gradient.

    On the JAX backend :func:`jaxqat.core.weight_range`; on other backends
    the absmax/minmax/ema formula of the core observers in ``keras.ops``
    (non-finite values ignored), and other methods through the core on a
    concrete (eager) weight.

    Args:
      w: the weight (a tensor).

    Returns:
      ``(scale, zero_point)``; ``zero_point`` is None for symmetric specs.
    """
    spec = self.spec
    if is_jax():
      from jaxqat.core import weight_range
      s, z = weight_range(_unwrap(w), spec)
      return s, (None if spec.symmetric else z)
    w = ops.stop_gradient(ops.convert_to_tensor(w))
    if spec.calibration.method in _OBSERVABLE:
      direct = _torch_weight_range if backend_name() == "torch" else _ops_weight_range
      return direct(spec, w, _reduce_axes(tuple(w.shape), self.scale_shape), self.scale_shape)
    from jaxqat.core import weight_range
    import jax.numpy as jnp
    s, z = weight_range(jnp.asarray(to_numpy(w), jnp.float32), spec)
    s = ops.convert_to_tensor(np.asarray(s))
    return s, (None if spec.symmetric else ops.convert_to_tensor(np.asarray(z)))

  def _observe_act(self, x):
    """One training batch into the running statistics (non-finite values ignored)."""
    spec = self.spec
    axes = _reduce_axes(tuple(x.shape), self.scale_shape)
    bmin, bmax, cnt = _finite_min_max(x, axes, self.scale_shape)
    has = cnt > 0
    old_min = ops.convert_to_tensor(self.range_min)
    old_max = ops.convert_to_tensor(self.range_max)
    seen = ops.convert_to_tensor(self.observed) > 0
    if spec.calibration.method == "ema":
      d = float(spec.calibration.ema_decay)
      mn = ops.where(seen, d * old_min + (1.0 - d) * bmin, bmin)
      mx = ops.where(seen, d * old_max + (1.0 - d) * bmax, bmax)
    else:
      mn = ops.where(seen, ops.minimum(old_min, bmin), bmin)
      mx = ops.where(seen, ops.maximum(old_max, bmax), bmax)
    new_min = ops.stop_gradient(ops.where(has, mn, old_min))
    new_max = ops.stop_gradient(ops.where(has, mx, old_max))
    new_seen = ops.where(ops.logical_or(seen, has), ops.ones_like(cnt), ops.zeros_like(cnt))
    s, z = _ops_range(spec, new_min, new_max)
    self.range_min.assign(new_min)
    self.range_max.assign(new_max)
    self.observed.assign(new_seen)
    self.scale.assign(s)
    if z is not None:
      self.zero_point.assign(z)
    return s, z

  # -- forward ---------------------------------------------------------------

  @property
  def active(self) -> bool:
    """Whether a call quantizes its input (not calibrating, not left float)."""
    return not self.calibrating and self.mode != "float" and self.float_reason is None

  def current_range(self, x, training=None):
    """The range that quantizes ``x`` in this call: ``(scale, zero_point, offset)``.

    ``scale`` is the step size in use (learned, tracked from the weight
    ``x``, observed, or calibrated); the others are ``None`` when the spec
    has none. Observing activation quantizers update their statistics here,
    as in a call.

    Args:
      x: the tensor the range is for (the weight, for a tracking weight
        quantizer; an observed activation batch).
      training: the training flag.

    Returns:
      The range, as :func:`jaxqat.core.quant_dequant` and
      :func:`jaxqat.core.qat_op` take it (block formats: ``(None, None,
      None)``).

    Raises:
      ValueError: if the quantizer needs a range and has none (the message
        names it and says to calibrate).
    """
    spec = self.spec
    if spec.is_block:
      return None, None, None
    observing = self.observe and bool(training)
    if (self.needs_range and not self.calibrated and not observing
        and not _in_symbolic_scope()):
      restore_purged_state()
      raise ValueError(
          f"Quantizer {self.where!r} ({self.role}, {spec.format.name}, learning="
          f"{spec.learning!r}) has no range yet: call jaxqat.keras.calibrate(model, data) "
          "before running the model (or set_range on this quantizer)")
    z = None
    offset = None
    if self.learned:
      s = self.step_size()
      offset = self.offset if self.has_offset else None
    elif self.role == "weight" and not self.frozen:
      s, z = self.tracked_range(x)
    elif observing:
      s, z = self._observe_act(x)
    else:
      s = self.scale
      z = self.zero_point if self.has_zero_point else None
    if not is_jax():
      s = ops.convert_to_tensor(s)
      z = None if z is None else ops.convert_to_tensor(z)
      offset = None if offset is None else ops.convert_to_tensor(offset)
    return s, z, offset

  def call(self, x, training=None):
    if self.calibrating:
      self._collect(x)
      return x
    if not self.active:
      return x
    s, z, offset = self.current_range(x, training)
    return _ops.quant_dequant(x, self.spec, s, z, offset=offset,
                              where=f"quantizer {self.where!r}", unclipped=self.tracks_unclipped)

  def compute_output_shape(self, input_shape):
    return input_shape

  def freeze(self, weight=None):
    """Stops range updates: a fixed weight range is stored, observing activations stop.

    Args:
      weight: for a fixed-range weight quantizer, the current weight, whose
        range is stored (:func:`jaxqat.core.weight_range`); ignored otherwise.

    Raises:
      ValueError: if a fixed-range weight quantizer is frozen without its
        weight.
    """
    if self.role == "weight" and self.has_scale and not self.learned and not self.frozen:
      if weight is None:
        raise ValueError(f"Quantizer {self.where!r}: freeze needs the current weight")
      self.calibrate_from([weight])  # = jaxqat.core.weight_range(weight, spec)
      self.frozen = True
    if self.observe and np.all(to_numpy(self.observed) > 0):
      self.calibrated = True  # the range observed in training is the calibrated one
    self.observe = False

  def set_observe(self, observe: bool):
    """Switches running range statistics in training calls on or off (activations only).

    Args:
      observe: whether to observe (see the ``observe`` argument).

    Raises:
      ValueError: if ``observe`` is asked for a quantizer that cannot observe.
    """
    if observe and not self.can_observe:
      raise ValueError(f"Quantizer {self.where!r}: observe=True needs an activation quantizer "
                       f"with learning='fixed', a non-block format and calibration method in "
                       f"{_OBSERVABLE}")
    self.observe_requested = self.observe = bool(observe)

  def unfreeze(self):
    """Resumes weight tracking (and observing, for activations created with ``observe=True``)."""
    self.frozen = False
    self.observe = self.observe_requested

  def get_config(self):
    config = super().get_config()
    config.update({"spec": spec_to_dict(self.spec), "role": self.role,
                   "observe": self.observe_requested})
    return config


def run_quantizer(q: Quantizer, x, training=None):
  """``q(x, training=training)``, the way that costs least on the backend.

  On JAX the step is traced once, so Keras' ``Layer.__call__`` runs as
  usual. Eagerly (torch) that bookkeeping costs a few tenths of a
  millisecond per call, more than the fake quant of a small weight, and the
  quantized layer that owns ``q`` has done it already (argument
  conversion, autocasting, the training flag): the quantizer's ``call`` is
  run directly.

  Args:
    q: a built :class:`Quantizer`.
    x: the tensor to quantize.
    training: the training flag of the calling layer.

  Returns:
    ``q``'s output.
  """
  if is_jax():
    return q(x, training=training)
  return q.call(ops.convert_to_tensor(x), training=training)


def _unwrap(t):
  """A Keras variable's value (JAX backend), or the tensor itself."""
  import jax.numpy as jnp
  return t.value if isinstance(t, keras.Variable) else jnp.asarray(t)
