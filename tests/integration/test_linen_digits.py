"""End to end on sklearn's digits: float CNN, W8A8 PTQ, W4A4 PTQ vs W4A4 LSQ QAT (Linen).

The model is plain Linen, written without jaxqat in mind; jaxqat.flax.linen
quantizes it without touching its code.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxqat.core import IntFormat, PerChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def _data():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train(apply, trainable, tx, x, y, epochs, batch=50, seed=0):
  """Plain optax loop; ``apply(trainable, x) -> logits``. One jitted epoch (lax.scan)."""
  n = (len(x) // batch) * batch

  def step(carry, idx):
    t, s = carry
    g = jax.grad(lambda t: _loss(apply(t, x[idx]), y[idx]))(t)
    u, s = tx.update(g, s, t)
    return (optax.apply_updates(t, u), s), None

  @jax.jit
  def epoch(t, s, key):
    perm = jax.random.permutation(key, len(x))[:n].reshape(-1, batch)
    return jax.lax.scan(step, (t, s), perm)[0]

  state = tx.init(trainable)
  # optax's Adam computes `decay ** count` (float ** int32), which the suite's strict
  # dtype promotion rejects; the optimizer runs under standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    for k in jax.random.split(jax.random.key(seed), epochs):
      trainable, state = epoch(trainable, state, k)
  return trainable


def _accuracy(apply, variables, x, y):
  return float((jnp.argmax(jax.jit(apply)(variables, x), -1) == y).mean()) * 100


def _rules(bits, learning):
  """W{bits}A{bits}; the first conv and the classifier stay at 8 bits."""

  def specs(b):
    w = QuantSpec(format=IntFormat(bits=b, signed=True, narrow=True), granularity=PerChannel(-1),
                  learning=learning, calibration="absmax")
    a = QuantSpec(format=IntFormat(bits=b, signed=False), learning=learning,
                  calibration="absmax")  # inputs are pixels in [0, 1] or ReLU outputs
    return w, a

  w8, a8 = specs(8)
  wb, ab = specs(bits)
  return [Rule(pattern="Conv_0|Dense_1", weight=w8, act=a8), Rule(pattern=".*", weight=wb, act=ab)]


@functools.lru_cache(maxsize=None)
def _float_model():
  (xtr, ytr), (xte, yte) = _data()
  model = CNN()
  params = jax.jit(model.init)(jax.random.key(0), xtr[:1])["params"]
  params = _train(lambda p, x: model.apply({"params": p}, x), params, optax.adam(3e-3),
                  jnp.asarray(xtr), jnp.asarray(ytr), epochs=20)
  acc = _accuracy(lambda v, x: model.apply(v, x), {"params": params}, xte, yte)
  return model, params, acc


def _ptq(rules, params):
  (xtr, _), (xte, yte) = _data()
  qmodel = ql.quantize(CNN(), rules)
  v = jax.jit(qmodel.init)(jax.random.key(0), xtr[:1])
  v = {**v, "params": params}  # the float checkpoint loads unchanged
  v = ql.calibrate(qmodel, v, [xtr[i:i + 200] for i in range(0, 600, 200)])
  v = ql.freeze(qmodel, v, xtr[:200])
  return qmodel, v, _accuracy(qmodel.apply, v, xte, yte)


@pytest.mark.slow
def test_float_and_w8a8_ptq():
  _, params, acc_float = _float_model()
  _, _, acc_w8 = _ptq(None, params)  # default rules: W8A8
  print(f"\ndigits (Linen): float {acc_float:.2f}%  W8A8 PTQ {acc_w8:.2f}%")
  assert acc_float >= 97.0
  assert acc_w8 >= acc_float - 0.5


@pytest.mark.slow
def test_w4a4_lsq_qat_recovers_float_accuracy():
  (xtr, ytr), _ = _data()
  _, params, acc_float = _float_model()
  _, _, acc_ptq = _ptq(_rules(4, "fixed"), params)
  qmodel, v, acc_init = _ptq(_rules(4, "lsq"), params)  # LSQ step sizes start from calibration
  trainable = {"params": v["params"], "quant_params": v["quant_params"]}
  tx = ql.qat_optimizer(optax.adam(1e-3), optax.adam(1e-3))
  trainable = _train(lambda t, x: qmodel.apply({**v, **t}, x), trainable, tx, jnp.asarray(xtr),
                     jnp.asarray(ytr), epochs=4, seed=1)
  (_, _), (xte, yte) = _data()
  acc_qat = _accuracy(qmodel.apply, {**v, **trainable}, xte, yte)
  print(f"\ndigits (Linen): float {acc_float:.2f}%  W4A4 PTQ {acc_ptq:.2f}%  "
        f"W4A4 LSQ before QAT {acc_init:.2f}%  after QAT {acc_qat:.2f}%")
  assert acc_qat >= acc_float - 1.0
  assert acc_qat >= acc_ptq + 2.0
