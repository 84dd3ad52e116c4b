"""Quantizer state and arithmetic for the Linen front end.

A *quantizer* is one tensor's quantization inside a layer: the input
activation of a matmul/conv (``"input"``) or a weight (``"kernel"``,
``"embedding"``...). Its state lives in the layer's own scope, in two
collections, so that the float ``params`` tree is untouched (the names are
those of the front-end contract, ``docs/contract.md``):

* ``quant_params`` (trainable): LSQ / LSQ+ ``log_scale`` (the learned step
  size stored as ``θ = log s``, :func:`jaxqat.core.param_to_step_size`) and
  ``offset`` (LSQ+ ``β``; Esser et al. 2020, Bhalgat et al. 2020).
* ``quant_stats`` (not trainable): ``fingerprint`` (the
  :func:`jaxqat.core.spec_fingerprint` of the quantizer's resolved spec, that
  :func:`~jaxqat.flax.linen.restore` checks); for activations the observer
  state, ``count`` (calibration batches seen) and, once calibrated, the fixed
  ``scale`` / ``zero_point``; for fixed-range weights ``scale`` /
  ``zero_point`` (the range at the last calibrate / freeze) and, when
  frozen, ``frozen``.

Which entries exist is part of the variables' *structure*, which is static
under ``jax.jit``: that is how a jitted model knows, at trace time, that an
activation quantizer was never calibrated (no ``scale``, no ``log_scale``: a
``ValueError`` naming the layer), that calibration found no data for it
(``stays_float``: it passes its input through), or that a weight range is
frozen (``frozen``: the stored range is used) rather than tracking the
current weight (:func:`jaxqat.core.weight_range`, every step).

Modes (internal; the public ones are ``quant`` and ``float``):

* ``calibrate``: activation observers see the (float) input, the op runs in
  float. Needs ``mutable=["quant_stats"]``.
* ``set``: ranges from the observers (fixed: ``scale``/``zero_point``; LSQ:
  ``log_scale`` and LSQ+ ``offset = -z s``), LSQ weight step sizes and fixed
  weight ranges from the current weights. Runs in float.
* ``freeze``: stores the current fixed weight ranges and marks them frozen.
* ``quant``: fake quantization (stochastic rounding draws from the
  ``"quant"`` RNG stream when one is given, and rounds half to even without).
* ``float``: every quantizer passes its input through.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxqat import core

MODES = ("quant", "float", "calibrate", "set", "freeze")
PUBLIC_MODES = ("quant", "float")
STATS = "quant_stats"
PARAMS = "quant_params"
_STATS_AND_PARAMS = "quant_stats' and 'quant_params"
FROZEN = "frozen"
STAYS_FLOAT = "stays_float"


def fingerprint(spec: core.QuantSpec) -> jax.Array:
  """``core.spec_fingerprint(spec)`` as an int32 scalar (a checkpointable leaf).

  Examples:
    >>> int(fingerprint(core.QuantSpec())) == core.spec_fingerprint(core.QuantSpec())
    True
  """
  return jnp.asarray(core.spec_fingerprint(spec), jnp.int32)


def describe(path: str) -> str:
  return repr(path) if path else "'<root>'"


def check_shape(spec: core.QuantSpec, shape, where: str) -> None:
  """Validates ``spec`` against a tensor shape; the error names ``where``."""
  try:
    spec.scale_shape(shape)
  except ValueError as e:
    raise ValueError(f"jaxqat: {where} of shape {tuple(shape)}: {e}") from None


class Store:
  """Where one layer keeps its quantizer state.

  Normally the layer's own scope. A layer run through a nested
  ``Module.apply`` (its own, params-only scope) keeps its state in the
  enclosing layer of the quantized model, under ``key`` (the nested layer's
  name), e.g. ``quant_stats["Model"]["Dense_0"]["kernel"]``.
  """

  def __init__(self, owner, key: tuple[str, ...] = ()):
    self.owner = owner
    self.key = tuple(key)

  def _top(self, col: str, name: str):
    return (self.key[0], self.key[1:] + (name,)) if self.key else (name, ())

  def get(self, col: str, name: str) -> Optional[Any]:
    top, rest = self._top(col, name)
    value = self.owner.get_variable(col, top) if self.owner.has_variable(col, top) else None
    for k in rest:
      if value is None or k not in value:
        return None
      value = value[k]
    return value

  def has(self, col: str, name: str) -> bool:
    return self.get(col, name) is not None

  def put(self, col: str, name: str, value, where: str, why: str) -> None:
    if not self.owner.is_mutable_collection(col):
      if self.owner.is_initializing():
        raise ValueError(
            f"jaxqat: cannot create '{col}/{name}' for {where}: the collection is not mutable "
            f"here. Inside a lifted transform (nn.scan, nn.vmap, nn.remat...) list "
            f"'{_STATS_AND_PARAMS}' with the params, e.g. variable_axes={{True: 0}} or "
            f"variable_axes={{'params': 0, 'quant_params': 0, 'quant_stats': 0}} (a scan "
            f"that broadcasts 'params' over time steps, as nn.RNN does, shares them "
            f"with the params by itself when its variable filters are collection names)")
      raise ValueError(f"jaxqat: {why} updates '{col}' ({where}); call apply(..., "
                       f"mutable=['quant_stats', 'quant_params'])")
    top, rest = self._top(col, name)
    if not rest:
      self.owner.put_variable(col, top, value)
      return
    tree = self.owner.get_variable(col, top) if self.owner.has_variable(col, top) else {}
    tree = _set_in(dict(tree), rest, value)
    self.owner.put_variable(col, top, tree)

  @property
  def initializing(self) -> bool:
    return self.owner.is_initializing()


def _set_in(tree: dict, keys: tuple, value) -> dict:
  if len(keys) == 1:
    tree[keys[0]] = value
    return tree
  sub = dict(tree.get(keys[0], {}))
  tree[keys[0]] = _set_in(sub, keys[1:], value)
  return tree


# Inside batched_step_sizes(): the paths of the step sizes stored in place of their log_scale.
_PENDING = contextvars.ContextVar("jaxqat_linen_pending_step_sizes", default=None)


def _learned(spec: core.QuantSpec, scale: jax.Array, zp: jax.Array, role: str,
             deferred: bool = False) -> dict:
  """LSQ ``log_scale`` (and LSQ+ offset ``β = -z s``) from a range (floored: init_step_size).

  ``deferred``: ``log_scale`` holds the step size itself, for
  :func:`batched_step_sizes` to convert.
  """
  scale = core.init_step_size(scale, role)
  qp = {"log_scale": scale if deferred else core.step_size_to_param(scale)}
  if spec.learning == "lsq_plus":
    qp["offset"] = (-zp * scale).astype(jnp.float32)
  return qp


def _pending_path(store: Store, name: str) -> tuple:
  top, rest = store._top(PARAMS, name)  # pylint: disable=protected-access
  return tuple(store.owner.scope.path) + (top,) + rest


def _put_learned(store: Store, name: str, spec: core.QuantSpec, scale, zp, role: str,
                 where: str, why: str = "calibration") -> None:
  """Stores a learned range (set by init or calibration; deferred inside batched_step_sizes)."""
  pending = _PENDING.get()
  store.put(PARAMS, name, _learned(spec, scale, zp, role, deferred=pending is not None), where,
            why)
  if pending is not None:
    pending.add(_pending_path(store, name))


def _deferred(store: Store, name: str) -> bool:
  """Whether ``name``'s ``log_scale`` holds a step size that batched_step_sizes converts."""
  pending = _PENDING.get()
  return pending is not None and _pending_path(store, name) in pending


@contextlib.contextmanager
def batched_step_sizes():
  """Converts the step sizes calibration sets inside the block with one ``step_size_to_param``.

  :func:`jaxqat.core.step_size_to_param` is elementwise: one call on all the
  learned step sizes of a model, concatenated, gives the same values as one
  call per tensor, and a traced program compiles its exact-logarithm search
  once instead of once per tensor (XLA unrolls each). Inside the block the
  ``log_scale`` entries that ``init`` or calibration set hold step sizes
  (a forward pass inside the block quantizes with them as they are); the
  yielded function converts them in the variables it is given (``init``'s
  variables or ``apply``'s updated collections), found by their paths.

  Yields:
    ``convert(variables) -> variables``.

  Raises:
    RuntimeError: (from ``convert``) if a step size set inside the block is
      not in ``variables``.
  """
  pending = set()
  token = _PENDING.set(pending)

  def convert(variables):
    paths = sorted(pending)
    if not paths:
      return variables
    found = []
    for path in paths:
      entry = variables.get(PARAMS, {})
      for k in path:
        entry = entry.get(k) if isinstance(entry, Mapping) else None
      if not isinstance(entry, Mapping) or "log_scale" not in entry:
        raise RuntimeError(f"jaxqat: internal error: the step size calibration set at "
                           f"{'/'.join(map(str, path))} is not in the updated variables")
      found.append(entry["log_scale"])
    flat = core.step_size_to_param(jnp.concatenate([jnp.ravel(s) for s in found]))
    params, start = variables[PARAMS], 0
    for path, s in zip(paths, found):
      params = _set_in(dict(params), path + ("log_scale",),
                       flat[start:start + s.size].reshape(s.shape))
      start += s.size
    return {**variables, PARAMS: params}

  try:
    yield convert
  finally:
    _PENDING.reset(token)


def _rounding(spec: core.QuantSpec, store: Store, mode: str):
  """The spec to use and the PRNG key for stochastic rounding.

  Without a ``"quant"`` RNG stream (evaluation), and outside the ``quant``
  mode, stochastic rounding becomes round half to even.
  """
  if spec.rounding != "stochastic":
    return spec, None
  owner = store.owner
  if mode != "quant" or store.initializing or not owner.has_rng("quant"):
    return spec.replace(rounding="nearest_even"), None
  return spec, owner.make_rng("quant")


_CAPTURE = threading.local()


def _qdq(x, spec, store, mode, scale=None, zero_point=None, log_scale=None, offset=None):
  spec, key = _rounding(spec, store, mode)
  if log_scale is not None:
    scale = core.param_to_step_size(log_scale)
  if spec.symmetric or spec.learning != "fixed":
    zero_point = None
  if getattr(_CAPTURE, "box", None) is not None:  # ranges(): record, do not apply
    _CAPTURE.box.append((spec, scale, zero_point, offset) if key is None else "stochastic")
    return x
  return core.quant_dequant(x, spec, scale, zero_point, offset=offset, key=key)


def ranges(quantize_fn, *args):
  """What ``quantize_fn(*args)`` would apply, without applying it.

  ``quantize_fn`` is :func:`quantize_activation` or :func:`quantize_weight`
  (in ``quant`` mode, state already created); the result is the range
  :func:`jaxqat.core.qat_op` takes, ``(spec, scale, zero_point, offset)``,
  ``None`` when the tensor passes through unquantized, or ``"stochastic"``
  for stochastic rounding (which ``qat_op`` does not do).

  Examples:
    >>> import jax.numpy as jnp
    >>> ranges(lambda x: x, jnp.ones(2)) is None
    True
  """
  _CAPTURE.box = box = []
  try:
    quantize_fn(*args)
  finally:
    _CAPTURE.box = None
  return box[0] if box else None


def quantize_activation(store: Store, name: str, x: jax.Array, spec: core.QuantSpec, mode: str,
                        where: str) -> jax.Array:
  """Fake-quantizes an activation ``x`` with the quantizer ``name``.

  Creates the quantizer's state (observer, ``count``, ``fingerprint``) at
  ``init``; its range is set by :func:`~jaxqat.flax.linen.calibrate`.

  Args:
    store: where the layer keeps its state.
    name: the quantizer name (a variable name in the layer's scope).
    x: the activation.
    spec: its QuantSpec.
    mode: one of :data:`MODES`.
    where: a description of the tensor for error messages.

  Returns:
    ``x`` fake-quantized (``x`` unchanged in the float, calibrate, set and
    freeze modes, at ``init``, for non-floating inputs, and for a quantizer
    that calibration found no data for).

  Raises:
    ValueError: if ``spec`` does not fit ``x``, the state is missing or not
      mutable when the mode updates it, or (mode ``quant``) the quantizer was
      never calibrated.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating) or mode == "float":
    return x
  check_shape(spec, x.shape, where)
  initializing = store.initializing
  stats = store.get(STATS, name)
  if initializing and stats is None:
    stats = {"fingerprint": fingerprint(spec)}
    if not spec.is_block:
      obs = core.observer(spec)
      stats.update(observer=obs.init(jax.lax.stop_gradient(x)), count=jnp.zeros((), jnp.int32))
    store.put(STATS, name, stats, where, "init")
  if stats is None:
    raise _missing(where, name)
  if spec.is_block:  # scales come from the data
    return x if mode != "quant" else _qdq(x, spec, store, mode)
  if initializing or mode == "freeze":
    return x
  obs = core.observer(spec)
  if mode == "calibrate":
    new = dict(stats, observer=obs.update(stats["observer"], jax.lax.stop_gradient(x)),
               count=stats["count"] + 1)
    store.put(STATS, name, new, where, "calibration")
    return x
  if STAYS_FLOAT in stats:
    return x
  if mode == "set":
    scale, zp = obs.compute(stats["observer"])
    if spec.learning == "fixed":
      store.put(STATS, name, dict(stats, scale=scale, zero_point=zp), where, "calibration")
    else:
      _put_learned(store, name, spec, scale, zp, "act", where)
    return x
  # mode == "quant"
  if spec.learning == "fixed":
    if "scale" not in stats:
      raise _uncalibrated(where)
    return _qdq(x, spec, store, mode, stats["scale"], stats["zero_point"])
  qp = store.get(PARAMS, name)
  if qp is None:
    raise _uncalibrated(where)
  return _qdq(x, spec, store, mode, log_scale=qp["log_scale"], offset=qp.get("offset"))


def _missing(where: str, name: str) -> ValueError:
  return ValueError(
      f"jaxqat: {where} has no '{STATS}/{name}' variable. Apply the quantized model with the "
      f"variables returned by its init() (params, quant_params and quant_stats), not only "
      f"'params'.")


def _uncalibrated(where: str) -> ValueError:
  return ValueError(
      f"jaxqat: {where} was never calibrated: its range is unknown. Run "
      f"variables = jaxqat.flax.linen.calibrate(qmodel, variables, data) first (or set_mode("
      f"qmodel, 'float') to run the float model)")


def quantize_weight(store: Store, name: str, w: jax.Array, spec: core.QuantSpec, mode: str,
                    where: str) -> jax.Array:
  """Fake-quantizes a weight ``w`` with the quantizer ``name``.

  A fixed-range weight's range is :func:`jaxqat.core.weight_range` of the
  current ``w`` at every call (no gradient through it) until frozen; a frozen
  one uses ``quant_stats[name]["scale"/"zero_point"]``. LSQ / LSQ+ weights
  use ``quant_params[name]["log_scale"/"offset"]``, initialised from ``w`` at
  ``init`` and again by calibration.

  Args:
    store: where the layer keeps its state.
    name: the quantizer name (normally the parameter's name).
    w: the weight, in the parameter's own layout.
    spec: its QuantSpec (granularity resolved; axes refer to ``w``'s axes).
    mode: one of :data:`MODES`.
    where: a description of the tensor for error messages.

  Returns:
    ``w`` fake-quantized (unchanged in the float and calibrate modes).

  Raises:
    ValueError: if ``spec`` does not fit ``w`` or the state is missing or not
      mutable when the mode updates it.
  """
  if mode == "float":
    return w
  check_shape(spec, w.shape, where)
  learned = spec.learning != "fixed"
  stats = store.get(STATS, name)
  if store.initializing and stats is None:
    stats = {"fingerprint": fingerprint(spec)}
    if not spec.is_block:
      scale, zp = core.weight_range(w, spec)
      if learned:
        _put_learned(store, name, spec, scale, zp, "weight", where, "init")
      else:
        stats.update(scale=scale, zero_point=zp)
    store.put(STATS, name, stats, where, "init")
  if stats is None:
    raise _missing(where, name)
  if mode == "calibrate" or spec.is_block:
    return w if mode != "quant" else _qdq(w, spec, store, mode)
  if mode in ("set", "freeze") and not store.initializing:
    scale, zp = core.weight_range(w, spec)
    if learned and mode == "set":
      _put_learned(store, name, spec, scale, zp, "weight", where)
    elif not learned:
      new = dict(stats, scale=scale, zero_point=zp)
      if mode == "freeze":
        new[FROZEN] = jnp.ones((), jnp.int32)
      store.put(STATS, name, new, where, mode)
    return w
  if mode != "quant":
    return w
  if learned:
    qp = store.get(PARAMS, name)
    if qp is None:
      raise ValueError(f"jaxqat: {where} has no '{PARAMS}/{name}' variable; apply the model "
                       "with the variables of its init() and calibrate()")
    if _deferred(store, name):  # inside init: the step size itself, converted afterwards
      return _qdq(w, spec, store, mode, qp["log_scale"], offset=qp.get("offset"))
    return _qdq(w, spec, store, mode, log_scale=qp["log_scale"], offset=qp.get("offset"))
  if FROZEN in stats:
    return _qdq(w, spec, store, mode, stats["scale"], stats["zero_point"])
  scale, zp = core.weight_range(w, spec)  # tracks the current weight, no gradient
  return _qdq(w, spec, store, mode, scale, zp)


# --------------------------------------------------------------------------
# Walking a quant_stats tree (outside jit).
# --------------------------------------------------------------------------


def quantizer_entries(stats: Any, prefix: tuple = ()) -> list[tuple[tuple, dict]]:
  """``(path, entry)`` of every quantizer in a ``quant_stats`` tree.

  Examples:
    >>> tree = {"Dense_0": {"input": {"fingerprint": 1, "count": 0, "observer": {}}}}
    >>> [p for p, _ in quantizer_entries(tree)]
    [('Dense_0', 'input')]
  """
  out = []
  if hasattr(stats, "items"):
    if "fingerprint" in stats:
      return [(prefix, stats)]
    for k, v in stats.items():
      out.extend(quantizer_entries(v, prefix + (str(k),)))
  return out


def saw_no_data(entry: dict) -> bool:
  """Whether an activation quantizer's observer saw no batch or no finite value."""
  if np.all(np.asarray(entry["count"]) == 0):
    return True
  return bool(np.all(np.asarray(entry["observer"]["count"]) == 0))
