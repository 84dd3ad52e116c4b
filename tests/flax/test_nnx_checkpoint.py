"""Orbax checkpoints of quantized NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqat.core import PerChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx


class Net(nnx.Module):

  def __init__(self, seed=0, with_head=True):
    rngs = nnx.Rngs(seed)
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs) if with_head else nnx.data(None)

  def __call__(self, x):
    h = nnx.relu(self.conv(x)).mean(axis=(1, 2))
    return self.head(h) if self.head is not None else h


W = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
A = QuantSpec(format="int8", symmetric=False, calibration="minmax", learning="lsq_plus")
RULES = [Rule(pattern=".*", weight=W, act=A)]
X = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))


@pytest.fixture
def saved(tmp_path):
  model = qnnx.calibrate(qnnx.quantize(Net(0), RULES), [X])
  model.head.kernel_quant.scale[...] *= 1.1  # state that only the checkpoint knows
  path = tmp_path / "ckpt"
  qnnx.save_checkpoint(path, model)
  return path, model


def test_round_trip_is_bit_identical(saved):
  path, model = saved
  fresh = qnnx.quantize(Net(1), RULES)  # other weights, not calibrated
  assert fresh.conv.input_quant.mode == "calibrate"
  restored = qnnx.restore_checkpoint(path, fresh)
  assert restored.conv.input_quant.mode == "quant" and restored.conv.input_quant.frozen
  np.testing.assert_array_equal(restored(X), model(X))
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(restored)),
                            nnx.to_flat_state(nnx.state(model))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))


def test_different_spec_shape_names_the_entry(saved):
  path, _ = saved
  per_tensor = [Rule(pattern=".*", weight=W.replace(granularity=QuantSpec().granularity),
                     act=A)]
  with pytest.raises(ValueError, match=r"entry 'conv/kernel_quant/scale': checkpoint has shape "
                                       r"\(1, 1, 1, 4\)"):
    qnnx.restore_checkpoint(path, qnnx.quantize(Net(0), per_tensor))


def test_different_spec_same_shapes_names_the_quantizer(saved):
  path, _ = saved
  int8 = [Rule(pattern=".*", weight=W.replace(format="int8"), act=A)]
  with pytest.raises(ValueError, match=r"quantizer 'head/kernel_quant': checkpoint spec"):
    qnnx.restore_checkpoint(path, qnnx.quantize(Net(0), int8))


def test_missing_layer_names_the_entries(saved):
  path, _ = saved
  with pytest.raises(ValueError, match=r"entries missing from the model: \['head/bias'"):
    qnnx.restore_checkpoint(path, qnnx.quantize(Net(0, with_head=False), RULES))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    qnnx.restore_checkpoint(path.parent / "nope", qnnx.quantize(Net(0), RULES))
