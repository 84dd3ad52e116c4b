"""Sharding of quantizer state, in pure JAX (no Flax, no Keras).

Quantizer state is ordinary arrays, so it shards like any other pytree leaf;
what this module decides is *how*: a quantizer's state **follows the weight
it belongs to**.

* A per-channel scale (or zero point, LSQ ``log_scale``, LSQ+ ``offset``)
  has the weight's rank with size 1 on the reduced axes: each channel axis
  keeps the weight's mesh axes, the reduced axes are not sharded. So a
  column-parallel kernel ``P(None, "model")`` gets its per-output-channel
  scale sharded ``P(None, "model")``, and every device holds the scales of
  its own columns (no communication to quantize them).
* A per-block scale keeps the weight's mesh axes on every axis; on the
  blocked axis each device must hold whole blocks, so the number of blocks
  must be divisible by the mesh size of that axis.
* A per-tensor scale (shape ``()``) is replicated.
* Stacked layers (``nnx.vmap``/``nn.scan``) keep the mesh axes of their
  leading stack axes.

A layout under which a scale cannot follow its weight (a sharded channel or
block count not divisible by the mesh size of its axis) is a ``ValueError``
naming the layer, the axis and the mesh axes: the quantized model would
otherwise fail deep inside XLA or silently gather the weight.

:func:`state_shardings` maps parameter shardings onto the state of an
optimizer (optax or any pytree whose leaves mirror the parameters), and
:func:`explicit_axes` tells whether code runs under explicit sharding.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxqat.core import _spec as spec_lib

__all__ = ["scale_partition_spec", "follow_shape", "state_shardings", "explicit_axes"]

MeshAxes = Union[None, str, tuple]


def _entries(weight_spec, ndim: int, where: str) -> list:
  if weight_spec is None:
    return [None] * ndim
  entries = list(weight_spec)
  if len(entries) > ndim:
    raise ValueError(f"{where}: the weight's partition spec {tuple(entries)} has more entries "
                     f"than the weight has axes ({ndim})")
  return entries + [None] * (ndim - len(entries))


def _mesh_size(mesh, entry: MeshAxes) -> Optional[int]:
  """Devices along ``entry`` (a mesh axis name or a tuple of them), None if unknown."""
  if entry is None:
    return 1
  if mesh is None or getattr(mesh, "empty", False):
    return None
  names = entry if isinstance(entry, tuple) else (entry,)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  missing = [n for n in names if n not in sizes]
  if missing:
    raise ValueError(f"mesh: has no axis {missing[0]!r} (axes: {tuple(mesh.axis_names)})")
  return math.prod(sizes[n] for n in names)


def scale_partition_spec(
    weight_spec: Optional[Sequence[MeshAxes]],
    weight_shape: Sequence[int],
    spec: spec_lib.QuantSpec,
    *,
    stack_ndim: int = 0,
    mesh: Any = None,
    where: str = "",
    check: bool = True,
) -> PartitionSpec:
  """The partition spec of a weight quantizer's scale, following the weight.

  Args:
    weight_spec: the weight's ``PartitionSpec`` (or a tuple of its
      entries: mesh axis names, tuples of them, or None), including the
      stacked axes; None: not sharded.
    weight_shape: the weight's shape, stacked axes included.
    spec: the weight's :class:`~jaxqat.core.QuantSpec` (granularity
      resolved, for the unstacked weight).
    stack_ndim: leading stacked axes (``nnx.vmap``, ``nn.scan``).
    mesh: a ``Mesh``/``AbstractMesh`` to check divisibility against
      (default: the current mesh of ``jax.set_mesh``, if any; no check
      without one).
    where: the layer, for error messages.
    check: whether to check divisibility against the mesh (False for
      logical axis names, which are checked once resolved).

  Returns:
    A ``PartitionSpec`` for the scale of shape ``stack +
    spec.scale_shape(unstacked)``: ``P()`` per tensor.

  Raises:
    ValueError: if a sharded channel or block count is not divisible by the
      number of devices of its mesh axes (naming ``where``, the axis and the
      mesh axes), or ``weight_spec`` has more entries than the weight axes.

  Examples:
    >>> from jax.sharding import PartitionSpec as P
    >>> from jaxqat.core import PerChannel, PerTensor, QuantSpec
    >>> scale_partition_spec(P(None, "model"), (8, 16), QuantSpec(granularity=PerChannel(-1)))
    P(None, 'model')
    >>> scale_partition_spec(P(None, "model"), (8, 16), QuantSpec(granularity=PerTensor()))
    P()
  """
  where = where or "weight"
  shape = tuple(int(d) for d in weight_shape)
  k = int(stack_ndim)
  entries = _entries(weight_spec, len(shape), where)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  base = shape[k:]
  g = spec.granularity
  if isinstance(g, spec_lib.PerTensor):
    out = entries[:k]
  elif isinstance(g, spec_lib.PerChannel):
    axes = spec_lib.normalize_axes(g.axes, len(base), "granularity.axis")
    out = entries[:k] + [entries[k + i] if i in axes else None for i in range(len(base))]
    kinds = {k + i: ("channel", base[i]) for i in axes}
  elif isinstance(g, spec_lib.PerBlock):
    (axis,) = spec_lib.normalize_axes((g.axis,), len(base), "granularity.axis")
    out = list(entries)
    kinds = {k + i: ("channel", base[i]) for i in range(len(base)) if i != axis}
    kinds[k + axis] = ("block", base[axis] // g.size)
  else:
    raise ValueError(f"{where}: the weight spec's granularity {g} is not resolved; resolve "
                     "PerOutputChannel() to the layer's output axes first")
  if check and not isinstance(g, spec_lib.PerTensor):
    for ax, (kind, n) in kinds.items():
      size = _mesh_size(mesh, out[ax])
      if size is not None and n % size:
        what = (f"{n} blocks of {g.size}" if kind == "block" else f"{n} channels")
        raise ValueError(
            f"{where}: the scale cannot follow the weight's sharding: weight axis {ax - k} is "
            f"sharded over mesh axes {out[ax]!r} ({size} devices) but its {spec.granularity} "
            f"scale has {what} on that axis, not divisible by {size}; change the mesh, the "
            "sharding rule or the quantization granularity")
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def follow_shape(
    weight_spec: Optional[Sequence[MeshAxes]],
    weight_shape: Sequence[int],
    scale_shape: Sequence[int],
    *,
    mesh: Any = None,
    where: str = "",
) -> PartitionSpec:
  """:func:`scale_partition_spec` read off the shapes, when the QuantSpec is not at hand.

  A scale of the weight's rank follows it axis by axis: an axis of the
  weight's size keeps the weight's mesh axes (a channel), an axis of size 1
  is not sharded (reduced), an axis of another size (blocks) keeps them if
  the mesh size divides it. Any other scale shape (per tensor, ``()``) is
  replicated.

  Args:
    weight_spec: the weight's partition spec (entries), or None.
    weight_shape: the weight's shape.
    scale_shape: the shape of the scale (zero point, log step size...).
    mesh: as :func:`scale_partition_spec`.
    where: the layer, for error messages.

  Returns:
    The scale's ``PartitionSpec``.

  Raises:
    ValueError: as :func:`scale_partition_spec`.

  Examples:
    >>> follow_shape(("data", "model"), (8, 16), (1, 16))
    P(None, 'model')
  """
  where = where or "weight"
  wshape = tuple(int(d) for d in weight_shape)
  sshape = tuple(int(d) for d in scale_shape)
  if len(sshape) != len(wshape):
    return PartitionSpec()
  entries = _entries(weight_spec, len(wshape), where)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  out = []
  for ax, (w, n, e) in enumerate(zip(wshape, sshape, entries)):
    if n == w:
      out.append(e)
    elif n == 1:
      out.append(None)
    else:
      size = _mesh_size(mesh, e)
      if size is not None and n % size:
        raise ValueError(
            f"{where}: the scale cannot follow the weight's sharding: weight axis {ax} is "
            f"sharded over mesh axes {e!r} ({size} devices) but its scale has {n} blocks on "
            f"that axis, not divisible by {size}; change the mesh, the sharding rule or the "
            "quantization granularity")
      out.append(e)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def explicit_axes() -> tuple[str, ...]:
  """The mesh axes of the current mesh (``jax.set_mesh``) in explicit sharding mode.

  Returns:
    Their names; ``()`` outside of a mesh or when all axes are auto/manual.

  Examples:
    >>> explicit_axes()
    ()
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(getattr(mesh, "explicit_axes", ()) or ())


def _path_key(path) -> tuple:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
    else:
      out.append(str(k))
  return tuple(out)


def state_shardings(state: Any, param_shardings: Any, mesh: Any = None) -> Any:
  """Shardings for an optimizer state whose leaves mirror the parameters.

  A leaf of ``state`` whose key path *ends with* a parameter's key path and
  whose shape is that parameter's shape (optax's ``mu``/``nu``/trace,
  also inside ``optax.multi_transform`` and masked states) gets that
  parameter's sharding (the longest such path wins); every other leaf
  (step counts, scalars) is replicated.

  Args:
    state: the optimizer state (arrays or ``jax.ShapeDtypeStruct``, e.g. from
      ``jax.eval_shape(tx.init, params)``).
    param_shardings: a pytree of ``NamedSharding`` with the parameters' key
      paths, e.g. from :func:`scale_partition_spec` and the model's own
      annotations. Leaves must have shapes: pass ``(sharding, shape)`` pairs
      or, simpler, a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``.
    mesh: the mesh of the replicated leaves (default: the mesh of the first
      parameter sharding).

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``state``.

  Raises:
    ValueError: if no mesh is given and none can be read from
      ``param_shardings``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> params = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32,
    ...                                     sharding=NamedSharding(mesh, P(None, "model")))}
    >>> st = state_shardings(jax.eval_shape(optax.adam(1e-3).init, params), params)
    >>> st[0].mu["w"].spec, st[0].count.spec
    (P(None, 'model'), P())
  """
  flat = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
  table = {}
  for path, leaf in flat:
    sh = getattr(leaf, "sharding", None)
    if sh is None or not hasattr(leaf, "shape"):
      raise ValueError(f"param_shardings: the leaf at {jax.tree_util.keystr(path)} must be a "
                       "jax.ShapeDtypeStruct (or array) with a sharding")
    table[_path_key(path)] = (tuple(leaf.shape), sh)
  if mesh is None:
    meshes = [sh.mesh for _, sh in table.values() if isinstance(sh, NamedSharding)]
    if not meshes:
      raise ValueError("mesh: not given, and param_shardings holds no NamedSharding to read "
                       "one from")
    mesh = meshes[0]
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    key = _path_key(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for n in range(len(key), 0, -1):
      hit = table.get(key[-n:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state)
