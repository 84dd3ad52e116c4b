"""The NNX quantizer: the state and the fake-quant call for one tensor.

A :class:`Quantizer` fake-quantizes either a layer's *weight* or its *input
activation* with the numerics of :mod:`jaxqat.core`
(:func:`jaxqat.core.quant_dequant`). Its state is typed (see
:mod:`jaxqat.flax.nnx._variables`):

==================  ============================  ==========================
spec.learning       ``scale``                     ``zero_point`` / ``offset``
==================  ============================  ==========================
``"fixed"``         :class:`QuantStat`            ``zero_point``: QuantStat
                                                  (affine integer specs only)
``"lsq"``           :class:`QuantParam` (step)    --
``"lsq_plus"``      :class:`QuantParam` (step)    ``offset`` β: QuantParam
block formats       --                            --
==================  ============================  ==========================

Activation quantizers also hold the observer statistics
(``stats``, an ``nnx.Dict`` of :class:`QuantStat`, one per entry of the
:func:`jaxqat.core.observer` state).

**Mode.** ``Quantizer.mode`` is a *static Python attribute* (part of the
NNX graph definition), one of:

* ``"calibrate"`` (the state right after conversion): activation quantizers
  run the observer ``update`` on their input; every quantizer returns its
  input unchanged, so the model computes in float while it is calibrated.
* ``"quant"``: fake quantization with the stored (or learned) range.
* ``"float"``: pass-through, no statistics (for float baselines/debugging).

Because the mode is static, changing it (:func:`set_mode`, :func:`freeze`)
changes the graph definition: an ``nnx.jit`` function traces once per mode
(no retracing within a mode), and a ``jax.jit`` function over
``nnx.split`` state must be given the new ``graphdef`` (split again after a
mode change). Change modes outside of jitted code.

**Stacked layers.** Layers created with ``nnx.vmap`` (and applied with
``nnx.scan``) carry ``stack_shape`` leading axes on every parameter; the
quantizer state gets the same leading axes (one range per layer), so
``nnx.scan``/``nnx.vmap`` slice it together with the weights.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqat import core
from jaxqat.flax.nnx._variables import QuantParam
from jaxqat.flax.nnx._variables import QuantStat

__all__ = ["Quantizer", "MODES", "WEIGHT", "ACT"]

MODES = ("float", "calibrate", "quant")
WEIGHT = "weight"
ACT = "act"


def _vmap_n(fn, n: int):
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


class Quantizer(nnx.Module):
  """Fake-quantizes one tensor (a weight or an input activation).

  Args:
    spec: the :class:`jaxqat.core.QuantSpec`.
    role: ``"weight"`` or ``"act"``.
    shape: the (unstacked) shape of the weight; for activations the shape of
      an example input without batch axes that fixes the channel count, e.g.
      ``(1, features)`` (only the last axis matters).
    stack_shape: leading axes of stacked (``nnx.vmap``-created) layers.
    path: the layer path, used in error messages.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.
    ValueError: if the spec does not fit ``shape`` (a per-channel axis out of
      range, a block size that does not divide its axis, a per-channel
      activation axis other than the last one) or has an unresolved
      :class:`jaxqat.core.PerOutputChannel` granularity (weights: the layer
      resolves it first; activations: not allowed), naming ``path``.
    NotImplementedError: for stochastic rounding (needs a PRNG stream).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> q = Quantizer(QuantSpec(format="int4"), role="act", shape=(1, 3))
    >>> q.mode
    'calibrate'
    >>> _ = q(jnp.array([[-1.0, 0.5, 0.7]]))  # observed, returned unchanged
    >>> q.freeze()
    >>> float(q.scale[...]), q.mode  # absmax 1.0 / qmax 7
    (0.14285714924335480, 'quant')
    >>> q(jnp.array([0.3]))
    Array([0.2857143], dtype=float32)
  """

  def __init__(
      self,
      spec: core.QuantSpec,
      *,
      role: str,
      shape: Sequence[int],
      stack_shape: Sequence[int] = (),
      path: str = "",
  ):
    if not isinstance(spec, core.QuantSpec):
      raise TypeError(f"{path or 'Quantizer'}: spec must be a jaxqat QuantSpec, got "
                      f"{type(spec).__name__}")
    if role not in (WEIGHT, ACT):
      raise ValueError(f"Quantizer.role: must be 'weight' or 'act', got {role!r}")
    where = f"layer '{path}'" if path else "Quantizer"
    shape = tuple(int(d) for d in shape)
    stack_shape = tuple(int(d) for d in stack_shape)
    if spec.rounding == "stochastic":
      raise NotImplementedError(f"{where}: rounding='stochastic' is not supported by the NNX "
                                "front end yet (it needs a PRNG stream); use 'nearest_even'")
    if spec.is_output_channel:
      if role == ACT:
        raise ValueError(f"{where}: the activation spec has granularity PerOutputChannel(), "
                         "which is for weights only; quantize input activations per tensor "
                         "(PerTensor()), per channel on the last axis (PerChannel(-1)) or per "
                         "block")
      raise ValueError(f"{where}: the weight spec's PerOutputChannel() granularity is not "
                       "resolved; the layer resolves it to its output axes "
                       "(spec.resolve_output_channel(axes)) before creating the Quantizer")
    if role == ACT and isinstance(spec.granularity, core.PerChannel) and (
        len(spec.granularity.axes) != 1 or spec.granularity.axes[0] not in (-1, len(shape) - 1)):
      raise ValueError(f"{where}: activation spec {spec.granularity} is not supported; input "
                       "activations are quantized per tensor or per channel on the last axis "
                       "(PerChannel(-1))")
    try:
      base = spec.scale_shape(shape)
    except ValueError as e:
      raise ValueError(f"{where}: the {role} spec does not fit the {role} of shape {shape}: "
                       f"{e}") from None
    self.spec = spec
    self.role = role
    self.shape = shape
    self.stack_shape = stack_shape
    self.path = path
    self.mode = "calibrate"
    self.frozen = False
    full = stack_shape + base
    self.scale = nnx.data(None)
    self.zero_point = nnx.data(None)
    self.offset = nnx.data(None)
    self.stats = nnx.data(None)
    if spec.is_block:
      return
    if spec.learning == "fixed":
      self.scale = QuantStat(jnp.ones(full, jnp.float32))
      if spec.is_int and not spec.symmetric:
        self.zero_point = QuantStat(jnp.zeros(full, jnp.float32))
    else:
      self.scale = QuantParam(jnp.ones(full, jnp.float32))
      if spec.learning == "lsq_plus":
        self.offset = QuantParam(jnp.zeros(full, jnp.float32))
    if role == ACT:
      init = core.observer(spec).init(jnp.zeros(shape, jnp.float32))
      self.stats = nnx.Dict({
          k: QuantStat(jnp.broadcast_to(jnp.asarray(v), stack_shape + jnp.shape(v)))
          for k, v in init.items()})

  # ------------------------------------------------------------------ call

  def _where(self) -> str:
    return f"layer '{self.path}'" if self.path else "Quantizer"

  def _fit(self, value, x_shape, name):
    want = self.spec.scale_shape(x_shape)
    if value.shape == want:
      return value
    if value.size == math.prod(want):
      return value.reshape(want)
    raise ValueError(
        f"{self._where()}: the {self.role} quantizer's {name} has shape {value.shape}, which "
        f"does not fit an input of shape {tuple(x_shape)} (expected {want}). A layer created "
        "with nnx.vmap must be called inside nnx.scan/nnx.vmap.")

  def qparams(self, x_shape):
    """The ``(scale, zero_point_or_offset)`` passed to ``quant_dequant`` for ``x_shape``."""
    if self.spec.is_block:
      return None, None
    scale = self._fit(self.scale[...], x_shape, "scale")
    if self.spec.learning == "lsq_plus":
      return scale, self._fit(self.offset[...], x_shape, "offset")
    if self.zero_point is not None:
      return scale, self._fit(self.zero_point[...], x_shape, "zero_point")
    return scale, None

  def _observe(self, x):
    if self.stats is None:
      return
    obs = core.observer(self.spec)
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    x = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    state = {k: v[...] for k, v in self.stats.items()}
    new = obs.update(state, x)
    for k, v in new.items():
      self.stats[k][...] = v

  def __call__(self, x: jax.Array) -> jax.Array:
    """Fake-quantizes ``x`` (``"quant"``), observes it (``"calibrate"``) or not.

    Args:
      x: the weight or activation (floating point).

    Returns:
      An array of ``x``'s shape and dtype.
    """
    if self.mode == "float":
      return x
    if self.mode == "calibrate":
      if self.role == ACT:
        self._observe(x)
      return x
    scale, zp = self.qparams(x.shape)
    if self.spec.learning == "lsq_plus":
      return core.quant_dequant(x, self.spec, scale, offset=zp)
    return core.quant_dequant(x, self.spec, scale, zp)

  # ---------------------------------------------------------------- freeze

  def freeze(self, weight: Optional[jax.Array] = None, *, unseen: str = "raise") -> None:
    """Computes the range and switches to ``"quant"`` mode.

    Activation quantizers compute ``(scale, zero_point)`` from their observer
    statistics; weight quantizers calibrate directly on ``weight`` (no data
    needed). ``learning="lsq"`` initializes the step size with the scale;
    ``"lsq_plus"`` also sets the offset ``β = -z·s`` (Bhalgat et al. 2020).
    A quantizer that is already frozen is left unchanged.

    Args:
      weight: the (stacked) weight, for weight quantizers.
      unseen: what to do when an activation quantizer saw no data:
        ``"raise"`` a ValueError, or ``"warn"`` and leave it in ``"float"``
        mode (used for intercepted modules, whose parameters may turn out
        not to feed a matmul).

    Raises:
      ValueError: if an activation quantizer saw no data, or a computed scale
        is not finite and positive; the message names the layer.
    """
    if self.frozen:
      self.mode = "quant"
      return
    if not self.spec.is_block:
      obs = core.observer(self.spec)
      k = len(self.stack_shape)
      if self.role == WEIGHT:
        if weight is None:
          raise ValueError(f"{self._where()}: a weight quantizer needs the weight to freeze")
        w = jnp.asarray(weight, jnp.float32)

        def from_weight(w):
          return obs.compute(obs.update(obs.init(w), w))

        scale, zp = jax.jit(_vmap_n(from_weight, k))(w)
      else:
        state = {key: v[...] for key, v in self.stats.items()}
        if "count" in state and bool(jnp.any(state["count"] == 0)):
          if unseen == "warn":
            warnings.warn(f"jaxqat: {self._where()}: the input quantizer saw no data during "
                          "calibration; it stays in float", stacklevel=3)
            self.mode = "float"
            return
          raise ValueError(
              f"{self._where()}: the input quantizer saw no data during calibration; run "
              "calibrate(model, batches) with batches that reach this layer (or quantize it "
              "with a rule without an activation spec)")
        scale, zp = jax.jit(_vmap_n(obs.compute, k))(state)
      scale = jnp.asarray(scale, jnp.float32).reshape(self.scale.shape)
      zp = jnp.asarray(zp, jnp.float32).reshape(self.scale.shape)
      if not bool(jnp.all(jnp.isfinite(scale) & (scale > 0))):
        raise ValueError(f"{self._where()}: calibration gave a scale that is not finite and "
                         f"positive for the {self.role} (min {float(jnp.min(scale))}); check "
                         "the calibration data for NaN/Inf")
      self.scale[...] = scale
      if self.spec.learning == "lsq_plus":
        self.offset[...] = -zp * scale
      elif self.zero_point is not None:
        self.zero_point[...] = zp
    self.frozen = True
    self.mode = "quant"

  def describe(self) -> str:
    """A one-line description of the spec, for reports.

    Examples:
      >>> from jaxqat.core import QuantSpec
      >>> Quantizer(QuantSpec(), role="weight", shape=(2, 3)).describe()
      'int8 PerTensor() symmetric fixed'
    """
    s = self.spec
    return (f"{s.format.name} {s.granularity} {'symmetric' if s.symmetric else 'affine'} "
            f"{s.learning}")
