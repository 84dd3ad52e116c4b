"""Encodings of NNX quantizers: export, save and load them (AIMET 1.0.0 layout).

The range a quantizer serves with is a :class:`jaxqat.core.Encoding`
(:func:`jaxqat.core.encoding_from_state`): for a weight, the range the
fake-quant model uses at this moment (a fixed-range weight quantizer that
is not frozen: the current weight's range, computed from the weight as the
layer's op sees it: masked, promoted to the layer's ``dtype``); for an input
quantizer, its calibrated or learned range. :func:`jaxqat.flax.nnx.convert`
serves these ranges; :func:`export_encodings` writes them
(:func:`jaxqat.core.encodings_to_dict`) and :func:`load_encodings` sets a
QAT model's ranges from a file.

**Names.** A layer path joins attribute names and container keys with
``/`` (the keys of ``nnx.state``, see :func:`jaxqat.flax.nnx.quantize`).
Encodings are named ``"<layer path>/<weight name>"`` (``"fc/kernel"``,
``"emb/embedding"``) for weights and ``"<layer path>/input"`` for input
quantizers (also for an :class:`~jaxqat.flax.nnx.ActQuant`); for an
intercepted module, whose weights each have an input quantizer,
``"<layer path>/<param name>"`` and ``"<layer path>/<param name>/input"``
(param names dotted: ``"layers.0"``). The root layer has path ``""``:
``"kernel"``, ``"input"``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqat import core
from jaxqat.flax.nnx import _intercept
from jaxqat.flax.nnx import _layers
from jaxqat.flax.nnx._convert import is_quantized
from jaxqat.flax.nnx._convert import path_str
from jaxqat.flax.nnx._quantizer import ACT
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._quantizer import WEIGHT

__all__ = ["export_encodings", "save_encodings", "load_encodings"]


def _vmap_n(fn, n: int):
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


# --------------------------------------------------------------------------
# Encodings of quantizers.
# --------------------------------------------------------------------------


def _where(q: Quantizer, fallback: str) -> str:
  return q.path or fallback or "<root>"


def _state_values(q: Quantizer) -> dict:
  return {k: v[...] for k, v in q.state_variables().items()}


@functools.partial(jax.jit, static_argnums=(2, 3))
def _jit_weight(w, state, spec, pack):
  """The weight's encoding and, when ``pack`` is not None, its QTensor."""
  enc = core.encoding_from_state(spec, state, weight=w)
  return enc, (None if pack is None else core.quantize_weight(w, enc, pack=pack))


def weight_encoding(wq: Quantizer, w: jax.Array, where: str, pack=None):
  """``(encoding, QTensor or None)``: the range the fake-quant model uses now for ``w``.

  Computed by one jitted function (one compile per distinct spec and shape).
  Stacked layers are converted slice by slice, not under ``jax.vmap``: the
  fake-quant layer computes a tracking range on its slice inside
  ``nnx.scan``, and a vmapped range can differ from it in the last bit.
  """
  spec = wq.spec
  if spec.is_block or (spec.learning == "fixed" and not wq.frozen):
    state = {}
  else:
    state = _state_values(wq)
  stack = tuple(wq.stack_shape)
  if not stack:
    enc, qt = _jit_weight(w, state, spec, pack)
  else:
    parts = [_jit_weight(w[i], {k: v[i] for k, v in state.items()}, spec, pack)
             for i in np.ndindex(*stack)]
    enc, qt = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(stack + xs[0].shape), *parts)
  if enc.scale is not None and not np.isfinite(np.asarray(enc.scale)).all():
    raise ValueError(f"layer '{where}': the weight range holds non-finite values (a NaN or inf "
                     "weight, or a diverged learned step size)")
  return enc, qt


def act_encoding(aq: Optional[Quantizer], where: str, fn_name: str) -> Optional[core.Encoding]:
  """The served input encoding; None when the input stays float."""
  if aq is None:
    return None
  if aq.spec.is_block:
    return core.encoding_from_state(aq.spec, {}, name=where)
  if not aq.calibrated:
    if aq.disabled:
      return None
    raise ValueError(f"{fn_name}: layer '{where}': the input quantizer was never calibrated (no "
                     "activation range); run jaxqat.flax.nnx.calibrate(model, data) first")
  fn = lambda st: core.encoding_from_state(aq.spec, st, name=where)  # noqa: E731
  return _vmap_n(fn, len(aq.stack_shape))(_state_values(aq))


def check_modes(model, fn_name: str) -> None:
  for p, node in nnx.iter_graph(model):
    if isinstance(node, Quantizer) and node.mode != "quant":
      raise ValueError(
          f"{fn_name}: layer '{_where(node, path_str(p))}': the quantizer is in {node.mode!r} "
          f"mode; {fn_name} serves the quantized model: call "
          "jaxqat.flax.nnx.set_mode(model, 'quant') first")


def owners(model):
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(type(node), "jaxqat_weights"):
      yield tuple(path), node


get_param = _layers.get_path


def promoted_weight(layer) -> jax.Array:
  """The weight as the layer's op sees it: masked (Conv), promoted as Flax promotes it."""
  w = getattr(layer, layer.weight_attr)[...]
  if getattr(layer, "mask", None) is not None:
    w = w * layer.mask
  dtype = getattr(layer, "dtype", None)
  return w if dtype is None else w.astype(dtype)


def _quantizer_names(model) -> list[tuple[str, str, Quantizer, Any]]:
  """``[(name, kind, quantizer, weight or None)]`` for every quantizer (see the docstring)."""
  out, seen = [], set()
  for path, owner in owners(model):
    lp = path_str(path)
    own = isinstance(owner, _intercept.InterceptMixin)
    for parts, wq, aq in owner.jaxqat_weights():
      pname = (".".join(str(p) for p in parts) if own else "/".join(str(p) for p in parts))
      wname = f"{lp}/{pname}" if lp else pname
      if wq is not None and id(wq) not in seen:
        seen.add(id(wq))
        w = get_param(owner, parts)[...]
        if isinstance(owner, _layers._QuantMixin):  # pylint: disable=protected-access
          w = promoted_weight(owner)
        out.append((wname, "param", wq, w))
      if aq is not None and id(aq) not in seen:
        seen.add(id(aq))
        base = wname if own else lp
        out.append((f"{base}/input" if base else "input", "activation", aq, None))
  return out


# --------------------------------------------------------------------------
# Encodings files.
# --------------------------------------------------------------------------


def _check_quantized(model, fn_name):
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  from jaxqat.flax.nnx._serve import is_served  # pylint: disable=import-outside-toplevel
  if not is_quantized(model) or is_served(model):
    raise ValueError(f"model: {fn_name} needs a quantized (QAT) model, not "
                     f"{'a served' if is_served(model) else 'a float'} one")


def export_encodings(model: nnx.Module) -> dict:
  """The encodings of every quantizer of a QAT model, in the AIMET 1.0.0 layout.

  Weights get the range the fake-quant model uses now (a fixed-range weight
  quantizer that is not frozen: the current weight's); input quantizers
  their calibrated (or learned) range; an input quantizer that saw no data
  (``disabled``) is left out. Names follow the module docstring.

  Args:
    model: a quantized, calibrated NNX model.

  Returns:
    A JSON-ready dict (:func:`jaxqat.core.encodings_to_dict`).

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if it is not a QAT model, or an input quantizer was never
      calibrated (naming the layer).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize, calibrate
    >>> m = calibrate(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), [jnp.ones((1, 2))])
    >>> d = export_encodings(m)
    >>> [e["name"] for e in d["param_encodings"]], [e["name"] for e in d["activation_encodings"]]
    (['kernel'], ['input'])
  """
  _check_quantized(model, "export_encodings")
  params, acts = {}, {}
  for name, kind, q, w in _quantizer_names(model):
    where = _where(q, name)
    if kind == "param":
      params[name] = weight_encoding(q, w, where)[0]
    else:
      enc = act_encoding(q, where, "export_encodings")
      if enc is not None:
        acts[name] = enc
  return core.encodings_to_dict(params, acts)


def save_encodings(path: Union[str, os.PathLike], model: nnx.Module) -> None:
  """Writes :func:`export_encodings` of ``model`` to a JSON file.

  Args:
    path: the file to write.
    model: a quantized, calibrated NNX model.

  Raises:
    As :func:`export_encodings`; ``OSError`` if the file cannot be written.

  Examples:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize, calibrate
    >>> m = calibrate(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), [jnp.ones((1, 2))])
    >>> f = os.path.join(tempfile.mkdtemp(), "enc.json")
    >>> save_encodings(f, m)
    >>> load_encodings(m, f) is m
    True
  """
  data = export_encodings(model)
  with open(os.fspath(path), "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)


_SECTIONS = {"param": "param_encodings", "activation": "activation_encodings"}


def _apply(q: Quantizer, enc: core.Encoding) -> None:
  spec = q.spec
  if spec.is_block:
    return
  full = q._full()  # pylint: disable=protected-access
  s = jnp.asarray(enc.scale, jnp.float32).reshape(full)
  z = (jnp.zeros(full, jnp.float32) if enc.zero_point is None
       else jnp.asarray(enc.zero_point, jnp.float32).reshape(full))
  if spec.learning == "fixed":
    values = {"scale": s, "zero_point": z}
  else:
    values = {"log_scale": core.step_size_to_param(s), "offset": -z * s}
  q._set({k: v for k, v in values.items() if getattr(q, k) is not None})  # pylint: disable=protected-access
  if q.role == WEIGHT:
    q.frozen = spec.learning == "fixed"
  else:
    q.calibrated, q.disabled = True, ""


def load_encodings(model: nnx.Module, path_or_dict: Union[str, os.PathLike, Mapping], *,
                   names: Optional[Mapping[str, str]] = None) -> nnx.Module:
  """Sets a QAT model's ranges from an encodings file (all or nothing).

  Fixed ranges take ``scale``/``zero_point`` (and the fixed-range weight
  quantizers are **frozen**: they keep the loaded range instead of
  tracking the weight); LSQ step sizes ``log_scale = log(s)``; LSQ+
  offsets ``-z*s``. Activation quantizers become calibrated. An input
  quantizer without an entry (the exporting model's saw no data) stays
  float (``disabled`` says so). The whole file is checked before anything is
  set.

  Args:
    model: a quantized NNX model of the same structure and specs.
    path_or_dict: the JSON file's path, or the dict of
      :func:`export_encodings`.
    names: optional map from the file's names to this model's (to read a
      file written by another front end).

  Returns:
    ``model`` (changed in place).

  Raises:
    TypeError: if ``model`` is not an NNX module or ``path_or_dict`` has
      another type.
    ValueError: if the file is malformed or truncated, an entry is unknown,
      duplicated or does not fit its quantizer, or a weight has no entry;
      the message names the entry and nothing is changed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize, calibrate
    >>> qat = calibrate(quantize(nnx.Einsum("bi,io->bo", (2, 5), rngs=nnx.Rngs(1))),
    ...                 [jnp.zeros((3, 2)), jnp.ones((3, 2))])
    >>> enc = export_encodings(qat)
    >>> enc["activation_encodings"][0]["bw"] = 4
    >>> load_encodings(qat, enc)
    Traceback (most recent call last):
    ...
    ValueError: encodings entry 'input': bw is 4 but the model's activation quantizer has 8
  """
  _check_quantized(model, "load_encodings")
  data = core.read_encodings(path_or_dict)
  quants = {name: (kind, q) for name, kind, q, _ in _quantizer_names(model)}
  expected = {}
  for name, (kind, q) in quants.items():
    shape = () if q.spec.is_block else q._full()  # pylint: disable=protected-access
    expected[name] = (kind, q.spec, shape)
  mapping = dict(names or {})
  if isinstance(data, dict):  # unknown names (the core skips them when not strict)
    for section in _SECTIONS.values():
      rows = data.get(section)
      for row in rows if isinstance(rows, list) else ():
        if isinstance(row, dict) and isinstance(row.get("name"), str):
          if mapping.get(row["name"], row["name"]) not in expected:
            raise ValueError(f"encodings entry '{row['name']}': the model has no quantizer of "
                             "that name")
  encs = core.encodings_from_dict(data, expected, names=mapping, strict=False)
  missing = [n for n, (kind, _) in quants.items() if kind == "param" and n not in encs]
  if missing:
    raise ValueError(f"encodings: no entry for the model's weight quantizer(s) {missing[:5]}")
  for name, (kind, q) in quants.items():
    if name in encs:
      _apply(q, encs[name])
    elif q.role == ACT and q.needs_range:
      q.calibrated = False
      q.disabled = "the encodings file has no entry for it; its input stays float"
  return model
