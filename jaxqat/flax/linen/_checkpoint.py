"""Orbax checkpoints of a quantized Linen model's variables, checked on restore.

A checkpoint holds the whole variables dict: ``params``, ``quant_params`` and
``quant_stats`` (observer state, ranges, each quantizer's spec
``fingerprint`` and the ``frozen`` / ``stays_float`` marks, i.e. the modes).
:func:`restore` refuses a checkpoint that does not match the model: a missing
or unreadable directory, an entry missing on either side, another shape or
dtype, or a quantizer saved with another spec, each named in the error.

:func:`save_served` / :func:`restore_served` do the same for a converted
(served) model: its integer codes and scales, with each QTensor's spec.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import flax.linen as nn
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


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _rebox(restored: dict, template: Mapping[str, Any]) -> dict:
  """``restored`` with each boxed parameter of ``template`` boxed again.

  Flax metadata boxes (``nn.with_logical_partitioning``, ``nn.Partitioned``)
  are pytree nodes: orbax writes their ``value`` and reads it back as a
  ``{'value': array}`` dict, which a model cannot run on.
  """
  boxes, _ = jax.tree_util.tree_flatten_with_path(dict(template), is_leaf=_is_box)
  for p, box in boxes:
    if not _is_box(box):
      continue
    *head, last = _key(p).split("/")
    node = restored
    for h in head:
      node = node[h]
    inner = node[last]
    node[last] = box.replace_boxed(inner["value"] if isinstance(inner, Mapping) else inner)
  return restored


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
  return _rebox(restored, variables)


# --------------------------------------------------------------------------
# The served (converted) model.
# --------------------------------------------------------------------------

_SERVED_META = "jaxqat_served.json"
_SERVED_ARRAYS = "arrays"
_SERVED_FORMAT = "jaxqat.flax.linen served variables"
_QT_FIELDS = ("values", "scale", "zero_point", "tensor_scale")
_ENC_FIELDS = ("scale", "zero_point")


def _served_leaves(tree, prefix=()):
  """``(key, value)`` of every value of a served variables tree; QTensors and Encodings whole."""
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _served_leaves(v, prefix + (str(k),))
  elif _is_box(tree):
    yield "/".join(prefix), tree
  else:
    yield "/".join(prefix), tree


_BOXES = {c.__name__: c for c in (nn.Partitioned, nn.LogicallyPartitioned)}  # names only


def _box_meta(key: str, box) -> dict:
  """The JSON record of a Flax partitioning box around a served float parameter."""
  if _BOXES.get(type(box).__name__) is not type(box) or box.mesh is not None or (
      getattr(box, "rules", None) is not None):
    raise TypeError(f"served_variables: '{key}' is boxed in {type(box).__name__} with a mesh or "
                    "rules; save_served keeps nn.Partitioned / nn.LogicallyPartitioned names only "
                    "(unbox it with flax.linen.meta.unbox, or drop the mesh)")
  return {"type": "boxed", "box": type(box).__name__, "names": list(box.names)}


def _box_from_meta(info: dict, value):
  return _BOXES[info["box"]](value, tuple(info["names"]))


def save_served(path, served_module, served_variables: Mapping[str, Any]) -> None:
  """Saves a converted model (from ``convert``) with orbax: integer codes, scales, flags.

  The directory holds an orbax checkpoint of the arrays (``arrays/``: the
  QTensors' codes, scales and zero points, the input Encodings' scales, the
  float parameters left) and ``jaxqat_served.json`` (each QTensor's and
  Encoding's spec, dtype and packing, and the served module's ``integer`` /
  ``pack`` flags). No float copy of a quantized weight is written.

  Args:
    path: a directory that does not exist yet.
    served_module: the served module returned by ``convert``.
    served_variables: its variables.

  Raises:
    TypeError: if ``served_module`` is not a served module or
      ``served_variables`` not a dict.
    ValueError: if ``path`` exists already.

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize, calibrate
    >>> from jaxqat.flax.linen._serve import convert
    >>> qmodel = quantize(nn.Dense(3))
    >>> x = jnp.ones((2, 4))
    >>> served, sv = convert(qmodel, calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x]))
    >>> d = os.path.join(tempfile.mkdtemp(), "served")
    >>> save_served(d, served, sv)
    >>> served2, sv2 = restore_served(d, qmodel)
    >>> bool((served2.apply(sv2, x) == served.apply(sv, x)).all())
    True
  """
  from jaxqat import core  # pylint: disable=import-outside-toplevel
  from jaxqat.flax.linen import _serve  # pylint: disable=import-outside-toplevel
  _serve._check_served(served_module)  # pylint: disable=protected-access
  if not isinstance(served_variables, Mapping):
    raise TypeError("served_variables: expected a dict of collections, got "
                    f"{type(served_variables).__name__}")
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    raise ValueError(f"path: {path} exists already; save to a new directory")
  arrays, leaves = {}, {}
  for key, v in _served_leaves(served_variables):
    if isinstance(v, core.QTensor):
      fields = [f for f in _QT_FIELDS if getattr(v, f) is not None]
      leaves[key] = {"type": "qtensor", "spec": core.spec_to_dict(v.spec),
                     "dtype": np.dtype(v.dtype).name, "packed": int(v.packed), "fields": fields}
    elif isinstance(v, core.Encoding):
      fields = [f for f in _ENC_FIELDS if getattr(v, f) is not None]
      leaves[key] = {"type": "encoding", "spec": core.spec_to_dict(v.spec), "fields": fields}
    elif _is_box(v):
      leaves[key] = _box_meta(key, v)
      arrays[f"{key}/value"] = v.unbox()
      continue
    else:
      arrays[key] = v
      continue
    for f in fields:
      arrays[f"{key}/{f}"] = getattr(v, f)
  os.makedirs(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, _SERVED_ARRAYS), _unflatten(arrays))
  ckptr.wait_until_finished()
  meta = {"format": _SERVED_FORMAT, "version": 1, "integer": bool(served_module.integer),
          "pack": bool(served_module.pack), "leaves": leaves}
  with open(os.path.join(path, _SERVED_META), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)


def restore_served(path, qmodel) -> tuple[Any, dict]:
  """Restores a converted model saved by :func:`save_served`.

  Args:
    path: the directory written by :func:`save_served`.
    qmodel: the quantized model it was converted from (``quantize(model,
      rules)`` with the same model and rules; it need not be initialised or
      calibrated).

  Returns:
    ``(served_module, served_variables)``, as ``convert`` returned them.

  Raises:
    TypeError: if ``qmodel`` is not a QuantizedModule.
    FileNotFoundError: if ``path`` is not a directory.
    ValueError: if ``path`` is not a served checkpoint (missing or
      corrupted files, another format), naming what is wrong.

  Examples:
    >>> import flax.linen as nn
    >>> from jaxqat.flax.linen import quantize
    >>> restore_served("/nonexistent/served", quantize(nn.Dense(3)))
    Traceback (most recent call last):
    ...
    FileNotFoundError: restore_served: no directory at /nonexistent/served
  """
  from jaxqat import core  # pylint: disable=import-outside-toplevel
  from jaxqat.flax.linen import _intercept  # pylint: disable=import-outside-toplevel
  from jaxqat.flax.linen import _module  # pylint: disable=import-outside-toplevel
  _module.check_qmodel(qmodel)
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"restore_served: no directory at {path}")
  meta_file = os.path.join(path, _SERVED_META)
  try:
    with open(meta_file, "r", encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"restore_served: cannot read {meta_file} ({type(e).__name__}: {e}); {path} "
                     "is not a complete checkpoint written by save_served()") from None
  if not isinstance(meta, dict) or meta.get("format") != _SERVED_FORMAT:
    raise ValueError(f"restore_served: {meta_file} is not a jaxqat served-model file")
  arrays_dir = os.path.join(path, _SERVED_ARRAYS)
  saved = _metadata(arrays_dir)
  abstract = _unflatten({k: jax.ShapeDtypeStruct(tuple(s.shape), np.dtype(s.dtype))
                         for k, s in saved.items()})
  try:
    flat = _flat(ocp.StandardCheckpointer().restore(arrays_dir, abstract))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"restore_served: cannot read the arrays of {arrays_dir} "
                     f"({type(e).__name__}: {e}); a data file is missing or corrupted") from e
  out = {}
  try:
    for key, info in meta["leaves"].items():
      if info["type"] == "boxed":
        out[key] = _box_from_meta(info, flat.pop(f"{key}/value"))
        continue
      fields = {f: flat.pop(f"{key}/{f}") for f in info["fields"]}
      spec = core.spec_from_dict(info["spec"])
      if info["type"] == "qtensor":
        out[key] = core.QTensor(spec=spec, dtype=np.dtype(jax.numpy.dtype(info["dtype"])),
                                packed=int(info["packed"]), **fields)
      else:
        out[key] = core.Encoding(fields.get("scale"), fields.get("zero_point"), spec)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"restore_served: {meta_file} does not match the arrays in {arrays_dir} "
                     f"({type(e).__name__}: {e})") from None
  out.update(flat)
  variables = _unflatten(out)
  variables.setdefault("params", {})
  served_module = _module.with_mode(qmodel, _intercept.SERVED, integer=bool(meta["integer"]),
                                    pack=bool(meta["pack"]))
  return served_module, variables
