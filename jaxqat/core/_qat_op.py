r"""One QAT op: a matmul, einsum or convolution of fake-quantized operands.

:func:`qat_op` is the op a quantized layer runs during QAT, written once for
every front end. It takes the float input ``x``, the float weight ``w`` and
each operand's current range (the quantizer state, resolved: step size, zero
point, LSQ+ offset), and runs in one of two compute modes:

* ``compute="fake"`` (the default): ``op(fq(x), fq(w))``, the fake-quant
  forward, with a lean backward: the step keeps ``x``, ``w`` and the ranges,
  not the fake-quantized copies, masks or step-size derivatives of the
  operands; the backward recomputes the (cheap, elementwise) fake
  quantization from them. Values and gradients are those of the plain
  composition, bit for bit.
* ``compute="integer"``: the forward quantizes both operands to int8 codes
  and runs an int8 x int8 -> int32 op with one rescale
  (:func:`~jaxqat.core.integer_forward`; Jacob et al. 2018, "Quantization
  and training of neural networks for efficient integer-arithmetic-only
  inference"); the backward is the same as ``"fake"``'s. The forward equals
  the fake-quant forward up to float summation order
  (:func:`~jaxqat.core.integer_error_bound`).

**Backward (textbook STE).** With :math:`\hat{x} = fq(x)`,
:math:`\hat{w} = fq(w)` and :math:`y = \hat{x} \hat{w}` (for a matmul), the
cotangent :math:`g` of :math:`y` gives

.. math::
   \bar{x} = (g \hat{w}^T) \odot 1[q_{min} \le x/s + z \le q_{max}],\qquad
   \bar{w} = (\hat{x}^T g) \odot 1[\dots],

the gradient through the quantized operands, masked outside the clipping
range. A learned (LSQ) step size gets, per element,

.. math::
   \frac{\partial \hat{v}}{\partial s} = \begin{cases}
   \lfloor v/s \rceil - v/s & q_{min} < v/s < q_{max} \\
   q_{min} \text{ or } q_{max} & \text{outside}\end{cases}

scaled by :math:`1/\sqrt{N Q_p}` (Esser et al. 2020, "Learned step size
quantization"), and an LSQ+ offset :math:`\beta` the clipped elements'
gradient (Bhalgat et al. 2020). Both modes compute exactly this backward: the
vjp of the fake-quant composition at the saved inputs.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax

from jaxqat.core import _integer
from jaxqat.core._rules import COMPUTE_MODES
from jaxqat.core import _spec as spec_lib
from jaxqat.core._typing import Array, ArrayLike

__all__ = ["qat_op", "COMPUTE_MODES"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lean_fake(cfg, x, w, a, wq):
  return _integer._fake_op(cfg, x, w, a, wq)  # pylint: disable=protected-access


def _lean_fake_fwd(cfg, x, w, a, wq):
  return _integer._fake_op(cfg, x, w, a, wq), (x, w, a, wq)  # pylint: disable=protected-access


def _lean_fake_bwd(cfg, res, g):
  return _integer.recompute_bwd(
      functools.partial(_integer._fake_op, cfg), res, g)  # pylint: disable=protected-access


_lean_fake.defvjp(_lean_fake_fwd, _lean_fake_bwd)


def _check_quant(q, name: str) -> Optional[spec_lib.QuantSpec]:
  if q is None:
    return None
  if (not isinstance(q, (tuple, list)) or not 1 <= len(q) <= 4
      or not isinstance(q[0], spec_lib.QuantSpec)):
    raise TypeError(f"{name}: expected None or a tuple (spec, scale, zero_point, offset) whose "
                    f"spec is a jaxqat QuantSpec, got {q!r:.80}")
  return q[0]


def qat_op(
    op: str,
    x: ArrayLike,
    w: ArrayLike,
    *,
    act: Optional[tuple],
    weight: Optional[tuple],
    compute: str = "fake",
    weight_tracked: bool = False,
    **op_kwargs,
) -> Array:
  """``op(fq(x), fq(w))``, the op of a quantized layer in training (see the module docstring).

  Args:
    op: ``"dot_general"``, ``"einsum"``, ``"conv_general_dilated"`` or
      ``"conv_transpose"`` (its integer forward is the convolution
      ``lax.conv_transpose`` runs, on the kernel codes laid out as it reads
      them).
    x: the float input (the left operand).
    w: the float weight (the right operand).
    act: None (the input is not quantized) or ``(spec, scale, zero_point,
      offset)`` of the input quantizer, as
      :func:`~jaxqat.core.quant_dequant` takes them (``scale`` is the step
      size ``s``, also for LSQ; trailing entries may be left out).
    weight: the same for the weight quantizer.
    compute: ``"fake"`` (fake-quant forward, lean backward) or
      ``"integer"`` (int8 x int8 -> int32 forward, same backward).
    weight_tracked: ``True`` when ``weight``'s range is
      :func:`~jaxqat.core.weight_range` of this very ``w`` (a fixed-range
      weight that is not frozen, as every front end tracks it). If the
      spec is a signed symmetric integer grid with absmax ranges
      (:func:`~jaxqat.core.unclipped_weight`), no weight can clip, and the
      backward leaves out the clip mask: the same gradient for every
      finite weight, one pass less over the kernel. Ignored otherwise.
    **op_kwargs: the keyword arguments of ``jax.lax.dot_general`` /
      ``jax.lax.conv_general_dilated`` / ``jax.lax.conv_transpose``
      (``dimension_numbers``, ``window_strides``, ``strides``,
      ``transpose_kernel``...), or ``subscripts`` and the keyword arguments
      of ``jnp.einsum``.

  Returns:
    The op's output (float).

  Raises:
    ValueError: if ``op`` or ``compute`` is unknown, or, for
      ``compute="integer"``, if the operands cannot take the integer path
      (the message says why: a weight-only layer, a per-block or float
      format, a per-channel input, scales along a contracted axis...).
    TypeError: if ``act`` or ``weight`` is not None or a tuple led by a
      QuantSpec, or ``weight_tracked`` is not a bool.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, qat_op
    >>> a = (QuantSpec(learning="lsq"), jnp.float32(0.5))
    >>> wq = (QuantSpec(), jnp.float32(0.25))
    >>> dims = (((1,), (0,)), ((), ()))
    >>> x, w = jnp.array([[0.3, 1.2]]), jnp.array([[0.3], [-0.6]])
    >>> qat_op("dot_general", x, w, act=a, weight=wq, dimension_numbers=dims)
    Array([[-0.375]], dtype=float32)
    >>> qat_op("dot_general", x, w, act=a, weight=wq, compute="integer",
    ...        dimension_numbers=dims)
    Array([[-0.375]], dtype=float32)
    >>> jax.grad(lambda w: qat_op("dot_general", x, w, act=a, weight=wq,
    ...                           dimension_numbers=dims).sum())(w)
    Array([[0.5],
           [1. ]], dtype=float32)
    >>> qat_op("dot_general", x, w, act=None, weight=wq, compute="integer",
    ...        dimension_numbers=dims)
    Traceback (most recent call last):
    ...
    ValueError: qat_op: compute='integer' cannot run this dot_general in integer arithmetic: the input is not quantized (weight-only)
  """
  if op not in _integer._OPS:  # pylint: disable=protected-access
    raise ValueError(f"op: expected one of {tuple(_integer._OPS)}, got {op!r}")  # pylint: disable=protected-access
  if compute not in COMPUTE_MODES:
    raise ValueError(f"compute: expected one of {COMPUTE_MODES}, got {compute!r}")
  aspec, wspec = _check_quant(act, "act"), _check_quant(weight, "weight")
  if not isinstance(weight_tracked, bool):
    raise TypeError(f"weight_tracked: expected a bool, got {weight_tracked!r:.80}")
  if compute == "integer":
    reason = _integer.op_reason(op, jax.numpy.shape(x), jax.numpy.shape(w), aspec, wspec,
                                op_kwargs)
    if reason is not None:
      raise ValueError(f"qat_op: compute='integer' cannot run this {op} in integer "
                       f"arithmetic: {reason}")
    return _integer.integer_forward(op, x, w, act=act, weight=weight,
                                    weight_tracked=weight_tracked, **op_kwargs)
  cfg = (op, aspec, wspec, _integer._freeze_kw(op_kwargs),  # pylint: disable=protected-access
         weight_tracked and _integer.unclipped_weight(wspec))
  if aspec is None and wspec is None:
    return _integer._OPS[op](x, w, dict(cfg[3]))  # pylint: disable=protected-access
  return _lean_fake(cfg, x, w, _integer._ranges(act), _integer._ranges(weight))  # pylint: disable=protected-access
