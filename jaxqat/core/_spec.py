"""QuantSpec: how one tensor is quantized.

A :class:`QuantSpec` is a frozen, hashable dataclass, so it can be a static
argument of :func:`jax.jit` and a ``nondiff_argnums`` argument of
:func:`jax.custom_vjp`. It says *what* grid (the format), *how the grid is
scaled* (granularity, symmetric or affine), *where the scale comes from*
(calibration method, or learned with LSQ / LSQ+) and *how to round*.

Scale shapes, for an input ``x`` of shape ``S``:

* per tensor: a scalar (shape ``()``; any shape of size 1 is accepted);
* per channel on axes ``A``: ``S`` with every axis not in ``A`` set to 1
  (``keepdims`` layout, broadcastable against ``x``); a 1-D array of the
  channel count is accepted for a single axis;
* per block of ``size`` along ``axis``: ``S`` with ``S[axis]`` replaced by
  ``S[axis] // size``; every other axis keeps its size.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

from jaxqat.core import _formats as formats_lib

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerBlock",
    "PerOutputChannel",
    "Granularity",
    "Calibration",
    "QuantSpec",
    "CALIBRATION_METHODS",
    "LEARNING_MODES",
    "ROUNDING_MODES",
]

CALIBRATION_METHODS = ("absmax", "minmax", "ema", "percentile", "mse", "entropy")
LEARNING_MODES = ("fixed", "lsq", "lsq_plus")
ROUNDING_MODES = ("nearest_even", "stochastic")


@dataclasses.dataclass(frozen=True)
class PerTensor:
  """One scale for the whole tensor.

  Examples:
    >>> PerTensor()
    PerTensor()
  """


@dataclasses.dataclass(frozen=True)
class PerChannel:
  """One scale per index of ``axis`` (an int or a tuple of ints).

  Examples:
    >>> PerChannel(-1).axes
    (-1,)
    >>> PerChannel((0, 2)).axes
    (0, 2)
  """

  axis: Union[int, tuple[int, ...]] = -1  # the channel axis (or axes)

  def __post_init__(self):
    axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
      raise TypeError(f"PerChannel: axis must be an int or a tuple of ints, got {self.axis!r}")
    if len(set(axes)) != len(axes):
      raise ValueError(f"PerChannel: axis has repeated entries: {self.axis!r}")
    object.__setattr__(self, "axis", axes[0] if len(axes) == 1 else tuple(axes))

  @property
  def axes(self) -> tuple[int, ...]:
    return self.axis if isinstance(self.axis, tuple) else (self.axis,)


@dataclasses.dataclass(frozen=True)
class PerBlock:
  """One scale per ``size`` contiguous elements along ``axis``.

  Examples:
    >>> PerBlock(32, axis=0)
    PerBlock(size=32, axis=0)
  """

  size: int  # elements per block
  axis: int = -1  # the axis the blocks run along

  def __post_init__(self):
    if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
      raise ValueError(f"PerBlock: size must be a positive int, got {self.size!r}")
    if isinstance(self.axis, bool) or not isinstance(self.axis, int):
      raise TypeError(f"PerBlock: axis must be an int, got {self.axis!r}")


@dataclasses.dataclass(frozen=True)
class PerOutputChannel:
  """One scale per output channel of a weight, whichever axes those are.

  A weight spec for rules that match layers of different kinds: each front
  end (Flax NNX and Linen, Keras) resolves it, per layer, to
  ``PerChannel(axes)`` with ``axes`` the weight axes that the layer's matmul
  or convolution does not contract -- the last axis of a ``Dense``/``Linear``
  or ``Conv`` kernel, the output (and batch) axes of a ``DenseGeneral``
  kernel, the kernel axes of an ``Einsum`` that appear in its output, both
  channel axes of a depthwise kernel, the rows of an embedding table -- and
  to :class:`PerTensor` when there are none. The core primitives need
  concrete axes: resolve it with :meth:`QuantSpec.resolve_output_channel`.

  Examples:
    >>> spec = QuantSpec(format="int4", granularity=PerOutputChannel())
    >>> spec.resolve_output_channel((0, 2)).granularity
    PerChannel(axis=(0, 2))
  """


Granularity = Union[PerTensor, PerChannel, PerBlock, PerOutputChannel]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
  """How an observer turns statistics into a range.

  Attributes:
    method: one of ``absmax``, ``minmax``, ``ema`` (EMA of batch min/max),
      ``percentile`` (histogram), ``mse`` (search the clipping range that
      minimizes the quantization MSE over a histogram), ``entropy`` (the
      TensorRT KL-divergence method over a histogram).
    ema_decay: decay of the ``ema`` method, in ``[0, 1)``.
    percentile: the percentile kept by ``percentile``, in ``(0, 100]``.
    num_bins: histogram bins for ``percentile``, ``mse`` and ``entropy``.
    num_candidates: clipping ranges tried by ``mse`` and ``entropy``.

  Examples:
    >>> Calibration(method="percentile", percentile=99.9).percentile
    99.9
  """

  method: str = "absmax"
  ema_decay: float = 0.9
  percentile: float = 99.99
  num_bins: int = 2048
  num_candidates: int = 128

  def __post_init__(self):
    if self.method not in CALIBRATION_METHODS:
      raise ValueError(f"Calibration: method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"Calibration: ema_decay must be in [0, 1), got {self.ema_decay}")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"Calibration: percentile must be in (0, 100], got {self.percentile}")
    if not isinstance(self.num_bins, int) or self.num_bins < 16:
      raise ValueError(f"Calibration: num_bins must be an int >= 16, got {self.num_bins!r}")
    if not isinstance(self.num_candidates, int) or self.num_candidates < 2:
      raise ValueError(f"Calibration: num_candidates must be an int >= 2, got {self.num_candidates!r}")


_UNRESOLVED = ("QuantSpec.granularity: PerOutputChannel() is resolved to axes by the layer "
               "that uses the weight; outside a layer call "
               "spec.resolve_output_channel(axes) first")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How to quantize one tensor.

  Attributes:
    format: an :class:`~jaxqat.core.formats.IntFormat`,
      :class:`~jaxqat.core.formats.FloatFormat`,
      :class:`~jaxqat.core.formats.BlockFormat`, or a name accepted by
      :func:`~jaxqat.core.formats.get_format` (``"int8"``, ``"fp8_e4m3"``,
      ``"nvfp4"``...).
    granularity: :class:`PerTensor`, :class:`PerChannel`, :class:`PerBlock`
      or :class:`PerOutputChannel` (weights; resolved per layer). Block
      formats always use their own block size (``PerBlock`` is filled in when
      left per tensor).
    symmetric: a zero point of 0 (symmetric) or a learned/calibrated integer
      zero point (affine; integer formats only).
    calibration: a :class:`Calibration` or a method name.
    learning: ``"fixed"`` (range from calibration, gradients to the input
      only), ``"lsq"`` (learned step size; Esser et al. 2020) or
      ``"lsq_plus"`` (learned step size and offset; Bhalgat et al. 2020;
      needs ``symmetric=False``).
    rounding: ``"nearest_even"`` or ``"stochastic"`` (needs a PRNG key).

  Examples:
    >>> spec = QuantSpec(format="int4", granularity=PerChannel(-1))
    >>> spec.format.qmin, spec.format.qmax
    (-8, 7)
    >>> hash(spec) == hash(QuantSpec(format="int4", granularity=PerChannel(-1)))
    True
    >>> QuantSpec(format="fp8", symmetric=False)
    Traceback (most recent call last):
    ...
    ValueError: QuantSpec.symmetric: affine (symmetric=False) needs an integer format, got fp8_e4m3
  """

  format: Union[formats_lib.Format, str] = "int8"
  granularity: Granularity = PerTensor()
  symmetric: bool = True
  calibration: Union[Calibration, str] = Calibration()
  learning: str = "fixed"
  rounding: str = "nearest_even"

  def __post_init__(self):
    try:
      fmt = formats_lib.get_format(self.format)
    except (TypeError, ValueError) as e:
      raise type(e)(f"QuantSpec.format: {e}") from None
    object.__setattr__(self, "format", fmt)
    if not isinstance(self.granularity, (PerTensor, PerChannel, PerBlock, PerOutputChannel)):
      raise TypeError("QuantSpec.granularity: must be PerTensor(), PerChannel(axis), "
                      f"PerBlock(size, axis) or PerOutputChannel(), got {self.granularity!r}")
    if isinstance(fmt, formats_lib.BlockFormat):
      if isinstance(self.granularity, PerTensor):
        object.__setattr__(self, "granularity", PerBlock(fmt.block_size, -1))
      elif not (isinstance(self.granularity, PerBlock) and self.granularity.size == fmt.block_size):
        raise ValueError(f"QuantSpec.granularity: {fmt.name} needs PerBlock({fmt.block_size}, axis), "
                         f"got {self.granularity!r}")
    if isinstance(self.calibration, str):
      object.__setattr__(self, "calibration", Calibration(method=self.calibration))
    elif not isinstance(self.calibration, Calibration):
      raise TypeError(f"QuantSpec.calibration: must be a Calibration or one of "
                      f"{CALIBRATION_METHODS}, got {self.calibration!r}")
    if not isinstance(self.symmetric, bool):
      raise TypeError(f"QuantSpec.symmetric: must be a bool, got {self.symmetric!r}")
    if not self.symmetric and not isinstance(fmt, formats_lib.IntFormat):
      raise ValueError("QuantSpec.symmetric: affine (symmetric=False) needs an integer format, "
                       f"got {fmt.name}")
    if self.learning not in LEARNING_MODES:
      raise ValueError(f"QuantSpec.learning: must be one of {LEARNING_MODES}, got {self.learning!r}")
    if self.learning == "lsq_plus" and self.symmetric:
      raise ValueError("QuantSpec.learning: 'lsq_plus' learns an offset and needs symmetric=False")
    if self.learning != "fixed" and isinstance(fmt, formats_lib.BlockFormat):
      raise ValueError(f"QuantSpec.learning: block format {fmt.name} derives its scales from the "
                       f"data; learning must be 'fixed', got {self.learning!r}")
    if self.rounding not in ROUNDING_MODES:
      raise ValueError(f"QuantSpec.rounding: must be one of {ROUNDING_MODES}, got {self.rounding!r}")
    if self.rounding == "stochastic" and not isinstance(fmt, formats_lib.IntFormat):
      raise ValueError("QuantSpec.rounding: 'stochastic' is only implemented for integer formats")

  # Convenience -------------------------------------------------------------

  @property
  def qmin(self) -> float:
    """Lowest grid value (integer code, or -max for float formats)."""
    return self.format.qmin

  @property
  def qmax(self) -> float:
    """Highest grid value (integer code, or max for float formats)."""
    return self.format.qmax

  @property
  def is_block(self) -> bool:
    return isinstance(self.format, formats_lib.BlockFormat)

  @property
  def is_int(self) -> bool:
    return isinstance(self.format, formats_lib.IntFormat)

  @property
  def is_float(self) -> bool:
    return isinstance(self.format, formats_lib.FloatFormat)

  def replace(self, **changes) -> "QuantSpec":
    """Returns a copy with ``changes`` applied (validated again).

    Examples:
      >>> QuantSpec().replace(format="int4").format.bits
      4
    """
    return dataclasses.replace(self, **changes)

  @property
  def is_output_channel(self) -> bool:
    """Whether the granularity is :class:`PerOutputChannel` (still to be resolved)."""
    return isinstance(self.granularity, PerOutputChannel)

  def resolve_output_channel(self, axes: Sequence[int]) -> "QuantSpec":
    """Replaces :class:`PerOutputChannel` with concrete channel axes.

    Args:
      axes: the weight's output-channel axes (may be empty).

    Returns:
      ``self`` unless the granularity is ``PerOutputChannel()``; then a copy
      with ``PerChannel(axes)``, or ``PerTensor()`` if ``axes`` is empty.

    Raises:
      TypeError: if an axis is not an int.

    Examples:
      >>> QuantSpec(granularity=PerOutputChannel()).resolve_output_channel([-1]).granularity
      PerChannel(axis=-1)
      >>> QuantSpec(granularity=PerOutputChannel()).resolve_output_channel(()).granularity
      PerTensor()
    """
    if not self.is_output_channel:
      return self
    axes = tuple(axes)
    if not axes:
      return self.replace(granularity=PerTensor())
    return self.replace(granularity=PerChannel(axes[0] if len(axes) == 1 else axes))

  def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the scale (and zero point) for an input of ``shape``.

    Args:
      shape: the input's shape.

    Returns:
      ``()`` per tensor; the keepdims shape per channel; the blocked shape
      per block (see the module docstring).

    Raises:
      ValueError: if an axis is out of range, the block size does not
        divide the blocked axis, or the granularity is an unresolved
        :class:`PerOutputChannel`.

    Examples:
      >>> QuantSpec(granularity=PerChannel(0)).scale_shape((16, 8))
      (16, 1)
      >>> QuantSpec(granularity=PerBlock(4, axis=1)).scale_shape((2, 8))
      (2, 2)
    """
    # Symbolic dimensions (jax.export shape polymorphism) stay symbolic.
    shape = tuple(d if hasattr(d, "dimension_as_value") else int(d) for d in shape)
    g = self.granularity
    if isinstance(g, PerOutputChannel):
      raise ValueError(_UNRESOLVED)
    if isinstance(g, PerTensor):
      return ()
    if isinstance(g, PerChannel):
      axes = normalize_axes(g.axes, len(shape), "granularity.axis")
      return tuple(d if i in axes else 1 for i, d in enumerate(shape))
    (axis,) = normalize_axes((g.axis,), len(shape), "granularity.axis")
    if shape[axis] % g.size:
      raise ValueError(f"QuantSpec.granularity: block size {g.size} does not divide axis {g.axis} "
                       f"of size {shape[axis]} (shape {shape})")
    out = list(shape)
    out[axis] = shape[axis] // g.size
    return tuple(out)


def normalize_axes(axes: Sequence[int], ndim: int, name: str = "axis") -> tuple[int, ...]:
  """Maps possibly negative axes into ``[0, ndim)``.

  Args:
    axes: the axes.
    ndim: the rank of the array they index.
    name: the argument name used in the error message.

  Returns:
    The non-negative axes, in the given order.

  Raises:
    ValueError: if an axis is out of range for ``ndim``.

  Examples:
    >>> normalize_axes((-1, 0), 3)
    (2, 0)
  """
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{name}: axis {a} is out of range for an input of rank {ndim}")
    out.append(a % ndim)
  return tuple(out)
