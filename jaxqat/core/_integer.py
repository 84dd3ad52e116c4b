r"""Integer-arithmetic kernels for converted (served) models.

The front ends' ``convert`` turns a calibrated or QAT model into a serving
model that holds weight codes (:class:`~jaxqat.core.QTensor`: int8, packed
int4/int2, fp8, or block codes with their scales) and computes with these
kernels. They are written once here and shared by Flax NNX, Flax Linen and
Keras (JAX backend).

Each kernel takes the float input ``x``, the weight's :class:`QTensor` ``w``
and the input's serving :class:`~jaxqat.core.Encoding` ``act`` (``None``:
weight-only quantization) and picks one of two paths:

**Integer path.** When the input is statically quantized to an integer grid
of at most 8 bits per tensor and the weight is an integer grid of at most 8
bits per tensor or per channel on axes the op does not contract, the kernel
quantizes ``x`` to int8 codes (with the fake-quant rounding rule), runs
``lax.dot_general`` / ``lax.conv_general_dilated`` on int8 operands with
``preferred_element_type=int32`` (on CPU a convolution runs as an int8 dot over
the input's windows, the same int32 sums), subtracts the zero-point terms in int32,
and rescales once: ``y = float(acc) * (s_x * s_w)``. Unsigned input codes are
shifted by 128 into int8 (``q - z`` is unchanged).

**Dequantize path.** Otherwise (weight-only, float or block formats, per
block or per input-channel scales, or ``integer=False``), the kernel
dequantizes the weight on the fly and runs the float op on the
fake-quantized input: the arithmetic of the fake-quant model, so the result
equals it bit for bit. :func:`integer_reason` says which path a call takes
and why.

**Parity bound of the integer path.** With per-element exact integers
:math:`a_k = q_{x,k} - z_x` and :math:`b_k = q_{w,k} - z_w`, the exact result
is :math:`y^* = s_x s_w \sum_k a_k b_k`. The integer accumulator is exact
(the kernel checks :math:`K \cdot \max|a| \max|b| < 2^{31}`); converting it to
float32 and the two products :math:`s_x s_w` and :math:`acc \cdot (s_x s_w)`
cost at most :math:`\gamma_3 = 3u/(1-3u)` relative (:math:`u = 2^{-24}`).
The fake-quant path forms :math:`\hat{x}_k = s_x a_k` and
:math:`\hat{w}_k = s_w b_k` (one rounding each) and a float sum of ``K``
products, within :math:`\gamma_{K+2} \sum_k |\hat{x}_k \hat{w}_k|` of
:math:`y^*` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002,
eq. 3.5). Hence

.. math::
   |y_{int} - y_{fq}| \le (\gamma_{K+2} + \gamma_3)\, s_x s_w \sum_k |a_k b_k|
   \,(1 + u)^2,

:func:`integer_error_bound` computes it. Whenever it is below half an output
quantization step, the next quantizer's codes agree or differ by one.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import math
import string
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxqat.core import _fake_quant as fq
from jaxqat.core import _formats as formats_lib
from jaxqat.core import _grid
from jaxqat.core import _quantize
from jaxqat.core import _spec as spec_lib
from jaxqat.core._encoding import Encoding
from jaxqat.core._typing import Array, ArrayLike

__all__ = [
    "quantize_weight",
    "fake_quantize_input",
    "integer_reason",
    "quantized_dot_general",
    "quantized_einsum",
    "quantized_conv_general_dilated",
    "quantized_conv_transpose",
    "quantized_take",
    "integer_error_bound",
    "integer_forward",
]

_INT32_LIMIT = 2**31 - 1


def quantize_weight(w: ArrayLike, enc: Encoding, *, pack: bool = True) -> _quantize.QTensor:
  """Quantizes a weight to the :class:`QTensor` a served layer holds.

  Args:
    w: the float weight, in the dtype the fake-quant layer quantizes it in.
    enc: its :class:`Encoding` (``encoding_from_state``); block formats
      derive their block scales from ``w``.
    pack: store 2- and 4-bit integer codes packed two or four to a byte
      along the last axis (when it divides).

  Returns:
    The QTensor; ``dequantize`` of it equals the fake-quant weight bit for
    bit.

  Raises:
    TypeError: if ``enc`` is not an Encoding.
    ValueError: as :func:`~jaxqat.core.quantize`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding
    >>> qt = quantize_weight(jnp.array([[0.5, -1.0]]), Encoding(jnp.float32(0.25), None,
    ...                      QuantSpec(format="int4")))
    >>> qt.packed, qt.codes
    (4, Array([[ 2, -4]], dtype=int8))
  """
  if not isinstance(enc, Encoding):
    raise TypeError(f"enc: expected an Encoding, got {type(enc).__name__}")
  qt = _quantize.quantize(w, enc.scale, enc.zero_point, enc.spec)
  return _quantize.pack_qtensor(qt) if pack else qt


def fake_quantize_input(x: ArrayLike, act: Optional[Encoding]) -> Array:
  """The fake-quantized input (``x`` itself when ``act`` is None).

  Args:
    x: the float input.
    act: its serving Encoding, or None.

  Returns:
    ``x`` fake-quantized with the encoding's fixed range: the forward value
    of the QAT model's input quantizer.

  Raises:
    TypeError: if ``act`` is neither None nor an Encoding.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding
    >>> fake_quantize_input(jnp.array([0.26]), Encoding(jnp.float32(0.1), None, QuantSpec()))
    Array([0.3], dtype=float32)
  """
  if act is None:
    return x
  if not isinstance(act, Encoding):
    raise TypeError(f"act: expected an Encoding or None, got {type(act).__name__}")
  return fq.quant_dequant(x, act.spec, act.scale, act.zero_point)


def _weight_float(w: _quantize.QTensor, dtype) -> Array:
  return _quantize.dequantize(w).astype(dtype)


def _check_w(w) -> _quantize.QTensor:
  if not isinstance(w, _quantize.QTensor):
    raise TypeError(f"w: expected a QTensor (jaxqat.core.quantize_weight), got "
                    f"{type(w).__name__}")
  return w


def _w_channel_axes(w: _quantize.QTensor) -> tuple[int, ...]:
  g = w.spec.granularity
  if isinstance(g, spec_lib.PerTensor):
    return ()
  return spec_lib.normalize_axes(g.axes, len(w.shape), "granularity.axis")


def integer_reason(w: _quantize.QTensor, act: Optional[Encoding],
                   contracting: Sequence[int] = ()) -> Optional[str]:
  """Why a kernel cannot take the integer path (``None`` when it can).

  Args:
    w: the weight's QTensor.
    act: the input's Encoding, or None (weight-only).
    contracting: the weight axes the op contracts (sums over).

  Returns:
    ``None`` or a sentence naming what rules the integer path out.

  Raises:
    TypeError: if ``w`` is not a QTensor.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding, quantize
    >>> w = quantize(jnp.ones((4, 2)), 0.1, spec=QuantSpec())
    >>> integer_reason(w, None)
    'the input is not quantized (weight-only)'
    >>> integer_reason(w, Encoding(jnp.float32(0.1), None, QuantSpec()), (0,)) is None
    True
  """
  _check_w(w)
  return _reason(w.spec, len(w.shape), None if act is None else act.spec, contracting)


def _reason(wspec, w_ndim: int, aspec, contracting) -> Optional[str]:
  if aspec is None:
    return "the input is not quantized (weight-only)"
  if not aspec.is_int or aspec.format.bits > 8:
    return f"the input format {aspec.format.name} is not an integer format of <= 8 bits"
  if not isinstance(aspec.granularity, spec_lib.PerTensor):
    return "the input is quantized per channel (the integer path needs one input scale)"
  if not wspec.is_int or wspec.format.bits > 8:
    return f"the weight format {wspec.format.name} is not an integer format of <= 8 bits"
  g = wspec.granularity
  if isinstance(g, spec_lib.PerBlock):
    return "the weight is quantized per block"
  axes = () if isinstance(g, spec_lib.PerTensor) else spec_lib.normalize_axes(
      g.axes, w_ndim, "granularity.axis")
  if set(axes) & set(a % w_ndim for a in contracting):
    return "the weight's scales vary along a contracted axis"
  return None


def _input_codes(x: Array, act: Encoding) -> tuple[Array, Array]:
  """int8 codes of ``x`` and the int32 zero point (unsigned grids shifted by 128)."""
  fmt = act.spec.format
  cdt = _grid.compute_dtype(x.dtype)
  s = jnp.maximum(act.scale.astype(cdt), _grid.SCALE_EPS)
  z = jnp.zeros((), jnp.int32) if act.zero_point is None else act.zero_point.astype(jnp.int32)
  code = jnp.clip(_grid.round_half_even(_grid.scaled(x.astype(cdt), s)) + z.astype(cdt),
                  fmt.qmin, fmt.qmax)
  code = code.astype(jnp.int32)
  if fmt.qmax > 127:
    code, z = code - 128, z - 128
  return code.astype(jnp.int8), z


def _weight_codes(w: _quantize.QTensor) -> tuple[Array, Optional[Array]]:
  """int8 weight codes and zero point (or None), unsigned grids shifted by 128."""
  codes = w.codes.astype(jnp.int32)
  z = None if w.zero_point is None else w.zero_point.astype(jnp.int32)
  if w.spec.format.qmax > 127:
    codes = codes - 128
    z = (jnp.zeros((), jnp.int32) if z is None else z) - 128
  return codes.astype(jnp.int8), z


# Set while a QAT step traces its integer forward (``_int_op``): see ``_code_sum``.
_TRAINING_SUMS = contextvars.ContextVar("jaxqat_integer_training_sums", default=False)


def _code_sum(q: Array, axes) -> Array:
  """The int32 sum of int8 codes ``q`` over ``axes`` (kept as size-1 dims).

  In a QAT step (``compute="integer"``) the sum runs in float32, which is
  exact here: ``_check_overflow`` admits at most ``2**31 / 255**2 < 33026``
  contracted elements, so a sum is below ``128 * 33026 < 2**24``. XLA:CPU
  turns an int32 sum of converted int8 codes into a full int32 copy and a
  windowed reduction: 1.2 ms of a 1024x1024 layer's 6.4 ms integer dot on
  the bench machine, against 0.6 ms in float32. A served model keeps the
  int32 sum: its program holds no float array of a weight's shape.
  """
  if _TRAINING_SUMS.get():
    return jnp.sum(q.astype(jnp.float32), axis=axes, keepdims=True).astype(jnp.int32)
  return jnp.sum(q.astype(jnp.int32), axis=axes, keepdims=True)


def _check_overflow(k: int, a_max: int, b_max: int, what: str) -> None:
  if k * a_max * b_max >= _INT32_LIMIT:
    raise ValueError(f"{what}: a contraction of {k} elements could overflow the int32 "
                     "accumulator; use integer=False")


def _out_dtype(x, w, preferred_element_type):
  if preferred_element_type is not None:
    return jnp.dtype(preferred_element_type)
  return jnp.result_type(x.dtype, w.dtype)


def _rhs_to_out(t: Array, rc, rb, n_lhs_free: int) -> Array:
  """A tensor laid out like the rhs (size 1 on contracted axes) in dot_general's output order."""
  nd = t.ndim
  free = [d for d in range(nd) if d not in rc and d not in rb]
  t = jnp.transpose(t, list(rb) + free + list(rc))
  shape = [t.shape[i] for i in range(len(rb))] + [1] * n_lhs_free + [
      t.shape[len(rb) + i] for i in range(len(free))]
  return t.reshape(shape)


def _lhs_to_out(t: Array, lc, lb, n_rhs_free: int) -> Array:
  nd = t.ndim
  free = [d for d in range(nd) if d not in lc and d not in lb]
  t = jnp.transpose(t, list(lb) + free + list(lc))
  shape = [t.shape[i] for i in range(len(lb) + len(free))] + [1] * n_rhs_free
  return t.reshape(shape)


def quantized_dot_general(
    x: ArrayLike,
    w: _quantize.QTensor,
    dimension_numbers,
    *,
    act: Optional[Encoding] = None,
    precision=None,
    preferred_element_type=None,
    integer: bool = True,
) -> Array:
  """``lax.dot_general(x, w)`` of a float input and a quantized weight.

  Args:
    x: the float input (the left operand).
    w: the weight's QTensor (the right operand).
    dimension_numbers: as :func:`jax.lax.dot_general`.
    act: the input's Encoding (static activation quantization) or None.
    precision: passed to the float op.
    preferred_element_type: the output dtype (default: ``x``'s and the
      weight's float dtypes combined).
    integer: allow the integer path (see the module docstring).

  Returns:
    The float result.

  Raises:
    TypeError: if ``w`` is not a QTensor or ``act`` not an Encoding.
    ValueError: if the contraction could overflow int32.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding, quantize_weight
    >>> w = quantize_weight(jnp.array([[0.5], [-0.25]]), Encoding(jnp.float32(0.25), None,
    ...                     QuantSpec()))
    >>> act = Encoding(jnp.float32(0.5), None, QuantSpec())
    >>> quantized_dot_general(jnp.array([[1.0, 2.0]]), w, (((1,), (0,)), ((), ())), act=act)
    Array([[0.]], dtype=float32)
  """
  _check_w(w)
  x = jnp.asarray(x)
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc, lb, rb = (tuple(int(a) % n for a in t) for t, n in (
      (lc, x.ndim), (rc, len(w.shape)), (lb, x.ndim), (rb, len(w.shape))))
  out_dtype = _out_dtype(x, w, preferred_element_type)
  reason = integer_reason(w, act, rc) if integer else "integer=False"
  if reason is not None:
    xq = fake_quantize_input(x, act)
    return lax.dot_general(xq, _weight_float(w, w.dtype), ((lc, rc), (lb, rb)),
                           precision=precision, preferred_element_type=preferred_element_type)
  k = math.prod(x.shape[a] for a in lc)
  _check_overflow(k, 255, 255, "quantized_dot_general")
  qx, zx = _input_codes(x, act)
  qw, zw = _weight_codes(w)
  acc = lax.dot_general(qx, qw, ((lc, rc), (lb, rb)), preferred_element_type=jnp.int32)
  n_lhs_free = x.ndim - len(lc) - len(lb)
  n_rhs_free = len(w.shape) - len(rc) - len(rb)
  col = _rhs_to_out(_code_sum(qw, rc), rc, rb, n_lhs_free)
  acc = acc - zx * col
  sw = _grid.scale_to_layout(w.scale.astype(jnp.float32), w.shape, w.spec)
  if sw.ndim:
    sw = _rhs_to_out(sw, rc, rb, n_lhs_free)
  if zw is not None:
    zw_out = _rhs_to_out(zw, rc, rb, n_lhs_free) if zw.ndim else zw
    row = _lhs_to_out(_code_sum(qx, lc), lc, lb, n_rhs_free)
    acc = acc - zw_out * row + (k * zx) * zw_out
  sx = jnp.maximum(act.scale.astype(jnp.float32), _grid.SCALE_EPS)
  y = acc.astype(jnp.float32) * (sx * sw)
  return y.astype(out_dtype)


# --------------------------------------------------------------------------
# einsum: two operands, as one dot_general and a transpose.
# --------------------------------------------------------------------------


def _expand_ellipsis(subs: str, ndim: int, fill: str) -> str:
  if "..." not in subs:
    return subs
  n = ndim - (len(subs) - 3)
  return subs.replace("...", fill[len(fill) - n:] if n > 0 else "")


def _einsum_plan(subscripts: str, x_ndim: int, w_ndim: int):
  """dot_general dimension numbers and output permutation, or a reason string."""
  s = subscripts.replace(" ", "")
  if "->" not in s:
    return "the einsum has no explicit output ('->')"
  ins, out = s.split("->")
  parts = ins.split(",")
  if len(parts) != 2:
    return "the einsum does not have two operands"
  used = set(c for c in s if c.isalpha())
  fill = "".join(c for c in string.ascii_letters if c not in used)
  n_ell = max(x_ndim - (len(parts[0]) - 3) if "..." in parts[0] else 0,
              w_ndim - (len(parts[1]) - 3) if "..." in parts[1] else 0)
  fill = fill[:n_ell]
  a = _expand_ellipsis(parts[0], x_ndim, fill)
  b = _expand_ellipsis(parts[1], w_ndim, fill)
  o = out.replace("...", fill)
  if len(a) != x_ndim or len(b) != w_ndim or len(set(a)) != len(a) or len(set(b)) != len(b):
    return "the einsum repeats a letter within an operand or does not match the ranks"
  for c in a:
    if c not in b and c not in o:
      return f"the einsum sums over input-only axis '{c}'"
  for c in b:
    if c not in a and c not in o:
      return f"the einsum sums over weight-only axis '{c}'"
  batch = [c for c in a if c in b and c in o]
  contract = [c for c in a if c in b and c not in o]
  a_free = [c for c in a if c not in b]
  b_free = [c for c in b if c not in a]
  dims = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
          (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
  produced = batch + a_free + b_free
  if sorted(produced) != sorted(o):
    return "the einsum output does not list every free axis exactly once"
  perm = tuple(produced.index(c) for c in o)
  return dims, perm


def quantized_einsum(
    subscripts: str,
    x: ArrayLike,
    w: _quantize.QTensor,
    *,
    act: Optional[Encoding] = None,
    precision=None,
    preferred_element_type=None,
    integer: bool = True,
) -> Array:
  """``jnp.einsum(subscripts, x, w)`` of a float input and a quantized weight.

  The integer path needs a two-operand einsum that is one ``dot_general``
  (every summed letter in both operands); otherwise, and on the dequantize
  path, the kernel calls ``jnp.einsum`` on the fake-quantized input and the
  dequantized weight, as the fake-quant layer does.

  Args:
    subscripts: the einsum string, input first (``"...d,dhk->...hk"``).
    x: the float input.
    w: the weight's QTensor.
    act: the input's Encoding or None.
    precision: passed to the float op.
    preferred_element_type: the output dtype.
    integer: allow the integer path.

  Returns:
    The float result.

  Raises:
    TypeError: if ``w`` is not a QTensor.
    ValueError: if the contraction could overflow int32.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding, quantize_weight
    >>> w = quantize_weight(jnp.ones((2, 3)), Encoding(jnp.float32(0.5), None, QuantSpec()))
    >>> act = Encoding(jnp.float32(0.5), None, QuantSpec())
    >>> quantized_einsum("bd,dk->bk", jnp.ones((1, 2)), w, act=act)
    Array([[2., 2., 2.]], dtype=float32)
  """
  _check_w(w)
  x = jnp.asarray(x)
  plan = _einsum_plan(subscripts, x.ndim, len(w.shape))
  reason = plan if isinstance(plan, str) else None
  if reason is None and integer:
    dims, perm = plan
    reason = integer_reason(w, act, dims[0][1])
  if reason is not None or not integer:
    xq = fake_quantize_input(x, act)
    return jnp.einsum(subscripts, xq, _weight_float(w, w.dtype), precision=precision,
                      preferred_element_type=preferred_element_type)
  y = quantized_dot_general(x, w, dims, act=act, preferred_element_type=preferred_element_type)
  return jnp.transpose(y, perm)


# --------------------------------------------------------------------------
# Convolution.
# --------------------------------------------------------------------------


def _conv_pads(x_spatial, w_spatial, window_strides, padding, rhs_dilation):
  """Explicit ``(lo, hi)`` pads, as ``lax.conv_general_dilated`` derives them from ``padding``."""
  if isinstance(padding, str):
    eff = [(k - 1) * r + 1 for k, r in zip(w_spatial, rhs_dilation)]
    return [tuple(p) for p in lax.padtype_to_pads(x_spatial, eff, window_strides, padding)]
  return [tuple(p) for p in padding]


# _int8_conv sums products elementwise (instead of a dot over the windows) for grouped
# convolutions whose groups have at most this many input x output channels (depthwise ones).
_SUM_MAX_GROUP = 64


def _int8_conv(qx: Array, qw: Array, dn, window_strides, padding, lhs_dilation, rhs_dilation,
               feature_group_count: int) -> Array:
  """The exact int32 convolution of int8 codes; on CPU a dot or a sum over the input's windows.

  XLA:CPU runs int8 dots in its matmul library but compiles many int8
  convolutions to a slow generic loop: 7-13x the float convolution's time
  for a 128x40x64 1-D and a 64x32x32x16 3x3 2-D convolution on the bench
  machine (on strided 3x3 ones it was up to 1.4x faster than this kernel).
  On CPU the convolution is therefore written as a dot over the input's
  windows (im2col: each kernel offset's strided slice of the padded, dilated
  input, stacked on the feature axis), with one batch dimension per feature
  group; the windows are a temporary int8 array of ``prod(kernel)`` times
  the input's elements. A dot over many groups of a few channels each is
  slow in any form (a 3x3 depthwise 16x32x32x64 convolution took 33 ms as
  this dot, about as long as XLA's float and int8 convolutions), so for
  groups of at most ``_SUM_MAX_GROUP`` input x output channels the
  convolution is instead a sum of one product of int32 codes per kernel
  offset and group input channel (0.5 ms there; 7x7 depthwise 8x56x56x96:
  372 -> 3.6 ms; 16 groups of 8 x 8 channels: 37 -> 4 ms; at 16 x 16 the dot
  wins again). One group always takes the dot: XLA fuses an elementwise sum
  into each of its consumers, and a 3-channel stem's sum, recomputed in
  seven fusions of a ResNet's training step, made the step 0.14x slower.
  The int32 sums are exact either way, so the result
  equals ``lax.conv_general_dilated(qx, qw, ..., preferred_element_type=int32)``
  element for element. Other backends run that op.
  """
  def xla_conv():
    return lax.conv_general_dilated(qx, qw, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dn, feature_group_count, preferred_element_type=jnp.int32)

  if jax.default_backend() != "cpu":
    return xla_conv()
  lhs_spec, rhs_spec, out_spec = dn
  nsp = len(lhs_spec) - 2
  lhs_dilation = tuple(lhs_dilation or (1,) * nsp)
  rhs_dilation = tuple(rhs_dilation or (1,) * nsp)
  window_strides = tuple(window_strides)
  x = jnp.transpose(qx, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))  # N, S..., C
  w = jnp.transpose(qw, tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))  # S..., I, O
  ksp, cin_g, cout = w.shape[:nsp], w.shape[nsp], w.shape[nsp + 1]
  pads = _conv_pads(x.shape[1:-1], ksp, window_strides, padding, rhs_dilation)
  zero = jnp.zeros((), x.dtype)
  x = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation)]
              + [(0, 0, 0)])
  out_sp = [(n - ((k - 1) * r + 1)) // s + 1
            for n, k, r, s in zip(x.shape[1:-1], ksp, rhs_dilation, window_strides)]
  if min(out_sp) <= 0:  # an empty output: XLA's op gives its shape
    return xla_conv()
  cols = []
  for offset in itertools.product(*(range(k) for k in ksp)):
    start = [0] + [o * r for o, r in zip(offset, rhs_dilation)] + [0]
    limit = ([x.shape[0]] + [b + (n - 1) * s + 1 for b, n, s in
                             zip(start[1:-1], out_sp, window_strides)] + [x.shape[-1]])
    cols.append(lax.slice(x, start, limit, (1,) + window_strides + (1,)))
  k = len(cols)
  g = feature_group_count
  w = w.reshape((k, cin_g, g, cout // g))  # K, Cg, G, Og
  if g > 1 and cin_g * (cout // g) <= _SUM_MAX_GROUP:  # a sum of products
    wk = w.astype(jnp.int32)
    acc = None
    for i, col in enumerate(cols):
      col = col.reshape(col.shape[:-1] + (g, cin_g)).astype(jnp.int32)  # N, O..., G, Cg
      for c in range(cin_g):
        term = col[..., c:c + 1] * wk[i, c]  # N, O..., G, Og
        acc = term if acc is None else acc + term
    acc = acc.reshape(acc.shape[:-2] + (cout,))  # N, O..., Cout
  else:
    patches = jnp.stack(cols, axis=-2)  # N, O..., K, C
    patches = patches.reshape(patches.shape[:-1] + (g, cin_g))  # N, O..., K, G, Cg
    b = patches.ndim
    acc = lax.dot_general(patches, w, (((b - 3, b - 1), (0, 1)), ((b - 2,), (2,))),
                          preferred_element_type=jnp.int32)  # G, N, O..., Og
    acc = jnp.moveaxis(acc, 0, -2).reshape(acc.shape[1:-1] + (cout,))  # N, O..., Cout
  pos = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
  return jnp.transpose(acc, tuple(int(i) for i in np.argsort(pos)))


def quantized_conv_general_dilated(
    x: ArrayLike,
    w: _quantize.QTensor,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    *,
    act: Optional[Encoding] = None,
    precision=None,
    preferred_element_type=None,
    integer: bool = True,
) -> Array:
  """``lax.conv_general_dilated(x, w, ...)`` of a float input and a quantized kernel.

  On the integer path an affine input's zero point is removed with one more
  convolution, of a batch-1 tensor of ones with the kernel codes, so the
  zero padding of the float model (``0.0``, the code ``z_x``) is reproduced
  exactly. Affine kernels (a weight zero point) take the dequantize path.

  Args:
    x: the float input.
    w: the kernel's QTensor.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count: as
      :func:`jax.lax.conv_general_dilated`.
    act: the input's Encoding or None.
    precision: passed to the float op.
    preferred_element_type: the output dtype.
    integer: allow the integer path.

  Returns:
    The float result.

  Raises:
    TypeError: if ``w`` is not a QTensor.
    ValueError: if the contraction could overflow int32.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding, quantize_weight
    >>> w = quantize_weight(jnp.ones((3, 1, 1)), Encoding(jnp.float32(1.0), None, QuantSpec()))
    >>> act = Encoding(jnp.float32(1.0), jnp.int32(1), QuantSpec(symmetric=False))
    >>> quantized_conv_general_dilated(jnp.ones((1, 4, 1)), w, (1,), "SAME",
    ...     dimension_numbers=("NWC", "WIO", "NWC"), act=act)[0, :, 0]
    Array([2., 3., 3., 2.], dtype=float32)
  """
  _check_w(w)
  x = jnp.asarray(x)
  nd = x.ndim
  dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
  lhs_spec, rhs_spec, out_spec = dn
  out_dtype = _out_dtype(x, w, preferred_element_type)
  contracting = tuple(rhs_spec[1:])  # input feature and spatial axes
  reason = integer_reason(w, act, contracting) if integer else "integer=False"
  if reason is None and w.zero_point is not None:
    reason = "the kernel is affine (has a zero point)"
  if reason is None and batch_group_count != 1:
    reason = "batch_group_count != 1"
  if reason is None:
    reason = _conv_backend_reason()
  kw = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dn,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count)
  if reason is not None:
    xq = fake_quantize_input(x, act)
    return lax.conv_general_dilated(xq, _weight_float(w, w.dtype), precision=precision,
                                    preferred_element_type=preferred_element_type, **kw)
  k = math.prod(w.shape[a] for a in contracting)
  _check_overflow(k, 255, 255, "quantized_conv_general_dilated")
  qx, zx = _input_codes(x, act)
  qw, _ = _weight_codes(w)
  acc = _int8_conv(qx, qw, dn, window_strides, padding, lhs_dilation, rhs_dilation,
                   feature_group_count)
  if act.zero_point is not None or act.spec.format.qmax > 127:
    one_shape = list(x.shape)
    one_shape[lhs_spec[0]] = 1
    ones = jnp.ones(one_shape, jnp.int8)
    acc = acc - zx * _int8_conv(ones, qw, dn, window_strides, padding, lhs_dilation,
                                rhs_dilation, feature_group_count)
  sw = w.scale.astype(jnp.float32)
  if sw.ndim:
    o = rhs_spec[0]
    shape = [1] * nd
    shape[out_spec[1]] = w.shape[o]
    sw = sw.reshape(shape)
  sx = jnp.maximum(act.scale.astype(jnp.float32), _grid.SCALE_EPS)
  return (acc.astype(jnp.float32) * (sx * sw)).astype(out_dtype)


_TRANSPOSE_LAYOUTS = {2: ("NC", "IO", "NC"), 3: ("NHC", "HIO", "NHC"),
                      4: ("NHWC", "HWIO", "NHWC"), 5: ("NHWDC", "HWDIO", "NHWDC")}


def _transpose_dn(x_shape, w_shape, dimension_numbers):
  layout = dimension_numbers
  if layout is None:
    layout = _TRANSPOSE_LAYOUTS.get(len(x_shape))
  return lax.conv_dimension_numbers(tuple(x_shape), tuple(w_shape), layout)


def transpose_contracting_axes(x_shape, w_shape, op_kwargs: dict) -> tuple[int, ...]:
  """The kernel axes that ``lax.conv_transpose(x, w, **op_kwargs)`` contracts.

  The input-feature and spatial axes of the kernel's layout; with
  ``transpose_kernel=True`` the kernel's ``O`` and ``I`` axes swap roles, so
  its ``O`` axis is contracted and its ``I`` axis holds the output channels.

  Args:
    x_shape: the input's shape.
    w_shape: the kernel's shape.
    op_kwargs: ``lax.conv_transpose``'s keyword arguments
      (``dimension_numbers``, ``transpose_kernel``).

  Returns:
    The contracted axes, in the kernel's own layout.

  Examples:
    >>> transpose_contracting_axes((1, 8, 4), (3, 4, 6), {})
    (1, 0)
    >>> transpose_contracting_axes((1, 8, 4), (3, 6, 4), {"transpose_kernel": True})
    (2, 0)
  """
  dn = _transpose_dn(x_shape, w_shape, op_kwargs.get("dimension_numbers"))
  first = dn.rhs_spec[0] if op_kwargs.get("transpose_kernel") else dn.rhs_spec[1]
  return (first,) + tuple(dn.rhs_spec[2:])


@functools.lru_cache(maxsize=512)
def _transpose_plan(x_shape, w_shape, frozen_kw: tuple):
  """``(conv kwargs, flipped axes, swapped axes or None)``: ``lax.conv_transpose`` as a convolution.

  The convolution's arguments (padding, input dilation) are read off the
  jaxpr of ``lax.conv_transpose`` itself, so they follow JAX's own rules for
  ``"SAME"``/``"VALID"``/explicit padding; ``transpose_kernel`` flips the
  kernel's spatial axes and swaps its ``O`` and ``I`` axes, as documented.
  """
  kw = {k: v for k, v in frozen_kw if k not in ("precision", "preferred_element_type")}
  closed = jax.make_jaxpr(lambda a, b: lax.conv_transpose(a, b, **kw))(
      jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(w_shape, jnp.float32))
  (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  p = eqn.params
  conv = dict(window_strides=tuple(p["window_strides"]), padding=tuple(p["padding"]),
              lhs_dilation=tuple(p["lhs_dilation"]), rhs_dilation=tuple(p["rhs_dilation"]),
              dimension_numbers=p["dimension_numbers"],
              feature_group_count=p["feature_group_count"],
              batch_group_count=p["batch_group_count"])
  dn = p["dimension_numbers"]
  if kw.get("transpose_kernel"):
    return conv, tuple(dn.rhs_spec[2:]), (dn.rhs_spec[0], dn.rhs_spec[1])
  return conv, (), None


def _transposed_kernel(t, flip, swap):
  """``t`` (a kernel, or ranges in its broadcast layout) as the convolution reads it."""
  if t is None or not jnp.ndim(t):
    return t
  if flip:
    t = jnp.flip(t, flip)
  return t if swap is None else jnp.swapaxes(t, *swap)


def quantized_conv_transpose(
    x: ArrayLike,
    w: _quantize.QTensor,
    strides: Sequence[int],
    padding,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers=None,
    transpose_kernel: bool = False,
    *,
    act: Optional[Encoding] = None,
    precision=None,
    preferred_element_type=None,
    integer: bool = True,
    **transpose_kwargs,
) -> Array:
  """``lax.conv_transpose(x, w, ...)`` of a float input and a quantized kernel.

  A transposed convolution is a convolution of the input dilated by the
  strides (``lax.conv_transpose`` runs it as one); on the integer path its
  kernel codes, scales and zero points are laid out as that convolution
  reads them (flipped and with ``O``/``I`` swapped under
  ``transpose_kernel``), and :func:`quantized_conv_general_dilated` runs
  it. Otherwise the kernel is dequantized and ``lax.conv_transpose`` runs on
  the fake-quantized input (the fake-quant model's values bit for bit).

  Args:
    x: the float input.
    w: the kernel's QTensor.
    strides, padding, rhs_dilation, dimension_numbers, transpose_kernel: as
      :func:`jax.lax.conv_transpose`.
    act: the input's Encoding or None.
    precision: passed to the float op.
    preferred_element_type: the output dtype.
    integer: allow the integer path.
    **transpose_kwargs: other keyword arguments of ``lax.conv_transpose``
      (``use_consistent_padding``).

  Returns:
    The float output of the transposed convolution.

  Raises:
    TypeError: ``w`` is not a QTensor.
    ValueError: the int32 sums could overflow (too many contracted terms).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding, quantize_weight
    >>> w = quantize_weight(jnp.ones((2, 1, 1)), Encoding(jnp.float32(1.0), None, QuantSpec()))
    >>> act = Encoding(jnp.float32(1.0), None, QuantSpec())
    >>> quantized_conv_transpose(jnp.ones((1, 2, 1)), w, (2,), "VALID", act=act)[0, :, 0]
    Array([1., 1., 1., 1.], dtype=float32)
  """
  _check_w(w)
  x = jnp.asarray(x)
  kw = dict(strides=tuple(strides), padding=padding, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, transpose_kernel=bool(transpose_kernel),
            **transpose_kwargs)
  contracting = transpose_contracting_axes(x.shape, w.shape, kw)
  reason = integer_reason(w, act, contracting) if integer else "integer=False"
  if reason is None and w.zero_point is not None:
    reason = "the kernel is affine (has a zero point)"
  if reason is None:
    reason = _conv_backend_reason()
  if reason is not None:
    return lax.conv_transpose(fake_quantize_input(x, act), _weight_float(w, w.dtype),
                              precision=precision,
                              preferred_element_type=preferred_element_type, **kw)
  conv, flip, swap = _transpose_plan(tuple(x.shape), tuple(w.shape), _freeze_kw(kw))
  codes = w.values
  if w.packed:
    codes = _quantize.unpack(codes, w.packed, signed=w.spec.format.signed)
  spec = w.spec
  if swap is not None and isinstance(spec.granularity, spec_lib.PerChannel):
    swapped = {swap[0]: swap[1], swap[1]: swap[0]}
    axes = spec_lib.normalize_axes(spec.granularity.axes, len(w.shape), "granularity.axis")
    spec = spec.replace(granularity=spec_lib.PerChannel(
        tuple(sorted(swapped.get(a, a) for a in axes))))
  laid = _quantize.QTensor(_transposed_kernel(codes, flip, swap),
                           _transposed_kernel(w.scale, flip, swap), None, None, spec, w.dtype)
  return quantized_conv_general_dilated(x, laid, act=act, precision=precision,
                                        preferred_element_type=preferred_element_type, **conv)


def quantized_take(w: _quantize.QTensor, indices: ArrayLike, axis: int = 0) -> Array:
  """Rows of a quantized table (an embedding lookup), dequantized.

  Only the looked-up codes are dequantized; the values equal
  ``jnp.take(dequantize(w), indices, axis)`` bit for bit.

  Args:
    w: the table's QTensor, quantized per tensor or per channel along
      ``axis`` (per row).
    indices: integer indices.
    axis: the lookup axis.

  Returns:
    The float rows, in ``w.dtype``.

  Raises:
    TypeError: if ``w`` is not a QTensor.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quantize
    >>> w = quantize(jnp.array([[0.1, 0.2], [0.3, 0.4]]), 0.1, spec=QuantSpec())
    >>> quantized_take(w, jnp.array([1]))
    Array([[0.3, 0.4]], dtype=float32)
  """
  _check_w(w)
  axis = axis % len(w.shape)
  chan = _w_channel_axes(w)
  if w.spec.is_block or w.packed or (chan and tuple(chan) != (axis,)):
    return jnp.take(_quantize.dequantize(w), indices, axis=axis)
  codes = jnp.take(w.values, indices, axis=axis)
  idx = jnp.asarray(indices)

  def rows(t):
    if t is None or not t.ndim:
      return t
    return jnp.take(t, idx, axis=axis)

  sub = dataclasses.replace(w, values=codes, scale=rows(w.scale), zero_point=rows(w.zero_point))
  return _quantize.dequantize(sub)


def integer_error_bound(x: ArrayLike, w: _quantize.QTensor, act: Encoding,
                        dimension_numbers) -> Array:
  """The bound of the module docstring on ``|integer path - fake-quant path|``.

  The fake-quant path is meant as a float32 product. On a GPU, jax's default
  precision for float32 matmuls is TF32 (10-bit significands), whose error
  is far larger than this bound (measured on an H200: 1e-3 beyond it on a
  96-term dot); compare against a product taken with
  ``precision=jax.lax.Precision.HIGHEST`` there. The integer path itself is
  exact in int32 on every backend.

  Args:
    x: the float input.
    w: the weight's QTensor.
    act: the input's Encoding (integer, per tensor).
    dimension_numbers: as :func:`jax.lax.dot_general`.

  Returns:
    An array shaped like the op's output:
    :math:`(\\gamma_{K+2} + \\gamma_3)(1+u)^2 s_x s_w \\sum_k |a_k b_k|`.

  Raises:
    TypeError: if ``w`` is not a QTensor.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Encoding, quantize_weight
    >>> w = quantize_weight(jnp.ones((2, 1)), Encoding(jnp.float32(0.5), None, QuantSpec()))
    >>> act = Encoding(jnp.float32(0.5), None, QuantSpec())
    >>> b = integer_error_bound(jnp.ones((1, 2)), w, act, (((1,), (0,)), ((), ())))
    >>> bool(0 < float(b[0, 0]) < 1e-6)
    True
  """
  _check_w(w)
  x = jnp.asarray(x)
  (lc, rc), (lb, rb) = dimension_numbers
  qx, zx = _input_codes(x, act)
  qw, zw = _weight_codes(w)
  a = jnp.abs(qx.astype(jnp.int32) - zx).astype(jnp.float32)
  b = jnp.abs(qw.astype(jnp.int32) - (0 if zw is None else zw)).astype(jnp.float32)
  s = lax.dot_general(a, b, ((lc, rc), (lb, rb)), precision=lax.Precision.HIGHEST)
  k = math.prod(x.shape[i] for i in lc)
  u = 2.0**-24
  gamma = lambda n: n * u / (1 - n * u)  # noqa: E731
  sw = w.scale.astype(jnp.float32)
  if sw.ndim:
    n_lhs_free = x.ndim - len(lc) - len(lb)
    sw = _rhs_to_out(sw, tuple(a % len(w.shape) for a in rc),
                     tuple(a % len(w.shape) for a in rb), n_lhs_free)
  return (gamma(k + 2) + gamma(3)) * (1 + u)**2 * act.scale.astype(jnp.float32) * sw * s



# --------------------------------------------------------------------------
# Integer forward for training (opt-in): int8 forward, textbook-STE backward.
# --------------------------------------------------------------------------

_OPS = {
    "dot_general": lambda x, w, kw: lax.dot_general(x, w, **kw),
    "einsum": lambda x, w, kw: jnp.einsum(kw["subscripts"], x, w, **{
        k: v for k, v in kw.items() if k != "subscripts"}),
    "conv_general_dilated": lambda x, w, kw: lax.conv_general_dilated(x, w, **kw),
    "conv_transpose": lambda x, w, kw: lax.conv_transpose(x, w, **kw),
}


def weight_on_right(dimension_numbers, w_index: int, x_ndim: int, w_ndim: int):
  """A ``dot_general`` with its weight moved to the right operand, as ``qat_op`` takes it.

  Args:
    dimension_numbers: the op's ``((lc, rc), (lb, rb))``.
    w_index: the weight's operand (0: left, 1: right).
    x_ndim: the other operand's rank.
    w_ndim: the weight's rank.

  Returns:
    ``(dimension numbers of dot_general(x, w), perm)``: ``perm`` takes that
    op's output (batch, x's free axes, w's free axes) to the original op's
    order, or is None when the weight was on the right already.

  Examples:
    >>> weight_on_right((((0,), (1,)), ((), ())), 0, 2, 2)
    ((((1,), (0,)), ((), ())), (1, 0))
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if w_index == 1:
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))), None
  nb = len(lb)
  nx = x_ndim - nb - len(rc)
  nw = w_ndim - nb - len(lc)
  perm = tuple(range(nb)) + tuple(range(nb + nx, nb + nx + nw)) + tuple(range(nb, nb + nx))
  return ((tuple(rc), tuple(lc)), (tuple(rb), tuple(lb))), perm


def ranges_in_layout(spec, ranges, perm, w_ndim: int):
  """A weight's ``(scale, zero_point, offset)`` and spec for ``transpose(w, perm)``.

  Args:
    spec: the weight's QuantSpec (its channel axes in the weight's layout).
    ranges: the ranges in the weight's broadcast layout (None or scalars
      are kept).
    perm: the permutation (operand axis ``j`` is weight axis ``perm[j]``).
    w_ndim: the weight's rank.

  Returns:
    ``(spec, ranges)`` in the operand's layout.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, PerChannel
    >>> spec, (s,) = ranges_in_layout(QuantSpec(granularity=PerChannel(0)),
    ...                               [jnp.ones((5, 1))], (1, 0), 2)
    >>> spec.granularity, s.shape
    (PerChannel(axis=1), (1, 5))
  """
  out = [t if t is None or not jnp.ndim(t) else jnp.transpose(t, perm) for t in ranges]
  if isinstance(spec.granularity, spec_lib.PerChannel):
    axes = spec_lib.normalize_axes(spec.granularity.axes, w_ndim, "granularity.axis")
    spec = spec.replace(granularity=spec_lib.PerChannel(
        tuple(sorted(list(perm).index(a) for a in axes))))
  return spec, out


def _train_encoding(spec, scale, zero_point, offset) -> Encoding:
  fixed = spec.replace(learning="fixed")
  s = jnp.maximum(jnp.asarray(scale, jnp.float32), _grid.SCALE_EPS)
  if spec.learning == "lsq_plus" and offset is not None:
    z = jnp.clip(_grid.round_half_even(-jnp.asarray(offset, jnp.float32) / s),
                 spec.format.qmin, spec.format.qmax).astype(jnp.int32)
  elif spec.learning == "fixed" and zero_point is not None and not spec.symmetric:
    z = jnp.round(jnp.asarray(zero_point, jnp.float32)).astype(jnp.int32)
  else:
    z = None
  return Encoding(s, z, fixed)


def unclipped_weight(spec) -> bool:
  """Whether a weight tracked with ``spec`` (its range recomputed from it each step) never clips.

  True for a fixed-range, signed symmetric integer grid whose range is the
  absolute maximum (:func:`~jaxqat.core.weight_range` with ``absmax``, or
  ``minmax`` made symmetric): with ``s = max|w| / qmax`` every ``|w / s|``
  is at most ``qmax`` up to two roundings, far below ``qmax + 1/2``, so
  every finite element rounds inside the grid and the STE clip mask is all
  ones. (Float grids clip the unrounded value: their largest element can
  sit one ulp outside; asymmetric ranges round their zero point.)

  Args:
    spec: the weight's :class:`~jaxqat.core.QuantSpec` (or None).

  Returns:
    Whether :func:`~jaxqat.core.qat_op` with ``weight_tracked=True`` drops
    the weight's clip mask.

  Examples:
    >>> from jaxqat.core import QuantSpec
    >>> unclipped_weight(QuantSpec()), unclipped_weight(QuantSpec(learning="lsq"))
    (True, False)
    >>> unclipped_weight(QuantSpec(format="uint8")), unclipped_weight(QuantSpec(format="fp8_e4m3"))
    (False, False)
  """
  if spec is None or spec.learning != "fixed" or spec.is_block:
    return False
  fmt = spec.format
  return (isinstance(fmt, formats_lib.IntFormat) and fmt.signed and spec.symmetric
          and spec.calibration.method in ("absmax", "minmax"))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _fq_unclipped(w, spec, scale):
  """``quant_dequant(w, spec, scale)`` with the STE tangent of an unclipped weight: ``w_dot``."""
  return fq.quant_dequant(w, spec, scale)


@_fq_unclipped.defjvp
def _fq_unclipped_jvp(spec, primals, tangents):
  w, scale = primals
  return _fq_unclipped(w, spec, scale), tangents[0]


def _fake_op(cfg, x, w, a, wq):
  """``op(fq(x), fq(w))``; a None spec leaves its operand in float.

  ``cfg[4]`` (the weight is tracked and cannot clip, :func:`unclipped_weight`)
  gives the weight the STE without a clip mask: the same gradient for every
  finite weight, and the backward no longer reads the weight to rebuild the
  mask (on the MLP of ``benchmarks/bench_qat_step.py``, two passes over each
  kernel in the optimizer's update).
  """
  op, aspec, wspec, kw, unclipped = cfg
  xq = x if aspec is None else fq.quant_dequant(x, aspec, a[0], a[1], offset=a[2])
  if wspec is None:
    wqv = w
  elif unclipped:
    wqv = _fq_unclipped(w, wspec, wq[0])
  else:
    wqv = fq.quant_dequant(w, wspec, wq[0], wq[1], offset=wq[2])
  return _OPS[op](xq, wqv, dict(kw))


_GPU_CONV = ("XLA:GPU compiles no int8 x int8 -> int32 convolution (measured on an H200: "
             "UNIMPLEMENTED); the weight is dequantized on the fly")


def _conv_backend_reason() -> Optional[str]:
  """Why the backend rules out an integer convolution (None if it does not)."""
  return _GPU_CONV if jax.default_backend() == "gpu" else None


# recompute_bwd ties saved arrays of at least this many elements (256 KiB in float32) to
# the backward pass.
_TIE_MIN_SIZE = 2**16


def recompute_bwd(fn, res, g):
  """The vjp of ``fn`` at the saved inputs ``res``, recomputed in the backward pass.

  XLA must not merge the recomputed fake quantization with the forward's (it
  would then keep the fake-quantized operands alive from the forward to the
  backward, which is what recomputing avoids). ``jax.checkpoint``'s
  ``optimization_barrier`` does that on GPU/TPU, but XLA:CPU drops barriers
  before common-subexpression elimination; so the saved arrays are also
  multiplied by a one computed from the cotangent (``1 + 0 * g[0]``, with a
  non-finite ``g[0]`` replaced by 0): exact, and it ties the recomputation
  to the backward pass. With several devices the tie is left out (the
  partitioner can all-gather a sharded kernel to apply it, and a cotangent
  sharded on an explicit mesh axis cannot give up one element); there the
  barrier alone applies.

  Only arrays of at least ``_TIE_MIN_SIZE`` elements are tied: keeping a
  small operand's fake quantization (a small convolution kernel, a scale)
  from the forward costs little memory, while tying it puts its
  recomputation, and the range it needs, on the backward's critical path
  after each cotangent. Leaving them untied made the W8A8 / W4A4 LSQ steps
  of ``benchmarks/bench_small_models.py`` 0.05-0.09 of the float step
  cheaper on 2 CPU cores (1-D CNN 1.12 -> 1.07 / 1.19 -> 1.11, ResNet
  1.05 -> 0.96 / 1.15 -> 1.09), with XLA's memory estimate at most the
  float step's.
  """
  res = lax.optimization_barrier(res)
  leaves = [t for t in jax.tree_util.tree_leaves(g) if jnp.size(t)]
  if leaves and jax.device_count() == 1:
    probe = jnp.ravel(leaves[0])[0].astype(jnp.float32)
    one = 1.0 + 0.0 * jnp.where(jnp.isfinite(probe), probe, 0.0)

    def tie(r):
      if (r is None or not jnp.issubdtype(jnp.result_type(r), jnp.floating)
          or jnp.size(r) < _TIE_MIN_SIZE):
        return r
      return r * one.astype(jnp.result_type(r))

    res = jax.tree_util.tree_map(tie, res)
  _, pullback = jax.vjp(fn, *res)
  return pullback(g)


def _int_op(cfg, x, w, a, wq):
  token = _TRAINING_SUMS.set(True)
  try:
    return _int_op_traced(cfg, x, w, a, wq)
  finally:
    _TRAINING_SUMS.reset(token)


def _int_op_traced(cfg, x, w, a, wq):
  op, aspec, wspec, kw, _ = cfg
  kw = dict(kw)
  aenc = _train_encoding(aspec, *a)
  wenc = _train_encoding(wspec, *wq)
  qt = _quantize.quantize(w, wenc.scale, wenc.zero_point, wenc.spec)
  if op == "dot_general":
    return quantized_dot_general(x, qt, kw.pop("dimension_numbers"), act=aenc, **kw)
  if op == "einsum":
    return quantized_einsum(kw.pop("subscripts"), x, qt, act=aenc, **kw)
  if op == "conv_transpose":
    return quantized_conv_transpose(x, qt, act=aenc, **kw)
  return quantized_conv_general_dilated(x, qt, act=aenc, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _integer_forward(cfg, x, w, a, wq):
  return _int_op(cfg, x, w, a, wq)


def _integer_forward_fwd(cfg, x, w, a, wq):
  return _int_op(cfg, x, w, a, wq), (x, w, a, wq)


def _integer_forward_bwd(cfg, res, g):
  return recompute_bwd(functools.partial(_fake_op, cfg), res, g)


_integer_forward.defvjp(_integer_forward_fwd, _integer_forward_bwd)


def _freeze_kw(kw: dict) -> tuple:
  def fix(v):
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # ConvDimensionNumbers
      return type(v)(*(fix(e) for e in v))
    if isinstance(v, (list, tuple)):
      return tuple(fix(e) for e in v)
    return v
  return tuple(sorted((k, fix(v)) for k, v in kw.items() if v is not None))


def integer_forward(
    op: str,
    x: ArrayLike,
    w: ArrayLike,
    *,
    act: tuple,
    weight: tuple,
    weight_tracked: bool = False,
    **op_kwargs,
) -> Array:
  """A QAT op whose forward runs in integer arithmetic and whose backward is the STE.

  The forward quantizes ``x`` and ``w`` with their current ranges and runs
  the integer path of :func:`quantized_dot_general` /
  :func:`quantized_einsum` / :func:`quantized_conv_general_dilated` (int8
  operands, int32 accumulation, one rescale): the same values as the
  fake-quant op up to float summation order (:func:`integer_error_bound`).
  The backward is the gradient of the fake-quant op ``op(fq(x), fq(w))``
  (the textbook STE with the quantized operands, LSQ/LSQ+ step-size and
  offset gradients included), recomputed from the saved float inputs, so the
  step keeps ``x``, ``w`` and the ranges, not fake-quantized copies.

  Args:
    op: ``"dot_general"``, ``"einsum"``, ``"conv_general_dilated"`` or
      ``"conv_transpose"``.
    x: the float input (left operand).
    w: the float weight (right operand).
    act: ``(spec, scale, zero_point, offset)`` of the input quantizer, as
      :func:`~jaxqat.core.quant_dequant` takes them (``scale`` the step size
      ``s``, also for LSQ).
    weight: the same for the weight quantizer.
    weight_tracked: as :func:`~jaxqat.core.qat_op`'s.
    **op_kwargs: the op's arguments: ``dimension_numbers`` (and
      ``precision``, ``preferred_element_type``) for ``dot_general``;
      ``subscripts`` for ``einsum``; ``window_strides``, ``padding``,
      ``dimension_numbers``... for ``conv_general_dilated``.

  Returns:
    The op's float output.

  Raises:
    ValueError: if ``op`` is unknown, or the quantizers cannot take the
      integer path (the message gives :func:`integer_reason`'s reason).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> a = (QuantSpec(learning="lsq"), jnp.float32(0.1), None, None)
    >>> wq = (QuantSpec(), jnp.float32(0.05), None, None)
    >>> f = lambda x, w: integer_forward("dot_general", x, w, act=a, weight=wq,
    ...                                  dimension_numbers=(((1,), (0,)), ((), ()))).sum()
    >>> jax.grad(f)(jnp.ones((2, 3)), jnp.ones((3, 4)))[0]
    Array([4., 4., 4.], dtype=float32)
  """
  if op not in _OPS:
    raise ValueError(f"op: expected one of {tuple(_OPS)}, got {op!r}")
  aspec, wspec = act[0], weight[0]
  reason = op_reason(op, jnp.shape(x), jnp.shape(w), aspec, wspec, op_kwargs)
  if reason is not None:
    raise ValueError(f"integer_forward: this layer cannot run in integer arithmetic: {reason}")
  cfg = (op, aspec, wspec, _freeze_kw(op_kwargs), bool(weight_tracked) and unclipped_weight(wspec))
  return _integer_forward(cfg, x, w, _ranges(act), _ranges(weight))


def _ranges(q) -> tuple:
  """``(scale, zero_point, offset)`` of a ``(spec, scale, zero_point, offset)`` tuple or None."""
  if q is None:
    return (None, None, None)
  return (tuple(q[1:]) + (None,) * (4 - len(q)))[:3]


def op_reason(op: str, x_shape, w_shape, aspec, wspec, op_kwargs: dict) -> Optional[str]:
  """Why ``op`` with these operand specs cannot run in integer arithmetic (None if it can).

  Args:
    op: ``"dot_general"``, ``"einsum"``, ``"conv_general_dilated"`` or
      ``"conv_transpose"``.
    x_shape: the input's shape.
    w_shape: the weight's shape.
    aspec: the input's QuantSpec, or None (not quantized).
    wspec: the weight's QuantSpec, or None (not quantized).
    op_kwargs: the op's keyword arguments (``dimension_numbers``,
      ``subscripts``, ``batch_group_count``...).

  Returns:
    ``None`` or a sentence naming what rules the integer path out.

  Examples:
    >>> from jaxqat.core import QuantSpec
    >>> op_reason("dot_general", (2, 3), (3, 4), QuantSpec(), None,
    ...           {"dimension_numbers": (((1,), (0,)), ((), ()))})
    'the weight is not quantized'
  """
  if wspec is None:
    return spec_reason(aspec, wspec, len(w_shape))
  if op == "einsum":
    plan = _einsum_plan(op_kwargs["subscripts"], len(x_shape), len(w_shape))
    if isinstance(plan, str):
      return plan
    contracting = plan[0][0][1]
  elif op == "dot_general":
    contracting = op_kwargs["dimension_numbers"][0][1]
  elif op == "conv_transpose":
    contracting = transpose_contracting_axes(x_shape, w_shape, op_kwargs)
  else:
    dn = lax.conv_dimension_numbers(tuple(x_shape), tuple(w_shape),
                                    op_kwargs.get("dimension_numbers"))
    contracting = tuple(dn.rhs_spec[1:])
    if op_kwargs.get("batch_group_count", 1) != 1:
      return "batch_group_count != 1"
  return spec_reason(aspec, wspec, len(w_shape), contracting, conv=op.startswith("conv"))


def spec_reason(aspec, wspec, w_ndim: int, contracting: Sequence[int] = (), *,
                conv: bool = False) -> Optional[str]:
  """Why operands with these specs cannot run in integer arithmetic (None if they can).

  What the specs alone decide (front ends check it when they quantize a
  layer); :func:`op_reason` adds what the op's arguments decide.

  Args:
    aspec: the input's QuantSpec, or None.
    wspec: the weight's QuantSpec, or None.
    w_ndim: the weight's rank.
    contracting: the weight axes the op contracts.
    conv: whether the op is a convolution (affine kernels take no integer path).

  Returns:
    ``None`` or the reason.

  Examples:
    >>> from jaxqat.core import QuantSpec, PerChannel
    >>> spec_reason(QuantSpec(granularity=PerChannel(-1)), QuantSpec(), 2)
    'the input is quantized per channel (the integer path needs one input scale)'
  """
  if wspec is None:
    return "the weight is not quantized"
  if conv and wspec.is_int and not wspec.symmetric:
    return "the kernel is affine (has a zero point)"
  backend = _conv_backend_reason() if conv else None
  return backend if backend is not None else _reason(wspec, w_ndim, aspec, contracting)
