"""jaxqat.core.qat_op: lean fake-quant op and integer forward (values, gradients, residuals)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxqat import core
from jaxqat.core import PerChannel, QuantSpec, qat_op

DOT = (((1,), (0,)), ((), ()))
W8 = QuantSpec(format="int8", granularity=PerChannel(-1))
A8 = QuantSpec(format="int8", symmetric=False)
W4L = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
A4L = QuantSpec(format="uint4", symmetric=False, learning="lsq_plus")


def _data(k=0, shape_x=(8, 64), shape_w=(64, 16)):
  kx, kw = jax.random.split(jax.random.key(k))
  return jax.random.normal(kx, shape_x) + 0.3, jax.random.normal(kw, shape_w) * 0.2


def _plain(op, x, w, act, weight, **kw):
  """Today's path: fake-quantize both operands, then the float op."""
  xq = core.quant_dequant(x, act[0], act[1], act[2], offset=act[3])
  wq = core.quant_dequant(w, weight[0], weight[1], weight[2], offset=weight[3])
  if op == "dot_general":
    return lax.dot_general(xq, wq, **kw)
  return lax.conv_general_dilated(xq, wq, **kw)


def _cases(x, w):
  sw = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 7
  fixed = lambda p: ((A8, p["sa"], p["za"], None), (W8, p["sw"], None, None))  # noqa: E731
  lsq = lambda p: ((A4L, p["sa"], None, p["ba"]), (W4L, p["sw"], None, None))  # noqa: E731
  return [(fixed, dict(sa=jnp.float32(0.02), za=jnp.float32(-20.0),
                       sw=jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127)),
          (lsq, dict(sa=jnp.float32(0.15), ba=jnp.float32(-0.37), sw=sw))]


@pytest.mark.parametrize("case", [0, 1], ids=["fixed_w8a8", "lsq_w4a4"])
def test_fake_is_bit_identical_to_fake_quant_then_op_values_and_grads(case):
  x, w = _data(case)
  ranges, p = _cases(x, w)[case]
  t = jax.random.normal(jax.random.key(5), (8, 16))

  def loss(f):
    def fn(x, w, p):
      a, wq = ranges(p)
      return jnp.sum((f("dot_general", x, w, a, wq, dimension_numbers=DOT) - t) ** 2)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))

  lean = lambda op, x, w, a, wq, **kw: qat_op(op, x, w, act=a, weight=wq, **kw)  # noqa: E731
  (v1, g1), (v2, g2) = loss(lean)(x, w, p), loss(_plain)(x, w, p)
  assert float(v1) == float(v2)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if case == 1:  # LSQ/LSQ+: step-size and offset gradients flow (fixed ranges: none)
    assert float(jnp.abs(g1[2]["sa"])) > 0 and float(jnp.abs(g1[2]["ba"])) > 0
    assert float(jnp.sum(jnp.abs(g1[2]["sw"]))) > 0


def test_integer_forward_within_bound_same_gradients_and_int8_dot():
  x, w = _data(3)
  for ranges, p in _cases(x, w):
    a, wq = ranges(p)
    y_int = jax.jit(lambda x, w: qat_op("dot_general", x, w, act=a, weight=wq, compute="integer",
                                        dimension_numbers=DOT))(x, w)
    y_fq = _plain("dot_general", x, w, a, wq, dimension_numbers=DOT)
    # the integer path's bound (core.integer_error_bound), with the same codes
    aenc = core._integer._train_encoding(*a)  # pylint: disable=protected-access
    wenc = core._integer._train_encoding(*wq)  # pylint: disable=protected-access
    qt = core.quantize(w, wenc.scale, wenc.zero_point, wenc.spec)
    bound = core.integer_error_bound(x, qt, aenc, DOT)
    assert bool(jnp.all(jnp.abs(y_int - y_fq) <= bound + 1e-7)), float(jnp.max(jnp.abs(
        y_int - y_fq)))
    gi = jax.grad(lambda x, w, p: qat_op("dot_general", x, w, act=ranges(p)[0],
                                         weight=ranges(p)[1], compute="integer",
                                         dimension_numbers=DOT).sum(), argnums=(0, 1, 2))
    gf = jax.grad(lambda x, w, p: qat_op("dot_general", x, w, act=ranges(p)[0],
                                         weight=ranges(p)[1], dimension_numbers=DOT).sum(),
                  argnums=(0, 1, 2))
    for u, v in zip(jax.tree_util.tree_leaves(jax.jit(gi)(x, w, p)),
                    jax.tree_util.tree_leaves(jax.jit(gf)(x, w, p))):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  jaxpr = jax.make_jaxpr(lambda x, w: qat_op("dot_general", x, w, act=a, weight=wq,
                                             compute="integer", dimension_numbers=DOT))(x, w)
  assert "i8[8,64]" in str(jaxpr) and "preferred_element_type=int32" in str(jaxpr)


def test_conv_fake_and_integer():
  kx, kw = jax.random.split(jax.random.key(4))
  x = jax.nn.relu(jax.random.normal(kx, (2, 10, 4)))
  w = jax.random.normal(kw, (3, 4, 6)) * 0.3
  a = (QuantSpec(format="uint8", symmetric=False), jnp.float32(0.01), jnp.float32(0.0), None)
  wq = (W8, jnp.max(jnp.abs(w), axis=(0, 1), keepdims=True) / 127, None, None)
  kw = dict(window_strides=(1,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  y_ref = _plain("conv_general_dilated", x, w, a, wq, **kw)
  y_fake = qat_op("conv_general_dilated", x, w, act=a, weight=wq, **kw)
  y_int = qat_op("conv_general_dilated", x, w, act=a, weight=wq, compute="integer", **kw)
  np.testing.assert_array_equal(np.asarray(y_fake), np.asarray(y_ref))
  np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
  g1 = jax.grad(lambda w: qat_op("conv_general_dilated", x, w, act=a, weight=wq,
                                 compute="integer", **kw).sum())(w)
  g2 = jax.grad(lambda w: _plain("conv_general_dilated", x, w, a, wq, **kw).sum())(w)
  np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))


def test_residuals_are_inputs_and_ranges_only():
  """The backward keeps x, w and the ranges: no fake-quantized kernel, no LSQ derivative."""
  x, w = _data(6, (32, 256), (256, 128))
  sw = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 7

  def lean(x, w, sw):
    return qat_op("dot_general", x, w, act=(A4L, jnp.float32(0.1), None, jnp.float32(-0.3)),
                  weight=(W4L, sw), dimension_numbers=DOT)

  def plain(x, w, sw):
    return _plain("dot_general", x, w, (A4L, jnp.float32(0.1), None, jnp.float32(-0.3)),
                  (W4L, sw, None, None), dimension_numbers=DOT)

  def residual_shapes(f):
    _, pullback = jax.jit(lambda *a: jax.vjp(f, *a))(x, w, sw)
    return sorted(tuple(r.shape) for r in jax.tree_util.tree_leaves(pullback)
                  if hasattr(r, "shape"))

  kept = residual_shapes(lean)
  assert kept.count((256, 128)) == 1  # w itself, once: no w_q, no d w_q / d s
  assert kept.count((32, 256)) == 1  # x itself
  assert sum(np.prod(s) for s in kept) <= 32 * 256 + 256 * 128 + 128 + 2
  assert residual_shapes(plain).count((256, 128)) >= 2  # today's path keeps more
  # What the compiled forward hands to the backward (output + residuals), in bytes.
  def kept_bytes(f):
    fwd = jax.jit(lambda *a: jax.vjp(f, *a))
    return fwd.lower(x, w, sw).compile().memory_analysis().output_size_in_bytes
  assert kept_bytes(lean) <= 4 * (32 * 128 + 32 * 256 + 256 * 128 + 128 + 2) + 64
  assert kept_bytes(plain) > kept_bytes(lean) + 4 * 256 * 128


def test_backward_ties_only_large_saved_arrays():
  """recompute_bwd ties arrays of >= 2**16 elements to the cotangent, not smaller ones."""
  big, small = jnp.ones((256, 256)), jnp.ones((3, 16, 64))  # 65536 and 3072 elements
  fn = lambda a, b: (jnp.sum(a), jnp.sum(b))  # noqa: E731 (its vjp never reads a or b)
  jaxpr = jax.make_jaxpr(lambda a, b, g: core._integer.recompute_bwd(  # pylint: disable=protected-access
      fn, (a, b), (g, g)))(big, small, jnp.float32(1.0)).jaxpr
  barrier, = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  users = {v: [e.primitive.name for e in jaxpr.eqns if v in e.invars] for v in barrier.outvars[:2]}
  assert users[barrier.outvars[0]] == ["mul"]  # the big one: times the one made from g
  assert users[barrier.outvars[1]] == ["reduce_sum"]  # the small one: read as saved


def test_small_kernel_conv_step_memory_near_float():
  """A QAT step of convolutions with small (untied) kernels: XLA's memory within 1.10x float."""
  ks = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(ks[0], (64, 128, 64))
  kernels = [jax.random.normal(k, (3, 64, 64)) * 0.1 for k in ks[1:]]  # 12288 elements each
  dn = ("NWC", "WIO", "NWC")
  a = (QuantSpec(format="int8", symmetric=False), jnp.float32(0.05), jnp.float32(-3.0), None)

  def loss(mode, ws, x):
    h = x
    for w in ws:
      if mode == "float":
        h = lax.conv_general_dilated(h, w, (1,), "SAME", dimension_numbers=dn)
      else:
        sw = jnp.max(jnp.abs(w), axis=(0, 1), keepdims=True) / 127
        h = qat_op("conv_general_dilated", h, w, act=a, weight=(W8, sw), weight_tracked=True,
                   window_strides=(1,), padding="SAME", dimension_numbers=dn)
      h = jax.nn.relu(h)
    return jnp.mean(h ** 2)

  def memory(mode):
    step = jax.jit(lambda ws, x: jax.tree.map(lambda w, g: w - 0.1 * g, ws,
                                              jax.grad(lambda ws: loss(mode, ws, x))(ws)),
                   donate_argnums=0)
    m = step.lower(kernels, x).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - (
        m.alias_size_in_bytes)

  fl, q = memory("float"), memory("qat")
  assert q <= 1.10 * fl, (q, fl)
  g = jax.grad(lambda ws: loss("qat", ws, x))(kernels)
  assert all(float(jnp.abs(t).max()) > 0 for t in g)


def test_errors():
  x, w = _data(7)
  a, wq = (A8, 0.1, 0.0, None), (QuantSpec(format="fp8_e4m3"), None, None, None)
  with pytest.raises(ValueError, match="compute: expected one of \\('fake', 'integer'\\)"):
    qat_op("dot_general", x, w, act=a, weight=wq, compute="int", dimension_numbers=DOT)
  with pytest.raises(ValueError, match="op: expected one of"):
    qat_op("matmul", x, w, act=a, weight=wq)
  with pytest.raises(TypeError, match="weight: expected None or a tuple"):
    qat_op("dot_general", x, w, act=a, weight=0.1, dimension_numbers=DOT)
  with pytest.raises(ValueError, match="integer arithmetic: the weight format fp8_e4m3 is not "
                     "an integer format"):
    qat_op("dot_general", x, w, act=a, weight=wq, compute="integer", dimension_numbers=DOT)
  with pytest.raises(ValueError, match="Rule.compute: must be one of"):
    core.Rule(pattern=".*", compute="int8")
  # A float weight (None) with "fake": only the input is fake-quantized.
  y = qat_op("dot_general", x, w, act=a, weight=None, dimension_numbers=DOT)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(lax.dot_general(
      core.quant_dequant(x, A8, 0.1, 0.0), w, DOT)))


def test_compiled_step_does_not_keep_fake_quantized_operands():
  """XLA's memory for a 3-layer LSQ/LSQ+ step: the lean op stays near float, unlike the plain one."""
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (64, 256))
  params = ([jax.random.normal(k, (256, 256)) * 0.05 for k in ks[1:]],
            [jnp.full((1, 256), 0.02) for _ in ks[1:]])
  a = (A4L, jnp.float32(0.1), None, jnp.float32(-0.3))

  def layer(mode, h, w, s):
    if mode == "float":
      return h @ w
    if mode == "plain":
      return _plain("dot_general", h, w, a, (W4L, s, None, None), dimension_numbers=DOT)
    return qat_op("dot_general", h, w, act=a, weight=(W4L, s), dimension_numbers=DOT)

  def memory(mode):
    def loss(p):
      h = x
      for w, s in zip(*p):
        h = jnp.tanh(layer(mode, h, w, s))
      return jnp.sum(h ** 2)

    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda v, g: v - 0.1 * g, p,
                                                    jax.grad(loss)(p)), donate_argnums=0)
    m = step.lower(params).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
            m.alias_size_in_bytes)

  base = memory("float")
  assert memory("fake") - base <= 0.5 * (memory("plain") - base)



# (input shape, kernel shape, strides, padding, dimension_numbers, transpose_kernel, rhs_dilation)
_TRANSPOSE_CASES = [
    ((2, 6, 3), (3, 3, 4), (2,), "SAME", None, False, None),
    ((2, 5, 6, 3), (3, 2, 4, 3), (2, 3), "VALID", None, True, (1, 2)),  # Keras's layout
    ((2, 3, 5, 4), (4, 3, 3, 3), (1, 2), ((1, 2), (0, 1)), ("NCHW", "OIHW", "NCHW"), False, None),
]


@pytest.mark.parametrize("case", _TRANSPOSE_CASES, ids=["1d-same", "2d-transpose-kernel", "nchw"])
def test_conv_transpose_fake_bit_identical_and_integer_exact_codes(case):
  xs, ws, strides, padding, dn, tk, dil = case
  kx, kw_ = jax.random.split(jax.random.key(6))
  x = jax.nn.relu(jax.random.normal(kx, xs)) + 0.05
  w = jax.random.normal(kw_, ws) * 0.3
  kw = dict(strides=strides, padding=padding, dimension_numbers=dn, transpose_kernel=tk,
            rhs_dilation=dil)
  out_axis = core._integer.transpose_contracting_axes(xs, ws, kw)  # pylint: disable=protected-access
  (ch,) = set(range(len(ws))) - set(out_axis)
  wspec = QuantSpec(format="int4", granularity=PerChannel(ch), learning="lsq")
  red = tuple(a for a in range(len(ws)) if a != ch)
  p = dict(sa=jnp.float32(0.02), za=jnp.float32(-3.0),
           sw=jnp.max(jnp.abs(w), axis=red, keepdims=True) / 7)
  ranges = lambda p: ((A8, p["sa"], p["za"], None), (wspec, p["sw"], None, None))  # noqa: E731

  def plain(x, w, p):
    a, wq = ranges(p)
    return lax.conv_transpose(core.quant_dequant(x, *a[:3]), core.quant_dequant(w, *wq[:3]),
                              **kw)

  def lean(compute):
    return lambda x, w, p: qat_op("conv_transpose", x, w, act=ranges(p)[0], weight=ranges(p)[1],
                                  compute=compute, **kw)

  # "fake": bit-identical to fake-quantizing, then lax.conv_transpose (values and gradients)
  y_ref = plain(x, w, p)
  np.testing.assert_array_equal(np.asarray(lean("fake")(x, w, p)), np.asarray(y_ref))
  grad = lambda f: jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(x, w, p)  # noqa: E731
  g_ref = grad(plain)
  for compute in ("fake", "integer"):
    for u, v in zip(jax.tree_util.tree_leaves(grad(lean(compute))),
                    jax.tree_util.tree_leaves(g_ref)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  # "integer": int8 codes, int32 sums; equal to the exact integer transposed convolution of
  # the codes (float32 sums of small integers are exact) times s_x * s_w, up to 3 roundings
  y_int = jax.jit(lean("integer"))(x, w, p)
  qx = jnp.clip(jnp.round(x / p["sa"]) + p["za"], -128, 127) - p["za"]
  qw = jnp.clip(jnp.round(w / p["sw"]), -8, 7)
  exact = lax.conv_transpose(qx, qw, **kw, precision=lax.Precision.HIGHEST)
  cw = [1] * len(xs)
  dn_ = lax.conv_dimension_numbers(xs, ws, dn or core._integer._TRANSPOSE_LAYOUTS[len(xs)])  # pylint: disable=protected-access
  cw[dn_.out_spec[1]] = -1
  y_exact = exact * (p["sa"] * p["sw"].reshape(cw))
  np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_exact), rtol=4e-7, atol=1e-9)
  assert float(jnp.max(jnp.abs(y_int - y_ref))) > 0  # not the fake path
  jaxpr = str(jax.make_jaxpr(lean("integer"))(x, w, p))
  assert "preferred_element_type=int32" in jaxpr
  # served: a packed int4 QTensor of the same codes gives the same values; integer=False
  # gives the fake-quant values bit for bit
  aenc = core._integer._train_encoding(*ranges(p)[0])  # pylint: disable=protected-access
  qt = core.pack_qtensor(core.quantize(w, p["sw"], spec=wspec.replace(learning="fixed")))
  np.testing.assert_array_equal(np.asarray(core.quantized_conv_transpose(x, qt, act=aenc, **kw)),
                                np.asarray(y_int))
  np.testing.assert_array_equal(
      np.asarray(core.quantized_conv_transpose(x, qt, act=aenc, integer=False, **kw)),
      np.asarray(y_ref))
