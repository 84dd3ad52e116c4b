"""Encodings: the fixed range a quantizer serves with, and their JSON file.

An :class:`Encoding` is what a trained quantizer amounts to once training is
over: a step size ``s`` and an integer zero point ``z`` (``x ~= s * (q - z)``)
with the :class:`~jaxqat.core.QuantSpec` that says which grid they index.
:func:`encoding_from_state` builds it from a quantizer's state under the
names of the front-end contract (``scale``/``zero_point`` for fixed ranges,
``log_scale``/``offset`` for LSQ/LSQ+), so NNX, Linen and Keras resolve a
learned step size the same way: ``s = exp(log_scale)`` and, for LSQ+,
``z = round_half_even(-offset / s)``, exactly the arithmetic of
:func:`~jaxqat.core.lsq_fake_quant`'s forward pass.

:func:`encodings_to_dict` / :func:`encodings_from_dict` write and read the
encodings of a whole model in the layout of AIMET's 1.0.0 encodings schema
(``version``, ``activation_encodings`` and ``param_encodings``, each a list of
entries with ``name``, ``dtype``, ``enc_type``, ``bw``, ``is_sym``,
``scale``, ``offset`` and, per block, ``block_size``). AIMET's ``offset`` is
the negated zero point (``x ~= scale * (q + offset)``). Each entry also
carries ``jaxqat_spec`` (:func:`~jaxqat.core.spec_to_dict`) and the scale's
``shape``, so a file written by jaxqat restores the exact spec. Reading
checks the whole file before returning anything, so a front end that applies
the result after a successful read never half-applies a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxqat.core import _grid
from jaxqat.core import _serialize
from jaxqat.core import _spec as spec_lib
from jaxqat.core import _step_size
from jaxqat.core._typing import ArrayLike

__all__ = [
    "Encoding",
    "encoding_from_state",
    "encodings_to_dict",
    "encodings_from_dict",
    "read_encodings",
    "ENCODINGS_VERSION",
]

ENCODINGS_VERSION = "1.0.0"
PARAM = "param"
ACTIVATION = "activation"
KINDS = (PARAM, ACTIVATION)
_SECTIONS = {PARAM: "param_encodings", ACTIVATION: "activation_encodings"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Encoding:
  """A quantizer's serving range: step size, integer zero point, spec.

  Attributes:
    scale: float32 step sizes in ``spec.scale_shape(shape)``; for block
      formats NVFP4's tensor scale or ``None`` (block scales come from the
      tensor).
    zero_point: int32 zero points of that shape (affine integer specs), or
      ``None`` (symmetric).
    spec: the QuantSpec with ``learning="fixed"``: a served range is fixed
      (static).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> e = encoding_from_state(QuantSpec(learning="lsq"), {"log_scale": jnp.log(0.5)})
    >>> float(e.scale), e.zero_point, e.spec.learning
    (0.5, None, 'fixed')
  """

  scale: Optional[jax.Array]
  zero_point: Optional[jax.Array]
  spec: spec_lib.QuantSpec = dataclasses.field(metadata=dict(static=True))


def _concrete(v, name: str, where: str) -> None:
  if v is None or _grid.is_traced(v):
    return
  a = np.asarray(v, np.float64)
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{where}: {name} holds non-finite values ({a.ravel()[:4]}...)")


def encoding_from_state(
    spec: spec_lib.QuantSpec,
    state: Mapping[str, Optional[ArrayLike]],
    *,
    weight: Optional[ArrayLike] = None,
    name: str = "",
) -> Encoding:
  """Resolves a quantizer's state (contract names) to its serving :class:`Encoding`.

  * ``learning="fixed"``: ``state["scale"]`` and ``state["zero_point"]``;
    a weight quantizer whose range still tracks the weight (no ``scale``
    stored) takes :func:`~jaxqat.core.weight_range` of ``weight``;
  * ``"lsq"``: ``s = exp(state["log_scale"])``;
  * ``"lsq_plus"``: that ``s`` and ``z = round_half_even(-offset / s)``;
  * block formats: ``state.get("tensor_scale")`` (NVFP4) or ``None``.

  Args:
    spec: the quantizer's QuantSpec (granularity resolved).
    state: the quantizer's state by contract name; missing names and ``None``
      values mean "not set".
    weight: the weight, for a fixed-range weight quantizer that is not
      frozen.
    name: the quantizer's name for error messages (e.g. ``"dense.kernel"``).

  Returns:
    An :class:`Encoding` with float32 ``scale``, int32 ``zero_point`` (or
    ``None`` for symmetric specs) and ``spec.learning == "fixed"``.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.
    ValueError: if the range is missing (an activation quantizer that was
      never calibrated), or a concrete scale is not finite, naming ``name``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> spec = QuantSpec(format="uint8", symmetric=False, learning="lsq_plus")
    >>> e = encoding_from_state(spec, {"log_scale": jnp.log(0.1), "offset": -1.3})
    >>> int(e.zero_point)
    13
  """
  spec = _grid.check_spec(spec)
  where = name or "quantizer"
  fixed = spec.replace(learning="fixed")
  if spec.is_block:
    ts = state.get("tensor_scale")
    return Encoding(None if ts is None else jnp.asarray(ts, jnp.float32), None, fixed)
  if spec.learning == "fixed":
    scale = state.get("scale")
    zp = state.get("zero_point")
    if scale is None:
      if weight is None:
        raise ValueError(f"{where}: no range: the quantizer was never calibrated (its 'scale' "
                         "is not set); calibrate the model first")
      from jaxqat.core import _calibration  # pylint: disable=import-outside-toplevel
      scale, zp = _calibration.weight_range(weight, spec)
    _concrete(scale, "scale", where)
    scale = jnp.maximum(jnp.asarray(scale, jnp.float32), _grid.SCALE_EPS)
    if spec.symmetric or not spec.is_int or zp is None:
      return Encoding(scale, None, fixed)
    _concrete(zp, "zero_point", where)
    return Encoding(scale, jnp.round(jnp.asarray(zp, jnp.float32)).astype(jnp.int32), fixed)
  log_scale = state.get("log_scale")
  if log_scale is None:
    raise ValueError(f"{where}: no learned step size: 'log_scale' is not set; calibrate the "
                     "model first")
  _concrete(log_scale, "log_scale", where)
  scale = jnp.maximum(_step_size.param_to_step_size(log_scale).astype(jnp.float32),
                      _grid.SCALE_EPS)
  offset = state.get("offset")
  if spec.learning != "lsq_plus" or offset is None or not spec.is_int:
    return Encoding(scale, None, fixed)
  _concrete(offset, "offset", where)
  zp = _grid.round_half_even(-jnp.asarray(offset, jnp.float32) / scale)
  fmt = spec.format
  return Encoding(scale, jnp.clip(zp, fmt.qmin, fmt.qmax).astype(jnp.int32), fixed)


# --------------------------------------------------------------------------
# JSON (AIMET 1.0.0 layout).
# --------------------------------------------------------------------------


def enc_type(spec: spec_lib.QuantSpec) -> str:
  g = spec.granularity
  if isinstance(g, spec_lib.PerBlock):
    return "PER_BLOCK"
  if isinstance(g, spec_lib.PerChannel):
    return "PER_CHANNEL"
  return "PER_TENSOR"


def _bits(spec: spec_lib.QuantSpec) -> int:
  fmt = spec.format
  if spec.is_int:
    return int(fmt.bits)
  return int(getattr(fmt, "bits", None) or getattr(fmt.element, "bits", 0))


def _entry(name: str, enc: Encoding) -> dict:
  spec = enc.spec
  out: dict[str, Any] = {
      "name": name,
      "dtype": "INT" if spec.is_int else "FLOAT",
      "enc_type": enc_type(spec),
      "bw": _bits(spec),
      "is_sym": bool(spec.symmetric) if spec.is_int else True,
  }
  if enc.scale is not None:
    scale = np.asarray(enc.scale, np.float32)
    out["scale"] = [float(v) for v in scale.ravel()]
    out["shape"] = list(scale.shape)
    if spec.is_int:
      zp = (np.zeros(scale.shape, np.int64) if enc.zero_point is None
            else np.asarray(enc.zero_point, np.int64))
      out["offset"] = [int(-v) for v in zp.ravel()]
  else:
    out["scale"] = []
  if isinstance(spec.granularity, spec_lib.PerBlock):
    out["block_size"] = int(spec.granularity.size)
  out["jaxqat_spec"] = _serialize.spec_to_dict(spec)
  return out


def encodings_to_dict(
    params: Mapping[str, Encoding],
    activations: Mapping[str, Encoding],
) -> dict:
  """Writes encodings in the AIMET 1.0.0 layout (a JSON-ready dict).

  Args:
    params: parameter (weight) encodings by name, e.g. ``"dense/kernel"``.
    activations: activation (layer input) encodings by name.

  Returns:
    ``{"version": "1.0.0", "producer": "jaxqat", "activation_encodings":
    [...], "param_encodings": [...]}``; ``json.dumps`` writes it.

  Raises:
    TypeError: if a value is not an :class:`Encoding` (naming it).
    ValueError: if a concrete scale is not finite (naming it).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> e = Encoding(jnp.float32(0.5), None, QuantSpec(format="int4"))
    >>> d = encodings_to_dict({"fc/kernel": e}, {})
    >>> d["param_encodings"][0]["scale"], d["param_encodings"][0]["offset"]
    ([0.5], [0])
  """
  out: dict[str, Any] = {"version": ENCODINGS_VERSION, "producer": "jaxqat"}
  for kind, group in ((ACTIVATION, activations), (PARAM, params)):
    rows = []
    for name, enc in group.items():
      if not isinstance(enc, Encoding):
        raise TypeError(f"{name}: expected an Encoding, got {type(enc).__name__}")
      _concrete(enc.scale, "scale", name)
      rows.append(_entry(str(name), enc))
    out[_SECTIONS[kind]] = rows
  return out


def _fail(name, msg):
  raise ValueError(f"encodings entry '{name}': {msg}")


def _canonical(spec: spec_lib.QuantSpec, ndim: int) -> spec_lib.QuantSpec:
  """The spec with per-channel axes counted from the front (``-1`` and ``ndim - 1`` agree)."""
  spec = spec.replace(learning="fixed")
  g = spec.granularity
  if isinstance(g, spec_lib.PerChannel) and ndim:
    try:
      axes = spec_lib.normalize_axes(g.axes, ndim, "granularity.axis")
    except ValueError:
      return spec
    return spec.replace(granularity=spec_lib.PerChannel(axes[0] if len(axes) == 1 else axes))
  return spec


def _read_entry(row, kind: str, spec: spec_lib.QuantSpec, scale_shape) -> Encoding:
  name = row.get("name")
  fixed = spec.replace(learning="fixed")
  want_dtype = "INT" if spec.is_int else "FLOAT"
  checks = (("dtype", want_dtype), ("enc_type", enc_type(spec)), ("bw", _bits(spec)))
  for key, want in checks:
    if key not in row:
      _fail(name, f"missing field '{key}'")
    if row[key] != want:
      _fail(name, f"{key} is {row[key]!r} but the model's {kind} quantizer has {want!r}")
  if spec.is_int and bool(row.get("is_sym", spec.symmetric)) != bool(spec.symmetric):
    _fail(name, f"is_sym is {row.get('is_sym')!r} but the model's quantizer is "
          f"{'symmetric' if spec.symmetric else 'affine'}")
  if "jaxqat_spec" in row:
    try:
      file_spec = _serialize.spec_from_dict(row["jaxqat_spec"])
    except (TypeError, ValueError, KeyError) as e:
      _fail(name, f"jaxqat_spec is malformed: {e}")
    if _canonical(file_spec, len(scale_shape)) != _canonical(fixed, len(scale_shape)):
      _fail(name, f"the file's spec {file_spec} does not match the model's {spec}")
  if isinstance(spec.granularity, spec_lib.PerBlock):
    if row.get("block_size") != spec.granularity.size:
      _fail(name, f"block_size is {row.get('block_size')!r}, the model's is "
            f"{spec.granularity.size}")
  scale = row.get("scale")
  if not isinstance(scale, list):
    _fail(name, f"'scale' must be a list of numbers, got {type(scale).__name__}")
  if spec.is_block:
    if scale:
      ts = np.asarray(scale, np.float64)
      if ts.size != 1 or not np.isfinite(ts).all() or ts[0] <= 0:
        _fail(name, f"a block format's 'scale' holds at most one positive tensor scale, got "
              f"{scale[:4]}")
      return Encoding(jnp.asarray(ts[0], jnp.float32), None, fixed)
    return Encoding(None, None, fixed)
  size = int(math.prod(scale_shape))
  if len(scale) != size:
    _fail(name, f"'scale' has {len(scale)} values, the model's quantizer needs {size} "
          f"(scale shape {tuple(scale_shape)})")
  try:
    s = np.asarray(scale, np.float64)
  except (TypeError, ValueError):
    _fail(name, "'scale' holds non-numbers")
  if s.dtype.kind not in "fi" or not np.isfinite(s).all() or (s <= 0).any():
    _fail(name, "'scale' must hold finite positive numbers")
  zp = None
  if spec.is_int:
    off = row.get("offset")
    if not isinstance(off, list) or len(off) != size:
      _fail(name, f"'offset' must be a list of {size} integers, got "
            f"{off if not isinstance(off, list) else f'{len(off)} values'}")
    o = np.asarray(off, np.float64)
    if o.dtype.kind not in "fi" or not np.all(o == np.round(o)):
      _fail(name, "'offset' must hold integers")
    z = -o
    fmt = spec.format
    if (z < fmt.qmin).any() or (z > fmt.qmax).any():
      _fail(name, f"'offset' gives zero points outside [{fmt.qmin}, {fmt.qmax}]")
    if spec.symmetric and (z != 0).any():
      _fail(name, "a symmetric quantizer needs 'offset' 0")
    if not spec.symmetric:
      zp = jnp.asarray(z.reshape(scale_shape), jnp.int32)
  return Encoding(jnp.asarray(s.reshape(scale_shape), jnp.float32), zp, fixed)


def encodings_from_dict(
    data: Any,
    expected: Mapping[str, tuple[str, spec_lib.QuantSpec, tuple[int, ...]]],
    *,
    names: Optional[Mapping[str, str]] = None,
    strict: bool = True,
) -> dict[str, Encoding]:
  """Reads AIMET 1.0.0-layout encodings for a model, checking everything first.

  Args:
    data: the parsed JSON (a dict) or a JSON string.
    expected: the model's quantizers: ``{name: (kind, spec, scale_shape)}``
      with ``kind`` ``"param"`` or ``"activation"``.
    names: optional map from the file's names to the model's names (to load
      a file written by another front end, whose layer paths differ).
    strict: whether every quantizer of ``expected`` that holds a range must
      have an entry (and every entry a quantizer).

  Returns:
    ``{name: Encoding}`` for every entry (model names).

  Raises:
    ValueError: if the file is not valid JSON or has the wrong version or
      layout, an entry is missing, unknown, duplicated, or does not match its
      quantizer (dtype, bw, is_sym, enc_type, block size, number of scales),
      or holds bad values; the message names the entry. Nothing is returned
      on error, so nothing can be half-applied.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> spec = QuantSpec(format="int4")
    >>> d = encodings_to_dict({"fc/kernel": Encoding(jnp.float32(0.5), None, spec)}, {})
    >>> e = encodings_from_dict(d, {"fc/kernel": ("param", spec, ())})
    >>> float(e["fc/kernel"].scale)
    0.5
  """
  if isinstance(data, (str, bytes)):
    try:
      data = json.loads(data)
    except json.JSONDecodeError as e:
      raise ValueError(f"encodings: not valid JSON ({e}); the file may be truncated") from None
  if not isinstance(data, dict):
    raise ValueError(f"encodings: expected a JSON object, got {type(data).__name__}")
  if data.get("version") != ENCODINGS_VERSION:
    raise ValueError(f"encodings: version {data.get('version')!r} is not supported; expected "
                     f"{ENCODINGS_VERSION!r}")
  names = dict(names or {})
  out: dict[str, Encoding] = {}
  for kind in KINDS:
    section = _SECTIONS[kind]
    rows = data.get(section, [])
    if not isinstance(rows, list):
      raise ValueError(f"encodings: '{section}' must be a list, got {type(rows).__name__}")
    for row in rows:
      if not isinstance(row, dict) or not isinstance(row.get("name"), str):
        raise ValueError(f"encodings: every entry of '{section}' needs a string 'name'; got "
                         f"{str(row)[:80]}")
      model_name = names.get(row["name"], row["name"])
      if model_name in out:
        _fail(row["name"], "appears twice")
      if model_name not in expected:
        if strict:
          _fail(row["name"], f"the model has no {kind} quantizer of that name"
                + (f" (mapped to '{model_name}')" if model_name != row["name"] else ""))
        continue
      want_kind, spec, shape = expected[model_name]
      if want_kind != kind:
        _fail(row["name"], f"is listed under '{section}' but the model's quantizer is a "
              f"{want_kind}")
      out[model_name] = _read_entry(row, kind, spec, shape)
  if strict:
    missing = [n for n in expected if n not in out]
    if missing:
      raise ValueError(f"encodings: no entry for the model's quantizer(s) {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}")
  return out


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  return kind



def read_encodings(path_or_dict: Any) -> dict:
  """An encodings file's JSON object, or a copy of an encodings dict.

  Only reads; :func:`encodings_from_dict` checks the contents.

  Args:
    path_or_dict: a path to a JSON file, or the parsed dict.

  Returns:
    The JSON object as a dict.

  Raises:
    TypeError: if ``path_or_dict`` is neither a path nor a mapping.
    ValueError: if the file is not valid JSON (e.g. truncated) or not a JSON
      object.
    FileNotFoundError: if the file does not exist.

  Examples:
    >>> read_encodings({"version": "1.0.0"})
    {'version': '1.0.0'}
  """
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict)
  if not isinstance(path_or_dict, (str, os.PathLike)):
    raise TypeError("path_or_dict: expected a path to an encodings JSON file or its dict, got "
                    f"{type(path_or_dict).__name__}")
  path = os.fspath(path_or_dict)
  with open(path, "r", encoding="utf-8") as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"encodings: {path} is not valid JSON ({e}); the file may be "
                     "truncated") from None
  if not isinstance(data, dict):
    raise ValueError(f"encodings: expected a JSON object, got {type(data).__name__}")
  return data
