"""Tracked weights without the STE clip mask: core.qat_op (weight_tracked), NNX and Linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqat import core
from jaxqat.core import PerChannel, QuantSpec, qat_op
from jaxqat.flax import linen as ql
from jaxqat.flax import nnx as qnnx

X = jax.random.normal(jax.random.key(0), (4, 24))
KSHAPE = (24, 16)  # no activation or bias has this shape


DOT = (((1,), (0,)), ((), ()))
W8 = QuantSpec(format="int8", granularity=PerChannel(-1))
A8 = QuantSpec(format="int8", symmetric=False)
W4L = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")


def _data(k, shape_x, shape_w):
  kx, kw = jax.random.split(jax.random.key(k))
  return jax.random.normal(kx, shape_x) + 0.3, jax.random.normal(kw, shape_w) * 0.2


def _selects_of_shape(shape, fn, *args):
  """select_n ops of ``shape`` in the jaxpr of ``fn`` (a weight's STE clip mask).

  Not counted: those inside a ``cond`` (the weight range's fallback for non-finite weights).
  """

  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "select_n" and eqn.outvars[0].aval.shape == shape
      if eqn.primitive.name == "cond":
        continue
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            n += walk(inner)
    return n

  # A fresh function: make_jaxpr caches traces by function, and freezing changes no aval.
  return walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


def test_nnx_tracked_weight_has_no_clip_mask_until_frozen():
  model = qnnx.quantize(nnx.Linear(24, 16, rngs=nnx.Rngs(0)))  # default W8A8: absmax weights
  qnnx.calibrate(model, [X])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def grads(params):
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(X)))  # noqa: E731
    return jax.grad(loss)(params)

  tracked = grads(params)
  assert _selects_of_shape(KSHAPE, grads, params) == 0
  qnnx.freeze(model)  # the stored range is this weight's: the same values, now with the mask
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert _selects_of_shape(KSHAPE, grads, params) >= 1
  for a, b in zip(jax.tree.leaves(tracked), jax.tree.leaves(grads(params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_linen_tracked_weight_has_no_clip_mask_until_frozen():
  qmodel = ql.quantize(nn.Dense(16))
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(jax.random.key(1), X), [X])

  def grads(params, v):
    loss = lambda p: jnp.sum(jnp.sin(qmodel.apply({**v, "params": p}, X)))  # noqa: E731
    return jax.grad(loss)(params)

  tracked = grads(v["params"], v)
  assert _selects_of_shape(KSHAPE, lambda p: grads(p, v), v["params"]) == 0
  frozen = ql.freeze(qmodel, v)
  assert _selects_of_shape(KSHAPE, lambda p: grads(p, frozen), frozen["params"]) >= 1
  for a, b in zip(jax.tree.leaves(tracked), jax.tree.leaves(grads(frozen["params"], frozen))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("wspec", [W8, QuantSpec(format="int4", granularity=PerChannel(-1)),
                                   QuantSpec(format=core.IntFormat(bits=4, signed=True, narrow=True))])
@pytest.mark.parametrize("compute", ["fake", "integer"])
def test_tracked_absmax_weight_drops_the_clip_mask_same_values_and_grads(wspec, compute):
  x, w = _data(5, (8, 64), (64, 16))
  w = w.at[:, 3].set(0.0).at[7, 5].set(-2.5)  # an all-zero channel and a lone extreme
  scale, _ = core.weight_range(w, wspec)
  act = (A8, jnp.float32(0.02), jnp.float32(-20.0), None)

  def f(x, w, tracked):  # the range of this w, as a front end tracks it (no gradient)
    y = qat_op("dot_general", x, w, act=act, weight=(wspec, scale), compute=compute,
               weight_tracked=tracked, dimension_numbers=DOT)
    return jnp.sum(jnp.sin(y))

  assert core.unclipped_weight(wspec)
  for argnums in (0, 1):
    got = jax.grad(f, argnums=argnums)(x, w, True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.grad(f, argnums)(x, w, False)))
  np.testing.assert_array_equal(np.asarray(f(x, w, True)), np.asarray(f(x, w, False)))
  # The backward builds no weight-shaped mask when tracked (x is (8, 64), w (64, 16)).
  assert _selects_of_shape(w.shape, jax.grad(lambda x, w: f(x, w, True), argnums=1), x, w) == 0
  assert _selects_of_shape(w.shape, jax.grad(lambda x, w: f(x, w, False), argnums=1), x, w) >= 1


@pytest.mark.parametrize("wspec", [
    QuantSpec(format="uint8", granularity=PerChannel(-1)),                     # negatives clip
    QuantSpec(format="int8", symmetric=False, granularity=PerChannel(-1)),     # rounded zero point
    QuantSpec(format="int8", granularity=PerChannel(-1), calibration=core.Calibration(
        method="percentile", percentile=90.0)),                               # clips the tails
    QuantSpec(format="fp8_e4m3", granularity=PerChannel(-1)),                  # unrounded clip
    W4L])
def test_tracked_weight_keeps_the_mask_where_clipping_can_happen(wspec):
  x, w = _data(6, (8, 64), (64, 16))
  assert not core.unclipped_weight(wspec)
  scale, zp = core.weight_range(w, wspec)
  zp = None if wspec.symmetric or not wspec.is_int else zp

  def f(x, w, tracked):
    y = qat_op("dot_general", x, w, act=None, weight=(wspec, scale, zp), weight_tracked=tracked,
               dimension_numbers=DOT)
    return jnp.sum(jnp.sin(y))

  g_t, g_f = jax.grad(f, argnums=1)(x, w, True), jax.grad(f, argnums=1)(x, w, False)
  np.testing.assert_array_equal(np.asarray(g_t), np.asarray(g_f))
  assert _selects_of_shape(w.shape, jax.grad(lambda x, w: f(x, w, True), argnums=1), x, w) >= 1
  with pytest.raises(TypeError, match="weight_tracked: expected a bool"):
    qat_op("dot_general", x, w, act=None, weight=(wspec, scale), weight_tracked=1,
           dimension_numbers=DOT)
