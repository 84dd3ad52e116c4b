"""The NNX quantizer: the state and the fake-quant call for one tensor.

A :class:`Quantizer` fake-quantizes either a layer's *weight* or its *input
activation* with the numerics of :mod:`jaxqat.core`
(:func:`jaxqat.core.quant_dequant`). Its state has the names and types of
the front-end contract (``docs/contract.md``):

==================  ==========================================================
spec.learning       state
==================  ==========================================================
``"fixed"``         ``scale`` (:class:`QuantStat`), ``zero_point``
                    (:class:`QuantStat`, affine integer specs only)
``"lsq"``           ``log_scale`` (:class:`QuantParam`, ``θ = log s``)
``"lsq_plus"``      ``log_scale`` and ``offset`` β (:class:`QuantParam`)
block formats       none (block scales are computed from the tensor)
==================  ==========================================================

Learned step sizes are stored as logarithms
(:func:`jaxqat.core.param_to_step_size`), so no optimizer step can make one
zero or negative. Activation quantizers also hold the observer statistics
(``stats``, an ``nnx.Dict`` of :class:`QuantStat`).

**Fixed-range weights track the weight.** A ``learning="fixed"`` weight
quantizer computes its range from the weight it is given at every call
(:func:`jaxqat.core.weight_range`: per channel, no gradient through the
range), so no weight is stuck outside a stale range during QAT. :func:`freeze`
stores the current range in ``scale``/``zero_point`` and stops the tracking;
:func:`unfreeze` resumes it.

**Activations need a calibrated range.** An activation quantizer (other than
a block format) that was never calibrated raises a ``ValueError`` naming its
layer when the model is traced in ``"quant"`` mode. One that saw no finite
value during :func:`calibrate` stays float (``disabled`` holds the reason).

**Mode.** ``Quantizer.mode`` is a *static Python attribute* (part of the NNX
graph definition): ``"quant"`` (the default, fake quantization),
``"float"`` (pass-through) or ``"calibrate"`` (used inside :func:`calibrate`:
activation observers record their input, everything passes through). As
``mode``, ``frozen`` and ``calibrated`` are static, changing them changes the
graph definition: an ``nnx.jit`` function traces once per combination; a
``jax.jit`` function over ``nnx.split`` state must be given the new
``graphdef``.

**Stacked layers.** Layers created with ``nnx.vmap`` (and applied with
``nnx.scan``) carry ``stack_shape`` leading axes on every parameter; the
quantizer state gets the same leading axes (one range per layer).

**Sharding.** A weight quantizer's state follows its weight
(:func:`jaxqat.core.scale_partition_spec`): built from a weight sharded with
a ``NamedSharding``, its ``scale``/``zero_point``/``log_scale``/``offset``
variables carry ``out_sharding`` metadata (per-channel: the weight's mesh
axes on the channel axes; per-tensor: replicated) and are created sharded,
so ``nnx.get_partition_spec``/``nnx.get_named_sharding`` and
``nnx.Optimizer`` (whose state copies the metadata) shard them with the
model. :func:`jaxqat.flax.nnx.follow_weight_shardings` does the same from
the weights' annotations (logical names, abstract models). Activation
quantizer state is per tensor or small: replicated.

**Compilation.** Ranges are computed by module-level jitted functions whose
static arguments are the spec and the number of stacked axes, so calibrating
or freezing a deep model compiles once per distinct (spec, shape), not once
per quantizer.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqat import core
from jaxqat.core import _report as report_lib
from jaxqat.core import _sharding as sharding_lib
from jaxqat.flax.nnx._variables import QuantParam
from jaxqat.flax.nnx._variables import QuantStat

__all__ = ["Quantizer", "MODES", "WEIGHT", "ACT"]

MODES = ("float", "calibrate", "quant")
WEIGHT = "weight"
ACT = "act"
_UID = itertools.count()


def _vmap_n(fn, n: int):
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


def _state_values(scale, zp, spec, full, role):
  """The quantizer state for a range: ``scale``/``zero_point`` or ``log_scale``/``offset``."""
  scale = scale.astype(jnp.float32).reshape(full)
  zp = zp.astype(jnp.float32).reshape(full)
  if spec.learning == "fixed":
    return {"scale": scale, "zero_point": zp}
  scale = core.init_step_size(scale, role)
  return {"log_scale": core.step_size_to_param(scale), "offset": -zp * scale}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _weight_state(w, spec, k, full):
  """State values from a (stacked, ``k`` leading axes) weight; one compile per (spec, shape)."""
  scale, zp = _vmap_n(lambda v: core.weight_range(v, spec), k)(w.astype(jnp.float32))
  return _state_values(scale, zp, spec, full, WEIGHT)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _observer_state(stats, spec, k, full):
  """State values from (stacked) observer statistics, and whether every range is valid."""
  scale, zp = _vmap_n(core.observer(spec).compute, k)(stats)
  ok = jnp.all(stats["count"] > 0) & jnp.all(jnp.isfinite(scale) & (scale > 0))
  return _state_values(scale, zp, spec, full, ACT), ok


def _array_sharding(x) -> Optional[jax.sharding.NamedSharding]:
  """The NamedSharding of a concrete or traced array, if it has a non-trivial one."""
  if isinstance(x, jax.core.Tracer):
    sh = jax.typeof(x).sharding
  else:
    sh = getattr(x, "sharding", None)
  if not isinstance(sh, jax.sharding.NamedSharding) or all(e is None for e in sh.spec):
    return None
  return sh


def _full_entries(pspec, ndim: int) -> tuple:
  entries = tuple(pspec)
  return entries + (None,) * (ndim - len(entries))


_STATE_VARS = ("scale", "zero_point", "log_scale", "offset")


class Quantizer(nnx.Module):
  """Fake-quantizes one tensor (a weight or an input activation).

  Args:
    spec: the :class:`jaxqat.core.QuantSpec` (granularity resolved).
    role: ``"weight"`` or ``"act"``.
    shape: the (unstacked) shape of the weight; for activations the shape of
      an example input without batch axes that fixes the channel count, e.g.
      ``(1, features)`` (only the last axis matters).
    stack_shape: leading axes of stacked (``nnx.vmap``-created) layers.
    path: the layer path, used in error messages.
    weight: for learned (LSQ/LSQ+) weight quantizers, the (stacked) weight
      that initialises the step size (and offset); default: step size 1.
    optional: for activation quantizers, whether seeing no data during
      :func:`calibrate` is expected (``Embed``'s query quantizer, used only
      by ``attend``): it then stays float without a warning (reported); a
      string is the reason the report gives.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.
    ValueError: if the spec does not fit ``shape`` (a per-channel axis out of
      range, a block size that does not divide its axis, a per-channel
      activation axis other than the last one) or has an unresolved
      :class:`jaxqat.core.PerOutputChannel` granularity, naming ``path``.
    NotImplementedError: for stochastic rounding (needs a PRNG stream).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> w = Quantizer(QuantSpec(format="int4"), role="weight", shape=(2,))
    >>> w(jnp.array([0.7, -0.35]))  # range tracks the weight: step 0.7/7
    Array([ 0.7, -0.4], dtype=float32)
    >>> a = Quantizer(QuantSpec(format="int4"), role="act", shape=(1, 3))
    >>> a.mode, a.calibrated
    ('quant', False)
  """

  def __init__(
      self,
      spec: core.QuantSpec,
      *,
      role: str,
      shape: Sequence[int],
      stack_shape: Sequence[int] = (),
      path: str = "",
      weight: Optional[jax.Array] = None,
      optional: bool = False,
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
    self.uid = next(_UID)  # identifies the quantizer across nnx.split/merge copies
    self.mode = "quant"
    self.frozen = False  # fixed-range weights: stored range instead of tracking
    self.calibrated = role == WEIGHT or spec.is_block  # activations: range set by calibrate
    self.optional = optional if isinstance(optional, str) else bool(optional)
    self.disabled = ""  # why an activation quantizer stays float after calibrate
    self.output_channel_spec = None  # intercepted weights: PerOutputChannel() resolved per op
    full = stack_shape + base
    self.scale = nnx.data(None)
    self.zero_point = nnx.data(None)
    self.log_scale = nnx.data(None)
    self.offset = nnx.data(None)
    self.stats = nnx.data(None)
    if spec.is_block:
      return
    meta = {}
    wsh = _array_sharding(weight) if role == WEIGHT and weight is not None else None
    if wsh is not None:
      pspec = sharding_lib.scale_partition_spec(
          wsh.spec, weight.shape, spec, stack_ndim=len(stack_shape), mesh=wsh.mesh, where=where)
      meta["out_sharding"] = _full_entries(pspec, len(full))
      if jax.sharding.get_abstract_mesh().empty and isinstance(wsh.mesh, jax.sharding.Mesh):
        meta["mesh"] = wsh.mesh  # no jax.set_mesh context: flax shards with this one

    def var(cls, value):
      return cls(value, **meta)

    if spec.learning == "fixed":
      self.scale = var(QuantStat, jnp.ones(full, jnp.float32))
      if spec.is_int and not spec.symmetric:
        self.zero_point = var(QuantStat, jnp.zeros(full, jnp.float32))
    else:
      self.log_scale = var(QuantParam, jnp.zeros(full, jnp.float32))
      if spec.learning == "lsq_plus":
        self.offset = var(QuantParam, jnp.zeros(full, jnp.float32))
      if role == WEIGHT and weight is not None:
        self.init_from_weight(weight)
    if role == ACT:
      self.reset_stats()

  # ----------------------------------------------------------------- state

  def _where(self) -> str:
    return f"layer '{self.path}'" if self.path else "Quantizer"

  @property
  def needs_range(self) -> bool:
    """Whether this is an activation quantizer that needs a calibrated range."""
    return self.role == ACT and not self.spec.is_block

  def reset_stats(self) -> None:
    """Resets the observer statistics of an activation quantizer."""
    if self.role != ACT or self.spec.is_block:
      return
    init = core.observer(self.spec).init(jnp.zeros(self.shape, jnp.float32))
    stats = {k: QuantStat(jnp.broadcast_to(jnp.asarray(v), self.stack_shape + jnp.shape(v)))
             for k, v in init.items()}
    if self.stats is None:
      self.stats = nnx.Dict(stats)
    else:
      for k, v in stats.items():
        self.stats[k][...] = v[...]

  def _full(self):
    return self.stack_shape + self.spec.scale_shape(self.shape)

  def _set(self, values: dict) -> None:
    for name, v in values.items():
      var = getattr(self, name)
      if var is not None:
        old = var[...]
        sh = getattr(old, "sharding", None)
        if (not isinstance(old, jax.core.Tracer) and not isinstance(v, jax.core.Tracer)
            and isinstance(sh, jax.sharding.NamedSharding) and v.sharding != sh):
          v = jax.device_put(v, sh)  # the state keeps its sharding (it follows the weight)
        var[...] = v

  def state_variables(self) -> dict:
    """The weight-range state variables (``scale``, ``zero_point``, ``log_scale``, ``offset``)."""
    return {n: getattr(self, n) for n in _STATE_VARS if getattr(self, n) is not None}

  def init_from_weight(self, weight: jax.Array) -> None:
    """Initialises a learned weight step size (and LSQ+ offset) from ``weight``."""
    if self.spec.is_block or self.spec.learning == "fixed":
      return
    self._set(_weight_state(jnp.asarray(weight), self.spec, len(self.stack_shape), self._full()))

  def store_weight_range(self, weight: jax.Array) -> None:
    """Stores a fixed-range weight quantizer's current range and stops tracking (freeze)."""
    if self.role != WEIGHT or self.spec.is_block or self.spec.learning != "fixed":
      return
    self._set(_weight_state(jnp.asarray(weight), self.spec, len(self.stack_shape), self._full()))
    self.frozen = True

  def set_from_observer(self) -> bool:
    """Sets an activation range from the observer statistics (end of calibration).

    A learned step size is initialised from the calibrated range
    (``log_scale = log s``) and an LSQ+ offset to ``β = -z·s`` (Bhalgat et al.
    2020). A quantizer that saw no finite value stays float: ``disabled``
    says why, and a :class:`jaxqat.core.QuantizationWarning` names the layer
    (unless ``optional``).

    Returns:
      Whether the range was set.
    """
    if not self.needs_range:
      return True
    stats = self._stat_values()
    values, ok = _observer_state(stats, self.spec, len(self.stack_shape), self._full())
    ok = bool(ok)
    if not ok:
      if isinstance(self.optional, str):
        self.disabled = self.optional
      elif self.optional:
        self.disabled = ("attend() was not called during calibration (lookup only); the query "
                         "of attend stays float")
      else:
        self.disabled = ("saw no finite input during calibration (no batch reached it, "
                         "every value was NaN/inf, or it ran inside an nnx.scan/nnx.vmap that "
                         "took it as broadcast state, in_axes=None, whose updates NNX drops: "
                         "pass it as nnx.StateAxes({...: nnx.Carry}), as nnx.RNN does); its "
                         "input stays float")
        warnings.warn(f"jaxqat: {self._where()}: the input quantizer {self.disabled}",
                      core.QuantizationWarning, stacklevel=3)
      self.calibrated = False
      return False
    self._set(values)
    self.calibrated = True
    self.disabled = ""
    return True

  # ------------------------------------------------------------------ call

  def _fit(self, value, spec, x_shape, name):
    want = spec.scale_shape(x_shape)
    if value.shape == want:
      return value
    if value.size == math.prod(want):
      return value.reshape(want)
    raise ValueError(
        f"{self._where()}: the {self.role} quantizer's {name} has shape {value.shape}, which "
        f"does not fit an input of shape {tuple(x_shape)} (expected {want}). A layer created "
        "with nnx.vmap must be called inside nnx.scan/nnx.vmap.")

  def __call__(self, x: jax.Array, *, spec: Optional[core.QuantSpec] = None) -> jax.Array:
    """Fake-quantizes ``x`` (``"quant"``), observes it (``"calibrate"``) or not.

    Args:
      x: the weight or activation (floating point).
      spec: for a tracking fixed-range weight quantizer, a spec to use
        instead of ``self.spec`` (an intercepted op that resolves
        ``PerOutputChannel()`` to other axes).

    Returns:
      An array of ``x``'s shape and dtype.

    Raises:
      ValueError: in ``"quant"`` mode, if an activation quantizer that needs
        a range was never calibrated (naming the layer).
    """
    r = self.ranges(x, spec=spec)
    if r is None:
      return x
    return core.quant_dequant(x, r[0], r[1], r[2], offset=r[3])

  def tracks(self, spec: Optional[core.QuantSpec] = None) -> bool:
    """Whether this weight quantizer's range is the weight's own, recomputed each step.

    A fixed-range spec (``spec``, default ``self.spec``) that is not frozen
    and not a block format (:func:`jaxqat.core.weight_range`): what
    :func:`jaxqat.core.qat_op` takes as ``weight_tracked``.

    Examples:
      >>> from jaxqat.core import QuantSpec
      >>> Quantizer(QuantSpec(), role="weight", shape=(2,)).tracks()
      True
    """
    spec = self.spec if spec is None else spec
    return spec.learning == "fixed" and not self.frozen and not spec.is_block

  def ranges(self, x: jax.Array, *, spec: Optional[core.QuantSpec] = None) -> Optional[tuple]:
    """The current range for ``x``, ``(spec, scale, zero_point, offset)``, without applying it.

    This is what :func:`jaxqat.core.qat_op` takes (``act=``/``weight=``):
    the step size ``s`` (a learned one from ``log_scale``; a tracking
    fixed-range weight's from ``x`` itself, without gradient), the integer
    zero point of an affine fixed range, the LSQ+ offset. In
    ``"calibrate"`` mode an activation quantizer records ``x`` first.

    Args:
      x: the weight or activation the range is for.
      spec: as in :meth:`__call__`.

    Returns:
      The tuple, or ``None`` when ``x`` passes through unquantized
      (``"float"``/``"calibrate"`` mode, or an input that stays float).

    Raises:
      ValueError: as :meth:`__call__`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxqat.core import QuantSpec
      >>> q = Quantizer(QuantSpec(format="int4"), role="weight", shape=(2,))
      >>> spec, scale, zp, offset = q.ranges(jnp.array([0.7, -0.35]))
      >>> scale, zp, offset
      (Array(0.1, dtype=float32), None, None)
    """
    if self.mode == "float":
      return None
    if self.mode == "calibrate":
      if self.role == ACT and self.stats is not None:
        self._observe(x)
      return None
    spec = self.spec if spec is None else spec
    if spec.is_block:
      return (spec, None, None, None)
    if self.role == ACT and not self.calibrated:
      if self.disabled:
        return None
      raise ValueError(
          f"{self._where()}: the input quantizer was never calibrated; run "
          "jaxqat.flax.nnx.calibrate(model, data) before using the model in 'quant' mode (or "
          "quantize this layer with a rule without an act spec)")
    if spec.learning == "fixed":
      if self.role == WEIGHT and not self.frozen:
        scale, zp = core.weight_range(x, spec)
      else:
        scale = self._fit(self.scale[...], spec, x.shape, "scale")
        zp = None if self.zero_point is None else self._fit(
            self.zero_point[...], spec, x.shape, "zero_point")
      if not spec.is_int or spec.symmetric:
        zp = None
      return (spec, scale, zp, None)
    scale = core.param_to_step_size(self._fit(self.log_scale[...], spec, x.shape, "log_scale"))
    offset = None
    if spec.learning == "lsq_plus":
      offset = self._fit(self.offset[...], spec, x.shape, "offset")
    return (spec, scale, None, offset)

  def _stat_values(self) -> dict:
    # Only the QuantStat entries: under nnx.capture (e.g. qad_forward) Flax adds a
    # '__captures__' attribute to every module, nnx.Dict included.
    return {k: v[...] for k, v in self.stats.items() if isinstance(v, nnx.Variable)}

  def _observe(self, x):
    obs = core.observer(self.spec)
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    x = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    state = self._stat_values()
    new = obs.update(state, x)
    for k, v in new.items():
      self.stats[k][...] = v

  def describe(self) -> str:
    """A one-line description of the spec, for reports.

    Examples:
      >>> from jaxqat.core import QuantSpec
      >>> Quantizer(QuantSpec(), role="weight", shape=(2, 3)).describe()
      'int8 per-tensor symmetric fixed'
    """
    return report_lib.describe_spec(self.spec)
