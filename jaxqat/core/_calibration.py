r"""Calibration observers, in the optax style: ``init``, ``update``, ``compute``.

An :class:`Observer` is a triple of pure functions. ``init(x)`` builds a
state (a ``dict[str, jax.Array]`` of float32 arrays whose shapes are fixed
from then on, so a front end can keep it in framework variables),
``update(state, x)`` folds one batch into it (pure and jit-able), and
``compute(state)`` turns it into a step size ``s`` and an integer-valued zero
point ``z`` (``x ~= s * (q - z)``) of shape ``spec.scale_shape(x.shape)``.
:func:`calibrate` runs an observer over an iterable of batches.

Statistics are gathered per *scale*: one group per tensor, per channel (the
index along ``PerChannel`` axes) or per block. Methods
(``spec.calibration.method``):

* ``absmax`` / ``minmax``: the running minimum :math:`m` and maximum
  :math:`M`. Symmetric: :math:`a = \max(|m|, |M|)`, :math:`s = a / q_{max}`,
  :math:`z = 0`. Affine (Jacob et al. 2018, "Quantization and Training of
  Neural Networks for Efficient Integer-Arithmetic-Only Inference", sec.
  2.1): the range is first extended to contain 0, :math:`m' = \min(m, 0)`,
  :math:`M' = \max(M, 0)`, so that real 0 is exactly representable; then
  :math:`s = (M' - m') / (q_{max} - q_{min})` and
  :math:`z = \mathrm{clip}(\lfloor q_{min} - m'/s \rceil, q_{min}, q_{max})`.
  For an affine spec ``absmax`` is the same as ``minmax``.
* ``ema``: exponential moving averages of the per-batch minimum and maximum,
  :math:`m_t = d\,m_{t-1} + (1-d)\,\min(x_t)` with :math:`d` =
  ``ema_decay``; the first batch initializes the averages (no bias toward
  0). Then as ``minmax``.
* ``percentile``, ``mse``, ``entropy`` keep a streaming histogram per group
  (``num_bins`` bins): of :math:`|x|` over :math:`[0, R]` for symmetric
  specs, of :math:`x` over :math:`[L, R] \ni 0` for affine specs. The bin
  width is a power of two, :math:`w = 2^k`, the smallest for which
  ``num_bins`` bins starting at :math:`L = \lfloor m' / w \rfloor w` hold the
  observed range :math:`[m', M']` (:math:`m' = 0`, :math:`M' = \max|x|`
  when symmetric); the grid is a function of the observed range alone. When
  a batch widens the range, the width doubles as often as needed and each
  old bin's count moves to the new bin that contains it (an exact merge, a
  scatter-add inside jit), so the histogram -- and every read-out below --
  is the same whatever the order of the batches. The exact running min/max
  are kept next to the histogram.

  - ``percentile``: the ``percentile`` :math:`p` of :math:`|x|` (symmetric)
    or the :math:`(100-p, p)` percentiles of :math:`x` (affine), read from the
    cumulative histogram with linear interpolation inside the bin (so within
    one bin width of the exact value) and clamped to the observed range.
  - ``mse``: searches ``num_candidates`` clipping ranges, symmetric
    :math:`c_k = a\,k/K` for :math:`k = 1..K`, affine :math:`[m', M']\,k/K`,
    and keeps the one minimizing the expected squared error
    :math:`\sum_j n_j\,(\hat{x}(c_j) - c_j)^2` over bin centers :math:`c_j`
    and counts :math:`n_j`, where :math:`\hat{x}` is
    :func:`~jaxqat.core.fake_quant` with the candidate's scale and zero point
    (round half to even; clipping error outside, rounding error inside).
    See Sung et al. 2015 ("Resiliency of Deep Neural Networks under
    Quantization") and Banner et al. 2019 ("Post training 4-bit quantization
    of convolutional networks for rapid-deployment") for MSE-optimal clipping.
  - ``entropy``: the KL-divergence method of Migacz 2017 ("8-bit Inference
    with TensorRT"), on a histogram that leaves out exact zeros: every
    candidate range represents 0 exactly, so zeros carry no quantization
    error, and after a ReLU their spike in the first bin would otherwise
    dominate :math:`P` and pull the threshold far below the data's tail
    (merging the spike bin into a level with its neighbours is what the KL
    punishes). With :math:`N_q = q_{max} + 1` levels on the
    :math:`|x|` histogram, for each candidate count of kept bins
    :math:`i \in [N_q, B]`: the reference :math:`P` is the first :math:`i`
    bins with the outlier mass (bins :math:`\ge i`) added to bin
    :math:`i-1`; :math:`Q` merges the first :math:`i` bins (without the
    outliers) into :math:`N_q` levels (bin :math:`j` goes to level
    :math:`\lfloor j N_q / i \rfloor`) and spreads each level's mass
    uniformly over the bins where :math:`P > 0`; :math:`Q` is then floored
    at :math:`10^{-8}` inside the window and renormalized, so that the KL
    stays finite where only outlier mass lands in a bin (a window holding no
    mass at all is rejected). The threshold is the upper edge of bin
    :math:`i - 1` for the :math:`i` minimizing :math:`KL(P \| Q)` (clamped to
    the observed :math:`\max |x|`). At most
    ``num_candidates`` values of :math:`i`, evenly spaced from :math:`N_q` to
    :math:`B` (both included), are tried. Affine generalization: the
    histogram of :math:`x` on :math:`[L, R] \ni 0` with
    :math:`N_q = q_{max} - q_{min} + 1` levels; the window of :math:`i` kept
    bins shrinks :math:`[L, R]` toward 0 by the factor :math:`i / B` on both
    sides (so the negative/positive split of the range is kept), with the
    mass left of the window added to its first bin and the mass right of it
    to its last bin. Three more windows per :math:`i` keep the whole
    negative side (first bin 0), the whole positive side (last bin
    :math:`B-1`), or are centered on the median bin (for one-sided or
    lopsided outliers); every window must contain 0. If :math:`N_q > B` (e.g.
    int16), the full observed range is returned.

Formats: integer formats as above; float formats (fp8, fp6, fp4) are
symmetric with :math:`s = a / \mathrm{max}` (``mse`` rounds onto the float
grid; ``entropy`` models a uniform grid and is refused); ``nvfp4`` gets its
fp32 *tensor* scale :math:`a / (6 \cdot 448)` (shape ``()``, zero point 0;
methods ``absmax``, ``minmax``, ``ema``, ``percentile``); MX formats derive
their scales from the data and have nothing to calibrate (a ``ValueError``).

Symmetric statistics are magnitudes (:math:`|x|`), also for unsigned
symmetric formats. ``mse`` measures the error with round-half-to-even even
when the spec rounds stochastically. Scales are divided exactly
(:math:`a / q_{max}` correctly rounded in float32, not multiplied by a
rounded reciprocal as XLA would otherwise do).

Degenerate input (defined, never a zero, NaN or Inf scale):

* NaN and +-Inf entries are ignored by every statistic; a batch (or a group)
  without a finite entry leaves the state unchanged, and so does an empty
  batch (``x.size == 0``).
* ``compute`` on a state that saw no finite data, or on an all-zero range,
  returns ``s = 1`` and ``z = clip(0, qmin, qmax)`` (0 for signed formats,
  ``qmin`` for unsigned ones).
* A constant tensor :math:`c \ne 0`: the range is :math:`[\min(c,0),
  \max(c,0)]`, so :math:`s = |c| / q_{max}` (symmetric) or
  :math:`|c| / (q_{max} - q_{min})` (affine).
* Positive scales below ``1e-12`` are raised to ``1e-12``, the clamp that
  :func:`~jaxqat.core.fake_quant` applies anyway.
* :func:`calibrate` with no batches raises ``ValueError``.

Memory: histogram methods keep ``num_bins`` float32 counts per scale; per
block that is ``num_bins`` per block, so prefer ``absmax``/``minmax`` (or few
bins) for fine-grained block scales. Statistics are float32 (bin counts are
exact up to :math:`2^{24}` per bin; ``count`` only needs to tell "some data"
from "none").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxqat.core import _fake_quant
from jaxqat.core import _formats as formats_lib
from jaxqat.core import _grid
from jaxqat.core import _sharding
from jaxqat.core import _spec as spec_lib
from jaxqat.core._typing import Array, ArrayLike

__all__ = ["Observer", "observer", "calibrate", "weight_range"]

State = dict[str, Array]

_F32 = jnp.float32
_HIST_METHODS = ("percentile", "mse", "entropy")
# lax.map over groups processes this many (candidates x bins) elements at once.
_MAP_BUDGET = 1 << 22
# entropy: probability floor added to Q inside the window so that KL(P||Q) stays finite.
_KL_EPS = 1e-8


class Observer(NamedTuple):
  """The three pure functions of a calibration observer (optax style).

  Attributes:
    init: ``init(x) -> state``. ``x`` is an example input (an array, or
      anything with ``shape`` and ``dtype`` such as
      :class:`jax.ShapeDtypeStruct`); only its shape and dtype are used.
    update: ``update(state, x) -> state``, pure; already wrapped in
      :func:`jax.jit`.
    compute: ``compute(state) -> (scale, zero_point)``, both float32 of shape
      ``spec.scale_shape(x.shape)`` (``()`` for the nvfp4 tensor scale).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, observer
    >>> obs = observer(QuantSpec(format="int8"))
    >>> sorted(obs.init(jnp.zeros(3)))
    ['count', 'max', 'min']
  """

  init: Callable[[Any], State]
  update: Callable[[State, ArrayLike], State]
  compute: Callable[[State], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class _Stats:
  """What ``init``/``update`` depend on; specs that agree here share compiled code."""

  kind: str  # "range" (absmax, minmax), "ema" or "hist" (percentile, mse, entropy)
  shape_spec: spec_lib.QuantSpec  # only its granularity matters: validates x, scale shape
  tensor_scale: bool  # nvfp4: statistics per tensor, shape ()
  hist_abs: bool = False  # hist: a histogram of |x| (symmetric) or of x (affine)
  num_bins: int = 0  # hist
  skip_zeros: bool = False  # hist: leave exact zeros out of the histogram (entropy)
  ema_decay: float = 0.0  # ema

  @property
  def granularity(self) -> spec_lib.Granularity:
    """The granularity of the statistics."""
    return spec_lib.PerTensor() if self.tensor_scale else self.shape_spec.granularity

  @property
  def keys(self) -> tuple[str, ...]:
    return ("count", "min", "max") + (("hist", "lo", "hi") if self.kind == "hist" else ())


def _stats_key(spec: spec_lib.QuantSpec, tensor_scale: bool) -> _Stats:
  cal = spec.calibration
  shape_spec = spec_lib.QuantSpec(granularity=spec.granularity)
  if cal.method in ("absmax", "minmax"):
    return _Stats("range", shape_spec, tensor_scale)
  if cal.method == "ema":
    return _Stats("ema", shape_spec, tensor_scale, ema_decay=float(cal.ema_decay))
  return _Stats("hist", shape_spec, tensor_scale, hist_abs=spec.symmetric,
                num_bins=cal.num_bins, skip_zeros=cal.method == "entropy")


@dataclasses.dataclass(frozen=True)
class _Config:
  """What the observer needs from a spec, resolved once."""

  spec: spec_lib.QuantSpec
  method: str
  stats: _Stats
  symmetric: bool
  qmin: float
  qmax: float  # symmetric: a / qmax is the scale
  num_levels: int  # entropy: quantized levels N_q
  fq_spec: Optional[spec_lib.QuantSpec]  # mse: per-tensor spec for fake_quant


def _config(spec: spec_lib.QuantSpec) -> _Config:
  spec = _grid.check_spec(spec)
  cal = spec.calibration
  method = cal.method
  fmt = spec.format
  if isinstance(fmt, formats_lib.BlockFormat):
    if not fmt.tensor_scale:
      raise ValueError(f"spec: {fmt.name} is an MX format: it derives its block scales from the "
                       "data (e8m0) and needs no calibration; quantize with block_fake_quant")
    if method not in ("absmax", "minmax", "ema", "percentile"):
      raise ValueError(f"spec.calibration.method: {fmt.name} calibrates only its tensor scale; "
                       f"allowed methods: absmax, minmax, ema, percentile; got {method!r}")
    qmax = fmt.element.max * formats_lib.FP8_E4M3.max
    return _Config(spec, method, _stats_key(spec, True), True, -qmax, qmax, 0, None)
  if isinstance(fmt, formats_lib.FloatFormat) and method == "entropy":
    raise ValueError("spec.calibration.method: 'entropy' (TensorRT KL) models a uniform integer "
                     f"grid; for float format {fmt.name} use absmax, minmax, ema, percentile "
                     "or mse")
  qmin, qmax = float(spec.qmin), float(spec.qmax)
  if isinstance(fmt, formats_lib.IntFormat):
    levels = int(qmax) + 1 if spec.symmetric else int(qmax - qmin) + 1
  else:
    levels = 0
  fq_spec = None
  if method == "mse":
    fq_spec = spec.replace(granularity=spec_lib.PerTensor(), learning="fixed",
                           rounding="nearest_even")
  return _Config(spec, method, _stats_key(spec, False), spec.symmetric, qmin, qmax, levels,
                 fq_spec)


# --------------------------------------------------------------------------
# Shapes: x <-> (groups, elements) and the scale shape.
# --------------------------------------------------------------------------


def _input_info(x, name: str = "x"):
  """Shape and dtype of x without materializing it; checks it is floating."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    try:
      shape, dtype = tuple(int(d) for d in x.shape), jnp.dtype(x.dtype)
    except TypeError:
      raise TypeError(f"{name}: expected a JAX or numpy array, got {type(x).__name__} with "
                      f"dtype {x.dtype}") from None
  else:
    try:
      arr = np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
      raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from e
    shape, dtype = arr.shape, arr.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating point array, got dtype {dtype}")
  return shape, dtype


def _scale_shape(shape, stats: _Stats) -> tuple[int, ...]:
  g = stats.shape_spec.granularity
  try:
    sshape = stats.shape_spec.scale_shape(shape)  # for nvfp4 this validates the block layout
  except ValueError as e:
    raise ValueError(f"x: shape {tuple(shape)} does not fit {g}: {e}") from None
  return () if stats.tensor_scale else sshape


def _channel_sizes(scale_shape, g: spec_lib.PerChannel) -> tuple[int, ...]:
  axes = sorted(spec_lib.normalize_axes(g.axes, len(scale_shape), "x"))
  return tuple(scale_shape[a] for a in axes)


def _check_compatible(state_shape, x_shape, stats: _Stats) -> None:
  """Raises unless statistics of x (shape x_shape) fold into the state."""
  sx = _scale_shape(x_shape, stats)
  if sx == tuple(state_shape):
    return
  g = stats.granularity
  if isinstance(g, spec_lib.PerChannel) and len(state_shape) >= len(g.axes):
    if _channel_sizes(sx, g) == _channel_sizes(state_shape, g):
      return
  raise ValueError(f"x: shape {tuple(x_shape)} gives statistics of shape {sx} for {g}, but the "
                   f"observer state was initialized for statistics of shape {tuple(state_shape)} "
                   "(a different channel or block count)")


def _to_groups(x: Array, g: spec_lib.Granularity) -> Array:
  """Reshapes x to (groups, elements), groups in C order of the scale shape."""
  shape = x.shape
  if isinstance(g, spec_lib.PerTensor):
    return x.reshape(1, x.size)
  if isinstance(g, spec_lib.PerChannel):
    axes = sorted(spec_lib.normalize_axes(g.axes, x.ndim, "x"))
    rest = [i for i in range(x.ndim) if i not in axes]
    c = math.prod(shape[a] for a in axes)
    n = math.prod(shape[r] for r in rest)
    return jnp.transpose(x, axes + rest).reshape(c, n)
  axis = g.axis % x.ndim
  xb = x.reshape(shape[:axis] + (shape[axis] // g.size, g.size) + shape[axis + 1:])
  xb = jnp.moveaxis(xb, axis + 1, -1)
  return xb.reshape(x.size // g.size, g.size)


# --------------------------------------------------------------------------
# Range -> (scale, zero point).
# --------------------------------------------------------------------------


def _fallback_zero_point(cfg: _Config) -> float:
  return float(min(max(0.0, cfg.qmin), cfg.qmax)) if not cfg.symmetric else 0.0


def _scale_zp(lo: Array, hi: Array, cfg: _Config) -> tuple[Array, Array]:
  """Scale and zero point for the range [lo, hi] (elementwise), with fallbacks."""
  lo = lo.astype(_F32)
  hi = hi.astype(_F32)
  if cfg.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    s = _grid.div_exact(amax, cfg.qmax)
    good = jnp.isfinite(s) & (s > 0)
    s = jnp.where(good, jnp.maximum(s, _grid.SCALE_EPS), 1.0).astype(_F32)
    return s, jnp.zeros_like(s)
  lo0 = jnp.minimum(lo, 0.0)
  hi0 = jnp.maximum(hi, 0.0)
  n = cfg.qmax - cfg.qmin
  width = hi0 - lo0
  # (hi0 - lo0) / n, without overflowing for ranges near the float32 limit.
  s = jnp.where(jnp.isfinite(width), _grid.div_exact(width, n), hi0 / n - lo0 / n)
  good = jnp.isfinite(s) & (s > 0)
  s = jnp.where(good, jnp.maximum(s, _grid.SCALE_EPS), 1.0).astype(_F32)
  z = jnp.clip(jnp.round(cfg.qmin - lo0 / s), cfg.qmin, cfg.qmax)
  z = jnp.where(good, z, _fallback_zero_point(cfg)).astype(_F32)
  return s, z


# --------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------


def _batch_stats(xg: Array, axis_name=None):
  """Count, min and max of the finite entries of each group (row), across ``axis_name``."""
  fin = jnp.isfinite(xg)
  cnt = jnp.sum(fin, axis=1).astype(_F32)
  mn = jnp.min(jnp.where(fin, xg, jnp.inf), axis=1, initial=jnp.inf)
  mx = jnp.max(jnp.where(fin, xg, -jnp.inf), axis=1, initial=-jnp.inf)
  if axis_name is not None:
    cnt = jax.lax.psum(cnt, axis_name)
    mn = jax.lax.pmin(mn, axis_name)
    mx = jax.lax.pmax(mx, axis_name)
  return fin, cnt, mn, mx


def _merge_range(state, cnt, mn, mx, ema_decay=None):
  seen = state["count"] > 0
  has = cnt > 0
  if ema_decay is None:
    new_min = jnp.where(seen, jnp.minimum(state["min"], mn), mn)
    new_max = jnp.where(seen, jnp.maximum(state["max"], mx), mx)
  else:
    d = ema_decay
    new_min = jnp.where(seen, d * state["min"] + (1.0 - d) * mn, mn)
    new_max = jnp.where(seen, d * state["max"] + (1.0 - d) * mx, mx)
  return {
      "count": state["count"] + cnt,
      "min": jnp.where(has, new_min, state["min"]),
      "max": jnp.where(has, new_max, state["max"]),
  }


# Bin widths are powers of two 2^k with k in [_MIN_BIN_EXP, _MAX_BIN_EXP].
_MIN_BIN_EXP = -126
_MAX_BIN_EXP = 100


def _bin_width(lo: Array, hi: Array, b: int) -> Array:
  """(hi - lo) / b, without overflowing for ranges near the float32 limit."""
  span = hi - lo
  return jnp.where(jnp.isfinite(span), span / b, hi / b - lo / b)


def _hist_grid(need_lo: Array, need_hi: Array, b: int) -> tuple[Array, Array]:
  """(lo, hi) of the histogram of ``b`` bins that holds [need_lo, need_hi] (0 inside).

  The bin width is the smallest power of two ``w = 2^k`` for which ``b``
  bins starting at ``lo = floor(need_lo / w) * w`` hold the range, ``need_hi``
  strictly inside. It depends on the range only, and a histogram on a
  coarser such grid is an exact merge of one on a finer grid (each coarse bin
  is a union of fine ones), so the result does not depend on the batch order.
  """
  span = need_hi / (b - 1) - need_lo / (b - 1)
  _, e = jnp.frexp(jnp.where(span > 0, span, 1.0))  # span < 2^e

  def fits(k):
    w = _grid.exp2_int(k, _F32)
    lo = jnp.floor(need_lo / w) * w
    return jnp.floor((need_hi - lo) / w) <= b - 1

  k = jnp.where(fits(e - 1), e - 1, e)
  k = jnp.where(span > 0, k, _MIN_BIN_EXP)
  k = jnp.clip(k, _MIN_BIN_EXP, _MAX_BIN_EXP)
  w = _grid.exp2_int(k, _F32)
  lo = jnp.floor(need_lo / w) * w
  return lo, lo + b * w


def _update_hist(state, new_range, xg, fin, symmetric: bool, num_bins: int, skip_zeros: bool,
                 axis_name=None):
  """Folds the values of xg into the per-group histograms, growing their range.

  ``new_range`` is the merged state (count, running min and max, this batch
  included); the histogram grid is a function of that range alone (see
  ``_hist_grid``) and old counts move to the bins of the new grid. With
  ``axis_name`` (under ``shard_map``) the range is global already and the
  counts of this batch are summed across the axis.
  """
  b = num_bins
  g = xg.shape[0]
  v = jnp.abs(xg) if symmetric else xg
  mn, mx = new_range["min"], new_range["max"]
  if symmetric:
    need_lo = jnp.zeros_like(mn)
    need_hi = jnp.maximum(jnp.abs(mn), jnp.abs(mx))
  else:
    need_lo, need_hi = jnp.minimum(mn, 0.0), jnp.maximum(mx, 0.0)
  seen = new_range["count"] > 0
  lo, hi, hist = state["lo"], state["hi"], state["hist"]
  new_lo, new_hi = _hist_grid(need_lo, need_hi, b)
  new_lo = jnp.where(seen, new_lo, lo)
  new_hi = jnp.where(seen, new_hi, hi)
  new_w = _bin_width(new_lo, new_hi, b)
  pos = new_w > 0
  inv = jnp.where(pos, new_w, 1.0)[:, None]

  def bin_of(vals):
    # floor(v / w) - lo / w: exact (w is a power of two, lo / w an integer), so every
    # value lands in the same bin whichever grid it was first counted on.
    t = jnp.floor(vals / inv) - new_lo[:, None] / inv
    return jnp.clip(jnp.where(pos[:, None], t, 0.0), 0, b - 1).astype(jnp.int32)

  w = _bin_width(lo, hi, b)
  w_safe = jnp.where(w > 0, w, 1.0)[:, None]
  ids = jnp.arange(b, dtype=jnp.int32)
  centers = (lo[:, None] / w_safe + ids.astype(_F32)[None, :] + 0.5) * w_safe
  offsets = (jnp.arange(g, dtype=jnp.int32) * b)[:, None]
  flat = jnp.zeros((g * b,), _F32)
  flat = flat.at[(bin_of(centers) + offsets).reshape(-1)].add(hist.reshape(-1))
  counted = fin & (v != 0) if skip_zeros else fin
  new_idx = bin_of(jnp.where(fin, v, 0.0))
  batch = jnp.zeros((g * b,), _F32)
  batch = batch.at[(new_idx + offsets).reshape(-1)].add(counted.astype(_F32).reshape(-1))
  if axis_name is not None:
    batch = jax.lax.psum(batch, axis_name)
  return {"hist": (flat + batch).reshape(g, b), "lo": new_lo, "hi": new_hi}


# --------------------------------------------------------------------------
# Histogram read-outs.
# --------------------------------------------------------------------------


def _hist_quantile(hist, lo, hi, vmin, vmax, q: float) -> Array:
  """Per-group value at percentile q (0..100) of values in [vmin, vmax].

  The bin holding the q-th fraction of the mass is intersected with the
  observed range [vmin, vmax] and its mass spread uniformly over it (so a
  constant tensor gives its value exactly).
  """
  b = hist.shape[-1]
  w = _bin_width(lo, hi, b)
  cum = jnp.cumsum(hist, axis=-1)
  target = (q / 100.0) * cum[:, -1]
  k = jnp.minimum(jnp.sum(cum < target[:, None], axis=-1), b - 1)
  hk = jnp.take_along_axis(hist, k[:, None], axis=-1)[:, 0]
  before = jnp.take_along_axis(cum, k[:, None], axis=-1)[:, 0] - hk
  frac = jnp.clip(jnp.where(hk > 0, (target - before) / jnp.where(hk > 0, hk, 1.0), 0.0), 0.0, 1.0)
  kf = k.astype(_F32)
  edge_lo = jnp.clip(lo + kf * w, vmin, vmax)
  edge_hi = jnp.clip(lo + (kf + 1.0) * w, vmin, vmax)
  return edge_lo + frac * (edge_hi - edge_lo)


def _map_groups(fn, xs, per_group_elems: int):
  g = xs[0].shape[0]
  batch = max(1, _MAP_BUDGET // max(1, per_group_elems))
  if g <= batch:
    return jax.vmap(fn)(*xs)
  return jax.lax.map(lambda a: fn(*a), xs, batch_size=batch)


def _mse_candidates(mn: Array, mx: Array, cfg: _Config) -> tuple[Array, Array]:
  """(groups, K) scales and zero points of the clipping ranges tried by mse."""
  k = cfg.spec.calibration.num_candidates
  fracs = jnp.asarray(np.arange(1, k + 1, dtype=np.float32) / np.float32(k))
  if cfg.symmetric:
    amax = jnp.maximum(jnp.abs(mn), jnp.abs(mx))[:, None]
    lows, highs = -fracs * amax, fracs * amax
  else:
    lows = fracs * jnp.minimum(mn, 0.0)[:, None]
    highs = fracs * jnp.maximum(mx, 0.0)[:, None]
  return _scale_zp(lows, highs, cfg)


def _mse_one(hist, lo, hi, scales, zps, cfg: _Config):
  """The candidate (scale, zero point) with the least squared error on one histogram."""
  b = hist.shape[-1]
  w = _bin_width(lo, hi, b)
  centers = lo + (jnp.arange(b, dtype=_F32) + 0.5) * w

  def err(s, z):
    zp = z if cfg.fq_spec.is_int else None
    y = _fake_quant.fake_quant(centers, s, zp, cfg.fq_spec)
    return jnp.sum(hist * jnp.square(y - centers))

  errs = jax.vmap(err)(scales, zps)
  errs = jnp.where(jnp.isnan(errs), jnp.inf, errs)
  best = jnp.argmin(errs)
  return scales[best], zps[best]


def _entropy_candidates(num_bins: int, num_levels: int, num_candidates: int) -> np.ndarray:
  n = min(num_candidates, num_bins - num_levels + 1)
  return np.unique(np.round(np.linspace(num_levels, num_bins, n)).astype(np.int32))


def _kl_for_window(hist, i, j0, nq: int):
  """KL(P || Q) for the window of i bins starting at bin j0 (Migacz 2017)."""
  b = hist.shape[-1]
  j = jnp.arange(b, dtype=jnp.int32)
  inw = (j >= j0) & (j < j0 + i)
  kept = jnp.where(inw, hist, 0.0)
  left = jnp.sum(jnp.where(j < j0, hist, 0.0))
  right = jnp.sum(jnp.where(j >= j0 + i, hist, 0.0))
  p = kept + jnp.where(j == j0, left, 0.0) + jnp.where(j == j0 + i - 1, right, 0.0)
  level = jnp.clip(((j - j0) * nq) // i, 0, nq - 1)
  level = jnp.where(inw, level, nq)
  nz = inw & (p > 0)
  sums = jax.ops.segment_sum(kept, level, num_segments=nq + 1)
  counts = jax.ops.segment_sum(nz.astype(_F32), level, num_segments=nq + 1)
  q = jnp.where(nz, sums[level] / jnp.maximum(counts[level], 1.0), 0.0)
  p_total, q_total = jnp.sum(p), jnp.sum(q)
  p = p / jnp.where(p_total > 0, p_total, 1.0)
  q = q / jnp.where(q_total > 0, q_total, 1.0)
  # Smoothing: Q is zero where only outlier mass lands in P (an empty level).
  q = jnp.where(inw, q + _KL_EPS, 0.0)
  q = q / jnp.sum(q)
  safe_p = jnp.where(p > 0, p, 1.0)
  safe_q = jnp.where(q > 0, q, 1.0)
  terms = jnp.where(p > 0, p * (jnp.log(safe_p) - jnp.log(safe_q)), 0.0)
  terms = jnp.where((p > 0) & (q <= 0), jnp.inf, terms)
  kl = jnp.sum(terms)
  # A window without any (non-outlier) mass has no Q at all.
  return jnp.where((q_total > 0) & ~jnp.isnan(kl), kl, jnp.inf)


def _entropy_windows(hist: Array, cands: Array, z0: Array, symmetric: bool):
  """Candidate windows (kept bins i, first bin j0, valid) for the KL search.

  Symmetric: j0 = 0. Affine: four anchors per i: shrink toward 0 by i / b on
  both sides, keep the whole negative side (j0 = 0), keep the whole positive
  side (j0 = b - i), or center the window on the median bin; a window is
  valid if it contains 0 (bin position z0).
  """
  b = hist.shape[-1]
  i_f = cands.astype(_F32)
  prop = jnp.clip(jnp.round(z0 * (1.0 - i_f / b)).astype(jnp.int32), 0, b - cands)
  if symmetric:
    return cands, prop, jnp.ones(cands.shape, bool)
  cum = jnp.cumsum(hist)
  median = jnp.sum(cum < 0.5 * cum[-1]).astype(_F32)  # first bin reaching half the mass
  center = jnp.clip(jnp.round(median + 0.5 - 0.5 * i_f).astype(jnp.int32), 0, b - cands)
  i_all = jnp.concatenate([cands] * 4)
  j0 = jnp.concatenate([prop, jnp.zeros_like(cands), b - cands, center])
  j0_f = j0.astype(_F32)
  valid = (j0_f <= z0) & (z0 <= j0_f + i_all.astype(_F32))
  return i_all, j0, valid


def _entropy_one(hist, lo, hi, mn, mx, cfg: _Config):
  """The KL-optimal range (lo, hi) for one group's histogram."""
  b = hist.shape[-1]
  nq = cfg.num_levels
  cands = jnp.asarray(_entropy_candidates(b, nq, cfg.spec.calibration.num_candidates))
  w = _bin_width(lo, hi, b)
  z0 = jnp.where(w > 0, -lo / jnp.where(w > 0, w, 1.0), 0.0)  # position of 0, in bins
  i_all, j0_all, valid = _entropy_windows(hist, cands, z0, cfg.symmetric)
  kls = jax.vmap(lambda i, j0: _kl_for_window(hist, i, j0, nq))(i_all, j0_all)
  kls = jnp.where(valid, kls, jnp.inf)
  best = jnp.argmin(kls)
  i, j0 = i_all[best], j0_all[best]
  t_lo = lo + j0.astype(_F32) * w
  t_hi = lo + (j0 + i).astype(_F32) * w
  if cfg.symmetric:
    amax = jnp.maximum(jnp.abs(mn), jnp.abs(mx))
    return -jnp.minimum(t_hi, amax), jnp.minimum(t_hi, amax)
  return jnp.maximum(t_lo, mn), jnp.minimum(t_hi, mx)


# --------------------------------------------------------------------------
# The observer.
# --------------------------------------------------------------------------


def _spec_of(a) -> Optional[jax.sharding.PartitionSpec]:
  """The partition spec of an array (traced or not) or ShapeDtypeStruct, if it has one."""
  try:
    sh = jax.typeof(a).sharding if isinstance(a, jax.Array) else getattr(a, "sharding", None)
  except (TypeError, AttributeError):  # pragma: no cover - exotic inputs
    sh = None
  return getattr(sh, "spec", None)


def _follow(x, sshape, stats: _Stats) -> Optional[jax.sharding.PartitionSpec]:
  """Under explicit sharding: the spec of statistics that follow x's channel sharding."""
  if not _sharding.explicit_axes() or stats.tensor_scale or not sshape:
    return None
  xs = _spec_of(x)
  if xs is None or all(e is None for e in xs):
    return None
  try:
    return _sharding.scale_partition_spec(xs, tuple(x.shape), stats.shape_spec)
  except ValueError:
    return None  # cannot follow: replicated statistics are still correct


def _sharding_safe(fn, out_specs):
  """``fn`` as is, or under explicit sharding run in auto mode with outputs ``out_specs``.

  The observers reshape x into (groups, elements), which explicit sharding
  refuses for sharded axes; inside ``jax.sharding.auto_axes`` the compiler
  partitions the reductions itself (local statistics, then one small
  all-reduce), so statistics of a globally sharded batch are those of the
  whole batch, and the outputs keep the given shardings.
  """
  axes = _sharding.explicit_axes()
  if not axes:
    return fn
  specs = jax.tree.map(lambda p: jax.sharding.PartitionSpec() if p is None else p, out_specs,
                       is_leaf=lambda p: p is None or isinstance(p, jax.sharding.PartitionSpec))
  return jax.sharding.auto_axes(fn, axes=axes, out_sharding=specs)


def _check_state(state, keys) -> None:
  if not isinstance(state, Mapping) or set(state) != set(keys):
    got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
    raise ValueError(f"state: expected a dict with keys {sorted(keys)} (from this observer's "
                     f"init), got {got}")


def observer(spec: spec_lib.QuantSpec, *, axis_name: Any = None) -> Observer:
  r"""Builds the calibration observer that ``spec.calibration`` asks for.

  See the module docstring for the formulas of each method (absmax, minmax,
  ema, percentile, mse, entropy), the histogram growth rule and the
  documented results on degenerate input.

  State (all float32): ``count`` (finite values seen), ``min`` and ``max``
  (running, or EMA for ``ema``), each of the statistics shape
  ``spec.scale_shape(x.shape)`` (``()`` for nvfp4); histogram methods add
  ``hist`` of that shape plus ``(num_bins,)`` and the histogram range ``lo``,
  ``hi``. Shapes never change after ``init``.

  ``update`` and ``compute`` come wrapped in :func:`jax.jit` (compiled once
  per input shape; observers are cached per spec, and ``update`` is shared by
  all specs that gather the same statistics, e.g. absmax and minmax, or int4
  and int8) and can be called inside a jitted step as well.
  ``update`` accepts batches whose non-channel dimensions differ from the
  ``init`` example (per tensor: any shape; per channel: any shape with the
  same channel sizes; per block: the same block layout).

  Sharding: inside ``jit`` on globally sharded arrays (``jax.sharding``,
  auto or explicit axis types) the statistics are those of the whole global
  batch, with no code of ours communicating: the compiler reduces the
  per-device statistics. Under explicit sharding the state keeps the
  shardings it was given (``init`` of a channel-sharded array gives
  statistics sharded like its channels, otherwise replicated). Under
  ``shard_map``, where each device sees only its shard, pass ``axis_name``:
  ``update`` then reduces the batch statistics across that mesh axis
  (``psum`` of counts and histogram counts, ``pmin``/``pmax`` of the range)
  and every device holds the global state.

  Args:
    spec: the :class:`~jaxqat.core.QuantSpec`.
    axis_name: under ``shard_map``: the mesh axis name (or tuple of names)
      that shards the batch; statistics are reduced across it. None (the
      default): the batch is global (or unsharded).

  Returns:
    An :class:`Observer` ``(init, update, compute)``.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec; later, from ``init`` /
      ``update``, if ``x`` is not floating point.
    ValueError: for MX formats (nothing to calibrate), ``entropy`` with a
      float format, ``mse``/``entropy`` with nvfp4; later, from ``init`` /
      ``update``, if ``x`` does not fit the granularity or the state
      (different channel or block count).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, observer
    >>> obs = observer(QuantSpec(format="int8", symmetric=False, calibration="minmax"))
    >>> state = obs.init(jnp.zeros(4))
    >>> state = obs.update(state, jnp.array([0.5, 1.0, 2.0, 1.5]))
    >>> state = obs.update(state, jnp.array([-0.55, 0.0, 0.2, 0.3]))
    >>> scale, zero_point = obs.compute(state)  # range [-0.55, 2.0]
    >>> float(scale), float(zero_point)  # 2.55 / 255; round(-128 + 0.55 / 0.01)
    (0.01, -73.0)
  """
  return _build(_grid.check_spec(spec), axis_name)


@functools.lru_cache(maxsize=256)
def _stats_fns(stats: _Stats, axis_name: Any = None):
  """``init`` and jitted ``update`` for a statistics key (shared across specs)."""
  keys = stats.keys
  hist = stats.kind == "hist"

  def init(x) -> State:
    shape, _ = _input_info(x)
    s = _scale_shape(shape, stats)
    follow = _follow(x, s, stats)
    sh = None if follow is None else follow
    hsh = None if follow is None else jax.sharding.PartitionSpec(
        *(tuple(follow) + (None,) * (len(s) - len(follow)) + (None,)))
    state = {k: jnp.zeros(s, _F32, out_sharding=sh) for k in ("count", "min", "max")}
    if hist:
      state.update(hist=jnp.zeros(s + (stats.num_bins,), _F32, out_sharding=hsh),
                   lo=jnp.zeros(s, _F32, out_sharding=sh), hi=jnp.zeros(s, _F32, out_sharding=sh))
    return state

  def body(state: State, x: Array) -> State:
    sshape = state["count"].shape
    xg = _to_groups(x.astype(_F32), stats.granularity)
    flat = {k: v.reshape((-1,) + v.shape[len(sshape):]) for k, v in state.items()}
    fin, cnt, mn, mx = _batch_stats(xg, axis_name)
    decay = stats.ema_decay if stats.kind == "ema" else None
    new = _merge_range(flat, cnt, mn, mx, decay)
    if hist:
      new.update(_update_hist(flat, new, xg, fin, stats.hist_abs, stats.num_bins,
                              stats.skip_zeros, axis_name))
    return {k: new[k].reshape(state[k].shape).astype(_F32) for k in keys}

  def update(state: State, x: ArrayLike) -> State:
    _check_state(state, keys)
    _input_info(x)
    x = jnp.asarray(x)
    _check_compatible(state["count"].shape, x.shape, stats)
    out = {k: _spec_of(v) for k, v in state.items()}
    return _sharding_safe(body, out)(dict(state), x)

  return init, jax.jit(update)


@functools.lru_cache(maxsize=256)
def _build(spec: spec_lib.QuantSpec, axis_name: Any = None) -> Observer:
  """The observer of ``spec``; cached so that equal specs share compiled code."""
  cfg = _config(spec)
  cal = cfg.spec.calibration
  keys = cfg.stats.keys
  nbins = cal.num_bins
  init, update = _stats_fns(cfg.stats, axis_name)

  def compute(state: State) -> tuple[Array, Array]:
    _check_state(state, keys)
    out = _spec_of(state["count"])
    return _sharding_safe(body, (out, out))(dict(state))

  def body(state: State) -> tuple[Array, Array]:
    sshape = state["count"].shape
    flat = {k: v.reshape((-1,) + v.shape[len(sshape):]).astype(_F32) for k, v in state.items()}
    mn, mx = flat["min"], flat["max"]
    if cfg.method in ("absmax", "minmax", "ema"):
      scale, zp = _scale_zp(mn, mx, cfg)
    elif cfg.method == "percentile":
      p = cal.percentile
      h, hlo, hhi = flat["hist"], flat["lo"], flat["hi"]
      if cfg.symmetric:
        amax = jnp.maximum(jnp.abs(mn), jnp.abs(mx))
        a = _hist_quantile(h, hlo, hhi, jnp.zeros_like(amax), amax, p)
        scale, zp = _scale_zp(-a, a, cfg)
      else:
        lo = _hist_quantile(h, hlo, hhi, mn, mx, 100.0 - p)
        hi = _hist_quantile(h, hlo, hhi, mn, mx, p)
        scale, zp = _scale_zp(lo, hi, cfg)
    else:
      xs = (flat["hist"], flat["lo"], flat["hi"], mn, mx)
      if cfg.method == "mse":
        per = cal.num_candidates * nbins
        scales, zps = _mse_candidates(mn, mx, cfg)
        xs = (flat["hist"], flat["lo"], flat["hi"], scales, zps)
        scale, zp = _map_groups(functools.partial(_mse_one, cfg=cfg), xs, per)
      elif cfg.num_levels > nbins:
        scale, zp = _scale_zp(mn, mx, cfg)  # too few bins to merge into N_q levels
      else:
        per = len(_entropy_candidates(nbins, cfg.num_levels, cal.num_candidates)) * nbins
        per *= 1 if cfg.symmetric else 4
        lo, hi = _map_groups(functools.partial(_entropy_one, cfg=cfg), xs, per)
        scale, zp = _scale_zp(lo, hi, cfg)
    seen = flat["count"] > 0
    scale = jnp.where(seen, scale, 1.0).astype(_F32)
    zp = jnp.where(seen, zp, _fallback_zero_point(cfg)).astype(_F32)
    return scale.reshape(sshape), zp.reshape(sshape)

  return Observer(init, update, jax.jit(compute))


def calibrate(spec: spec_lib.QuantSpec, batches: Iterable[ArrayLike]) -> tuple[Array, Array]:
  """Runs the observer of ``spec`` over ``batches`` and returns its range.

  The state is initialized from the first batch; ``update`` and ``compute``
  are jitted (and cached per spec). See :func:`observer` for the methods and
  the shapes each batch may take.

  Args:
    spec: the :class:`~jaxqat.core.QuantSpec`.
    batches: an iterable (list, generator...) of floating point arrays. A
      single array is refused (wrap it in a list), since iterating over it
      would feed its rows one by one.

  Returns:
    ``(scale, zero_point)``: float32 arrays of shape
    ``spec.scale_shape(batch.shape)`` (``()`` for the nvfp4 tensor scale);
    ``zero_point`` holds integers (zeros when symmetric).

  Raises:
    TypeError: if ``batches`` is a single array or not iterable, or a batch is
      not floating point.
    ValueError: if ``batches`` is empty, a batch does not fit the first one's
      channel/block layout, or as :func:`observer`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import PerChannel, QuantSpec, calibrate
    >>> spec = QuantSpec(format="int4", granularity=PerChannel(-1))
    >>> batches = [jnp.array([[1.4, -0.7], [0.0, 1.75]]), jnp.array([[-3.5, 0.1]])]
    >>> scale, zero_point = calibrate(spec, batches)  # amax 3.5 and 1.75, qmax 7
    >>> scale
    Array([[0.5 , 0.25]], dtype=float32)
    >>> calibrate(spec, [])
    Traceback (most recent call last):
    ...
    ValueError: batches: empty; calibrate needs at least one array
  """
  init, update, compute = observer(spec)
  if hasattr(batches, "shape") and hasattr(batches, "dtype"):
    raise TypeError(f"batches: expected an iterable of arrays (e.g. a list), got a single array of "
                    f"shape {tuple(batches.shape)}; pass [x] to calibrate on one batch")
  try:
    it = iter(batches)
  except TypeError:
    raise TypeError(f"batches: expected an iterable of arrays, got "
                    f"{type(batches).__name__}") from None
  state = None
  for i, b in enumerate(it):
    _input_info(b, f"batches[{i}]")
    b = jnp.asarray(b)
    if state is None:
      state = init(b)
    try:
      state = update(state, b)
    except ValueError as e:
      raise ValueError(f"batches[{i}]: {e}") from None
  if state is None:
    raise ValueError("batches: empty; calibrate needs at least one array")
  return compute(state)


def weight_range(w: ArrayLike, spec: spec_lib.QuantSpec, *,
                 axis_name: Any = None) -> tuple[Array, Array]:
  """The range of one tensor by ``spec``'s calibration method, traceable.

  What every front end uses for a fixed-range (``learning="fixed"``) weight
  during QAT: the range is recomputed from the current weight at every step
  (no gradient flows through it), until the model is frozen. Equivalent to
  ``calibrate(spec, [w])`` but usable inside ``jit``/``grad``/``vmap``.

  Under explicit sharding the range of a channel-sharded weight is sharded
  like its channels (each device reduces its own columns: no gather of the
  weight).

  Args:
    w: the weight (floating point).
    spec: its :class:`~jaxqat.core.QuantSpec` (granularity resolved).
    axis_name: under ``shard_map``, the mesh axis (or axes) that shards the
      weight's *reduced* axes (FSDP); the range is reduced across it. Not for
      an axis that shards the channels (each device has its channels whole).

  Returns:
    ``(scale, zero_point)`` of shape ``spec.scale_shape(w.shape)``, float32.

  Raises:
    ValueError: as :func:`observer`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxqat.core import PerChannel, QuantSpec
    >>> spec = QuantSpec(format="int4", granularity=PerChannel(-1))
    >>> jax.jit(weight_range, static_argnums=1)(jnp.array([[1.4, -0.7], [-3.5, 1.75]]), spec)[0]
    Array([[0.5 , 0.25]], dtype=float32)
  """
  w = jax.lax.stop_gradient(jnp.asarray(w))
  cfg = _config(spec)
  if cfg.method in ("absmax", "minmax") and not spec.is_block and jnp.issubdtype(
      w.dtype, jnp.floating):
    return _direct_range(w, cfg, axis_name)
  init, update, compute = observer(spec, axis_name=axis_name)
  return compute(update(init(w), w))


def _finite_reduce(w: Array, plain: Callable, masked: Callable) -> tuple:
  """Reductions of ``w`` over its finite entries: ``plain(w)`` when that is finite.

  ``plain`` reduces ``w`` directly, ``masked`` reduces it with the non-finite
  entries replaced (given ``isfinite(w)``); both give the same values when
  every entry is finite, which the (small) results of ``plain`` tell. The
  masked form only runs, through ``lax.cond``, when a reduced value is NaN or
  infinite: XLA:CPU writes a masked copy of ``w`` before reducing it, which
  made the per-step weight range of a QAT step about 2-5x slower than a plain
  reduction (issue 12).
  """
  fast = plain(w)
  ok = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(r)) for r in fast])
  return jax.lax.cond(ok, lambda: fast, lambda: masked(w, jnp.isfinite(w)))


def _direct_range(w: Array, cfg: _Config, axis_name) -> tuple[Array, Array]:
  """absmax/minmax of one tensor by plain reductions over its reduced axes.

  The same (scale, zero point) as the observer's ``compute(update(init(w), w))``
  (its count, transposes and min/max state are not needed for a single
  tensor): a QAT step that recomputes weight ranges keeps nothing but the
  reduced values.
  """
  spec = cfg.spec
  shape = spec.scale_shape(w.shape)
  axes = _grid.reduce_axes(w.shape, spec)
  if cfg.symmetric:
    amax = _finite_reduce(w, lambda v: (jnp.max(jnp.abs(v), axis=axes, keepdims=True),),
                          lambda v, fin: (jnp.max(jnp.where(fin, jnp.abs(v), 0), axis=axes,
                                                  keepdims=True),))[0].astype(_F32)
    if axis_name is not None:
      amax = jax.lax.pmax(amax, axis_name)
    scale, zp = _scale_zp(-amax, amax, cfg)
  else:
    mn, mx = _finite_reduce(
        w,
        lambda v: (jnp.min(v, axis=axes, keepdims=True), jnp.max(v, axis=axes, keepdims=True)),
        lambda v, fin: (jnp.min(jnp.where(fin, v, jnp.inf), axis=axes, keepdims=True),
                        jnp.max(jnp.where(fin, v, -jnp.inf), axis=axes, keepdims=True)))
    mn, mx = mn.astype(_F32), mx.astype(_F32)
    if axis_name is not None:
      mn = jax.lax.pmin(mn, axis_name)
      mx = jax.lax.pmax(mx, axis_name)
    scale, zp = _scale_zp(mn, mx, cfg)
  return scale.reshape(shape), zp.reshape(shape)
