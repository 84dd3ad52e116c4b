"""Orbax checkpoints of quantized NNX models (weights + quantizer state + specs).

:func:`save` writes ``nnx.state(model)`` as a nested dict of arrays with
``orbax.checkpoint.StandardCheckpointer`` -- the model's parameters, the
quantizers' ``scale``/``zero_point``/``log_scale``/``offset`` and observer
statistics -- and, next to orbax's files, ``jaxqat.json``: each quantizer's
spec (:func:`jaxqat.core.spec_to_dict` and its
:func:`jaxqat.core.spec_fingerprint`), role, mode and static flags (JSON;
no pickle).

:func:`restore` restores into a model of the same structure (typically
``quantize(build_float_model(), same_rules)``). Before reading any array it
checks, and refuses with a ``ValueError`` naming the file or entry:

* ``jaxqat.json`` missing, truncated or of another schema (a checkpoint
  without it would silently restore a model whose quantizers were never
  calibrated);
* a quantizer missing on either side, or whose spec differs (an int4 model
  refuses an int8 checkpoint even when the shapes agree);
* an array entry missing on either side, or of another shape or dtype;
* orbax's own errors (a checksum failure in a data file, unreadable
  metadata), re-raised with the checkpoint directory and orbax's message.

On success the quantizers take the modes and flags they were saved with
(``mode``, ``frozen``, ``calibrated``, ``disabled``).

**Served models** (:func:`jaxqat.flax.nnx.convert`) save and restore the
same way: their state is the weight codes, scales and input encodings (no
float copy of a quantized weight), and ``jaxqat.json`` records each served
weight's spec fingerprint, dequantized dtype and packing (key ``"served"``);
restore into a served model of the same structure (``convert`` of a QAT
model built with the same rules) refuses a checkpoint whose served specs
differ (an int4 served model refuses an int8 checkpoint).
"""

from __future__ import annotations

import json
import os
from typing import Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxqat import core
from jaxqat.core._report import describe_spec
from jaxqat.flax.nnx import _intercept
from jaxqat.flax.nnx import _layers
from jaxqat.flax.nnx._convert import path_str
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._serve import served_meta

__all__ = ["save", "restore", "METADATA_FILE"]

_SCHEMA = 2
METADATA_FILE = "jaxqat.json"


def _quant_meta(model) -> dict:
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer):
      out[path_str(path)] = {
          "spec": core.spec_to_dict(node.spec), "fingerprint": core.spec_fingerprint(node.spec),
          "role": node.role, "mode": node.mode, "frozen": bool(node.frozen),
          "calibrated": bool(node.calibrated), "disabled": node.disabled}
  return out


_SEEN_ATTRS = ("jaxqat_ran", "jaxqat_matmul_weights", "jaxqat_lookup_weights")


def _seen_meta(model) -> dict:
  """What the model's runs saw (layers that ran, weights that fed a matmul), per module path.

  ``convert`` and the fake-quant call depend on it (a layer's weight that
  another module read directly while the layer never ran stays float; a
  weight an earlier call fed to a matmul is read quantized by its other
  uses), so a restored model that has not run yet behaves as the saved one.
  """
  out = {}
  for p, node in nnx.iter_graph(model):
    seen = {a: getattr(node, "__dict__", {})[a] for a in _SEEN_ATTRS
            if getattr(node, "__dict__", {}).get(a) is not None}
    if seen:
      out[path_str(p)] = {a: (list(v) if isinstance(v, tuple) else v) for a, v in seen.items()}
  return out


def _restore_seen(model, seen) -> None:
  if not isinstance(seen, dict):
    return
  for p, node in nnx.iter_graph(model):
    for a, v in (seen.get(path_str(p)) or {}).items():
      if a in _SEEN_ATTRS:
        _layers.set_static(node, a, tuple(v) if isinstance(v, list) else bool(v))


def _adopt_resolved_channels(model, qsaved: dict) -> list:
  """Takes the checkpoint's output-channel axes for intercepted weights not resolved yet.

  An intercepted module's ``PerOutputChannel()`` weight starts on the last
  axis and is resolved per op by a run (``calibrate``): a tied embedding
  read by ``attend`` quantizes per row. A freshly quantized target has not
  run yet, so where the checkpoint holds the same spec resolved to other
  axes, the target's quantizer is re-made for them, as calibrate would.

  Returns:
    ``(module, name, old quantizer)`` of each change, to undo it.
  """
  changed = []
  for p, node in nnx.iter_graph(model):
    wqs = getattr(node, "jaxqat_weight_quant", None) if isinstance(
        node, _intercept.InterceptMixin) else None
    if wqs is None:
      continue
    for name in list(wqs.keys()):
      wq, saved = wqs[name], qsaved.get(path_str(tuple(p) + ("jaxqat_weight_quant", name)))
      if wq.output_channel_spec is None or not isinstance(saved, dict) or (
          saved.get("fingerprint") == core.spec_fingerprint(wq.spec)):
        continue
      try:
        spec = core.spec_from_dict(saved["spec"])
      except Exception:  # pylint: disable=broad-except
        continue  # reported by restore's spec check
      axes = spec.granularity.axes if isinstance(spec.granularity, core.PerChannel) else ()
      if wq.output_channel_spec.resolve_output_channel(axes) == spec:
        _intercept.reresolve(node, name, axes)
        changed.append((node, name, wq))
  return changed


def _flat(tree) -> dict[str, tuple]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for kp, leaf in leaves:
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)  # orbax stores a key's raw data
    out[key] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def save(path: Union[str, os.PathLike], model: nnx.Module, *, force: bool = False) -> None:
  """Saves ``model``'s whole state (weights + quantizer state + specs) with orbax.

  Args:
    path: the checkpoint directory (absolute or relative); it must not exist
      unless ``force``.
    model: an NNX model (quantized or not).
    force: overwrite an existing checkpoint.

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if ``path`` exists and ``force`` is False.

  Examples:
    >>> import tempfile, os
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save(d, quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
    >>> os.path.isfile(os.path.join(d, "jaxqat.json"))
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  directory = os.path.abspath(os.fspath(path))
  if os.path.exists(directory) and not force:
    raise ValueError(f"path: {directory!r} exists already; pass force=True to overwrite it")
  state = nnx.to_pure_dict(nnx.state(model))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory, state, force=force)
  ckptr.wait_until_finished()
  meta = {"schema": _SCHEMA, "quantizers": _quant_meta(model), "served": served_meta(model),
          "seen": _seen_meta(model)}
  with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1, sort_keys=True)


def _read_meta(directory: str) -> dict:
  file = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"restore: {file} is missing: the checkpoint has no jaxqat metadata (the "
                     "quantizer specs and modes), so it cannot be checked against the model; "
                     "save it with jaxqat.flax.nnx.save")
  try:
    with open(file, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"restore: {file} cannot be read (truncated or corrupted?): {e}") from None
  if not isinstance(meta, dict) or meta.get("schema") != _SCHEMA or not isinstance(
      meta.get("quantizers"), dict):
    raise ValueError(f"restore: {file} is not jaxqat NNX checkpoint metadata of schema {_SCHEMA} "
                     f"(got schema {meta.get('schema') if isinstance(meta, dict) else None!r})")
  return meta


def _orbax_message(e: Exception) -> str:
  """Orbax's error without the long tensorstore spec it appends."""
  return f"{type(e).__name__}: {str(e).split(' [tensorstore_spec=')[0]}"


def _raise_unreadable(ckptr, directory: str):
  """Orbax could not read the checkpoint's metadata: find the file and the reason."""
  for name in ("_METADATA", "_CHECKPOINT_METADATA"):
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      raise ValueError(f"restore: {file} is missing: not a complete orbax checkpoint")
    try:
      with open(file, encoding="utf-8") as f:
        json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"restore: {file} cannot be read (truncated or corrupted?): {e}") from None
  try:
    ckptr.restore(directory)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"restore: orbax cannot read the checkpoint in {directory}: "
                     f"{_orbax_message(e)}") from e
  raise ValueError(f"restore: orbax cannot read the checkpoint metadata in {directory}")


def restore(path: Union[str, os.PathLike], model: nnx.Module) -> nnx.Module:
  """Restores a checkpoint of :func:`save` into ``model`` (in place).

  Args:
    path: the checkpoint directory.
    model: a model of the same structure and quantization specs.

  Returns:
    ``model``, with the saved state and quantizer modes.

  Raises:
    TypeError: if ``model`` is not an NNX module.
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if the checkpoint is incomplete or corrupted, or does not
      match the model (see the module docstring); the message names the file
      or the entries.

  Examples:
    >>> import tempfile, os
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule
    >>> from jaxqat.flax.nnx import quantize
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save(d, quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), Rule(pattern=".*",
    ...                                                          weight=QuantSpec())))
    >>> m = restore(d, quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(1)),
    ...                         Rule(pattern=".*", weight=QuantSpec(format="int4"))))
    Traceback (most recent call last):
    ...
    ValueError: restore: the checkpoint does not match the model: quantizer 'kernel_quant': the checkpoint's spec is int8 per-tensor symmetric fixed, the model's int4 per-tensor symmetric fixed
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  directory = os.path.abspath(os.fspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"path: no checkpoint directory at {directory!r}")
  meta = _read_meta(directory)
  changed = _adopt_resolved_channels(model, meta["quantizers"])
  try:
    return _restore_checked(directory, model, meta)
  except BaseException:
    for node, name, wq in changed:  # a refused checkpoint changes nothing
      node.jaxqat_weight_quant[name] = wq
    raise


def _restore_checked(directory: str, model: nnx.Module, meta: dict) -> nnx.Module:
  """:func:`restore` once the target's output channels follow the checkpoint."""
  problems = []
  qsaved, qmodel = meta["quantizers"], _quant_meta(model)
  if sorted(set(qmodel) - set(qsaved)):
    problems.append(f"quantizers missing from the checkpoint: {sorted(set(qmodel) - set(qsaved))}")
  if sorted(set(qsaved) - set(qmodel)):
    problems.append(f"quantizers missing from the model: {sorted(set(qsaved) - set(qmodel))}")
  for p in sorted(set(qsaved) & set(qmodel)):
    s, m = qsaved[p], qmodel[p]
    if s.get("mode") not in ("quant", "float") or not all(
        isinstance(s.get(k), bool) for k in ("frozen", "calibrated")):
      problems.append(f"quantizer '{p}': the checkpoint's mode/flags are invalid (mode "
                      f"{s.get('mode')!r}, frozen {s.get('frozen')!r}, calibrated "
                      f"{s.get('calibrated')!r}; expected mode 'quant' or 'float' and booleans)")
      continue
    if s.get("fingerprint") != m["fingerprint"] or s.get("role") != m["role"]:
      try:
        shown = describe_spec(core.spec_from_dict(s["spec"]))
      except Exception as e:  # pylint: disable=broad-except
        shown = f"unreadable ({e})"
      problems.append(f"quantizer '{p}': the checkpoint's spec is {shown}"
                      f"{'' if s.get('role') == m['role'] else ' (' + str(s.get('role')) + ')'}, "
                      f"the model's {describe_spec(core.spec_from_dict(m['spec']))}")
  ssaved, smodel = meta.get("served", {}), served_meta(model)
  if not isinstance(ssaved, dict):
    ssaved = {}
    problems.append("the checkpoint's 'served' metadata is not a JSON object")
  if sorted(set(smodel) - set(ssaved)):
    problems.append(f"served weights/encodings missing from the checkpoint: "
                    f"{sorted(set(smodel) - set(ssaved))}")
  if sorted(set(ssaved) - set(smodel)):
    problems.append(f"served weights/encodings missing from the model: "
                    f"{sorted(set(ssaved) - set(smodel))}")
  for p in sorted(set(ssaved) & set(smodel)):
    if ssaved[p] != smodel[p]:
      problems.append(f"served '{p}': the checkpoint has {ssaved[p]}, the model {smodel[p]}")
  ckptr = ocp.StandardCheckpointer()
  item = ckptr.metadata(directory).item_metadata
  item = getattr(item, "tree", item)
  if not item:
    _raise_unreadable(ckptr, directory)
  saved = _flat(item)
  state = nnx.state(model)
  target = nnx.to_pure_dict(state)
  want = _flat(target)
  if sorted(set(saved) - set(want)):
    problems.append(f"entries missing from the model: {sorted(set(saved) - set(want))}")
  if sorted(set(want) - set(saved)):
    problems.append(f"entries missing from the checkpoint: {sorted(set(want) - set(saved))}")
  for k in sorted(set(saved) & set(want)):
    if saved[k] != want[k]:
      problems.append(f"entry '{k}': the checkpoint has shape {saved[k][0]} {saved[k][1]}, the "
                      f"model has {want[k][0]} {want[k][1]}")
  if problems:
    raise ValueError("restore: the checkpoint does not match the model: " + "; ".join(problems))
  # Restore into the model's own layout (a sharded model restores sharded, any mesh shape).
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      target)
  try:
    restored = ckptr.restore(directory, abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"restore: orbax failed to read the arrays of {directory}: "
                     f"{_orbax_message(e)}") from e
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  for p, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer) and path_str(p) in qsaved:
      s = qsaved[path_str(p)]
      node.mode = s["mode"]
      node.frozen = bool(s["frozen"])
      node.calibrated = bool(s["calibrated"])
      node.disabled = str(s.get("disabled", ""))
  _restore_seen(model, meta.get("seen"))
  return model
