"""One contract, three front ends: NNX, Linen and Keras-on-JAX agree.

The same two-layer MLP (same float weights), the same rules, the same
calibration data and the same optimizer steps give the same outputs, the
same gradients and the same trained values -- weights and quantizer state --
in Flax NNX, Flax Linen and Keras 3 on the JAX backend.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import jaxqat  # noqa: E402
from jaxqat import PerOutputChannel, QuantSpec, Rule  # noqa: E402
from jaxqat.flax import linen as ql  # noqa: E402
from jaxqat.flax import nnx as qnnx  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
  pytest.skip("the Keras half of this test runs on the JAX backend", allow_module_level=True)
import jaxqat.keras as jqk  # noqa: E402

LR, QLR, STEPS = 0.05, 0.01, 4
RULES = {
    # fixed ranges: int4 weights tracking the current weights, int8 affine inputs (calibrated)
    "w4a8_fixed": [Rule(pattern=".*",
                        weight=QuantSpec(format="int4", granularity=PerOutputChannel()),
                        act=jaxqat.default_act_spec())],
    # range learning: LSQ weights, LSQ+ inputs
    "w4a8_lsq": [Rule(pattern=".*",
                      weight=QuantSpec(format="int4", granularity=PerOutputChannel(),
                                       learning="lsq"),
                      act=QuantSpec(format="int8", symmetric=False, learning="lsq_plus",
                                    calibration="minmax"))],
}


def _data():
  rng = np.random.default_rng(0)
  w = {"hidden": (rng.normal(size=(16, 32)).astype("float32") * 0.3,
                  rng.normal(size=(32,)).astype("float32") * 0.1),
       "head": (rng.normal(size=(32, 4)).astype("float32") * 0.3,
                rng.normal(size=(4,)).astype("float32") * 0.1)}
  x = rng.normal(size=(64, 16)).astype("float32")
  y = rng.integers(0, 4, size=(64,)).astype("int32")
  return w, x, y


def _loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ---------------------------------------------------------------- NNX


class _NnxMLP(nnx.Module):

  def __init__(self, w):
    self.hidden = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
    self.head = nnx.Linear(32, 4, rngs=nnx.Rngs(1))
    for name in ("hidden", "head"):
      layer = getattr(self, name)
      layer.kernel[...] = jnp.asarray(w[name][0])
      layer.bias[...] = jnp.asarray(w[name][1])

  def __call__(self, x):
    return self.head(nnx.relu(self.hidden(x)))


def _nnx_quant_state(model):
  out = {}
  for name in ("hidden", "head"):
    layer = getattr(model, name)
    for role, q in (("kernel", layer.kernel_quant), ("input", layer.input_quant)):
      for attr in ("log_scale", "offset"):
        v = getattr(q, attr, None)
        if v is not None:
          out[f"{name}/{role}/{attr}"] = np.asarray(v[...])
  return out


def _run_nnx(w, x, y, rules):
  model = _NnxMLP(w)
  qnnx.quantize(model, rules)
  qnnx.calibrate(model, [x[:32], x[32:]])
  # Forward and gradient jitted (one compile each rather than one per eager op).
  fwd = nnx.jit(lambda m: m(x))  # before and after training: one compile
  out0 = np.asarray(fwd(model))
  grads = nnx.jit(nnx.grad(lambda m: _loss(m(x), y)))(model)
  g = {f"{n}/kernel": np.asarray(getattr(grads, n).kernel[...]) for n in ("hidden", "head")}
  opt = nnx.Optimizer(model, qnnx.qat_optimizer(model, optax.sgd(LR), optax.sgd(QLR)),
                      wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), y))(model)
    opt.update(model, grads)
    return loss

  for _ in range(STEPS):
    step(model, opt)
  trained = {f"{n}/kernel": np.asarray(getattr(model, n).kernel[...]) for n in ("hidden", "head")}
  trained.update(_nnx_quant_state(model))
  return out0, g, trained, np.asarray(fwd(model))


# ---------------------------------------------------------------- Linen


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="head")(nn.relu(nn.Dense(32, name="hidden")(x)))


def _linen_quant_state(qp):
  out = {}
  for name in ("hidden", "head"):
    for role, key in (("kernel", "kernel"), ("input", "input")):
      for attr in ("log_scale", "offset"):
        v = qp.get(name, {}).get(key, {}).get(attr)
        if v is not None:
          out[f"{name}/{role}/{attr}"] = np.asarray(v)
  return out


def _run_linen(w, x, y, rules):
  qmodel = ql.quantize(_LinenMLP(), rules)
  variables = qmodel.init(jax.random.key(0), x)
  variables = {**variables, "params": {n: {"kernel": jnp.asarray(w[n][0]),
                                           "bias": jnp.asarray(w[n][1])} for n in w}}
  variables = ql.calibrate(qmodel, variables, [x[:32], x[32:]])
  out0 = np.asarray(qmodel.apply(variables, x))
  trainable = {k: variables[k] for k in ("params", "quant_params") if k in variables}
  rest = {k: v for k, v in variables.items() if k not in trainable}

  def loss_fn(t):
    return _loss(qmodel.apply({**rest, **t}, x), y)

  grads = jax.grad(loss_fn)(trainable)
  g = {f"{n}/kernel": np.asarray(grads["params"][n]["kernel"]) for n in ("hidden", "head")}
  tx = ql.qat_optimizer(qmodel, optax.sgd(LR), optax.sgd(QLR))
  opt_state = tx.init(trainable)

  @jax.jit
  def step(t, s):
    grads = jax.grad(loss_fn)(t)
    updates, s = tx.update(grads, s, t)
    return optax.apply_updates(t, updates), s

  for _ in range(STEPS):
    trainable, opt_state = step(trainable, opt_state)
  trained = {f"{n}/kernel": np.asarray(trainable["params"][n]["kernel"]) for n in ("hidden", "head")}
  trained.update(_linen_quant_state(trainable.get("quant_params", {})))
  return out0, g, trained, np.asarray(qmodel.apply({**rest, **trainable}, x))


# ---------------------------------------------------------------- Keras


def _keras_quant_state(model):
  out = {}
  for name in ("hidden", "head"):
    layer = model.get_layer(name)
    for role, q in (("kernel", layer.kernel_quantizer), ("input", layer.input_quantizer)):
      for attr in ("log_scale", "offset"):
        v = getattr(q, attr, None)
        if v is not None:
          out[f"{name}/{role}/{attr}"] = keras.ops.convert_to_numpy(v.value)
  return out


def _run_keras(w, x, y, rules):
  keras.utils.set_random_seed(0)
  inp = keras.Input((16,))
  h = keras.layers.Dense(32, activation="relu", name="hidden")(inp)
  model = keras.Model(inp, keras.layers.Dense(4, name="head")(h))
  for n in ("hidden", "head"):
    model.get_layer(n).set_weights(list(w[n]))
  q = jqk.quantize(model, rules)
  jqk.calibrate(q, x, batch_size=32)
  out0 = keras.ops.convert_to_numpy(q(x))
  # Gradients of the same loss, through Keras' stateless call.
  tv = [v.value for v in q.trainable_variables]
  ntv = [v.value for v in q.non_trainable_variables]

  def loss_fn(tv):
    logits, _ = q.stateless_call(tv, ntv, x, training=True)
    return _loss(logits, y)

  gl = jax.grad(loss_fn)(tv)
  by_path = {v.path: g for v, g in zip(q.trainable_variables, gl)}
  g = {f"{n}/kernel": np.asarray(by_path[q.get_layer(n).kernel.path]) for n in ("hidden", "head")}
  q.compile(optimizer=jqk.qat_optimizer(q, keras.optimizers.SGD(LR), keras.optimizers.SGD(QLR)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  q.fit(x, y, batch_size=64, epochs=STEPS, shuffle=False, verbose=0)
  trained = {f"{n}/kernel": keras.ops.convert_to_numpy(q.get_layer(n).kernel.value)
             for n in ("hidden", "head")}
  trained.update(_keras_quant_state(q))
  return out0, g, trained, keras.ops.convert_to_numpy(q(x))


@pytest.mark.parametrize("name", sorted(RULES))
def test_nnx_linen_keras_agree(name):
  w, x, y = _data()
  rules = RULES[name]
  results = {"nnx": _run_nnx(w, x, y, rules), "linen": _run_linen(w, x, y, rules),
             "keras": _run_keras(w, x, y, rules)}
  ref_out, ref_g, ref_trained, ref_final = results["nnx"]
  assert set(ref_trained) >= {"hidden/kernel", "head/kernel"}
  if name == "w4a8_lsq":  # quantizer state is compared too
    assert {"hidden/kernel/log_scale", "hidden/input/log_scale", "hidden/input/offset"} <= set(
        ref_trained)
  for fe in ("linen", "keras"):
    out, g, trained, final = results[fe]
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5, err_msg=f"{fe}: outputs")
    for k in ref_g:
      np.testing.assert_allclose(g[k], ref_g[k], rtol=1e-4, atol=1e-6, err_msg=f"{fe}: grad {k}")
    assert set(trained) == set(ref_trained), fe
    for k in ref_trained:
      np.testing.assert_allclose(trained[k], np.reshape(ref_trained[k], np.shape(trained[k])),
                                 rtol=1e-4, atol=1e-5, err_msg=f"{fe}: trained {k}")
    np.testing.assert_allclose(final, ref_final, rtol=1e-4, atol=1e-4,
                               err_msg=f"{fe}: outputs after training")
  # Training changed something: the comparison is not between untouched models.
  w0 = w["hidden"][0]
  assert np.abs(ref_trained["hidden/kernel"] - w0).max() > 1e-4


# ---------------------------------------------------------------- recurrent cells

# Keras's fused kernels by gate (columns) against Flax's per-gate Dense layers:
# (Keras gate, Flax input Dense, Flax hidden Dense).
_GATES = {"lstm": [("i", "ii", "hi"), ("f", "if", "hf"), ("c", "ig", "hg"), ("o", "io", "ho")],
          "gru": [("z", "iz", "hz"), ("r", "ir", "hr"), ("h", "in", "hn")]}


@pytest.mark.parametrize("kind", sorted(_GATES))
def test_keras_recurrent_cells_equal_linen_rnn_cells(kind):
  """A Keras LSTM/GRU and Flax's nn.RNN of the same cell, quantized with the default W8A8 rules
  and calibrated on the same sequences: the same input and state ranges, outputs and kernel
  gradients (Flax's per-gate Dense layers each calibrate on the same x_t or h_{t-1})."""
  t, f, u = 6, 5, 8
  n = len(_GATES[kind])
  rng = np.random.default_rng(3)
  x = rng.normal(size=(16, t, f)).astype("float32")
  kern = rng.normal(size=(f, n * u)).astype("float32") * 0.4
  rec = rng.normal(size=(u, n * u)).astype("float32") * 0.4
  bias = rng.normal(size=(n * u,)).astype("float32") * 0.1
  inp = keras.Input((t, f))
  if kind == "lstm":
    layer = keras.layers.LSTM(u, return_sequences=True, name="rnn")
    weights = [kern, rec, bias]
  else:  # reset_after: input biases, recurrent biases zero (Flax's hn bias is zero below)
    layer = keras.layers.GRU(u, return_sequences=True, name="rnn")
    weights = [kern, rec, np.stack([bias, np.zeros_like(bias)])]
  model = keras.Model(inp, layer(inp))
  model.get_layer("rnn").set_weights(weights)
  q = jqk.calibrate(jqk.quantize(model), x, batch_size=len(x))
  cell = q.get_layer("rnn").cell

  flax_cell = {"lstm": lambda: nn.LSTMCell(u), "gru": lambda: nn.GRUCell(u)}[kind]
  lin = ql.quantize(nn.RNN(flax_cell()))
  params = {}
  for g, (_, i_name, h_name) in enumerate(_GATES[kind]):
    cols = slice(g * u, (g + 1) * u)
    params[i_name] = {"kernel": jnp.asarray(kern[:, cols])}
    params[h_name] = {"kernel": jnp.asarray(rec[:, cols])}
    if kind == "lstm":
      params[h_name]["bias"] = jnp.asarray(bias[cols])
    else:
      params[i_name]["bias"] = jnp.asarray(bias[cols])
      if h_name == "hn":
        params[h_name]["bias"] = jnp.zeros(u)
  v = lin.init(jax.random.key(0), x)
  v = ql.calibrate(lin, {**v, "params": {"cell": params}}, [x])
  stats = v["quant_stats"]["cell"]
  for role, name in (("input", 1), ("state", 2)):
    q_k = cell.input_quantizer if role == "input" else cell.state_quantizer
    for _, *names in _GATES[kind]:
      np.testing.assert_allclose(float(stats[names[name - 1]]["input"]["scale"]),
                                 float(q_k.scale.numpy()), rtol=1e-6, err_msg=role)

  y_keras = np.asarray(q(x))
  y_linen = np.asarray(lin.apply(v, x))
  np.testing.assert_allclose(y_keras, y_linen, rtol=0, atol=2e-6)
  assert np.abs(y_keras - np.asarray(model(x))).max() > 1e-3  # quantized

  # Kernel gradients of the same loss.
  tv = [t_.value for t_ in q.trainable_variables]
  ntv = [t_.value for t_ in q.non_trainable_variables]
  gk = jax.grad(lambda tv: (q.stateless_call(tv, ntv, x, training=True)[0] ** 2).sum())(tv)
  by_path = {t_.path: g for t_, g in zip(q.trainable_variables, gk)}
  gl = jax.grad(lambda p: (lin.apply({**v, "params": p}, x) ** 2).sum())(v["params"])["cell"]
  for attr, side in (("kernel", 1), ("recurrent_kernel", 2)):
    flat = np.concatenate([np.asarray(gl[names[side - 1]]["kernel"])
                           for _, *names in _GATES[kind]], axis=1)
    np.testing.assert_allclose(np.asarray(by_path[getattr(cell, attr).path]), flat,
                               rtol=1e-4, atol=1e-5, err_msg=attr)


def test_keras_conv_lstm_equals_linen_conv_lstm_cell():
  """ConvLSTM1D against Flax's nn.RNN(nn.ConvLSTMCell): Flax orders the gates i, g, f, o and
  adds 1 to the forget gate; with the weights mapped, the quantized models agree."""
  t, w, c, fi = 5, 7, 3, 4
  rng = np.random.default_rng(4)
  x = rng.normal(size=(8, t, w, c)).astype("float32")
  kern = rng.normal(size=(3, c, 4 * fi)).astype("float32") * 0.4
  rec = rng.normal(size=(3, fi, 4 * fi)).astype("float32") * 0.4
  bias = rng.normal(size=(4 * fi,)).astype("float32") * 0.1
  inp = keras.Input((t, w, c))
  model = keras.Model(inp, keras.layers.ConvLSTM1D(fi, 3, padding="same", return_sequences=True,
                                                   name="c")(inp))
  model.get_layer("c").set_weights([kern, rec, bias])
  q = jqk.calibrate(jqk.quantize(model), x, batch_size=len(x))
  assert type(q.get_layer("c").cell).__name__ == "QuantConvLSTMCell"
  perm = np.concatenate([np.arange(0, fi), np.arange(2 * fi, 3 * fi), np.arange(fi, 2 * fi),
                         np.arange(3 * fi, 4 * fi)])  # Keras i, f, c, o -> Flax i, g, f, o
  flax_bias = bias[perm].copy()
  flax_bias[2 * fi:3 * fi] -= 1.0
  lin = ql.quantize(nn.RNN(nn.ConvLSTMCell(fi, kernel_size=(3,))))
  v = lin.init(jax.random.key(0), x)
  params = {"ih": {"kernel": jnp.asarray(kern[..., perm]), "bias": jnp.asarray(flax_bias)},
            "hh": {"kernel": jnp.asarray(rec[..., perm]), "bias": jnp.zeros(4 * fi)}}
  v = ql.calibrate(lin, {**v, "params": {"cell": params}}, [x])
  y_keras = np.asarray(q(x))
  np.testing.assert_allclose(y_keras, np.asarray(lin.apply(v, x)), rtol=0, atol=2e-6)
  assert np.abs(y_keras - np.asarray(model(x))).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(jqk.convert(q)(x)), y_keras)
