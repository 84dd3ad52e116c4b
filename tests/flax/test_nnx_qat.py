"""QAT with the NNX front end: weight ranges track the weights, learned step sizes stay positive."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxqat import core
from jaxqat.core import PerChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx


class MLP(nnx.Module):

  def __init__(self, sizes, dtype=jnp.float32, seed=0):
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, param_dtype=dtype, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = nnx.relu(x)
    return x


def _trainer(model, tx, x, y):
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      return jnp.mean((m(x).astype(jnp.float32) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    with jax.numpy_dtype_promotion("standard"):
      opt.update(model, grads)
    return loss

  return lambda: step(model, opt)


def _clipped_fraction(w, scale, spec):
  """The fraction of entries of ``w`` outside the grid ``[qmin s, qmax s]``."""
  return float(jnp.mean((w < spec.qmin * scale) | (w > spec.qmax * scale)))


def test_fixed_weight_range_tracks_the_weight_during_qat():
  # Issue 8: with ranges frozen at calibration, a third of the kernel entries ended outside the
  # range after training (their gradient is then zero). The range now tracks the weight.
  x = jax.random.normal(jax.random.key(0), (16, 8))
  y = jax.random.normal(jax.random.key(1), (16, 4)) * 3.0
  rules = [Rule(pattern=".*", weight=core.default_weight_spec())]  # int8 absmax per channel
  tracking = qnnx.quantize(MLP((8, 16, 4)), rules)
  frozen = qnnx.freeze(qnnx.quantize(MLP((8, 16, 4)), rules))  # the old behaviour
  for model in (tracking, frozen):
    step = _trainer(model, optax.sgd(0.1), x, y)
    for _ in range(100):
      step()
  layer = tracking.layers[0]
  spec = layer.kernel_quant.spec
  w = layer.kernel[...]
  absmax = jnp.max(jnp.abs(w), axis=0, keepdims=True)
  qnnx.freeze(tracking)  # stores the range the quantizer used at the last call
  np.testing.assert_allclose(layer.kernel_quant.scale[...], absmax / 127, rtol=1e-6)
  assert _clipped_fraction(w, layer.kernel_quant.scale[...], spec) == 0.0
  np.testing.assert_allclose(layer(x), x @ core.fake_quant(w, absmax / 127, None, spec)
                             + layer.bias[...], rtol=0, atol=1e-5)
  stale = frozen.layers[0]
  stale_clipped = _clipped_fraction(stale.kernel[...], stale.kernel_quant.scale[...], spec)
  print(f"\nclipped kernel entries: tracking 0%, frozen at calibration {100 * stale_clipped:.0f}%")
  assert stale_clipped > 0.05
  qnnx.unfreeze(tracking)
  assert not layer.kernel_quant.frozen


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_learned_step_sizes_stay_positive_over_2000_steps(dtype):
  # Issue 9: int4 LSQ weights and activations, Adam 1e-3 on weights and 1e-2 on step sizes;
  # a step size reached <= 0 at step 25 when it was stored as s.
  w4 = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
  a4 = QuantSpec(format="int4", learning="lsq")
  model = qnnx.quantize(MLP((16, 64, 64, 4), dtype=dtype), Rule(pattern=".*", weight=w4, act=a4))
  x = jax.random.normal(jax.random.key(0), (8, 16)).astype(dtype)
  y = jax.random.normal(jax.random.key(1), (8, 4))
  qnnx.calibrate(model, [x])
  tx = qnnx.qat_optimizer(model, optax.adam(1e-3), optax.adam(1e-2))
  theta0 = [q.log_scale[...] for q in qnnx.quantizers(model)]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    return jnp.mean((nnx.merge(graphdef, p, rest)(x).astype(jnp.float32) - y) ** 2)

  @jax.jit
  def train(params, opt_state):  # 2000 steps in one jitted loop (fast)
    def body(carry, _):
      p, st = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      with jax.numpy_dtype_promotion("standard"):
        u, st = tx.update(g, st, p)
        p = optax.apply_updates(p, u)
      return (p, st), loss

    return jax.lax.scan(body, (params, opt_state), None, length=2000)

  with jax.numpy_dtype_promotion("standard"):
    opt_state = tx.init(params)
  (params, _), losses = train(params, opt_state)
  nnx.update(model, params)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
  thetas = [q.log_scale[...] for q in qnnx.quantizers(model)]
  assert len(thetas) == 6
  moved = max(float(jnp.max(jnp.abs(t - t0))) for t, t0 in zip(thetas, theta0))
  assert moved > 0.1  # the step sizes were trained hard
  for t in thetas:
    s = core.param_to_step_size(t)
    assert bool(jnp.all(jnp.isfinite(s) & (s > 0)))
  assert bool(jnp.all(jnp.isfinite(model(x).astype(jnp.float32))))


def test_calibrate_through_qad_forward_captures_sown_values():
  """Calibrating with a forward that captures what the model sows (qad_forward) works."""
  from jaxqat.flax.nnx._qad import qad_forward  # pylint: disable=g-import-not-at-top

  class M(nnx.Module):

    def __init__(self, rngs):
      self.a = nnx.Linear(4, 4, rngs=rngs)
      self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      h = self.a(x)
      self.sow(nnx.Intermediate, "feat", h)
      return self.b(h)

  x = jax.random.normal(jax.random.key(0), (8, 4))
  plain = qnnx.calibrate(qnnx.quantize(M(nnx.Rngs(0))), [x])
  captured = qnnx.calibrate(qnnx.quantize(M(nnx.Rngs(0))), [x],
                            forward=lambda m, x: qad_forward(m, x)[0])
  for name in ("a", "b"):
    np.testing.assert_array_equal(getattr(captured, name).input_quant.scale[...],
                                  getattr(plain, name).input_quant.scale[...])
  assert not hasattr(captured, "feat")  # the sown value was captured, not left on the model


def test_nnx_rnn_cell_calibrates_over_every_step_as_linen_does():
  """nnx.RNN scans its cell: the cell's input quantizer sees every step (the same range as
  a Linear calibrated on all steps flattened), and the served model is the trained one."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  m = nnx.RNN(nnx.LSTMCell(3, 8, rngs=nnx.Rngs(0)))
  yf = m(x)
  qnnx.quantize(m)
  qnnx.calibrate(m, [x])
  lin = qnnx.quantize(nnx.Linear(3, 8, rngs=nnx.Rngs(0)))
  qnnx.calibrate(lin, [x.reshape(-1, 3)])
  assert float(m.cell.ii.input_quant.scale[...]) == float(lin.input_quant.scale[...])
  y = m(x)
  assert float(jnp.max(jnp.abs(y - yf))) > 1e-4  # quantized
  np.testing.assert_array_equal(np.asarray(qnnx.convert(m, integer=False)(x)), np.asarray(y))


class _UserScanLSTM(nnx.Module):
  """A user's own nnx.scan over time, the cell passed as carried state (as nnx.RNN does)."""

  def __init__(self, cell_cls, cell_axes=None):
    self.cell = cell_cls(3, 8, rngs=nnx.Rngs(0))
    self.cell_axes = nnx.StateAxes({...: nnx.Carry}) if cell_axes is None else cell_axes

  def __call__(self, x):
    carry = self.cell.initialize_carry(x[:, 0].shape, rngs=nnx.Rngs(1))

    @nnx.scan(in_axes=(nnx.Carry, self.cell_axes, 1), out_axes=(nnx.Carry, 1))
    def step(carry, cell, xt):
      return cell(carry, xt)

    return step(carry, self.cell, x)[1]


@pytest.mark.parametrize("cell_cls", [nnx.LSTMCell, nnx.OptimizedLSTMCell])
def test_user_nnx_scan_over_a_carried_cell_calibrates_every_step(cell_cls):
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  m = _UserScanLSTM(cell_cls)
  yf = m(x)
  qnnx.quantize(m)
  qnnx.calibrate(m, [x])
  lin = qnnx.quantize(nnx.Linear(3, 8, rngs=nnx.Rngs(0)))
  qnnx.calibrate(lin, [x.reshape(-1, 3)])
  first = m.cell.ii if cell_cls is nnx.LSTMCell else m.cell.dense_i  # the step input's layer
  assert float(first.input_quant.scale[...]) == float(lin.input_quant.scale[...])
  y = m(x)
  assert float(jnp.max(jnp.abs(y - yf))) > 1e-4
  np.testing.assert_array_equal(np.asarray(qnnx.convert(m, integer=False)(x)), np.asarray(y))


def test_a_broadcast_cell_in_a_user_scan_says_how_to_pass_it():
  """NNX drops updates to state a scan takes as broadcast (in_axes=None): the calibration
  warning names the cause and the fix."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  m = _UserScanLSTM(nnx.LSTMCell, cell_axes=None)
  m.cell_axes = None  # broadcast
  qnnx.quantize(m)
  with pytest.warns(core.QuantizationWarning, match=r"nnx.StateAxes\(\{\.\.\.: nnx.Carry\}\)"):
    qnnx.calibrate(m, [x])
  assert m.cell.ii.input_quant.disabled
