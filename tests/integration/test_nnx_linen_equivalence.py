"""NNX and Linen front ends compute the same thing for the same weights and specs.

One small CNN written twice (Linen and NNX), the Linen params copied into the
NNX model, both converted with the same rules and calibrated on the same
batch: the fake-quantized outputs agree to 1e-6.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqat.core import IntFormat, PerChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql
from jaxqat.flax import nnx as qnnx


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.Conv_0 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.Dense_0 = nnx.Linear(6 * 6 * 4, 8, rngs=rngs)
    self.Dense_1 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.Conv_0(x))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.Dense_0(x))
    return self.Dense_1(x)


def _lsq_rules():
  w4 = QuantSpec(format=IntFormat(bits=4, signed=True, narrow=True), granularity=PerChannel(-1),
                 learning="lsq")
  a8 = QuantSpec(format="int8", symmetric=False, calibration="minmax", learning="lsq_plus")
  a4 = QuantSpec(format="uint4", symmetric=False, calibration="minmax", learning="lsq_plus")
  return [Rule(pattern="Conv_0", weight=w4.replace(format="int8"), act=a8),
          Rule(pattern=".*", weight=w4, act=a4)]


RULES = {  # the default W8A8 scheme is held equal across NNX, Linen and Keras elsewhere
    "w4a4_lsq": _lsq_rules(),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_nnx_and_linen_agree(name):
  rules = RULES[name]
  x = jax.random.uniform(jax.random.key(1), (8, 6, 6, 2), minval=-0.5, maxval=1.5)
  qlinen = ql.quantize(LinenNet(), rules)
  v = jax.jit(qlinen.init)(jax.random.key(0), x)
  v = ql.calibrate(qlinen, v, [x])

  model = NNXNet(nnx.Rngs(0))
  for layer in ("Conv_0", "Dense_0", "Dense_1"):  # copy the Linen weights
    for p in ("kernel", "bias"):
      getattr(getattr(model, layer), p)[...] = v["params"][layer][p]
  float_out = model(x)
  np.testing.assert_allclose(float_out, LinenNet().apply({"params": v["params"]}, x), atol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    qnnx.quantize(model, rules)
  qnnx.calibrate(model, [x])

  y_linen, y_nnx = jax.jit(qlinen.apply)(v, x), nnx.jit(lambda m: m(x))(model)
  assert float(jnp.abs(y_linen - float_out).max()) > 1e-4  # quantization did something
  np.testing.assert_allclose(y_linen, y_nnx, atol=1e-6, rtol=0)
