"""Orbax checkpoints of a quantized Linen model's variables, checked on restore.

A checkpoint holds the whole variables dict: ``params``, ``quant_params`` and
``quant_stats`` (observer state, ranges, each quantizer's spec
``fingerprint`` and the ``frozen`` / ``stays_float`` marks, i.e. the modes).
:func:`restore` refuses a checkpoint that does not match the model: a missing
or unreadable directory, an entry missing on either side, another shape or
dtype, or a quantizer saved with another spec, each named in the error.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxqat.flax.linen import _quantizer

# Entries that calibrate / freeze add to a quantizer: a target from init()
# (not calibrated yet) accepts them from the checkpoint.
_RANGE_ENTRIES = ("scale", "zero_point", "log_scale", "offset", _quantizer.FROZEN,
                  _quantizer.STAYS_FLOAT)


def _key(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def _flat(tree) -> dict:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_key(p): v for p, v in leaves}


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for k, v in flat.items():
    node = out
    *head, last = k.split("/")
    for h in head:
      node = node.setdefault(h, {})
    node[last] = v
  return out


def save(path, variables: Mapping[str, Any]) -> None:
  """Saves a quantized model's whole variables dict with orbax.

  Args:
    path: a directory that does not exist yet (absolute, or made absolute).
    variables: ``params``, ``quant_params``, ``quant_stats`` (and any other
      collections).

  Raises:
    TypeError: if ``variables`` is not a dict.
    ValueError: if ``path`` exists already.

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize
    >>> qmodel = quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save(d, v)
    >>> r = restore(d, v)
    >>> bool((r["params"]["kernel"] == v["params"]["kernel"]).all())
    True
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"variables: expected a dict of collections, got {type(variables).__name__}")
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    raise ValueError(f"path: {path} exists already; save to a new directory")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, dict(variables))
  ckptr.wait_until_finished()


def _metadata(path: str) -> dict:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"restore: no checkpoint directory at {path}")
  try:
    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree is None and isinstance(getattr(meta, "item_metadata", None), Mapping):
      tree = meta.item_metadata
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"restore: cannot read the checkpoint metadata in {path} "
                     f"({type(e).__name__}: {e}); the directory is not a complete checkpoint "
                     "written by save()") from e
  if tree is None:
    raise ValueError(f"restore: {path} holds no checkpoint metadata (a missing or corrupted "
                     "_METADATA file); it is not a complete checkpoint written by save()")
  return _flat(tree)


def restore(path, variables: Mapping[str, Any]) -> dict:
  """Restores variables saved by :func:`save` into the structure of ``variables``.

  Before reading any array, the checkpoint's entries are compared with
  ``variables``' (path, shape, dtype); after reading, every quantizer's spec
  ``fingerprint`` is compared, so a model quantized with other specs (int4
  where the checkpoint has int8, say) is refused too. ``variables`` may come
  straight from ``qmodel.init`` (not calibrated): the checkpoint's ranges,
  learned step sizes and ``frozen`` / ``stays_float`` marks of the model's
  quantizers are restored with it.

  Args:
    path: the checkpoint directory.
    variables: the variables of the model to restore into, e.g. from
      ``qmodel.init`` (concrete arrays; with abstract
      ``jax.ShapeDtypeStruct`` leaves the fingerprint check is skipped).

  Returns:
    The restored variables.

  Raises:
    FileNotFoundError: naming ``path`` if there is no such directory.
    ValueError: naming ``path`` if it is not a readable checkpoint (missing
      or corrupted files), or the first entry that is missing on either
      side, has another shape or dtype, or was quantized with another spec.
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"variables: expected a dict of collections, got {type(variables).__name__}")
  path = os.path.abspath(os.fspath(path))
  saved = _metadata(path)
  want = _flat(dict(variables))
  quantizers = {k[:-len("/fingerprint")] for k in want if k.endswith("/fingerprint")}
  quantizers |= {k.replace(_quantizer.STATS + "/", _quantizer.PARAMS + "/", 1) for k in quantizers}
  for k in sorted(set(saved) - set(want)):
    head, _, leaf = k.rpartition("/")
    if leaf in _RANGE_ENTRIES and head in quantizers:
      continue
    raise ValueError(f"restore: {path}: checkpoint entry '{k}' has no counterpart in the model "
                     "(the model's structure or quantization rules differ)")
  for k in sorted(set(want) - set(saved)):
    raise ValueError(f"restore: {path}: model entry '{k}' is missing from the checkpoint "
                     "(the model's structure or quantization rules differ)")
  for k in sorted(want):
    s, w = saved[k], want[k]
    if tuple(s.shape) != tuple(np.shape(w)) or np.dtype(s.dtype) != np.dtype(w.dtype):
      raise ValueError(f"restore: {path}: entry '{k}' is {tuple(s.shape)} {np.dtype(s.dtype)} in "
                       f"the checkpoint but {tuple(np.shape(w))} {np.dtype(w.dtype)} in the model")
  abstract = _unflatten({k: jax.ShapeDtypeStruct(tuple(s.shape), np.dtype(s.dtype))
                         for k, s in saved.items()})
  try:
    restored = ocp.StandardCheckpointer().restore(path, abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"restore: cannot read the arrays of the checkpoint in {path} "
                     f"({type(e).__name__}: {e}); a data file is missing or corrupted") from e
  got = _flat(restored)
  for k, w in want.items():
    if k.endswith("/fingerprint") and not isinstance(w, jax.ShapeDtypeStruct):
      if not np.array_equal(np.asarray(got[k]), np.asarray(w)):
        raise ValueError(f"restore: {path}: entry '{k}': the checkpoint was quantized with "
                         f"another QuantSpec than the model's for '{k[:-len('/fingerprint')]}'")
  return restored
