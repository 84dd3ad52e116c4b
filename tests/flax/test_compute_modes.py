"""Compute modes of the Flax front ends (Rule.compute): "integer" vs "fake" in NNX and Linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqat import core
from jaxqat.core import PerBlock, PerChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql
from jaxqat.flax import nnx as qnnx
from jaxqat.flax.nnx import _layers

W = QuantSpec(format="int8", granularity=PerChannel(-1))
A = QuantSpec(format="int8", symmetric=False)
WL = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
AL = QuantSpec(format="uint4", symmetric=False, learning="lsq_plus")


def _int_dots(jaxpr_text: str) -> bool:
  return "i8[" in jaxpr_text and "preferred_element_type=int32" in jaxpr_text


def _close(a, b, rtol=1e-5, flips=0.0):
  """Equal up to float summation order (the integer_error_bound, loosely, in relative terms).

  ``flips``: the fraction of gradient elements allowed to differ: a forward
  value that moves by a rounding error across a clipping boundary or a
  4-bit rounding threshold of the next layer changes that layer's STE mask
  or code, as any float reordering may.
  """
  bad = total = 0
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    u, v = np.asarray(u), np.asarray(v)
    ok = np.isclose(u, v, rtol=rtol, atol=rtol * max(1e-6, float(np.abs(v).max())))
    bad, total = bad + int((~ok).sum()), total + ok.size
  assert bad <= flips * total, f"{bad} of {total} elements differ"


class _Net(nnx.Module):
  """A 1-D conv and a two-layer MLP head."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3,), rngs=rngs)
    self.fc1 = nnx.Linear(8 * 6, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
    return self.fc2(jax.nn.relu(self.fc1(h)))


def _nnx_net(compute, wspec, aspec, x):
  # Through the public path: quantize passes Rule.compute to each layer.
  net = qnnx.quantize(_Net(nnx.Rngs(0)), [Rule(pattern=".*", weight=wspec, act=aspec,
                                               compute=compute)])
  assert {net.conv.jaxqat_compute, net.fc1.jaxqat_compute, net.fc2.jaxqat_compute} == {compute}
  return qnnx.calibrate(net, [x])


@pytest.mark.parametrize("wspec,aspec", [(W, A), (WL, AL)], ids=["w8a8", "w4a4_lsq"])
def test_nnx_integer_forward_matches_fake_and_gradients_equal(wspec, aspec):
  x = jax.random.normal(jax.random.key(1), (4, 6, 3))
  nets = {c: _nnx_net(c, wspec, aspec, x) for c in ("fake", "integer")}

  def run(net):  # one compile: output, loss and gradients
    gd, state = nnx.split(net)

    def f(st):
      y = nnx.merge(gd, st)(x)
      return jnp.sum(y), y

    return jax.jit(jax.value_and_grad(f, has_aux=True))(state)

  ((l_f, y_f), g_f), ((l_i, y_i), g_i) = run(nets["fake"]), run(nets["integer"])
  _close(y_i, y_f)
  _close(g_i, g_f, flips=0.0 if wspec.learning == "fixed" else 0.02)
  assert abs(float(l_i) - float(l_f)) <= 1e-5 * abs(float(l_f))
  if wspec.learning == "lsq":  # the step sizes learn in both modes
    assert float(jnp.abs(g_i["fc1"]["kernel_quant"]["log_scale"][...]).sum()) > 0
  assert _int_dots(str(jax.make_jaxpr(nets["integer"])(x)))
  assert not _int_dots(str(jax.make_jaxpr(nets["fake"])(x)))


def test_nnx_integer_refused_with_the_layer_and_reason():
  lin = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="layer 'head': compute='integer' cannot run this layer in "
                     "integer arithmetic: the weight format fp8_e4m3 is not an integer format"):
    _layers.QuantLinear.from_float(lin, QuantSpec(format="fp8_e4m3"), A, path="head",
                                   compute="integer")
  assert type(lin) is nnx.Linear  # untouched
  with pytest.raises(ValueError, match="'emb': compute='integer' cannot run this layer in integer "
                     "arithmetic: it computes with its own op"):
    _layers.QuantEmbed.from_float(nnx.Embed(5, 4, rngs=nnx.Rngs(0)), W, A, path="emb",
                                  compute="integer")
  with pytest.raises(ValueError, match="the input is quantized per channel"):
    _layers.QuantLinear.from_float(lin, W, A.replace(granularity=PerChannel(-1)), path="x",
                                   compute="integer")
  with pytest.raises(ValueError, match="compute: must be one of"):
    _layers.QuantLinear.from_float(lin, W, A, path="x", compute="int8")


class _LNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(nn.Conv(8, (3,), name="conv")(x)).reshape(x.shape[0], -1)
    h = jax.nn.relu(nn.Dense(16, name="fc1")(h))
    return nn.Dense(4, name="fc2")(h)


def test_linen_integer_forward_matches_fake_and_gradients_equal():
  """W8A8 (LSQ: in the NNX test and tests/core/test_qat_op.py; the numerics are the core's)."""
  wspec, aspec = W, A
  x = jax.random.normal(jax.random.key(2), (4, 6, 3))
  out = {}
  for compute in ("fake", "integer"):
    qm = ql.quantize(_LNet(), [Rule(pattern=".*", weight=wspec, act=aspec, compute=compute)])
    v = ql.calibrate(qm, qm.init(jax.random.key(0), x), [x])
    trainable = {"params": v["params"], "quant_params": v.get("quant_params", {})}
    rest = {k: val for k, val in v.items() if k not in trainable}

    def f(t, rest=rest, qm=qm):
      y = qm.apply({**rest, **t}, x)
      return jnp.sum(y), y

    (_, y), g = jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)
    out[compute] = (y, g, str(jax.make_jaxpr(lambda x, qm=qm, v=v: qm.apply(v, x))(x)))
  _close(out["integer"][0], out["fake"][0])
  _close(out["integer"][1], out["fake"][1])
  assert _int_dots(out["integer"][2]) and not _int_dots(out["fake"][2])


def test_linen_integer_refused_with_the_layer_and_reason():
  x = jnp.ones((2, 6, 3))
  qm = ql.quantize(_LNet(), [Rule(pattern=".*", weight=W.replace(granularity=PerBlock(8, 0)),
                                  act=A, compute="integer")])
  with pytest.raises(ValueError, match="conv.*compute='integer' cannot run this layer in integer "
                     "arithmetic: the weight is quantized per block"):
    qm.init(jax.random.key(0), x)
  qm = ql.quantize(_LNet(), [Rule(pattern=".*", weight=W, act=None, compute="integer")])
  with pytest.raises(ValueError, match="the input is not quantized"):
    qm.init(jax.random.key(0), x)
