"""Integer kernels and encodings (jaxqat.core._integer, _encoding): parity with fake quant."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxqat import core
from jaxqat.core import Encoding, PerChannel, QuantSpec

W8 = QuantSpec(format="int8", granularity=PerChannel(-1))
W4 = QuantSpec(format="int4", granularity=PerChannel(-1))
A8 = QuantSpec(format="int8", symmetric=False)
AU8 = QuantSpec(format="uint8", symmetric=False)
DOT = (((1,), (0,)), ((), ()))


def _enc_w(w, spec):
  scale, zp = core.weight_range(w, spec)
  return core.encoding_from_state(spec, {"scale": scale, "zero_point": zp})


def _enc_x(x, spec):
  scale, zp = core.calibrate(spec.replace(calibration="minmax"), [x])
  return core.encoding_from_state(spec, {"scale": scale, "zero_point": zp})


def _fake(x, act, w, wenc):
  xq = core.fake_quantize_input(x, act)
  return xq, core.quant_dequant(w, wenc.spec, wenc.scale, wenc.zero_point)


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _int_ops(fn, *args):
  """(primitive, operand dtypes, output dtype) of every dot/conv, nested jaxprs included."""
  ops = []
  for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      ops.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars),
                  str(eqn.outvars[0].aval.dtype)))
  return ops


@pytest.mark.parametrize("wspec,aspec", [(W8, A8), (W4, AU8), (W8, QuantSpec(format="int8"))])
def test_dot_general_integer_path_within_bound_and_dequant_path_exact(wspec, aspec):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (16, 96)) + 0.3
  w = jax.random.normal(kw, (96, 24)) * 0.1
  wenc, act = _enc_w(w, wspec), _enc_x(x, aspec)
  qt = core.quantize_weight(w, wenc)
  xq, wq = _fake(x, act, w, wenc)
  ref = lax.dot_general(xq, wq, DOT)
  # The bound is against a float32 product: on a GPU jax's default f32 matmul is TF32 (an
  # H200 run missed the bound by 1e-3 against it), so the reference asks for HIGHEST.
  ref_f32 = lax.dot_general(xq, wq, DOT, precision=lax.Precision.HIGHEST)
  y = jax.jit(lambda x: core.quantized_dot_general(x, qt, DOT, act=act))(x)
  bound = core.integer_error_bound(x, qt, act, DOT)
  assert float(jnp.max(jnp.abs(y - ref_f32) - bound)) <= 0.0
  y_float = core.quantized_dot_general(x, qt, DOT, act=act, integer=False)
  np.testing.assert_array_equal(np.asarray(y_float), np.asarray(ref))
  ops = _int_ops(lambda x: core.quantized_dot_general(x, qt, DOT, act=act), x)
  assert ops == [("dot_general", ("int8", "int8"), "int32")]
  # Weight-only: bit for bit, one float dot on the dequantized kernel.
  np.testing.assert_array_equal(np.asarray(core.quantized_dot_general(x, qt, DOT)),
                                np.asarray(lax.dot_general(x, wq, DOT)))


def test_dot_general_affine_weight_and_transposed_kernel():
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.uniform(kx, (8, 32))
  w = jax.random.normal(kw, (12, 32)) + 0.5  # (out, in): contract axis 1 of both
  wspec = QuantSpec(format="int8", symmetric=False, granularity=PerChannel(0))
  wenc, act = _enc_w(w, wspec), _enc_x(x, A8)
  assert wenc.zero_point is not None and bool(jnp.any(wenc.zero_point != 0))
  qt = core.quantize_weight(w, wenc)
  dims = (((1,), (1,)), ((), ()))
  xq, wq = _fake(x, act, w, wenc)
  ref = lax.dot_general(xq, wq, dims, precision=lax.Precision.HIGHEST)  # f32, also on a GPU
  y = core.quantized_dot_general(x, qt, dims, act=act)
  assert float(jnp.max(jnp.abs(y - ref) - core.integer_error_bound(x, qt, act, dims))) <= 0
  # Codes and zero points are exact integers: the error is float rounding only.
  assert float(jnp.max(jnp.abs(y - ref))) < 1e-4 * float(jnp.max(jnp.abs(ref)))


def test_dot_general_zero_point_sums_exact_at_the_largest_contraction():
  # The zero-point terms sum int8 codes in float32 (exact below 2**24): at the largest K the
  # overflow check admits, with extreme codes, the int32 accumulator must equal the int64 one.
  k = (2 ** 31 - 1) // 255 ** 2
  rng = np.random.default_rng(0)
  cx = rng.choice([0, 1, 254, 255], size=(2, k)).astype(np.int64)
  cw = rng.choice([-128, -127, 126, 127], size=(k, 3), p=[0.02, 0.03, 0.45, 0.5]).astype(np.int64)
  zx, zw, sx = 3, np.array([[-2, 0, 5]]), 0.5
  sw = np.array([[0.25, 0.125, 2.0]], np.float32)
  act = Encoding(jnp.float32(sx), jnp.int32(zx), AU8)
  wspec = QuantSpec(format="int8", symmetric=False, granularity=PerChannel(-1))
  wenc = Encoding(jnp.asarray(sw), jnp.asarray(zw, jnp.int32), wspec)
  x = jnp.asarray(sx * (cx - zx), jnp.float32)  # on the grid: codes are exactly cx
  w = jnp.asarray(sw * (cw - zw), jnp.float32)
  qt = core.quantize_weight(w, wenc)
  y = jax.jit(lambda x: core.quantized_dot_general(x, qt, DOT, act=act))(x)
  acc = (cx - zx) @ (cw - zw)
  assert np.abs(acc).max() < 2 ** 31 and np.abs(cw.sum(0)).max() > 2 ** 21
  expect = acc.astype(np.float32) * (np.float32(sx) * sw)
  np.testing.assert_array_equal(np.asarray(y), expect)
  # A QAT step's integer forward sums the codes in float32 (exact below 2**24): the same.
  y_qat = jax.jit(lambda x, w: core.qat_op(
      "dot_general", x, w, act=(AU8, jnp.float32(sx), jnp.float32(zx)),
      weight=(wspec, jnp.asarray(sw), jnp.asarray(zw, jnp.float32)), compute="integer",
      dimension_numbers=DOT))(x, w)
  np.testing.assert_array_equal(np.asarray(y_qat), expect)
  with pytest.raises(ValueError, match="could overflow the int32"):
    core.quantized_dot_general(jnp.zeros((2, k + 1)), core.quantize_weight(
        jnp.zeros((k + 1, 3)), wenc), DOT, act=act)


def test_reason_per_block_and_contracted_channel_fall_back_exactly():
  w = jax.random.normal(jax.random.key(2), (64, 8))
  x = jax.random.normal(jax.random.key(3), (4, 64))
  act = _enc_x(x, A8)
  for spec in (QuantSpec(format="int8", granularity=PerChannel(0)),
               QuantSpec(format="fp8_e4m3", granularity=PerChannel(-1))):
    wenc = _enc_w(w, spec)
    qt = core.quantize_weight(w, wenc)
    assert core.integer_reason(qt, act, (0,)) is not None
    xq, wq = _fake(x, act, w, wenc)
    np.testing.assert_array_equal(np.asarray(core.quantized_dot_general(x, qt, DOT, act=act)),
                                  np.asarray(lax.dot_general(xq, wq, DOT)))
  fp8 = core.quantize_weight(w, _enc_w(w, QuantSpec(format="fp8_e4m3",
                                                       granularity=PerChannel(-1))))
  assert fp8.values.dtype == jnp.float8_e4m3fn
  nv = core.quantize_weight(w, core.encoding_from_state(QuantSpec(format="nvfp4",
                                                                  granularity=core.PerBlock(16, 0)),
                                                        {}))
  assert nv.values.dtype == jnp.float4_e2m1fn
  np.testing.assert_array_equal(
      np.asarray(core.quantized_dot_general(x, nv, DOT)),
      np.asarray(x @ core.block_fake_quant(w, QuantSpec(format="nvfp4",
                                                        granularity=core.PerBlock(16, 0)))))


@pytest.mark.parametrize("subs,xs,ws", [("btd,dnh->btnh", (2, 5, 16), (16, 3, 4)),
                                        ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 8))])
def test_einsum_integer_and_dequant_paths(subs, xs, ws):
  kx, kw = jax.random.split(jax.random.key(4))
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws) * 0.2
  out_axes = tuple(i for i, c in enumerate(subs.split(",")[1].split("->")[0])
                   if c in subs.split("->")[1])
  wspec = QuantSpec(format="int8", granularity=PerChannel(out_axes))
  wenc, act = _enc_w(w, wspec), _enc_x(x, A8)
  qt = core.quantize_weight(w, wenc)
  xq, wq = _fake(x, act, w, wenc)
  ref = jnp.einsum(subs, xq, wq)
  y = core.quantized_einsum(subs, x, qt, act=act)
  assert y.shape == ref.shape
  scale = float(jnp.max(jnp.abs(ref)))
  assert float(jnp.max(jnp.abs(y - ref))) <= 1e-5 * scale
  ops = _int_ops(lambda x: core.quantized_einsum(subs, x, qt, act=act), x)
  assert ops == [("dot_general", ("int8", "int8"), "int32")]
  np.testing.assert_array_equal(np.asarray(core.quantized_einsum(subs, x, qt, act=act,
                                                                 integer=False)),
                                np.asarray(ref))


@pytest.mark.parametrize("groups", [4])
def test_conv_integer_path_with_affine_input_and_padding(groups):
  kx, kw = jax.random.split(jax.random.key(5))
  x = jax.random.uniform(kx, (2, 9, 9, 4)) + 0.2  # positive: zero point far from 0
  w = jax.random.normal(kw, (3, 3, 4 // groups, 8)) * 0.3
  wenc, act = _enc_w(w, W8), _enc_x(x, AU8)
  qt = core.quantize_weight(w, wenc)
  kw_ = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
             feature_group_count=groups)
  xq, wq = _fake(x, act, w, wenc)
  ref = lax.conv_general_dilated(xq, wq, **kw_)
  y = core.quantized_conv_general_dilated(x, qt, act=act, **kw_)
  # Bound: exact integer sum of |a||b| (int32 conv), as in the dot_general case.
  qx, zx = core._integer._input_codes(x, act)  # pylint: disable=protected-access
  a = jnp.abs(qx.astype(jnp.int32) - zx)
  b = jnp.abs(qt.codes.astype(jnp.int32))
  sab = lax.conv_general_dilated(a, b, preferred_element_type=jnp.int32, **kw_)
  k = 9 * 4 // groups
  u = 2.0**-24
  bound = ((k + 5) * u * 1.01) * act.scale * wenc.scale.reshape(1, 1, 1, -1) * sab.astype(jnp.float32)
  assert float(jnp.max(jnp.abs(y - ref) - bound)) <= 0.0
  fn = lambda x: core.quantized_conv_general_dilated(x, qt, act=act, **kw_)  # noqa: E731
  if jax.default_backend() == "cpu":
    # On CPU this depthwise int8 convolution is a sum of int32 products of the codes, with
    # no float dot or convolution.
    assert _int_ops(fn, x) == []
    muls = [e for e in _eqns(jax.make_jaxpr(fn)(x).jaxpr) if e.primitive.name == "mul"
            and e.outvars[0].aval.dtype == jnp.int32 and e.outvars[0].aval.size >= y.size]
    assert len(muls) >= 9  # one per kernel offset
  else:
    assert _int_ops(fn, x)[0] == ("conv_general_dilated", ("int8", "int8"), "int32")
  np.testing.assert_array_equal(
      np.asarray(core.quantized_conv_general_dilated(x, qt, act=act, integer=False, **kw_)),
      np.asarray(ref))


# (logical input shape N, S..., C; kernel spatial shape; layouts; strides; padding;
#  lhs_dilation; rhs_dilation; feature groups)
_CONV_CASES = [
    ((4, 9, 6), (3,), ("NWC", "WIO", "NWC"), (1,), "SAME", None, None, 1),
    ((4, 9, 6), (3,), ("NWC", "WIO", "NWC"), (2,), "VALID", None, None, 1),
    ((4, 9, 6), (4,), ("NCW", "OIW", "NCW"), (2,), [(2, -1)], (2,), (3,), 2),
    ((2, 7, 8, 6), (3, 3), ("NHWC", "HWIO", "NHWC"), (2, 1), "SAME", None, (1, 2), 3),
    ((2, 7, 8, 6), (3, 2), ("NCHW", "OIHW", "NCHW"), (1, 2), [(1, 0), (0, 2)], (2, 1), None, 1),
    ((2, 7, 8, 6), (3, 3), ("NHWC", "HWIO", "NCHW"), (1, 1), "SAME", None, None, 6),
    ((2, 5, 6, 7, 4), (2, 3, 1), ("NDHWC", "DHWIO", "NDHWC"), (1, 2, 1), "SAME_LOWER", None,
     None, 2),
    ((3, 10, 5), (1,), ("NWC", "WIO", "NWC"), (3,), "SAME", None, None, 1),
    ((3, 2, 5), (4,), ("NWC", "WIO", "NWC"), (1,), "VALID", None, None, 1),  # empty output
]


@pytest.mark.parametrize("case,form", [(c, f) for c in _CONV_CASES
                                       for f in (("dot", "sum") if c[7] > 1 else ("dot",))],
                         ids=lambda c: c if isinstance(c, str) else f"{c[2][0]}-g{c[7]}-{c[4]}")
def test_int8_conv_equals_xla_integer_convolution(case, form, monkeypatch):
  """The CPU int8 convolution gives XLA's int32 convolution element for element.

  Both of its forms (an int8 dot over the input's windows; for feature groups, a sum of
  int32 products per kernel offset), every layout, stride, padding (strings, explicit, negative), input and
  kernel dilation and feature grouping (depthwise included), on codes spanning the whole
  int8 range.
  """
  xs, ks, layouts, strides, padding, lhs_d, rhs_d, groups = case
  monkeypatch.setattr(core._integer, "_SUM_MAX_GROUP", 0 if form == "dot" else 10**6)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  lhs, rhs, _ = layouts
  x = rng.integers(-128, 128, xs).astype(np.int8)  # N, S..., C
  w = rng.integers(-128, 128, ks + (xs[-1] // groups, 2 * groups)).astype(np.int8)  # S..., I, O
  sx = "N" + "".join(c for c in lhs if c not in "NC") + "C"
  sw = "".join(c for c in rhs if c not in "IO") + "IO"
  x = np.transpose(x, [sx.index(c) for c in lhs])
  w = np.transpose(w, [sw.index(c) for c in rhs])
  dn = lax.conv_dimension_numbers(x.shape, w.shape, layouts)
  ref = lax.conv_general_dilated(x, w, strides, padding, lhs_d, rhs_d, dn, groups,
                                 preferred_element_type=jnp.int32)
  conv = lambda x, w: core._integer._int8_conv(  # noqa: E731  pylint: disable=protected-access
      x, w, dn, strides, padding, lhs_d, rhs_d, groups)
  got = jax.jit(conv)(x, w)
  assert got.dtype == jnp.int32 and got.shape == ref.shape
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  if not ref.size:
    return
  assert int(np.abs(np.asarray(ref)).max()) > 127**2  # sums beyond any single product
  if jax.default_backend() == "cpu":
    ops = _int_ops(conv, x, w)
    assert ops == ([("dot_general", ("int8", "int8"), "int32")] if form == "dot" else [])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU forms of the convolution")
@pytest.mark.parametrize("cin,cout,groups,form", [
    (32, 32, 32, "sum"),  # depthwise
    (32, 96, 32, "sum"),  # depthwise, channel multiplier 3
    (128, 128, 16, "sum"),  # groups of 8 x 8 channels
    (256, 256, 16, "dot"),  # groups of 16 x 16
    (32, 32, 16, "sum"),  # groups of 2 x 2 channels
    (3, 16, 1, "dot"),  # one group: always the dot
    (1, 8, 1, "dot"),
])
def test_int8_conv_form_follows_the_group_width(cin, cout, groups, form):
  """Narrow feature groups sum products; wide ones and a single group take the dot."""
  x = jnp.zeros((1, 6, 6, cin), jnp.int8)
  w = jnp.zeros((3, 3, cin // groups, cout), jnp.int8)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  ops = _int_ops(lambda x, w: core._integer._int8_conv(  # pylint: disable=protected-access
      x, w, dn, (1, 1), "SAME", None, None, groups), x, w)
  assert ops == ([("dot_general", ("int8", "int8"), "int32")] if form == "dot" else [])


def test_gpu_convolution_takes_the_dequantize_path(monkeypatch):
  """XLA:GPU compiles no int8 convolution: on a GPU backend the conv dequantizes, exactly."""
  x = jax.random.uniform(jax.random.key(5), (1, 5, 5, 2))
  w = jax.random.normal(jax.random.key(6), (3, 3, 2, 4)) * 0.3
  wenc, act = _enc_w(w, W8), _enc_x(x, AU8)
  qt = core.quantize_weight(w, wenc)
  kw_ = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  monkeypatch.setattr(core._integer.jax, "default_backend", lambda: "gpu")  # pylint: disable=protected-access
  conv = lambda x: core.quantized_conv_general_dilated(x, qt, act=act, **kw_)  # noqa: E731
  assert _int_ops(conv, x) == [("conv_general_dilated", ("float32", "float32"), "float32")]
  np.testing.assert_array_equal(np.asarray(conv(x)), np.asarray(
      core.quantized_conv_general_dilated(x, qt, act=act, integer=False, **kw_)))
  assert "XLA:GPU compiles no int8" in core._integer.spec_reason(  # pylint: disable=protected-access
      act.spec, W8, 4, conv=True)
  # Dense layers keep the integer path there.
  assert core._integer.spec_reason(act.spec, W8, 2) is None  # pylint: disable=protected-access


def test_take_bit_exact_and_packing_bytes():
  table = jax.random.normal(jax.random.key(6), (256, 256))
  rows = QuantSpec(format="int8", granularity=PerChannel(0))
  qt = core.quantize_weight(table, _enc_w(table, rows))
  idx = jnp.array([[3, 7], [255, 0]])
  np.testing.assert_array_equal(np.asarray(core.quantized_take(qt, idx)),
                                np.asarray(jnp.take(core.dequantize(qt), idx, axis=0)))
  fbytes = table.size * 4
  assert qt.nbytes / fbytes <= 0.27
  q4 = core.quantize_weight(table, _enc_w(table, W4))
  assert q4.packed == 4 and q4.values.shape == (256, 128)
  assert q4.nbytes / fbytes <= 0.15
  np.testing.assert_array_equal(np.asarray(core.dequantize(q4)),
                                np.asarray(core.quant_dequant(table, W4, *core.weight_range(
                                    table, W4)[:1], None)))


def test_encoding_from_state_matches_lsq_forward():
  x = jnp.linspace(-2.0, 3.0, 101)
  spec = QuantSpec(format="uint8", symmetric=False, learning="lsq_plus")
  log_s, beta = jnp.log(jnp.float32(0.021)), jnp.float32(-1.237)
  enc = core.encoding_from_state(spec, {"log_scale": log_s, "offset": beta})
  want = core.lsq_fake_quant(x, jnp.exp(log_s), beta, spec)
  np.testing.assert_array_equal(np.asarray(core.fake_quantize_input(x, enc)), np.asarray(want))
  with pytest.raises(ValueError, match="dense.input: no range"):
    core.encoding_from_state(A8, {}, name="dense.input")
  with pytest.raises(ValueError, match="non-finite"):
    core.encoding_from_state(A8, {"scale": jnp.nan, "zero_point": 0.0}, name="d")


def test_encodings_json_round_trip_and_errors():
  w = jax.random.normal(jax.random.key(7), (8, 4))
  penc = _enc_w(w, W4)
  aenc = core.encoding_from_state(A8, {"scale": jnp.float32(0.05), "zero_point": 7.0})
  data = json.dumps(core.encodings_to_dict({"fc/kernel": penc}, {"fc/input": aenc}))
  expected = {"fc/kernel": ("param", W4, (1, 4)), "fc/input": ("activation", A8, ())}
  back = core.encodings_from_dict(data, expected)
  np.testing.assert_array_equal(np.asarray(back["fc/kernel"].scale), np.asarray(penc.scale))
  assert int(back["fc/input"].zero_point) == 7
  row = json.loads(data)["activation_encodings"][0]
  assert (row["enc_type"], row["bw"], row["is_sym"], row["offset"]) == ("PER_TENSOR", 8, False,
                                                                        [-7])
  with pytest.raises(ValueError, match="truncated"):
    core.encodings_from_dict(data[:-20], expected)
  bad = json.loads(data)
  bad["param_encodings"][0]["bw"] = 8
  with pytest.raises(ValueError, match="entry 'fc/kernel': bw is 8 but"):
    core.encodings_from_dict(bad, expected)
  bad = json.loads(data)
  bad["param_encodings"][0]["scale"] = [0.1, 0.2]
  with pytest.raises(ValueError, match="entry 'fc/kernel': 'scale' has 2 values"):
    core.encodings_from_dict(bad, expected)
  with pytest.raises(ValueError, match=r"no entry for the model's quantizer\(s\) \['fc2/kernel'\]"):
    core.encodings_from_dict(data, {**expected, "fc2/kernel": ("param", W4, (1, 4))})
  back = core.encodings_from_dict(data, {"k": ("param", W4, (1, 4)),
                                         "i": ("activation", A8, ())},
                                  names={"fc/kernel": "k", "fc/input": "i"})
  assert set(back) == {"k", "i"}


def test_integer_forward_values_within_bound_and_ste_gradients_equal_fake_quant():
  kx, kw = jax.random.split(jax.random.key(8))
  x = jax.random.normal(kx, (8, 64)) + 0.5
  w = jax.random.normal(kw, (64, 16)) * 0.2
  aspec = QuantSpec(format="uint8", symmetric=False, learning="lsq_plus")
  wspec = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
  params = dict(sa=jnp.float32(0.02), ba=jnp.float32(-0.4),
                sw=jnp.max(jnp.abs(w), axis=0, keepdims=True) / 7)

  def fake(x, w, p):
    xq = core.quant_dequant(x, aspec, p["sa"], offset=p["ba"])
    return lax.dot_general(xq, core.quant_dequant(w, wspec, p["sw"]), DOT)

  def integer(x, w, p):
    return core._integer.integer_forward(  # pylint: disable=protected-access
        "dot_general", x, w, act=(aspec, p["sa"], None, p["ba"]), weight=(wspec, p["sw"]),
        dimension_numbers=DOT)

  t = jax.random.normal(jax.random.key(9), (8, 16))
  loss = lambda f: (lambda x, w, p: jnp.sum((f(x, w, p) - t) ** 2))  # noqa: E731
  y_int, y_fq = jax.jit(integer)(x, w, params), fake(x, w, params)
  assert float(jnp.max(jnp.abs(y_int - y_fq))) <= 1e-5 * float(jnp.max(jnp.abs(y_fq)))
  ops = _int_ops(integer, x, w, params)
  assert ("dot_general", ("int8", "int8"), "int32") in ops
  # Backward: the fake-quant op's gradient at the (integer) forward's cotangent.
  g_int = jax.jit(jax.grad(loss(integer), argnums=(0, 1, 2)))(x, w, params)
  _, pull = jax.vjp(fake, x, w, params)
  g_ref = pull(2 * (y_int - t))
  for a, b in zip(jax.tree_util.tree_leaves(g_int), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g_int[2]["sa"])) > 0 and float(jnp.abs(g_int[2]["ba"])) > 0
  with pytest.raises(ValueError, match="cannot run in integer arithmetic: the weight is "
                     "quantized per block"):
    core._integer.integer_forward(  # pylint: disable=protected-access
        "dot_general", x, w, act=(aspec, 0.1, None, 0.0),
        weight=(QuantSpec(format="int8", granularity=core.PerBlock(16, 0)), jnp.ones((4, 16))),
        dimension_numbers=DOT)


def test_polymorphic_export_of_dequantize_path_and_channel_axis_spellings():
  act = core.encoding_from_state(A8, {"scale": jnp.float32(0.1), "zero_point": 3.0})
  w = core.quantize_weight(jnp.ones((4, 3)), _enc_w(jnp.ones((4, 3)), W8))
  fn = lambda x: core.quantized_dot_general(x, w, DOT, act=act, integer=False)  # noqa: E731
  blob = core.export_serving(fn, jnp.ones((2, 4)), batch_polymorphic=True)
  x = jnp.linspace(-1, 1, 20).reshape(5, 4)
  np.testing.assert_array_equal(np.asarray(core.load_serving(blob)(x)), np.asarray(fn(x)))
  # PerChannel(-1) written by one front end reads into PerChannel(1) of another.
  data = core.encodings_to_dict({"k": _enc_w(jnp.ones((4, 3)), W8)}, {})
  got = core.encodings_from_dict(data, {"k": ("param", W8.replace(granularity=PerChannel(1)),
                                              (1, 3))})
  assert got["k"].scale.shape == (1, 3)
