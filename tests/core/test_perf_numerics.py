"""Performance changes that must not change numerics: residuals of the backward pass.

The fake-quant primitives keep, for reverse mode, only what their backward
pass needs in its narrowest form: a boolean mask for the clipped STE, the
primal inputs (recomputing the masks and the step-size derivative) for LSQ.
These tests hold the values and gradients equal to a straightforward
``stop_gradient`` reference, and read the residuals the program keeps.
"""

import contextlib
import io

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from jaxqat import core
from jaxqat.core import PerChannel, QuantSpec
from jaxqat.core import _grid

_sg = jax.lax.stop_gradient


def _ref_fake_quant(x, s, z, qmin, qmax):
  """Clipped STE, written with stop_gradient (the textbook formulation)."""
  v = x.astype(jnp.float32) / s
  code = _sg(jnp.round(v)) + z
  inside = (code >= qmin) & (code <= qmax)
  y = (jnp.clip(code, qmin, qmax) - z) * s
  ste = x.astype(jnp.float32) - _sg(x.astype(jnp.float32))  # value 0, gradient 1
  return (_sg(y) + jnp.where(inside, ste, 0.0)).astype(x.dtype)


def _ref_lsq(x, s, beta, g, qmin, qmax):
  """LSQ/LSQ+ (Esser et al. 2020; Bhalgat et al. 2020) as value + gradient terms.

  Value: ``s (clip(round(x/s) + z) - z)``; derivatives: 1 to ``x`` inside the
  range, ``round(v) - v`` inside and ``qmin``/``qmax`` where clipped to ``s``,
  1 where clipped to ``β``; the last two scaled by ``g``.
  """
  x32 = x.astype(jnp.float32)
  v = _sg(x32 / s)
  z = 0.0 if beta is None else _sg(jnp.round(-beta / s))
  code = jnp.round(v) + z
  inside = (code >= qmin) & (code <= qmax)
  y = _sg((jnp.clip(code, qmin, qmax) - z) * s)
  ds = _sg(jnp.where(inside, jnp.round(v) - v, jnp.clip(code, qmin, qmax)))
  y = y + jnp.where(inside, x32 - _sg(x32), 0.0) + g * ds * (s - _sg(s))
  if beta is not None:
    y = y + jnp.where(inside, 0.0, g * (beta - _sg(beta)))
  return y.astype(x.dtype)


def _residuals(f, *args) -> list[str]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(f, *args)
  return out.getvalue().strip().splitlines()


def test_values_and_gradients_match_reference():
  x = jax.random.normal(jax.random.key(0), (6, 16)) * 2.0
  x = x.at[0, :4].set(jnp.array([0.25, -0.75, 1.25, 3.5]))  # ties and a clipped value
  s_c = jnp.linspace(0.05, 0.4, 16).reshape(1, 16)
  fixed = QuantSpec(format="int4", granularity=PerChannel(-1), symmetric=False)
  lsq = QuantSpec(format="int4", learning="lsq", granularity=PerChannel(-1))
  plus = QuantSpec(format="uint8", learning="lsq_plus", symmetric=False)
  z = jnp.full((1, 16), 3.0)
  n = x.size // 16
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = x.astype(dtype)
    # Fixed range: values bit-exact, gradient the same mask.
    f = lambda x, s: core.fake_quant(x, s, z, fixed)
    r = jax.jit(lambda x, s: _ref_fake_quant(x, s, z, -8, 7))
    np.testing.assert_array_equal(np.asarray(f(xd, s_c)), np.asarray(r(xd, s_c)))
    gf = jax.grad(lambda x: jnp.sum(f(x, s_c).astype(jnp.float32) ** 2))(xd)
    gr = jax.grad(lambda x: jnp.sum(r(x, s_c).astype(jnp.float32) ** 2))(xd)
    np.testing.assert_array_equal(np.asarray(gf), np.asarray(gr))
    # LSQ per channel and LSQ+ per tensor: values, x / step / offset gradients, jvp.
    cases = (
        (lambda x, s, b: core.lsq_fake_quant(x, s, None, lsq),
         lambda x, s, b: _ref_lsq(x, s, None, 1 / np.sqrt(n * 7), -8, 7), s_c, None),
        (lambda x, s, b: core.lsq_fake_quant(x, s, b, plus),
         lambda x, s, b: _ref_lsq(x, s, b, 1 / np.sqrt(x.size * 255), 0, 255),
         jnp.float32(0.03), jnp.float32(-0.5)),
    )
    for fq, ref, s, b in cases:
      ref = jax.jit(ref)  # the primitive runs jitted: XLA divides by a scale the same way
      np.testing.assert_array_equal(np.asarray(fq(xd, s, b)), np.asarray(ref(xd, s, b)))
      loss = lambda fn: lambda x, s, b: jnp.sum(jnp.sin(fn(x, s, b).astype(jnp.float32)))
      argnums = (0, 1) if b is None else (0, 1, 2)
      got = jax.grad(loss(fq), argnums)(xd, s, b)
      want = jax.grad(loss(ref), argnums)(xd, s, b)
      np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
      for a, e in zip(got[1:], want[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-5, atol=1e-6)
      tx = jnp.ones_like(xd)
      ts = jnp.ones_like(s)
      _, jf = jax.jvp(lambda x, s: fq(x, s, b), (xd, s), (tx, ts))
      _, jr = jax.jvp(lambda x, s: ref(x, s, b), (xd, s), (tx, ts))
      np.testing.assert_allclose(np.asarray(jf, np.float32), np.asarray(jr, np.float32),
                                 rtol=1e-5, atol=1e-6)


def test_backward_keeps_narrow_residuals():
  x = jnp.ones((8, 16))
  w = jnp.ones((16, 32))
  wspec = QuantSpec(format="int8_narrow", granularity=PerChannel(-1))

  def fixed(x, w, sx, sw):
    return jnp.sum(core.fake_quant(x, sx, None, QuantSpec()) @ core.fake_quant(w, sw, None, wspec))

  lines = _residuals(fixed, x, w, jnp.float32(0.1), jnp.full((32,), 0.1))
  fq_lines = [l for l in lines if "_fake_quant" in l]
  # Per fake quant: the output (the matmul needs it) and one boolean mask, nothing else.
  assert sorted(l.split()[0] for l in fq_lines) == ["bool[16,32]", "bool[8,16]", "f32[16,32]",
                                                    "f32[8,16]"], lines
  assert not any("argument" in l for l in lines), lines  # no input kept for the backward

  lspec = QuantSpec(format="int4", learning="lsq")
  lwspec = QuantSpec(format="int4", learning="lsq", granularity=PerChannel(-1))

  def learned(x, w, sx, sw):
    return jnp.sum(core.lsq_fake_quant(x, sx, spec=lspec) @ core.lsq_fake_quant(w, sw, spec=lwspec))

  lines = _residuals(learned, x, w, jnp.float32(0.1), jnp.full((32,), 0.1))
  # LSQ keeps its inputs (x, w and the step sizes) and its outputs for the matmul; the masks
  # and the step-size derivative are recomputed in the backward pass.
  assert not any(l.startswith("bool") for l in lines), lines
  lsq_outputs = sorted(l.split()[0] for l in lines if "_lsq" in l)
  assert lsq_outputs == ["f32[16,32]", "f32[8,16]"], lines
  assert sum("from the argument" in l for l in lines) == 3, lines  # x, w, sx (sw: reshaped)
  assert len(lines) == 6, lines


# --------------------------------------------------------------------------
# Minifloat rounding without frexp (issue 12): bit-identical to the reference.
# --------------------------------------------------------------------------

FLOAT_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1")


def _grid_points(fmt) -> np.ndarray:
  """Every grid value, every midpoint and its float32 neighbours, both signs, and more.

  The grid is built from the format's parameters (subnormals ``k 2^(emin-mbits)``,
  normals ``(1 + m 2^-mbits) 2^e``), not from the code under test.
  """
  sub = np.arange(2**fmt.mbits) * 2.0 ** (fmt.emin - fmt.mbits)
  normal = [(1 + m / 2**fmt.mbits) * 2.0**e for e in range(fmt.emin, fmt.emax + 1)
            for m in range(2**fmt.mbits)]
  codes = np.array([v for v in np.concatenate([sub, normal]) if v <= fmt.max], np.float32)
  mids = ((codes[:-1].astype(np.float64) + codes[1:]) / 2).astype(np.float32)
  inf = np.float32(np.inf)
  rng = np.random.default_rng(0)
  pts = np.concatenate([
      codes, mids, np.nextafter(mids, inf), np.nextafter(mids, -inf),
      np.nextafter(np.nextafter(mids, inf), inf), np.nextafter(codes, inf), np.nextafter(codes, -inf),
      np.float32([fmt.max * 1.01, fmt.max * 4, 1e30, 1e-30, 1e-40, 1e-45, 0.0, codes[1] / 2]),
      rng.uniform(0, fmt.max, 4000).astype(np.float32),
      np.exp(rng.uniform(-100, np.log(fmt.max), 4000)).astype(np.float32),
  ])
  return np.concatenate([pts, -pts, np.float32([np.inf, -np.inf])])


def _ref_float_fake_quant(x, s, fmt, ste=False):
  """The frexp/ldexp implementation the fast path replaced (plus the STE term if ``ste``).

  The STE term adds 0 in value, which turns a -0 into +0: compare signs without it.
  """
  v = x.astype(jnp.float32) / s
  y = _grid.float_round_reference(jnp.clip(v, -fmt.max, fmt.max), fmt) * s
  if ste:
    inside = (v >= -fmt.max) & (v <= fmt.max)
    y = _sg(y) + jnp.where(inside, x.astype(jnp.float32) - _sg(x.astype(jnp.float32)), 0.0)
  return y.astype(x.dtype)


def test_float_round_bit_identical_to_frexp_reference():
  """Fast rounding == frexp reference == ml_dtypes, bit for bit; fake quant values, STE
  gradients and vmap unchanged, on float32 grid points and on every finite bfloat16."""
  bf16 = np.arange(2**16, dtype=np.uint16).view(jnp.bfloat16)
  bf16 = jnp.asarray(bf16[np.isfinite(bf16.astype(np.float32))])
  specs = [QuantSpec(format=name) for name in FLOAT_FORMATS]
  points = [jnp.asarray(_grid_points(spec.format)) for spec in specs]
  s32, s16 = jnp.float32(0.37), jnp.float32(3.0)

  @jax.jit  # one program for every format: one compile
  def run(points, bf16):
    out = []
    for spec, v in zip(specs, points):
      fmt = spec.format
      clipped = jnp.clip(v, -fmt.max, fmt.max)
      row = [_grid.float_round(clipped, fmt), _grid.float_round_reference(clipped, fmt),
             _grid.float_round(jnp.float32([np.nan]), fmt)]
      fq = lambda x, s, spec=spec: core.fake_quant(x, s, None, spec)
      ref = lambda x, s, fmt=fmt: _ref_float_fake_quant(x, s, fmt)
      ref_ste = lambda x, s, fmt=fmt: _ref_float_fake_quant(x, s, fmt, ste=True)
      for x, s in ((jnp.where(jnp.isfinite(v), v, 0.0), s32), (bf16, s16)):
        loss = lambda f, s=s: lambda x: jnp.sum(f(x, s).astype(jnp.float32) * 1.5)
        n = x.size // 8 * 8
        row += [fq(x, s), ref(x, s), jax.grad(loss(fq))(x), jax.grad(loss(ref_ste))(x),
                jax.vmap(lambda r, s=s, fq=fq: fq(r, s))(x[:n].reshape(8, -1)).ravel()]
      out.append(row)
    return out

  for spec, v, row in zip(specs, points, run(points, bf16)):
    fmt = spec.format
    got, want, nan = (np.asarray(a) for a in row[:3])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # -0 and ties too
    # ml_dtypes' conversion agrees (clip, then round half to even).
    np.testing.assert_array_equal(
        got, np.clip(np.asarray(v), -fmt.max, fmt.max).astype(fmt.dtype).astype(np.float32))
    assert np.isnan(nan).all()
    for y, y_ref, g, g_ref, yv in (row[3:8], row[8:13]):
      y = np.asarray(y)
      np.testing.assert_array_equal(y.view(np.uint8), np.asarray(y_ref).view(np.uint8))
      np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
      assert np.asarray(g).any() and not np.asarray(g).all()  # the mask does clip some
      np.testing.assert_array_equal(np.asarray(yv), y[: np.asarray(yv).size])


def _count_ops(jaxpr, shape) -> int:
  """Primitive applications producing an array of ``shape``, nested jaxprs included."""
  n = 0
  for e in jaxpr.eqns:
    subs = [u.jaxpr if isinstance(u, jax.extend.core.ClosedJaxpr) else u
            for v in e.params.values() for u in (v if isinstance(v, (list, tuple)) else [v])
            if isinstance(u, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr))]
    if subs:
      n += sum(_count_ops(s, shape) for s in subs)
    else:
      n += any(getattr(o.aval, "shape", None) == shape for o in e.outvars)
  return n


def test_fake_quant_elementwise_op_counts_do_not_regress():
  """Elementwise ops on x-sized arrays, forward + backward (issue 12: 21 -> 14 fixed, 27 -> 21
  LSQ, 31 -> 26 LSQ+, fp8 29 -> 24). The mask is one compare, the zero point shifts the clip bounds (no add
  and subtract per element), the forward's mask comes with its output."""
  x, s = jnp.ones((32, 16)), jnp.full((16,), 0.1)
  pc = PerChannel(-1)
  cases = [
      (lambda x, s: core.fake_quant(x, s, None, QuantSpec(format="int8", granularity=pc)), 14),
      (lambda x, s: core.fake_quant(x, s[0], 7.0, QuantSpec(format="uint8", symmetric=False)), 14),
      (lambda x, s: core.lsq_fake_quant(x, s, None, QuantSpec(format="int4", learning="lsq",
                                                              granularity=pc)), 21),
      (lambda x, s: core.lsq_fake_quant(x, s[0], jnp.float32(-0.3), QuantSpec(
          format="uint8", symmetric=False, learning="lsq_plus")), 26),
      # fp8: the rounding is one float addition and subtraction of a constant built from the
      # exponent bits (29 -> 26 -> 24; four of these are free bitcasts).
      (lambda x, s: core.fake_quant(x, s[0], None, QuantSpec(format="fp8_e4m3")), 24),
  ]
  for f, most in cases:
    step = jax.make_jaxpr(lambda x, s, f=f: jax.grad(lambda x, s: jnp.sum(f(x, s) * x), (0, 1))(x, s))
    assert _count_ops(step(x, s).jaxpr, x.shape) <= most
