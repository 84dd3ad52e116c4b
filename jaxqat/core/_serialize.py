"""One serialization of :class:`QuantSpec`, shared by every front end.

A spec becomes a JSON-compatible dict (``spec_to_dict``) and back
(``spec_from_dict``); the dict carries a ``"version"`` so that later changes
of the schema can still read old files. Keras configs, Flax checkpoint
metadata and encodings files all store this dict; :func:`spec_fingerprint`
is a stable 31-bit hash of it for places that can only hold a number.

Schema, version 1::

    {"version": 1, "format": "int8_narrow",
     "granularity": {"type": "per_tensor"}
                  | {"type": "per_channel", "axis": [int, ...]}
                  | {"type": "per_block", "size": int, "axis": int}
                  | {"type": "per_output_channel"},
     "symmetric": bool,
     "calibration": {"method": str, "ema_decay": float, "percentile": float,
                     "num_bins": int, "num_candidates": int},
     "learning": "fixed" | "lsq" | "lsq_plus",
     "rounding": "nearest_even" | "stochastic"}
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any, Mapping, Optional

from jaxqat.core import _spec as spec_lib

__all__ = ["SPEC_SCHEMA_VERSION", "spec_to_dict", "spec_from_dict", "spec_fingerprint"]

SPEC_SCHEMA_VERSION = 1
_KEYS = ("format", "granularity", "symmetric", "calibration", "learning", "rounding")


def spec_to_dict(spec: Optional[spec_lib.QuantSpec]) -> Optional[dict]:
  """A :class:`QuantSpec` as a JSON-compatible dict (``None`` stays ``None``).

  Args:
    spec: the spec, or ``None``.

  Returns:
    The dict of the schema in the module docstring, or ``None``.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.

  Examples:
    >>> from jaxqat.core import QuantSpec, PerChannel
    >>> d = spec_to_dict(QuantSpec(format="int4", granularity=PerChannel(-1)))
    >>> d["version"], d["format"], d["granularity"]
    (1, 'int4', {'type': 'per_channel', 'axis': [-1]})
  """
  if spec is None:
    return None
  if not isinstance(spec, spec_lib.QuantSpec):
    raise TypeError(f"spec: expected a jaxqat QuantSpec, got {type(spec).__name__}")
  g = spec.granularity
  if isinstance(g, spec_lib.PerTensor):
    gran = {"type": "per_tensor"}
  elif isinstance(g, spec_lib.PerChannel):
    gran = {"type": "per_channel", "axis": list(g.axes)}
  elif isinstance(g, spec_lib.PerOutputChannel):
    gran = {"type": "per_output_channel"}
  else:
    gran = {"type": "per_block", "size": g.size, "axis": g.axis}
  return {
      "version": SPEC_SCHEMA_VERSION,
      "format": spec.format.name,
      "granularity": gran,
      "symmetric": spec.symmetric,
      "calibration": dataclasses.asdict(spec.calibration),
      "learning": spec.learning,
      "rounding": spec.rounding,
  }


def _get(d: Mapping, key: str, where: str) -> Any:
  if not isinstance(d, Mapping):
    raise TypeError(f"{where}: expected a dict, got {type(d).__name__}")
  if key not in d:
    raise ValueError(f"{where}: missing key {key!r}")
  return d[key]


def spec_from_dict(config: Any, *, where: str = "spec") -> Optional[spec_lib.QuantSpec]:
  """Inverse of :func:`spec_to_dict` (a QuantSpec or ``None`` passes through).

  Args:
    config: a dict from :func:`spec_to_dict` (a dict without ``"version"`` is
      read as version 1), a QuantSpec, or ``None``.
    where: the name used in error messages (e.g. ``"layer 'dense'
      weight_spec"``).

  Returns:
    The QuantSpec, or ``None``.

  Raises:
    TypeError: if ``config`` is neither a dict nor a QuantSpec.
    ValueError: naming the key, if a key is missing or holds a value the
      spec does not accept, or the version is newer than this jaxqat reads.

  Examples:
    >>> from jaxqat.core import QuantSpec, PerOutputChannel
    >>> spec = QuantSpec(format="int4", granularity=PerOutputChannel())
    >>> spec_from_dict(spec_to_dict(spec)) == spec
    True
    >>> spec_from_dict({"format": "int8"})
    Traceback (most recent call last):
    ...
    ValueError: spec: missing key 'granularity'
  """
  if config is None or isinstance(config, spec_lib.QuantSpec):
    return config
  if not isinstance(config, Mapping):
    raise TypeError(f"{where}: expected a QuantSpec or its dict, got {type(config).__name__}")
  version = config.get("version", SPEC_SCHEMA_VERSION)
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise ValueError(f"{where}.version: expected a positive int, got {version!r}")
  if version > SPEC_SCHEMA_VERSION:
    raise ValueError(f"{where}.version: {version} is newer than this jaxqat reads "
                     f"({SPEC_SCHEMA_VERSION}); upgrade jaxqat")
  unknown = sorted(set(config) - set(_KEYS) - {"version"})
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; allowed: {list(_KEYS)}")
  values = {k: _get(config, k, where) for k in _KEYS}
  g = values["granularity"]
  kind = _get(g, "type", f"{where}.granularity")
  try:
    if kind == "per_tensor":
      gran = spec_lib.PerTensor()
    elif kind == "per_channel":
      axis = _get(g, "axis", f"{where}.granularity")
      gran = spec_lib.PerChannel(tuple(axis) if isinstance(axis, (list, tuple)) else axis)
    elif kind == "per_block":
      gran = spec_lib.PerBlock(_get(g, "size", f"{where}.granularity"),
                               _get(g, "axis", f"{where}.granularity"))
    elif kind == "per_output_channel":
      gran = spec_lib.PerOutputChannel()
    else:
      raise ValueError(f"unknown type {kind!r}; expected one of 'per_tensor', 'per_channel', "
                       "'per_block', 'per_output_channel'")
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}.granularity: {e}") from None
  cal = values["calibration"]
  try:
    calibration = (spec_lib.Calibration(**cal) if isinstance(cal, Mapping)
                   else spec_lib.Calibration(method=cal))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}.calibration: {e}") from None
  try:
    return spec_lib.QuantSpec(format=values["format"], granularity=gran,
                              symmetric=values["symmetric"], calibration=calibration,
                              learning=values["learning"], rounding=values["rounding"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None


def spec_fingerprint(spec: Optional[spec_lib.QuantSpec]) -> int:
  """A stable 31-bit fingerprint of a spec (crc32 of its canonical JSON).

  Equal specs have equal fingerprints in every process and jaxqat version
  that writes the same schema version; ``None`` gives 0.

  Args:
    spec: the spec, or ``None``.

  Returns:
    A non-negative int below ``2**31``.

  Examples:
    >>> from jaxqat.core import QuantSpec
    >>> spec_fingerprint(QuantSpec()) == spec_fingerprint(QuantSpec())
    True
    >>> spec_fingerprint(QuantSpec()) == spec_fingerprint(QuantSpec(format="int4"))
    False
  """
  if spec is None:
    return 0
  text = json.dumps(spec_to_dict(spec), sort_keys=True, separators=(",", ":"))
  return zlib.crc32(text.encode()) & 0x7FFFFFFF
