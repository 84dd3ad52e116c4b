"""calibrate/freeze/unfreeze/set_mode/qat_optimizer and the issue-9 faults (any backend)."""

import os
import warnings

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxqat.core import PerChannel, QuantizationWarning, QuantSpec, Rule
from jaxqat.core import calibrate as core_calibrate
from jaxqat.core import quant_dequant as core_qd
from jaxqat.core import unclipped_weight, weight_range
import jaxqat.keras as jqk
from kutil import BACKEND, assert_close, to_np

JIT = BACKEND == "jax"


def _mlp(seed=0, sizes=(5, 16, 3)):
  keras.utils.set_random_seed(seed)
  layers = [keras.Input((sizes[0],))]
  for i, n in enumerate(sizes[1:-1]):
    layers.append(keras.layers.Dense(n, activation="relu", name=f"h{i}"))
  layers.append(keras.layers.Dense(sizes[-1], name="out"))
  return keras.Sequential(layers)


def test_predict_before_calibrate_names_the_layer_and_the_model_recovers(tmp_path):
  q = jqk.quantize(_mlp())
  x = np.full((4, 5), 0.3, np.float32)
  with pytest.raises(ValueError, match=r"Quantizer '.*h0/input_quantizer'.* has no range yet: "
                                       r"call jaxqat.keras.calibrate"):
    q.predict(x, verbose=0)
  path = os.path.join(tmp_path, "u.keras")
  q.save(path)  # the uncalibrated state is saved too
  with pytest.raises(ValueError, match="has no range yet"):
    keras.saving.load_model(path).predict(x, verbose=0)
  jqk.calibrate(q, x)  # the same model, after the error, calibrates and runs
  out = to_np(q.predict(x, verbose=0))
  assert np.isfinite(out).all() and np.abs(out).max() > 0
  q.save(path)
  np.testing.assert_array_equal(to_np(keras.saving.load_model(path).predict(x, verbose=0)), out)


def test_observing_quantizer_ignores_non_finite_values():
  spec = QuantSpec(symmetric=False, calibration="minmax")
  q = jqk.Quantizer(spec, observe=True, name="obs")
  q.build((None, 4))
  a = np.array([[0.5, np.nan, -1.0, 2.0]], np.float32)
  b = np.array([[1.0, 3.0, -0.5, np.inf]], np.float32)
  c = np.full((1, 4), np.nan, np.float32)
  for batch in (a, b, c):
    q(batch, training=True)  # documented first-batch initialisation when observing
  s, z = core_calibrate(spec, [jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)])
  assert np.isfinite(to_np(q.scale)).all()
  assert_close(to_np(q.scale), np.asarray(s), what="scale")
  assert_close(to_np(q.zero_point), np.asarray(z), what="zero point")
  assert to_np(q.range_min) == -1.0 and to_np(q.range_max) == 3.0


def test_calibrate_on_all_nan_data_warns_naming_the_layer_and_leaves_it_float():
  q = jqk.quantize(_mlp())
  with pytest.warns(QuantizationWarning, match=r"h0/input_quantizer' saw no finite value"):
    jqk.calibrate(q, np.full((8, 5), np.nan, np.float32))
  iq = q.get_layer("h0").input_quantizer
  assert iq.float_reason == "saw no finite value during calibration"
  x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
  np.testing.assert_array_equal(to_np(iq(x)), x)  # passes through, no silent scale of 1


def _two_inputs(seed=0):
  keras.utils.set_random_seed(seed)
  a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
  h = keras.layers.Concatenate()([keras.layers.Dense(4, name="da")(a),
                                  keras.layers.Dense(4, name="db")(b)])
  return keras.Model({"a": a, "b": b}, keras.layers.Dense(1, name="o")(h))


class _Batches(keras.utils.PyDataset):

  def __init__(self, xa, xb):
    super().__init__()
    self.xa, self.xb = xa, xb

  def __len__(self):
    return 2

  def __getitem__(self, i):
    s = slice(8 * i, 8 * i + 8)
    return {"a": self.xa[s], "b": self.xb[s]}, np.zeros((8, 1), np.float32)


def test_calibrate_accepts_what_predict_accepts():
  rng = np.random.RandomState(0)
  xa, xb = rng.randn(16, 3).astype(np.float32), 3 * rng.randn(16, 2).astype(np.float32)
  ref = {"da": float(np.abs(xa).max()) / 127, "db": float(np.abs(xb).max()) / 127}

  def gen():
    for i in range(2):
      yield {"a": xa[8 * i:8 * i + 8], "b": xb[8 * i:8 * i + 8]}, np.zeros((8, 1), np.float32)

  q = jqk.quantize(_two_inputs(), [Rule(pattern=".*", weight=QuantSpec(), act=QuantSpec())])
  for data in ({"a": xa, "b": xb}, [xa, xb], gen(), _Batches(xa, xb)):
    jqk.calibrate(q, data, batch_size=8)
    for name, s in ref.items():
      assert_close(to_np(q.get_layer(name).input_quantizer.scale), s, what=f"{type(data)} {name}")
  jqk.calibrate(q, {"a": xa, "b": xb}, steps=1, batch_size=8)  # steps caps the batches
  assert_close(to_np(q.get_layer("da").input_quantizer.scale), np.abs(xa[:8]).max() / 127)
  with pytest.raises(ValueError, match="steps: must be a positive int"):
    jqk.calibrate(q, [xa, xb], steps=0)
  with pytest.raises(ValueError, match="data: empty"):
    jqk.calibrate(q, [])
  with pytest.raises(TypeError, match="data: expected what model.predict accepts"):
    jqk.calibrate(q, "x")
  with pytest.raises(ValueError, match="no quantized layers"):
    jqk.calibrate(_mlp(), np.zeros((4, 5), np.float32))


@pytest.mark.parametrize("spec", [
    QuantSpec(format="int4", granularity=PerChannel(-1)),
    QuantSpec(format="int8", granularity=PerChannel(-1), symmetric=False, calibration="minmax"),
    QuantSpec(format="int4", calibration="percentile"),
], ids=["absmax", "minmax", "percentile"])
def test_fixed_weights_track_weight_range_until_freeze(spec):
  q = jqk.quantize(_mlp(), [Rule(pattern=".*", weight=spec)])
  layer = q.get_layer("h0")
  x = np.random.RandomState(1).randn(4, 5).astype(np.float32)

  def expected(kernel, s, z):
    wq = core_qd(jnp.asarray(kernel), spec, s, None if spec.symmetric else z)
    return np.maximum(x @ np.asarray(wq) + to_np(layer.bias), 0)

  def h0():
    return to_np(layer(x))

  rng = np.random.RandomState(2)
  k1 = rng.randn(5, 16).astype(np.float32)
  layer.kernel.assign(k1)  # tracked: the range follows the new weight
  assert_close(h0(), expected(k1, *weight_range(jnp.asarray(k1), spec)), 1e-5, "tracking")
  # Tracked on an absmax signed symmetric grid: no clip mask (tests/keras/test_keras_ops.py).
  absmax = spec.symmetric and spec.calibration.method == "absmax"
  assert layer.kernel_quantizer.tracks_unclipped == unclipped_weight(spec) == absmax
  jqk.freeze(q)
  assert not layer.kernel_quantizer.tracks_unclipped
  s1, z1 = weight_range(jnp.asarray(k1), spec)
  assert_close(to_np(layer.kernel_quantizer.scale), np.asarray(s1), what="stored scale")
  k2 = 3 * rng.randn(5, 16).astype(np.float32)
  layer.kernel.assign(k2)  # frozen: the stored range stays
  assert_close(h0(), expected(k2, s1, z1), 1e-5, "frozen")
  jqk.unfreeze(q)
  assert_close(h0(), expected(k2, *weight_range(jnp.asarray(k2), spec)), 1e-5, "unfrozen")


def test_frozen_state_survives_save_and_load(tmp_path):
  q = jqk.freeze(jqk.calibrate(jqk.quantize(_mlp()), np.ones((4, 5), np.float32)))
  path = os.path.join(tmp_path, "f.keras")
  q.save(path)
  r = keras.saving.load_model(path)
  assert all(x.frozen for x in jqk.quantizers(r) if x.role == "weight")
  assert all(x.calibrated for x in jqk.quantizers(r))


def test_set_mode_float_runs_the_float_model():
  model = _mlp()
  x = np.random.RandomState(0).randn(8, 5).astype(np.float32)
  q = jqk.calibrate(jqk.quantize(model, [Rule(pattern=".*", weight=QuantSpec(format="int4"),
                                              act=QuantSpec(format="int4"))]), x)
  quant_out = to_np(q.predict(x, verbose=0))
  jqk.set_mode(q, "float")
  np.testing.assert_allclose(to_np(q.predict(x, verbose=0)), to_np(model.predict(x, verbose=0)),
                             atol=1e-6)
  jqk.set_mode(q, "quant")
  np.testing.assert_array_equal(to_np(q.predict(x, verbose=0)), quant_out)
  assert np.abs(quant_out - to_np(model.predict(x, verbose=0))).max() > 1e-3
  with pytest.raises(ValueError, match=r"mode: expected one of \('quant', 'float'\)"):
    jqk.set_mode(q, "int")


LSQ4 = QuantSpec(format="int4", learning="lsq")
LSQ4_W = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")


def _lsq_model():
  x = np.random.RandomState(0).randn(32, 5).astype(np.float32)
  y = np.random.RandomState(1).randint(0, 3, 32)
  q = jqk.quantize(_mlp(), [Rule(pattern=".*", weight=LSQ4_W, act=LSQ4)])
  return jqk.calibrate(q, x), x, y


def _one_step(q, x, y, optimizer):
  q.compile(optimizer=optimizer, jit_compile=JIT,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  q.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
  return {v.path: to_np(v) for v in q.trainable_variables}


def test_qat_optimizer_gives_quantizer_parameters_their_rate_and_no_weight_decay():
  """One SGD step: log_scale as by SGD(lr_q) without decay, the rest as by SGD(lr, decay)."""
  q, x, y = _lsq_model()
  init = [to_np(v) for v in q.trainable_variables]
  got = _one_step(q, x, y, jqk.qat_optimizer(
      q, keras.optimizers.SGD(0.01, weight_decay=0.1),
      keras.optimizers.SGD(0.05, weight_decay=0.3)))
  want = []
  for opt in (keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.01, weight_decay=0.1)):
    for v, value in zip(q.trainable_variables, init):
      v.assign(value)
    want.append(_one_step(q, x, y, opt))
  moved = 0
  for path, value in got.items():
    ref = want[0 if path.endswith("log_scale") else 1][path]
    assert_close(value, ref, 1e-6, path)
    moved += path.endswith("log_scale") and np.abs(value - init[list(got).index(path)]).max() > 0
  assert moved == 4  # every step size moved


def test_qat_optimizer_adam_moves_step_sizes_at_the_quant_rate():
  q, x, y = _lsq_model()
  before = {v.path: to_np(v) for v in q.trainable_variables}
  opt = jqk.qat_optimizer(q, keras.optimizers.Adam(1e-4), keras.optimizers.Adam(1e-2))
  after = _one_step(q, x, y, opt)
  steps = {p: float(np.abs(after[p] - before[p]).max()) for p in after}
  for p, d in steps.items():  # Adam's first step moves each parameter by about its rate
    assert abs(d - (1e-2 if p.endswith("log_scale") else 1e-4)) < 0.05 * d, (p, d)
  assert int(opt.iterations.numpy()) == 1 and int(opt.quant_optimizer.iterations.numpy()) == 1
  with pytest.raises(ValueError, match="different optimizer object"):
    a = keras.optimizers.Adam()
    jqk.qat_optimizer(q, a, a)
  with pytest.warns(QuantizationWarning, match="no learned quantizer parameters"):
    jqk.qat_optimizer(jqk.quantize(_mlp()), "adam", "sgd")


def test_lsq_step_sizes_stay_positive_mlp_16_64_64_4():
  """Issue 9: int4 LSQ weights and activations, Adam 1e-2 on step sizes, 200 steps of fit."""
  rng = np.random.RandomState(0)
  x = rng.randn(800, 16).astype(np.float32)
  y = (x[:, :4] @ rng.randn(4, 4)).argmax(-1)
  q = jqk.quantize(_mlp(sizes=(16, 64, 64, 4)), [Rule(pattern=".*", weight=LSQ4_W, act=LSQ4)])
  jqk.calibrate(q, x[:256])
  q.compile(optimizer=jqk.qat_optimizer(q, keras.optimizers.Adam(1e-3),
                                        keras.optimizers.Adam(1e-2)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
  hist = q.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[jqk.CheckFinite()])
  assert int(q.optimizer.iterations.numpy()) == 200
  assert np.isfinite(hist.history["loss"]).all()
  assert hist.history["loss"][-1] < hist.history["loss"][0]
  steps = [to_np(quantizer.step_size()) for quantizer in jqk.quantizers(q)]
  assert len(steps) == 6 and all(np.isfinite(s).all() and (s > 0).all() for s in steps)


def test_check_finite_names_the_layer():
  q, x, y = _lsq_model()
  log_scale = q.get_layer("out").input_quantizer.log_scale
  log_scale.assign(np.float32(np.nan))
  with pytest.raises(FloatingPointError, match=r"out/input_quantizer/log_scale \(1 of 1\)"):
    jqk.check_finite(q)
  q.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=JIT)
  with pytest.raises(FloatingPointError, match="out/input_quantizer/log_scale"):
    q.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[jqk.CheckFinite()])
