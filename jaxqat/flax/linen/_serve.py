"""Convert and export a quantized Linen model: the served model, encodings, jax.export.

:func:`convert` turns a calibrated (or QAT-trained) quantized model into the
model it was trained to become: the same wrapped module, run in the
``"served"`` mode, with variables that hold every quantized weight as a
:class:`~jaxqat.core.QTensor` (int8 codes, packed int4/int2, fp8 or block
codes, with their scales) and every quantized input's fixed
:class:`~jaxqat.core.Encoding`, in the ``served`` collection. Its intercepted
matmuls, einsums and convolutions run the core's integer kernels (int8
operands, int32 accumulation, one rescale) where the input is statically
quantized, and the fake-quant arithmetic of the core (fake-quantized input,
dequantized weight, the layer's own op) elsewhere: bit for bit the
fake-quant model. No float copy of a quantized weight remains in the served
variables: it is removed from ``params``.

Names. A quantizer is named ``"<layer path>/<quantizer>"``: the layer path is
the ``"/"``-joined Linen names relative to the wrapped model, as the rules
match them (``"Dense_0"``, ``"encoder/attn/query"``; the model itself is
``""``, so its quantizers are just ``"kernel"`` / ``"input"``; a layer run by
a nested ``Module.apply`` adds its own name), and the quantizer is the
weight's parameter name (``"kernel"``, ``"embedding"``) or the input's
(``"input"``, ``"<weight>_input"`` for another weight's input). These are the
names of :func:`export_encodings` and the paths of the ``served``,
``quant_stats`` and ``quant_params`` collections.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxqat import core
from jaxqat.flax.linen import _intercept
from jaxqat.flax.linen import _module
from jaxqat.flax.linen import _quantizer
from jaxqat.flax.linen import _workflow

SERVED, ENCODINGS = _intercept.SERVED, _intercept.ENCODINGS
STATS, PARAMS = _quantizer.STATS, _quantizer.PARAMS
STAYS_FLOAT_KEY = "jaxqat_stays_float"  # the file's list of inputs left float


def _check_variables(variables) -> dict:
  if not isinstance(variables, Mapping):
    raise TypeError("variables: expected the dict of the quantized model's variables (from "
                    f"qmodel.init), got {type(variables).__name__}")
  return dict(variables)


def _check_flag(value, name: str) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
  return value


def walk(tree, prefix: tuple = ()):
  """``(path, value)`` of every non-dict value of a tree of dicts (QTensors and Encodings kept whole)."""
  if hasattr(tree, "items"):
    for k, v in tree.items():
      yield from walk(v, prefix + (str(k),))
  else:
    yield prefix, tree


def _drop(tree, path: tuple):
  """``tree`` without the entry at ``path``; parents left empty go too."""
  return _workflow._drop(tree, path, prune=True)  # pylint: disable=protected-access


_RUNNERS: dict = {}  # (model, example inputs' structure) -> jitted convert run


def _run(qmodel: _module.QuantizedModule, variables: dict, mode: str, pack: bool = True) -> dict:
  """Runs ``qmodel`` in the ``convert`` or ``inspect`` mode on its example inputs.

  The jitted ``convert`` run is cached per (equal) model and example input
  shapes, so ``convert(..., integer=False)`` and ``export_encodings`` after a
  ``convert`` compile nothing new.
  """
  args, kwargs = qmodel.example()
  model = _module.with_mode(qmodel, mode, pack=pack, integer=True)
  def run(v):
    out = model.apply(v, *args, **kwargs, mutable=_workflow.mutable(v, SERVED, ENCODINGS))[1]
    return {k: out[k] for k in (SERVED, ENCODINGS) if k in out}

  if mode == _intercept.INSPECT:
    return jax.eval_shape(run, variables)
  leaves, tree = jax.tree.flatten((args, kwargs))
  key = (model, tree, tuple((tuple(l.shape), str(l.dtype)) if hasattr(l, "shape") else l
                            for l in leaves))
  try:
    hash(key)
  except TypeError:
    return jax.jit(run)(variables)
  if key not in _RUNNERS:
    if len(_RUNNERS) >= 16:
      _RUNNERS.clear()
    _RUNNERS[key] = jax.jit(run)
  return _RUNNERS[key](variables)


def _check_quant(qmodel) -> _module.QuantizedModule:
  _module.check_qmodel(qmodel)
  if qmodel.mode != "quant":
    raise ValueError(f"qmodel: is in mode {qmodel.mode!r}; convert and export_encodings take the "
                     "fake-quantized model (mode 'quant'): use set_mode(qmodel, 'quant')")
  return qmodel


def convert(qmodel: _module.QuantizedModule, variables: Mapping[str, Any], *, integer: bool = True,
            pack: bool = True) -> tuple[_module.QuantizedModule, dict]:
  """Converts a calibrated or QAT model to its served (integer) model.

  Every weight the rules quantize is quantized, in the dtype and layout the
  fake-quant model quantizes it in, to a :class:`~jaxqat.core.QTensor` with
  its serving :class:`~jaxqat.core.Encoding`: a frozen fixed range, the
  current weight's range for a fixed range that is not frozen (what the
  fake-quant model computes now), ``exp(log_scale)`` (and the LSQ+ zero point
  ``-offset / s``) for learned step sizes. Every quantized input gets its
  fixed Encoding; an input that calibration found no data for stays float.
  Stochastic rounding serves as round half to even (the fake-quant model
  without a ``"quant"`` RNG). The model is traced once with zeros shaped like
  the example inputs of ``qmodel.init``.

  The served variables hold ``params`` without the quantized weights (layers
  left float keep theirs, and biases stay), the ``served`` collection
  (``served[<layer path>][<weight>]``: QTensor; ``[...]["input"]``:
  Encoding) and the model's other collections (``batch_stats``...);
  ``quant_stats`` and ``quant_params`` are dropped.

  Args:
    qmodel: the quantized model (mode ``"quant"``, initialised in this
      process).
    variables: its calibrated (or trained) variables; not modified.
    integer: let the served model use the integer kernels (int8 operands,
      int32 accumulation) where the input is statically quantized to <= 8
      bits per tensor; ``False``: the dequantize path everywhere (bit for bit
      the fake-quant model).
    pack: store 2- and 4-bit codes packed along the weight's last axis.

  Returns:
    ``(served_module, served_variables)``: ``served_module.apply(
    served_variables, *inputs)`` runs the converted model.

  Raises:
    TypeError: if ``qmodel`` is not a QuantizedModule, ``variables`` not a
      dict or a flag not a bool.
    ValueError: if ``qmodel`` is not in mode ``"quant"``, was never
      initialised, or a quantizer has no range (an input never calibrated),
      naming the layer; nothing is modified.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize, calibrate
    >>> qmodel = quantize(nn.Dense(3))
    >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    >>> v = calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x])
    >>> served, sv = convert(qmodel, v)
    >>> sorted(sv), sorted(sv["params"]), sv["served"]["kernel"].values.dtype
    (['params', 'served'], ['bias'], dtype('int8'))
    >>> bool(jnp.abs(served.apply(sv, x) - qmodel.apply(v, x)).max() < 1e-5)
    True
  """
  _check_quant(qmodel)
  variables = _check_variables(variables)
  _check_flag(integer, "integer")
  _check_flag(pack, "pack")
  out = _run(qmodel, variables, _intercept.CONVERT, pack)
  served = out.get(SERVED, {})
  params = variables.get("params", {})
  for path, value in walk(served):
    if isinstance(value, core.QTensor):
      params = _drop(params, path)
  served_variables = {k: v for k, v in variables.items() if k not in (STATS, PARAMS, "params")}
  served_variables["params"] = params
  served_variables[SERVED] = served
  served_module = _module.with_mode(qmodel, _intercept.SERVED, integer=integer, pack=pack)
  return served_module, served_variables


def _check_served(served_module) -> _module.QuantizedModule:
  if not isinstance(served_module, _module.QuantizedModule) or served_module.mode != _intercept.SERVED:
    raise TypeError("served_module: expected the served module returned by "
                    f"jaxqat.flax.linen.convert(), got {type(served_module).__name__}"
                    + (f" in mode {served_module.mode!r}" if isinstance(
                        served_module, _module.QuantizedModule) else ""))
  return served_module


def size_report(served_module: _module.QuantizedModule,
                served_variables: Mapping[str, Any]) -> core.SizeReport:
  """Per-weight sizes of a converted model and its compression ratio.

  One row per quantized weight (``"<layer path>/<weight>"``: format,
  granularity, float bytes, bytes of codes + scales + zero points) and one
  per float parameter left in ``params`` (biases, layers left float).

  Args:
    served_module: the served module from :func:`convert`.
    served_variables: its variables.

  Returns:
    A :class:`jaxqat.core.SizeReport` (``.ratio``, ``.to_dicts()``,
    ``print`` for a table).

  Raises:
    TypeError: if ``served_module`` is not a served module or
      ``served_variables`` not a dict.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize, calibrate
    >>> qmodel = quantize(nn.Dense(64, use_bias=False))
    >>> x = jnp.ones((1, 64))
    >>> served, sv = convert(qmodel, calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x]))
    >>> r = size_report(served, sv)
    >>> [(row.layer, row.format, row.float_bytes, row.quant_bytes) for row in r.rows]
    [('kernel', 'int8_narrow', 16384, 4352)]
  """
  _check_served(served_module)
  served_variables = _check_variables(served_variables)
  rows = []
  for path, v in walk(served_variables.get(SERVED, {})):
    if isinstance(v, core.QTensor):
      rows.append(core.size_row("/".join(path), v, v.dtype))
  for path, v in walk(nn.meta.unbox(served_variables.get("params", {}))):
    if hasattr(v, "dtype") and hasattr(v, "shape"):
      rows.append(core.size_row("/".join(path), v, v.dtype))
  rows.sort(key=lambda r: r.layer)
  return core.SizeReport(rows)


def export_serving(served_module: _module.QuantizedModule, served_variables: Mapping[str, Any],
                   *example_args, batch_polymorphic: bool = False, **example_kwargs) -> bytes:
  """Serializes the served forward with :mod:`jax.export` (weights baked in as int8 constants).

  Args:
    served_module: the served module from :func:`convert`.
    served_variables: its variables.
    *example_args: example inputs (arrays or ``jax.ShapeDtypeStruct``), the
      positional arguments of the model.
    batch_polymorphic: make every input's leading axis symbolic (any batch).
    **example_kwargs: the model's keyword arguments: arrays (inputs of the
      program, given by name) or Python values such as ``train=False``
      (fixed into the program).

  Returns:
    The serialized program; :func:`jaxqat.core.load_serving` reloads it as a
    function of the inputs, without the model's Python code.

  Raises:
    TypeError: if ``served_module`` is not a served module.
    ValueError: if no example input is given.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat import core
    >>> from jaxqat.flax.linen import quantize, calibrate
    >>> qmodel = quantize(nn.Dense(2))
    >>> x = jnp.ones((3, 4))
    >>> served, sv = convert(qmodel, calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x]))
    >>> run = core.load_serving(export_serving(served, sv, x, batch_polymorphic=True))
    >>> run(jnp.ones((5, 4))).shape
    (5, 2)
  """
  _check_served(served_module)
  served_variables = _check_variables(served_variables)
  _check_flag(batch_polymorphic, "batch_polymorphic")
  return core.export_serving(lambda *a, **k: served_module.apply(served_variables, *a, **k),
                             *example_args, batch_polymorphic=batch_polymorphic, **example_kwargs)


# --------------------------------------------------------------------------
# Encodings (AIMET 1.0.0 layout).
# --------------------------------------------------------------------------


def _encodings(tree) -> dict:
  """``{name: (path, QuantizerEncoding)}`` from a ``quant_encodings`` tree."""
  return {"/".join(p): (p, e) for p, e in walk(tree)
          if isinstance(e, _intercept.QuantizerEncoding)}


def export_encodings(qmodel: _module.QuantizedModule, variables: Mapping[str, Any]) -> dict:
  """Every quantizer's encoding, in the AIMET 1.0.0 layout (a JSON-ready dict).

  The encodings are those :func:`convert` serves with (a fixed weight range
  that is not frozen: the current weight's). Names are ``"<layer
  path>/<weight>"`` (``param_encodings``) and ``"<layer path>/input"``
  (``activation_encodings``; see the module docstring for the layer path).
  Inputs that calibration found no data for (they stay float) are listed
  under ``"jaxqat_stays_float"``.

  Args:
    qmodel: the quantized model (mode ``"quant"``, initialised in this
      process).
    variables: its calibrated (or trained) variables.

  Returns:
    The dict of :func:`jaxqat.core.encodings_to_dict`.

  Raises:
    TypeError: if ``qmodel`` is not a QuantizedModule.
    ValueError: as :func:`convert` (an input never calibrated, naming it).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize, calibrate
    >>> qmodel = quantize(nn.Sequential([nn.Dense(3)]))
    >>> x = jnp.ones((1, 4))
    >>> d = export_encodings(qmodel, calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x]))
    >>> [e["name"] for e in d["activation_encodings"]], [e["name"] for e in d["param_encodings"]]
    (['layers_0/input'], ['layers_0/kernel'])
  """
  _check_quant(qmodel)
  variables = _check_variables(variables)
  out = _run(qmodel, variables, _intercept.CONVERT)
  params, acts, floats = {}, {}, []
  for name, (_, q) in _encodings(out.get(ENCODINGS, {})).items():
    if q.encoding is None:
      floats.append(name)
    elif q.kind == "param":
      params[name] = q.encoding
    else:
      acts[name] = q.encoding
  data = core.encodings_to_dict(params, acts)
  if floats:
    data[STAYS_FLOAT_KEY] = sorted(floats)
  return data


def save_encodings(path, qmodel: _module.QuantizedModule, variables: Mapping[str, Any]) -> None:
  """Writes :func:`export_encodings` to a JSON file.

  Args:
    path: the file to write (overwritten if it exists).
    qmodel: the quantized model.
    variables: its variables.

  Raises:
    As :func:`export_encodings`; ``OSError`` if the file cannot be written.

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize, calibrate
    >>> qmodel = quantize(nn.Dense(3))
    >>> x = jnp.ones((1, 4))
    >>> v = calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x])
    >>> f = os.path.join(tempfile.mkdtemp(), "enc.json")
    >>> save_encodings(f, qmodel, v)
    >>> v2 = load_encodings(qmodel, qmodel.init(jax.random.key(0), x), f)
    >>> bool((qmodel.apply(v2, x) == qmodel.apply(v, x)).all())
    True
  """
  data = export_encodings(qmodel, variables)
  with open(os.fspath(path), "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)


def _like(value, old, dtype=jnp.float32):
  """``value`` shaped and typed like the state entry ``old`` (if any)."""
  value = jnp.asarray(value, dtype if old is None else old.dtype)
  return value if old is None else value.reshape(jnp.shape(old))


def _set_in(tree, path: tuple, fn):
  """``tree`` with ``tree[path] = fn(tree.get(path))`` (nested dicts rebuilt)."""
  out = dict(tree) if hasattr(tree, "items") else {}
  if len(path) == 1:
    out[path[0]] = fn(out.get(path[0]))
  else:
    out[path[0]] = _set_in(out.get(path[0], {}), path[1:], fn)
  return out


def load_encodings(qmodel: _module.QuantizedModule, variables: Mapping[str, Any], path_or_dict, *,
                   names: Optional[Mapping[str, str]] = None) -> dict:
  """Sets a quantized model's ranges from an encodings file (all or nothing).

  The whole file is checked against the model's quantizers first (every
  quantizer has exactly one entry of the same kind, format, bit width,
  symmetry, granularity and number of scales); only then are the ranges
  set: a fixed range gets ``scale`` / ``zero_point``, and a fixed-range
  *weight* is also frozen (it keeps the file's range instead of tracking the
  weight; :func:`~jaxqat.flax.linen.unfreeze` resumes tracking); LSQ gets
  ``log_scale = log(s)``, LSQ+ also ``offset = -z s``; an input listed under
  ``"jaxqat_stays_float"`` stays float. The variables may come straight from
  ``qmodel.init`` (never calibrated). Exported from a model with the same
  float weights, fixed ranges reproduce its outputs exactly.

  Args:
    qmodel: the quantized model (initialised in this process).
    variables: its variables; not modified.
    path_or_dict: an encodings JSON file or its dict.
    names: optional map from the file's names to this model's (a file
      written by another front end).

  Returns:
    New variables with the ranges set.

  Raises:
    TypeError: if an argument has the wrong type.
    FileNotFoundError: if the file does not exist.
    ValueError: if the file is not valid JSON, has another version or
      layout, or an entry is missing, unknown, duplicated or does not fit its
      quantizer; the message names the entry and nothing is applied.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize
    >>> from jaxqat.core import Encoding, QuantSpec, encodings_to_dict
    >>> qmodel = quantize(nn.Dense(3), [core.Rule(pattern=".*", act=QuantSpec())])
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> d = encodings_to_dict({}, {"input": Encoding(jnp.float32(0.5), None, QuantSpec())})
    >>> float(load_encodings(qmodel, v, d)["quant_stats"]["input"]["scale"])
    0.5
  """
  _module.check_qmodel(qmodel)
  variables = _check_variables(variables)
  if names is not None and not isinstance(names, Mapping):
    raise TypeError(f"names: expected a dict of file name -> model name, got {type(names).__name__}")
  data = core.read_encodings(path_or_dict)
  found = _encodings(_run(qmodel, variables, _intercept.INSPECT).get(ENCODINGS, {}))
  floats = data.get(STAYS_FLOAT_KEY, [])
  if not isinstance(floats, list) or not all(isinstance(n, str) for n in floats):
    raise ValueError(f"encodings: '{STAYS_FLOAT_KEY}' must be a list of names, got {floats!r}")
  floats = [dict(names or {}).get(n, n) for n in floats]
  for n in floats:
    if n not in found or found[n][1].kind != "activation":
      raise ValueError(f"encodings entry '{n}' (in '{STAYS_FLOAT_KEY}'): the model has no input "
                       "quantizer of that name")
  expected = {n: (q.kind, q.spec, () if q.encoding.scale is None else tuple(q.encoding.scale.shape))
              for n, (_, q) in found.items() if n not in floats}
  encs = core.encodings_from_dict(data, expected, names=names, strict=True)
  stats, qparams = variables.get(STATS, {}), variables.get(PARAMS, {})
  for n, enc in encs.items():
    path, q = found[n]
    spec = q.spec
    if spec.is_block:
      continue
    clean = lambda e: {k: v for k, v in (e or {}).items() if k != _quantizer.STAYS_FLOAT}  # noqa: E731
    if spec.learning == "fixed":
      zp = jnp.zeros(jnp.shape(enc.scale), jnp.float32) if enc.zero_point is None else enc.zero_point

      def fixed(e, enc=enc, zp=zp, kind=q.kind):
        e = clean(e)
        e["scale"] = _like(enc.scale, e.get("scale"))
        e["zero_point"] = _like(zp, e.get("zero_point"))
        if kind == "param":
          e[_quantizer.FROZEN] = jnp.ones((), jnp.int32)
        return e

      stats = _set_in(stats, path, fixed)
    else:
      stats = _set_in(stats, path, clean)

      def learned(e, enc=enc, spec=spec):
        e = dict(e or {})
        e["log_scale"] = _like(core.step_size_to_param(enc.scale), e.get("log_scale"))
        if spec.learning == "lsq_plus":
          z = jnp.zeros((), jnp.float32) if enc.zero_point is None else enc.zero_point
          e["offset"] = _like(-z.astype(jnp.float32) * enc.scale, e.get("offset"))
        return e

      qparams = _set_in(qparams, path, learned)
  for n in floats:
    path, _ = found[n]

    def to_float(e):
      e = {k: v for k, v in (e or {}).items() if k not in ("scale", "zero_point")}
      e[_quantizer.STAYS_FLOAT] = jnp.ones((), jnp.int32)
      return e

    stats = _set_in(stats, path, to_float)
    qparams = _drop(qparams, path)
  variables[STATS] = stats
  if qparams or PARAMS in variables:
    variables[PARAMS] = qparams
  return variables
