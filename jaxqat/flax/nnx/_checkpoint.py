"""Orbax checkpoints of quantized NNX models (weights + quantizer state).

:func:`save_checkpoint` writes ``nnx.state(model)`` as a nested dict of
arrays with ``orbax.checkpoint.StandardCheckpointer`` -- the model's
parameters, the quantizers' scales, zero points, LSQ parameters and observer
statistics -- plus, as orbax custom metadata, each quantizer's spec, role,
mode and frozen flag (JSON; no pickle).

:func:`restore_checkpoint` restores into a model of the same structure
(typically ``quantize(build_float_model(), same_rules)``). Before reading any
array it compares the checkpoint with the model and raises a ``ValueError``
naming the first entries that differ: a missing or unexpected entry, a shape
or dtype mismatch (e.g. a per-channel scale restored into a per-tensor
quantizer), or a quantizer whose spec differs. On success the quantizers also
take the mode and frozen flag they were saved with.
"""

from __future__ import annotations

import os
from typing import Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxqat.flax.nnx._convert import path_str
from jaxqat.flax.nnx._quantizer import Quantizer

__all__ = ["save_checkpoint", "restore_checkpoint"]

_SCHEMA = 1


def _quant_meta(model) -> dict:
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer):
      out[path_str(path)] = {"spec": repr(node.spec), "role": node.role, "mode": node.mode,
                             "frozen": bool(node.frozen)}
  return out


def _flat(tree) -> dict[str, tuple]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for kp, leaf in leaves:
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)
    out[key] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def save_checkpoint(directory: Union[str, os.PathLike], model: nnx.Module, *,
                    force: bool = False) -> None:
  """Saves ``model``'s whole state (weights + quantizer state) with orbax.

  Args:
    directory: an absolute or relative path; it must not exist unless
      ``force``.
    model: an NNX model (quantized or not).
    force: overwrite an existing checkpoint.

  Raises:
    TypeError: if ``model`` is not an NNX module.

  Examples:
    >>> import tempfile, os
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize, freeze
    >>> m = freeze(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), []))
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save_checkpoint(d, m)
    >>> os.path.isdir(d)
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  state = nnx.to_pure_dict(nnx.state(model))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), state, force=force,
             custom_metadata={"jaxqat": {"schema": _SCHEMA, "quantizers": _quant_meta(model)}})
  ckptr.wait_until_finished()


def restore_checkpoint(directory: Union[str, os.PathLike], model: nnx.Module) -> nnx.Module:
  """Restores a checkpoint of :func:`save_checkpoint` into ``model`` (in place).

  Args:
    directory: the checkpoint directory.
    model: a model of the same structure and quantization specs.

  Returns:
    ``model``, with the saved state and quantizer modes.

  Raises:
    FileNotFoundError: if ``directory`` does not exist.
    ValueError: if the checkpoint does not match the model; the message
      names the mismatched entries.

  Examples:
    >>> import tempfile, os
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize, freeze
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> from jaxqat.core import QuantSpec, Rule
    >>> rules = [Rule(pattern=".*", weight=QuantSpec())]
    >>> save_checkpoint(d, freeze(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rules)))
    >>> m = restore_checkpoint(d, quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(1)), rules))
    >>> m.kernel_quant.mode
    'quant'
    >>> restore_checkpoint(d, nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
    Traceback (most recent call last):
    ...
    ValueError: restore_checkpoint: the checkpoint does not match the model: entries missing from the model: ['kernel_quant/scale']
  """
  directory = os.path.abspath(directory)
  if not os.path.exists(directory):
    raise FileNotFoundError(f"directory: no checkpoint at {directory!r}")
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(directory)
  item = meta.item_metadata
  saved = _flat(getattr(item, "tree", item))
  state = nnx.state(model)
  target = nnx.to_pure_dict(state)
  want = _flat(target)
  problems = []
  extra = sorted(set(saved) - set(want))
  missing = sorted(set(want) - set(saved))
  if extra:
    problems.append(f"entries missing from the model: {extra}")
  if missing:
    problems.append(f"entries missing from the checkpoint: {missing}")
  for k in sorted(set(saved) & set(want)):
    if saved[k] != want[k]:
      problems.append(f"entry '{k}': checkpoint has shape {saved[k][0]} {saved[k][1]}, the "
                      f"model has {want[k][0]} {want[k][1]}")
  custom = (meta.custom_metadata or {}).get("jaxqat", {})
  qsaved = custom.get("quantizers", {})
  qmodel = _quant_meta(model)
  for p in sorted(set(qsaved) & set(qmodel)):
    if qsaved[p]["spec"] != qmodel[p]["spec"]:
      problems.append(f"quantizer '{p}': checkpoint spec {qsaved[p]['spec']} differs from the "
                      f"model's {qmodel[p]['spec']}")
  if problems:
    raise ValueError("restore_checkpoint: the checkpoint does not match the model: "
                     + "; ".join(problems))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  restored = ckptr.restore(directory, abstract)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer) and path_str(path) in qsaved:
      node.mode = qsaved[path_str(path)]["mode"]
      node.frozen = bool(qsaved[path_str(path)]["frozen"])
  return model
