"""Fake quantization (quantize then dequantize) with straight-through gradients.

Every primitive here is a :func:`jax.custom_vjp`. The forward pass is the
exact arithmetic of :func:`jaxqat.core.quantize` followed by
:func:`jaxqat.core.dequantize`: clip to the grid's range, round half to
even, scale back. The backward pass is a straight-through estimator (STE).

Gradient convention ("textbook STE"): the gradient that reaches ``x`` is the
incoming gradient masked to zero where ``x`` was clipped. A layer computing
``x @ fake_quant(w)`` therefore back-propagates ``g @ w_q^T`` to ``x`` -- the
*quantized* operand -- and ``x^T g`` masked by the clip range to ``w``.

Integer grid, for a step size ``s > 0`` and integer zero point ``z``
(``x ~= s * (q - z)``)::

    q = clip(round_half_even(x / s) + z, qmin, qmax)
    fake_quant(x) = s * (q - z)

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
  cdt = _grid.compute_dtype(x.dtype)
  x32 = x.astype(cdt)
  s = jnp.maximum(scale.astype(cdt), _grid.SCALE_EPS)
  v = x32 / s
  if isinstance(fmt, formats_lib.IntFormat):
    z = zero_point.astype(cdt)
    q = jnp.clip(_grid.grid_round(v, fmt, noise) + z, fmt.qmin, fmt.qmax)
    y = (q - z) * s
    lo, hi = fmt.qmin - z, fmt.qmax - z
  else:
    q = _grid.float_round(jnp.clip(v, -fmt.max, fmt.max), fmt)
    y = q * s
    lo, hi = -fmt.max, fmt.max
  inside = (v >= lo) & (v <= hi)
  return y.astype(x.dtype), inside


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fake_quant(x, scale, zero_point, noise, fmt):
  return _fq_forward(x, scale, zero_point, noise, fmt)[0]


def _fake_quant_fwd(x, scale, zero_point, noise, fmt):
  y, inside = _fq_forward(x, scale, zero_point, noise, fmt)
  return y, (inside, scale, zero_point, noise)


def _fake_quant_bwd(fmt, res, g):
  inside, scale, zero_point, noise = res
  gx = jnp.where(inside, g, jnp.zeros_like(g))
  zeros = lambda a: None if a is None else jnp.zeros_like(a)
  return gx, zeros(scale), zeros(zero_point), zeros(noise)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
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

  ``scale`` and ``zero_point`` receive zero gradients (use
  :func:`lsq_fake_quant` to learn them). Scales below ``1e-12`` are clamped.

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
    ValueError: if ``scale`` / ``zero_point`` have the wrong shape, an axis is
      out of range, a block size does not divide its axis, a float format is
      given a zero point, or stochastic rounding has no key.

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
  if spec.is_int:
    zp = jnp.zeros((), scale.dtype) if zero_point is None else _grid.check_scale(
        zero_point, x.shape, spec, "zero_point")
  else:
    if zero_point is not None:
      raise ValueError(f"zero_point: float format {spec.format.name} is symmetric; pass None")
    zp = jnp.zeros((), scale.dtype)
  xl = _grid.to_layout(x, spec)
  s = _grid.scale_to_layout(scale, x.shape, spec)
  zl = _grid.scale_to_layout(zp, x.shape, spec) if zp.ndim else zp
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
  cdt = _grid.compute_dtype(x.dtype)
  x32 = x.astype(cdt)
  s = jnp.maximum(step.astype(cdt), _grid.SCALE_EPS)
  v = x32 / s
  if offset is None:
    z = jnp.zeros((), cdt)
  else:
    z = _grid.round_half_even(-offset.astype(cdt) / s)
  rv = _grid.grid_round(v, fmt, noise)
  u = v + z  # position on the (shifted) grid before rounding
  below = u <= fmt.qmin
  above = u >= fmt.qmax
  if isinstance(fmt, formats_lib.IntFormat):
    q = jnp.clip(rv + z, fmt.qmin, fmt.qmax)
  else:
    q = _grid.float_round(jnp.clip(v, -fmt.max, fmt.max), fmt)
    rv = q
  y = ((q - z) * s).astype(x.dtype)
  return y, (below, above, rv - v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lsq(x, step, offset, noise, fmt, grad_scale):
  return _lsq_forward(x, step, offset, noise, fmt)[0]


def _lsq_fwd(x, step, offset, noise, fmt, grad_scale):
  y, res = _lsq_forward(x, step, offset, noise, fmt)
  return y, (res, step, offset, noise)


def _lsq_bwd(fmt, grad_scale, res, g):
  (below, above, round_err), step, offset, noise = res
  outside = below | above
  g32 = g.astype(round_err.dtype)
  gx = jnp.where(outside, jnp.zeros_like(g), g)
  ds = jnp.where(below, fmt.qmin, jnp.where(above, fmt.qmax, round_err))
  gs = _grid.sum_to_shape(g32 * ds, step.shape) * grad_scale
  go = None
  if offset is not None:
    go = _grid.sum_to_shape(jnp.where(outside, g32, 0.0), offset.shape) * grad_scale
    go = go.astype(offset.dtype)
  gn = None if noise is None else jnp.zeros_like(noise)
  return gx, gs.astype(step.dtype), go, gn


_lsq.defvjp(_lsq_fwd, _lsq_bwd)
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
     \frac{\partial \hat{x}}{\partial x} = \mathbb{1}[-Q_n < u < Q_p], \qquad
     \frac{\partial \hat{x}}{\partial s} = \begin{cases}
       \lfloor v \rceil - v & -Q_n < u < Q_p \\
       -Q_n & u \le -Q_n \\
       Q_p & u \ge Q_p \end{cases}

  LSQ+ (Bhalgat et al. 2020) adds the offset :math:`\beta` (``x ~= s q + β``):
  :math:`\partial \hat{x}/\partial \beta` is 0 inside the range and 1 where
  clipped. Step-size and offset gradients are summed over the elements each
  one covers and multiplied by ``grad_scale``, by default
  :math:`g = 1/\sqrt{N Q_p}` with :math:`N` the elements per step size. The
  step size's gradient passes straight through the positivity clamp.

  Args:
    x: a floating point array.
    step_size: the learned step size ``s``, shaped like a ``fake_quant`` scale.
    offset: the LSQ+ offset ``β`` (same shape as ``step_size``), or ``None``
      for LSQ (zero point 0).
    spec: the QuantSpec (integer or float format; not a block format).
    grad_scale: overrides the gradient scale ``g``.
    key: a PRNG key for stochastic rounding.

  Returns:
    An array of ``x``'s shape and dtype.

  Raises:
    TypeError: if ``x`` is not floating point or ``spec`` is not a QuantSpec.
    ValueError: on a wrongly shaped ``step_size`` / ``offset``, a block format,
      an offset with a float format, or stochastic rounding without a key.

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
  off = None
  if offset is not None:
    if not spec.is_int:
      raise ValueError(f"offset: float format {spec.format.name} is symmetric; pass None")
    off = _grid.check_scale(jnp.asarray(offset, step.dtype), x.shape, spec, "offset")
  if grad_scale is None:
    n = max(1, x.size // max(1, math.prod(step.shape)))
    grad_scale = lsq_grad_scale(n, float(spec.qmax))
  xl = _grid.to_layout(x, spec)
  s = _grid.scale_to_layout(step, x.shape, spec)
  o = None if off is None else _grid.scale_to_layout(off, x.shape, spec)
  noise = _noise(key, xl, spec)
  y = _lsq_jit(xl, s, o, noise, spec.format, float(grad_scale))
  return y.reshape(x.shape)


# --------------------------------------------------------------------------
# Block-scaled formats: nvfp4, mxfp4/6/8.
# --------------------------------------------------------------------------


def _block_scales_layout(xb, fmt: formats_lib.BlockFormat, block_axis: int, tensor_scale):
  """Per-block scales in broadcast layout (plus the tensor scale) for blocked xb."""
  cdt = _grid.compute_dtype(xb.dtype)
  xb = xb.astype(cdt)
  amax = jnp.max(jnp.abs(xb), axis=block_axis, keepdims=True)
  elem = fmt.element
  if fmt.scale_format == "e8m0":
    # OCP MX v1.0: shared exponent = floor(log2(amax)) - emax_elem, in [-127, 127].
    _, e = jnp.frexp(amax)
    shared = jnp.clip(e - 1 - elem.emax, -127, 127)
    shared = jnp.where(amax > 0, shared, -127)
    block = _grid.exp2_int(shared, cdt)
    return block, None
  # NVFP4: fp32 tensor scale, e4m3 block scale = amax_block / (6 * tensor_scale).
  if tensor_scale is None:
    tamax = jnp.max(jnp.abs(xb))
    tensor_scale = tamax / (elem.max * formats_lib.FP8_E4M3.max)
  ts = jnp.asarray(tensor_scale, cdt).reshape(())
  ts = jnp.where(ts > 0, ts, jnp.ones_like(ts))
  raw = jnp.clip(amax / (elem.max * ts), 0.0, formats_lib.FP8_E4M3.max)
  block = _grid.float_round(raw, formats_lib.FP8_E4M3)
  return block, ts


def _block_effective(block, ts):
  eff = block if ts is None else block * ts
  return jnp.where(eff > 0, eff, jnp.ones_like(eff))


def _block_forward(x, fmt, axis, tensor_scale):
  """x in blocked layout; ``axis`` is the within-block axis."""
  cdt = _grid.compute_dtype(x.dtype)
  block, ts = _block_scales_layout(x, fmt, axis, tensor_scale)
  eff = _block_effective(block, ts)
  v = x.astype(cdt) / eff
  elem = fmt.element
  q = _grid.float_round(jnp.clip(v, -elem.max, elem.max), elem)
  inside = jnp.abs(v) <= elem.max
  return (q * eff).astype(x.dtype), inside


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _block_fq(x, tensor_scale, fmt, axis):
  return _block_forward(x, fmt, axis, tensor_scale)[0]


def _block_fq_fwd(x, tensor_scale, fmt, axis):
  y, inside = _block_forward(x, fmt, axis, tensor_scale)
  return y, (inside, tensor_scale)


def _block_fq_bwd(fmt, axis, res, g):
  inside, tensor_scale = res
  gts = None if tensor_scale is None else jnp.zeros_like(tensor_scale)
  return jnp.where(inside, g, jnp.zeros_like(g)), gts


_block_fq.defvjp(_block_fq_fwd, _block_fq_bwd)
_block_fq_jit = jax.jit(_block_fq, static_argnums=(2, 3))


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
    ``[-max, max]`` (OCP Microscaling Formats spec v1.0, section 6.3).
  * NVFP4: a per-tensor fp32 scale :math:`t` (``tensor_scale``, or
    :math:`\max|x| / (6 \cdot 448)` computed from ``x``) and an e4m3 block
    scale :math:`b = \mathrm{e4m3}(a / (6 t))`; elements are e2m1 values of
    :math:`x / (b t)`.

  A block of zeros gives zeros. Backward: straight-through, masked where an
  element was clamped; scales are treated as constants. Under ``jax.vmap`` a
  tensor scale derived from ``x`` is computed per mapped slice; pass a
  calibrated ``tensor_scale`` to share one.

  Args:
    x: a floating point array; the block axis must be divisible by the
      block size.
    spec: a QuantSpec with a block format.
    tensor_scale: NVFP4's fp32 tensor scale (a scalar); ignored by MX formats
      (must be None).

  Returns:
    An array of ``x``'s shape and dtype.

  Raises:
    TypeError: if ``x`` is not floating point or ``spec`` is not a QuantSpec.
    ValueError: if the format is not a block format, the axis is out of range
      or the block size does not divide it, or MX is given a tensor scale.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, block_fake_quant
    >>> x = jnp.concatenate([jnp.array([5.0, 1.3, -0.4]), jnp.zeros(29)])
    >>> block_fake_quant(x, QuantSpec(format="mxfp4"))[:3]  # scale 2^(2-2) = 1; 5 ties to 4 (even)
    Array([ 4. ,  1.5, -0.5], dtype=float32)
  """
  x = _grid.check_float_input(x)
  spec = _grid.check_spec(spec)
  if not spec.is_block:
    raise ValueError(f"spec: block_fake_quant needs a block format (nvfp4, mxfp4, mxfp6, mxfp8), "
                     f"got {spec.format.name}")
  ts = None
  if tensor_scale is not None:
    if not spec.format.tensor_scale:
      raise ValueError(f"tensor_scale: {spec.format.name} has no tensor scale; pass None")
    ts = jnp.asarray(tensor_scale, _grid.compute_dtype(x.dtype))
    if ts.size != 1:
      raise ValueError(f"tensor_scale: must be a scalar, got shape {ts.shape}")
    ts = ts.reshape(())
  xl = _grid.to_layout(x, spec)
  axis = spec.granularity.axis % x.ndim + 1
  return _block_fq_jit(xl, ts, spec.format, axis).reshape(x.shape)


def block_scales(
    x: ArrayLike,
    spec: spec_lib.QuantSpec,
    tensor_scale: Optional[ArrayLike] = None,
) -> tuple[Array, Optional[Array]]:
  """The per-block scales (and NVFP4 tensor scale) that fake quant would use.

  Args:
    x: a floating point array.
    spec: a QuantSpec with a block format.
    tensor_scale: NVFP4's tensor scale, or None to derive it from ``x``.

  Returns:
    ``(block_scale, tensor_scale)``: ``block_scale`` has shape
    ``spec.scale_shape(x.shape)`` and holds the e8m0 (powers of two) or e4m3
    values as float32; ``tensor_scale`` is the fp32 scalar for NVFP4 and
    ``None`` for MX formats. A zero block reports scale 0 (NVFP4) or
    2^-127 (MX).

  Raises:
    ValueError: as :func:`block_fake_quant`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, block_scales
    >>> b, t = block_scales(jnp.full((32,), 10.0), QuantSpec(format="mxfp8"))
    >>> float(b[0]), t  # floor(log2 10) - 8 = -5
    (0.03125, None)
  """
  x = _grid.check_float_input(x)
  spec = _grid.check_spec(spec)
  if not spec.is_block:
    raise ValueError(f"spec: block_scales needs a block format, got {spec.format.name}")
  if tensor_scale is not None and not spec.format.tensor_scale:
    raise ValueError(f"tensor_scale: {spec.format.name} has no tensor scale; pass None")
  xl = _grid.to_layout(x, spec)
  axis = spec.granularity.axis % x.ndim + 1
  block, ts = _block_scales_layout(xl, spec.format, axis, tensor_scale)
  return _grid.scale_from_layout(block, x.shape, spec), ts


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
