"""Quantizer state and arithmetic for the Linen front end.

A *quantizer* is one tensor's quantization inside a layer: the input
activation of a matmul/conv (``"input"``) or a weight (``"kernel"``,
``"embedding"``...). Its state lives in the layer's own scope, in two
collections, so that the float ``params`` tree is untouched:

* ``quant_params`` (trainable): LSQ / LSQ+ ``step_size`` and ``offset``
  (Esser et al. 2020; Bhalgat et al. 2020).
* ``quant_stats`` (not trainable): the calibration observer state, the
  number of calibration batches seen, the frozen ``scale`` / ``zero_point``
  of fixed-range activations, and ``spec_id``, a 31-bit fingerprint of the
  :class:`~jaxqat.core.QuantSpec` that :func:`restore` checks.

Each value is a dict stored with ``module.put_variable(collection, name,
value)``, e.g. ``quant_stats["Dense_0"]["input"] = {"observer": {...},
"count": 0, "scale": ..., "zero_point": ..., "spec_id": ...}``.

Weight ranges are computed from the weight itself (the spec's observer run
on it) at ``init`` and in ``freeze`` mode, and stay constant in between (the
NNX front end does the same): load the float params, then calibrate and
freeze. Block formats derive their scales from the data and carry no range
state.

Modes (see :class:`~jaxqat.flax.linen.QuantizedModule`):

* ``calibrate``: observers of activations see the (float) input; the op runs
  in float. Needs ``mutable=["quant_stats"]``.
* ``freeze``: scale / zero point computed from the observers and written to
  ``quant_stats`` (fixed) or used to initialise LSQ step sizes and
  ``β = -z s`` (``quant_params``); LSQ weight step sizes are initialised from
  the current weight. Then runs quantized. Needs
  ``mutable=["quant_stats", "quant_params"]``.
* ``train``: fake quant with the frozen / learned ranges (stochastic rounding
  draws from the ``"quant"`` RNG stream).
* ``eval``: as ``train``, with stochastic rounding replaced by round half to
  even (``freeze`` rounds to nearest too).
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxqat import core

MODES = ("calibrate", "freeze", "train", "eval")
STATS = "quant_stats"
PARAMS = "quant_params"
_STATS_AND_PARAMS = "quant_stats' and 'quant_params"


def spec_id(spec: core.QuantSpec) -> jax.Array:
  """A 31-bit fingerprint of ``spec`` (crc32 of its repr) as an int32 scalar.

  Examples:
    >>> int(spec_id(core.QuantSpec())) == int(spec_id(core.QuantSpec()))
    True
    >>> int(spec_id(core.QuantSpec())) == int(spec_id(core.QuantSpec(format="int4")))
    False
  """
  return jnp.asarray(zlib.crc32(repr(spec).encode()) & 0x7FFFFFFF, jnp.int32)


def describe(path: str) -> str:
  return repr(path) if path else "'<root>'"


def check_shape(spec: core.QuantSpec, shape, where: str) -> None:
  """Validates ``spec`` against a tensor shape; the error names ``where``."""
  try:
    spec.scale_shape(shape)
  except ValueError as e:
    raise ValueError(f"jaxqat: {where} of shape {tuple(shape)}: {e}") from None



def _learned_params(spec: core.QuantSpec, scale: jax.Array, zp: jax.Array) -> dict:
  """LSQ step size (and LSQ+ offset beta = -z * s) from a calibrated range."""
  qp = {"step_size": scale}
  if spec.learning == "lsq_plus":
    qp["offset"] = -zp * scale
  return qp

def _range(spec: core.QuantSpec, x: jax.Array):
  """(scale, zero_point) of the spec's observer run on ``x`` alone."""
  obs = core.observer(spec)
  x = jax.lax.stop_gradient(x)
  return obs.compute(obs.update(obs.init(x), x))


def _read(module, col: str, name: str, where: str):
  value = module.get_variable(col, name)
  if value is None:
    raise ValueError(
        f"jaxqat: {where} has no '{col}/{name}' variable. Apply the quantized model with the "
        f"variables returned by its init() (params, quant_params and quant_stats), not only "
        f"'params'.")
  return value


def _create(module, col: str, name: str, value, where: str):
  if not module.is_mutable_collection(col):
    raise ValueError(
        f"jaxqat: cannot create '{col}/{name}' for {where}: the collection is not mutable here. "
        f"Inside a lifted transform (nn.scan, nn.vmap, nn.remat...) list '{_STATS_AND_PARAMS}' "
        f"with the params, e.g. variable_axes={{True: 0}} or "
        f"variable_axes={{'params': 0, 'quant_params': 0, 'quant_stats': 0}}")
  module.put_variable(col, name, value)


def _write(module, col: str, name: str, value, where: str, mode: str):
  if not module.is_mutable_collection(col):
    raise ValueError(
        f"jaxqat: mode={mode!r} updates '{col}' ({where}); call apply(..., "
        f"mutable={['quant_stats', 'quant_params'] if mode == 'freeze' else ['quant_stats']})")
  module.put_variable(col, name, value)


def _rounding(spec: core.QuantSpec, module, mode: str):
  """The spec to use and the PRNG key for stochastic rounding."""
  if spec.rounding != "stochastic":
    return spec, None
  if mode in ("eval", "freeze") or module.is_initializing():
    return spec.replace(rounding="nearest_even"), None
  if not module.has_rng("quant"):
    raise ValueError("jaxqat: a spec with rounding='stochastic' needs a PRNG stream; call "
                     "apply(..., rngs={'quant': key})")
  return spec, module.make_rng("quant")


def _qdq(x, spec, scale, zero_point, module, mode):
  spec, key = _rounding(spec, module, mode)
  if spec.learning == "lsq_plus":
    return core.quant_dequant(x, spec, scale, offset=zero_point, key=key)
  return core.quant_dequant(x, spec, scale, zero_point, key=key)


def quantize_activation(module, name: str, x: jax.Array, spec: core.QuantSpec, mode: str,
                        where: str) -> jax.Array:
  """Fake-quantizes an activation ``x`` with the quantizer ``name`` of ``module``.

  Creates the quantizer's variables on first use (during ``init``). Ranges
  start from ``x`` itself (the example input given to ``init``); observers
  start empty.

  Args:
    module: the bound Linen module that owns the state.
    name: the quantizer name (a variable name in the module's scope).
    x: the activation.
    spec: its QuantSpec.
    mode: one of :data:`MODES`.
    where: a description of the tensor for error messages.

  Returns:
    ``x`` fake-quantized (``x`` unchanged in ``calibrate`` mode and for
    non-floating inputs).

  Raises:
    ValueError: if ``spec`` does not fit ``x`` or the state is missing or not
      mutable when the mode updates it.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  check_shape(spec, x.shape, where)
  initializing = module.is_initializing()
  if spec.is_block:  # scales come from the data
    if initializing and not module.has_variable(STATS, name):
      _create(module, STATS, name, {"spec_id": spec_id(spec)}, where)
    return x if mode == "calibrate" else _qdq(x, spec, None, None, module, mode)

  obs = core.observer(spec)
  learned = spec.learning != "fixed"
  if initializing and not module.has_variable(STATS, name):
    scale, zp = _range(spec, x)
    stats = {"observer": obs.init(jax.lax.stop_gradient(x)), "count": jnp.zeros((), jnp.int32),
             "spec_id": spec_id(spec)}
    if learned:
      _create(module, PARAMS, name, _learned_params(spec, scale, zp), where)
    else:
      stats["scale"], stats["zero_point"] = scale, zp
    _create(module, STATS, name, stats, where)
  stats = _read(module, STATS, name, where)
  qp = _read(module, PARAMS, name, where) if learned else None

  if mode == "calibrate":
    if not initializing:
      new = dict(stats, observer=obs.update(stats["observer"], jax.lax.stop_gradient(x)),
                 count=stats["count"] + 1)
      _write(module, STATS, name, new, where, mode)
    return x

  if mode == "freeze" and not initializing:
    scale, zp = obs.compute(stats["observer"])
    seen = stats["count"] > 0  # keep the init range if no batch was calibrated
    if learned:
      old = qp
      qp = {"step_size": jnp.where(seen, scale, old["step_size"])}
      if spec.learning == "lsq_plus":
        qp["offset"] = jnp.where(seen, -zp * scale, old["offset"])
      _write(module, PARAMS, name, qp, where, mode)
    else:
      stats = dict(stats, scale=jnp.where(seen, scale, stats["scale"]),
                   zero_point=jnp.where(seen, zp, stats["zero_point"]))
      _write(module, STATS, name, stats, where, mode)

  if spec.learning == "lsq":
    return _qdq(x, spec, qp["step_size"], None, module, mode)
  if spec.learning == "lsq_plus":
    return _qdq(x, spec, qp["step_size"], qp["offset"], module, mode)
  zp = None if spec.symmetric else stats["zero_point"]
  return _qdq(x, spec, stats["scale"], zp, module, mode)


def quantize_weight(module, name: str, w: jax.Array, spec: core.QuantSpec, mode: str,
                    where: str) -> jax.Array:
  """Fake-quantizes a weight ``w`` with the quantizer ``name`` of ``module``.

  The weight's range (``quant_stats[name]["scale"/"zero_point"]`` for fixed
  specs, ``quant_params[name]["step_size"/"offset"]`` for LSQ / LSQ+) is
  computed from the weight by the spec's observer at ``init`` and again in
  ``freeze`` mode, and is constant in between (as in the NNX front end).

  Args:
    module: the bound Linen module that owns the state.
    name: the quantizer name (normally the parameter's name).
    w: the weight, in the parameter's own layout.
    spec: its QuantSpec (granularity axes refer to ``w``'s axes).
    mode: one of :data:`MODES`.
    where: a description of the tensor for error messages.

  Returns:
    ``w`` fake-quantized (unchanged in ``calibrate`` mode).

  Raises:
    ValueError: if ``spec`` does not fit ``w`` or the state is missing or not
      mutable when the mode updates it.
  """
  check_shape(spec, w.shape, where)
  initializing = module.is_initializing()
  learned = spec.learning != "fixed"
  if initializing and not module.has_variable(STATS, name):
    stats = {"spec_id": spec_id(spec)}
    if not spec.is_block:
      scale, zp = _range(spec, w)
      if learned:
        _create(module, PARAMS, name, _learned_params(spec, scale, zp), where)
      else:
        stats["scale"], stats["zero_point"] = scale, zp
    _create(module, STATS, name, stats, where)
  if mode == "calibrate":
    return w
  if spec.is_block:
    return _qdq(w, spec, None, None, module, mode)
  if mode == "freeze" and not initializing:
    scale, zp = _range(spec, w)
    if learned:
      qp = _learned_params(spec, scale, zp)
      _write(module, PARAMS, name, qp, where, mode)
    else:
      stats = dict(_read(module, STATS, name, where), scale=scale, zero_point=zp)
      _write(module, STATS, name, stats, where, mode)
  if learned:
    qp = _read(module, PARAMS, name, where)
    return _qdq(w, spec, qp["step_size"], qp.get("offset"), module, mode)
  stats = _read(module, STATS, name, where)
  return _qdq(w, spec, stats["scale"], None if spec.symmetric else stats["zero_point"], module,
              mode)


def count_uncalibrated(stats: Any, prefix: str = "") -> list[str]:
  """Paths of activation quantizers in a ``quant_stats`` tree with ``count == 0``.

  Examples:
    >>> count_uncalibrated({"Dense_0": {"input": {"observer": {}, "count": jnp.zeros((), jnp.int32)}}})
    ['Dense_0/input']
  """
  out = []
  if isinstance(stats, dict) or hasattr(stats, "items"):
    if "count" in stats and "observer" in stats:
      if np.any(np.asarray(stats["count"]) == 0):
        out.append(prefix)
      return out
    for k, v in stats.items():
      out.extend(count_uncalibrated(v, f"{prefix}/{k}" if prefix else str(k)))
  return out
