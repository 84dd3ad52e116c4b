"""convert / size_report / encodings / export_serving of jaxqat.keras (issue 10).

Parity of a served layer with its fake-quant layer:

* weight-only (and ``integer=False``): bit for bit, on every backend;
* static int8 input (the default W8A8), ``integer=True``: on JAX the
  int8 x int8 -> int32 path, within the bound of
  :mod:`jaxqat.core._integer` computed from the codes:
  ``(gamma_{K+2} + gamma_3) (1+u)^2 s_x s_w op(|q_x - z_x|, |q_w|)`` with ``op``
  the layer's own (float, exact on these small integers) op and ``K`` its
  contraction length, plus ``2u|y|`` for the bias added after it. On torch
  the served layer dequantizes (no integer path): bit for bit.
"""

import json

import numpy as np
import pytest
import keras

from jaxqat.core import (PerOutputChannel, QuantSpec, Rule, default_act_spec, dequantize,
                         encoding_from_state, load_serving, spec_to_dict)
from jaxqat.keras import _serve
from jaxqat.keras import _saving
import jaxqat.keras as jqk
from kutil import BACKEND, to_np

convert, size_report, export_serving = _serve.convert, _serve.size_report, _serve.export_serving
export_encodings, save_encodings, load_encodings = (
    _saving.export_encodings, _saving.save_encodings, _saving.load_encodings)

U = 2.0**-24
INT4 = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerOutputChannel()))]
W4A8 = [Rule(pattern=".*", weight=INT4[0].weight, act=default_act_spec())]
RNG = np.random.default_rng(0)


def _seq(input_shape, *layers, dtype="float32"):
  return keras.Sequential([keras.Input(input_shape, dtype=dtype), *layers])


Z = {"kernel_initializer": "zeros"}  # no random-initializer compilation: _fill sets the weights

LAYERS = {  # kind -> (float model builder, input)
    "dense": (lambda: _seq((16,), keras.layers.Dense(8, activation="relu", name="l", **Z)),
              RNG.normal(size=(4, 16))),
    "einsum": (lambda: _seq((5, 16), keras.layers.EinsumDense("abc,cd->abd", (None, 8),
                                                              bias_axes="d", name="l", **Z)),
               RNG.normal(size=(3, 5, 16))),
    "conv2d": (lambda: _seq((6, 6, 3), keras.layers.Conv2D(4, 3, padding="same", name="l", **Z)),
               RNG.normal(size=(2, 6, 6, 3))),
    "depthwise": (lambda: _seq((6, 6, 4), keras.layers.DepthwiseConv2D(
        3, depth_multiplier=2, padding="same", name="l", depthwise_initializer="zeros")),
                  RNG.normal(size=(2, 6, 6, 4))),
    "conv1d": (lambda: _seq((10, 4), keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2,
                                                         name="l", **Z)),
               RNG.normal(size=(2, 10, 4))),
    "embedding": (lambda: _seq((5,), keras.layers.Embedding(20, 8, name="l",
                                                            embeddings_initializer="zeros"),
                               dtype="int32"), RNG.integers(0, 20, size=(3, 5))),
    "conv_bn": (lambda: _seq((6, 6, 3), keras.layers.Conv2D(4, 3, name="l", **Z),
                             keras.layers.BatchNormalization(name="bn")),
                RNG.normal(size=(2, 6, 6, 3))),
}


def _fill(model):
  """Random float weights (BatchNormalization: non-trivial statistics)."""
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.moving_mean.shape[0]
      layer.set_weights([RNG.uniform(0.5, 2, c), RNG.normal(size=c), RNG.normal(size=c) * 0.1,
                         RNG.uniform(0.5, 2, c)])
    elif layer.weights:
      layer.set_weights([RNG.normal(size=v.shape) * 0.3 for v in layer.weights])
  return model


def _float_model(kind):
  build, x = LAYERS[kind]
  return _fill(build()), x.astype("int32" if kind == "embedding" else "float32")


def _qat(model, x, rules=None):
  q = jqk.quantize(model, rules)
  jqk.calibrate(q, x)
  return q


def _served_layer(served):
  return [l for l in served.layers if isinstance(l, _serve.ServedLayer)][0]


def _bound(layer, x, y):
  """The integer-path bound of the module doc for one served layer."""
  enc = layer.encoding()
  s_x, z_x = float(np.asarray(enc.scale)), int(np.asarray(enc.zero_point))
  spec = enc.spec
  a = np.abs(np.clip(np.rint(x / np.float32(s_x)) + z_x, spec.qmin, spec.qmax) - z_x)
  qt = layer.qtensor_numpy()
  b = np.abs(np.asarray(qt.codes, np.float32))
  config = {**layer._float.get_config(), "activation": None}
  config.update({"bias_axes": None} if "equation" in config else {"use_bias": False})
  fl = layer._float.__class__.from_config(config)
  fl.build(x.shape)
  fl.set_weights([b])
  s = to_np(fl(a.astype("float32")))
  k = b.size // (b.shape[-1] if not isinstance(layer, _serve.ServedDepthwiseConv) else b.size)
  gamma = lambda n: n * U / (1 - n * U)  # noqa: E731
  s_w = np.asarray(qt.scale).reshape(-1)
  return (gamma(k + 2) + gamma(3)) * (1 + U)**2 * s_x * s_w * s + 2 * U * np.abs(y)


def _no_float_kernel(served, shape):
  """No float variable of the kernel's shape in the served model."""
  return not any(tuple(v.shape) == tuple(shape) and "float" in str(v.dtype)
                 for v in served.weights)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_served_layer_matches_fake_quant(kind):
  model, x = _float_model(kind)
  q = _qat(model, x, W4A8)
  y_fq = to_np(q(x))
  # Static int8 input: integer=False bit for bit; integer=True within the bound (JAX) or
  # exact (torch).
  np.testing.assert_array_equal(to_np(convert(q, integer=False)(x)), y_fq)
  served = convert(q)
  y = to_np(served(x))
  layer = _served_layer(served)
  shape = tuple(layer.weight_info["shape"])
  assert str(layer.codes.dtype) == "int8" and _no_float_kernel(served, shape)
  if shape[-1] % 2 == 0:  # int4 codes packed two to a byte along the last axis
    assert layer.weight_info["packed"] == 4 and tuple(layer.codes.shape)[-1] == shape[-1] // 2
  if BACKEND != "jax" or layer.encoding() is None:
    np.testing.assert_array_equal(y, y_fq)
  else:
    bound = _bound(layer, x, y)
    assert np.all(np.abs(y - y_fq) <= bound), float(np.max(np.abs(y - y_fq) - bound))
  assert float(np.max(np.abs(y - y_fq))) <= 1e-5 * max(1.0, float(np.max(np.abs(y_fq))))
  # Weight-only (the input quantizers left float): bit for bit.
  for iq in jqk.quantizers(q):
    if iq.role == "act":
      iq.float_reason = "weight-only check"
  np.testing.assert_array_equal(to_np(convert(q)(x)), to_np(q(x)))


def _functional():
  inp = keras.Input((8, 8, 3))
  h = keras.layers.Conv2D(8, 3, name="conv", **Z)(inp)
  h = keras.layers.BatchNormalization(name="bn")(h)
  h = keras.layers.ReLU()(h)
  h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw", depthwise_initializer="zeros")(h)
  h = keras.layers.GlobalAveragePooling2D()(h)
  h = keras.layers.Dense(16, activation="relu", name="fc", **Z)(h)
  h = h * 2.0
  out = keras.layers.Dense(4, name="head", **Z)(h)
  return _fill(keras.Model(inp, out, name="small"))


def test_whole_model_parity_and_artefacts(tmp_path, monkeypatch):
  model = _functional()
  x = RNG.normal(size=(4, 8, 8, 3)).astype("float32")
  q = _qat(model, x)
  before = [to_np(v).copy() for v in q.weights]
  y_fq = to_np(q(x))
  served = convert(q)
  assert [type(l).__name__ for l in served.layers if isinstance(l, _serve.ServedLayer)] == [
      "ServedConv", "ServedDepthwiseConv", "ServedDense", "ServedDense"]
  assert all(np.array_equal(a, to_np(v)) for a, v in zip(before, q.weights))  # QAT untouched
  y = to_np(served(x))
  np.testing.assert_array_equal(to_np(convert(q, integer=False)(x)), y_fq)
  if BACKEND == "jax":
    np.testing.assert_allclose(y, y_fq, rtol=0, atol=1e-5 * float(np.max(np.abs(y_fq))))
  else:
    np.testing.assert_array_equal(y, y_fq)
  # .keras round trip (safe_mode on): same outputs, int8 codes, no float kernel.
  path = str(tmp_path / "served.keras")
  served.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True)
  np.testing.assert_array_equal(to_np(loaded(x)), y)
  assert str(loaded.get_layer("fc").codes.dtype) == "int8"
  assert _no_float_kernel(loaded, (3, 3, 3, 8)) and _no_float_kernel(loaded, (8, 16))
  if BACKEND != "jax":
    with pytest.raises(RuntimeError, match="jax.export needs the JAX backend"):
      export_serving(served, x)
    return
  # jax.export round trip: the reloaded program gives the jitted served forward's outputs.
  import jax
  from jaxqat.core import _integer
  # On CPU a convolution is an int8 dot over the input's windows (`_integer._int8_conv`) or,
  # when depthwise, a sum of int32 products of the codes; the dot form is counted below, and
  # both give the same output.
  monkeypatch.setattr(_integer, "_SUM_MAX_GROUP", 0)
  tv = [v.value for v in served.trainable_variables]
  ntv = [v.value for v in served.non_trainable_variables]
  jitted = jax.jit(lambda x: served.stateless_call(tv, ntv, x, training=False)[0])
  np.testing.assert_allclose(np.asarray(jitted(x)), y, rtol=1e-6, atol=1e-6)
  ints = {}  # the integer ops of the served forward: int8 operands, int32 accumulation
  for e in _eqns(jax.make_jaxpr(jitted)(x).jaxpr):
    if e.primitive.name in ("dot_general", "conv_general_dilated") and [
        str(v.aval.dtype) for v in e.invars] == ["int8", "int8"]:
      assert str(e.params["preferred_element_type"]) == "int32"
      ints[e.primitive.name] = ints.get(e.primitive.name, 0) + 1
  # Two convolutions, each with the core's zero-point correction conv of ones (affine input).
  assert ints == ({"dot_general": 6} if jax.default_backend() == "cpu" else
                  {"conv_general_dilated": 4, "dot_general": 2}), ints
  poly = load_serving(export_serving(served, x, batch_polymorphic=True))
  np.testing.assert_array_equal(np.asarray(poly(x)), np.asarray(jitted(x)))
  np.testing.assert_array_equal(np.asarray(poly(x[:2])), np.asarray(jitted(x[:2])))


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (jit, custom_vjp...) included."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


@pytest.mark.skipif(BACKEND != "jax", reason="the integer path and jaxpr exist on the JAX backend")
def test_served_jaxpr_is_integer():
  import jax
  model = _fill(_seq((16,), keras.layers.Dense(32, name="a", **Z),
                     keras.layers.Dense(8, name="b", **Z)))
  x = RNG.normal(size=(4, 16)).astype("float32")
  served = convert(_qat(model, x))
  tv = [v.value for v in served.trainable_variables]
  ntv = [v.value for v in served.non_trainable_variables]
  closed = jax.make_jaxpr(lambda x: served.stateless_call(tv, ntv, x)[0])(x)
  dots = [e for e in _eqns(closed.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) == 2
  for e in dots:
    assert [str(v.aval.dtype) for v in e.invars] == ["int8", "int8"]
    assert str(e.params["preferred_element_type"]) == "int32"
  kernels = [c for c in closed.consts if getattr(c, "shape", ()) in ((16, 32), (32, 8))]
  assert len(kernels) == 2 and all(str(c.dtype) == "int8" for c in kernels)
  assert not tv  # a served model holds no trainable (float training) weights


def test_size_report_ratios():
  model = _fill(_seq((256,), keras.layers.Dense(256, name="a", **Z),
                     keras.layers.Dense(256, name="b", **Z)))
  x = RNG.normal(size=(8, 256)).astype("float32")
  r8 = size_report(convert(_qat(model, x)))
  q4 = _qat(model, x, INT4)
  r4 = size_report(convert(q4))
  unpacked = convert(q4, pack=False)
  assert size_report(unpacked).rows[0].quant_bytes == 256 * 256 + 256 * 4  # a code a byte
  np.testing.assert_array_equal(to_np(unpacked(x)), to_np(q4(x)))
  assert r8.ratio <= 0.27 and r4.ratio <= 0.15, (r8.ratio, r4.ratio)
  assert [(r.layer, r.format) for r in r4.rows] == [
      ("a/kernel", "int4"), ("a/bias", "float32"), ("b/kernel", "int4"), ("b/bias", "float32")]
  assert r8.rows[0].quant_bytes == 256 * 256 + 256 * 4  # int8 codes + one scale per channel
  assert r4.rows[0].quant_bytes == 256 * 128 + 256 * 4  # two codes a byte
  assert "compression" in str(r8)
  with pytest.raises(ValueError, match="has no served layers"):
    size_report(model)
  if BACKEND != "jax":  # fp8 and block-format QAT models run on the JAX backend only
    return
  # fp8: one byte a code (uint8 bit patterns) + a float32 scale per channel; nvfp4: two codes a
  # byte + an e4m3 scale per 16 codes + the fp32 tensor scale. Weight-only: no calibration.
  rf8 = size_report(convert(jqk.quantize(model, _rules("fp8_e4m3"))))
  rnv = size_report(convert(jqk.quantize(model, _rules("nvfp4"))))
  assert [(r.format, r.quant_bytes) for r in rf8.rows[:2]] == [
      ("fp8_e4m3", 256 * 256 + 256 * 4), ("float32", 256 * 4)]
  assert [(r.format, r.quant_bytes) for r in rnv.rows[:2]] == [
      ("nvfp4", 256 * 128 + 256 * 16 + 4), ("float32", 256 * 4)]
  assert 0.25 < rf8.ratio <= 0.26 and rnv.ratio <= 0.145, (rf8.ratio, rnv.ratio)


def _state(model):
  return [to_np(v).copy() for v in model.weights] + [
      (q.calibrated, q.frozen, q.float_reason) for q in jqk.quantizers(model)]


def _same(a, b):
  return len(a) == len(b) and all(
      np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v for u, v in zip(a, b))


def test_encodings_round_trip_and_bad_files(tmp_path):
  model = _functional()
  x = RNG.normal(size=(4, 8, 8, 3)).astype("float32")
  q = _qat(model, x)
  data = export_encodings(q)
  names = [e["name"] for e in data["param_encodings"]]
  assert names == ["conv/kernel", "dw/kernel", "fc/kernel", "head/kernel"]
  assert [e["name"] for e in data["activation_encodings"]] == [
      "conv/input", "dw/input", "fc/input", "head/input"]
  path = str(tmp_path / "enc.json")
  save_encodings(path, q)
  fresh = jqk.quantize(model)  # never calibrated
  assert load_encodings(fresh, path) is fresh
  np.testing.assert_array_equal(to_np(fresh(x)), to_np(q(x)))
  assert export_encodings(fresh) == json.loads(json.dumps(data))
  assert all(qq.frozen for qq in jqk.quantizers(fresh) if qq.role == "weight")
  # Bad files: an error naming the entry, nothing applied.
  other = jqk.quantize(model)
  state = _state(other)
  text = json.dumps(data)
  bad_bw = json.loads(text)
  bad_bw["param_encodings"][2]["bw"] = 4
  unknown = json.loads(text)
  unknown["activation_encodings"][1]["name"] = "nope/input"
  missing = json.loads(text)
  missing["param_encodings"].pop()
  short = json.loads(text)
  short["param_encodings"][0]["scale"] = short["param_encodings"][0]["scale"][:-1]
  for bad, match in ((text[: len(text) // 2], "not valid JSON"),
                     (bad_bw, "entry 'fc/kernel': bw is 4"),
                     (unknown, "entry 'nope/input'"),
                     (missing, r"no entry for .*head/kernel"),
                     (short, "entry 'conv/kernel': 'scale' has 7 values")):
    with pytest.raises(ValueError, match=match):
      load_encodings(other, bad)
    assert _same(_state(other), state)
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_encodings(other, str(tmp_path / "missing.json"))


def test_convert_refuses_bad_models():
  model = _functional()
  x = RNG.normal(size=(4, 8, 8, 3)).astype("float32")
  q = jqk.quantize(model)  # not calibrated
  state = _state(q)
  with pytest.raises(ValueError, match=r"layer 'conv' input quantizer: no range"):
    convert(q)
  with pytest.raises(ValueError, match=r"layer 'conv' input quantizer: no range"):
    export_encodings(q)
  assert _same(_state(q), state)
  jqk.calibrate(q, x)
  jqk.set_mode(q, "float")
  with pytest.raises(ValueError, match=r"layer 'conv' input quantizer: the quantizer is in "
                     "'float' mode"):
    convert(q)
  with pytest.raises(TypeError, match="model: expected a keras.Model"):
    convert("model")
  with pytest.raises(TypeError, match="integer: expected a bool"):
    convert(q, integer=1)
  with pytest.raises(ValueError, match="has no quantized layers"):
    convert(model)


def _rules(fmt, act=None):
  block = fmt.startswith(("nv", "mx"))
  spec = QuantSpec(format=fmt) if block else QuantSpec(format=fmt, granularity=PerOutputChannel())
  return [Rule(pattern=".*", weight=spec, act=act)]


@pytest.mark.skipif(BACKEND != "jax", reason="fp8 and block-format fake quant run on JAX only")
def test_float_and_block_weights_serve_bit_exact(tmp_path):
  model = _fill(_seq((6, 6, 3), keras.layers.Conv2D(16, 3, name="conv", **Z),
                     keras.layers.Flatten(), keras.layers.Dense(16, name="fc", **Z)))
  x = RNG.normal(size=(2, 6, 6, 3)).astype("float32")
  act = default_act_spec()
  rules = [Rule(pattern="conv", weight=_rules("fp8_e4m3")[0].weight, act=act),
           Rule(pattern="fc", weight=_rules("nvfp4")[0].weight, act=act)]
  q = _qat(model, x, rules)
  # Static int8 inputs: the float/block weights take the dequantize path, bit for bit.
  served = convert(q)
  y = to_np(served(x))
  np.testing.assert_array_equal(y, to_np(q(x)))
  conv, fc = served.get_layer("conv"), served.get_layer("fc")
  stored = lambda l: [(v.name, str(v.dtype), tuple(v.shape)) for v in l.weights[:3]]  # noqa: E731
  assert stored(conv) == [("kernel_codes", "uint8", (3, 3, 3, 16)),  # e4m3 bit patterns
                          ("kernel_scale", "float32", (1, 1, 1, 16)),
                          ("input_scale", "float32", ())]
  assert stored(fc) == [("kernel_codes", "int8", (256, 8)),  # fp4 codes, two a byte
                        ("kernel_scale", "uint8", (256, 1)),  # e4m3 block scales
                        ("kernel_tensor_scale", "float32", ())]
  assert _no_float_kernel(served, (3, 3, 3, 16)) and _no_float_kernel(served, (256, 16))
  for layer in (conv, fc):  # the keras.ops decode (other backends) gives the same weights
    np.testing.assert_array_equal(np.asarray(dequantize(layer.qtensor_numpy())),
                                  to_np(layer._ops_weight()))
  # .keras round trip (safe_mode on): the same bytes, the same outputs.
  path = str(tmp_path / "served.keras")
  served.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True)
  np.testing.assert_array_equal(to_np(loaded(x)), y)
  assert to_np(loaded.get_layer("fc").codes).tobytes() == to_np(fc.codes).tobytes()
  # Weight-only: bit for bit.
  for iq in jqk.quantizers(q):
    if iq.role == "act":
      iq.float_reason = "weight-only check"
  np.testing.assert_array_equal(to_np(convert(q)(x)), to_np(q(x)))


def test_float_codes_decode_exactly():
  """Stored float codes and 8-bit block scales decode to the core's QTensor values on any
  backend (keras.ops tables off JAX), fp4 packed or not (odd last axis)."""
  import jax
  deq = jax.jit(dequantize)
  w = (RNG.normal(size=(32, 32)) * 0.3).astype("float32")
  x = RNG.normal(size=(3, 32)).astype("float32")
  for fmt, shape in (("fp4_e2m1", (32, 7)), ("nvfp4", (32, 32)), ("mxfp8", (32, 32))):
    spec = _rules(fmt)[0].weight.resolve_output_channel((1,))
    wk = w[:, :shape[1]]
    enc = encoding_from_state(spec, {}, weight=wk)
    qt = _serve._quantize_weight_jit()(wk, enc, pack=True)  # jitted: few compilations
    info, values = _serve._stored(qt, True)
    info.update({"name": "kernel", "shape": list(shape), "spec": spec_to_dict(spec),
                 "dtype": "float32"})
    layer = _serve.ServedDense(layer=keras.layers.Dense(shape[1]), weight=info, name="d")
    object.__setattr__(layer, "_init_values", values)
    layer.build()
    want = np.asarray(deq(qt))
    assert info["packed"] == (4 if fmt == "nvfp4" else 0), fmt
    np.testing.assert_array_equal(to_np(layer._ops_weight()), want)
    np.testing.assert_array_equal(np.asarray(deq(layer.qtensor_numpy())), want)
    np.testing.assert_array_equal(to_np(layer(x)), to_np(keras.ops.matmul(x, want)))


def _depthwise_abs(layer, x):
  """``(depthwise(|q_x - z_x|, |q_w|), K)`` of a served separable layer's depthwise stage."""
  enc = layer.encoding()
  s_x, z_x = float(np.asarray(enc.scale)), int(np.asarray(enc.zero_point))
  a = np.abs(np.clip(np.rint(x / np.float32(s_x)) + z_x, enc.spec.qmin, enc.spec.qmax) - z_x)
  b = np.abs(np.asarray(layer.qtensor_numpy().codes, np.float32))
  return _depthwise_np(layer._float, a.astype("float32"), b), b.shape[0] * b.shape[1]


def _depthwise_np(fl, x, kernel):
  dw = keras.layers.DepthwiseConv2D(kernel.shape[:2], strides=fl.strides, padding=fl.padding,
                                    depth_multiplier=kernel.shape[-1], use_bias=False)
  dw.build(x.shape)
  dw.set_weights([kernel])
  return to_np(dw(x))


def test_separable_conv_serves():
  model = _fill(_seq((6, 6, 4), keras.layers.SeparableConv2D(
      8, 3, depth_multiplier=2, padding="same", name="sep",
      depthwise_initializer="zeros", pointwise_initializer="zeros")))
  x = RNG.normal(size=(2, 6, 6, 4)).astype("float32")
  q = _qat(model, x)
  y_fq = to_np(q(x))
  np.testing.assert_array_equal(to_np(convert(q, integer=False)(x)), y_fq)
  served = convert(q)
  layer = served.get_layer("sep")
  assert type(layer).__name__ == "ServedSeparableConv"
  assert [(v.name, str(v.dtype)) for v in layer.weights if "codes" in v.name] == [
      ("depthwise_kernel_codes", "int8"), ("pointwise_kernel_codes", "int8")]
  assert _no_float_kernel(served, (3, 3, 4, 2)) and _no_float_kernel(served, (1, 1, 8, 8))
  y = to_np(served(x))
  if BACKEND == "jax":  # int8 depthwise stage, then the float pointwise stage (weight-only)
    # Depthwise: within the core bound B; pointwise (C = 8 channels, dequantized kernel W):
    # |y - y_fq| <= sum_c B_c |W_c| (1 + g_C) + 2 g_C sum_c |d_c| |W_c|, plus 2u|y| (the bias).
    s_dw, k = _depthwise_abs(layer, x)
    dq = layer.qtensor_numpy()
    s_w = np.asarray(dq.scale, np.float32).reshape(-1)
    gamma = lambda n: n * U / (1 - n * U)  # noqa: E731
    enc = layer.encoding()
    b_dw = (gamma(k + 2) + gamma(3)) * (1 + U)**2 * float(np.asarray(enc.scale)) * s_w * s_dw
    d = _depthwise_np(layer._float, to_np(q.get_layer("sep").input_quantizer(x)),
                      np.asarray(dequantize(dq)))
    w_pw = np.abs(np.asarray(dequantize(layer.qtensor_numpy("pointwise_")))[0, 0])
    c = w_pw.shape[0]
    bound = (b_dw @ w_pw * (1 + gamma(c)) + 2 * gamma(c) * (np.abs(d) @ w_pw) + 2 * U * np.abs(y))
    assert np.all(np.abs(y - y_fq) <= bound), float(np.max(np.abs(y - y_fq) - bound))
    assert np.any(y != y_fq)  # the integer path ran
  else:
    np.testing.assert_array_equal(y, y_fq)
  for iq in jqk.quantizers(q):  # weight-only: bit for bit
    if iq.role == "act":
      iq.float_reason = "weight-only check"
  np.testing.assert_array_equal(to_np(convert(q)(x)), to_np(q(x)))


@pytest.mark.skipif(BACKEND != "jax", reason="block-format fake quant runs on JAX only")
def test_mx_weights_quantize_calibrate_and_serve_bit_exact():
  """MX weights derive their e8m0 block scales from the data: no weight range to calibrate."""
  from jaxqat.core import PerBlock  # pylint: disable=g-import-not-at-top
  model = _fill(_seq((64,), keras.layers.Dense(16, name="fc", **Z)))
  x = RNG.normal(size=(3, 64)).astype("float32")
  for fmt in ("mxfp4", "mxfp8"):
    q = _qat(model, x, [Rule(pattern="fc", weight=QuantSpec(format=fmt,
                                                           granularity=PerBlock(32, axis=0)),
                             act=default_act_spec())])
    np.testing.assert_array_equal(to_np(convert(q)(x)), to_np(q(x)))


@keras.saving.register_keras_serializable(package="jaxqat_test")
class _Mixer(keras.layers.Layer):
  """A custom layer that creates and calls its own quantizable sublayers (as model zoos do)."""

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.heads = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, units // 2),
                                          bias_axes="de", name="heads")
    self.out = keras.layers.Dense(units, name="out")

  def build(self, input_shape):
    self.heads.build(input_shape)
    self.out.build((*input_shape[:-1], self.units))

  def call(self, x):
    h = self.heads(x)
    return self.out(keras.ops.reshape(h, (-1, x.shape[1], self.units)))

  def get_config(self):
    return {**super().get_config(), "units": self.units}


def test_layers_inside_a_custom_layer_serve_in_place(tmp_path):
  keras.utils.set_random_seed(0)
  model = _seq((5, 6), _Mixer(8, name="mixer"), keras.layers.Dense(3, name="head"))
  x = RNG.normal(size=(4, 5, 6)).astype("float32")
  q = jqk.quantize(model, W4A8)
  with pytest.raises(ValueError, match=r"layer 'mixer/heads' input quantizer: no range"):
    convert(q)
  jqk.calibrate(q, x)
  served = convert(q)
  heads = served.get_layer("mixer").heads
  assert type(heads).__name__ == "InPlaceServedEinsumDense" and heads.kernel_codes.dtype == "int8"
  assert tuple(heads.kernel_codes.shape) == (6, 2, 2)  # int4 codes, two to a byte
  assert type(served.get_layer("head")).__name__ == "InPlaceServedDense"
  ref, out = to_np(q(x)), to_np(served(x))
  if BACKEND == "jax":  # the QAT layers run jaxqat.core.qat_op; served, the float call
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_array_equal(out, ref)
  rows = {r.layer: r for r in size_report(served).rows}
  assert rows["mixer/heads/kernel"].format == "int4"
  assert rows["mixer/heads/kernel"].quant_bytes == 6 * 2 * 2 + 2 * 4 * 4
  path = str(tmp_path / "served.keras")
  served.save(path)
  back = keras.saving.load_model(path)
  np.testing.assert_array_equal(to_np(back(x)), out)


def test_mixed_bfloat16_serves_the_weights_qat_computed_with(monkeypatch):
  """Under mixed_bfloat16 a QAT layer quantizes bfloat16(w): the served codes are those codes
  (graph-served and served in place), and the served model computes in bfloat16 too."""
  from jaxqat.keras._quantizer import run_quantizer
  monkeypatch.setattr(keras.mixed_precision, "global_policy", keras.mixed_precision.global_policy)
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(4, 5, 6)).astype("float32")  # not the shared RNG
    for model in (_seq((5, 6), keras.layers.Dense(8, name="d"), keras.layers.Dense(3)),
                  _seq((5, 6), _Mixer(8, name="mixer"), keras.layers.Dense(3))):
      q = jqk.quantize(model)
      jqk.calibrate(q, x)
      served = convert(q)
      ql, sl = ((q.get_layer("d"), served.get_layer("d")) if "d" in [l.name for l in q.layers]
                else (q.get_layer("mixer").out, served.get_layer("mixer").out))
      wq = ql.weight_quantizers["_kernel"]
      qat_w = to_np(run_quantizer(wq, keras.ops.cast(ql._kernel, "bfloat16"), training=False))
      prefix = "" if isinstance(sl, jqk.ServedLayer) else "kernel_"
      served_w = to_np(sl._ops_weight(prefix))
      np.testing.assert_array_equal(served_w.astype("float32"), qat_w.astype("float32"))
      ref, out = to_np(q(x)), to_np(served(x))
      assert out.dtype == ref.dtype == keras.ops.dtype(keras.ops.ones((), "bfloat16"))
      # The matmuls round to bfloat16 in another order, and a last-place difference can move
      # the next layer's input by one step: close, not equal.
      out, ref = out.astype("float32"), ref.astype("float32")
      assert np.linalg.norm(out - ref) <= 2e-2 * np.linalg.norm(ref)
  finally:
    keras.mixed_precision.set_global_policy("float32")


@keras.saving.register_keras_serializable(package="jaxqat_tests")
class _ConvStack(keras.layers.Layer):
  """A custom layer holding one layer of each class with an integer forward (served in place)."""

  def __init__(self, data_format="channels_last", **kwargs):
    super().__init__(**kwargs)
    self.data_format = data_format
    f = {"data_format": data_format}
    self.conv = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv", **f)
    self.dw = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw", **f)
    self.up = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up", **f)
    self.sep = keras.layers.SeparableConv2D(4, 3, padding="same", activation="relu", name="sep",
                                            **f)
    self.causal = keras.layers.Conv1D(5, 3, padding="causal", name="causal")
    self.mix = keras.layers.EinsumDense("abc,cd->abd", (None, 6), bias_axes="d", name="mix")
    self.head = keras.layers.Dense(3, activation="tanh", name="head")

  def call(self, x):
    y = self.sep(self.up(self.dw(self.conv(x))))
    if self.data_format == "channels_first":
      y = keras.ops.transpose(y, (0, 2, 3, 1))
    y = keras.ops.reshape(y, (-1, y.shape[1] * y.shape[2], y.shape[3]))
    return self.head(self.mix(self.causal(y)))

  def get_config(self):
    return {**super().get_config(), "data_format": self.data_format}


@pytest.mark.skipif(BACKEND != "jax", reason="the integer path exists on the JAX backend")
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_layers_served_in_place_run_the_integer_kernels(tmp_path, data_format, monkeypatch):
  """Dense, EinsumDense and convolutions (a separable one: its depthwise conv) served in place
  (inside a custom layer) run the integer ops of their graph-served classes: served equals the integer-forward QAT model bit for bit, and
  integer=False the fake-quant one; the jaxpr holds the int8 x int8 -> int32 ops."""
  import jax
  from jaxqat.core import _integer, default_rules
  monkeypatch.setattr(_integer, "_SUM_MAX_GROUP", 0)  # the depthwise conv as an int8 dot too
  keras.utils.set_random_seed(0)
  shape = (4, 6, 6) if data_format == "channels_first" else (6, 6, 4)
  inp = keras.Input(shape)
  model = keras.Model(inp, _ConvStack(data_format, name="stack")(inp))
  x = RNG.normal(size=(3, *shape)).astype("float32")
  outs = {}
  for compute in ("fake", "integer"):
    q = jqk.quantize(model, default_rules(compute=compute))
    jqk.calibrate(q, x)
    ref = to_np(q(x))
    for integer in (True, False):
      served = convert(q, integer=integer)
      assert type(served.get_layer("stack").up).__name__ == "InPlaceServedConv2DTranspose"
      outs[compute, integer] = out = to_np(served(x))
      tv = [v.value for v in served.trainable_variables]
      ntv = [v.value for v in served.non_trainable_variables]
      jitted = jax.jit(lambda x, s=served, tv=tv, ntv=ntv: s.stateless_call(
          tv, ntv, x, training=False)[0])
      np.testing.assert_array_equal(np.asarray(jitted(x)), out)  # eager = compiled
      ints = [e for e in _eqns(jax.make_jaxpr(jitted)(x).jaxpr)
              if e.primitive.name in ("dot_general", "conv_general_dilated")
              and [str(v.aval.dtype) for v in e.invars] == ["int8", "int8"]]
      # One int8 op over the batch per layer (the windows of a convolution on CPU: each conv
      # also has the zero-point correction of its affine input, a dot over one window of ones).
      kernels = sorted(tuple(e.invars[1].aval.shape) for e in ints
                       if e.invars[0].aval.shape[0] == len(x))
      if jax.default_backend() == "cpu":
        assert kernels == (sorted([(9, 4, 1, 6), (9, 1, 6, 2), (9, 12, 1, 4), (9, 1, 4, 1),
                                   (3, 4, 1, 5), (5, 6), (6, 3)]) if integer else []), kernels
      if integer == (compute == "integer"):
        np.testing.assert_array_equal(out, ref)
  assert np.any(outs["fake", True] != outs["fake", False])  # the two paths differ
  np.testing.assert_allclose(outs["fake", True], outs["fake", False], rtol=1e-5, atol=1e-5)
  # The .keras file keeps the integer path.
  path = str(tmp_path / "served.keras")
  served = convert(q)
  served.save(path)
  back = keras.saving.load_model(path)
  np.testing.assert_array_equal(to_np(back(x)), outs["integer", True])
  assert vars(back.get_layer("stack").head)["_jaxqat_served"]["integer"] is True


@keras.saving.register_keras_serializable(package="jaxqat_tests")
class _Gated(keras.Model):
  """A subclassed model whose call takes a keyword array and a Python flag."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.hidden = keras.layers.Dense(8, name="hidden")
    self.head = keras.layers.Dense(3, name="head")

  def call(self, x, gate=None, negate=False):
    h = keras.ops.relu(self.hidden(x))
    if gate is not None:
      h = h * gate
    y = self.head(h)
    return {"logits": -y if negate else y, "hidden": h}


def test_subclassed_model_converts_and_exports_with_keyword_inputs():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(6, 4)).astype("float32")
  gate = (rng.uniform(size=(6, 8)) > 0.3).astype("float32")
  model = _Gated()
  model(x)
  q = jqk.calibrate(jqk.quantize(model), x)
  served = convert(q)  # a subclassed model: served in place on a copy (it was refused)
  assert type(served).__name__ == "_Gated" and served is not q
  ref = to_np(q(x, gate=gate)["logits"])
  # The Dense layers served in place take the integer path (JAX): within float rounding; with
  # integer=False the fake-quant values, bit for bit.
  np.testing.assert_allclose(to_np(served(x, gate=gate)["logits"]), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(to_np(convert(q, integer=False)(x, gate=gate)["logits"]), ref)
  formats = {r.layer: r.format for r in size_report(served).rows}
  assert formats["hidden/kernel"] == formats["head/kernel"] == "int8_narrow"
  if BACKEND != "jax":  # jax.export runs on the JAX backend
    return
  run = load_serving(export_serving(served, x, gate=gate, negate=True))
  out = run(x, gate=gate[::-1].copy())  # gate is an input of the program; negate is fixed
  want = served(x, gate=gate[::-1].copy(), negate=True)
  np.testing.assert_allclose(np.asarray(out["logits"]), to_np(want["logits"]), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["hidden"]), to_np(want["hidden"]), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="the integer forward runs on the JAX backend")
def test_separable_convs_serve_what_the_integer_forward_trained():
  """SeparableConv with compute="integer": the depthwise conv integer, the pointwise weight-only
  conv fake; the graph-served layer computes the same ops (bit for bit), integer=False the fake
  model's values."""
  from jaxqat.core import default_rules
  keras.utils.set_random_seed(0)
  inp = keras.Input((10, 10, 3))
  h = keras.layers.SeparableConv2D(6, 3, padding="same", activation="relu", depth_multiplier=2)(inp)
  h = keras.layers.SeparableConv2D(4, 3, strides=2)(h)
  model = keras.Model(inp, keras.layers.SeparableConv1D(3, 3, dilation_rate=2)(
      keras.layers.Reshape((16, 4))(h)))
  x = RNG.normal(size=(3, 10, 10, 3)).astype("float32")
  outs = {}
  for compute in ("fake", "integer"):
    q = jqk.quantize(model, default_rules(compute=compute))
    jqk.calibrate(q, x)
    outs[compute] = to_np(q(x))
    served = convert(q)
    assert isinstance(served.layers[1], jqk.ServedSeparableConv)
    if compute == "integer":
      np.testing.assert_array_equal(to_np(served(x)), outs[compute])
    np.testing.assert_array_equal(to_np(convert(q, integer=False)(x)), outs["fake"])
  assert np.any(outs["integer"] != outs["fake"])
  np.testing.assert_allclose(outs["integer"], outs["fake"], rtol=1e-5, atol=1e-5)


class _Unregistered(keras.layers.Layer):
  """A custom layer holding a Dense, not registered for saving."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.d = keras.layers.Dense(3, name="d")

  def call(self, x):
    return self.d(x)


def test_convert_names_the_unregistered_class_briefly():
  """A model whose quantized layers are served in place but that can be neither copied nor
  saved: the error names the class Keras could not locate, without Keras's full configs."""
  inp = keras.Input((4,))
  q = jqk.quantize(keras.Model(inp, _Unregistered(name="blk")(inp)))
  jqk.calibrate(q, np.ones((2, 4), "float32"))
  with pytest.raises(TypeError) as info:
    convert(q)
  msg = str(info.value)
  assert "Keras could not locate class '_Unregistered'" in msg
  assert "register_keras_serializable" in msg and len(msg) < 2000, len(msg)
