"""A model not written for jaxqat converts with no edits and every weight matmul is quantized.

The model has nested submodules, a residual block, ``nnx.MultiHeadAttention``,
a custom module that calls ``jnp.einsum`` on its own parameter, a custom module
using ``@`` on a transposed parameter and ``lax.conv_general_dilated``, and a
stack of blocks created with ``nnx.vmap`` and applied with ``nnx.scan`` (the
pattern of the Flax "scan over layers" guide).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxqat.core import PerChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.core import QuantizationWarning
from jaxqat.flax import nnx as qnnx

pytestmark = pytest.mark.slow

D, L, HEADS = 8, 3, 2


class EinsumDense(nnx.Module):
  """Some other library's dense layer: its own parameter, jnp.einsum."""

  def __init__(self, din, dout, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)) / np.sqrt(din))
    self.b = nnx.Param(jnp.zeros((dout,)))

  def __call__(self, x):
    return jnp.einsum("...d,df->...f", x, self.w[...]) + self.b[...]


class TorchStyleDense(nnx.Module):
  """Weight stored (out, in) and used as ``x @ w.T``."""

  def __init__(self, din, dout, rngs):
    self.weight = nnx.Param(jax.random.normal(rngs.params(), (dout, din)) / np.sqrt(din))

  def __call__(self, x):
    return x @ self.weight[...].T


class Conv1x1(nnx.Module):
  """A pointwise convolution through lax.conv_general_dilated (NWC layout)."""

  def __init__(self, d, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (1, d, d)) / np.sqrt(d))

  def __call__(self, x):
    return jax.lax.conv_general_dilated(x, self.kernel[...], (1,), "SAME",
                                        dimension_numbers=("NWC", "WIO", "NWC"))


class Block(nnx.Module):
  """Residual MLP block; instances are stacked with nnx.vmap."""

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, 2 * D, rngs=rngs)
    self.down = EinsumDense(2 * D, D, rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.norm(x))))


class Encoder(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
    self.mix = Conv1x1(D, rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(rngs)

    self.blocks = make_blocks(rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    x = x + self.mix(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return forward(x, self.blocks)


class Model(nnx.Module):

  def __init__(self, rngs):
    self.embed = EinsumDense(4, D, rngs)
    self.encoder = Encoder(rngs)
    self.head = TorchStyleDense(D, 3, rngs)

  def __call__(self, x):
    return self.head(self.encoder(self.embed(x)).mean(axis=1))


# Matmuls with a weight operand: embed, query/key/value/out, mix (conv), up, down, head.
N_WEIGHT_MATMULS = 9
N_ATTENTION_MATMULS = 2  # q.k and p.v: activation x activation, left in float

_FQ = ("custom_vjp_call", "custom_vjp_call_jaxpr", "custom_jvp_call")
_LAYOUT = ("reshape", "transpose", "convert_element_type", "broadcast_in_dim", "squeeze",
           "expand_dims", "copy", "slice")


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(x, "eqns"):
        yield x
      elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr


def _has_matmul(eqn) -> bool:
  return any(e.primitive.name in ("dot_general", "conv_general_dilated") or _has_matmul(e)
             for j in _subjaxprs(eqn) for e in j.eqns)


def _is_fake_quant(eqn) -> bool:
  """A custom_vjp/custom_jvp call, possibly wrapped in jit (the core primitives are jitted).

  ``core.qat_op`` (a custom_vjp holding the fake quant and the matmul) is not one: the
  walk goes into it.
  """
  if _has_matmul(eqn):
    return False
  if eqn.primitive.name in _FQ:
    return True
  return eqn.primitive.name in ("jit", "pjit") and any(
      _is_fake_quant(e) for j in _subjaxprs(eqn) for e in j.eqns)


def _matmuls(jaxpr):
  """``[(primitive, lhs fake-quantized?, rhs fake-quantized?)]``, through nested jaxprs."""
  producer, out = {}, []
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      producer[v] = eqn
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      fed = []
      for v in eqn.invars[:2]:
        p = producer.get(v)
        while p is not None and p.primitive.name in _LAYOUT:
          p = producer.get(p.invars[0])
        fed.append(p is not None and _is_fake_quant(p))
      out.append((eqn.primitive.name, *fed))
    for sub in _subjaxprs(eqn):
      if not _is_fake_quant(eqn):
        out += _matmuls(sub)
  return out


def _w4a8_lsq_rules():
  w = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
  a = QuantSpec(format="int8", symmetric=False, calibration="minmax", learning="lsq_plus")
  return [Rule(pattern=r"nothing/matches/this", weight=w),
          Rule(pattern=".*", weight=w, act=a)]


@pytest.fixture(scope="module")
def converted():
  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 5, 4))
  y_float = nnx.jit(lambda m, x: m(x))(model, x)
  with pytest.warns(QuantizationWarning, match="nothing/matches/this"):
    model = qnnx.quantize(model, _w4a8_lsq_rules())
  qnnx.calibrate(model, [x])
  return model, qnnx.report(model), x, y_float


def test_report_lists_every_weight_layer(converted):
  _, report, _, _ = converted
  assert sorted(report.quantized_paths()) == [
      "embed", "encoder/attn/key", "encoder/attn/out", "encoder/attn/query", "encoder/attn/value",
      "encoder/blocks/down", "encoder/blocks/up", "encoder/mix", "head"]
  intercepted = [l.path for l in report.layers if l.reason.startswith("intercepted")]
  assert sorted(intercepted) == ["embed", "encoder/blocks/down", "encoder/mix", "head"]
  assert report.unused_rules == ["nothing/matches/this"]
  assert report.paths("failed") == []
  # Layer norms hold weights that stay float, with the reason.
  assert report["encoder/blocks/norm"].status == "unsupported"
  assert {w.path for w in report.float_weights() if w.name == "kernel"} == set()


def test_stacked_layers_get_per_layer_quantizer_state(converted):
  model, _, _, _ = converted
  blocks = model.encoder.blocks
  assert blocks.up.kernel_quant.log_scale.shape == (L, 1, 2 * D)  # per layer, per out channel
  assert blocks.up.input_quant.log_scale.shape == (L,)
  assert blocks.down.jaxqat_weight_quant["w"].log_scale.shape == (L, 1, D)
  assert blocks.down.jaxqat_input_quant["w"].offset.shape == (L,)
  # Calibration saw each layer separately: different ranges per layer.
  s = blocks.up.input_quant.log_scale[...]
  assert len(set(np.asarray(s).tolist())) == L


def test_every_weight_matmul_is_fake_quantized(converted):
  model, _, x, y_float = converted
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  mm = _matmuls(jaxpr.jaxpr)
  quantized = [m for m in mm if m[1] and m[2]]
  unquantized = [m for m in mm if not (m[1] or m[2])]
  assert len(mm) == N_WEIGHT_MATMULS + N_ATTENTION_MATMULS
  assert len(quantized) == N_WEIGHT_MATMULS
  assert len(unquantized) == N_ATTENTION_MATMULS
  assert sum(m[0] == "conv_general_dilated" for m in quantized) == 1
  # The quantized model is close to, but not equal to, the float one (W4A8).
  y = model(x)
  err = float(jnp.max(jnp.abs(y - y_float)))
  assert 0.0 < err < 0.5 * float(jnp.max(jnp.abs(y_float)))


def test_one_training_step_reduces_loss_and_trains_quantizers(converted):
  model, _, x, _ = converted
  target = jnp.zeros((x.shape[0], 3))

  def loss_fn(m):
    return jnp.mean((m(x) - target) ** 2)

  tx = qnnx.qat_optimizer(model, optax.sgd(0.05), optax.sgd(0.01))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss, grads

  loss0, grads = step(model, opt)
  qgrads = jax.tree.leaves(nnx.state(grads, qnnx.QuantParam))
  assert len(qgrads) == 3 * N_WEIGHT_MATMULS  # weight step size, input step size and offset
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in qgrads)
  assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in qgrads) >= N_WEIGHT_MATMULS
  loss1 = float(nnx.jit(loss_fn)(model))
  print(f"\nloss {float(loss0):.5f} -> {loss1:.5f}")
  assert loss1 < float(loss0)
