"""NNX and Linen pass ``weight_tracked`` to core.qat_op: no weight clip mask until frozen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqat.flax import linen as ql
from jaxqat.flax import nnx as qnnx

X = jax.random.normal(jax.random.key(0), (4, 24))
KSHAPE = (24, 16)  # no activation or bias has this shape


def _kernel_selects(fn, *args):
  """select_n ops of the kernel's shape in the jaxpr of ``fn`` (the STE clip mask).

  Not counted: those inside a ``cond`` (the weight range's fallback for non-finite weights).
  """

  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "select_n" and eqn.outvars[0].aval.shape == KSHAPE
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
  assert _kernel_selects(grads, params) == 0
  qnnx.freeze(model)  # the stored range is this weight's: the same values, now with the mask
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert _kernel_selects(grads, params) >= 1
  for a, b in zip(jax.tree.leaves(tracked), jax.tree.leaves(grads(params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_linen_tracked_weight_has_no_clip_mask_until_frozen():
  qmodel = ql.quantize(nn.Dense(16))
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(jax.random.key(1), X), [X])

  def grads(params, v):
    loss = lambda p: jnp.sum(jnp.sin(qmodel.apply({**v, "params": p}, X)))  # noqa: E731
    return jax.grad(loss)(params)

  tracked = grads(v["params"], v)
  assert _kernel_selects(lambda p: grads(p, v), v["params"]) == 0
  frozen = ql.freeze(qmodel, v)
  assert _kernel_selects(lambda p: grads(p, frozen), frozen["params"]) >= 1
  for a, b in zip(jax.tree.leaves(tracked), jax.tree.leaves(grads(frozen["params"], frozen))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
