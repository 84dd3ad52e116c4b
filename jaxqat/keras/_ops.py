r"""The fake-quant arithmetic written once in ``keras.ops`` (any backend).

These functions run on every Keras backend (JAX, torch, TensorFlow). They
implement the same arithmetic and the same straight-through gradients as the
JAX core (:func:`jaxqat.core.fake_quant` and :func:`jaxqat.core.lsq_fake_quant`),
through :func:`keras.ops.custom_gradient`; the tests hold them equal to the
core to 1e-6. On the JAX backend the quantized layers call the core directly
and on torch the same float operations written as ``torch.autograd.Function``
(:func:`torch_fake_quant`, :func:`torch_lsq_fake_quant`: eager torch pays
Keras' dispatch on every keras.ops call); :func:`quant_dequant` dispatches.

Integer grid (Jacob et al. 2018), step size ``s``, integer zero point ``z``::

    q = clip(round_half_even(x / s) + z, qmin, qmax),   out = s * (q - z)

``keras.ops.round`` rounds half to even on JAX (``jnp.round``), torch
(``torch.round``) and TensorFlow (``tf.round``). Only integer formats are
implemented here: float (fp8/fp6/fp4) and block formats (nvfp4, mxfp*) and
stochastic rounding run on the JAX backend only, through the core.
"""

from __future__ import annotations

import math
from typing import Optional

from jaxqat.core import _spec as spec_lib
from jaxqat.keras._backend import backend_name
from jaxqat.keras._backend import is_jax
from jaxqat.keras._backend import ops

__all__ = ["ops_fake_quant", "ops_lsq_fake_quant", "torch_fake_quant", "torch_lsq_fake_quant",
           "quant_dequant", "SCALE_EPS"]

SCALE_EPS = 1e-12  # smallest step size used in the forward pass (as the core)


def _f32(x):
  return x if str(x.dtype) in ("float32", "float64") else ops.cast(x, "float32")


def _broadcast_axes(g_shape, shape) -> tuple[int, ...]:
  """The axes of ``g_shape`` that were broadcast to reach it from ``shape``."""
  lead = len(g_shape) - len(shape)
  return tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape)
                                    if d == 1 and g_shape[lead + i] != 1)


def _sum_to_shape(g, shape):
  """Sums ``g`` over the axes that were broadcast to reach it from ``shape``."""
  shape = tuple(shape)
  if tuple(g.shape) == shape:
    return g
  axes = _broadcast_axes(tuple(g.shape), shape)
  out = ops.sum(g, axis=axes, keepdims=True) if axes else g
  return ops.reshape(out, shape)


def _clipped_code_and_mask(v, z, qmin, qmax):
  """(clipped code, inside mask) of ``v = x / s`` for the clipped STE.

  ``inside`` is where clipping left the rounded code unchanged (``code ==
  clip(code)``): one comparison instead of two and a logical and, with the
  same result (a NaN code is outside in both forms, as in the core's
  :func:`~jaxqat.core.fake_quant`).
  """
  code = ops.round(v)
  if z is not None:
    code = ops.add(code, z)
  q = ops.clip(code, qmin, qmax)
  return q, ops.equal(code, q)


def ops_fake_quant(x, scale, zero_point, qmin: float, qmax: float, *, unclipped: bool = False):
  r"""Fixed-range integer fake quant with the clipped straight-through estimator.

  Forward :math:`q = \mathrm{clip}(\lfloor x/s \rceil + z, q_{min}, q_{max})`,
  output :math:`s (q - z)`. Backward:

  .. math::
     \partial L / \partial x = \partial L / \partial y \cdot
       \mathbb{1}[q_{min} \le \lfloor x/s \rceil + z \le q_{max}]

  and zero gradients to ``scale`` and ``zero_point``. Each step is one
  elementwise op over ``x`` on eager backends (torch), so the forward pass
  makes as few passes as the arithmetic allows: no zero point arithmetic
  when ``zero_point`` is ``None``, the mask from one comparison.

  Args:
    x: a floating point tensor.
    scale: step size, broadcastable against ``x`` (keepdims layout).
    zero_point: integer-valued float zero point, broadcastable, same shape as
      ``scale``, or ``None`` for 0.
    qmin: the grid's lowest code.
    qmax: the grid's highest code.
    unclipped: no element can clip (see :func:`quant_dequant`): the
      gradient passes through without the mask.

  Returns:
    A tensor of ``x``'s shape and dtype.

  Examples:
    >>> import numpy as np
    >>> y = ops_fake_quant(np.array([-1.3, 0.26, 0.5, 2.0], "float32"),
    ...                    np.float32(0.5), np.float32(0.0), -8, 7)
    >>> np.asarray(y).tolist()
    [-1.5, 0.5, 0.5, 2.0]
  """
  x = ops.convert_to_tensor(x)
  dtype = x.dtype
  has_z = zero_point is not None

  @ops.custom_gradient
  def _fq(x, s, *z):
    sc = ops.maximum(_f32(s), SCALE_EPS)
    zc = _f32(z[0]) if has_z else None
    q, inside = _clipped_code_and_mask(ops.divide(_f32(x), sc), zc, qmin, qmax)
    y = ops.cast(ops.multiply(ops.subtract(q, zc) if has_z else q, sc), dtype)

    def grad(*args, upstream=None):
      if upstream is None:
        (upstream,) = args
      gx = upstream if unclipped else ops.where(inside, upstream, ops.zeros((), upstream.dtype))
      return (gx, ops.zeros_like(s)) + tuple(ops.zeros_like(t) for t in z)

    return y, grad

  z = (ops.convert_to_tensor(zero_point),) if has_z else ()
  return _fq(x, ops.convert_to_tensor(scale), *z)


def ops_lsq_fake_quant(x, step_size, offset, qmin: float, qmax: float,
                       grad_scale: Optional[float] = None):
  r"""LSQ (Esser et al. 2020) / LSQ+ (Bhalgat et al. 2020) fake quant in keras.ops.

  Forward as :func:`jaxqat.core.lsq_fake_quant`: :math:`s=\max(s, 10^{-12})`,
  :math:`z = \lfloor -\beta/s \rceil` (0 without offset), :math:`v = x/s`,
  output :math:`s(\mathrm{clip}(\lfloor v \rceil + z, q_{min}, q_{max}) - z)`.
  Backward with :math:`u = \lfloor v \rceil + z` (the code before clipping):

  .. math::
     \frac{\partial \hat{x}}{\partial x} = \mathbb{1}[q_{min} \le u \le q_{max}],
     \quad \frac{\partial \hat{x}}{\partial s} = \begin{cases}
       \lfloor v \rceil - v & q_{min} \le u \le q_{max} \\
       q_{min} & u < q_{min} \\ q_{max} & u > q_{max} \end{cases},
     \quad \frac{\partial \hat{x}}{\partial \beta} = \mathbb{1}[\text{clipped}]

  step-size and offset gradients summed over the elements each covers and
  multiplied by ``grad_scale`` (default :math:`1/\sqrt{N q_{max}}`). The
  clipped case of :math:`\partial \hat{x}/\partial s` is the clipped code
  itself (:math:`q_{min}` or :math:`q_{max}`), so one select gives it; the
  masks are computed in the backward pass, so the forward keeps none.

  Args:
    x: a floating point tensor.
    step_size: the learned step size (keepdims layout or scalar).
    offset: the LSQ+ offset β (same shape as ``step_size``) or ``None``.
    qmin: the grid's lowest code.
    qmax: the grid's highest code.
    grad_scale: overrides the gradient scale.

  Returns:
    A tensor of ``x``'s shape and dtype.

  Examples:
    >>> import numpy as np
    >>> y = ops_lsq_fake_quant(np.array([0.3, 2.0], "float32"), np.float32(0.25), None, -8, 7)
    >>> np.asarray(y).tolist()
    [0.25, 1.75]
  """
  x = ops.convert_to_tensor(x)
  step_size = ops.convert_to_tensor(step_size)
  dtype = x.dtype
  if grad_scale is None:
    grad_scale = _lsq_grad_scale(x.shape, step_size.shape, qmax)
  has_offset = offset is not None

  @ops.custom_gradient
  def _lsq(x, s, *b):
    sc = ops.maximum(_f32(s), SCALE_EPS)
    v = ops.divide(_f32(x), sc)
    z = ops.round(ops.divide(ops.negative(_f32(b[0])), sc)) if has_offset else None
    code = ops.round(v) if z is None else ops.add(ops.round(v), z)
    q = ops.clip(code, qmin, qmax)
    y = ops.cast(ops.multiply(ops.subtract(q, z) if has_offset else q, sc), dtype)

    def grad(*args, upstream=None):
      if upstream is None:
        (upstream,) = args
      # Clipped where clipping changed the rounded code (a NaN code counts as clipped, as in
      # the core's LSQ); computed here, in the backward pass, so the forward keeps no masks.
      outside = ops.not_equal(code, q)
      g32 = _f32(upstream)
      gx = ops.where(outside, ops.zeros((), upstream.dtype), upstream)
      rv = ops.subtract(code, z) if has_offset else code  # round(v), exactly where inside
      ds = ops.where(outside, q, ops.subtract(rv, v))  # q is qmin / qmax where clipped
      gs = ops.multiply(_sum_to_shape(ops.multiply(g32, ds), tuple(s.shape)), grad_scale)
      grads = (gx, ops.cast(gs, s.dtype))
      if has_offset:
        # g times a 0/1 float mask, as the core's transposed tangent (an infinite g of an
        # element inside gives NaN, not 0)
        gb = _sum_to_shape(ops.multiply(g32, ops.cast(outside, g32.dtype)), tuple(b[0].shape))
        grads += (ops.cast(ops.multiply(gb, grad_scale), b[0].dtype),)
      return grads

    return y, grad

  b = (ops.convert_to_tensor(offset),) if has_offset else ()
  return _lsq(x, step_size, *b)


def _lsq_grad_scale(x_shape, s_shape, qmax) -> float:
  """LSQ's gradient scale :math:`1/\\sqrt{N q_{max}}`, N = elements per step size."""
  n_x = math.prod(int(d) for d in x_shape)
  n_s = math.prod(int(d) for d in s_shape)
  return 1.0 / math.sqrt(max(1, n_x // max(1, n_s)) * float(qmax))


# -- torch: the same arithmetic as torch.autograd.Functions -----------------------
#
# Eager torch pays Keras' dispatch (argument conversion, dtype resolution) on every
# keras.ops call and a Python closure per custom_gradient call; over a QAT step
# that is most of the cost of fake quant on small tensors. These Functions run the
# very same float operations (x / s, round half to even, + z, clip, - z, * s) with
# torch ops on scalar bounds, in place where a buffer is free, and keep only what
# the backward needs (a bool mask; LSQ adds its step-size derivative).

_TORCH_FNS = None


def _torch_functions():
  """``(fake_quant, lsq_fake_quant)`` autograd Functions, built on first use (torch only)."""
  global _TORCH_FNS
  if _TORCH_FNS is not None:
    return _TORCH_FNS
  import torch  # pylint: disable=import-outside-toplevel

  def f32(t):
    return t if t.dtype in (torch.float32, torch.float64) else t.float()

  # Masks are kept as float 0/1 and applied by multiplication: on CPU torch.where and
  # masked_fill run a branch per element, and with a clip mask that is not all one way
  # (4-bit grids clip ~20% of activations) they took 7-23 ms over 1M floats where a
  # multiply takes about 1 ms (torch 2.13, one thread, measured for issue 12). For
  # finite values the products are exact (v * 1 = v, v * 0 = 0); a result whose sum is not
  # finite (a NaN or infinite input or gradient, or an overflowing sum) is recomputed with
  # torch.where, so values and gradients stay those of the core in every case.

  def finite(t):
    """Whether every element of ``t`` is finite (False also when the sum overflows)."""
    return bool(torch.isfinite(t.sum()))

  def inside_mask(code, q):
    """1.0 where clipping left the code unchanged, else 0.0 (a NaN code: 0.0), float32.

    Written over ``code`` (a float32 buffer of the forward's own, no longer needed):
    on CPU every fresh activation-sized buffer is first-touch page faults (see
    ``LsqFakeQuant``).
    """
    if code.dtype == torch.float32:
      return code.eq_(q)
    return torch.eq(code, q, out=torch.empty_like(code, dtype=torch.float32))

  def masked(g, inside):
    """``where(inside, g, 0)`` for a 0/1 float mask ``inside``."""
    if finite(g):
      return torch.mul(g, inside).to(g.dtype)
    return torch.where(inside > 0, g, g.new_zeros(()))

  class FakeQuant(torch.autograd.Function):
    """:func:`ops_fake_quant` in torch ops (clipped STE; no gradient to s, z)."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, unclipped):  # pylint: disable=arguments-differ
      # Two buffers of x's size: the codes (then the mask, in place) and the output.
      sc = f32(s).clamp_min(SCALE_EPS)
      code = torch.div(f32(x), sc).round_()  # the shape of x (s broadcasts against it)
      if z is not None:
        code = code.add_(f32(z))
      if unclipped:  # nothing clips: no mask to keep
        q = code.clamp_(qmin, qmax)
      else:
        q = code.clamp(qmin, qmax)
        ctx.save_for_backward(inside_mask(code, q))  # NaN codes are outside, as in the core
      ctx.unclipped = unclipped
      del code
      if z is not None:
        q = q.sub_(f32(z))
      return q.mul_(sc).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # pylint: disable=arguments-differ
      if ctx.unclipped:
        return g, None, None, None, None, None
      (inside,) = ctx.saved_tensors
      return masked(g, inside), None, None, None, None, None

  class LsqFakeQuant(torch.autograd.Function):
    """:func:`ops_lsq_fake_quant` in torch ops (gradients to x, s and the offset).

    The forward computes the step-size derivative ``ds`` (``round(v) - v``
    inside, the clipped code outside) while its inputs are at hand and keeps
    only ``ds`` and the clip mask; the backward is one masked product and one
    reduction.

    Without an offset the forward writes three buffers of x's size, the three it
    keeps (``ds``, the mask, the output), each op after the first writing over a
    buffer whose value is no longer needed: on CPU every fresh activation-sized
    buffer costs first-touch page faults (glibc returns freed blocks this large to
    the system), which in eager Keras training cost more than the arithmetic
    (issue 12: 22-40k faults per step of a 5-conv CNN).
    """

    @staticmethod
    def forward(ctx, x, s, b, qmin, qmax, grad_scale):  # pylint: disable=arguments-differ
      sc = f32(s).clamp_min(SCALE_EPS)
      v = torch.div(f32(x), sc)
      code = torch.round(v)
      z = None
      if b is not None:
        z = torch.div(f32(b).neg(), sc).round_()
        code = code.add_(z)
      q = code.clamp(qmin, qmax)
      # Clipped where clipping changed the code; a NaN code counts as clipped (the core's
      # LSQ). The mask is written over the codes: inside, code == q.
      inside = inside_mask(code, q)
      del code
      # d x_hat / d s: round(v) - v inside (= q - z - v there), the clipped code q outside.
      # (torch.addcmul took 3 ms over 1M floats, a product and a difference 1.2 ms.)
      if z is None:  # inside q - v * 1 is round(v) - v; outside q - v * 0 = q
        ds = torch.sub(q, v.mul_(inside), out=v)
        exact = finite(ds)
      else:  # (q - q * inside) + t * inside, t = (q - z) - v
        t = torch.sub(q, z).sub_(v)
        ds = torch.sub(q, torch.mul(q, inside, out=v), out=v).add_(t.mul_(inside))
        exact = finite(ds)
        del t
      if not exact:  # a non-finite value (x, or v * 0): the exact select, recomputed
        v = torch.div(f32(x), sc)
        t = torch.round(v).sub_(v) if z is None else torch.round(v).add_(z).sub_(z).sub_(v)
        ds = torch.where(inside > 0, t, q)
        del t, v
      if z is not None:
        q = q.sub_(z)
      ctx.save_for_backward(ds, inside)
      ctx.shapes = (s.shape, s.dtype, None if b is None else b.shape,
                    None if b is None else b.dtype, grad_scale)
      return q.mul_(sc).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # pylint: disable=arguments-differ
      ds, inside = ctx.saved_tensors
      s_shape, s_dtype, b_shape, b_dtype, grad_scale = ctx.shapes
      g32 = f32(g)
      if math.prod(s_shape) == 1:  # one step size: a dot product, one pass
        gs = torch.dot(g32.reshape(-1), ds.reshape(-1)).reshape(s_shape)
      else:
        gs = _torch_sum_to_shape(ds * g32, s_shape)  # ds is kept: retain_graph may call again
      # A finite gs is a sum of finite products g * ds over every element (an infinite or
      # NaN g gives an infinite or NaN term whatever ds is), so g is finite and the mask's
      # product is exact without masked()'s own pass over g.
      gx = torch.mul(g, inside).to(g.dtype) if finite(gs) else masked(g, inside)
      gs = gs.mul_(grad_scale).to(s_dtype)
      gb = None
      if b_shape is not None:  # the clipped elements' gradient: g times the 0/1 mask, as the core
        gb = _torch_sum_to_shape(torch.mul(g32, torch.rsub(inside, 1.0)), b_shape)
        gb = gb.mul_(grad_scale).to(b_dtype)
      return gx, gs, gb, None, None, None

  _TORCH_FNS = (FakeQuant, LsqFakeQuant)
  return _TORCH_FNS


def _torch_sum_to_shape(g, shape):
  """:func:`_sum_to_shape` in torch ops."""
  shape = tuple(shape)
  axes = _broadcast_axes(tuple(g.shape), shape)
  return (g.sum(dim=axes, keepdim=True) if axes else g).reshape(shape)


def torch_fake_quant(x, scale, zero_point, qmin: float, qmax: float, *, unclipped: bool = False):
  """:func:`ops_fake_quant` for torch tensors, as one ``torch.autograd.Function``.

  The same values and gradients as :func:`ops_fake_quant` (the same float
  operations in the same order), with less overhead per call.

  Args:
    x: a floating point torch tensor.
    scale: step size, broadcastable against ``x``.
    zero_point: integer-valued zero point (same shape as ``scale``) or ``None``.
    qmin: the grid's lowest code.
    qmax: the grid's highest code.
    unclipped: no element can clip (see :func:`quant_dequant`): no mask is
      kept and the gradient passes through.

  Returns:
    A tensor of ``x``'s shape and dtype.

  Examples:
    >>> import torch
    >>> torch_fake_quant(torch.tensor([-1.3, 0.26, 2.0]), torch.tensor(0.5), None, -8, 7).tolist()
    [-1.5, 0.5, 2.0]
  """
  return _torch_functions()[0].apply(x, scale, zero_point, float(qmin), float(qmax),
                                     bool(unclipped))


def torch_lsq_fake_quant(x, step_size, offset, qmin: float, qmax: float,
                         grad_scale: Optional[float] = None):
  """:func:`ops_lsq_fake_quant` for torch tensors, as one ``torch.autograd.Function``.

  Args:
    x: a floating point torch tensor.
    step_size: the learned step size (keepdims layout or scalar).
    offset: the LSQ+ offset β (same shape as ``step_size``) or ``None``.
    qmin: the grid's lowest code.
    qmax: the grid's highest code.
    grad_scale: overrides the gradient scale (default :math:`1/\\sqrt{N q_{max}}`).

  Returns:
    A tensor of ``x``'s shape and dtype.

  Examples:
    >>> import torch
    >>> s = torch.tensor(0.25, requires_grad=True)
    >>> y = torch_lsq_fake_quant(torch.tensor([0.3, 2.0]), s, None, -8, 7)
    >>> y.tolist()
    [0.25, 1.75]
  """
  if grad_scale is None:
    grad_scale = _lsq_grad_scale(x.shape, step_size.shape, qmax)
  return _torch_functions()[1].apply(x, step_size, offset, float(qmin), float(qmax),
                                     float(grad_scale))


def _to_block_layout(x, scale, spec):
  """Splits the block axis of ``x`` and expands ``scale`` to broadcast against it."""
  g = spec.granularity
  shape = tuple(int(d) for d in x.shape)
  axis = g.axis % len(shape)
  blocked = shape[:axis] + (shape[axis] // g.size, g.size) + shape[axis + 1:]
  return ops.reshape(x, blocked), (lambda t: ops.expand_dims(t, axis + 1)), shape


def quant_dequant(x, spec: spec_lib.QuantSpec, scale=None, zero_point=None, *, offset=None,
                  where: str = "tensor", force_ops: bool = False, unclipped: bool = False):
  """Fake-quantizes ``x`` as ``spec.learning`` says, on the current backend.

  On the JAX backend this calls :func:`jaxqat.core.quant_dequant` (all formats);
  on torch the same arithmetic as torch autograd Functions
  (:func:`torch_fake_quant`, :func:`torch_lsq_fake_quant`); elsewhere (or with
  ``force_ops=True``) the keras.ops implementation above. Off JAX, integer
  formats with per-tensor, per-channel and per-block scales, round half to
  even, learning ``fixed``/``lsq``/``lsq_plus``.

  Args:
    x: a floating point tensor.
    spec: the QuantSpec.
    scale: the step size (shape ``spec.scale_shape(x.shape)``).
    zero_point: the integer zero point of a fixed affine spec, or ``None``.
    offset: the LSQ+ offset β (``x ≈ s·q + β``; ``learning="lsq_plus"``
      only), or ``None``.
    where: the layer/tensor name used in error messages.
    force_ops: use the keras.ops path on any backend (for tests).
    unclipped: the caller knows no element clips (a weight tracked with a
      :func:`jaxqat.core.unclipped_weight` spec, its range computed from it
      in this call): the STE passes the gradient through without the clip
      mask (identical for finite values). Fixed-range specs only.

  Returns:
    The fake-quantized tensor.

  Raises:
    NotImplementedError: for float/block formats or stochastic rounding off
      the JAX backend.
    ValueError: if a learned spec is given ``zero_point``, or a spec other
      than ``lsq_plus`` is given ``offset`` (as the core).

  Examples:
    >>> import numpy as np
    >>> from jaxqat.core import QuantSpec
    >>> y = quant_dequant(np.array([0.26], "float32"), QuantSpec(learning="lsq"),
    ...                   np.float32(0.1), force_ops=True)
    >>> np.round(np.asarray(y), 6).tolist()
    [0.3]
  """
  unclipped = bool(unclipped) and spec.learning == "fixed" and zero_point is None
  if is_jax() and not force_ops:
    from jaxqat.core import quant_dequant as core_quant_dequant
    import jax.numpy as jnp
    unwrap = lambda t: None if t is None else (t.value if hasattr(t, "value") else jnp.asarray(t))
    if unclipped and not spec.is_block:
      from jaxqat.core._integer import _fq_unclipped  # pylint: disable=import-outside-toplevel
      return _fq_unclipped(unwrap(x), spec, unwrap(scale))
    return core_quant_dequant(unwrap(x), spec, unwrap(scale), unwrap(zero_point),
                              offset=unwrap(offset))
  if offset is not None and spec.learning != "lsq_plus":
    raise ValueError(f"{where}: offset is the LSQ+ offset; learning={spec.learning!r} takes none")
  if zero_point is not None and spec.learning != "fixed":
    raise ValueError(f"{where}: learning={spec.learning!r} takes no integer zero point; LSQ is "
                     "symmetric, LSQ+ learns a float offset (pass offset=-z*scale)")
  if not spec.is_int:
    raise NotImplementedError(
        f"{where}: format {spec.format.name} is implemented on the JAX backend only; on this "
        "backend use an integer format (int2..int16, uint*)")
  if spec.rounding != "nearest_even":
    raise NotImplementedError(
        f"{where}: rounding={spec.rounding!r} is implemented on the JAX backend only")
  x = ops.convert_to_tensor(x)
  s = ops.convert_to_tensor(scale)
  z = None if zero_point is None else ops.convert_to_tensor(zero_point)
  if offset is not None:
    z = ops.convert_to_tensor(offset)
  blocked = isinstance(spec.granularity, spec_lib.PerBlock)
  if blocked:
    x, expand, shape = _to_block_layout(x, s, spec)
    s = expand(s)
    z = None if z is None else expand(z)
  use_torch = backend_name() == "torch" and not force_ops
  if spec.learning == "fixed":
    y = (torch_fake_quant if use_torch else ops_fake_quant)(x, s, z, spec.qmin, spec.qmax,
                                                            unclipped=unclipped)
  else:
    gs = None
    if blocked:  # N = elements per step size, as in the core
      gs = 1.0 / math.sqrt(spec.granularity.size * float(spec.qmax))
    y = (torch_lsq_fake_quant if use_torch else ops_lsq_fake_quant)(x, s, z, spec.qmin, spec.qmax, gs)
  return ops.reshape(y, shape) if blocked else y
