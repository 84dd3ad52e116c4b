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
"""

from __future__ import annotations

from jaxqat.core import _formats as formats_lib
from jaxqat.core import _rules as rules_lib
from jaxqat.core import _spec as spec_lib

__all__ = ["default_weight_spec", "default_act_spec", "default_rules"]


def default_weight_spec() -> spec_lib.QuantSpec:
  """int8 symmetric narrow-range weights, one scale per output channel, absmax.

  Returns:
    The :class:`~jaxqat.core.QuantSpec` used for weights by
    :func:`default_rules`.

  Examples:
    >>> spec = default_weight_spec()
    >>> spec.qmin, spec.qmax, spec.granularity, spec.calibration.method
    (-127, 127, PerOutputChannel(), 'absmax')
  """
  return spec_lib.QuantSpec(format=formats_lib.IntFormat(bits=8, signed=True, narrow=True),
                            granularity=spec_lib.PerOutputChannel(), symmetric=True,
                            calibration="absmax")


def default_act_spec() -> spec_lib.QuantSpec:
  """int8 affine per-tensor input activations, min/max calibration.

  Returns:
    The :class:`~jaxqat.core.QuantSpec` used for input activations by
    :func:`default_rules`.

  Examples:
    >>> spec = default_act_spec()
    >>> spec.symmetric, spec.granularity, spec.calibration.method
    (False, PerTensor(), 'minmax')
  """
  return spec_lib.QuantSpec(format="int8", granularity=spec_lib.PerTensor(), symmetric=False,
                            calibration="minmax")


def default_rules() -> list[rules_lib.Rule]:
  """W8A8: :func:`default_weight_spec` weights and :func:`default_act_spec` inputs.

  Returns:
    A list with one catch-all :class:`~jaxqat.core.Rule`.

  Examples:
    >>> [r.pattern for r in default_rules()]
    ['.*']
    >>> default_rules()[0].weight == default_weight_spec()
    True
  """
  return [rules_lib.Rule(pattern=".*", weight=default_weight_spec(), act=default_act_spec())]
