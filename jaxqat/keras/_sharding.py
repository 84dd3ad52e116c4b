"""``keras.distribution`` for quantized Keras models: quantizer weights follow their kernels.

Keras places every variable when it is created, by the distribution in
scope: ``DataParallel`` replicates all of them (the quantizer weights too,
nothing to do), ``ModelParallel`` looks each variable's path up in its
``LayoutMap``. A quantizer weight (``<layer>/<weight>_quantizer/scale``,
``zero_point``, ``log_scale``, ``offset``) should be laid out like the
weight it belongs to -- a per-channel scale sharded like the kernel's
channel axis, a per-tensor scale replicated -- which a regex written for
kernels cannot express (and which may match the quantizer's path as well).
:func:`follow_layout_map` adds one exact entry per quantizer weight,
derived from its weight's layout by :func:`jaxqat.core.follow_shape`; Keras
prefers exact keys to regex matches.

    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*/d1/kernel"] = (None, "model")
    qmodel = jqk.quantize(build_model(), rules)        # built once, to know the paths
    follow_layout_map(layout_map, qmodel)
    with keras.distribution.ModelParallel(layout_map=layout_map,
                                          batch_dim_name="data").scope():
      qmodel = jqk.quantize(build_model(), rules)      # same names -> same paths
"""

from __future__ import annotations

import re
from typing import Any

import jax

from jaxqat.core import _sharding as sharding_lib

__all__ = ["follow_layout_map"]

_STATE = ("scale", "zero_point", "log_scale", "offset")
_QPATH = re.compile(r"^(?P<layer>.*)/(?P<weight>[^/]+)_quantizer/(?P<name>[^/]+)$")


def _axes(layout) -> tuple:
  return tuple(getattr(layout, "axes", layout))


def follow_layout_map(layout_map: Any, model: Any) -> Any:
  """Adds a layout for each quantizer weight of ``model`` that follows its weight's layout.

  Args:
    layout_map: a ``keras.distribution.LayoutMap`` (its keys: regexes over
      variable paths; its ``device_mesh``: the mesh).
    model: a quantized Keras model (``jaxqat.keras.quantize``), built, whose
      variable paths are those of the model to distribute (give the model
      and its layers explicit names).

  Returns:
    ``layout_map``, with one exact-path entry per quantizer weight whose
    weight has a layout (others are left to the map: replicated).

  Raises:
    TypeError: if ``layout_map`` is not a LayoutMap-like mapping with a
      ``device_mesh``.
    ValueError: if a quantizer weight cannot follow its weight's layout
      (naming the layer, the weight axis and the mesh axes).

  Examples:
    >>> import keras
    >>> from jaxqat import core
    >>> from jaxqat.keras import quantize
    >>> mesh = keras.distribution.DeviceMesh((1,), ["model"])
    >>> lm = keras.distribution.LayoutMap(mesh)
    >>> lm[".*/d1/kernel"] = (None, "model")
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="d1")], name="net")
    >>> rule = core.Rule(pattern=".*", weight=core.QuantSpec(
    ...     granularity=core.PerOutputChannel(), learning="lsq"))
    >>> lm = follow_layout_map(lm, quantize(m, rule))
    >>> lm["net/d1/kernel_quantizer/log_scale"].axes
    (None, 'model')
  """
  mesh = getattr(layout_map, "device_mesh", None)
  if mesh is None or not hasattr(layout_map, "__getitem__"):
    raise TypeError(f"layout_map: expected a keras.distribution.LayoutMap, got "
                    f"{type(layout_map).__name__}")
  jmesh = jax.sharding.AbstractMesh(tuple(int(d) for d in mesh.shape), tuple(mesh.axis_names))
  weights = {v.path: v for v in model.weights}
  for path, var in weights.items():
    m = _QPATH.match(path)
    if m is None or m["name"] not in _STATE:
      continue
    wpath = f"{m['layer']}/{m['weight']}"
    weight = weights.get(wpath)
    layout = layout_map[wpath] if weight is not None else None
    if layout is None:
      continue
    spec = sharding_lib.follow_shape(_axes(layout), tuple(weight.shape), tuple(var.shape),
                                     mesh=jmesh, where=f"layer '{m['layer']}' ({m['weight']})")
    layout_map[path] = tuple(spec) + (None,) * (len(var.shape) - len(tuple(spec)))
  return layout_map
