"""Quantized NNX layers: parameters kept, numerics equal to the core applied by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxqat import core
from jaxqat.core import IntFormat
from jaxqat.core import PerBlock
from jaxqat.core import PerChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx

W4 = QuantSpec(format=IntFormat(bits=4, narrow=True), granularity=PerChannel(-1))
A8 = QuantSpec(format="int8", symmetric=False, calibration="minmax")
RULES = [Rule(pattern=".*", weight=W4, act=A8)]


def _layers():
  """(name, float layer factory, example input)."""
  r = lambda: nnx.Rngs(0)
  x2 = jax.random.normal(jax.random.key(1), (3, 6))
  return [
      ("linear", lambda: nnx.Linear(6, 5, rngs=r()), x2),
      ("linear_general", lambda: nnx.LinearGeneral(6, (2, 3), rngs=r()), x2),
      ("einsum", lambda: nnx.Einsum("bi,hio->bho", (2, 6, 4), (2, 4), rngs=r()), x2),
      ("conv2d", lambda: nnx.Conv(3, 4, (3, 3), strides=2, rngs=r()),
       jax.random.normal(jax.random.key(2), (2, 7, 7, 3))),
      ("conv1d_causal", lambda: nnx.Conv(3, 4, (3,), padding="CAUSAL", rngs=r()),
       jax.random.normal(jax.random.key(3), (2, 9, 3))),
      ("conv_grouped", lambda: nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=r()),
       jax.random.normal(jax.random.key(4), (2, 5, 5, 4))),
      ("conv_depthwise", lambda: nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=r()),
       jax.random.normal(jax.random.key(5), (2, 5, 5, 4))),
  ]


LAYERS = _layers()
IDS = [name for name, _, _ in LAYERS]


def _by_hand(float_layer, q, x):
  """fake_quant(x), fake_quant(kernel) with the kernel's current absmax range, Flax's float op."""
  s_a, z_a = q.input_quant.scale[...], q.input_quant.zero_point[...]
  xq = core.fake_quant(x, s_a, z_a, A8)
  k = float_layer.kernel[...]
  s_w = jnp.max(jnp.abs(k), axis=tuple(range(k.ndim - 1)), keepdims=True) / 7  # int4 narrow
  wq = core.fake_quant(k, s_w, None, W4)
  ref = nnx.clone(float_layer)
  ref.kernel[...] = wq
  return ref(xq)


@pytest.mark.parametrize("name,make,x", LAYERS, ids=IDS)
def test_layer_keeps_params_and_equals_core_by_hand(name, make, x):
  layer = make()
  float_layer = nnx.clone(layer)  # shares the (immutable) arrays
  before = {p: (v, v[...]) for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  q = qnnx.quantize(layer, RULES)
  assert q is layer and type(q).__name__ == "Quant" + type(float_layer).__name__
  after = dict(nnx.to_flat_state(nnx.state(q, nnx.Param)))
  for p, (var, value) in before.items():
    assert after[p] is var  # the same Variable ...
    assert after[p][...] is value  # ... holding the same array (name, shape, dtype kept)
  state = dict(nnx.to_flat_state(nnx.state(q)))
  added = sorted(p for p in state if p not in before)
  assert added == [("input_quant", "scale"), ("input_quant", "stats", "count"),
                   ("input_quant", "stats", "max"), ("input_quant", "stats", "min"),
                   ("input_quant", "zero_point"), ("kernel_quant", "scale")]
  assert all(isinstance(state[p], qnnx.QuantStat) for p in added)

  qnnx.calibrate(q, [x, 0.5 * x])
  y = q(x)
  np.testing.assert_allclose(y, _by_hand(float_layer, q, x), rtol=0, atol=1e-6)
  assert float(jnp.max(jnp.abs(y - float_layer(x)))) > 1e-3  # it did quantize
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(q, x), y, rtol=0, atol=1e-6)


def test_embed_quantizes_the_table():
  emb = nnx.Embed(7, 4, rngs=nnx.Rngs(0))
  spec = QuantSpec(format="int4", granularity=PerChannel(0))
  q = qnnx.freeze(qnnx.quantize(nnx.clone(emb), Rule(pattern=".*", weight=spec)))
  assert ("embedding_quant", "scale") in dict(nnx.to_flat_state(nnx.state(q)))
  assert q.embedding_quant.scale.shape == (7, 1)
  ids = jnp.array([[0, 3], [6, 6]])
  table_q = core.fake_quant(emb.embedding[...], q.embedding_quant.scale[...], None, spec)
  np.testing.assert_array_equal(q(ids), jnp.take(table_q, ids, axis=0))
  query = jnp.ones((2, 4))
  np.testing.assert_allclose(q.attend(query), query @ table_q.T, rtol=0, atol=1e-6)


def test_jit_and_grad():
  q = qnnx.quantize(nnx.Linear(6, 5, rngs=nnx.Rngs(0)),
                    Rule(pattern=".*", weight=W4.replace(learning="lsq"),
                         act=A8.replace(learning="lsq_plus")))
  x = jax.random.normal(jax.random.key(0), (8, 6))
  qnnx.calibrate(q, [x])
  x = 2.0 * x  # beyond the calibrated range: the LSQ+ offset's gradient comes from clipped inputs
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(q)
  g = dict(nnx.to_flat_state(nnx.state(grads)))
  for path in [("kernel",), ("kernel_quant", "log_scale"), ("input_quant", "log_scale"),
               ("input_quant", "offset")]:
    assert bool(jnp.all(jnp.isfinite(g[path][...]))), path
    assert float(jnp.sum(jnp.abs(g[path][...]))) > 0, path
  # jax.grad over the split state gives the same gradients.
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)
  jg = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2))(params)
  np.testing.assert_allclose(jg["kernel_quant"]["log_scale"][...],
                             g[("kernel_quant", "log_scale")][...], rtol=1e-6)


def test_split_merge_round_trip():
  q = qnnx.quantize(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), RULES)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  qnnx.calibrate(q, [x])
  graphdef, state = nnx.split(q)
  q2 = nnx.merge(graphdef, state)
  assert type(q2) is qnnx.QuantConv and q2.kernel_quant.mode == "quant"
  np.testing.assert_array_equal(q2(x), q(x))
  # jax.jit over the pure state.
  y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_array_equal(y, q(x))


def test_optimizer_gives_quant_params_their_own_lr_and_no_weight_decay():
  q = qnnx.quantize(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
                    Rule(pattern=".*", weight=W4.replace(learning="lsq")))
  x = jax.random.normal(jax.random.key(0), (8, 4))
  loss = lambda m: jnp.sum(m(x) ** 2)
  lr, qlr, wd = 0.1, 0.01, 0.5
  tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
  opt = nnx.Optimizer(q, qnnx.qat_optimizer(q, tx, optax.sgd(qlr)), wrt=nnx.Param)
  k0, s0, b0 = q.kernel[...], q.kernel_quant.log_scale[...], q.bias[...]
  grads = nnx.grad(loss)(q)
  opt.update(q, grads)
  gk, gs = grads.kernel[...], grads.kernel_quant.log_scale[...]
  assert float(jnp.sum(jnp.abs(gs))) > 0
  np.testing.assert_allclose(q.kernel_quant.log_scale[...], s0 - qlr * gs, rtol=1e-6)  # no decay
  np.testing.assert_allclose(q.kernel[...], k0 - lr * (gk + wd * k0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(q.bias[...], b0 - lr * (grads.bias[...] + wd * b0), atol=1e-7)


def test_qat_optimizer_rejects_non_transformations():
  q = qnnx.quantize(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="quant_tx: expected an optax.GradientTransformation"):
    qnnx.qat_optimizer(q, optax.sgd(0.1), 0.01)


def test_stacked_layer_created_with_vmap_gets_per_layer_state():

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return nnx.Linear(4, 4, rngs=rngs)

  stack = make(nnx.Rngs(0))
  q = qnnx.quantize(stack, RULES)
  assert q.kernel_quant.scale.shape == (3, 1, 4)
  assert q.input_quant.scale.shape == (3,)
  x = jax.random.normal(jax.random.key(0), (2, 4))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def run(x, layer):
    return layer(x)

  qnnx.calibrate(q, [x], forward=lambda m, b: run(b, m))
  scales = np.asarray(q.input_quant.scale[...])
  assert len(set(scales.tolist())) == 3  # one calibrated range per layer
  # The quantized stack runs under nnx.scan with the sliced per-layer state.
  y = run(x, q)
  assert y.shape == (2, 4) and bool(jnp.all(jnp.isfinite(y)))


def test_act_quant_point():
  aq = qnnx.ActQuant(QuantSpec(format="int8"))
  qnnx.calibrate(aq, [jnp.array([-2.0, 1.0])])
  x = jnp.array([0.3, -1.5, 3.0])
  np.testing.assert_array_equal(aq(x), core.fake_quant(x, 2.0 / 127, None, QuantSpec()))


def test_model_with_a_hand_placed_act_quant_converts_and_names_it():

  class Res(nnx.Module):

    def __init__(self):
      self.dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      self.res_quant = qnnx.ActQuant()

    def __call__(self, x):
      return self.res_quant(x + self.dense(x))

  model = qnnx.quantize(Res())  # the ActQuant does not make it "quantized already"
  assert model.res_quant.quantizer.path == "res_quant"
  with pytest.raises(ValueError, match="layer 'dense'"):
    model(jnp.ones((1, 2)))
  qnnx.calibrate(model, [jnp.ones((1, 2))])
  assert model.res_quant.quantizer.calibrated


def test_lsq_plus_offset_initialized_from_zero_point():
  q = qnnx.quantize(nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
                    Rule(pattern=".*", act=A8.replace(learning="lsq_plus")))
  qnnx.calibrate(q, [jnp.array([[0.0, 1.0], [0.5, 3.0]])])  # range [0, 3]
  s = float(core.param_to_step_size(q.input_quant.log_scale[...]))
  beta = float(q.input_quant.offset[...])
  np.testing.assert_allclose(s, 3.0 / 255, rtol=1e-6)
  np.testing.assert_allclose(beta, 128 * s, rtol=1e-6)  # beta = -z*s with z = -128


def test_modes():
  float_layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  q = qnnx.quantize(nnx.clone(float_layer))
  x = jnp.array([[1.0, -1.0]])
  assert {z.mode for z in qnnx.quantizers(q)} == {"quant"}
  with pytest.raises(ValueError, match="mode: must be one of"):
    qnnx.set_mode(q, "calibrate")
  qnnx.set_mode(q, "float")
  np.testing.assert_array_equal(q(x), float_layer(x))
  qnnx.set_mode(q, "quant")
  qnnx.calibrate(q, [x])
  assert {z.mode for z in qnnx.quantizers(q)} == {"quant"}
  assert float(jnp.max(jnp.abs(q(x) - float_layer(x)))) > 0


def test_uncalibrated_activation_quantizer_is_an_error_naming_the_layer():
  model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  qnnx.quantize(model)
  x = jnp.ones((1, 2))
  with pytest.raises(ValueError, match=r"layer 'layers/0': the input quantizer was never "
                     "calibrated"):
    model(x)
  with pytest.raises(ValueError, match=r"layer 'layers/0'.*never calibrated"):
    nnx.jit(lambda m, x: m(x))(model, x)  # at trace time
  qnnx.calibrate(model, [x])
  assert model(x).shape == (1, 2)


def test_weight_only_model_is_usable_right_away():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  k = model.kernel[...]
  qnnx.quantize(model, Rule(pattern=".*", weight=W4))
  x = jnp.ones((1, 3))
  s = jnp.max(jnp.abs(k), axis=0, keepdims=True) / 7
  np.testing.assert_allclose(model(x), x @ core.fake_quant(k, s, None, W4) + model.bias[...],
                             rtol=0, atol=1e-6)


# ----------------------------------------------------------------- bad input


def test_invalid_regex_is_rejected():
  with pytest.raises(ValueError, match="invalid regular expression"):
    qnnx.quantize(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [Rule(pattern="conv(", weight=W4)])


def test_per_channel_axis_out_of_range_names_the_layer():
  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
  spec = QuantSpec(granularity=PerChannel(2))
  with pytest.raises(ValueError, match=r"layer 'layers/0'.*axis 2 is out of range"):
    qnnx.quantize(model, Rule(pattern=".*", weight=spec))
  assert type(model.layers[0]) is nnx.Linear  # left untouched


def test_block_size_not_dividing_names_the_layer():
  model = nnx.Sequential(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
  spec = QuantSpec(granularity=PerBlock(4, axis=0))
  with pytest.raises(ValueError, match=r"layer 'layers/0'.*block size 4 does not divide"):
    qnnx.quantize(model, Rule(pattern=".*", weight=spec))


def test_per_channel_activation_on_other_axis_is_rejected():
  with pytest.raises(ValueError, match=r"layer 'dense'.*activation spec"):
    qnnx.quantize(_Holder(), Rule(pattern=".*", act=QuantSpec(granularity=PerChannel(0))))


def test_quantizing_twice_and_non_modules_are_rejected():
  q = qnnx.quantize(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="quantized already"):
    qnnx.quantize(q)
  model = nnx.Sequential(nnx.LayerNorm(2, rngs=nnx.Rngs(0)))
  with pytest.warns(core.QuantizationWarning, match="no layer of the model was quantized"):
    qnnx.quantize(model)
  with pytest.raises(ValueError, match="quantized already"):  # even with nothing converted
    qnnx.quantize(model)
  with pytest.raises(TypeError, match="model: expected a flax.nnx.Module"):
    qnnx.quantize({"a": 1})


def test_calibration_without_data_reaching_a_layer_warns_and_keeps_its_input_float():
  model = _Holder()
  qnnx.quantize(model)
  x = jnp.ones((2, 3))
  with pytest.warns(core.QuantizationWarning, match=r"layer 'unused'.*saw no finite input"):
    qnnx.calibrate(model, [x])
  assert model.unused.input_quant.disabled and not model.dense.input_quant.disabled
  assert "input stays float" in qnnx.report(model)["unused"].reason
  assert qnnx.report(model)["unused"].act is None
  np.testing.assert_array_equal(model.unused(x), x @ model.unused.kernel_quant(
      model.unused.kernel[...]) + model.unused.bias[...])  # weights quantized, input float
  with pytest.raises(ValueError, match="at least one batch"):
    qnnx.calibrate(model, [])


def test_all_nan_calibration_warns_and_stays_float():
  model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  qnnx.quantize(model)
  with pytest.warns(core.QuantizationWarning, match=r"layer 'layers/0'.*no finite input"):
    qnnx.calibrate(model, [jnp.full((2, 2), jnp.nan)])
  assert qnnx.report(model)["layers/0"].act is None


def test_calibrate_accepts_tuples_and_dicts_and_caps_steps():
  class Two(nnx.Module):

    def __init__(self):
      self.dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x, *, scale=1.0):
      return self.dense(x * scale)

  model = qnnx.quantize(Two())
  x = jnp.array([[1.0, -1.0]])
  qnnx.calibrate(model, [(x,), {"x": x, "scale": 3.0}], steps=1)  # the dict is not used
  np.testing.assert_allclose(float(model.dense.input_quant.scale[...]) * 255, 2.0, rtol=1e-6)
  qnnx.calibrate(model, [{"x": x, "scale": 3.0}])
  np.testing.assert_allclose(float(model.dense.input_quant.scale[...]) * 255, 6.0, rtol=1e-6)
  with pytest.raises(ValueError, match="steps: must be a positive int"):
    qnnx.calibrate(model, [x], steps=0)


class _Holder(nnx.Module):

  def __init__(self):
    self.dense = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    self.unused = nnx.Linear(3, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.dense(x)
