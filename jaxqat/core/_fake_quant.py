"""Fake quantization (quantize then dequantize) with straight-through gradients.

Every primitive here is a :func:`jax.custom_jvp` with a *linear* tangent
rule, the straight-through estimator (STE); reverse mode is the transpose of
that rule, so ``grad``, ``jvp``/``jacfwd`` and higher derivatives (a
Hessian) all follow the STE. The forward pass is the exact arithmetic of
:func:`jaxqat.core.quantize` followed by :func:`jaxqat.core.dequantize`:
clip to the grid's range, round half to even, scale back.

Gradient convention ("textbook STE"): the gradient that reaches ``x`` is the
incoming gradient masked to zero where clipping changed ``x``'s value. For
integer grids that is where the *rounded* code ``round(x / s) + z`` falls
outside ``[qmin, qmax]`` (the rule of PyTorch's fake-quantize operators): a
value that rounds onto ``qmin`` or ``qmax`` -- such as a channel's absolute
maximum ``amax`` with ``s = amax / qmax``, where ``x / s`` may come out a few
ulp above ``qmax`` -- is not clipped and passes the gradient; LSQ's step-size
derivative there is the inside one, ``round(u) - u``. For float grids the
mask is ``|x / s| <= max``. The same rule holds in every primitive, NaN
included: a NaN element passes no gradient to ``x`` (and counts as clipped
for an LSQ+ offset). A layer
computing
``x @ fake_quant(w)`` therefore back-propagates ``g @ w_q^T`` to ``x`` -- the
*quantized* operand -- and ``x^T g`` masked by the clip range to ``w``.

Integer grid, for a step size ``s > 0`` and integer zero point ``z``
(``x ~= s * (q - z)``)::

    q = clip(round_half_even(x / s) + z, qmin, qmax)
    fake_quant(x) = s * (q - z)

computed as ``s * clip(round_half_even(x / s), qmin - z, qmax - z)``, the
same value with two operations fewer per element (an element that rounds to
zero from below gives ``-0``).

Float grids (fp8/fp6/fp4) replace the integer rounding with rounding onto the
minifloat grid after clipping ``x / s`` to ``[-max, max]``. Block formats
derive one scale per block from the block's absolute maximum.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxqat.core import _grid
from jaxqat.core import _formats as formats_lib
from jaxqat.core import _spec as spec_lib
from jaxqat.core._typing import Array, ArrayLike

__all__ = [
    "fake_quant",
    "lsq_fake_quant",
    "block_fake_quant",
    "block_scales",
    "lsq_grad_scale",
    "quant_dequant",
]


# --------------------------------------------------------------------------
# Fixed-range fake quant (integer and float grids), clipped STE.
# --------------------------------------------------------------------------


def _fq_forward(x, scale, zero_point, noise, fmt):
  """``(y, inside)``: the fake-quantized ``x`` and where clipping left it unchanged.

  ``inside`` is one comparison, ``clip(c) == c`` for the rounded (or
  scaled) value ``c``: the same mask as ``qmin <= c + z <= qmax`` (false for
  NaN). Integer grids clip in code space shifted by ``z`` (see
  ``_lsq_forward``); ``zero_point=None`` means 0 and skips it.
  """
  cdt = _grid.compute_dtype(x.dtype)
  x32 = x.astype(cdt)
  s = jnp.maximum(scale.astype(cdt), _grid.SCALE_EPS)
  v = _grid.scaled(x32, s)
  if isinstance(fmt, formats_lib.IntFormat):
    r = _grid.grid_round(v, fmt, noise)
    if zero_point is None:
      qs = jnp.clip(r, fmt.qmin, fmt.qmax)
    else:  # clip(r + z, qmin, qmax) - z, exactly (see _lsq_forward)
      z = zero_point.astype(cdt)
      qs = jnp.clip(r, fmt.qmin - z, fmt.qmax - z)
    y = qs * s
    inside = qs == r  # clipping did not change the code
  else:
    vc = jnp.clip(v, -fmt.max, fmt.max)
    y = _grid.float_round(vc, fmt) * s
    inside = vc == v
  return y.astype(x.dtype), inside


def _masked(inside, x_dot):
  """``where(inside, x_dot, 0)``: the STE tangent (and, transposed, gradient)."""
  return jnp.where(inside, x_dot, jnp.zeros((), x_dot.dtype))


# The masked tangent under ``jax.checkpoint``: reverse mode keeps the boolean
# mask as its only residual (a zero array built outside would be kept as a
# float copy of the input's size).
_masked_tangent = jax.checkpoint(_masked, policy=jax.checkpoint_policies.nothing_saveable)


def _mask_tangent(inside):
  """The (symbolic zero) tangent of a boolean output."""
  return np.zeros(inside.shape, jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _fake_quant_masked(x, scale, zero_point, noise, fmt):
  """``(y, inside)``, both from one evaluation of the forward arithmetic."""
  return _fq_forward(x, scale, zero_point, noise, fmt)


@_fake_quant_masked.defjvp
def _fake_quant_jvp(fmt, primals, tangents):
  """Linear STE tangent; reverse mode is its transpose, ``where(inside, g, 0)``.

  The primal outputs come from ``_fake_quant_masked`` itself, so that
  higher-order derivatives use this rule again (a Hessian sees the STE, not
  the zero derivative of ``round``); the mask comes with the output, so that
  a recomputed forward pass (``jaxqat.core.qat_op``'s backward) divides and
  rounds once, not twice.
  """
  x, scale, zero_point, noise = primals
  y, inside = _fake_quant_masked(x, scale, zero_point, noise, fmt)
  return (y, inside), (_masked_tangent(inside, tangents[0]), _mask_tangent(inside))


def _fake_quant(x, scale, zero_point, noise, fmt):
  return _fake_quant_masked(x, scale, zero_point, noise, fmt)[0]


# Jitted entry points: eager calls compile one program instead of one per op.
_fake_quant_jit = jax.jit(_fake_quant, static_argnums=(4,))


def _noise(key, x, spec):
  if spec.rounding != "stochastic":
    return None
  if key is None:
    raise ValueError("key: QuantSpec.rounding='stochastic' needs a PRNG key, got None")
  return jax.random.uniform(key, x.shape, _grid.compute_dtype(x.dtype))


def fake_quant(
    x: ArrayLike,
    scale: Optional[ArrayLike],
    zero_point: Optional[ArrayLike] = None,
    spec: spec_lib.QuantSpec = spec_lib.QuantSpec(),
    *,
    key: Optional[jax.Array] = None,
) -> Array:
  r"""Quantizes and dequantizes ``x`` with a fixed range; STE backward.

  Forward, integer formats: :math:`q = \mathrm{clip}(\lfloor x/s \rceil + z,
  q_{min}, q_{max})`, output :math:`s (q - z)`, where :math:`\lfloor\cdot\rceil`
  rounds half to even (or stochastically). Float formats: output
  :math:`s\,\mathrm{round}_{fmt}(\mathrm{clip}(x/s, -max, max))`. Block formats
  are delegated to :func:`block_fake_quant` (``scale`` is then the optional
  NVFP4 tensor scale).

  Backward (clipped straight-through estimator):

  .. math::
     \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}
       \cdot \mathbb{1}[q_{min} - z \le x/s \le q_{max} - z]

  The range is inclusive: an element landing exactly on :math:`q_{min}` or
  :math:`q_{max}` passes the gradient. ``scale`` and ``zero_point`` receive
  zero gradients (use :func:`lsq_fake_quant` to learn them). The tangent
  (``jax.jvp``) is the same mask times the input tangent, so a second
  derivative follows the STE too (``jax.hessian`` of ``sum(y**2)`` is
  ``2 * mask`` on the diagonal). Scales below ``1e-12`` are clamped.

  Concrete arguments are validated: a NaN or infinite ``scale``, or a
  ``zero_point`` that is not an integer in ``[qmin, qmax]``, is an error.
  Traced values (inside ``jit``/``grad``/``vmap``) cannot be checked: there a
  non-finite scale gives NaN outputs and an out-of-range zero point clips
  every code.

  Args:
    x: a floating point array (float32, bfloat16, float16 or float64).
    scale: the step size ``s``, of shape ``spec.scale_shape(x.shape)``
      (per channel a 1-D array of the channel count is accepted too).
    zero_point: the integer zero point ``z`` (same shape as ``scale``; float
      or int dtype holding integers), or ``None`` for 0. Must be ``None`` for
      float formats.
    spec: the :class:`~jaxqat.core.QuantSpec`.
    key: a PRNG key, needed only when ``spec.rounding == "stochastic"``.

  Returns:
    An array of ``x``'s shape and dtype.

  Raises:
    TypeError: if ``x`` is not floating point or ``spec`` is not a QuantSpec.
    ValueError: if ``scale`` / ``zero_point`` have the wrong shape, a concrete
      ``scale`` is NaN or infinite, a concrete ``zero_point`` is not an
      integer in ``[qmin, qmax]``, an axis is out of range, a block size does
      not divide its axis, a float format is given a zero point, or
      stochastic rounding has no key.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, fake_quant
    >>> x = jnp.array([-1.3, 0.26, 0.5, 2.0])
    >>> fake_quant(x, 0.5, spec=QuantSpec(format="int4"))
    Array([-1.5,  0.5,  0.5,  2. ], dtype=float32)
    >>> fake_quant(x, 0.1, spec=QuantSpec(format="int4"))  # clipped to [-0.8, 0.7]
    Array([-0.8,  0.3,  0.5,  0.7], dtype=float32)
  """
  x = _grid.check_float_input(x)
  spec = _grid.check_spec(spec)
  if spec.is_block:
    if zero_point is not None:
      raise ValueError(f"zero_point: block format {spec.format.name} takes no zero point")
    return block_fake_quant(x, spec, tensor_scale=scale)
  if scale is None:
    raise ValueError("scale: a step size is required for integer and float formats, got None")
  scale = _grid.check_scale(scale, x.shape, spec)
  _grid.check_finite(scale, "scale")
  zl = None  # no zero point: 0, and no arithmetic for it
  if zero_point is not None:
    if not spec.is_int:
      raise ValueError(f"zero_point: float format {spec.format.name} is symmetric; pass None")
    zp = _grid.check_scale(zero_point, x.shape, spec, "zero_point")
    _grid.check_zero_point(zp, spec.format)
    zl = _grid.scale_to_layout(zp, x.shape, spec) if zp.ndim else zp
  xl = _grid.to_layout(x, spec)
  s = _grid.scale_to_layout(scale, x.shape, spec)
  noise = _noise(key, xl, spec)
  y = _fake_quant_jit(xl, s, zl, noise, spec.format)
  return y.reshape(x.shape)


# --------------------------------------------------------------------------
# LSQ / LSQ+ : learned step size (and offset).
# --------------------------------------------------------------------------


def lsq_grad_scale(num_elements: int, qmax: float) -> float:
  r"""The LSQ gradient scale :math:`g = 1/\sqrt{N Q_p}` (Esser et al. 2020).

  Args:
    num_elements: ``N``, elements covered by one step size.
    qmax: ``Q_p``, the largest grid value (integer code or float max).

  Returns:
    ``g`` as a Python float.

  Raises:
    ValueError: if either argument is not positive.

  Examples:
    >>> lsq_grad_scale(100, 4)
    0.05
  """
  if num_elements <= 0 or qmax <= 0:
    raise ValueError(f"lsq_grad_scale: num_elements and qmax must be positive, got "
                     f"{num_elements} and {qmax}")
  return 1.0 / math.sqrt(num_elements * qmax)


def _lsq_forward(x, step, offset, noise, fmt):
  """``(y, (inside, ds))``: the output, the clip mask and the step-size derivative.

  Integer grids compute in code space shifted by the zero point ``z``:
  ``clip(round(v), qmin - z, qmax - z) * s`` is ``(clip(round(v) + z, qmin,
  qmax) - z) * s`` (integers below 2^24 are exact in float32, and larger
  ``|round(v)|`` clip to the same end either way), two operations fewer per
  element. ``inside = clip(r) == r`` (false for NaN).
  """
  cdt = _grid.compute_dtype(x.dtype)
  x32 = x.astype(cdt)
  s = jnp.maximum(step.astype(cdt), _grid.SCALE_EPS)
  v = _grid.scaled(x32, s)
  if isinstance(fmt, formats_lib.IntFormat):
    r = _grid.grid_round(v, fmt, noise)
    if offset is None:
      qs = jnp.clip(r, fmt.qmin, fmt.qmax)
      clipped_ds = qs  # qmin or qmax where clipped
    else:
      # The zero point is an integer code, so it lies on the grid: an offset
      # that drifts past it (post-ReLU inputs calibrate to z == qmin) acts as
      # the end code, as the served encoding does.
      z = jnp.clip(_grid.round_half_even(-offset.astype(cdt) / s), fmt.qmin, fmt.qmax)
      qs = jnp.clip(r, fmt.qmin - z, fmt.qmax - z)  # q - z
      clipped_ds = qs + z
    inside = qs == r  # clipping did not change the code
    y = qs * s
    ds = jnp.where(inside, r - v, clipped_ds)
  else:
    vc = jnp.clip(v, -fmt.max, fmt.max)
    q = _grid.float_round(vc, fmt)
    inside = vc == v
    y = q * s
    ds = jnp.where(inside, q - v, q)  # -max or max where clipped
  return y.astype(x.dtype), (inside, ds)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _lsq(x, step, offset, noise, fmt, grad_scale):
  return _lsq_forward(x, step, offset, noise, fmt)[0]


def _lsq_tangent(x, step, offset, noise, x_dot, step_dot, offset_dot, *, fmt, grad_scale):
  """The LSQ tangent, computed from the primal inputs.

  Run under ``jax.checkpoint`` by ``_lsq_jvp``: reverse mode keeps only the
  inputs (``x``, which a layer keeps anyway for a weight, and the step size)
  and recomputes the masks and the step-size derivative in the backward pass,
  instead of keeping two boolean masks and a float array of ``x``'s size.
  """
  inside, ds = _lsq_forward(x, step, offset, noise, fmt)[1]
  cdt = ds.dtype
  t = jnp.where(inside, x_dot, jnp.zeros((), x_dot.dtype)).astype(cdt)
  t = t + ds * (step_dot.astype(cdt) * grad_scale)
  if offset_dot is not None:
    t = t + jnp.where(inside, jnp.zeros((), cdt), jnp.ones((), cdt)) * (
        offset_dot.astype(cdt) * grad_scale)
  return t.astype(x.dtype)


@_lsq.defjvp
def _lsq_jvp(fmt, grad_scale, primals, tangents):
  """The linear map whose transpose is the LSQ/LSQ+ gradient (see lsq_fake_quant)."""
  x, step, offset, noise = primals
  x_dot, step_dot, offset_dot, _ = tangents
  y = _lsq(x, step, offset, noise, fmt, grad_scale)
  tangent = jax.checkpoint(functools.partial(_lsq_tangent, fmt=fmt, grad_scale=grad_scale),
                           policy=jax.checkpoint_policies.nothing_saveable)
  t = tangent(x, step, offset, noise, x_dot, step_dot, None if offset is None else offset_dot)
  return y, t


_lsq_jit = jax.jit(_lsq, static_argnums=(4, 5))


def lsq_fake_quant(
    x: ArrayLike,
    step_size: ArrayLike,
    offset: Optional[ArrayLike] = None,
    spec: spec_lib.QuantSpec = spec_lib.QuantSpec(learning="lsq"),
    *,
    grad_scale: Optional[float] = None,
    key: Optional[jax.Array] = None,
) -> Array:
  r"""Fake quant with a learned step size (LSQ) and optional offset (LSQ+).

  Forward: with :math:`s` = ``max(step_size, 1e-12)``, the integer zero point
  :math:`z = \lfloor -\beta / s \rceil` (0 without ``offset``) and
  :math:`v = x / s`, the output is
  :math:`\hat{x} = s\,(\mathrm{clip}(\lfloor v \rceil + z, q_{min}, q_{max}) - z)`
  -- the same arithmetic as :func:`fake_quant`, so a trained range converts
  exactly to an integer model. Float formats use their grid and
  :math:`[-max, max]`.

  Backward, LSQ (Esser et al. 2020, eq. 3 and 5), with :math:`u = v + z`,
  :math:`Q_n = -q_{min}`, :math:`Q_p = q_{max}`:

  .. math::
     \frac{\partial \hat{x}}{\partial x} = \mathbb{1}[-Q_n \le u \le Q_p], \qquad
     \frac{\partial \hat{x}}{\partial s} = \begin{cases}
       \lfloor v \rceil - v & -Q_n \le u \le Q_p \\
       -Q_n & u < -Q_n \\
       Q_p & u > Q_p \end{cases}

  The range is inclusive, as in :func:`fake_quant` (the paper writes the
  ends as clipped; on the ends :math:`\lfloor v \rceil - v = 0`, so only
  which case an exact end falls in differs).

  LSQ+ (Bhalgat et al. 2020) adds the offset :math:`\beta` (``x ~= s q + β``):
  :math:`\partial \hat{x}/\partial \beta` is 0 inside the range and 1 where
  clipped. Step-size and offset gradients are summed over the elements each
  one covers and multiplied by ``grad_scale``, by default
  :math:`g = 1/\sqrt{N Q_p}` with :math:`N` the elements per step size. The
  step size's gradient passes straight through the positivity clamp.
  Forward mode (``jax.jvp``/``jacfwd``) uses the linear map whose transpose
  is this gradient: :math:`\dot{\hat{x}} = \mathbb{1}[\cdot]\,\dot{x} +
  g\,(\partial \hat{x}/\partial s)\,\dot{s} + g\,(\partial \hat{x}/\partial
  \beta)\,\dot{\beta}` (so the step-size tangent is scaled by :math:`g` too);
  second derivatives follow the same rule. A concrete NaN or infinite
  ``step_size`` / ``offset`` is an error (traced ones give NaN outputs).

  Args:
    x: a floating point array.
    step_size: the learned step size ``s``, shaped like a ``fake_quant`` scale.
    offset: the LSQ+ offset ``β`` (same shape as ``step_size``), or ``None``
      for LSQ (zero point 0).
    spec: the QuantSpec (integer or float format; not a block format).
    grad_scale: overrides the gradient scale ``g`` (a finite Python number
      ``>= 0``; 0 freezes the step size and offset).
    key: a PRNG key for stochastic rounding.

  Returns:
    An array of ``x``'s shape and dtype.

  Raises:
    TypeError: if ``x`` is not floating point or ``spec`` is not a QuantSpec.
    ValueError: on a wrongly shaped or (concrete) non-finite ``step_size`` /
      ``offset``, a ``grad_scale`` that is NaN, infinite or negative, a block
      format, an offset with a float format, or stochastic rounding without a
      key.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, lsq_fake_quant
    >>> spec = QuantSpec(format="int4", learning="lsq")
    >>> x = jnp.array([0.3, 2.0])
    >>> lsq_fake_quant(x, 0.25, spec=spec)
    Array([0.25, 1.75], dtype=float32)
    >>> # d/ds: round(1.2) - 1.2 = -0.2 inside; Qp = 7 clipped; times 1/sqrt(2*7)
    >>> g = jax.grad(lambda s: lsq_fake_quant(x, s, spec=spec).sum())(0.25)
    >>> bool(jnp.allclose(g, (-0.2 + 7) / jnp.sqrt(14.0)))
    True
  """
  x = _grid.check_float_input(x)
  spec = _grid.check_spec(spec)
  if spec.is_block:
    raise ValueError(f"spec: LSQ needs an integer or float format, got block format "
                     f"{spec.format.name}")
  step_size = jnp.asarray(step_size)
  if not jnp.issubdtype(step_size.dtype, jnp.floating):
    step_size = step_size.astype(jnp.float32)
  step = _grid.check_scale(step_size, x.shape, spec, "step_size")
  _grid.check_finite(step, "step_size")
  off = None
  if offset is not None:
    if not spec.is_int:
      raise ValueError(f"offset: float format {spec.format.name} is symmetric; pass None")
    off = _grid.check_scale(jnp.asarray(offset, step.dtype), x.shape, spec, "offset")
    _grid.check_finite(off, "offset")
  if grad_scale is not None:
    try:
      grad_scale = float(grad_scale)
    except (TypeError, ValueError):
      raise TypeError(f"grad_scale: expected a Python number, got "
                      f"{type(grad_scale).__name__}") from None
    if not (math.isfinite(grad_scale) and grad_scale >= 0):
      raise ValueError(f"grad_scale: must be a finite number >= 0, got {grad_scale}")
  else:
    n = max(1, x.size // max(1, math.prod(step.shape)))
    grad_scale = lsq_grad_scale(n, float(spec.qmax))
  xl = _grid.to_layout(x, spec)
  s = _grid.scale_to_layout(step, x.shape, spec)
  o = None if off is None else _grid.scale_to_layout(off, x.shape, spec)
  noise = _noise(key, xl, spec)
  y = _lsq_jit(xl, s, o, noise, spec.format, grad_scale)
  return y.reshape(x.shape)


# --------------------------------------------------------------------------
# Block-scaled formats: nvfp4, mxfp4/6/8.
# --------------------------------------------------------------------------

# NVFP4's derived tensor scale is rounded up to this many significant bits, so
# that its products with e4m3 block scales and e2m1 values are exact.
_TENSOR_SCALE_BITS = 18


def _round_up_bits(t: Array, bits: int) -> Array:
  """The smallest float >= t (t > 0, finite) with ``bits`` significant bits."""
  info = jnp.finfo(t.dtype)
  drop = info.nmant + 1 - bits
  idt = jnp.int64 if info.bits == 64 else jnp.int32
  i = jax.lax.bitcast_convert_type(t, idt)
  i = (i + ((1 << drop) - 1)) & ~((1 << drop) - 1)
  return jax.lax.bitcast_convert_type(i, t.dtype)


def _derived_tensor_scale(xb: Array, fmt: formats_lib.BlockFormat) -> Array:
  """NVFP4 tensor scale from x: max|x| / (6 * 448) over the finite entries."""
  amax = jnp.max(jnp.where(jnp.isfinite(xb), jnp.abs(xb), 0.0))
  t = _grid.div_exact(amax, fmt.element.max * formats_lib.FP8_E4M3.max)
  t = jnp.where(t > 0, t, jnp.ones_like(t))
  return jnp.where(jnp.isfinite(t), _round_up_bits(t, _TENSOR_SCALE_BITS), t)


def _block_scales_layout(xb, fmt: formats_lib.BlockFormat, block_axis: int, tensor_scale):
  """Per-block scales in broadcast layout (plus the tensor scale) for blocked xb.

  A block holding NaN or +-inf gets a NaN scale; the amax of every other block
  (and NVFP4's derived tensor scale) sees finite values only.
  """
  cdt = _grid.compute_dtype(xb.dtype)
  xb = xb.astype(cdt)
  finite = jnp.isfinite(xb)
  bad = ~jnp.all(finite, axis=block_axis, keepdims=True)
  amax = jnp.max(jnp.where(finite, jnp.abs(xb), 0.0), axis=block_axis, keepdims=True)
  elem = fmt.element
  nan = jnp.full((), jnp.nan, cdt)
  if fmt.scale_format == "e8m0":
    # OCP MX v1.0: shared exponent = floor(log2(amax)) - emax_elem, in [-127, 127].
    _, e = jnp.frexp(amax)
    shared = jnp.clip(e - 1 - elem.emax, -127, 127)
    shared = jnp.where(amax > 0, shared, -127)
    block = _grid.exp2_int(shared, cdt)  # 2^-127 is a subnormal: XLA:CPU flushes it to 0
    return jnp.where(bad, nan, block), None
  # NVFP4: fp32 tensor scale, e4m3 block scale = amax_block / (6 * tensor_scale).
  if tensor_scale is None:
    ts = _derived_tensor_scale(xb, fmt)
  else:
    ts = jnp.asarray(tensor_scale, cdt).reshape(())
  raw = jnp.clip(amax / (elem.max * ts), 0.0, formats_lib.FP8_E4M3.max)
  block = _grid.float_round(raw, formats_lib.FP8_E4M3)
  return jnp.where(bad, nan, block), ts


def _block_effective(block, ts):
  """The scale an element is multiplied by: block scale times tensor scale."""
  return block if ts is None else block * ts


def _block_elements(x, eff, elem):
  """(grid values, clip mask) of x for effective scales ``eff``.

  A zero scale (an all-zero MX block flushed on CPU, an NVFP4 block whose
  e4m3 scale underflows) gives the value 0, as decoding the codes does; a NaN
  scale gives 0 too (the block decodes to NaN through its scale).
  """
  ok = eff > 0
  v = jnp.where(ok, _grid.scaled(x, jnp.where(ok, eff, jnp.ones_like(eff))), 0.0)
  q = _grid.float_round(jnp.clip(v, -elem.max, elem.max), elem)
  inside = (jnp.abs(x) <= elem.max * eff) | (eff == 0)
  return q, inside


def _block_forward(x, fmt, axis, tensor_scale):
  """x in blocked layout; ``axis`` is the within-block axis."""
  cdt = _grid.compute_dtype(x.dtype)
  block, ts = _block_scales_layout(x, fmt, axis, tensor_scale)
  eff = _block_effective(block, ts)
  q, inside = _block_elements(x.astype(cdt), eff, fmt.element)
  return (q * eff).astype(x.dtype), inside


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _block_fq_masked(x, tensor_scale, fmt, axis):
  """``(y, inside)`` from one evaluation (block scales computed once)."""
  return _block_forward(x, fmt, axis, tensor_scale)


@_block_fq_masked.defjvp
def _block_fq_jvp(fmt, axis, primals, tangents):
  x, tensor_scale = primals
  y, inside = _block_fq_masked(x, tensor_scale, fmt, axis)
  return (y, inside), (_masked_tangent(inside, tangents[0]), _mask_tangent(inside))


def _block_fq(x, tensor_scale, fmt, axis):
  return _block_fq_masked(x, tensor_scale, fmt, axis)[0]


_block_fq_jit = jax.jit(_block_fq, static_argnums=(2, 3))


def _check_tensor_scale(tensor_scale, spec, dtype):
  """Validates NVFP4's optional tensor scale; returns it as a scalar or None."""
  if tensor_scale is None:
    return None
  if not spec.format.tensor_scale:
    raise ValueError(f"tensor_scale: {spec.format.name} has no tensor scale; pass None")
  ts = jnp.asarray(tensor_scale, _grid.compute_dtype(dtype))
  if ts.size != 1:
    raise ValueError(f"tensor_scale: must be a scalar, got shape {ts.shape}")
  if not _grid.is_traced(ts):
    t = float(np.asarray(ts).reshape(()))
    if not (np.isfinite(t) and t > 0):
      raise ValueError(f"tensor_scale: must be finite and > 0, got {t}")
  return ts.reshape(())


def _check_block_spec(spec, what: str):
  spec = _grid.check_spec(spec)
  if not spec.is_block:
    raise ValueError(f"spec: {what} needs a block format (nvfp4, mxfp4, mxfp6, mxfp8), "
                     f"got {spec.format.name}")
  return spec


def block_fake_quant(
    x: ArrayLike,
    spec: spec_lib.QuantSpec,
    tensor_scale: Optional[ArrayLike] = None,
) -> Array:
  r"""Fake quant in a block-scaled format (nvfp4, mxfp4, mxfp6, mxfp8).

  ``x`` is cut into blocks of ``block_size`` contiguous elements along
  ``spec.granularity.axis``. Each block gets a scale from its absolute
  maximum :math:`a`:

  * OCP MX (e8m0): :math:`X = 2^{\lfloor \log_2 a \rfloor - e_{max}}`, the
    exponent clamped to :math:`[-127, 127]`, where :math:`e_{max}` is the
    element format's largest normal exponent (2 for e2m1, 8 for e4m3);
    elements are rounded onto the element grid after clamping ``x/X`` to
    ``[-max, max]`` (OCP Microscaling Formats spec v1.0, section 6.3). An
    all-zero block gets :math:`X = 2^{-127}` (e8m0 code 0).
  * NVFP4: a per-tensor fp32 scale :math:`t` and an e4m3 block scale
    :math:`b = \mathrm{e4m3}(a / (6 t))`; elements are e2m1 values of
    :math:`x / (b t)`. ``tensor_scale`` gives :math:`t`; by default it is
    derived from ``x``: :math:`\max|x| / (6 \cdot 448)` over the finite
    entries, rounded *up* to 18 significant bits (a relative change below
    :math:`2^{-17}`). The rounding makes every product :math:`t \cdot b
    \cdot q` exact, so that re-quantizing the output reproduces the same
    tensor scale. A block whose e4m3 scale underflows to 0 decodes to 0, as
    its stored codes do.

  Fake quant is idempotent (``block_fake_quant(block_fake_quant(x)) ==
  block_fake_quant(x)`` bit for bit) for MX formats and for NVFP4 blocks
  whose e4m3 scale is 0 or normal (:math:`\ge 2^{-6}`, i.e. block amax above
  about :math:`3.5 \cdot 10^{-5}` of the tensor amax); the subnormal e4m3
  grid is too coarse for the block amax to survive re-quantization.

  Non-finite input (one rule for fake quant, :func:`~jaxqat.core.quantize`
  and :func:`block_scales`): a block holding a NaN or :math:`\pm\infty`
  decodes to NaN in every element, as in the OCP MX v1.0 and NVFP4
  reference implementations; its stored scale is NaN (e8m0 code 255, e4m3
  NaN) and its codes are 0. Other blocks are unaffected: block maxima and
  NVFP4's derived tensor scale are taken over finite values only.

  Backward (and forward-mode tangent): straight-through, masked where an
  element was clamped (:math:`|x| > \mathrm{max} \cdot X`); scales are
  treated as constants. Under ``jax.vmap`` a tensor scale derived from ``x``
  is computed per mapped slice; pass a calibrated ``tensor_scale`` to share
  one.

  Args:
    x: a floating point array; the block axis must be divisible by the
      block size.
    spec: a QuantSpec with a block format.
    tensor_scale: NVFP4's fp32 tensor scale (a scalar, finite and > 0;
      checked when concrete, a traced non-finite value gives NaN output);
      MX formats take none (must be None).

  Returns:
    An array of ``x``'s shape and dtype.

  Raises:
    TypeError: if ``x`` is not floating point or ``spec`` is not a QuantSpec.
    ValueError: if the format is not a block format, the axis is out of range
      or the block size does not divide it, MX is given a tensor scale, or a
      concrete tensor scale is not finite and positive.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, block_fake_quant
    >>> x = jnp.concatenate([jnp.array([5.0, 1.3, -0.4]), jnp.zeros(29)])
    >>> block_fake_quant(x, QuantSpec(format="mxfp4"))[:3]  # scale 2^(2-2) = 1; 5 ties to 4 (even)
    Array([ 4. ,  1.5, -0.5], dtype=float32)
    >>> y = block_fake_quant(x.at[31].set(jnp.nan), QuantSpec(format="mxfp4"))
    >>> bool(jnp.isnan(y).all())  # one NaN: the whole block is NaN
    True
  """
  x = _grid.check_float_input(x)
  spec = _check_block_spec(spec, "block_fake_quant")
  ts = _check_tensor_scale(tensor_scale, spec, x.dtype)
  xl = _grid.to_layout(x, spec)
  axis = spec.granularity.axis % x.ndim + 1
  return _block_fq_jit(xl, ts, spec.format, axis).reshape(x.shape)


def _e8m0_bits(block: Array) -> Array:
  """The e8m0 code (biased exponent, 255 for NaN) of power-of-two scales.

  Read from the float32 bit pattern, so that 2^-127 -- a float32 subnormal
  that XLA:CPU flushes to 0 -- still gets its code 0.
  """
  bits = jax.lax.bitcast_convert_type(block.astype(jnp.float32), jnp.int32)
  code = (bits >> 23) & 0xFF
  return jnp.where(jnp.isnan(block), 255, code).astype(jnp.uint8)


def _e8m0_to_float32(code: Array) -> Array:
  """Exact float32 value of e8m0 codes: 2^(code - 127), NaN for 255."""
  c = code.astype(jnp.int32)
  bits = jnp.where(c == 0, 1 << 22, jnp.where(c == 255, 0x7FC00000, c << 23))
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _block_scales_public(x, tensor_scale, spec):
  xl = _grid.to_layout(x, spec)
  axis = spec.granularity.axis % x.ndim + 1
  block, ts = _block_scales_layout(xl, spec.format, axis, tensor_scale)
  block = _grid.scale_from_layout(block, x.shape, spec)
  if spec.format.scale_format == "e8m0":
    return _e8m0_to_float32(_e8m0_bits(block)), ts
  return block.astype(jnp.float32), ts


_block_scales_jit = jax.jit(_block_scales_public, static_argnums=2)


def block_scales(
    x: ArrayLike,
    spec: spec_lib.QuantSpec,
    tensor_scale: Optional[ArrayLike] = None,
) -> tuple[Array, Optional[Array]]:
  """The per-block scales (and NVFP4 tensor scale) that fake quant would use.

  Computed by the same jitted arithmetic as :func:`block_fake_quant`, so
  the two agree bit for bit (eagerly or under ``jit``).

  Args:
    x: a floating point array.
    spec: a QuantSpec with a block format.
    tensor_scale: NVFP4's tensor scale, or None to derive it from ``x``.

  Returns:
    ``(block_scale, tensor_scale)``: ``block_scale`` has shape
    ``spec.scale_shape(x.shape)`` and holds the e8m0 (powers of two) or e4m3
    values as float32; ``tensor_scale`` is the fp32 scalar for NVFP4 and
    ``None`` for MX formats. A zero block reports scale 0 (NVFP4) or
    2^-127 (MX, a float32 subnormal); a block holding NaN or inf reports NaN.

  Raises:
    ValueError: as :func:`block_fake_quant`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, block_scales
    >>> b, t = block_scales(jnp.full((32,), 10.0), QuantSpec(format="mxfp8"))
    >>> float(b[0]), t  # floor(log2 10) - 8 = -5
    (0.03125, None)
    >>> float(block_scales(jnp.zeros(32), QuantSpec(format="mxfp8"))[0][0]) == 2.0 ** -127
    True
  """
  x = _grid.check_float_input(x)
  spec = _check_block_spec(spec, "block_scales")
  ts = _check_tensor_scale(tensor_scale, spec, x.dtype)
  return _block_scales_jit(x, ts, spec)


# --------------------------------------------------------------------------
# Dispatch by learning mode, for the front ends.
# --------------------------------------------------------------------------


def quant_dequant(
    x: ArrayLike,
    spec: spec_lib.QuantSpec,
    scale: Optional[ArrayLike] = None,
    zero_point: Optional[ArrayLike] = None,
    *,
    offset: Optional[ArrayLike] = None,
    key: Optional[jax.Array] = None,
) -> Array:
  """Applies the primitive that ``spec.learning`` calls for.

  * block formats: :func:`block_fake_quant` (``scale`` is NVFP4's optional
    tensor scale);
  * ``learning="fixed"``: :func:`fake_quant` with ``zero_point`` the integer
    zero point;
  * ``learning="lsq"``: :func:`lsq_fake_quant` with ``scale`` the learned step
    size (``zero_point`` must be None);
  * ``learning="lsq_plus"``: :func:`lsq_fake_quant` with ``offset`` the LSQ+
    offset β (``x ~= s q + β``; a calibrated integer zero point ``z`` gives
    ``β = -z s``).

  ``zero_point`` always means an integer zero point and ``offset`` always the
  float LSQ+ offset: one name per meaning.

  Args:
    x: a floating point array.
    spec: the QuantSpec.
    scale: the step size (or tensor scale / None for block formats).
    zero_point: the integer zero point of a fixed-range affine spec, or None.
    offset: the LSQ+ offset β (``learning="lsq_plus"`` only), or None.
    key: PRNG key for stochastic rounding.

  Returns:
    The fake-quantized array, with ``x``'s shape and dtype.

  Raises:
    ValueError: if a learned spec is given ``zero_point``, or a spec other than
      ``lsq_plus`` is given ``offset``, plus the errors of the primitive it
      calls.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quant_dequant
    >>> quant_dequant(jnp.array([0.26]), QuantSpec(learning="lsq"), 0.1)
    Array([0.3], dtype=float32)
  """
  spec = _grid.check_spec(spec)
  if spec.is_block:
    return block_fake_quant(x, spec, tensor_scale=scale)
  if offset is not None and spec.learning != "lsq_plus":
    raise ValueError(f"offset: only learning='lsq_plus' learns an offset, got "
                     f"learning={spec.learning!r} (a fixed affine range takes zero_point)")
  if spec.learning == "fixed":
    return fake_quant(x, scale, zero_point, spec, key=key)
  if zero_point is not None:
    raise ValueError(f"zero_point: learning={spec.learning!r} takes no integer zero point; "
                     "LSQ is symmetric, LSQ+ learns a float offset (pass offset=-z*scale)")
  return lsq_fake_quant(x, scale, offset, spec, key=key)
