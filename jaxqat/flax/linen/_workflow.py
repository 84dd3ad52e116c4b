"""Workflow helpers: calibrate, freeze, optimizer split, orbax checkpoints.

PTQ: ``calibrate`` over a few batches, then ``freeze``. QAT: then train
``{"params", "quant_params"}`` with any optax optimizer (``qat_optimizer``
gives the quantizer step sizes their own transformation, e.g. a lower
learning rate and no weight decay). Checkpoints hold the whole variables dict.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxqat.flax.linen import _module
from jaxqat.flax.linen import _quantizer


def _args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _merge(variables: Mapping[str, Any], updates: Mapping[str, Any]) -> dict:
  out = dict(variables)
  out.update(updates)
  return out


def calibrate(qmodel: _module.QuantizedModule, variables: Mapping[str, Any],
              batches: Iterable[Any]) -> dict:
  """Runs calibration batches through ``qmodel`` (PTQ statistics).

  Each batch runs the model in float (``mode="calibrate"``, jitted once)
  while every activation observer updates its ``quant_stats``.

  Args:
    qmodel: the quantized model.
    variables: its variables (from ``qmodel.init``, float params loaded).
    batches: an iterable of model inputs (an array, or a tuple of positional
      arguments).

  Returns:
    ``variables`` with updated ``quant_stats``.

  Raises:
    TypeError: if ``qmodel`` is not a :class:`QuantizedModule`.
    ValueError: if ``batches`` is empty.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = _module.quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> v = calibrate(qmodel, v, [jnp.full((1, 4), 2.0)])
    >>> int(v["quant_stats"]["input"]["count"])
    1
  """
  if not isinstance(qmodel, _module.QuantizedModule):
    raise TypeError(f"qmodel: expected a QuantizedModule from quantize(), got {type(qmodel).__name__}")
  cal = qmodel.with_mode("calibrate")

  @jax.jit
  def step(v, args):
    _, upd = cal.apply(v, *args, mutable=[_quantizer.STATS])
    return upd[_quantizer.STATS]

  n = 0
  variables = dict(variables)
  for batch in batches:
    variables[_quantizer.STATS] = step(variables, _args(batch))
    n += 1
  if n == 0:
    raise ValueError("batches: calibration needs at least one batch, got an empty iterable")
  return variables


def freeze(qmodel: _module.QuantizedModule, variables: Mapping[str, Any], *args, **kwargs) -> dict:
  """Turns observer statistics into ranges (end of calibration).

  Runs ``qmodel`` once in ``mode="freeze"`` on ``args``: fixed-range
  activations get ``scale`` / ``zero_point`` from their observer, LSQ
  activations get their initial step size (and LSQ+ offset ``β = -z s``),
  LSQ weights get a step size from the current weights. Quantizers that saw
  no calibration batch keep their current range, with a warning naming them.

  Args:
    qmodel: the quantized model.
    variables: its variables after :func:`calibrate`.
    *args: one batch of model inputs.
    **kwargs: keyword arguments of the model.

  Returns:
    ``variables`` with updated ``quant_stats`` and ``quant_params``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = _module.quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> v = freeze(qmodel, calibrate(qmodel, v, [jnp.full((1, 4), 2.55)]), jnp.ones((1, 4)))
    >>> round(float(v["quant_stats"]["input"]["scale"]), 6)  # min/max [0, 2.55] over 255 steps
    0.01
  """
  if not isinstance(qmodel, _module.QuantizedModule):
    raise TypeError(f"qmodel: expected a QuantizedModule from quantize(), got {type(qmodel).__name__}")
  missing = _quantizer.count_uncalibrated(variables.get(_quantizer.STATS, {}))
  if missing:
    warnings.warn(f"jaxqat: freeze: activation quantizers {missing} saw no calibration batch; "
                  "they keep their ranges from init", UserWarning, stacklevel=2)
  frz = qmodel.with_mode("freeze")

  @jax.jit
  def step(v, args):
    return frz.apply(v, *args, **kwargs, mutable=[_quantizer.STATS, _quantizer.PARAMS])[1]

  return _merge(variables, step(dict(variables), args))


def qat_optimizer(params_tx: optax.GradientTransformation,
                  quant_params_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """One optax optimizer for ``{"params": ..., "quant_params": ...}``.

  Every top-level entry other than ``quant_params`` (the float weights; a
  model without LSQ specs has no ``quant_params``) gets ``params_tx``.

  Args:
    params_tx: the transformation for the float weights.
    quant_params_tx: the one for the LSQ step sizes / offsets (typically a
      smaller learning rate and no weight decay).

  Returns:
    An ``optax.partition`` of the two over a dict of collections.

  Examples:
    >>> import optax, jax.numpy as jnp
    >>> tx = qat_optimizer(optax.sgd(0.5), optax.sgd(0.25))
    >>> t = {"params": {"w": jnp.ones(2)}, "quant_params": {"s": jnp.ones(())}}
    >>> u, _ = tx.update(t, tx.init(t), t)
    >>> float(u["params"]["w"][0]), float(u["quant_params"]["s"])
    (-0.5, -0.25)
  """
  def labels(tree):
    return {k: "quant_params" if k == "quant_params" else "params" for k in tree}

  return optax.partition({"params": params_tx, "quant_params": quant_params_tx}, labels)


# --------------------------------------------------------------------------
# Checkpoints (orbax).
# --------------------------------------------------------------------------


def _key(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def _flat(tree) -> dict:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_key(p): v for p, v in leaves}


def save(path, variables: Mapping[str, Any]) -> None:
  """Saves a quantized model's whole variables dict with orbax.

  Args:
    path: a directory that does not exist yet (absolute, or made absolute).
    variables: ``params``, ``quant_params``, ``quant_stats`` (and any other
      collections).

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = _module.quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save(d, v)
    >>> r = restore(d, v)
    >>> bool((r["params"]["kernel"] == v["params"]["kernel"]).all())
    True
  """
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(os.fspath(path)), dict(variables))
  ckptr.wait_until_finished()


def restore(path, target: Mapping[str, Any]) -> dict:
  """Restores variables saved by :func:`save` into the structure of ``target``.

  Before reading any array, the checkpoint's entries are compared with
  ``target``'s (path, shape, dtype); after reading, every quantizer's
  ``spec_id`` is compared, so a model quantized with other specs (int4 where
  the checkpoint has int8, say) is refused too.

  Args:
    path: the checkpoint directory.
    target: the variables of the model to restore into, e.g. from
      ``qmodel.init`` (concrete arrays; with abstract ``jax.ShapeDtypeStruct``
      leaves the spec check is skipped).

  Returns:
    The restored variables.

  Raises:
    ValueError: naming the first entry that is missing on either side, has
      another shape or dtype, or was quantized with another spec.
  """
  path = os.path.abspath(os.fspath(path))
  ckptr = ocp.StandardCheckpointer()
  saved = _flat(ckptr.metadata(path).item_metadata.tree)
  want = _flat(dict(target))
  for k in sorted(set(saved) - set(want)):
    raise ValueError(f"restore: checkpoint entry '{k}' has no counterpart in the model "
                     "(the model's structure or quantization rules differ)")
  for k in sorted(set(want) - set(saved)):
    raise ValueError(f"restore: model entry '{k}' is missing from the checkpoint "
                     "(the model's structure or quantization rules differ)")
  for k in sorted(want):
    s, w = saved[k], want[k]
    if tuple(s.shape) != tuple(np.shape(w)) or np.dtype(s.dtype) != np.dtype(w.dtype):
      raise ValueError(f"restore: entry '{k}' is {tuple(s.shape)} {np.dtype(s.dtype)} in the "
                       f"checkpoint but {tuple(np.shape(w))} {np.dtype(w.dtype)} in the model")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), dict(target))
  restored = ckptr.restore(path, abstract)
  got = _flat(restored)
  for k, w in want.items():
    if k.endswith("/spec_id") and not isinstance(w, jax.ShapeDtypeStruct):
      if not np.array_equal(np.asarray(got[k]), np.asarray(w)):
        raise ValueError(f"restore: entry '{k}': the checkpoint was quantized with another "
                         f"QuantSpec than the model's for '{k[:-len('/spec_id')]}'")
  return restored
