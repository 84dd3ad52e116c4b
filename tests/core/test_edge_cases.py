"""Regression tests for issue 9: block-format edge cases, non-finite input, derivatives
beyond first-order reverse mode, one boundary convention, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxqat import core
from jaxqat.core import PerChannel, QuantSpec

NVFP4 = QuantSpec(format="nvfp4")


def _x(shape, seed, scale=1.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale


# ---------------------------------------------------------------------------
# 1. NVFP4: one tensor scale on every path, idempotent fake quant, underflow.
# ---------------------------------------------------------------------------


def test_nvfp4_tensor_scale_same_eager_jitted_and_stored():
  # Seeds whose tensor amax / 2688 is one ulp off under a reciprocal multiply.
  fq_jit = jax.jit(lambda v: core.block_scales(v, NVFP4))
  for seed in range(20):
    x = _x((4, 64), seed, scale=float(1 + seed))
    _, t_eager = core.block_scales(x, NVFP4)
    _, t_jit = fq_jit(x)
    t_stored = core.quantize(x, None, spec=NVFP4).tensor_scale
    assert float(t_eager) == float(t_jit) == float(t_stored)


def test_nvfp4_fake_quant_is_idempotent_over_many_seeds():
  for seed in range(20):
    x = _x((8, 64), seed, scale=10.0 ** (seed % 7 - 3))
    y = core.block_fake_quant(x, NVFP4)
    np.testing.assert_array_equal(np.asarray(core.block_fake_quant(y, NVFP4)), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(jax.jit(core.block_fake_quant, static_argnums=1)(y, NVFP4)),
                                  np.asarray(y))


def test_nvfp4_underflowed_block_scale_decodes_to_zero_everywhere():
  # Block 1's amax / (6 t) = 1e-6 * 448 / 6e6 ... far below e4m3's smallest subnormal 2^-9.
  x = jnp.zeros(32).at[0].set(6.0e6).at[16].set(1.0).at[17].set(-0.4)
  b, _ = core.block_scales(x, NVFP4)
  assert float(b[1]) == 0.0
  y = np.asarray(core.block_fake_quant(x, NVFP4))
  np.testing.assert_array_equal(y[16:], np.zeros(16))
  qt = core.quantize(x, None, spec=NVFP4)
  np.testing.assert_array_equal(np.asarray(core.dequantize(qt)), y)
  # The straight-through gradient still passes there (rounding to 0 is not clipping).
  g = jax.grad(lambda v: core.block_fake_quant(v, NVFP4).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), np.ones(32))


# ---------------------------------------------------------------------------
# 2. MX: an all-zero block stores 2^-127, never NaN.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_mx_all_zero_block_stores_two_to_minus_127(fmt):
  spec = QuantSpec(format=fmt)
  x = jnp.concatenate([jnp.zeros(32), _x((32,), 1)])
  qt = core.quantize(x, None, spec=spec)
  code = np.asarray(jax.lax.bitcast_convert_type(qt.scale, jnp.uint8))
  assert code[0] == 0  # e8m0 code 0 is 2^-127; 255 would be NaN
  assert not np.isnan(np.asarray(qt.scale.astype(jnp.float32))).any()
  y = np.asarray(core.dequantize(qt))
  np.testing.assert_array_equal(y[:32], np.zeros(32))
  np.testing.assert_array_equal(y, np.asarray(core.block_fake_quant(x, spec)))
  b, _ = core.block_scales(x, spec)
  assert float(b[0]) == 2.0**-127


# ---------------------------------------------------------------------------
# 3. NaN / inf: the block decodes to NaN, other blocks and the tensor scale are untouched.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
def test_non_finite_value_makes_its_block_nan_and_nothing_else(fmt):
  for bad in (np.nan, np.inf, -np.inf):
    _check_non_finite_block(QuantSpec(format=fmt), bad)


def _check_non_finite_block(spec, bad):
  fmt = spec.format.name
  n = spec.format.block_size
  x = _x((4 * n,), 3, scale=3.0)
  clean = x.at[n:2 * n].set(0.0)  # the reference: the bad block's values removed
  x_bad = x.at[n + 5].set(bad)
  y = np.asarray(core.block_fake_quant(x_bad, spec))
  assert np.isnan(y[n:2 * n]).all()
  y_clean = np.asarray(core.block_fake_quant(clean if fmt != "nvfp4" else x, spec))
  keep = np.r_[0:n, 2 * n:4 * n]
  np.testing.assert_array_equal(y[keep], y_clean[keep])
  b, t = core.block_scales(x_bad, spec)
  assert np.isnan(np.asarray(b)[1]) and np.isfinite(np.asarray(b)[[0, 2, 3]]).all()
  if fmt == "nvfp4":  # the tensor scale comes from the finite values (here the same as without)
    assert float(t) == float(core.block_scales(x, spec)[1])
  qt = core.quantize(x_bad, None, spec=spec)
  np.testing.assert_array_equal(np.asarray(core.dequantize(qt)), y)  # NaN == NaN here
  if fmt != "nvfp4":
    assert np.asarray(jax.lax.bitcast_convert_type(qt.scale, jnp.uint8))[1] == 255


# ---------------------------------------------------------------------------
# 5. Forward mode and second order follow the STE.
# ---------------------------------------------------------------------------


def test_hessian_of_fake_quant_is_the_ste_prediction():
  v = _x((12,), 4, scale=1.0)
  h = jax.hessian(lambda a: jnp.sum(core.fake_quant(a, 0.1, spec=QuantSpec(format="int4")) ** 2))(v)
  r = np.round(np.asarray(v) / 0.1)  # masked where the rounded code is clipped
  mask = (r >= -8) & (r <= 7)
  assert 0 < mask.sum() < 12
  np.testing.assert_array_equal(np.asarray(h), np.diag(2.0 * mask))
  h8 = jax.hessian(lambda a: jnp.sum(core.fake_quant(a, 0.1) ** 2))(v)
  np.testing.assert_array_equal(np.asarray(h8), 2.0 * np.eye(12))


@pytest.mark.parametrize("spec", [QuantSpec(format="int4"),
                                  QuantSpec(format="int4", learning="lsq"),
                                  QuantSpec(format="uint8", symmetric=False, learning="lsq_plus"),
                                  QuantSpec(format="fp8_e4m3"),
                                  QuantSpec(format="mxfp4")], ids=lambda s: s.learning + s.format.name)
def test_jvp_and_jacfwd_equal_the_transposed_gradient(spec):
  x = _x((32,), 5, scale=1.5)
  scale = None if spec.is_block else jnp.float32(0.2 if spec.is_int else 0.01)
  off = jnp.float32(-0.4) if spec.learning == "lsq_plus" else None
  f = lambda a: core.quant_dequant(a, spec, scale, offset=off)
  jf = np.asarray(jax.jacfwd(f)(x))
  jr = np.asarray(jax.jacrev(f)(x))
  np.testing.assert_array_equal(jf, jr)
  assert set(np.unique(np.diag(jf))) <= {0.0, 1.0} and np.count_nonzero(jf - np.diag(np.diag(jf))) == 0
  t = _x((32,), 6)
  _, y_dot = jax.jvp(f, (x,), (t,))
  np.testing.assert_array_equal(np.asarray(y_dot), np.diag(jf) * np.asarray(t))
  if scale is not None and spec.learning != "fixed":  # step-size tangent vs gradient
    fs = lambda s: core.quant_dequant(x, spec, s, offset=off)
    js = np.asarray(jax.jacfwd(fs)(scale))
    gs = np.asarray(jax.grad(lambda s: fs(s).sum())(scale))
    np.testing.assert_allclose(js.sum(), gs, rtol=1e-5)


def test_lsq_hessian_follows_the_ste():
  spec = QuantSpec(format="int4", learning="lsq")
  v = _x((16,), 7, scale=1.5)
  h = jax.hessian(lambda a: jnp.sum(core.lsq_fake_quant(a, 0.25, spec=spec) ** 2))(v)
  r = np.round(np.asarray(v) / 0.25)
  mask = (r >= -8) & (r <= 7)
  np.testing.assert_array_equal(np.asarray(h), np.diag(2.0 * mask))


# ---------------------------------------------------------------------------
# 6. One boundary convention: clipped where the rounded code leaves the range.
# ---------------------------------------------------------------------------


def test_gradient_passes_exactly_on_qmax_in_every_primitive():
  spec = QuantSpec(format="int4")
  x = jnp.array([1.75, -2.0, 1.875])  # s = 0.25: u = 7 (qmax), -8 (qmin), 7.5 (clipped)
  g_fq = jax.grad(lambda a: core.fake_quant(a, 0.25, spec=spec).sum())(x)
  g_lsq = jax.grad(lambda a: core.lsq_fake_quant(a, 0.25, spec=spec.replace(learning="lsq")).sum())(x)
  np.testing.assert_array_equal(np.asarray(g_fq), [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(np.asarray(g_lsq), [1.0, 1.0, 0.0])
  # On the ends the step-size derivative is the inside one, round(u) - u = 0.
  gs = jax.grad(lambda s: core.lsq_fake_quant(x[:2], s, spec=spec.replace(learning="lsq"),
                                              grad_scale=1.0).sum())(0.25)
  assert float(gs) == 0.0


# ---------------------------------------------------------------------------
# 7. Bad input is an error that names the argument.
# ---------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_argument_name():
  x = _x((4, 8), 8)
  with pytest.raises(TypeError, match="signed must be a bool"):
    core.IntFormat(bits=8, signed="no")
  with pytest.raises(TypeError, match="narrow must be a bool"):
    core.IntFormat(bits=8, narrow=1)
  for bad in (np.inf, np.nan, -np.inf):
    with pytest.raises(ValueError, match="scale: must be finite"):
      core.fake_quant(x, bad, spec=QuantSpec())
    with pytest.raises(ValueError, match="scale: must be finite"):
      core.quantize(x, bad, spec=QuantSpec())
    with pytest.raises(ValueError, match="step_size: must be finite"):
      core.lsq_fake_quant(x, bad, spec=QuantSpec(learning="lsq"))
    with pytest.raises(ValueError, match="tensor_scale: must be finite and > 0"):
      core.block_fake_quant(jnp.ones(16), NVFP4, tensor_scale=bad)
  with pytest.raises(ValueError, match="scale: must be finite"):
    core.fake_quant(x, jnp.array([0.1] * 7 + [np.nan]), spec=QuantSpec(granularity=PerChannel(-1)))
  affine = QuantSpec(format="int8", symmetric=False)
  for zp in (1000, -129, 3.5):
    with pytest.raises(ValueError, match=r"zero_point: must hold integers in \[-128, 127\]"):
      core.fake_quant(x, 0.1, zp, spec=affine)
    with pytest.raises(ValueError, match=r"zero_point: must hold integers in \[-128, 127\]"):
      core.quantize(x, 0.1, zp, spec=affine)
  for gsc in (np.nan, -1.0, np.inf):
    with pytest.raises(ValueError, match="grad_scale: must be a finite number >= 0"):
      core.lsq_fake_quant(x, 0.1, spec=QuantSpec(learning="lsq"), grad_scale=gsc)
  # Traced values cannot be checked: documented NaN output, no error.
  y = jax.jit(lambda s: core.fake_quant(x, s, spec=QuantSpec()))(jnp.float32(np.nan))
  assert np.isnan(np.asarray(y)).all()
