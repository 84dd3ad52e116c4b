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


def step_size_to_param(step_size: ArrayLike) -> Array:
  """The stored parameter ``θ = log s`` of a step size ``s``.

  Args:
    step_size: positive step sizes (values below :data:`STEP_SIZE_MIN` are
      raised to it).

  Returns:
    ``log(max(s, STEP_SIZE_MIN))`` in float32.

  Raises:
    ValueError: if a concrete ``step_size`` holds NaN, inf or a value <= 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(param_to_step_size(step_size_to_param(jnp.float32(0.25))))
    0.25
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
  return jnp.log(jnp.maximum(s, STEP_SIZE_MIN))


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
