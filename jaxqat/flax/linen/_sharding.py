"""Sharding of quantized Linen variables: quantizer state follows its weight.

A Linen model annotates its parameters with ``nn.with_partitioning`` (the
``params`` tree then holds ``nn.Partitioned`` boxes, possibly with logical
names resolved by ``nn.logical_axis_rules``). The quantized model keeps that
tree as it is and adds ``quant_params`` and ``quant_stats``; this module
derives their partition specs from the weights they belong to
(:func:`jaxqat.core.follow_shape`): a weight quantizer's ``scale``,
``zero_point``, ``log_scale`` and ``offset`` keep the mesh axes of the
weight's channel axes (per-tensor: replicated), every other quantizer entry
(activation ranges, observer statistics, fingerprints) is replicated.

    variables = qmodel.init(key, x)                 # params boxed by nn.with_partitioning
    specs = ql.partition_specs(variables, mesh)     # every collection
    variables = jax.device_put(nn.unbox(variables), ql.shardings(variables, mesh))

:func:`jaxqat.core.state_shardings` maps the parameter shardings onto an
optax state (``ql.qat_optimizer``'s included).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxqat.core import _sharding as sharding_lib
from jaxqat.flax.linen import _quantizer

__all__ = ["partition_specs", "shardings"]

_FOLLOW = ("scale", "zero_point", "log_scale", "offset")


def _get(tree, path):
  for k in path:
    if not hasattr(tree, "get") or k not in tree:
      return None
    tree = tree[k]
  return tree


def _param_spec(box, mesh) -> Optional[PartitionSpec]:
  """The mesh-axis spec of a (boxed) parameter, logical names resolved."""
  if isinstance(box, nn.LogicallyPartitioned):
    return nn.logical_to_mesh_axes(box.names, box.rules)
  if isinstance(box, nn.Partitioned):
    return PartitionSpec(*box.names)
  return None


def _map(tree, fn, path=()):
  if hasattr(tree, "items") and not isinstance(tree, nn.Partitioned):
    return {k: _map(v, fn, path + (k,)) for k, v in tree.items()}
  return fn(path, tree)


def partition_specs(variables: Mapping[str, Any], mesh: Optional[Any] = None) -> dict:
  """Partition specs of all collections of a quantized Linen model's variables.

  ``params`` (and any other collection) from their ``nn.Partitioned`` /
  ``nn.LogicallyPartitioned`` boxes (unboxed leaves: replicated);
  ``quant_params`` and ``quant_stats`` by the weights they belong to.

  Args:
    variables: the variables of a quantized model (``qmodel.init``,
      ``calibrate``...), boxed or not; abstract values
      (``jax.eval_shape``) work.
    mesh: the mesh to check divisibility against (default: the current mesh
      of ``jax.set_mesh``; no check without one).

  Returns:
    A dict with the structure of ``nn.unbox(variables)`` whose leaves are
    ``PartitionSpec``.

  Raises:
    TypeError: if ``variables`` is not a mapping.
    ValueError: if a weight quantizer's scale cannot follow its weight's
      sharding (naming the layer, the weight axis and the mesh axes).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize
    >>> dense = nn.Dense(4, kernel_init=nn.with_partitioning(
    ...     nn.initializers.lecun_normal(), (None, "model")))
    >>> v = quantize(dense).init(jax.random.key(0), jnp.ones((2, 3)))
    >>> specs = partition_specs(v)
    >>> specs["params"]["kernel"], specs["quant_stats"]["kernel"]["scale"]
    (P(None, 'model'), P(None, 'model'))
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"variables: expected a mapping of collections, got "
                    f"{type(variables).__name__}")
  params = variables.get("params", {})

  def box_spec(_, leaf):
    spec = _param_spec(leaf, mesh)
    return PartitionSpec() if spec is None else spec

  out = {col: _map(tree, box_spec) for col, tree in variables.items()
         if col not in (_quantizer.STATS, _quantizer.PARAMS)}
  stats = nn.unbox(variables.get(_quantizer.STATS, {}))
  qparams = nn.unbox(variables.get(_quantizer.PARAMS, {}))
  follow = {}  # (collection, path) -> spec
  for path, entry in _quantizer.quantizer_entries(stats):
    box = _get(params, path)
    spec = _param_spec(box, mesh)
    if box is None or spec is None:
      continue  # an activation quantizer, or an unannotated weight: replicated
    weight_shape = box.value.shape
    where = f"layer {_quantizer.describe('/'.join(path[:-1]))} ({path[-1]})"
    for col, tree in ((_quantizer.STATS, entry), (_quantizer.PARAMS, _get(qparams, path))):
      for name in _FOLLOW:
        leaf = _get(tree, (name,)) if tree is not None else None
        if leaf is not None and hasattr(leaf, "shape"):
          follow[(col, path + (name,))] = sharding_lib.follow_shape(
              spec, weight_shape, leaf.shape, mesh=mesh, where=where)
  for col, tree in ((_quantizer.STATS, stats), (_quantizer.PARAMS, qparams)):
    if col in variables:
      out[col] = _map(tree, lambda p, _, col=col: follow.get((col, p), PartitionSpec()))
  return out


def shardings(variables: Mapping[str, Any], mesh: Any) -> dict:
  """``NamedSharding`` of all collections of a quantized model's variables.

  Args:
    variables: as :func:`partition_specs`.
    mesh: the ``jax.sharding.Mesh``.

  Returns:
    A dict with the structure of ``nn.unbox(variables)`` whose leaves are
    ``NamedSharding``: for ``jax.device_put``, ``jax.jit``'s
    ``in_shardings``/``out_shardings``, or orbax restore targets.

  Raises:
    As :func:`partition_specs`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.flax.linen import quantize
    >>> v = quantize(nn.Dense(4)).init(jax.random.key(0), jnp.ones((2, 3)))
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> shardings(v, mesh)["params"]["kernel"].spec
    P()
  """
  specs = partition_specs(variables, mesh)
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                      is_leaf=lambda p: isinstance(p, PartitionSpec))
