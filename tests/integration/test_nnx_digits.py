"""Digits (8x8) CNN in plain Flax NNX: float, W8A8 PTQ, W4A4 PTQ and LSQ QAT.

The model is written without jaxqat in mind and converted with
``jaxqat.flax.nnx.quantize``. Seeds are fixed; the printed numbers are the
ones asserted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxqat.core import IntFormat
from jaxqat.core import PerChannel
from jaxqat.core import PerTensor
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx

pytestmark = pytest.mark.slow


class CNN(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.fc1 = nnx.Linear(4 * 4 * 16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.fc1(x))
    return self.fc2(x)


def _loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train(model, tx, x, y, steps, batch_size=128, seed=0):
  """Adam-style minibatch training with a jitted step; returns the last loss."""
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.RandomState(seed)
  order = np.concatenate([rng.permutation(len(y)) for _ in range(steps * batch_size // len(y) + 1)])

  @nnx.jit
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes int32 and float
      opt.update(model, grads)
    return loss

  for i in range(steps):
    idx = order[i * batch_size:(i + 1) * batch_size]
    loss = step(model, opt, x[idx], y[idx])
  return float(loss)


@nnx.jit
def _logits(model, x):
  return model(x)


def _accuracy(model, x, y) -> float:
  logits = _logits(model, x)
  return 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == y))


@pytest.fixture(scope="module")
def data():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  perm = np.random.RandomState(0).permutation(len(d.target))  # fixed shuffled split
  x = (d.images / 16.0).astype(np.float32)[perm, ..., None]
  y = d.target.astype(np.int32)[perm]
  return (jnp.asarray(x[:1400]), jnp.asarray(y[:1400]), jnp.asarray(x[1400:]),
          jnp.asarray(y[1400:]))


@pytest.fixture(scope="module")
def float_model(data):
  xtr, ytr, xte, yte = data
  model = CNN(nnx.Rngs(0))
  _train(model, optax.adam(1e-2), xtr, ytr, steps=300)
  acc = _accuracy(model, xte, yte)
  print(f"\nfloat accuracy: {acc:.2f}%")
  return model, acc


def _low_bit_rules(bits, learning_w, learning_a):
  """First and last layer W8A8; the others ``bits``-bit weights and inputs.

  The low-bit layers use a hardware-friendly all-symmetric scheme: per-tensor
  weights and signed per-tensor inputs, both absmax-calibrated, the same for
  PTQ and QAT.
  """
  w8 = QuantSpec(format=IntFormat(bits=8, narrow=True), granularity=PerChannel(-1))
  a8 = QuantSpec(format="int8", symmetric=False, calibration="minmax")
  wq = QuantSpec(format=IntFormat(bits=bits, narrow=True), granularity=PerTensor(),
                 calibration="absmax", learning=learning_w)
  aq = QuantSpec(format=IntFormat(bits=bits), calibration="absmax", learning=learning_a)
  return [Rule(pattern="conv1|fc2", weight=w8, act=a8), Rule(pattern=".*", weight=wq, act=aq)]


def _ptq_and_qat(data, model, bits):
  xtr, ytr, xte, yte = data
  calib = [xtr[i:i + 200] for i in range(0, 600, 200)]
  ptq = qnnx.quantize(nnx.clone(model), _low_bit_rules(bits, "fixed", "fixed"))
  qnnx.calibrate(ptq, calib)
  ptq_acc = _accuracy(ptq, xte, yte)
  qat = qnnx.quantize(nnx.clone(model), _low_bit_rules(bits, "lsq", "lsq"))
  qnnx.calibrate(qat, calib)  # LSQ step sizes and LSQ+ offsets start from calibration
  init_acc = _accuracy(qat, xte, yte)
  log_scale0 = qat.fc1.kernel_quant.log_scale[...]
  tx = qnnx.qat_optimizer(qat, optax.adam(1e-3), optax.adam(1e-3))
  _train(qat, tx, xtr, ytr, steps=100)
  qat_acc = _accuracy(qat, xte, yte)
  moved = float(jnp.max(jnp.abs(qat.fc1.kernel_quant.log_scale[...] - log_scale0)))
  return ptq_acc, init_acc, qat_acc, moved


def test_float_accuracy(float_model):
  _, acc = float_model
  assert acc >= 97.0


def test_w8a8_ptq_within_half_point(data, float_model):
  xtr, _, xte, yte = data
  model, float_acc = float_model
  q = qnnx.quantize(nnx.clone(model))  # default rules: W8A8
  qnnx.calibrate(q, [xtr[i:i + 200] for i in range(0, 600, 200)])
  acc = _accuracy(q, xte, yte)
  print(f"\nW8A8 PTQ accuracy: {acc:.2f}% (float {float_acc:.2f}%)")
  assert acc >= float_acc - 0.5
  # The converted model computes with the float model's weights.
  np.testing.assert_array_equal(q.fc1.kernel[...], model.fc1.kernel[...])


def test_w4a4_lsq_qat_within_one_point(data, float_model):
  model, float_acc = float_model
  ptq_acc, init_acc, qat_acc, moved = _ptq_and_qat(data, model, bits=4)
  print(f"\nW4A4 PTQ {ptq_acc:.2f}%, LSQ init {init_acc:.2f}%, after QAT {qat_acc:.2f}% "
        f"(float {float_acc:.2f}%)")
  assert init_acc == ptq_acc  # LSQ starts exactly where PTQ ends
  assert moved > 1e-3  # the step sizes were trained
  assert qat_acc >= float_acc - 1.0
  # Measured: float 98.99%, W4A4 PTQ 98.24%, QAT 98.99% (397 test digits, 0.25 points each).
  assert qat_acc >= ptq_acc + 0.5

