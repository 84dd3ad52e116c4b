"""Real quantization: float arrays to integer / low-precision codes and back.

:func:`quantize` uses exactly the arithmetic of the fake-quant forward pass,
so ``dequantize(quantize(x, ...))`` equals :func:`~jaxqat.core.fake_quant`
bit for bit. The result is a :class:`QTensor`, a pytree whose leaves are the
codes, the scale and the zero point, with the spec and the original dtype as
static metadata. :func:`pack` / :func:`unpack` store 2- and 4-bit codes
densely in ``int8`` bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxqat.core import _grid
from jaxqat.core import _fake_quant as fq
from jaxqat.core import _spec as spec_lib
from jaxqat.core._typing import Array, ArrayLike

__all__ = ["QTensor", "quantize", "dequantize", "pack", "unpack", "pack_qtensor"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
  """A quantized array: codes, scale, zero point; spec and dtype as metadata.

  Attributes:
    values: the codes. Integer formats: ``int8``/``uint8``/``int16``/``uint16``
      (one code per element, unpacked). Float and block formats: the matching
      low-precision JAX dtype (``float8_e4m3fn``, ``float4_e2m1fn``...; fp6
      codes are held exactly in ``float8_e4m3fn``, as XLA has no fp6 arrays).
    scale: float32 step sizes in the spec's scale shape; for block formats the
      per-block scales (``float8_e8m0fnu`` for MX, ``float8_e4m3fn`` for
      NVFP4).
    zero_point: int32 zero points (affine integer specs) or ``None``.
    tensor_scale: NVFP4's fp32 tensor scale, else ``None``.
    spec: the QuantSpec (static).
    dtype: the dtype :func:`dequantize` returns (static).
    packed: 0 when ``values`` holds one code per element; 2 or 4 when
      ``values`` holds that many bits per code, packed along the last axis
      into ``int8`` bytes (:func:`pack`, :func:`pack_qtensor`) (static).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quantize
    >>> qt = quantize(jnp.array([0.5, -1.0]), 0.25, spec=QuantSpec(format="int4"))
    >>> qt.values
    Array([ 2, -4], dtype=int8)
  """

  values: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array] = None
  tensor_scale: Optional[jax.Array] = None
  spec: spec_lib.QuantSpec = dataclasses.field(default=spec_lib.QuantSpec(), metadata=dict(static=True))
  dtype: Any = dataclasses.field(default=jnp.float32, metadata=dict(static=True))
  packed: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape (one entry per quantized element, packed or not)."""
    if self.packed:
      return self.values.shape[:-1] + (self.values.shape[-1] * (8 // self.packed),)
    return self.values.shape

  @property
  def codes(self) -> jax.Array:
    """The codes, one per element (unpacked if ``packed``)."""
    if self.packed:
      return unpack(self.values, self.packed, signed=self.spec.format.signed)
    return self.values

  @property
  def nbytes(self) -> int:
    """Bytes held: codes, scales, zero points and tensor scale."""
    leaves = (self.values, self.scale, self.zero_point, self.tensor_scale)
    return int(sum(v.size * v.dtype.itemsize for v in leaves if v is not None))

  def dequantize(self) -> Array:
    """Same as :func:`dequantize` (self)."""
    return dequantize(self)


def _block_codes(x, tensor_scale, spec):
  """Codes, stored block scales and tensor scale: the arithmetic of block fake quant."""
  fmt = spec.format
  xl = _grid.to_layout(x, spec)
  axis = spec.granularity.axis % x.ndim + 1
  block, ts = fq._block_scales_layout(xl, fmt, axis, tensor_scale)  # pylint: disable=protected-access
  eff = fq._block_effective(block, ts)  # pylint: disable=protected-access
  cdt = _grid.compute_dtype(x.dtype)
  q, _ = fq._block_elements(xl.astype(cdt), eff, fmt.element)  # pylint: disable=protected-access
  codes = q.astype(fmt.element.storage_dtype)
  block = _grid.scale_from_layout(block, x.shape, spec)
  if fmt.scale_format == "e8m0":
    bits = fq._e8m0_bits(block)  # pylint: disable=protected-access
    stored = jax.lax.bitcast_convert_type(bits, jnp.float8_e8m0fnu)
  else:
    stored = block.astype(jnp.float8_e4m3fn)
  return codes, stored, ts


# Jitted like block_fake_quant, so that XLA rewrites the scale arithmetic the
# same way in both (e.g. a division by a broadcast scale into a multiplication
# by its reciprocal) and dequantize(quantize(x)) equals block_fake_quant(x) bit
# for bit.
_block_codes_jit = jax.jit(_block_codes, static_argnums=2)


def quantize(
    x: ArrayLike,
    scale: Optional[ArrayLike],
    zero_point: Optional[ArrayLike] = None,
    spec: spec_lib.QuantSpec = spec_lib.QuantSpec(),
    *,
    key: Optional[jax.Array] = None,
) -> QTensor:
  r"""Quantizes ``x`` to codes with the same rule as :func:`fake_quant`.

  Integer formats: :math:`q = \mathrm{clip}(\lfloor x/s \rceil + z, q_{min},
  q_{max})` (round half to even); float formats: the minifloat of
  :math:`\mathrm{clip}(x/s, -max, max)`; block formats: see
  :func:`~jaxqat.core.block_fake_quant` (``scale`` is NVFP4's optional tensor
  scale). An LSQ+ offset :math:`\beta` converts to the zero point
  :math:`z = \lfloor -\beta/s \rceil` (as in :func:`lsq_fake_quant`).

  Args:
    x: a floating point array.
    scale: the step size, shaped as for :func:`fake_quant`.
    zero_point: integer zero point (affine integer specs) or ``None``.
    spec: the QuantSpec.
    key: PRNG key for stochastic rounding.

  Returns:
    A :class:`QTensor`.

  Block formats store what :func:`~jaxqat.core.block_fake_quant` computes: an
  all-zero MX block stores the e8m0 scale :math:`2^{-127}` (code 0), a block
  holding NaN or inf stores a NaN scale (e8m0 code 255, e4m3 NaN) and codes
  0, so it decodes to NaN; an NVFP4 block whose e4m3 scale underflows stores
  scale 0 and decodes to 0.

  Raises:
    TypeError, ValueError: as :func:`fake_quant` (including a concrete NaN or
      infinite ``scale``, a concrete ``zero_point`` outside ``[qmin, qmax]``
      or not an integer, and, for NVFP4, a concrete tensor scale that is not
      finite and positive).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quantize, dequantize, fake_quant
    >>> x = jnp.array([0.1, 0.7, -3.0])
    >>> spec = QuantSpec(format="uint8", symmetric=False)
    >>> qt = quantize(x, 0.02, 150, spec=spec)
    >>> qt.values
    Array([155, 185,   0], dtype=uint8)
    >>> bool((dequantize(qt) == fake_quant(x, 0.02, 150, spec=spec)).all())
    True
  """
  x = _grid.check_float_input(x)
  spec = _grid.check_spec(spec)
  fmt = spec.format
  if spec.is_block:
    if zero_point is not None:
      raise ValueError(f"zero_point: block format {fmt.name} takes no zero point")
    ts = fq._check_tensor_scale(scale, spec, x.dtype)  # pylint: disable=protected-access
    codes, block, ts = _block_codes_jit(x, ts, spec)
    return QTensor(values=codes.reshape(x.shape), scale=block, zero_point=None,
                   tensor_scale=ts, spec=spec, dtype=x.dtype)
  if scale is None:
    raise ValueError("scale: a step size is required for integer and float formats, got None")
  scale = _grid.check_scale(scale, x.shape, spec).astype(jnp.float32)
  _grid.check_finite(scale, "scale")
  scale = jnp.maximum(scale, _grid.SCALE_EPS)
  xl = _grid.to_layout(x, spec)
  s = _grid.scale_to_layout(scale, x.shape, spec)
  cdt = _grid.compute_dtype(x.dtype)
  v = _grid.scaled(xl.astype(cdt), s.astype(cdt))
  if spec.is_int:
    zp = None
    z = jnp.zeros((), cdt)
    if zero_point is not None:
      zp = _grid.check_scale(zero_point, x.shape, spec, "zero_point")
      _grid.check_zero_point(zp, fmt)
      zp = jnp.round(zp).astype(jnp.int32)
      z = _grid.scale_to_layout(zp, x.shape, spec).astype(cdt) if zp.ndim else zp.astype(cdt)
    noise = fq._noise(key, xl, spec)  # pylint: disable=protected-access
    q = jnp.clip(_grid.grid_round(v, fmt, noise) + z, fmt.qmin, fmt.qmax)
    codes = q.astype(fmt.storage_dtype)
  else:
    if zero_point is not None:
      raise ValueError(f"zero_point: float format {fmt.name} is symmetric; pass None")
    zp = None
    q = _grid.float_round(jnp.clip(v, -fmt.max, fmt.max), fmt)
    codes = q.astype(fmt.storage_dtype)
  return QTensor(values=codes.reshape(x.shape), scale=scale, zero_point=zp, spec=spec,
                 dtype=x.dtype)


def dequantize(qt: QTensor) -> Array:
  """Maps a :class:`QTensor` back to floats: ``s * (q - z)`` (or ``q * s``).

  Args:
    qt: the quantized tensor.

  Returns:
    A float array of ``qt.dtype`` equal, bit for bit, to the fake-quant output
    of the same input and parameters.

  Raises:
    TypeError: if ``qt`` is not a QTensor.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quantize, dequantize
    >>> dequantize(quantize(jnp.array([0.3, -0.26]), 0.1, spec=QuantSpec()))
    Array([ 0.3, -0.3], dtype=float32)
  """
  if not isinstance(qt, QTensor):
    raise TypeError(f"qt: expected a QTensor, got {type(qt).__name__}")
  spec = qt.spec
  values = qt.codes
  shape = values.shape
  cdt = _grid.compute_dtype(qt.dtype)
  vl = _grid.to_layout(values, spec).astype(cdt)
  if spec.is_block:
    if spec.format.scale_format == "e8m0":
      block = fq._e8m0_to_float32(  # pylint: disable=protected-access
          jax.lax.bitcast_convert_type(qt.scale, jnp.uint8))
    else:
      block = qt.scale.astype(jnp.float32)
    bl = _grid.scale_to_layout(block.astype(cdt), shape, spec)
    eff = fq._block_effective(bl, qt.tensor_scale)  # pylint: disable=protected-access
    return (vl * eff).astype(qt.dtype).reshape(shape)
  s = _grid.scale_to_layout(qt.scale.astype(cdt), shape, spec)
  if qt.zero_point is not None:
    zp = qt.zero_point.astype(cdt)
    z = _grid.scale_to_layout(zp, shape, spec) if zp.ndim else zp
    y = (vl - z) * s
  else:
    y = vl * s
  return y.astype(qt.dtype).reshape(shape)


def pack(values: ArrayLike, bits: int) -> Array:
  """Packs 2- or 4-bit integer codes along the last axis into int8 bytes.

  Code ``i`` of each group of ``8 // bits`` lands in bits ``[i*bits,
  (i+1)*bits)`` of its byte (little-endian nibble order). Signed and unsigned
  codes are stored as their low ``bits`` bits.

  Args:
    values: an integer array whose last axis is a multiple of ``8 // bits``.
    bits: 2 or 4.

  Returns:
    An int8 array with the last axis divided by ``8 // bits``.

  Raises:
    ValueError: if ``bits`` is not 2 or 4, or the last axis does not divide.
    TypeError: if ``values`` is not an integer array.

  Examples:
    >>> import jax.numpy as jnp
    >>> p = pack(jnp.array([-8, 7, 1, -1], jnp.int8), 4)
    >>> p.shape, unpack(p, 4, signed=True)
    ((2,), Array([-8,  7,  1, -1], dtype=int8))
  """
  if bits not in (2, 4):
    raise ValueError(f"bits: pack supports 2 or 4 bits, got {bits}")
  values = jnp.asarray(values)
  if not jnp.issubdtype(values.dtype, jnp.integer):
    raise TypeError(f"values: expected an integer array, got {values.dtype}")
  per = 8 // bits
  if values.ndim == 0 or values.shape[-1] % per:
    raise ValueError(f"values: last axis ({values.shape[-1:] or 'scalar'}) must be a multiple of "
                     f"{per} to pack {bits}-bit codes")
  v = (values.astype(jnp.int32) & ((1 << bits) - 1)).reshape(values.shape[:-1] + (-1, per))
  shifts = jnp.arange(per, dtype=jnp.int32) * bits
  byte = jnp.sum(v << shifts, axis=-1)
  return byte.astype(jnp.uint8).view(jnp.int8)


def unpack(packed: ArrayLike, bits: int, signed: bool = True) -> Array:
  """Inverse of :func:`pack`.

  Args:
    packed: the int8 (or uint8) array from :func:`pack`.
    bits: 2 or 4.
    signed: sign-extend the codes (int8 result) or not (uint8 result).

  Returns:
    The codes, with the last axis multiplied by ``8 // bits``.

  Raises:
    ValueError: if ``bits`` is not 2 or 4.
    TypeError: if ``packed`` is not a (u)int8 array.

  Examples:
    >>> import jax.numpy as jnp
    >>> unpack(pack(jnp.array([3, 0, 1, 2], jnp.uint8), 2), 2, signed=False)
    Array([3, 0, 1, 2], dtype=uint8)
  """
  if bits not in (2, 4):
    raise ValueError(f"bits: unpack supports 2 or 4 bits, got {bits}")
  packed = jnp.asarray(packed)
  if packed.dtype not in (jnp.int8, jnp.uint8):
    raise TypeError(f"packed: expected an int8 or uint8 array, got {packed.dtype}")
  per = 8 // bits
  b = packed.view(jnp.uint8).astype(jnp.int32)
  shifts = jnp.arange(per, dtype=jnp.int32) * bits
  v = (b[..., None] >> shifts) & ((1 << bits) - 1)
  if signed:
    v = jnp.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
  v = v.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))
  return v.astype(jnp.int8 if signed else jnp.uint8)



def pack_qtensor(qt: QTensor) -> QTensor:
  """Packs a 2- or 4-bit integer :class:`QTensor`'s codes along the last axis.

  Codes of formats wider than 4 bits, non-integer formats, already packed
  tensors and tensors whose last axis is not a multiple of ``8 // bits`` are
  returned unchanged (a 3-bit format is stored as 4-bit codes).

  Args:
    qt: the quantized tensor.

  Returns:
    A :class:`QTensor` with ``packed`` set (2 or 4) whose ``values`` take
    ``bits/8`` of the unpacked bytes, or ``qt`` itself.

  Raises:
    TypeError: if ``qt`` is not a QTensor.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quantize, dequantize
    >>> qt = quantize(jnp.array([[0.5, -1.0, 0.25, 0.75]]), 0.25, spec=QuantSpec(format="int4"))
    >>> p = pack_qtensor(qt)
    >>> p.values.shape, p.shape, bool((dequantize(p) == dequantize(qt)).all())
    ((1, 2), (1, 4), True)
  """
  if not isinstance(qt, QTensor):
    raise TypeError(f"qt: expected a QTensor, got {type(qt).__name__}")
  fmt = qt.spec.format
  if qt.packed or not qt.spec.is_int or fmt.bits > 4 or not qt.values.ndim:
    return qt
  bits = 2 if fmt.bits <= 2 else 4
  if qt.values.shape[-1] % (8 // bits):
    return qt
  return dataclasses.replace(qt, values=pack(qt.values, bits), packed=bits)
