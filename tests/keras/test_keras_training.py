"""BN folding, calibration, range observation, LSQ with fit, FreezeQuantizers, .keras round trip."""

import os

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxqat.core import PerChannel, PerOutputChannel, QuantSpec, Rule
from jaxqat.core import calibrate as core_calibrate
from jaxqat.core import quant_dequant as core_qd
import jaxqat.keras as jqk
from kutil import BACKEND, assert_close, layer_value_and_grads, to_np

JIT = BACKEND == "jax"  # torch.compile is far too slow for unit tests


def _conv_bn(depthwise=False, seed=0):
  keras.utils.set_random_seed(seed)
  conv = (keras.layers.DepthwiseConv2D(3, name="c") if depthwise
          else keras.layers.Conv2D(4, 3, name="c", use_bias=True))
  bn = keras.layers.BatchNormalization(name="bn", momentum=0.9)
  x = np.random.RandomState(seed).randn(4, 6, 6, 3).astype(np.float32)
  bn(conv(x))
  rng = np.random.RandomState(seed + 1)
  for v in bn.weights:  # non-trivial statistics
    v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
  bias = conv.bias
  bias.assign(rng.randn(*bias.shape).astype(np.float32))
  return conv, bn, x


def _fused(conv, bn, x, weight_spec, act_spec=None):
  fused = jqk.QuantConvBatchNorm(conv, bn, weight_spec=weight_spec, act_spec=act_spec)
  fused(x)
  fused.conv.set_weights(conv.get_weights())
  fused.bn.set_weights(bn.get_weights())
  fused.init_weight_ranges()
  return fused


def test_fold_without_quantization_equals_conv_then_batchnorm_in_training_and_inference():
  conv, bn, x = _conv_bn()
  fused = _fused(conv, bn, x, None)
  assert_close(to_np(fused(x, training=False)), to_np(bn(conv(x), training=False)), 1e-5)
  out = to_np(fused(x, training=True))
  ref = to_np(bn(conv(x), training=True))  # also updates bn's moving statistics
  assert_close(out, ref, 1e-5, "training output")
  assert_close(to_np(fused.bn.moving_mean), to_np(bn.moving_mean), 1e-5, "moving mean")
  assert_close(to_np(fused.bn.moving_variance), to_np(bn.moving_variance), 1e-5, "moving var")


@pytest.mark.parametrize("depthwise", [False, True])
def test_fold_quantizes_the_weights_a_deployed_model_uses(depthwise):
  """Inference: conv(x, Q(w * gamma / sigma)) + folded bias (Jacob et al. 2018, sec. 3.2)."""
  conv, bn, x = _conv_bn(depthwise)
  spec = QuantSpec(format="int4", granularity=PerOutputChannel())
  fused = _fused(conv, bn, x, spec)
  gamma, beta, mean, var = (to_np(v) for v in (bn.gamma, bn.beta, bn.moving_mean,
                                               bn.moving_variance))
  k, b = to_np(conv.kernel), to_np(conv.bias)
  inv = gamma / np.sqrt(var + bn.epsilon)
  kshape = k.shape[:-2] + (1, 1)
  w_fold = k * inv.reshape((1,) * (k.ndim - 2) + k.shape[-2:] if depthwise else inv.shape)
  q = fused.kernel_quantizer
  axes = (2, 3) if depthwise else 3
  assert q.spec.granularity == PerChannel(axes) and kshape
  w_q = np.asarray(core_qd(jnp.asarray(w_fold), q.spec, to_np(q.scale)))
  conv.kernel.assign(w_q)
  conv.bias.assign(beta + (b - mean) * inv)
  assert_close(to_np(fused(x, training=False)), to_np(conv(x)), what="folded inference")
  # Training (Krishnamoorthi 2018, sec. 3.2): one conv with w_q, the fold undone per channel,
  # batch normalization with the statistics of y_raw = y_q * sigma / gamma.
  conv.bias.assign(np.zeros_like(b))
  y_q = to_np(conv(x))  # conv(x, w_q), no bias
  sigma = np.sqrt(var + bn.epsilon)
  y_raw = y_q * sigma / gamma
  mu_b, var_b = y_raw.mean((0, 1, 2)), y_raw.var((0, 1, 2))
  ref = gamma * (y_raw - mu_b) / np.sqrt(var_b + bn.epsilon) + beta
  assert_close(to_np(fused(x, training=True)), ref, 1e-5, "folded training")
  m = bn.momentum
  assert_close(to_np(fused.bn.moving_mean), m * mean + (1 - m) * (mu_b + b), 1e-5, "moving mean")
  assert_close(to_np(fused.bn.moving_variance), m * var + (1 - m) * var_b, 1e-5, "moving var")


def test_fold_training_with_zero_gamma_outputs_beta_and_gamma_gets_a_gradient():
  conv, bn, x = _conv_bn()
  gamma = to_np(bn.gamma)
  gamma[1] = 0.0
  bn.gamma.assign(gamma)
  fused = _fused(conv, bn, x, QuantSpec(format="int8", granularity=PerChannel(-1)))
  r = np.random.RandomState(3).randn(*to_np(fused(x)).shape).astype(np.float32)
  out, _, grads = layer_value_and_grads(fused, x, r, training=True)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[..., 1], to_np(bn.beta)[1], atol=1e-6)
  # d out / d gamma_1 = (y_raw - mu_B) / sigma_B: y_raw from the float conv (w_q ~ w here).
  y = to_np(conv(x)) - to_np(conv.bias)
  y1 = y[..., 1]
  g_ref = np.sum(r[..., 1] * (y1 - y1.mean()) / np.sqrt(y1.var() + bn.epsilon))
  g = grads[fused.bn.gamma.path][1]
  assert abs(g - g_ref) < 0.02 * abs(g_ref) and abs(g_ref) > 0.1, (g, g_ref)


def test_fold_training_with_a_constant_channel_stays_finite():
  # Keras's moments is E[y^2] - E[y]^2: for a constant channel it can be slightly negative
  # (torch: -0.008 at y = 343), and the fold's r^2 (gamma clamped to 1e-6: 1e12) made
  # var_B + eps negative and the output NaN. Seen training a MobileNetV2 (W4A4 LSQ, torch).
  keras.utils.set_random_seed(0)
  conv = keras.layers.Conv2D(2, 1, use_bias=False, name="c")
  bn = keras.layers.BatchNormalization(name="bn")
  rng = np.random.RandomState(0)
  x = np.stack([np.full((16, 6, 6), 343.0001, np.float32),  # channel 0 of the output: constant
                rng.randn(16, 6, 6).astype(np.float32)], -1)
  bn(conv(x))
  conv.kernel.assign(np.array([[[[1.0, 0.3], [0.0, 1.0]]]], np.float32))
  bn.gamma.assign(np.array([1e-7, 1.0], np.float32))
  bn.beta.assign(np.array([0.25, -0.5], np.float32))
  fused = _fused(conv, bn, x, QuantSpec(format="int8", granularity=PerChannel(-1)))
  out = to_np(fused(x, training=True))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[..., 0], 0.25, atol=1e-3)  # gamma * 0 / sigma_B + beta
  assert np.isfinite(to_np(fused.bn.moving_variance)).all()


def _mlp(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.Input((5,)), keras.layers.Dense(16, activation="relu", name="a"),
                           keras.layers.Dense(3, name="b")])


def test_calibrate_matches_core_observers_for_each_layer_input():
  model = _mlp()
  x = np.random.RandomState(0).randn(64, 5).astype(np.float32)
  spec = QuantSpec(format="int8", symmetric=False, calibration="percentile")
  q = jqk.quantize(model, [Rule(pattern=".*", weight=QuantSpec(), act=spec)])
  assert jqk.calibrate(q, x, steps=3, batch_size=16) is q
  # Activations are calibrated on the float model (the contract's calibrate).
  a = q.get_layer("a")
  h = np.maximum(x @ to_np(a.kernel) + to_np(a.bias), 0)
  for layer, inputs in ((q.get_layer("a"), x), (q.get_layer("b"), h)):
    s, z = core_calibrate(spec, [inputs[i * 16:(i + 1) * 16] for i in range(3)])
    assert_close(to_np(layer.input_quantizer.scale), np.asarray(s), what=layer.name)
    assert_close(to_np(layer.input_quantizer.zero_point), np.asarray(z), what=layer.name)


def test_calibrate_bad_input():
  q = jqk.quantize(_mlp())
  with pytest.raises(ValueError, match="data: empty"):
    jqk.calibrate(q, [])
  with pytest.raises(ValueError, match="yielded no batch"):
    jqk.calibrate(q, (b for b in []))
  with pytest.raises(ValueError, match="steps: must be a positive int"):
    jqk.calibrate(q, np.zeros((4, 5), np.float32), steps=0)
  with pytest.raises(ValueError, match="no quantized layers"):
    jqk.calibrate(_mlp(), np.zeros((4, 5), np.float32))
  with pytest.raises(TypeError, match="data: expected what model.predict accepts"):
    jqk.calibrate(q, 3)


def _data(n=64, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(n, 5).astype(np.float32)
  y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
  return x, y


def _compile(model):
  model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=JIT,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


class _Record(keras.callbacks.Callback):

  def __init__(self, get):
    super().__init__()
    self.get = get
    self.values = []

  def on_epoch_end(self, epoch, logs=None):
    self.values.append(np.array(self.get()))


def test_ema_ranges_observe_in_fit_then_freeze():
  x, y = _data()
  spec = QuantSpec(calibration="ema")
  q = jqk.quantize(_mlp(), [Rule(pattern=".*", weight=QuantSpec(), act=spec)])
  quantizer = q.get_layer("a").input_quantizer
  assert not quantizer.observe  # calibrated, then fixed, unless asked for
  for act in (l.input_quantizer for l in jqk.quant_layers(q)):
    act.set_observe(True)
  assert not quantizer.calibrated and to_np(quantizer.observed) == 0
  _compile(q)
  rec = _Record(lambda: to_np(q.get_layer("b").input_quantizer.scale))
  q.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False,
        callbacks=[jqk.FreezeQuantizers(freeze_after=2), rec])
  assert to_np(quantizer.observed) == 1  # first-batch initialisation (observe=True)
  # Layer a's input is the data itself: its EMA range matches the core ema observer.
  s_ref, _ = core_calibrate(spec, [x[i:i + 16] for i in range(0, 64, 16)] * 2)
  assert_close(to_np(quantizer.scale), np.asarray(s_ref), 1e-5, "ema scale")
  assert not rec.values[0] == rec.values[1]  # observing in epochs 1-2
  assert rec.values[1] == rec.values[2]  # frozen in epoch 3
  assert not quantizer.observe


def test_lsq_step_sizes_train_with_fit():
  x, y = _data()
  spec = QuantSpec(format="int4", learning="lsq")
  wspec = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
  q = jqk.quantize(_mlp(), [Rule(pattern=".*", weight=wspec, act=spec)])
  jqk.calibrate(q, x)
  layer = q.get_layer("a")
  assert any(v is layer.kernel_quantizer.log_scale for v in q.trainable_weights)
  before = (to_np(layer.kernel_quantizer.log_scale).copy(),
            to_np(layer.input_quantizer.log_scale).copy())
  _compile(q)
  hist = q.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False)
  assert hist.history["loss"][-1] < hist.history["loss"][0]
  assert np.abs(to_np(layer.kernel_quantizer.log_scale) - before[0]).max() > 1e-5
  assert np.abs(to_np(layer.input_quantizer.log_scale) - before[1]).max() > 1e-6


def _cnn(seed=0):
  keras.utils.set_random_seed(seed)
  inp = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
  x = keras.layers.BatchNormalization(name="bn1")(x)
  x = keras.layers.ReLU()(x)
  s = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
  s = keras.layers.BatchNormalization(name="bn2")(s)
  x = keras.layers.Add()([x, s])
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inp, keras.layers.Dense(3, name="head")(x))


def test_keras_file_round_trip_is_exact_and_keeps_training(tmp_path):
  rng = np.random.RandomState(0)
  x = rng.randn(16, 8, 8, 3).astype(np.float32)
  y = rng.randint(0, 3, 16)
  rules = [Rule(pattern="head", weight=QuantSpec(format="int4", learning="lsq"),
                act=QuantSpec(symmetric=False, learning="lsq_plus")),
           Rule(pattern=".*", weight=QuantSpec(granularity=PerOutputChannel()),
                act=QuantSpec(symmetric=False))]
  q = jqk.quantize(_cnn(), rules)
  assert [type(l).__name__ for l in q.layers[1:4]] == ["QuantConvBatchNorm", "ReLU",
                                                       "QuantConvBatchNorm"]
  jqk.calibrate(q, x)
  _compile(q)
  q.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[jqk.FreezeQuantizers(1, 1)])
  out = to_np(q.predict(x, verbose=0))
  path = os.path.join(tmp_path, "q.keras")
  q.save(path)
  r = keras.saving.load_model(path)  # default safe_mode
  np.testing.assert_array_equal(to_np(r.predict(x, verbose=0)), out)
  assert r.get_layer("c1").freeze_bn and r.get_layer("c1").kernel_quantizer.frozen
  _compile(r)
  loss = r.fit(x, y, epochs=1, batch_size=8, verbose=0).history["loss"][0]
  assert np.isfinite(loss)


def test_generated_subclass_layers_round_trip(tmp_path):
  class TwiceDense(keras.layers.Dense):
    def call(self, inputs, training=None):
      return super().call(inputs) * 2.0

  keras.saving.register_keras_serializable(package="tests")(TwiceDense)
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), TwiceDense(3, name="t")])
  q = jqk.quantize(model)
  x = np.random.RandomState(0).randn(5, 4).astype(np.float32)
  jqk.calibrate(q, x)
  path = os.path.join(tmp_path, "t.keras")
  q.save(path)
  r = keras.saving.load_model(path)
  assert type(r.layers[0]).__name__ == "QuantTwiceDense"
  np.testing.assert_array_equal(to_np(r(x)), to_np(q(x)))
