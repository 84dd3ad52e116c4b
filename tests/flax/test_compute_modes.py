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
                     "arithmetic: the weight's scales vary along a contracted axis"):
    # attend contracts the features: one scale per feature cannot take the integer path
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


class _TiedN(nnx.Module):
  def __init__(self):
    self.emb = nnx.Embed(11, 8, rngs=nnx.Rngs(0))
    self.fc = nnx.Linear(8, 8, rngs=nnx.Rngs(1))

  def __call__(self, ids):
    return self.emb.attend(jax.nn.relu(self.fc(self.emb(ids))))


class _TiedL(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 8, name="emb")
    return emb.attend(jax.nn.relu(nn.Dense(8, name="fc")(emb(ids))))


@pytest.mark.parametrize("front", ["nnx", "linen"])
def test_tied_head_attend_integer_forward(front):
  """Embed.attend (a tied LM head, query @ embedding.T): "fake" runs on the fake-quantized
  operands (bit for bit), "integer" runs core.qat_op, an int8 x int8 -> int32 dot with one scale
  per row (per logit) and the same gradients; the served model's integer head gives the
  integer QAT values."""
  ids = jnp.array([[1, 2, 3, 9], [4, 0, 7, 7]])
  wspec = QuantSpec(format="int8", granularity=core.PerOutputChannel())
  aspec = QuantSpec(format="int8", learning="lsq")
  r = jax.random.normal(jax.random.key(3), (2, 4, 11))
  out = {}
  for compute in ("fake", "integer"):
    rules = [Rule(pattern=".*", weight=wspec, act=aspec, compute=compute)]
    if front == "nnx":
      q = qnnx.calibrate(qnnx.quantize(_TiedN(), rules), [ids])
      fwd = q
      y, g = nnx.value_and_grad(lambda m: jnp.sum(m(ids) * r))(q)
      g = g["emb"]
      served = qnnx.convert(q)(ids)
      if compute == "fake":  # the float head on the fake-quantized operands, bit for bit
        query = jax.nn.relu(q.fc(q.emb(ids)))
        table = q.emb.embedding[...]
        tq = core.quant_dequant(table, wspec.resolve_output_channel((0,)),
                                jnp.max(jnp.abs(table), axis=1, keepdims=True) / 127)
        spec_x, s_x, _, _ = q.emb.input_quant.ranges(query)
        np.testing.assert_array_equal(
            np.asarray(y), np.asarray(jnp.sum(jnp.dot(core.quant_dequant(query, spec_x, s_x),
                                                      tq.T) * r)))
    else:
      q = ql.quantize(_TiedL(), rules)
      v = ql.calibrate(q, q.init(jax.random.key(0), ids), [ids])
      fwd = lambda ids, q=q, v=v: q.apply(v, ids)  # noqa: E731
      y, g = jax.value_and_grad(lambda p: jnp.sum(q.apply({**v, "params": p}, ids) * r))(
          v["params"])
      g = g["emb"]
      served_m, sv = ql.convert(q, v)
      served = served_m.apply(sv, ids)
    out[compute] = (fwd(ids), g, str(jax.make_jaxpr(fwd)(ids)), served)
  (yf, gf, jf, _), (yi, gi, ji, served_i) = out["fake"], out["integer"]
  assert ji.count("preferred_element_type=int32") == 2 and not _int_dots(jf)  # fc and the head
  _close(yi, yf, rtol=1e-5)
  _close(gi, gf, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(served_i), np.asarray(yi))


class _CustomTied(nn.Module):
  """A tied embedder written by hand: one parameter, looked up, then read transposed."""

  @nn.compact
  def __call__(self, ids):
    table = self.param("table", nn.initializers.normal(1.0), (12, 6))
    return jax.nn.relu(table[ids]) @ table.T


def test_linen_looked_up_table_takes_the_core_op_for_the_integer_forward_only(qat_op_calls):
  """As in NNX: a table the run also looked up keeps its fake-quantized copy in "fake"; a
  weight read transposed otherwise (and in "integer") runs core.qat_op."""
  ids = jnp.array([[1, 5, 11], [0, 2, 2]])
  calls = qat_op_calls
  out = {}
  for compute in ("fake", "integer"):
    q = ql.quantize(_CustomTied(), [Rule(pattern=".*", weight=core.default_weight_spec(),
                                          act=core.default_act_spec(), compute=compute)])
    v = ql.calibrate(q, q.init(jax.random.key(0), ids), [ids])
    calls.clear()
    out[compute] = q.apply(v, ids)
    assert calls == ([] if compute == "fake" else ["integer"])
  _close(out["integer"], out["fake"], rtol=1e-5)


class _AtOp(nn.Module):
  """A third-party layer written with the ``@`` operator (or jnp.matmul) on its own weight."""
  how: str

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (6, 4))
    return x @ w if self.how == "at" else jnp.matmul(x, w)


def test_linen_matmul_operator_is_quantized_as_jnp_matmul():
  """``x @ w`` reaches jnp's matmul through Array.__matmul__, not the public jnp.matmul: it is
  intercepted too (before, such a weight silently stayed float in the matmul)."""
  x = jax.random.normal(jax.random.key(1), (5, 6))
  out = {}
  for how in ("at", "matmul"):
    q = ql.quantize(_AtOp(how), [Rule(pattern=".*", weight=W, act=A)])
    v = ql.calibrate(q, q.init(jax.random.key(0), x), [x])
    assert ql.report(q, v).quantized_paths() == [""]
    out[how] = q.apply(v, x)
  np.testing.assert_array_equal(np.asarray(out["at"]), np.asarray(out["matmul"]))
  float_y = _AtOp("at").apply({"params": v["params"]}, x)
  assert float(jnp.max(jnp.abs(out["at"] - float_y))) > 1e-4  # quantized, not the float matmul
