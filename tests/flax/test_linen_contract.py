"""The front-end contract (docs/contract.md) on the Linen side.

quantize refuses a quantized model and warns when nothing was quantized;
calibrate warns about (and leaves float) an activation that saw no finite
value; fixed weight ranges track the weights during QAT until freeze; report
lists every layer with weights; learned step sizes stay positive (issue 9).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxqat import core
from jaxqat.core import IntFormat, PerChannel, PerOutputChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql

KEY = jax.random.key(0, impl="rbg")  # compiles much faster than threefry on CPU
W8 = QuantSpec(format="int8", granularity=PerChannel(-1))
A8 = QuantSpec(format="int8")
RULES = [Rule(pattern=".*", weight=W8, act=A8)]


def _x(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def _fq(t, spec, calib=None):
  scale, zp = core.calibrate(spec, [t if calib is None else calib])
  return core.fake_quant(t, scale, None if spec.symmetric else zp, spec)


# ---------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------


def test_quantizing_a_quantized_model_says_so():
  qmodel = ql.quantize(nn.Dense(3))
  with pytest.raises(ValueError, match=r"model: QuantizedModule is quantized already"):
    ql.quantize(qmodel)

  class Holder(nn.Module):
    inner: nn.Module

    def __call__(self, x):
      return self.inner(x)

  with pytest.raises(ValueError, match=r"model: Holder is quantized already"):
    ql.quantize(Holder(qmodel))

  class Builds(nn.Module):  # a quantized model made inside the model: found when it runs

    @nn.compact
    def __call__(self, x):
      return ql.quantize(nn.Dense(3))(x)

  with pytest.raises(ValueError, match=r"quantized already"):
    ql.quantize(Builds()).init(KEY, _x((1, 4)))


def test_no_quantized_layer_warns():
  with pytest.warns(core.QuantizationWarning, match=r"no layer of the Linen model LayerNorm was "
                                                    r"quantized"):
    ql.quantize(nn.LayerNorm()).init(KEY, _x((2, 4)))


def test_report_lists_every_layer_with_weights():
  model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(3), nn.Dense(2)])
  rules = [Rule(pattern="layers_2", skip=True), Rule(pattern="decoder"),
           Rule(pattern="layers_[01]", weight=QuantSpec(granularity=PerOutputChannel()), act=A8)]
  qmodel = ql.quantize(model, rules)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", core.QuantizationWarning)
    v = jax.jit(qmodel.init)(KEY, _x((2, 3)))
  r = ql.report(qmodel, v)
  assert [(l.path, l.layer_type, l.status) for l in r.layers] == [
      ("layers_0", "Dense", "quantized"), ("layers_1", "LayerNorm", "unsupported"),
      ("layers_2", "Dense", "skipped"), ("layers_3", "Dense", "unmatched")]
  kernel, bias = {w.name: w for w in r["layers_0"].weights}["kernel"], {
      w.name: w for w in r["layers_0"].weights}["bias"]
  assert kernel.spec == QuantSpec(granularity=PerChannel(1)) and kernel.shape == (3, 4)
  assert bias.spec is None and "not a matmul" in bias.reason
  assert r["layers_0"].act == A8
  assert "elementwise" in r["layers_1"].reason
  assert "skips it" in r["layers_2"].reason and "no rule matched" in r["layers_3"].reason
  assert [w.name for w in r["layers_3"].weights] == ["bias", "kernel"]
  assert r.unused_rules == ["decoder"]


# ---------------------------------------------------------------------------
# calibrate: no data, NaN, uncalibrated use
# ---------------------------------------------------------------------------


def test_all_nan_calibration_warns_names_the_layer_and_stays_float():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  x = _x((8, 3))
  qmodel = ql.quantize(model, RULES)
  v = jax.jit(qmodel.init)(KEY, x)
  with pytest.warns(core.QuantizationWarning, match=r"layer 'layers_0' input activation 'input' "
                                                    r"saw no batch or no finite value"):
    v = ql.calibrate(qmodel, v, [jnp.full_like(x, jnp.nan)])
  p = v["params"]
  h = jax.nn.relu(x @ _fq(p["layers_0"]["kernel"], W8) + p["layers_0"]["bias"])  # input float
  ref = h @ _fq(p["layers_2"]["kernel"], W8) + p["layers_2"]["bias"]
  np.testing.assert_allclose(jax.jit(qmodel.apply)(v, x), ref, atol=1e-5, rtol=0)
  r = ql.report(qmodel, v)
  assert r["layers_0"].act is None and "input stays float" in r["layers_0"].reason
  # A later calibration with data quantizes the input again.
  v = ql.calibrate(qmodel, v, [x])
  assert "stays_float" not in v["quant_stats"]["layers_0"]["input"]


def test_observers_ignore_non_finite_values():
  x = _x((8, 3))
  dirty = x.at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
  qmodel = ql.quantize(nn.Dense(2), RULES)
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, x), [dirty, x])
  want = jnp.abs(x).max() / 127  # the finite values of both batches
  np.testing.assert_allclose(v["quant_stats"]["input"]["scale"], want, rtol=1e-6)


def test_weight_only_rules_need_no_calibration_and_lsq_inputs_do():
  x = _x((4, 3))
  qmodel = ql.quantize(nn.Dense(2), [Rule(pattern=".*", weight=W8)])
  v = jax.jit(qmodel.init)(KEY, x)
  ref = x @ _fq(v["params"]["kernel"], W8) + v["params"]["bias"]
  np.testing.assert_allclose(qmodel.apply(v, x), ref, atol=1e-6, rtol=0)
  lsq = ql.quantize(nn.Dense(2), [Rule(pattern=".*", act=A8.replace(learning="lsq"))])
  with pytest.raises(ValueError, match=r"layer '<root>' \(Dense\) input activation 'input' was "
                                       r"never calibrated"):
    lsq.apply(jax.jit(lsq.init)(KEY, x), x)
  with pytest.raises(ValueError, match=r"data: calibration needs at least one batch"):
    ql.calibrate(lsq, jax.jit(lsq.init)(KEY, x), [])
  with pytest.raises(ValueError, match=r"steps: expected a positive int"):
    ql.calibrate(lsq, jax.jit(lsq.init)(KEY, x), [x], steps=0)


# ---------------------------------------------------------------------------
# Weight ranges during QAT: tracked until freeze
# ---------------------------------------------------------------------------


def _train(qmodel, v, x, y, steps=25, lr=0.3):
  def loss(p):
    return jnp.mean((qmodel.apply({**v, "params": p}, x) - y) ** 2)

  @jax.jit
  def run(p):
    def step(p, _):
      return jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss)(p)), None
    return jax.lax.scan(step, p, None, length=steps)[0]

  return {**v, "params": run(v["params"])}


def _clipped(qmodel, v, x):
  """Kernel entries whose STE gradient is masked (outside the weight's range).

  A channel's absmax entry itself is left out: it sits on the range's end,
  where w / (absmax / 127) can round to 127.00001 and the core's STE masks it.
  """
  k = v["params"]["kernel"]
  g = jax.grad(lambda k: jnp.sum(qmodel.apply(
      {**v, "params": {**v["params"], "kernel": k}}, x)))(k)
  inside = jnp.abs(k) < jnp.abs(k).max(0, keepdims=True)
  return int(jnp.sum((g == 0) & inside))


def test_fixed_weight_ranges_track_the_weights_until_freeze():
  x = _x((32, 6))
  y = x @ (4.0 * _x((6, 5), seed=2))  # the weights must grow well past their initial range
  qmodel = ql.quantize(nn.Dense(5), RULES)
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, x), [x])
  tracked = _train(qmodel, v, x, y)
  stale = _train(qmodel, ql.freeze(qmodel, v), x, y)
  k = tracked["params"]["kernel"]
  assert float(jnp.abs(k).max()) > 2 * float(jnp.abs(v["params"]["kernel"]).max())
  # Tracking: the range is the current weight's; no entry is clipped.
  assert _clipped(qmodel, tracked, x) == 0
  xs = tracked["quant_stats"]["input"]["scale"]
  ref = core.fake_quant(x, xs, None, A8) @ _fq(k, W8) + tracked["params"]["bias"]
  np.testing.assert_allclose(qmodel.apply(tracked, x), ref, atol=1e-5, rtol=0)
  # Frozen at calibration: a stale range clips the weights that grew.
  assert _clipped(qmodel, stale, x) > 0
  assert _clipped(qmodel, ql.unfreeze(qmodel, stale), x) == 0
  frozen = ql.freeze(qmodel, tracked)  # freeze stores the current ranges
  np.testing.assert_allclose(frozen["quant_stats"]["kernel"]["scale"],
                             jnp.abs(k).max(0, keepdims=True) / 127, rtol=1e-6)
  np.testing.assert_array_equal(qmodel.apply(frozen, x), qmodel.apply(tracked, x))


# ---------------------------------------------------------------------------
# Issue 9: learned step sizes stay positive
# ---------------------------------------------------------------------------


class MLP(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for width in (64, 64):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, param_dtype=self.dtype)(x))
    return nn.Dense(4, dtype=self.dtype, param_dtype=self.dtype)(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lsq_step_sizes_stay_positive_over_2000_adam_steps(dtype):
  int4 = IntFormat(bits=4, signed=True)
  rules = [Rule(pattern=".*", weight=QuantSpec(format=int4, granularity=PerOutputChannel(),
                                                learning="lsq"),
                act=QuantSpec(format=int4, learning="lsq"))]
  qmodel = ql.quantize(MLP(dtype), rules)
  x = _x((8, 16)).astype(dtype)
  y = jax.random.randint(jax.random.key(2), (8,), 0, 4)
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, x), [x])
  t = {"params": v["params"], "quant_params": v["quant_params"]}
  tx = ql.qat_optimizer(qmodel, optax.adam(1e-3), optax.adam(1e-2))

  def loss(t):
    logits = qmodel.apply({**v, **t}, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(t, s):
    def step(c, _):
      t, s = c
      value, g = jax.value_and_grad(loss)(t)
      u, s = tx.update(g, s, t)
      return (optax.apply_updates(t, u), s), value
    return jax.lax.scan(step, (t, s), None, length=2000)

  with jax.numpy_dtype_promotion("standard"):
    (t, _), losses = train(t, tx.init(t))
  steps = [core.param_to_step_size(l) for l in jax.tree.leaves(t["quant_params"])]
  assert len(steps) == 6  # 3 weights and 3 inputs
  assert all(bool(jnp.all(s > 0)) and bool(jnp.all(jnp.isfinite(s))) for s in steps)
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(t))
  assert bool(jnp.all(jnp.isfinite(losses))) and float(losses[-1]) < 0.5 * float(losses[0])
