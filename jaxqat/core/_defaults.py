"""The default quantization scheme, defined once for every front end.

W8A8, the scheme every front end (NNX, Linen, Keras) uses when ``rules`` is
``None``:

* weights: int8, symmetric on the narrow range ``[-127, 127]`` (so that
  ``-q`` is representable and an int8 x int8 product never overflows on
  negation), one scale per output channel (:class:`PerOutputChannel`,
  resolved by each layer), range from the absolute maximum. During QAT the
  range tracks the current weight at every step (see :mod:`jaxqat.core`).
* input activations: int8 **affine** per tensor, range from the min/max of
  the calibration data. Affine, because most inputs follow a ReLU/GELU or are
  images in ``[0, 1]``, and a symmetric grid would waste half its codes.

Range learning (AIMET's two QAT modes), one switch, ``range_learning``, the
same for every front end:

* ``range_learning=False`` (the default): QAT without range learning. Weight
  ranges are not learned: they track the current weight at every step
  (``learning="fixed"``); activation ranges are calibrated, then fixed.
* ``range_learning=True``: QAT with range learning. Weight step sizes are
  learned with LSQ (Esser et al. 2020, "Learned step size quantization"),
  affine activation step sizes and offsets with LSQ+ (Bhalgat et al. 2020);
  both start from calibration (activations from the calibrated range,
  weights from the current weights) and get their own optimizer partition
  (``qat_optimizer``).
"""

from __future__ import annotations

from typing import Optional

from jaxqat.core import _formats as formats_lib
from jaxqat.core import _rules as rules_lib
from jaxqat.core import _spec as spec_lib

__all__ = ["default_weight_spec", "default_act_spec", "default_rules"]


def _check_bits(bits, name: str) -> int:
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
    raise ValueError(f"{name}: must be an int in [2, 16], got {bits!r}")
  return bits


def _check_switch(range_learning) -> bool:
  if not isinstance(range_learning, bool):
    raise TypeError(f"range_learning: must be True (LSQ/LSQ+ range learning) or False (fixed "
                    f"ranges), got {range_learning!r}")
  return range_learning


def default_weight_spec(*, bits: int = 8, range_learning: bool = False) -> spec_lib.QuantSpec:
  """int8 symmetric narrow-range weights, one scale per output channel, absmax.

  Args:
    bits: the integer bit width (2 to 16; narrow range, so 2 bits is
      ternary ``{-1, 0, 1}``).
    range_learning: ``False``: the range tracks the weight at every step
      (``learning="fixed"``); ``True``: LSQ learned step size
      (``learning="lsq"``), initialised from the weights.

  Returns:
    The :class:`~jaxqat.core.QuantSpec` used for weights by
    :func:`default_rules`.

  Examples:
    >>> spec = default_weight_spec()
    >>> spec.qmin, spec.qmax, spec.granularity, spec.calibration.method
    (-127, 127, PerOutputChannel(), 'absmax')
    >>> spec = default_weight_spec(bits=4, range_learning=True)
    >>> spec.qmin, spec.qmax, spec.learning
    (-7, 7, 'lsq')
  """
  bits = _check_bits(bits, "bits")
  learning = "lsq" if _check_switch(range_learning) else "fixed"
  return spec_lib.QuantSpec(format=formats_lib.IntFormat(bits=bits, signed=True, narrow=True),
                            granularity=spec_lib.PerOutputChannel(), symmetric=True,
                            calibration="absmax", learning=learning)


def default_act_spec(*, bits: int = 8, range_learning: bool = False) -> spec_lib.QuantSpec:
  """int8 affine per-tensor input activations, min/max calibration.

  Args:
    bits: the integer bit width (2 to 16).
    range_learning: ``False``: the calibrated range stays fixed
      (``learning="fixed"``); ``True``: LSQ+ learned step size and offset
      (``learning="lsq_plus"``), initialised from the calibrated range.

  Returns:
    The :class:`~jaxqat.core.QuantSpec` used for input activations by
    :func:`default_rules`.

  Examples:
    >>> spec = default_act_spec()
    >>> spec.symmetric, spec.granularity, spec.calibration.method
    (False, PerTensor(), 'minmax')
    >>> default_act_spec(bits=4, range_learning=True).learning
    'lsq_plus'
  """
  bits = _check_bits(bits, "bits")
  learning = "lsq_plus" if _check_switch(range_learning) else "fixed"
  fmt = formats_lib.get_format("int8") if bits == 8 else formats_lib.IntFormat(bits=bits)
  return spec_lib.QuantSpec(format=fmt, granularity=spec_lib.PerTensor(), symmetric=False,
                            calibration="minmax", learning=learning)


def default_rules(*, weight_bits: int = 8, act_bits: Optional[int] = 8,
                  range_learning: bool = False, compute: str = "fake") -> list[rules_lib.Rule]:
  """W8A8: :func:`default_weight_spec` weights and :func:`default_act_spec` inputs.

  The keyword arguments give the other QAT schemes of the same family:
  ``default_rules(weight_bits=4)`` is W4A8, ``act_bits=None`` quantizes
  weights only, and ``range_learning`` is the switch between AIMET's two QAT
  modes (see the module docstring), the same in every front end.

  Args:
    weight_bits: weight bit width (2 to 16).
    act_bits: input-activation bit width (2 to 16), or ``None`` for
      weight-only quantization.
    range_learning: ``False`` (default): fixed ranges (weights tracked every
      step, activations calibrated then fixed); ``True``: LSQ weights and
      LSQ+ activations initialised from calibration.
    compute: the rule's compute mode (:attr:`~jaxqat.core.Rule.compute`):
      ``"fake"`` or ``"integer"`` (int8 forward; needs ``act_bits`` and
      both bit widths <= 8).

  Returns:
    A list with one catch-all :class:`~jaxqat.core.Rule`.

  Raises:
    ValueError: if a bit width is not an int in [2, 16].
    TypeError: if ``range_learning`` is not a bool.
    ValueError: if ``compute`` is not ``"fake"`` or ``"integer"``.

  Examples:
    >>> [r.pattern for r in default_rules()]
    ['.*']
    >>> default_rules()[0].weight == default_weight_spec()
    True
    >>> r = default_rules(weight_bits=4, range_learning=True)[0]
    >>> r.weight.format.bits, r.weight.learning, r.act.learning
    (4, 'lsq', 'lsq_plus')
    >>> default_rules(act_bits=None)[0].act is None
    True
    >>> default_rules(compute="integer")[0].compute
    'integer'
    >>> default_rules(range_learning="lsq")
    Traceback (most recent call last):
    ...
    TypeError: range_learning: must be True (LSQ/LSQ+ range learning) or False (fixed ranges), got 'lsq'
  """
  _check_bits(weight_bits, "weight_bits")
  if act_bits is not None:
    _check_bits(act_bits, "act_bits")
  act = (None if act_bits is None
         else default_act_spec(bits=act_bits, range_learning=range_learning))
  return [rules_lib.Rule(pattern=".*",
                         weight=default_weight_spec(bits=weight_bits, range_learning=range_learning),
                         act=act, compute=compute)]
