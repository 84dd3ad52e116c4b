"""Shared numerics: rounding onto a grid, scale layouts, reductions.

Private helpers used by the fake-quant primitives, real quantization and
calibration, so that every path rounds the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxqat.core import _formats as formats_lib
from jaxqat.core import _spec as spec_lib

# Scales below this are clamped in the forward pass so that x / s stays finite.
SCALE_EPS = 1e-12


def scaled(x: jax.Array, s: jax.Array) -> jax.Array:
  """``x / s`` for a scale ``s`` that broadcasts against ``x``, as ``x * (1 / s)``.

  XLA rewrites a division by a broadcast into a multiplication by the
  reciprocal, so a compiled program computes ``x * (1 / s)``, while the same
  division run op by op (eager, outside ``jit``) is exact; the two differ by
  an ulp, which moves ``x / s`` across a rounding tie now and then (one code
  apart; 73 of 750 near-tie inputs of an int8 range). Written out, the
  quotient is the same eager and compiled, in the fake-quant model, the
  served model and its integer path.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(scaled(jnp.float32(3.0), jnp.float32(0.5)))
    6.0
  """
  return x * (1 / s)


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for 16-bit floats, the dtype itself for float32/float64."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def check_float_input(x, name: str = "x") -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating point array, got dtype {x.dtype}")
  return x


def check_spec(spec) -> spec_lib.QuantSpec:
  if not isinstance(spec, spec_lib.QuantSpec):
    raise TypeError(f"spec: expected a jaxqat QuantSpec, got {type(spec).__name__}")
  if spec.is_output_channel:
    raise ValueError(spec_lib._UNRESOLVED)  # pylint: disable=protected-access
  return spec


def is_traced(v) -> bool:
  """Whether ``v`` is an abstract value inside a JAX transformation."""
  return isinstance(v, jax.core.Tracer)


def check_finite(v, name: str) -> None:
  """Refuses a concrete array holding NaN or +-inf; traced values pass unchecked."""
  if is_traced(v):
    return
  a = np.asarray(v)
  if a.size and not np.isfinite(a).all():
    bad = a[~np.isfinite(a)].ravel()[0]
    raise ValueError(f"{name}: must be finite, got {bad} (a non-finite {name} would make every "
                     "output NaN)")


def check_zero_point(zp, fmt, name: str = "zero_point") -> None:
  """Refuses a concrete zero point that is not an integer in ``[qmin, qmax]``."""
  if is_traced(zp):
    return
  a = np.asarray(zp, np.float64)
  bad = ~np.isfinite(a) | (a != np.round(a)) | (a < fmt.qmin) | (a > fmt.qmax)
  if bad.any():
    raise ValueError(f"{name}: must hold integers in [{fmt.qmin}, {fmt.qmax}] (the {fmt.name} "
                     f"range), got {a[bad].ravel()[0]}")


def div_exact(a: jax.Array, c) -> jax.Array:
  """``a / c`` for a scalar ``c``, correctly rounded under ``jit`` as well.

  XLA rewrites a division by a constant into a multiplication by its
  (rounded) reciprocal, which can be one ulp off ``a / c``; a divisor behind
  an optimization barrier is not a constant. (A division by a *broadcast*
  scalar is rewritten all the same, so ``a`` should be a scalar or small.)
  """
  return a / jax.lax.optimization_barrier(jnp.full(jnp.shape(a), c, a.dtype))


def round_half_even(v: jax.Array) -> jax.Array:
  return jnp.round(v)  # jnp.round rounds half to even


def float_round_reference(v: jax.Array, fmt: formats_lib.FloatFormat) -> jax.Array:
  """:func:`float_round` written the direct way, with ``frexp`` and ``ldexp``.

  The spacing near ``|v|`` is ``2^(max(floor(log2|v|), emin) - mbits)``;
  rounding is to nearest, ties to even. ``frexp`` makes powers of two exact.
  Slower (XLA:CPU computes ``frexp``/``ldexp`` per element); kept as the
  reference the fast path is tested against, bit for bit.
  """
  _, e = jnp.frexp(v)  # v = m * 2^e, 0.5 <= |m| < 1  => floor(log2|v|) = e - 1
  e = jnp.maximum(e - 1, fmt.emin)
  step = jnp.ldexp(jnp.ones_like(v), e - fmt.mbits)
  return jnp.round(v / step) * step


_UINT = {4: jnp.uint32, 8: jnp.uint64}


def float_round(v: jax.Array, fmt: formats_lib.FloatFormat) -> jax.Array:
  """Rounds ``v`` (already inside ``[-max, max]``) onto ``fmt``'s grid.

  Round to nearest, ties to even, in the dtype of ``v`` (float32 or float64),
  bit-identical to :func:`float_round_reference` (and to converting to the
  ml_dtypes type, where one exists), with one float addition doing the
  rounding (the "magic number" method): near ``|v|`` the grid spacing is
  ``u = 2^(max(e, emin) - mbits)``, ``e`` the binary exponent of ``v``. The
  constant ``c = 1.5 * 2^p * u`` (``p`` = the dtype's significand bits, 23
  for float32) has spacing ``u`` in its binade, and ``v + c`` stays in that
  binade (``|v| < 2u * 2^mbits <= 0.5 * 2^p * u``), so the float addition
  rounds ``v`` to a multiple of ``u``, to nearest with ties to even (``c /
  u`` is even), exactly once; subtracting ``c`` again is exact. ``c`` is
  built from ``v``'s exponent bits (an integer max and add), so the format's
  normal and subnormal ranges take the same path, with no ``frexp`` and no
  select. A result of zero takes ``v``'s sign back (``-0`` as the
  reference); NaN stays NaN.

  XLA:CPU's own ``f32 -> f8`` conversions round the same way but are emitted
  per element and were measured slower than this (issue 12).
  """
  dtype = jnp.dtype(v.dtype)
  if dtype.itemsize not in _UINT or not jnp.issubdtype(dtype, jnp.floating):
    return float_round_reference(v, fmt)
  uint = _UINT[dtype.itemsize]
  nbits = 8 * dtype.itemsize
  nmant = jnp.finfo(dtype).nmant
  bias = (1 << (nbits - nmant - 2)) - 1  # the dtype's exponent bias
  exp_mask = ((1 << (nbits - 1)) - 1) ^ ((1 << nmant) - 1)
  bits = jax.lax.bitcast_convert_type(v, uint)
  e = jnp.maximum(bits & uint(exp_mask), uint((fmt.emin + bias) << nmant))
  # c = 1.5 * 2^(e + nmant - mbits): the exponent moved up by nmant - mbits, the top mantissa bit set.
  c = jax.lax.bitcast_convert_type(e + uint(((nmant - fmt.mbits) << nmant) | (1 << (nmant - 1))),
                                   dtype)
  r = (v + c) - c
  sign = bits & uint(1 << (nbits - 1))
  return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(r, uint) | sign, dtype)


def grid_round(v: jax.Array, fmt, noise=None) -> jax.Array:
  """Rounds onto an integer grid (half to even, or stochastic) or a float grid."""
  if isinstance(fmt, formats_lib.IntFormat):
    if noise is not None:
      return jnp.floor(v + noise.astype(v.dtype))
    return round_half_even(v)
  return float_round(v, fmt)


def blocked_shape(shape, granularity):
  """Input shape with the block axis split into (num_blocks, block_size)."""
  axis = granularity.axis % len(shape)
  return shape[:axis] + (shape[axis] // granularity.size, granularity.size) + shape[axis + 1:]


def to_layout(x: jax.Array, spec: spec_lib.QuantSpec) -> jax.Array:
  """Reshapes x so that a scale in "broadcast layout" broadcasts against it."""
  if isinstance(spec.granularity, spec_lib.PerBlock):
    spec.scale_shape(x.shape)  # validates axis and divisibility
    return x.reshape(blocked_shape(x.shape, spec.granularity))
  return x


def scale_to_layout(scale: jax.Array, x_shape, spec: spec_lib.QuantSpec) -> jax.Array:
  """Reshapes a scale in the public layout (see spec) to the broadcast layout."""
  g = spec.granularity
  if isinstance(g, spec_lib.PerBlock):
    axis = g.axis % len(x_shape)
    return jnp.expand_dims(scale, axis + 1)
  return scale


def scale_from_layout(scale: jax.Array, x_shape, spec: spec_lib.QuantSpec) -> jax.Array:
  g = spec.granularity
  if isinstance(g, spec_lib.PerBlock):
    axis = g.axis % len(x_shape)
    return jnp.squeeze(scale, axis + 1)
  return scale


def check_scale(scale, x_shape, spec: spec_lib.QuantSpec, name: str = "scale") -> jax.Array:
  """Validates and reshapes a scale (or zero point) to the public scale shape."""
  scale = jnp.asarray(scale)
  want = spec.scale_shape(x_shape)
  if scale.shape == want:
    return scale
  if want == () and scale.size == 1:
    return scale.reshape(())
  if isinstance(spec.granularity, spec_lib.PerChannel) and scale.size == math.prod(want):
    # Accept the channel sizes without the broadcast ones, e.g. (C,) for (1, C).
    squeezed = tuple(d for d, full in zip(want, x_shape) if d != 1 or full == 1)
    if scale.shape in (squeezed, tuple(d for d in want if d != 1)):
      return scale.reshape(want)
  raise ValueError(f"{name}: shape {scale.shape} does not fit {spec.granularity} for an input of "
                   f"shape {tuple(x_shape)}; expected {want}")


def reduce_axes(x_shape, spec: spec_lib.QuantSpec) -> tuple[int, ...]:
  """Axes of the (layout-reshaped) input reduced to reach one value per scale."""
  g = spec.granularity
  nd = len(x_shape)
  if isinstance(g, spec_lib.PerTensor):
    return tuple(range(nd))
  if isinstance(g, spec_lib.PerChannel):
    keep = spec_lib.normalize_axes(g.axes, nd, "granularity.axis")
    return tuple(i for i in range(nd) if i not in keep)
  # Blocked layout: the within-block axis sits right after the block axis.
  axis = g.axis % (nd - 1)
  return (axis + 1,)


def qrange(fmt) -> tuple[float, float]:
  return fmt.qmin, fmt.qmax


def exp2_int(e: jax.Array, dtype) -> jax.Array:
  """2**e for integer-valued e, exactly."""
  return jnp.ldexp(jnp.ones(e.shape, dtype), e.astype(jnp.int32))


def as_np_dtype(fmt) -> np.dtype:
  return np.dtype(fmt.dtype)
