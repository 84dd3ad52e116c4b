"""Tests for jaxqat.core fake-quant primitives (STE, LSQ, LSQ+, float, block)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxqat import core
from jaxqat.core import PerBlock, PerChannel, PerTensor, QuantSpec

INT_FORMATS = ["int2", "int4", "int8", "uint8", "int8_narrow", "int16"]


def _x(shape, seed=0, scale=2.0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), shape) * scale).astype(dtype)


def _np_int_fq(x, s, z, qmin, qmax):
  """Independent numpy reference of the integer forward pass."""
  x = np.asarray(x, np.float64)
  q = np.clip(np.round(x / s) + z, qmin, qmax)  # np.round is half-to-even too
  return (q - z) * s


def _granularity_scale(gran, shape, seed=1):
  spec = QuantSpec(granularity=gran)
  sshape = spec.scale_shape(shape)
  return jax.random.uniform(jax.random.key(seed), sshape, minval=0.05, maxval=0.3)


GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(-1), PerBlock(4, axis=1), PerBlock(2, axis=0)]


# ---------------------------------------------------------------------------
# Forward pass.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", INT_FORMATS)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
def test_int_forward_matches_numpy(fmt, gran):
  shape = (6, 8)
  x = _x(shape)
  spec = QuantSpec(format=fmt, granularity=gran, symmetric=not fmt.startswith("uint"))
  s = _granularity_scale(gran, shape)
  z = jnp.round(jnp.full(s.shape, 3.0)) if fmt.startswith("uint") else None
  y = jax.jit(functools.partial(core.fake_quant, spec=spec))(x, s, z)
  # Expand the scale by hand for the reference.
  s_np = np.asarray(s, np.float64)
  if isinstance(gran, PerBlock):
    s_np = np.repeat(s_np, gran.size, axis=gran.axis)
  ref = _np_int_fq(x, s_np, 0 if z is None else 3.0, spec.qmin, spec.qmax)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-6, atol=1e-7)
  assert y.dtype == x.dtype


def test_round_half_to_even_and_clip():
  spec = QuantSpec(format="int4")
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 100.0, -100.0])
  y = core.fake_quant(x, 1.0, spec=spec)
  np.testing.assert_array_equal(np.asarray(y), [0.0, 2.0, 2.0, -0.0, -2.0, 7.0, -8.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_preserved_and_bf16_close(dtype):
  x = _x((64,), dtype=dtype)
  spec = QuantSpec(format="int8")
  y = core.fake_quant(x, 0.02, spec=spec)
  assert y.dtype == dtype
  x32 = np.asarray(x, np.float32)
  ref = np.clip(np.round(x32 / np.float32(0.02)), -128, 127) * np.float32(0.02)  # float32 math
  # The only difference from float32 inputs is the final cast back to the input dtype.
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(ref, jnp.float32).astype(dtype)))


@pytest.mark.parametrize(
    "fmt,dt",
    [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2),
     ("fp6_e3m2", ml_dtypes.float6_e3m2fn), ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
     ("fp4_e2m1", ml_dtypes.float4_e2m1fn)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_float_formats_match_ml_dtypes_round_trip(fmt, dt, scale):
  # Many magnitudes, subnormals, exact ties and values beyond max.
  x = np.concatenate([
      np.asarray(_x((4096,), scale=3.0)),
      np.asarray(_x((1024,), seed=3, scale=1e-3)),
      np.float32([0.0, -0.0, 1e9, -1e9, 0.75, 1.25, 2.5, 5.0, 416.0, 464.0]),
  ]).astype(np.float32)
  y = core.fake_quant(jnp.asarray(x), scale, spec=QuantSpec(format=fmt))
  mx = float(ml_dtypes.finfo(dt).max)
  ref = (np.clip(x / np.float32(scale), -mx, mx).astype(dt).astype(np.float32) * np.float32(scale))
  np.testing.assert_array_equal(np.asarray(y), ref)


def test_float_format_per_channel():
  x = _x((5, 7))
  s = jnp.linspace(0.1, 1.0, 7)
  y = core.fake_quant(x, s, spec=QuantSpec(format="fp8_e4m3", granularity=PerChannel(-1)))
  ref = (np.asarray(x) / np.asarray(s)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.asarray(s)
  np.testing.assert_array_equal(np.asarray(y), ref)


# ---------------------------------------------------------------------------
# Block formats, hand-computed.
# ---------------------------------------------------------------------------


def test_mxfp4_hand_computed():
  # Block 0: amax 5 -> floor(log2 5) = 2, emax(e2m1) = 2 -> X = 2^0 = 1.
  # Block 1: amax 0.3 -> floor(log2 0.3) = -2 -> X = 2^-4; 0.3/X = 4.8 -> 4 ; 0.1/X = 1.6 -> 1.5.
  b0 = np.zeros(32, np.float32)
  b0[:4] = [5.0, 1.3, -0.4, 7.9]
  b1 = np.zeros(32, np.float32)
  b1[:2] = [0.3, -0.1]
  x = jnp.asarray(np.concatenate([b0, b1]))
  y = np.asarray(core.block_fake_quant(x, QuantSpec(format="mxfp4")))
  np.testing.assert_array_equal(y[:4], [4.0, 1.5, -0.5, 6.0])  # 7.9 clamps to 6
  np.testing.assert_array_equal(y[32:34], [4.0 / 16, -1.5 / 16])
  scales, ts = core.block_scales(x, QuantSpec(format="mxfp4"))
  np.testing.assert_array_equal(np.asarray(scales), [1.0, 2.0**-4])
  assert ts is None


def test_mxfp8_hand_computed():
  # amax 1000 -> floor(log2 1000) = 9, emax(e4m3) = 8 -> X = 2; 1000/2 = 500 -> clamps to 448.
  x = np.zeros(32, np.float32)
  x[:3] = [1000.0, 3.0, 0.013]
  y = np.asarray(core.block_fake_quant(jnp.asarray(x), QuantSpec(format="mxfp8")))
  e4m3 = lambda v: float(np.float32(v).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
  np.testing.assert_array_equal(y[:3], [896.0, 2 * e4m3(1.5), 2 * e4m3(0.0065)])


def _round_up_18_bits(t):
  """The documented NVFP4 tensor scale rounding: up to 18 significant bits (numpy)."""
  m, e = np.frexp(np.float64(t))  # t = m * 2^e, 0.5 <= m < 1
  return np.float32(np.ceil(m * 2.0**18) / 2.0**18 * 2.0**e)


def test_nvfp4_hand_computed():
  # Tensor amax 12 -> tensor scale t = 12 / (6 * 448). Block 0 amax 12 -> b = e4m3(12/(6t)) = 448.
  # Block 1 amax 0.9 -> 0.9 / (6 t) = 33.6 -> e4m3 rounds to 32; effective 32 t.
  x = np.zeros(32, np.float32)
  x[0], x[1] = 12.0, 2.0
  x[16], x[17] = 0.9, -0.2
  spec = QuantSpec(format="nvfp4")
  scales, t = core.block_scales(jnp.asarray(x), spec)
  t_ref = _round_up_18_bits(np.float32(12.0) / np.float32(6 * 448))
  assert float(t) == float(t_ref) and float(t) == pytest.approx(12.0 / 2688, rel=2.0**-17)
  np.testing.assert_array_equal(np.asarray(scales), [448.0, 32.0])
  y = np.asarray(core.block_fake_quant(jnp.asarray(x), spec))
  eff1 = np.float32(32.0) * t_ref
  fp4 = lambda v: np.float32(v).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
  # The tensor maximum decodes to 6 * 448 * t: exact, 12 up to the rounding of t.
  assert y[0] == np.float32(2688.0) * t_ref and y[0] == pytest.approx(12.0, rel=2.0**-17)
  np.testing.assert_allclose(y[1], fp4(2.0 / (448 * t_ref)) * 448 * t_ref, rtol=1e-6)
  np.testing.assert_allclose(y[[16, 17]], [fp4(0.9 / eff1) * eff1, fp4(-0.2 / eff1) * eff1], rtol=1e-6)


def test_nvfp4_calibrated_tensor_scale_and_zero_block():
  x = jnp.zeros((2, 16)).at[0, 0].set(3.0)
  spec = QuantSpec(format="nvfp4")
  y = core.fake_quant(x, 1.0 / 448, spec=spec)  # given tensor scale: block scale e4m3(3/(6/448)) = 224
  np.testing.assert_array_equal(np.asarray(y[1]), np.zeros(16))
  assert float(y[0, 0]) == 3.0
  assert not np.isnan(np.asarray(y)).any()


def test_block_format_along_axis0_and_grad():
  x = _x((64, 3))
  spec = QuantSpec(format="mxfp8", granularity=PerBlock(32, axis=0))
  y = core.block_fake_quant(x, spec)
  # Same as quantizing the transpose along the last axis.
  yt = core.block_fake_quant(x.T, QuantSpec(format="mxfp8"))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(yt.T))
  g = jax.grad(lambda v: core.block_fake_quant(v, spec).sum())(x)
  # The floor rule lets |x / X| reach just under 2^(emax+1) = 512 > 448: those elements clamp.
  xb = np.asarray(x).reshape(2, 32, 3)
  amax = np.abs(xb).max(axis=1, keepdims=True)
  big_x = np.exp2(np.floor(np.log2(amax)) - 8)
  mask = (np.abs(xb) / big_x <= 448).reshape(64, 3)
  assert not mask.all()  # the example does clamp some elements
  np.testing.assert_array_equal(np.asarray(g), mask.astype(np.float32))


# ---------------------------------------------------------------------------
# Gradients: STE against a stop_gradient formulation.
# ---------------------------------------------------------------------------


def _ste_reference(x, s, z, qmin, qmax):
  v = x / s
  code = jnp.round(v) + z  # masked where clipping changes the rounded code (PyTorch's rule)
  inside = (code >= qmin) & (code <= qmax)
  fq = (jnp.clip(jnp.round(v) + z, qmin, qmax) - z) * s
  return jnp.where(inside, x + jax.lax.stop_gradient(fq - x), jax.lax.stop_gradient(fq))


@pytest.mark.parametrize("fmt", ["int4", "int8", "uint8"])
def test_ste_gradient_equals_stop_gradient_reference(fmt):
  spec = QuantSpec(format=fmt, symmetric=fmt != "uint8")
  x = _x((257,), scale=3.0)
  # Put some points exactly on the clipping boundaries.
  z = 10.0 if fmt == "uint8" else 0.0
  s = 0.05
  x = x.at[0].set((spec.qmax - z) * s).at[1].set((spec.qmin - z) * s)
  w = _x((257,), seed=5)
  zp = None if fmt != "uint8" else z
  g = jax.grad(lambda v: jnp.sum(w * core.fake_quant(v, s, zp, spec)))(x)
  g_ref = jax.grad(lambda v: jnp.sum(w * _ste_reference(v, s, z, spec.qmin, spec.qmax)))(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
  assert float(g[0]) == float(w[0]) and float(g[1]) == float(w[1])  # boundaries pass the gradient


def test_values_rounding_onto_the_range_end_pass_the_gradient():
  # int4, s = 0.25: qmax 7 covers x up to 1.875 (7.5 steps, a tie that rounds to 8: clipped).
  spec = QuantSpec(format="int4")
  x = jnp.array([1.75, 1.8, 1.87, 1.9, -2.0, -2.1, -2.2], jnp.float32)
  g = jax.grad(lambda v: jnp.sum(core.fake_quant(v, 0.25, spec=spec)))(x)
  np.testing.assert_array_equal(np.asarray(g), [1, 1, 1, 0, 1, 1, 0])
  gl = jax.grad(lambda v: jnp.sum(core.lsq_fake_quant(v, 0.25, spec=spec.replace(
      learning="lsq"))))(x)
  np.testing.assert_array_equal(np.asarray(gl), np.asarray(g))  # one convention


def test_absmax_entry_of_each_channel_passes_the_gradient():
  # s = amax / qmax can put amax / s a few ulp above qmax; that entry is not clipped.
  w = _x((64, 32), seed=11)
  spec = QuantSpec(granularity=PerChannel(-1))
  s, _ = core.calibrate(spec, [w])
  g = jax.grad(lambda v: jnp.sum(core.fake_quant(v, s, spec=spec)))(w)
  assert bool(jnp.all(g == 1.0))
  gl = jax.grad(lambda v: jnp.sum(core.lsq_fake_quant(v, s, spec=spec.replace(learning="lsq"))))(w)
  assert bool(jnp.all(gl == 1.0))


def test_matmul_backward_uses_quantized_operand():
  spec = QuantSpec(format="int4", granularity=PerChannel(-1))
  w = _x((8, 4), seed=2, scale=0.5)
  s = jnp.full((4,), 0.1)
  x = _x((3, 8), seed=3)
  gx = jax.grad(lambda a: jnp.sum(a @ core.fake_quant(w, s, spec=spec)))(x)
  wq = core.fake_quant(w, s, spec=spec)
  np.testing.assert_allclose(np.asarray(gx), np.ones((3, 4)) @ np.asarray(wq).T, rtol=1e-6)


def test_fixed_fake_quant_gives_zero_scale_gradient():
  gs = jax.grad(lambda s: core.fake_quant(_x((16,)), s, spec=QuantSpec()).sum())(0.1)
  assert float(gs) == 0.0


# ---------------------------------------------------------------------------
# LSQ / LSQ+ gradients against the paper formulas, written out independently.
# ---------------------------------------------------------------------------


def _lsq_paper_grads(x, s, beta, qn, qp, g_scale, upstream):
  """Esser et al. 2020 eq. 3/5 and Bhalgat et al. 2020, elementwise, in numpy float64."""
  x = np.asarray(x, np.float64)
  u = (x - beta) / s
  r = np.round(u)  # half to even; clipped where the rounded code leaves [-qn, qp]
  dx = np.where((r >= -qn) & (r <= qp), 1.0, 0.0)
  ds = np.where(r < -qn, -qn, np.where(r > qp, qp, r - u))
  db = np.where((r >= -qn) & (r <= qp), 0.0, 1.0)
  up = np.asarray(upstream, np.float64)
  return up * dx, up * ds * g_scale, up * db * g_scale


@pytest.mark.parametrize("fmt", ["int2", "int4", "int8"])
def test_lsq_gradients_per_tensor_with_boundaries(fmt):
  spec = QuantSpec(format=fmt, learning="lsq")
  s = 0.125
  x = np.array(_x((300,), scale=0.4 * spec.qmax * s), np.float32)
  x[:4] = [spec.qmax * s, spec.qmin * s, (spec.qmax + 0.5) * s, 0.0]  # exact boundaries
  up = np.asarray(_x((300,), seed=9))
  f = lambda v, st: jnp.sum(jnp.asarray(up) * core.lsq_fake_quant(v, st, spec=spec))
  gx, gs = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.float32(s))
  g = 1.0 / np.sqrt(x.size * spec.qmax)
  rx, rs, _ = _lsq_paper_grads(x, s, 0.0, -spec.qmin, spec.qmax, g, up)
  np.testing.assert_allclose(np.asarray(gx), rx, rtol=1e-6)
  np.testing.assert_allclose(float(gs), rs.sum(), rtol=1e-5, atol=1e-6)
  assert float(gx[0]) == up[0] and float(gx[1]) == up[1]  # at the ends: inside (inclusive range)


def test_lsq_plus_gradients_with_offset():
  spec = QuantSpec(format="uint8", symmetric=False, learning="lsq_plus")
  s, z = 0.02, 37
  beta = -z * s  # an offset on the grid, so round(-beta/s) = z exactly
  x = np.array(_x((500,), scale=2.0), np.float32)
  up = np.asarray(_x((500,), seed=4))
  f = lambda v, st, b: jnp.sum(jnp.asarray(up) * core.lsq_fake_quant(v, st, b, spec=spec))
  gx, gs, gb = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(x), jnp.float32(s), jnp.float32(beta))
  g = 1.0 / np.sqrt(x.size * 255)
  rx, rs, rb = _lsq_paper_grads(x, s, beta, 0, 255, g, up)
  np.testing.assert_allclose(np.asarray(gx), rx)
  np.testing.assert_allclose(float(gs), rs.sum(), rtol=1e-4)
  np.testing.assert_allclose(float(gb), rb.sum(), rtol=1e-5)
  y = core.lsq_fake_quant(jnp.asarray(x), s, beta, spec=spec)
  np.testing.assert_allclose(np.asarray(y), _np_int_fq(x, s, z, 0, 255), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("z", [-140, -129, 128, 300])
def test_lsq_plus_offset_past_the_grid_acts_as_the_end_code_as_served(z):
  """An offset whose zero point drifted off [qmin, qmax] quantizes with the end code.

  Post-ReLU inputs calibrate to z == qmin; a QAT step can move the offset past
  it. The served encoding stores an int8 zero point, so fake quant must use the
  clipped one too, or the served model differs from the trained one.
  """
  spec = QuantSpec(format="int8", symmetric=False, learning="lsq_plus")
  s = 0.02
  x = np.abs(np.asarray(_x((400,), scale=2.0), np.float32)) * (1 if z < 0 else -1)
  y = core.lsq_fake_quant(jnp.asarray(x), s, jnp.float32(-z * s), spec=spec)
  zc = int(np.clip(z, -128, 127))
  np.testing.assert_allclose(np.asarray(y), _np_int_fq(x, s, zc, -128, 127), rtol=1e-6, atol=1e-7)
  enc = core.encoding_from_state(
      spec, {"log_scale": core.step_size_to_param(jnp.float32(s)), "offset": jnp.float32(-z * s)})
  assert int(enc.zero_point) == zc
  # The offset still gets the clipped elements' gradient, so it can come back.
  gb = jax.grad(lambda b: jnp.sum(core.lsq_fake_quant(jnp.asarray(x), s, b, spec=spec)))(
      jnp.float32(-z * s))
  assert float(gb) != 0.0


@pytest.mark.parametrize("gran", [PerChannel(0), PerChannel(-1), PerBlock(4, axis=1)], ids=str)
def test_lsq_gradients_per_channel_and_block_sum_over_covered_elements(gran):
  spec = QuantSpec(format="int4", granularity=gran, learning="lsq")
  shape = (6, 8)
  x = np.asarray(_x(shape, scale=1.0))
  s = np.asarray(_granularity_scale(gran, shape))
  up = np.asarray(_x(shape, seed=7))
  f = lambda st: jnp.sum(jnp.asarray(up) * core.lsq_fake_quant(jnp.asarray(x), st, spec=spec))
  gs = np.asarray(jax.grad(f)(jnp.asarray(s)))
  s_full = np.repeat(s, gran.size, axis=gran.axis) if isinstance(gran, PerBlock) else np.broadcast_to(s, shape)
  n = x.size // s.size
  _, rs, _ = _lsq_paper_grads(x, s_full, 0.0, 8, 7, 1.0 / np.sqrt(n * 7), up)
  if isinstance(gran, PerBlock):
    ref = rs.reshape(6, 2, 4).sum(axis=2)
  elif gran.axis == 0:
    ref = rs.sum(axis=1, keepdims=True)
  else:
    ref = rs.sum(axis=0, keepdims=True)
  np.testing.assert_allclose(gs, ref, rtol=1e-5, atol=1e-6)


def test_lsq_grad_scale_override_and_float_format():
  spec = QuantSpec(format="fp8_e4m3", learning="lsq")
  x = jnp.array([1.0, 1000.0])
  gs = jax.grad(lambda s: core.lsq_fake_quant(x, s, spec=spec, grad_scale=1.0).sum())(1.0)
  # 1.0 is on the grid (q - v = 0); 1000 clips at 448 -> gradient 448.
  assert float(gs) == 448.0


def test_lsq_step_size_stays_positive():
  spec = QuantSpec(format="int8", learning="lsq")
  y = core.lsq_fake_quant(jnp.array([1.0, -2.0]), -0.5, spec=spec)
  assert np.isfinite(np.asarray(y)).all()


# ---------------------------------------------------------------------------
# Transformations and dtypes.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("learning", ["fixed", "lsq"])
def test_jit_grad_vmap(dtype, learning):
  spec = QuantSpec(format="int8", granularity=PerChannel(-1), learning=learning)
  x = _x((4, 5, 6), dtype=dtype)
  s = jnp.full((6,), 0.05, jnp.float32)
  f = lambda v, st: core.quant_dequant(v, spec, st)
  y = jax.jit(f)(x, s)
  assert y.dtype == dtype and y.shape == x.shape
  yv = jax.vmap(f, in_axes=(0, None))(x, s)
  np.testing.assert_array_equal(np.asarray(yv, np.float32), np.asarray(y, np.float32))
  gx, gs = jax.jit(jax.grad(lambda v, st: jnp.sum(f(v, st).astype(jnp.float32)), argnums=(0, 1)))(x, s)
  assert gx.dtype == dtype and gs.dtype == jnp.float32
  assert np.isfinite(np.asarray(gx, np.float32)).all() and np.isfinite(np.asarray(gs)).all()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1", "mxfp4", "nvfp4"])
def test_float_and_block_under_jit_vmap_bf16(fmt):
  spec = QuantSpec(format=fmt)
  x = _x((3, 32), dtype=jnp.bfloat16)
  # NVFP4 gets a calibrated tensor scale: derived from the data, it would be per vmapped row.
  scale = {"mxfp4": None, "nvfp4": jnp.float32(0.01)}.get(fmt, jnp.float32(0.5))
  f = lambda v: core.quant_dequant(v, spec, scale)
  y = jax.jit(f)(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x), np.float32), np.asarray(y, np.float32))
  g = jax.grad(lambda v: jnp.sum(f(v).astype(jnp.float32)))(x)
  assert g.dtype == jnp.bfloat16


def test_stochastic_rounding_is_unbiased_and_needs_key():
  spec = QuantSpec(format="int8", rounding="stochastic")
  x = jnp.full((20000,), 0.3)
  y = core.fake_quant(x, 1.0, spec=spec, key=jax.random.key(0))
  assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}
  assert abs(float(y.mean()) - 0.3) < 0.01
  with pytest.raises(ValueError, match="key"):
    core.fake_quant(x, 1.0, spec=spec)
  qt = core.quantize(x, 1.0, spec=spec, key=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(core.dequantize(qt)), np.asarray(y))


# ---------------------------------------------------------------------------
# Properties (hypothesis).
# ---------------------------------------------------------------------------

_settings = settings(max_examples=40, deadline=None)
# A fixed length keeps XLA from compiling a new program for every example.
_floats = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=64, max_size=64)


@_settings
@given(xs=_floats, bits=st.integers(2, 16), s=st.floats(1e-3, 4.0), signed=st.booleans())
def test_property_error_half_step_idempotent_quantize(xs, bits, s, signed):
  spec = QuantSpec(format=core.IntFormat(bits=bits, signed=signed), symmetric=signed)
  z = None if signed else 2 ** (bits - 1)
  zz = 0 if z is None else z
  x = jnp.asarray(np.float32(xs))
  s = np.float32(s)
  y = core.fake_quant(x, s, z, spec)
  v = np.asarray(x) / s
  inside = (v >= spec.qmin - zz) & (v <= spec.qmax - zz)
  err = np.abs(np.asarray(y) - np.asarray(x))[inside]
  assert (err <= s / 2 * (1 + 1e-5) + 1e-6).all()
  y2 = core.fake_quant(y, s, z, spec)
  np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))  # idempotent
  qt = core.quantize(x, s, z, spec)
  np.testing.assert_array_equal(np.asarray(core.dequantize(qt)), np.asarray(y))


@_settings
@given(xs=_floats, fmt=st.sampled_from(["int3", "int8", "fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp4_e2m1"]),
       s=st.floats(1e-2, 2.0))
def test_property_monotone_and_finite_gradients(xs, fmt, s):
  spec = QuantSpec(format=fmt)
  x = jnp.sort(jnp.asarray(np.float32(xs)))
  y = np.asarray(core.fake_quant(x, s, spec=spec))
  assert (np.diff(y) >= 0).all()
  for learning in ("fixed", "lsq"):
    sp = spec.replace(learning=learning)
    gx, gs = jax.grad(lambda v, st: core.quant_dequant(v, sp, st).sum(), argnums=(0, 1))(x, jnp.float32(s))
    assert np.isfinite(np.asarray(gx)).all() and np.isfinite(float(gs))


@_settings
@given(xs=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=32, max_size=32),
       fmt=st.sampled_from(["mxfp4", "mxfp6", "mxfp8", "nvfp4"]))
def test_property_block_quantize_equals_fake_quant_and_idempotent(xs, fmt):
  spec = QuantSpec(format=fmt)
  x = jnp.asarray(np.float32(xs))
  y = core.block_fake_quant(x, spec)
  np.testing.assert_array_equal(np.asarray(core.dequantize(core.quantize(x, None, spec=spec))), np.asarray(y))
  assert np.isfinite(np.asarray(y)).all()
  y2 = np.asarray(core.block_fake_quant(y, spec))
  # Idempotent; for nvfp4 on the blocks whose e4m3 scale is 0 or normal (the documented scope).
  b = np.asarray(core.block_scales(x, spec)[0])
  if fmt == "nvfp4":
    b = np.where((b == 0) | (b >= 2.0**-6), 1.0, 0.0)
  keep = np.repeat(b > 0, spec.format.block_size)
  np.testing.assert_array_equal(y2[keep], np.asarray(y)[keep])


# ---------------------------------------------------------------------------
# Agreement with Keras' fake_quant_with_min_max_vars.
# ---------------------------------------------------------------------------


def test_affine_int8_agrees_with_keras_fake_quant_with_min_max_vars():
  """Same result wherever the conventions coincide.

  Keras quantizes onto [0, 2^b - 1] with scale (max - min) / (2^b - 1) and a
  zero point nudged to an integer, and rounds half *up* (floor(v + 0.5)).
  jaxqat rounds half to even, so the two agree except on exact ties.
  """
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("compared on the JAX backend")
  lo, hi = -1.3, 2.1
  x = np.asarray(_x((4000,), scale=1.5))
  s = (hi - lo) / 255
  z = np.clip(np.round(0 - lo / s), 0, 255)
  frac = np.abs((x / s) % 1.0 - 0.5)
  x = x[frac > 1e-3]  # drop near-ties, where the rounding rules differ
  ours = core.fake_quant(jnp.asarray(x), s, z, QuantSpec(format="uint8", symmetric=False))
  theirs = keras.quantizers.fake_quant_with_min_max_vars(jnp.asarray(x), lo, hi, num_bits=8)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)
  # And on a tie they differ exactly as documented: half-to-even vs half-up.
  tie = jnp.asarray([(2.5 - z) * s], jnp.float32)
  a = core.fake_quant(tie, s, z, QuantSpec(format="uint8", symmetric=False))
  b = keras.quantizers.fake_quant_with_min_max_vars(tie, lo, hi, num_bits=8)
  assert abs(float(b[0]) - float(a[0]) - s) < 1e-6 or abs(float(b[0]) - float(a[0])) < 1e-6


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
  x = _x((4, 6))
  with pytest.raises(TypeError, match="x: expected a floating point"):
    core.fake_quant(jnp.arange(4), 0.1, spec=QuantSpec())
  with pytest.raises(ValueError, match="bits must be in"):
    QuantSpec(format=core.IntFormat(bits=17))
  with pytest.raises(ValueError, match="bits must be in"):
    QuantSpec(format="int1")
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    core.fake_quant(x, jnp.ones((6,)), spec=QuantSpec(granularity=PerChannel(2)))
  with pytest.raises(ValueError, match="block size 4 does not divide"):
    core.fake_quant(x, jnp.ones((4, 1)), spec=QuantSpec(granularity=PerBlock(4, axis=1)))
  with pytest.raises(ValueError, match=r"scale: shape \(5,\)"):
    core.fake_quant(x, jnp.ones((5,)), spec=QuantSpec(granularity=PerChannel(-1)))
  with pytest.raises(ValueError, match="zero_point: shape"):
    core.fake_quant(x, jnp.ones((6,)), jnp.ones((3,)), spec=QuantSpec(granularity=PerChannel(-1)))
  with pytest.raises(TypeError, match="spec: expected"):
    core.fake_quant(x, 0.1, spec="int8")
  with pytest.raises(ValueError, match="QuantSpec.format: format: unknown format name"):
    QuantSpec(format="int8x")
  with pytest.raises(ValueError, match="QuantSpec.learning"):
    QuantSpec(learning="lsq++")
  with pytest.raises(ValueError, match="QuantSpec.learning: 'lsq_plus' .* symmetric=False"):
    QuantSpec(learning="lsq_plus")
  with pytest.raises(ValueError, match="QuantSpec.granularity: mxfp4 needs PerBlock"):
    QuantSpec(format="mxfp4", granularity=PerChannel(0))
  with pytest.raises(ValueError, match="zero_point: float format"):
    core.fake_quant(x, 0.1, 3.0, spec=QuantSpec(format="fp8"))
  with pytest.raises(ValueError, match="scale: a step size is required"):
    core.fake_quant(x, None, spec=QuantSpec())
  with pytest.raises(ValueError, match="block size 32 does not divide"):
    core.block_fake_quant(x, QuantSpec(format="mxfp8"))
  with pytest.raises(ValueError, match="tensor_scale: mxfp8 has no tensor scale"):
    core.block_fake_quant(jnp.ones(32), QuantSpec(format="mxfp8"), tensor_scale=1.0)
  with pytest.raises(ValueError, match="zero_point: learning='lsq' takes no integer zero point"):
    core.quant_dequant(x, QuantSpec(learning="lsq"), 0.1, 1.0)
  with pytest.raises(ValueError, match="step_size: shape"):
    core.lsq_fake_quant(x, jnp.ones(3), spec=QuantSpec(learning="lsq", granularity=PerChannel(0)))


def test_lsq_state_encodings_state_round_trip_is_exact():
  """log_scale/offset -> Encoding -> JSON -> Encoding -> log_scale/offset: the same forward."""
  import json  # pylint: disable=import-outside-toplevel
  n = 10000
  rng = np.random.default_rng(0)
  theta = jnp.asarray(np.log(np.exp(rng.uniform(np.log(1e-8), np.log(1e4), n))), jnp.float32)
  spec = QuantSpec(format="uint8", symmetric=False, learning="lsq_plus", granularity=PerChannel(-1))
  s = core.param_to_step_size(theta)
  beta = -jnp.asarray(rng.integers(0, 256, n), jnp.float32) * s * 1.001  # z = round(-β/s)
  enc = core.encoding_from_state(spec, {"log_scale": theta, "offset": beta}, name="l/kernel")
  text = json.dumps(core.encodings_to_dict({"l/kernel": enc}, {}))
  back = core.encodings_from_dict(text, {"l/kernel": ("param", enc.spec, (1, n))})["l/kernel"]
  # What every front end stores on load (NNX, Linen, Keras call the core's inverse).
  theta2 = core.step_size_to_param(back.scale).reshape(n)
  beta2 = -back.zero_point.reshape(n).astype(jnp.float32) * back.scale.reshape(n)
  np.testing.assert_array_equal(np.asarray(core.param_to_step_size(theta2)), np.asarray(s))
  assert int(jnp.sum(core.param_to_step_size(jnp.log(back.scale)).reshape(n) != s)) > 0  # log alone
  enc2 = core.encoding_from_state(spec, {"log_scale": theta2, "offset": beta2})
  np.testing.assert_array_equal(np.asarray(enc2.scale), np.asarray(enc.scale))
  np.testing.assert_array_equal(np.asarray(enc2.zero_point), np.asarray(enc.zero_point))
  x = jnp.asarray(rng.normal(size=(3, n)), jnp.float32) * s * 100
  np.testing.assert_array_equal(
      np.asarray(core.lsq_fake_quant(x, core.param_to_step_size(theta2), beta2, spec)),
      np.asarray(core.lsq_fake_quant(x, s, beta, spec)))
  # The closest θ where none is exact (a step size no float32 θ reaches), never worse than log.
  t = jnp.float32(np.float32(3e9))
  got = abs(float(core.param_to_step_size(core.step_size_to_param(t))) - float(t))
  assert got <= abs(float(core.param_to_step_size(jnp.log(t))) - float(t))


def test_nan_element_passes_no_gradient_in_every_primitive():
  x = jnp.array([0.3, jnp.nan, 5.0, -0.2])
  g = lambda f: np.asarray(jax.grad(lambda v: jnp.sum(jnp.nan_to_num(f(v))))(x))
  want = np.array([1.0, 0.0, 0.0, 1.0])  # 5.0 is clipped (int4, s = 0.25: code 20 > 7)
  np.testing.assert_array_equal(g(lambda v: core.fake_quant(v, 0.25, None, QuantSpec(format="int4"))), want)
  lsq = QuantSpec(format="int4", learning="lsq")
  np.testing.assert_array_equal(g(lambda v: core.lsq_fake_quant(v, 0.25, None, lsq)), want)
  fp8 = QuantSpec(format="fp8_e4m3")
  np.testing.assert_array_equal(g(lambda v: core.fake_quant(v, 0.01, None, fp8)), want)
  # LSQ+: the NaN element counts as clipped for the offset (as 5.0 does).
  plus = QuantSpec(format="uint8", symmetric=False, learning="lsq_plus")
  _, pull = jax.vjp(lambda b: core.lsq_fake_quant(x, 0.01, b, plus, grad_scale=1.0),
                    jnp.float32(-0.5))
  assert float(pull(jnp.ones(4))[0]) == 2.0
