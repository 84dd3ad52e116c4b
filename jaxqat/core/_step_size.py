"""Learned step sizes stay positive by construction: the log parameterisation.

LSQ (Esser et al. 2020) learns the step size ``s`` by gradient descent. Stored
as ``s`` itself, an optimizer step can take it to zero or below (a clamp in
the forward pass does not stop the stored value from going negative, and the
channel then outputs zeros). Every jaxqat front end therefore stores a learned
step size as its logarithm, the variable ``log_scale`` (``θ = log s``), and
computes ``s = exp(θ)`` in the forward pass, as TQT (Jain et al. 2020,
"Trained quantization thresholds") trains its thresholds in the log domain.
Whatever update an optimizer applies to ``θ``, ``s`` stays positive; the
gradient reaching ``θ`` is ``s · ∂L/∂s`` (chain rule), with ``∂L/∂s`` the LSQ
gradient of :func:`jaxqat.core.lsq_fake_quant`.

``θ`` is clipped to ``[log STEP_SIZE_MIN, log STEP_SIZE_MAX]`` before the
exponential, so that ``s`` is a normal float32 and never underflows to 0 or
overflows to inf.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxqat.core._typing import Array, ArrayLike

__all__ = ["STEP_SIZE_MIN", "STEP_SIZE_MAX", "REL_STEP_FLOOR", "ACT_STEP_FLOOR", "init_step_size",
           "step_size_to_param", "param_to_step_size"]

STEP_SIZE_MIN = 1e-12
STEP_SIZE_MAX = 1e12
# Initial learned step sizes are floored (see init_step_size).
REL_STEP_FLOOR = 1e-3
ACT_STEP_FLOOR = 1e-6
_LOG_MIN = math.log(STEP_SIZE_MIN)
_LOG_MAX = math.log(STEP_SIZE_MAX)


def _key(t: Array) -> Array:
  """float32 -> int32 keys ordered like the floats (``-0`` and ``+0`` share 0)."""
  i = jax.lax.bitcast_convert_type(t, jnp.int32)
  return jnp.where(i < 0, -(i & jnp.int32(0x7FFFFFFF)), i)


def _unkey(k: Array) -> Array:
  i = jnp.where(k < 0, (-k) | jnp.int32(-(2**31)), k)
  return jax.lax.bitcast_convert_type(i, jnp.float32)


def _exact_log(s: Array) -> Array:
  """A float32 ``θ`` with ``param_to_step_size(θ) == s`` where one exists.

  ``log(s)`` alone is not enough: float32 ``log`` and ``exp`` each round, so
  ``exp(log(s))`` misses ``s`` by an ulp for about 0.1% of the step sizes an
  ``exp`` produced (and for most other floats, which no float32 ``θ`` reaches
  once ``|θ| > 1``, where ``θ``'s spacing is coarser than ``s``'s).
  Every ``θ`` the forward map sends to ``s`` lies within ``2^-22`` of
  ``log s`` (XLA's float32 ``exp`` is faithful: measured below 1 ulp), and
  ``θ0 = log(s)`` within a few ulp of ``log s``; so the bracket
  ``[θ0 - δ, θ0 + δ]``, ``δ = 2^-20 + 4 ulp(θ0)``, holds them all. The map is
  monotone, so bisection over the bracket's float32 values (fewer than
  ``2^31``, ordered by their bit patterns: 32 halvings, a fixed loop that
  always terminates) finds the smallest ``θ`` with ``exp(θ) >= s``; that or
  its predecessor maps to ``s`` if anything does. Of ``θ0`` and those two, the
  first that maps to ``s`` exactly is kept, else the closest (for ``s``
  outside the map's image the result is never worse than ``log(s)``).
  """
  t0 = jnp.log(s)
  delta = jnp.float32(2.0**-20) + 4 * (jnp.nextafter(jnp.abs(t0), jnp.float32(jnp.inf)) -
                                       jnp.abs(t0))
  lo = _key(t0 - delta)
  hi = _key(t0 + delta)

  def halve(_, bounds):  # keeps f(lo) < s <= f(hi) where it held on entry
    lo, hi = bounds
    gap = jax.lax.bitcast_convert_type(hi - lo, jnp.uint32)  # hi >= lo; wraps correctly
    mid = lo + jax.lax.bitcast_convert_type(gap >> 1, jnp.int32)
    below = param_to_step_size(_unkey(mid)) < s
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  best = t0
  err = jnp.abs(param_to_step_size(t0) - s)
  for k in (hi, lo):
    t = _unkey(k)
    e = jnp.abs(param_to_step_size(t) - s)
    take = e < err
    best, err = jnp.where(take, t, best), jnp.where(take, e, err)
  return best


def step_size_to_param(step_size: ArrayLike) -> Array:
  """The stored parameter ``θ = log s`` of a step size ``s``, exact on the way back.

  ``θ`` is chosen so that :func:`param_to_step_size` gives back ``s`` bit for
  bit wherever some float32 ``θ`` does -- in particular for every ``s`` that
  :func:`param_to_step_size` produced, so a learned step size survives
  state -> encodings -> state unchanged -- and the closest otherwise. (A
  plain ``log`` misses by an ulp for about 0.1% of them.) Traceable; its
  gradient is that of ``log``.

  Args:
    step_size: positive step sizes (values below :data:`STEP_SIZE_MIN` are
      raised to it).

  Returns:
    ``log(max(s, STEP_SIZE_MIN))`` in float32, corrected by a few ulp where
    needed.

  Raises:
    ValueError: if a concrete ``step_size`` holds NaN, inf or a value <= 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(param_to_step_size(step_size_to_param(jnp.float32(0.25))))
    0.25
    >>> s = jnp.float32(0.1595161)  # exp(log(s)) misses s by one ulp
    >>> bool(jnp.exp(jnp.log(s)) == s), bool(param_to_step_size(step_size_to_param(s)) == s)
    (False, True)
    >>> step_size_to_param(jnp.array([0.1, -1.0]))
    Traceback (most recent call last):
    ...
    ValueError: step_size: must be finite and > 0, got min -1.0
  """
  s = jnp.asarray(step_size, jnp.float32)
  try:
    ok = bool(jnp.all(jnp.isfinite(s) & (s > 0)))
  except Exception:  # traced: cannot check, documented behaviour (clamp)  # pylint: disable=broad-except
    ok = True
  if not ok:
    raise ValueError(f"step_size: must be finite and > 0, got min {float(jnp.nanmin(s))}"
                     if bool(jnp.any(~jnp.isnan(s))) else "step_size: must be finite and > 0, got NaN")
  s = jnp.maximum(s, STEP_SIZE_MIN)
  t0 = jnp.log(s)  # zero in value, carries the gradient of log
  return _exact_log_jit(jax.lax.stop_gradient(s)) + (t0 - jax.lax.stop_gradient(t0))


def param_to_step_size(param: ArrayLike) -> Array:
  """The step size ``s = exp(clip(θ))`` of a stored parameter ``θ``.

  Differentiable: ``∂s/∂θ = s`` inside the clipping range, 0 outside.

  Args:
    param: the stored ``log_scale`` parameter.

  Returns:
    ``s``, positive and finite, in ``param``'s dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> float(param_to_step_size(jnp.float32(-1e9)))  # never 0
    1e-12
    >>> float(jax.grad(param_to_step_size)(jnp.log(jnp.float32(2.0))))
    2.0
  """
  p = jnp.asarray(param)
  return jnp.exp(jnp.clip(p, _LOG_MIN, _LOG_MAX))


_exact_log_jit = jax.jit(_exact_log)


def init_step_size(step_size: ArrayLike, role: str = "act") -> Array:
  """The initial learned (LSQ) step size for a calibrated step size.

  A calibrated range of about 0 (activations calibrated on near-zero inputs,
  a dead channel) gives a step size of 1e-8 or less, which the first updates
  on real data cannot recover from. Every front end therefore starts a
  learned step size at no less than :data:`REL_STEP_FLOOR` (1e-3) times the
  largest step size of the same tensor, and, for activations, no less than
  :data:`ACT_STEP_FLOOR` (1e-6). Traceable.

  Args:
    step_size: the calibrated step sizes (positive).
    role: ``"act"`` or ``"weight"``.

  Returns:
    The floored step sizes, float32, same shape.

  Raises:
    ValueError: if ``role`` is not ``"act"`` or ``"weight"``.

  Examples:
    >>> init_step_size([1e-9, 0.5, 0.2]).tolist()
    [0.0005000000237487257, 0.5, 0.20000000298023224]
    >>> float(init_step_size(1e-9))
    1e-06
    >>> float(init_step_size(1e-9, "weight"))
    1e-09
  """
  if role not in ("act", "weight"):
    raise ValueError(f"role: must be 'act' or 'weight', got {role!r}")
  s = jnp.asarray(step_size, jnp.float32)
  floor = jnp.float32(REL_STEP_FLOOR) * jnp.max(s) if s.size else jnp.float32(0.0)
  if role == "act":
    floor = jnp.maximum(floor, jnp.float32(ACT_STEP_FLOOR))
  return jnp.maximum(s, floor)
