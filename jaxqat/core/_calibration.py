"""Calibration observers (optax-style functional state).

PLACEHOLDER being replaced by the full implementation (absmax, minmax, ema,
percentile, mse, entropy). The API below is the contract.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp

from jaxqat.core import _grid
from jaxqat.core import _spec as spec_lib

__all__ = ["Observer", "observer", "calibrate"]


class Observer(NamedTuple):
  init: Callable
  update: Callable
  compute: Callable


def observer(spec: spec_lib.QuantSpec) -> Observer:
  spec = _grid.check_spec(spec)

  def init(x):
    shape = spec.scale_shape(jnp.shape(x))
    return {"min": jnp.full(shape, jnp.inf, jnp.float32), "max": jnp.full(shape, -jnp.inf, jnp.float32),
            "count": jnp.zeros((), jnp.int32)}

  def update(state, x):
    x = _grid.to_layout(jnp.asarray(x, jnp.float32), spec)
    axes = _grid.reduce_axes(x.shape, spec)
    mn = _grid.scale_from_layout(jnp.min(x, axis=axes, keepdims=True), jnp.shape(x), spec).reshape(state["min"].shape)
    mx = _grid.scale_from_layout(jnp.max(x, axis=axes, keepdims=True), jnp.shape(x), spec).reshape(state["max"].shape)
    return {"min": jnp.minimum(state["min"], mn), "max": jnp.maximum(state["max"], mx),
            "count": state["count"] + 1}

  def compute(state):
    amax = jnp.maximum(jnp.abs(state["min"]), jnp.abs(state["max"]))
    amax = jnp.where(jnp.isfinite(amax) & (amax > 0), amax, 1.0)
    return amax / spec.qmax, jnp.zeros_like(amax)

  return Observer(init, update, compute)


def calibrate(spec: spec_lib.QuantSpec, batches: Iterable[jax.Array]):
  obs = observer(spec)
  state = None
  for b in batches:
    state = obs.init(b) if state is None else state
    state = obs.update(state, b)
  return obs.compute(state)
