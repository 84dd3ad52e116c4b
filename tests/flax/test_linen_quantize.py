"""Tests for jaxqat.flax.linen.quantize: unmodified Linen models made quantization aware."""

import contextlib
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxqat import core
from jaxqat.core import PerBlock, PerChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql

W8 = QuantSpec(format="int8", granularity=PerChannel(-1))
A8 = QuantSpec(format="int8")  # symmetric, per tensor, absmax
RULES = [Rule(pattern=".*", weight=W8, act=A8)]
KEY = jax.random.key(0, impl="rbg")  # compiles much faster than threefry on CPU


def _x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _ptq(qmodel, x, variables=None):
  v = jax.jit(qmodel.init)(KEY, x) if variables is None else variables
  return ql.calibrate(qmodel, v, [x])


@functools.partial(jax.jit, static_argnums=1)
def _fq_jit(t, spec, calib):
  scale, zp = core.calibrate(spec, [calib])
  return core.fake_quant(t, scale, None if spec.symmetric else zp, spec)


def _fq(t, spec, calib=None):
  """Fake quant of t by hand, range calibrated on ``calib`` (default: t)."""
  return _fq_jit(t, spec, t if calib is None else calib)


def _shapes(tree):
  return jax.tree.map(jnp.shape, tree)


class _Net(nn.Module):
  """A float model with every supported Flax layer."""

  @nn.compact
  def __call__(self, ids, img):
    h = nn.Embed(16, 8)(ids)                                     # (B, T, 8)
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
    h = nn.DenseGeneral((2, 4), axis=-1)(h)                      # (B, T, 2, 4)
    h = nn.Einsum((2, 4, 6), "btij,ijk->btk")(h)                 # (B, T, 6)
    c = nn.Conv(4, (3, 3))(img)                                  # (B, 5, 5, 4)
    return nn.Dense(3)(h.mean(1)) + c.mean((1, 2, 3))[:, None]


def _net_inputs():
  return jnp.array([[1, 2, 3], [4, 5, 6]]), _x((2, 5, 5, 3))


# ---------------------------------------------------------------------------
# The float params tree.
# ---------------------------------------------------------------------------


def test_params_tree_is_the_float_models():
  model = _Net()
  ids, img = _net_inputs()
  fvars = jax.eval_shape(model.init, KEY, ids, img)
  qvars = jax.eval_shape(ql.quantize(model, RULES).init, KEY, ids, img)
  assert jax.tree.structure(qvars["params"]) == jax.tree.structure(fvars["params"])
  assert _shapes(qvars["params"]) == _shapes(fvars["params"])
  assert set(qvars) == {"params", "quant_stats"}  # fixed specs: nothing trainable added


def test_float_params_load_and_run():
  model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, lambda h: h.reshape(h.shape[0], -1),
                         nn.Dense(3)])
  x = _x((2, 5, 5, 3))
  fvars = jax.jit(model.init)(KEY, x)
  qmodel = ql.quantize(model, RULES)
  qvars = jax.jit(qmodel.init)(KEY, x)
  # Same initialisers, same RNG: the quantized model's params are the float ones.
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), qvars["params"],
                                   fvars["params"]))
  v = _ptq(qmodel, x, {**qvars, "params": fvars["params"]})
  yq, yf = jax.jit(qmodel.apply)(v, x), jax.jit(model.apply)(fvars, x)
  assert yq.shape == yf.shape == (2, 3)
  assert 0 < float(jnp.abs(yq - yf).max()) < 0.05


def test_quantizers_of_every_layer():
  ids, img = _net_inputs()
  v = jax.eval_shape(ql.quantize(_Net(), RULES).init, KEY, ids, img)
  paths = ql.layer_paths(v)
  mha = "MultiHeadDotProductAttention_0"
  expected = ["Conv_0/input", "Conv_0/kernel", "DenseGeneral_0/input", "DenseGeneral_0/kernel",
              "Dense_0/input", "Dense_0/kernel", "Einsum_0/input", "Einsum_0/kernel",
              "Embed_0/embedding"]
  expected += [f"{mha}/{p}/{q}" for p in ("key", "out", "query", "value")
               for q in ("input", "kernel")]
  assert paths == sorted(expected)


# ---------------------------------------------------------------------------
# Each Flax layer equals the core primitives applied by hand.
# ---------------------------------------------------------------------------


def _ref_dense(p, x):
  return _fq(x, A8) @ _fq(p["kernel"], W8) + p["bias"]


def _ref_conv(p, x):
  y = jax.lax.conv_general_dilated(_fq(x, A8), _fq(p["kernel"], W8), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["bias"]


def _ref_einsum(p, x):
  return jnp.einsum("bi,ijk->bjk", _fq(x, A8), _fq(p["kernel"], W8)) + p["bias"]


def _ref_dense_general(p, x):
  return jnp.einsum("bi,ijk->bjk", _fq(x, A8), _fq(p["kernel"], W8)) + p["bias"]


def _ref_embed(p, ids):
  return _fq(p["embedding"], QuantSpec(granularity=PerChannel(0)))[ids]


LAYERS = {
    "dense": (lambda: nn.Dense(5), lambda: _x((4, 8)), RULES, _ref_dense),
    "conv": (lambda: nn.Conv(4, (3, 3)), lambda: _x((2, 6, 6, 3)), RULES, _ref_conv),
    "einsum": (lambda: nn.Einsum((8, 3, 2), "bi,ijk->bjk"), lambda: _x((4, 8)), RULES,
               _ref_einsum),
    "dense_general": (lambda: nn.DenseGeneral((3, 2)), lambda: _x((4, 8)), RULES,
                      _ref_dense_general),
    "embed": (lambda: nn.Embed(10, 6), lambda: jnp.array([[0, 3, 9], [3, 3, 1]]),
              [Rule(pattern=".*", weight=QuantSpec(granularity=PerChannel(0)), act=A8)],
              _ref_embed),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_equals_core_by_hand(name):
  make, make_x, rules, ref = LAYERS[name]
  x = make_x()
  qmodel = ql.quantize(make(), rules)
  v = _ptq(qmodel, x)
  y = jax.jit(qmodel.apply)(v, x)
  np.testing.assert_allclose(y, ref(v["params"], x), atol=1e-6, rtol=0)


def test_embed_attend_quantizes_query_and_table():
  class Tied(nn.Module):

    @nn.compact
    def __call__(self, ids):
      emb = nn.Embed(10, 6)
      return emb.attend(jnp.tanh(emb(ids)))

  spec = QuantSpec(granularity=PerChannel(0))
  qmodel = ql.quantize(Tied(), [Rule(pattern=".*", weight=spec, act=A8)])
  ids = jnp.array([[0, 3, 9]])
  v = _ptq(qmodel, ids)
  table = _fq(v["params"]["Embed_0"]["embedding"], spec)
  h = jnp.tanh(table[ids])
  np.testing.assert_allclose(qmodel.apply(v, ids), _fq(h, A8) @ table.T, atol=1e-6, rtol=0)


def test_default_rules_scale_per_output_channel():
  class M(nn.Module):

    @nn.compact
    def __call__(self, ids):
      h = nn.Embed(10, 8)(ids)
      h = nn.DenseGeneral((2, 3))(h)
      return nn.Einsum((2, 3, 4), "bthd,hdo->bto")(h)

  ids = jnp.array([[1, 2]])
  qmodel = ql.quantize(M())
  st = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, ids), [ids])["quant_stats"]
  assert st["Embed_0"]["embedding"]["scale"].shape == (10, 1)  # one scale per row
  assert st["DenseGeneral_0"]["kernel"]["scale"].shape == (1, 2, 3)
  assert st["Einsum_0"]["kernel"]["scale"].shape == (1, 1, 4)
  assert st["DenseGeneral_0"]["input"]["zero_point"].shape == ()  # affine per-tensor input


# ---------------------------------------------------------------------------
# Attention, foreign modules, scan.
# ---------------------------------------------------------------------------


def test_attention_projections_all_quantized():
  mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  x = _x((2, 3, 8))
  qmodel = ql.quantize(mha, RULES)
  v = _ptq(qmodel, x)
  assert ql.layer_paths(v) == [f"{p}/{q}" for p in ("key", "out", "query", "value")
                               for q in ("input", "kernel")]
  jaxpr = str(jax.make_jaxpr(lambda v: qmodel.apply(v, x))(v))
  assert jaxpr.count("round") >= 8  # one rounding per fake quant (4 inputs, 4 kernels)
  yq, yf = jax.jit(qmodel.apply)(v, x), jax.jit(mha.apply)({"params": v["params"]}, x)
  assert 0 < float(jnp.abs(yq - yf).max()) < 0.05


class _Foreign(nn.Module):
  """A layer from "another library": its own params, jnp.einsum / lax ops."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.5), (8, 6))
    b = self.param("b", nn.initializers.normal(0.5), (6,))
    u = self.param("u", nn.initializers.normal(0.5), (6, 4))
    h = jnp.einsum("bi,io->bo", x, w) + b
    return jax.lax.dot_general(jnp.tanh(h), u, (((1,), (0,)), ((), ())))


def test_foreign_module_params_are_weights():
  x = _x((4, 8))
  qmodel = ql.quantize(_Foreign(), RULES)
  v = _ptq(qmodel, x)
  assert ql.layer_paths(v) == ["u", "u_input", "w", "w_input"]  # not the bias b
  p = v["params"]
  h = jnp.tanh(_fq(x, A8) @ _fq(p["w"], W8) + p["b"])
  h_float = jnp.tanh(x @ p["w"] + p["b"])  # calibration runs the model in float
  ref = _fq(h, A8, calib=h_float) @ _fq(p["u"], W8)
  np.testing.assert_allclose(jax.jit(qmodel.apply)(v, x), ref, atol=1e-6, rtol=0)


def test_foreign_conv_module():
  class FConv(nn.Module):

    @nn.compact
    def __call__(self, x):
      k = self.param("filt", nn.initializers.normal(0.5), (4, 3, 3, 3))  # OIHW
      return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID")  # NCHW

  x = _x((2, 3, 6, 6))
  qmodel = ql.quantize(FConv(), [Rule(pattern=".*", weight=QuantSpec(granularity=PerChannel(0)),
                                     act=A8)])
  v = _ptq(qmodel, x)
  # Default-free rule: the channel axis given is the output-feature axis O.
  ref = jax.lax.conv_general_dilated(
      _fq(x, A8), _fq(v["params"]["filt"], QuantSpec(granularity=PerChannel(0))), (1, 1),
      "VALID")
  np.testing.assert_allclose(qmodel.apply(v, x), ref, atol=1e-6, rtol=0)
  # With the default rules the output axis is found from the dimension numbers.
  vd = jax.eval_shape(ql.quantize(FConv()).init, KEY, x)
  assert vd["quant_stats"]["filt"]["scale"].shape == (4, 1, 1, 1)


def test_function_imported_by_name_is_not_intercepted_and_warns():
  """A function bound before the model runs is out of reach (the ``@`` operator is reached:
  tests/flax/test_compute_modes.py)."""
  from jax.lax import dot_general  # pylint: disable=import-outside-toplevel
  lax_dot_general = dot_general

  class Bound(nn.Module):

    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(), (8, 2))
      return lax_dot_general(x, w, (((1,), (0,)), ((), ())))

  with pytest.warns(core.QuantizationWarning, match=r"'<root>' \(Bound\).*stays float"):
    v = ql.quantize(Bound(), RULES).init(KEY, _x((1, 8)))
  assert "quant_stats" not in v


def test_scan_over_layers():
  class Block(nn.Module):

    @nn.compact
    def __call__(self, c, _):
      return jnp.tanh(nn.Dense(8)(c)), None

  class Stack(nn.Module):
    axes: tuple

    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes=dict(self.axes), split_rngs={"params": True}, length=3)
      return scan(name="layers")(x, None)[0]

  x = _x((4, 8))
  qmodel = ql.quantize(Stack(((True, 0),)), RULES)
  v = _ptq(qmodel, x)
  st = v["quant_stats"]["layers"]["Dense_0"]
  assert st["input"]["scale"].shape == (3,) and st["kernel"]["scale"].shape == (3, 1, 8)
  p = v["params"]["layers"]["Dense_0"]
  h, h_float = x, x  # calibration runs the model in float
  for i in range(3):
    h = jnp.tanh(_fq(h, A8, calib=h_float) @ _fq(p["kernel"][i], W8) + p["bias"][i])
    h_float = jnp.tanh(h_float @ p["kernel"][i] + p["bias"][i])
  np.testing.assert_allclose(qmodel.apply(v, x), h, atol=1e-6, rtol=0)
  # Without the quantizer collections in variable_axes: a clear error.
  with pytest.raises(ValueError, match=r"layers/Dense_0.*variable_axes"):
    ql.quantize(Stack((("params", 0),)), RULES).init(KEY, x)


# ---------------------------------------------------------------------------
# Collections, optax, jit and grad.
# ---------------------------------------------------------------------------

LSQ_RULES = [Rule(pattern=".*", weight=W8.replace(format="int4", learning="lsq"),
                  act=QuantSpec(format="uint8", symmetric=False, learning="lsq_plus",
                                calibration="minmax"))]


def test_collections_separate_and_optax_per_collection():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  x = _x((16, 4))
  qmodel = ql.quantize(model, LSQ_RULES)
  v = _ptq(qmodel, x)
  assert set(v) == {"params", "quant_params", "quant_stats"}
  assert _shapes(v["quant_params"]) == {
      "layers_0": {"input": {"log_scale": (), "offset": ()}, "kernel": {"log_scale": (1, 8)}},
      "layers_2": {"input": {"log_scale": (), "offset": ()}, "kernel": {"log_scale": (1, 2)}}}
  assert _shapes(v["params"]) == _shapes(jax.eval_shape(model.init, KEY, x)["params"])
  trainable = {"params": v["params"], "quant_params": v["quant_params"]}

  def loss(t):  # 2x: beyond the calibrated range, so the LSQ+ offset gets a gradient (clipped inputs)
    return jnp.mean(qmodel.apply({**v, **t}, 2.0 * x) ** 2)

  tx = ql.qat_optimizer(qmodel, optax.sgd(0.1), optax.set_to_zero())  # quantizer ranges frozen
  g = jax.jit(jax.grad(loss))(trainable)
  upd, _ = tx.update(g, tx.init(trainable), trainable)
  new = optax.apply_updates(trainable, upd)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), new["quant_params"],
                                   trainable["quant_params"]))
  assert not bool((new["params"]["layers_0"]["kernel"] ==
                   trainable["params"]["layers_0"]["kernel"]).all())
  # LSQ: the step sizes and the LSQ+ offset get finite, non-zero gradients.
  gq = g["quant_params"]["layers_0"]
  for leaf in (gq["kernel"]["log_scale"], gq["input"]["log_scale"], gq["input"]["offset"]):
    assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.abs(leaf).sum()) > 0


def test_grad_is_textbook_ste_under_jit():
  x = _x((4, 8))
  qmodel = ql.quantize(nn.Dense(5), RULES)
  v = _ptq(qmodel, x)
  gx, gp = jax.jit(jax.grad(lambda x, p: qmodel.apply({**v, "params": p}, x).sum(),
                            argnums=(0, 1)))(x, v["params"])
  k = v["params"]["kernel"]
  wq, xq = _fq(k, W8), _fq(x, A8)
  ones = jnp.ones((4, 5))
  # STE: the gradient uses the quantized other operand, masked where clipped
  # (calibrated on the tensor itself, only an extreme value can round outside).
  def inside(t, spec):  # clipping does not change the rounded code
    s, z = core.calibrate(spec, [t])
    code = jnp.round(t / s) + z
    return (code >= spec.qmin) & (code <= spec.qmax)

  x_in, k_in = inside(x, A8), inside(k, W8.resolve_output_channel([-1]))
  np.testing.assert_allclose(gx, jnp.where(x_in, ones @ wq.T, 0.0), atol=1e-5, rtol=0)
  np.testing.assert_allclose(gp["kernel"], jnp.where(k_in, xq.T @ ones, 0.0), atol=1e-5, rtol=0)
  np.testing.assert_allclose(gp["bias"], jnp.full((5,), 4.0), atol=0, rtol=0)


def test_bfloat16_layer_is_quantized():
  x = _x((4, 8))
  qmodel = ql.quantize(nn.Dense(5, dtype=jnp.bfloat16), RULES)
  v = _ptq(qmodel, x)
  y = qmodel.apply(v, x)
  assert y.dtype == jnp.bfloat16 and ql.layer_paths(v) == ["input", "kernel"]
  p = v["params"]
  ref = (_fq(x.astype(jnp.bfloat16), A8) @ _fq(p["kernel"].astype(jnp.bfloat16), W8)
         + p["bias"].astype(jnp.bfloat16))
  np.testing.assert_allclose(y.astype(jnp.float32), ref.astype(jnp.float32), atol=0.05)
  g = jax.grad(lambda p: qmodel.apply({**v, "params": p}, x).astype(jnp.float32).sum())(p)
  assert g["kernel"].dtype == jnp.float32 and float(jnp.abs(g["kernel"]).sum()) > 0


# ---------------------------------------------------------------------------
# Modes.
# ---------------------------------------------------------------------------


def test_calibrate_sets_ranges_and_float_mode_is_the_float_model():
  model = nn.Dense(5)
  x1, x2, x3 = _x((4, 8), 1), 3.0 * _x((4, 8), 2), 9.0 * _x((4, 8), 3)
  qmodel = ql.quantize(model, RULES)
  v = jax.jit(qmodel.init)(KEY, x1)
  v = ql.calibrate(qmodel, v, [x1, x2, x3], steps=2)  # steps caps the batches: x3 unseen
  assert int(v["quant_stats"]["input"]["count"]) == 2
  want = jnp.maximum(jnp.abs(x1).max(), jnp.abs(x2).max()) / 127
  np.testing.assert_allclose(v["quant_stats"]["input"]["scale"], want, rtol=1e-6)
  v2 = ql.calibrate(qmodel, v, [x1])  # observers start afresh at every calibrate
  assert int(v2["quant_stats"]["input"]["count"]) == 1
  np.testing.assert_allclose(v2["quant_stats"]["input"]["scale"], jnp.abs(x1).max() / 127,
                             rtol=1e-6)
  flt = ql.set_mode(qmodel, "float")
  np.testing.assert_array_equal(flt.apply(v, x1), model.apply({"params": v["params"]}, x1))
  assert not bool((qmodel.apply(v, x1) == flt.apply(v, x1)).all())


@pytest.mark.parametrize("batches, call", [
    ([(_x((4, 8)), 2.0)], lambda m, v, b: m.apply(v, *b[0])),
    ([{"x": _x((4, 8)), "scale": 2.0}], lambda m, v, b: m.apply(v, **b[0])),
])
def test_calibrate_batches_are_args_or_kwargs(batches, call):
  class Scaled(nn.Module):

    @nn.compact
    def __call__(self, x, scale):
      return nn.Dense(3)(x * scale)

  qmodel = ql.quantize(Scaled(), RULES)
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, _x((4, 8)), 2.0), batches)
  x = batches[0][0] if isinstance(batches[0], tuple) else batches[0]["x"]
  np.testing.assert_allclose(v["quant_stats"]["Dense_0"]["input"]["scale"],
                             2.0 * jnp.abs(x).max() / 127, rtol=1e-6)
  assert call(qmodel, v, batches).shape == (4, 3)


def test_lsq_plus_calibrate_sets_offset_from_zero_point():
  spec = QuantSpec(format="uint8", symmetric=False, learning="lsq_plus", calibration="minmax")
  qmodel = ql.quantize(nn.Dense(3), [Rule(pattern=".*", act=spec)])
  x = jax.nn.relu(_x((8, 4))) + 0.5
  v = _ptq(qmodel, x)
  s, z = core.calibrate(spec, [x])
  qp = v["quant_params"]["input"]
  np.testing.assert_allclose(core.param_to_step_size(qp["log_scale"]), s, rtol=1e-6)
  np.testing.assert_allclose(qp["offset"], -z * s, rtol=1e-6)
  ref = core.lsq_fake_quant(x, s, -z * s, spec) @ v["params"]["kernel"] + v["params"]["bias"]
  np.testing.assert_allclose(qmodel.apply(v, x), ref, atol=1e-6, rtol=0)


def test_lsq_right_after_calibrate_equals_fixed_ptq():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  x = _x((16, 4))
  fixed = [Rule(pattern=".*", weight=W8.replace(format="int4"), act=A8.replace(format="int4"))]
  lsq = [Rule(pattern=".*", weight=W8.replace(format="int4", learning="lsq"),
              act=A8.replace(format="int4", learning="lsq"))]
  v_fixed = _ptq(ql.quantize(model, fixed), x)
  v_lsq = _ptq(ql.quantize(model, lsq), x)
  # Equal up to float rounding: the LSQ step size is stored as log s (exp(log s) ~ s).
  np.testing.assert_allclose(ql.quantize(model, lsq).apply(v_lsq, x),
                             ql.quantize(model, fixed).apply(v_fixed, x), atol=1e-5, rtol=0)


def test_mode_errors_are_clear():
  x = _x((2, 4))
  qmodel = ql.quantize(nn.Sequential([nn.Dense(3), nn.Dense(2)]), RULES)
  v = jax.jit(qmodel.init)(KEY, x)
  with pytest.raises(ValueError, match=r"mode: must be one of \('quant', 'float'\)"):
    ql.set_mode(qmodel, "training")
  with pytest.raises(TypeError, match=r"qmodel: expected a QuantizedModule"):
    ql.set_mode(nn.Dense(3), "float")
  # Never calibrated: an error naming the layer, at trace time (also under jit).
  with pytest.raises(ValueError, match=r"layer 'layers_0' \(Dense\) input activation 'input' "
                                       r"was never calibrated"):
    jax.jit(qmodel.apply)(v, x)
  np.testing.assert_array_equal(ql.set_mode(qmodel, "float").apply(v, x),
                                qmodel.model.apply({"params": v["params"]}, x))
  with pytest.raises(ValueError, match=r"layer 'layers_0'.*'quant_stats/input'.*init"):
    qmodel.apply({"params": v["params"]}, x)
  with pytest.raises(TypeError, match="model: expected a flax.linen Module"):
    ql.quantize(lambda x: x)


def test_stochastic_rounding_uses_the_quant_rng_stream():
  spec = QuantSpec(format="int4", rounding="stochastic")
  qmodel = ql.quantize(nn.Dense(3), [Rule(pattern=".*", weight=W8, act=spec)])
  x = _x((64, 4))
  v = _ptq(qmodel, x)
  y1 = qmodel.apply(v, x, rngs={"quant": jax.random.key(1)})
  y2 = qmodel.apply(v, x, rngs={"quant": jax.random.key(2)})
  assert not bool((y1 == y2).all())
  # Without a 'quant' stream (evaluation) it rounds half to even, deterministically.
  y_eval = qmodel.apply(v, x)
  s = v["quant_stats"]["input"]["scale"]
  ref = _fq(x, A8.replace(format="int4"), calib=x)  # same absmax range, nearest rounding
  np.testing.assert_allclose(core.fake_quant(x, s, spec=spec.replace(rounding="nearest_even")),
                             ref, atol=1e-6)
  wq = _fq(v["params"]["kernel"], W8)
  np.testing.assert_allclose(y_eval, ref @ wq + v["params"]["bias"], atol=1e-5, rtol=0)


def test_jitted_step_traces_once_per_mode():
  traces = []
  model = nn.Dense(3)
  qmodel = ql.quantize(model, RULES)
  x = _x((4, 4))
  v = _ptq(qmodel, x)

  @jax.jit
  def step(v, x):
    traces.append(1)
    return qmodel.apply(v, x)

  for i in range(3):
    step(v, _x((4, 4), seed=i))
  assert len(traces) == 1


def test_skip_rule_leaves_layer_float():
  model = nn.Sequential([nn.Dense(3), nn.Dense(2)])
  x = _x((4, 4))
  rules = [Rule(pattern="layers_1", skip=True)] + RULES
  qmodel = ql.quantize(model, rules)
  v = _ptq(qmodel, x)
  assert ql.layer_paths(v) == ["layers_0/input", "layers_0/kernel"]
  p = v["params"]
  h = _fq(x, A8) @ _fq(p["layers_0"]["kernel"], W8) + p["layers_0"]["bias"]
  np.testing.assert_allclose(qmodel.apply(v, x), h @ p["layers_1"]["kernel"] +
                             p["layers_1"]["bias"], atol=1e-6, rtol=0)


def test_act_quant_layer():
  class Res(nn.Module):

    @nn.compact
    def __call__(self, x):
      return ql.ActQuant(QuantSpec(format="int4"), name="res")(x + 1.0)

  x = _x((4, 3))
  model = Res()
  np.testing.assert_array_equal(model.apply({}, x), x + 1.0)  # float model: identity
  qmodel = ql.quantize(model)
  v = _ptq(qmodel, x)
  assert ql.layer_paths(v) == ["res/input"]
  np.testing.assert_allclose(qmodel.apply(v, x), _fq(x + 1.0, QuantSpec(format="int4")),
                             atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# Warnings and errors naming the layer.
# ---------------------------------------------------------------------------


def test_unused_rule_warns():
  rules = [Rule(pattern="decoder/.*", weight=W8)] + RULES
  with pytest.warns(core.QuantizationWarning, match=r"'decoder/\.\*' matched no layer"):
    ql.quantize(nn.Dense(2), rules).init(KEY, _x((1, 3)))


def test_no_warning_for_norm_layers():
  model = nn.Sequential([nn.Dense(4), nn.LayerNorm()])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    v = jax.jit(ql.quantize(model).init)(KEY, _x((2, 3)))
  assert ql.layer_paths(v) == ["layers_0/input", "layers_0/kernel"]


class _Tensordot(nn.Module):
  """A weight used through an op jaxqat does not intercept (jnp.tensordot)."""

  @nn.compact
  def __call__(self, x):
    return jnp.tensordot(x, self.param("kernel", nn.initializers.lecun_normal(), (2, 2)), 1)


def test_unsupported_flax_layer_warns():
  with pytest.warns(core.QuantizationWarning, match=r"'layers_1' \(_Tensordot\)"):
    ql.quantize(nn.Sequential([nn.Conv(2, (3,)), _Tensordot()])).init(KEY, _x((1, 5, 2)))


@pytest.mark.parametrize("spec, msg", [
    (QuantSpec(granularity=PerChannel(2)), r"axis 2 is out of range"),
    (QuantSpec(granularity=PerBlock(3, axis=0)), r"block size 3 does not divide"),
])
def test_bad_weight_spec_names_the_layer(spec, msg):
  model = nn.Sequential([nn.Dense(4), nn.Dense(2)])
  rules = [Rule(pattern="layers_1", weight=spec), Rule(pattern=".*", weight=W8)]
  with pytest.raises(ValueError, match=r"layer 'layers_1' \(Dense\) weight 'kernel'.*" + msg):
    ql.quantize(model, rules).init(KEY, _x((2, 8)))


def test_bad_act_spec_names_the_layer():
  rules = [Rule(pattern=".*", act=QuantSpec(granularity=PerChannel(3)))]
  with pytest.raises(ValueError, match=r"layer '<root>' \(Dense\) input activation"):
    ql.quantize(nn.Dense(2), rules).init(KEY, _x((2, 8)))


def test_calibrate_converts_all_step_sizes_at_once_with_the_per_tensor_values(monkeypatch):
  from jaxqat.flax.linen import _quantizer  # pylint: disable=g-import-not-at-top
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(3)])
  x = _x((16, 4))
  rules = [Rule(pattern=".*", weight=W8.replace(format="int4", learning="lsq"),
                act=A8.replace(format="int4", learning="lsq_plus", symmetric=False))]
  qmodel = ql.quantize(model, rules)
  v0 = jax.jit(qmodel.init)(KEY, x)
  calls = []
  real = core.step_size_to_param
  monkeypatch.setattr(core, "step_size_to_param", lambda s: calls.append(jnp.shape(s)) or real(s))
  batched = ql.calibrate(qmodel, jax.tree.map(jnp.array, v0), [x])
  assert calls == [(8 + 8 + 3 + 3,)]  # every step size (per output channel; inputs) at once

  @contextlib.contextmanager
  def per_tensor():  # calibration as before: one conversion per tensor
    yield lambda v: v

  monkeypatch.setattr(_quantizer, "batched_step_sizes", per_tensor)
  calls.clear()
  single = ql.calibrate(qmodel, jax.tree.map(jnp.array, v0), [x])
  assert len(calls) == 6  # 3 kernels and 3 inputs
  flat_b, tree_b = jax.tree_util.tree_flatten(batched)
  flat_s, tree_s = jax.tree_util.tree_flatten(single)
  assert tree_b == tree_s
  for a, b in zip(flat_b, flat_s):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.asarray(a).size > 1 for a in jax.tree.leaves(batched["quant_params"]))


def test_batched_step_sizes_names_an_entry_it_cannot_find():
  from jaxqat.flax.linen import _quantizer  # pylint: disable=g-import-not-at-top
  with _quantizer.batched_step_sizes() as convert:
    _quantizer._PENDING.get().add(("layers_0", "kernel"))  # pylint: disable=protected-access
    with pytest.raises(RuntimeError, match="layers_0/kernel is not in the updated variables"):
      convert({"quant_params": {}})


class _ScanStack(nn.Module):
  """Three scanned Dense blocks (weights stacked along axis 0)."""

  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):

      @nn.compact
      def __call__(self, c, _):
        return jnp.tanh(nn.Dense(8)(c)), None

    scan = nn.scan(Block, variable_axes={True: 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


class _Tied(nn.Module):
  """An embedding whose table is used again, transposed, as the output head."""

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 8)
    h = nn.relu(nn.Dense(8)(emb(ids)))
    return emb.attend(h)


@pytest.mark.parametrize("model, x", [
    (nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(3)]), _x((16, 4))),
    (_ScanStack(), _x((4, 8))),
    (_Tied(), jnp.arange(12).reshape(3, 4) % 11),
], ids=["mlp", "scan", "tied"])
def test_init_converts_all_step_sizes_at_once_with_the_per_tensor_values(monkeypatch, model, x):
  from jaxqat.flax.linen import _quantizer  # pylint: disable=g-import-not-at-top
  rules = [Rule(pattern=".*", weight=W8.replace(format="int4", learning="lsq"),
                act=A8.replace(format="int4", learning="lsq"))]
  qmodel = ql.quantize(model, rules)
  calls = []
  real = core.step_size_to_param
  monkeypatch.setattr(core, "step_size_to_param", lambda s: calls.append(jnp.shape(s)) or real(s))
  batched = jax.jit(qmodel.init)(KEY, x)
  n = sum(np.asarray(a).size for a in jax.tree.leaves(batched["quant_params"]))
  assert n > 1 and calls == [(n,)]  # every weight's step sizes (per output channel) at once

  @contextlib.contextmanager
  def per_tensor():  # init as before: one conversion per weight
    yield lambda v: v

  monkeypatch.setattr(_quantizer, "batched_step_sizes", per_tensor)
  calls.clear()
  single = jax.jit(qmodel.init)(KEY, x)
  # (nn.scan traces its body more than once at init)
  assert len(calls) >= len(jax.tree.leaves(single["quant_params"])) > 0
  flat_b, tree_b = jax.tree_util.tree_flatten(batched)
  flat_s, tree_s = jax.tree_util.tree_flatten(single)
  assert tree_b == tree_s
  for a, b in zip(flat_b, flat_s):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_with_output_gives_the_output_apply_gives():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  rules = [Rule(pattern=".*", weight=W8.replace(format="int4", learning="lsq"), act=None)]
  qmodel = ql.quantize(model, rules)
  x = _x((16, 4))
  out, v = qmodel.init_with_output(KEY, x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(qmodel.apply(v, x)))
  v2 = qmodel.init(KEY, x)  # batched conversion: the same variables
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _AE(nn.Module):
  def setup(self):
    self.enc, self.dec = nn.Dense(4), nn.Dense(8)

  def encode(self, x):
    return self.enc(x)

  def __call__(self, x):
    return self.dec(self.encode(x))


class _EncOnly(nn.Module):
  def setup(self):
    self.enc = nn.Dense(4)

  def __call__(self, x):
    return self.enc(x)


def test_apply_method_of_the_wrapped_model_runs_quantized_qat_and_served():
  x = jax.random.normal(jax.random.key(3), (6, 8))
  q = ql.quantize(_AE())
  v = ql.calibrate(q, q.init(jax.random.key(0), x), [x])
  twin = ql.quantize(_EncOnly())
  twin.init(jax.random.key(0), x)  # its example inputs, for convert
  tv = {c: {"enc": t["enc"]} for c, t in v.items()}
  want = twin.apply(tv, x)
  for method in ("encode", _AE.encode):
    np.testing.assert_array_equal(np.asarray(q.apply(v, x, method=method)), np.asarray(want))
  flt = _AE().apply({"params": v["params"]}, x, method="encode")
  assert float(jnp.max(jnp.abs(want - flt))) > 1e-4  # it is quantized
  served, sv = ql.convert(q, v)
  tserved, tsv = ql.convert(twin, tv)
  np.testing.assert_array_equal(np.asarray(served.apply(sv, x, method="encode")),
                                np.asarray(tserved.apply(tsv, x)))
  with pytest.raises(AttributeError, match="nope"):
    q.apply(v, x, method="nope")


class _Decoder(nn.Module):
  """Writes its own 'cache' collection on every call, as flax attention does with decode=True."""
  decode: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(4)(x)
    if self.decode:
      idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      if not self.is_initializing():
        idx.value = idx.value + 1
      y = y + idx.value.astype(y.dtype)
    return y


def test_models_writing_their_own_collections_calibrate_report_and_convert():
  x = jax.random.normal(jax.random.key(2), (5, 8))
  q = ql.quantize(_Decoder())
  v = ql.calibrate(q, q.init(jax.random.key(0), x), [x, 2 * x])
  assert int(v["cache"]["index"]) == 0  # the model's state is not changed by calibrate
  twin = ql.quantize(_Decoder(decode=False))
  vt = ql.calibrate(twin, twin.init(jax.random.key(0), x), [x, 2 * x])
  for a, b in zip(jax.tree.leaves(v["quant_stats"]), jax.tree.leaves(vt["quant_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ql.report(q, v).quantized_paths() == ["Dense_0"]
  served, sv = ql.convert(q, v)
  assert int(sv["cache"]["index"]) == 0
  y, st = q.apply(v, x, mutable=["cache"])
  ys, sst = served.apply(sv, x, mutable=["cache"])
  np.testing.assert_allclose(np.asarray(ys), np.asarray(y), rtol=1e-6, atol=1e-6)
  assert int(st["cache"]["index"]) == int(sst["cache"]["index"]) == 1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_flax_rnn_cells_calibrate_over_every_step_and_match_the_unrolled_cell(cell):
  """nn.RNN scans its cell with the params broadcast: the cell's quantizers are shared by the
  steps, and calibration observes every step's input."""
  make = {"lstm": lambda: nn.LSTMCell(8), "gru": lambda: nn.GRUCell(8)}[cell]
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  q = ql.quantize(nn.RNN(make()))
  v = ql.calibrate(q, q.init(jax.random.key(0), x), [x])
  first = "ii" if cell == "lstm" else "ir"  # the cell's input-to-hidden Dense
  dense = ql.quantize(nn.Dense(8))
  flat = x.reshape(-1, 3)
  ref = ql.calibrate(dense, dense.init(jax.random.key(0), flat), [flat])
  assert float(v["quant_stats"]["cell"][first]["input"]["scale"]) == float(
      ref["quant_stats"]["input"]["scale"])
  y = q.apply(v, x)
  qcell = ql.quantize(make())
  cv = {c: t["cell"] for c, t in v.items()}
  carry = make().initialize_carry(jax.random.key(0), x[:, 0].shape)
  outs = []
  for t in range(x.shape[1]):
    carry, out = qcell.apply(cv, carry, x[:, t])
    outs.append(out)
  np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.stack(outs, 1)), rtol=1e-5, atol=1e-6)
  flt = nn.RNN(make()).apply({"params": v["params"]}, x)
  assert float(jnp.max(jnp.abs(y - flt))) > 1e-4  # quantized
  served, sv = ql.convert(q, v, integer=False)
  np.testing.assert_array_equal(np.asarray(served.apply(sv, x)), np.asarray(y))
  assert len(ql.report(q, v).quantized_paths()) == (8 if cell == "lstm" else 6)


class _DecoratedScanLSTM(nn.Module):
  """The pre-nn.RNN recurrent pattern (flax examples sst2): a method scanned over time with
  its params broadcast."""
  cell: type = nn.LSTMCell

  @functools.partial(nn.scan, variable_broadcast="params", in_axes=1, out_axes=1,
                     split_rngs={"params": False})
  @nn.compact
  def __call__(self, carry, x):
    return self.cell(8, name="cell")(carry, x)


class _ScanModels(nn.Module):
  """Both forms of a user's nn.scan with broadcast params: the decorated method and a cell
  class given to nn.scan."""

  @nn.compact
  def __call__(self, x):
    carry = nn.LSTMCell(8, parent=None).initialize_carry(jax.random.key(0), x[:, 0].shape)
    y1 = _DecoratedScanLSTM(name="decorated")(carry, x)[1]
    scan = nn.scan(nn.LSTMCell, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)
    return y1 + scan(8, name="cls")(carry, x)[1]


def test_user_scans_with_broadcast_params_quantize_as_nn_rnn_does():
  """flax.core.lift.scan is called with the scan's collections: jaxqat's are broadcast with
  the params (calibration carries quant_stats through the steps), so the cells quantize,
  calibrate on every step and serve what was trained."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  q = ql.quantize(_ScanModels())
  v = ql.calibrate(q, q.init(jax.random.key(0), x), [x])
  paths = ql.report(q, v).quantized_paths()
  assert {f"{p}/{d}" for p in ("decorated/cell", "cls") for d in ("ii", "hi")} <= set(paths)
  dense = ql.quantize(nn.Dense(8))
  flat = x.reshape(-1, 3)
  ref = ql.calibrate(dense, dense.init(jax.random.key(0), flat), [flat])
  for cell in (v["quant_stats"]["decorated"]["cell"], v["quant_stats"]["cls"]):
    assert float(cell["ii"]["input"]["scale"]) == float(ref["quant_stats"]["input"]["scale"])
  y = q.apply(v, x)
  assert float(jnp.max(jnp.abs(y - _ScanModels().apply({"params": v["params"]}, x)))) > 1e-4
  served, sv = ql.convert(q, v, integer=False)
  np.testing.assert_array_equal(np.asarray(served.apply(sv, x)), np.asarray(y))


def test_optimized_lstm_cell_quantizes_as_lstm_cell():
  """nn.OptimizedLSTMCell concatenates its gate kernels before the matmul; jaxqat runs its step
  as nn.LSTMCell's (same children and parameters), so it quantizes, and equals the quantized
  LSTMCell with the same variables."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  carry = nn.LSTMCell(8, parent=None).initialize_carry(jax.random.key(0), x[:, 0].shape)
  qo = ql.quantize(_DecoratedScanLSTM(nn.OptimizedLSTMCell))
  ql_ = ql.quantize(_DecoratedScanLSTM(nn.LSTMCell))
  v = ql.calibrate(qo, qo.init(jax.random.key(0), carry, x), [(carry, x)])
  assert len(ql.report(qo, v).quantized_paths()) == 8
  vl = {**ql_.init(jax.random.key(0), carry, x), "params": v["params"]}
  vl = ql.calibrate(ql_, vl, [(carry, x)])
  for a, b in zip(jax.tree.leaves(v["quant_stats"]), jax.tree.leaves(vl["quant_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  y = qo.apply(v, carry, x)[1]
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ql_.apply(vl, carry, x)[1]))
  flt = _DecoratedScanLSTM(nn.OptimizedLSTMCell).apply({"params": v["params"]}, carry, x)[1]
  assert float(jnp.max(jnp.abs(y - flt))) > 1e-4


class _IndexedTable(nn.Module):
  """A table read by indexing, as the flax sst2 example's Embedder does (``embedding[ids]``)."""

  @nn.compact
  def __call__(self, ids):
    table = self.param("embedding", nn.initializers.normal(1.0), (11, 6))
    return table[ids]


def test_indexed_table_reads_quantized_rows_as_nn_embed():
  """``table[ids]`` of a parameter is a row lookup: quantized per row, bit-equal to nn.Embed's
  quantized lookup of the same table, in QAT and served (integer=False and True)."""
  ids = jnp.asarray([[1, 4, 10], [0, 4, 7]])
  q = ql.quantize(_IndexedTable())
  v = ql.calibrate(q, q.init(jax.random.key(0), ids), [ids])
  emb = ql.quantize(nn.Embed(11, 6))
  ve = ql.calibrate(emb, {**emb.init(jax.random.key(0), ids), "params": v["params"]}, [ids])
  y = q.apply(v, ids)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(emb.apply(ve, ids)))
  assert float(jnp.max(jnp.abs(y - v["params"]["embedding"][ids]))) > 1e-4
  assert ql.report(q, v).quantized_paths() == [""]  # the root module's table
  for integer in (False, True):
    served, sv = ql.convert(q, v, integer=integer)
    np.testing.assert_array_equal(np.asarray(served.apply(sv, ids)), np.asarray(y))
    assert "embedding" not in sv["params"]  # codes only
    assert sv["served"]["embedding"].scale.shape == (11, 1)  # one scale per row


def test_conv_local_quantizes_each_location_and_feature():
  """nn.ConvLocal (lax.conv_general_dilated_local): the unshared kernel gets one scale per
  location and feature (every axis but the contracted one), the input one per tensor.
  Reference: the float layer on a NumPy fake-quantized kernel and input."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  q = ql.quantize(nn.ConvLocal(4, (3, 3)))
  v = ql.calibrate(q, q.init(jax.random.key(0), x), [x])
  kernel = np.asarray(v["params"]["kernel"])
  assert kernel.shape == (6, 6, 27, 4)
  s = np.abs(kernel).max(axis=2, keepdims=True) / np.float32(127)
  kq = np.clip(np.round(kernel * (np.float32(1) / s)), -127, 127) * s
  st = v["quant_stats"]["input"]
  sx, zx = float(st["scale"]), float(st["zero_point"])
  xq = (np.clip(np.round(np.asarray(x) * np.float32(1 / np.float32(sx))) + zx, -128, 127)
        - zx) * np.float32(sx)
  ref = nn.ConvLocal(4, (3, 3)).apply({"params": {"kernel": jnp.asarray(kq, jnp.float32),
                                                  "bias": v["params"]["bias"]}},
                                      jnp.asarray(xq, jnp.float32))
  y = q.apply(v, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=1e-5)
  assert ql.report(q, v).quantized_paths() == [""]
  served, sv = ql.convert(q, v)
  np.testing.assert_array_equal(np.asarray(served.apply(sv, x)), np.asarray(y))
  assert sv["served"]["kernel"].scale.shape == (6, 6, 1, 4)
  rule = core.Rule(pattern=".*", weight=core.default_weight_spec(),
                   act=core.default_act_spec(), compute="integer")
  qi = ql.quantize(nn.ConvLocal(4, (3, 3)), [rule])
  with pytest.raises(ValueError, match="conv_general_dilated_local.*has no integer kernel"):
    qi.init(jax.random.key(0), x)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose_quantizes_per_output_channel(transpose_kernel):
  """nn.ConvTranspose (lax.conv_transpose, whose convolution runs inside JAX): one scale per
  output channel, whichever kernel axis holds it. Reference: the float layer on a NumPy
  fake-quantized kernel and input."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  make = lambda: nn.ConvTranspose(4, (3, 3), strides=(2, 2), transpose_kernel=transpose_kernel)
  q = ql.quantize(make())
  v = ql.calibrate(q, q.init(jax.random.key(0), x), [x])
  kernel = np.asarray(v["params"]["kernel"])
  out_axis = 2 if transpose_kernel else 3
  assert kernel.shape[out_axis] == 4
  axes = tuple(a for a in range(4) if a != out_axis)
  s = np.abs(kernel).max(axis=axes, keepdims=True) / np.float32(127)
  kq = np.clip(np.round(kernel * (np.float32(1) / s)), -127, 127) * s
  st = v["quant_stats"]["input"]
  sx, zx = float(st["scale"]), float(st["zero_point"])
  xq = (np.clip(np.round(np.asarray(x) * np.float32(1 / np.float32(sx))) + zx, -128, 127)
        - zx) * np.float32(sx)
  ref = make().apply({"params": {"kernel": jnp.asarray(kq, jnp.float32),
                                 "bias": v["params"]["bias"]}}, jnp.asarray(xq, jnp.float32))
  y = q.apply(v, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=1e-5)
  assert ql.report(q, v).quantized_paths() == [""]
  served, sv = ql.convert(q, v, integer=False)
  np.testing.assert_array_equal(np.asarray(served.apply(sv, x)), np.asarray(y))
  # The integer forward (QAT) and the served integer kernel: int8 x int8 -> int32, the same
  # codes, so the same values; the fake-quant values up to float summation order.
  rule = core.Rule(pattern=".*", weight=core.default_weight_spec(),
                   act=core.default_act_spec(), compute="integer")
  qi = ql.quantize(make(), [rule])
  qi.init(jax.random.key(0), x)
  y_int = qi.apply(v, x)
  assert "preferred_element_type=int32" in str(jax.make_jaxpr(lambda x: qi.apply(v, x))(x))
  np.testing.assert_allclose(np.asarray(y_int), np.asarray(y), rtol=0, atol=1e-5)
  served, sv = ql.convert(qi, v)
  np.testing.assert_array_equal(np.asarray(served.apply(sv, x)), np.asarray(y_int))
  g = jax.grad(lambda p, c: c.apply({**v, "params": p}, x).sum(), allow_int=True)
  for a, b in zip(jax.tree_util.tree_leaves(g(v["params"], qi)),
                  jax.tree_util.tree_leaves(g(v["params"], q))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Sampler(nn.Module):
  """Draws from its own RNG stream on every call (flax examples seq2seq's decoder)."""

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(4)(x)
    return y + 0.0 * jax.random.normal(self.make_rng("noise"), y.shape)


def test_models_drawing_from_rng_streams_freeze_report_and_convert():
  x = jax.random.normal(jax.random.key(2), (5, 8))
  q = ql.quantize(_Sampler())
  v = q.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)
  v = ql.calibrate(q, v, [{"x": x, "rngs": {"noise": jax.random.key(3)}}])
  v = ql.freeze(q, v)
  assert ql.report(q, v).quantized_paths() == ["Dense_0"]
  served, sv = ql.convert(q, v, integer=False)
  rngs = {"noise": jax.random.key(4)}
  np.testing.assert_array_equal(np.asarray(served.apply(sv, x, rngs=rngs)),
                                np.asarray(q.apply(v, x, rngs=rngs)))
