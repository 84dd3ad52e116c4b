"""Recurrent layers (SimpleRNN, LSTM, GRU): their cells quantize, calibrate over every step,
train, serve and reload on every backend.

The references are independent of the quantized cells: a NumPy LSTM that fake-quantizes its
step input, its state and its kernels with the ranges a plain Dense quantizer calibrates on
the same values, and the float model's own outputs for the calibrated state range.
"""

import os
import tempfile
import warnings

import numpy as np
import pytest
import keras

from jaxqat.core import QuantizationWarning, Rule, default_act_spec, default_weight_spec
import jaxqat.keras as jqk
from kutil import BACKEND, to_np

T, F, U = 6, 5, 8
RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, T, F)).astype("float32")
Y = RNG.integers(0, 3, size=(16,))


def _lstm_model(**kw):
  inp = keras.Input((T, F))
  out = keras.layers.LSTM(U, return_sequences=True, name="lstm", **kw)(inp)
  model = keras.Model(inp, out)
  rng = np.random.default_rng(1)
  model.get_layer("lstm").set_weights([rng.normal(size=(F, 4 * U)).astype("float32") * 0.4,
                                       rng.normal(size=(U, 4 * U)).astype("float32") * 0.4,
                                       rng.normal(size=(4 * U,)).astype("float32") * 0.1])
  return model


def _dense_input_range(values):
  """(scale, zero point) a plain Dense's input quantizer calibrates on ``values`` (rows)."""
  d = keras.Sequential([keras.Input((values.shape[-1],)), keras.layers.Dense(1, name="d")])
  q = jqk.calibrate(jqk.quantize(d), values, batch_size=len(values))
  iq = q.get_layer("d").input_quantizer
  return float(to_np(iq.scale)), float(to_np(iq.zero_point))


def _fq(x, s, z):
  """int8 affine fake quant (the core multiplies by the reciprocal of the step size)."""
  q = np.clip(np.round(x * np.float32(1.0 / np.float32(s))) + z, -128, 127)
  return ((q - z) * np.float32(s)).astype("float32")


def _fq_columns(w):
  s = np.abs(w).max(0, keepdims=True) / np.float32(127)
  return (np.clip(np.round(w * (np.float32(1) / s)), -127, 127) * s).astype("float32")


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _numpy_lstm(x, kernel, recurrent, bias, xr, hr):
  """The quantized LSTM, step by step: fake-quantized x_t, h_{t-1} and kernels."""
  k, r = _fq_columns(kernel), _fq_columns(recurrent)
  h = np.zeros((x.shape[0], U), "float32")
  c = np.zeros_like(h)
  outs = []
  for t in range(x.shape[1]):
    z = _fq(x[:, t], *xr) @ k + _fq(h, *hr) @ r + bias
    i, f, g, o = np.split(z, 4, axis=1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = (_sigmoid(o) * np.tanh(c)).astype("float32")
    outs.append(h)
  return np.stack(outs, 1)


def test_lstm_cell_calibrates_every_step_and_equals_a_numpy_reference():
  model = _lstm_model()
  q = jqk.quantize(model)
  cell = q.get_layer("lstm").cell
  assert type(cell).__name__ == "QuantLSTMCell"
  assert q.get_layer("lstm").use_cudnn is False  # the cuDNN kernel would skip the cell
  jqk.calibrate(q, X, batch_size=len(X))
  h = to_np(model(X))  # the float h_1..h_T; the state quantizer sees h_0 = 0 .. h_{T-1}
  states = np.concatenate([np.zeros((len(X), U), "float32"), h[:, :-1].reshape(-1, U)])
  xr = _dense_input_range(X.reshape(-1, F))
  hr = _dense_input_range(states)
  assert (float(to_np(cell.input_quantizer.scale)), float(to_np(cell.input_quantizer.zero_point))
          ) == xr
  # The calibration ran the loop unrolled; the float model's scan rounds h within an ulp.
  assert float(to_np(cell.state_quantizer.scale)) == pytest.approx(hr[0], rel=1e-6)
  assert float(to_np(cell.state_quantizer.zero_point)) == hr[1]
  hr = (float(to_np(cell.state_quantizer.scale)), hr[1])
  kernel, recurrent, bias = (to_np(w) for w in model.get_layer("lstm").get_weights())
  ref = _numpy_lstm(X, kernel, recurrent, bias, xr, hr)
  got = to_np(q(X))
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
  assert np.abs(got - h).max() > 1e-3  # quantized, not float


def test_recurrent_layers_train_serve_and_reload():
  inp = keras.Input((T, F))
  h = keras.layers.Bidirectional(keras.layers.LSTM(U, return_sequences=True), name="bi")(inp)
  h = keras.layers.GRU(U, name="gru")(h)
  h = keras.layers.SimpleRNN(4, name="rnn")(keras.layers.RepeatVector(3)(h))
  model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
  with warnings.catch_warnings():
    warnings.simplefilter("error", QuantizationWarning)  # no layer with weights left float
    q = jqk.quantize(model)
  rep = jqk.report(q)
  cells = [p for p in rep.quantized_paths() if "cell" in p]
  assert len(cells) == 4, rep.quantized_paths()  # forward and backward LSTM, GRU, SimpleRNN
  for path in cells:
    names = {w.name: w.spec for w in rep[path].weights}
    assert names["kernel"] is not None and names["recurrent_kernel"] is not None
  jqk.calibrate(q, X, batch_size=8)
  before = [to_np(v).copy() for v in q.trainable_weights]
  q.compile(optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  hist = q.fit(X, Y, epochs=2, batch_size=8, verbose=0)
  assert np.isfinite(hist.history["loss"]).all()
  assert any(np.abs(to_np(v) - b).max() > 0 for v, b in zip(q.trainable_weights, before))
  y = to_np(q.predict(X, verbose=0))
  # The recurrent cells dequantize their weights when served; the Dense head served beside them
  # (in place) takes the integer path on JAX unless integer=False: bit for bit the QAT model.
  np.testing.assert_allclose(to_np(jqk.convert(q).predict(X, verbose=0)), y, rtol=1e-5,
                             atol=1e-6)
  served = jqk.convert(q, integer=False)
  np.testing.assert_array_equal(to_np(served.predict(X, verbose=0)), y)
  rows = jqk.size_report(served).rows
  assert not [r.layer for r in rows if "quantizer" in r.layer]  # no QAT state left
  codes = [r for r in rows if r.layer.endswith("recurrent_kernel")]
  assert len(codes) == 4 and all(r.format == "int8_narrow" for r in codes)
  names = [e["name"] for e in jqk.export_encodings(q)["activation_encodings"]]
  assert "gru/gru_cell/state" in names and "gru/gru_cell/input" in names
  with tempfile.TemporaryDirectory() as d:
    jqk.save(os.path.join(d, "q.keras"), q)
    r = jqk.restore(os.path.join(d, "q.keras"))
    np.testing.assert_array_equal(to_np(r.predict(X, verbose=0)), y)
    assert r.get_layer("gru").use_cudnn is False
    served.save(os.path.join(d, "s.keras"))
    s2 = keras.saving.load_model(os.path.join(d, "s.keras"))
    np.testing.assert_array_equal(to_np(s2.predict(X, verbose=0)), y)
    assert s2.get_layer("gru").use_cudnn is False


def test_learned_state_step_size_gets_a_gradient_through_the_loop():
  rules = [Rule(pattern=".*", weight=default_weight_spec(range_learning=True),
                act=default_act_spec(range_learning=True))]
  q = jqk.calibrate(jqk.quantize(_lstm_model(), rules), X, batch_size=len(X))
  sq = q.get_layer("lstm").cell.state_quantizer
  start = to_np(sq.log_scale).copy()
  # Adam moves every parameter whose gradient is not zero by about its learning rate.
  q.compile(optimizer=jqk.qat_optimizer(q, keras.optimizers.SGD(0.0), keras.optimizers.Adam(
      1e-2, epsilon=1e-12)),
            loss="mse")
  q.fit(X, np.zeros((len(X), T, U), "float32"), epochs=1, batch_size=len(X), verbose=0)
  moved = to_np(sq.log_scale) - start
  assert np.isfinite(moved).all() and np.abs(moved).max() > 5e-3


def test_observe_and_integer_compute_on_a_cell_are_refused_clearly():
  with pytest.warns(QuantizationWarning, match="observe=True cannot update running range"):
    cell = jqk.QuantLSTMCell(U, weight_spec=default_weight_spec(), act_spec=default_act_spec(),
                             observe=True)
  keras.layers.RNN(cell).build(X.shape)
  assert cell.state_quantizer.observe is False and cell.input_quantizer.observe is False
  rule = Rule(pattern=".*", weight=default_weight_spec(), act=default_act_spec(),
              compute="integer")
  with pytest.raises(ValueError, match="LSTMCell has no integer forward"):
    jqk.quantize(_lstm_model(), [rule])


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_cell_in_float_mode_is_keras_gru(reset_after):
  """QuantGRUCell runs its own step (only the matmul operand of h_{t-1} is quantized, not the
  state it mixes in): set to float it computes Keras's GRU, bit for bit in eager torch (XLA
  fuses the two compiled steps' elementwise ops differently: within 2e-7 on JAX)."""
  inp = keras.Input((T, F))
  model = keras.Model(inp, keras.layers.GRU(U, return_sequences=True, reset_after=reset_after,
                                            name="gru")(inp))
  q = jqk.calibrate(jqk.quantize(model), X, batch_size=len(X))
  quantized = to_np(q(X))
  jqk.set_mode(q, "float")
  np.testing.assert_allclose(to_np(q(X)), to_np(model(X)), rtol=0,
                             atol=0 if BACKEND == "torch" else 1e-6)
  assert np.abs(quantized - to_np(model(X))).max() > 1e-3


def test_conv_lstm_cell_quantizes_serves_and_reloads():
  x = RNG.normal(size=(4, 3, 6, 2)).astype("float32")
  inp = keras.Input((3, 6, 2))
  model = keras.Model(inp, keras.layers.ConvLSTM1D(3, 3, name="c")(inp))
  q = jqk.calibrate(jqk.quantize(model), x, batch_size=4)
  cell = q.get_layer("c").cell
  assert cell.state_quantizer.calibrated and cell.recurrent_kernel_quantizer.scale.shape == (1, 1, 12)
  y = to_np(q(x))
  assert np.abs(y - to_np(model(x))).max() > 1e-4
  served = jqk.convert(q)
  np.testing.assert_array_equal(to_np(served(x)), y)
  with tempfile.TemporaryDirectory() as d:
    served.save(os.path.join(d, "s.keras"))
    np.testing.assert_array_equal(to_np(keras.saving.load_model(os.path.join(d, "s.keras"))(x)), y)
