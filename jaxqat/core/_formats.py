"""Number formats: integers of any width, small floats and block-scaled formats.

A format describes the *grid* a value is rounded onto, nothing else. How the
grid is scaled (per tensor, per channel, per block) is the job of
:class:`jaxqat.core.QuantSpec`.

* :class:`IntFormat` -- ``bits``-wide two's complement or unsigned integers,
  optionally with a narrow (symmetric) range such as ``[-127, 127]``.
* :class:`FloatFormat` -- IEEE-like minifloats without infinities: fp8 e4m3fn
  and e5m2, fp6 e3m2 / e2m3, fp4 e2m1 (OCP Microscaling spec v1.0 and the
  OCP 8-bit floating point spec).
* :class:`BlockFormat` -- a float element format with one shared scale per
  block of contiguous elements: ``nvfp4`` (16-element blocks, e4m3 block
  scale, fp32 tensor scale) and OCP ``mxfp4`` / ``mxfp6`` / ``mxfp8``
  (32-element blocks, power-of-two e8m0 scale).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import ml_dtypes
import numpy as np

__all__ = [
    "IntFormat",
    "FloatFormat",
    "BlockFormat",
    "Format",
    "get_format",
    "INT2",
    "INT4",
    "INT8",
    "UINT8",
    "INT16",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP6_E3M2",
    "FP6_E2M3",
    "FP4_E2M1",
    "NVFP4",
    "MXFP4",
    "MXFP6",
    "MXFP8",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntFormat:
  """An integer grid ``[qmin, qmax]``.

  Attributes:
    bits: bit width, 2 to 16.
    signed: two's complement (``True``) or unsigned (``False``).
    narrow: drop the most negative code so the range is symmetric, e.g.
      ``[-127, 127]`` for signed 8 bits (common for weights). Only allowed
      for signed formats.

  Raises:
    TypeError: if ``bits`` is not an int, or ``signed`` / ``narrow`` is not a
      bool (a string such as ``"no"`` is refused rather than read as true).
    ValueError: if ``bits`` is outside ``[2, 16]`` or ``narrow`` is set on an
      unsigned format.

  Examples:
    >>> IntFormat(bits=8).qmin, IntFormat(bits=8).qmax
    (-128, 127)
    >>> IntFormat(bits=4, narrow=True).qmin
    -7
    >>> IntFormat(bits=8, signed=False).qmax
    255
  """

  bits: int = 8  # bit width, 2..16
  signed: bool = True  # two's complement when True, unsigned otherwise
  narrow: bool = False  # symmetric signed range [-(2^(b-1)-1), 2^(b-1)-1]

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
      raise TypeError(f"IntFormat: bits must be an int, got {self.bits!r}")
    if not 2 <= int(self.bits) <= 16:
      raise ValueError(f"IntFormat: bits must be in [2, 16], got {self.bits}")
    for name in ("signed", "narrow"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"IntFormat: {name} must be a bool (True or False), got {value!r}")
      object.__setattr__(self, name, bool(value))
    if self.narrow and not self.signed:
      raise ValueError("IntFormat: narrow=True is only allowed for signed formats")
    object.__setattr__(self, "bits", int(self.bits))

  @property
  def qmin(self) -> int:
    """Smallest integer code."""
    if not self.signed:
      return 0
    return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

  @property
  def qmax(self) -> int:
    """Largest integer code."""
    if not self.signed:
      return 2**self.bits - 1
    return 2 ** (self.bits - 1) - 1

  @property
  def name(self) -> str:
    return f"{'int' if self.signed else 'uint'}{self.bits}{'_narrow' if self.narrow else ''}"

  @property
  def storage_dtype(self) -> np.dtype:
    """The smallest numpy integer dtype that holds one code unpacked."""
    if self.bits <= 8:
      return np.dtype(np.int8 if self.signed else np.uint8)
    return np.dtype(np.int16 if self.signed else np.uint16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloatFormat:
  """A minifloat grid with no infinities, saturating at ``max``.

  Values are ``(-1)^s * 2^(e - bias) * 1.m`` (normals) and
  ``(-1)^s * 2^(1 - bias) * 0.m`` (subnormals). Rounding is to nearest, ties
  to even, after clipping to ``[-max, max]``.

  Attributes:
    name: format name, e.g. ``"fp8_e4m3"``.
    ebits: exponent bits.
    mbits: explicit mantissa bits.
    bias: exponent bias.
    max: largest finite magnitude.
    dtype: the matching ml_dtypes dtype, used for storage and as a reference.

  Examples:
    >>> FP8_E4M3.max, FP4_E2M1.max
    (448.0, 6.0)
    >>> FP4_E2M1.emax
    2
  """

  name: str
  ebits: int
  mbits: int
  bias: int
  max: float
  dtype: np.dtype

  @property
  def emax(self) -> int:
    """Unbiased exponent of the largest normal number (OCP MX ``emax_elem``)."""
    return int(np.floor(np.log2(self.max)))

  @property
  def emin(self) -> int:
    """Unbiased exponent of the smallest normal number."""
    return 1 - self.bias

  @property
  def bits(self) -> int:
    return 1 + self.ebits + self.mbits

  @property
  def qmin(self) -> float:
    return -self.max

  @property
  def qmax(self) -> float:
    return self.max

  @property
  def storage_dtype(self) -> np.dtype:
    """The array dtype that holds codes in a QTensor.

    XLA has no fp6 arrays, so fp6 codes are held in float8_e4m3fn, which
    represents every e3m2 and e2m3 value exactly.
    """
    if self.bits == 6:
      return np.dtype(ml_dtypes.float8_e4m3fn)
    return self.dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockFormat:
  """Elements of a float format sharing one scale per block.

  Attributes:
    name: format name.
    element: the element :class:`FloatFormat`.
    block_size: elements per block (contiguous along the block axis).
    scale_format: ``"e8m0"`` (power of two, OCP MX) or ``"e4m3"`` (NVFP4).
    tensor_scale: whether a second, fp32 per-tensor scale is applied (NVFP4).

  Examples:
    >>> NVFP4.block_size, MXFP4.block_size
    (16, 32)
  """

  name: str
  element: FloatFormat
  block_size: int
  scale_format: str  # "e8m0" or "e4m3"
  tensor_scale: bool = False

  @property
  def bits(self) -> int:
    return self.element.bits

  @property
  def qmin(self) -> float:
    return -self.element.max

  @property
  def qmax(self) -> float:
    return self.element.max


Format = Union[IntFormat, FloatFormat, BlockFormat]


def _float_format(name, ebits, mbits, dtype) -> FloatFormat:
  info = ml_dtypes.finfo(dtype)
  bias = 2 ** (ebits - 1) - 1
  return FloatFormat(name=name, ebits=ebits, mbits=mbits, bias=bias,
                     max=float(info.max), dtype=np.dtype(dtype))


INT2 = IntFormat(bits=2)
INT4 = IntFormat(bits=4)
INT8 = IntFormat(bits=8)
UINT8 = IntFormat(bits=8, signed=False)
INT16 = IntFormat(bits=16)
FP8_E4M3 = _float_format("fp8_e4m3", 4, 3, ml_dtypes.float8_e4m3fn)
FP8_E5M2 = _float_format("fp8_e5m2", 5, 2, ml_dtypes.float8_e5m2)
FP6_E3M2 = _float_format("fp6_e3m2", 3, 2, ml_dtypes.float6_e3m2fn)
FP6_E2M3 = _float_format("fp6_e2m3", 2, 3, ml_dtypes.float6_e2m3fn)
FP4_E2M1 = _float_format("fp4_e2m1", 2, 1, ml_dtypes.float4_e2m1fn)
NVFP4 = BlockFormat(name="nvfp4", element=FP4_E2M1, block_size=16,
                    scale_format="e4m3", tensor_scale=True)
MXFP4 = BlockFormat(name="mxfp4", element=FP4_E2M1, block_size=32, scale_format="e8m0")
MXFP6 = BlockFormat(name="mxfp6", element=FP6_E2M3, block_size=32, scale_format="e8m0")
MXFP8 = BlockFormat(name="mxfp8", element=FP8_E4M3, block_size=32, scale_format="e8m0")

_NAMED = {
    f.name: f for f in (FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1,
                        NVFP4, MXFP4, MXFP6, MXFP8)
}
_ALIASES = {"fp8": FP8_E4M3, "e4m3": FP8_E4M3, "e5m2": FP8_E5M2,
            "fp8_e4m3fn": FP8_E4M3, "fp4": FP4_E2M1, "e2m1": FP4_E2M1,
            "fp6": FP6_E3M2}


def get_format(fmt: "Format | str") -> Format:
  """Returns a format object from a format or a name.

  Names: ``"int<b>"``, ``"uint<b>"`` (b in 2..16, add ``"_narrow"`` for the
  symmetric signed range), ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp6_e3m2"``,
  ``"fp6_e2m3"``, ``"fp4_e2m1"``, ``"nvfp4"``, ``"mxfp4"``, ``"mxfp6"``,
  ``"mxfp8"`` and the short aliases ``"fp8"``, ``"fp4"``, ``"fp6"``.

  Args:
    fmt: a format instance (returned as is) or a name.

  Returns:
    The format.

  Raises:
    ValueError: if the name is unknown or the bit width is out of range.
    TypeError: if ``fmt`` is neither a format nor a string.

  Examples:
    >>> get_format("int4").qmin
    -8
    >>> get_format("int8_narrow").qmin
    -127
    >>> get_format("mxfp8").element.name
    'fp8_e4m3'
  """
  if isinstance(fmt, (IntFormat, FloatFormat, BlockFormat)):
    return fmt
  if not isinstance(fmt, str):
    raise TypeError(f"format must be a format object or a name, got {type(fmt).__name__}")
  name = fmt.lower().strip()
  if name in _NAMED:
    return _NAMED[name]
  if name in _ALIASES:
    return _ALIASES[name]
  narrow = name.endswith("_narrow")
  base = name[: -len("_narrow")] if narrow else name
  for prefix, signed in (("uint", False), ("int", True)):
    if base.startswith(prefix) and base[len(prefix):].isdigit():
      return IntFormat(bits=int(base[len(prefix):]), signed=signed, narrow=narrow)
  allowed = sorted(_NAMED) + sorted(_ALIASES) + ["int<2..16>", "uint<2..16>", "int<b>_narrow"]
  raise ValueError(f"format: unknown format name {fmt!r}; allowed: {', '.join(allowed)}")
