"""Sharding of quantized NNX models: quantizer state follows its weight.

Flax NNX shards a model from its variables' ``out_sharding`` metadata
(``nnx.with_partitioning``, ``kernel_metadata={"out_sharding": ...}``,
logical names with ``sharding_rules``). A quantized layer's weight
quantizer gets the same kind of metadata, derived from its weight by
:func:`jaxqat.core.scale_partition_spec`: a per-channel scale keeps the mesh
axes of the channel axes (column-parallel kernel ``(None, "model")`` ->
scale ``(None, "model")``), a per-tensor scale is replicated. An
``nnx.Optimizer`` built afterwards copies the metadata into its state, so
one call gives the shardings of the model and of its optimizer:

    with jax.set_mesh(mesh):
      model = qnnx.quantize(MyModel(rngs=nnx.Rngs(0)), rules)
      qnnx.follow_weight_shardings(model)       # annotations onto quantizers
      opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
      state_sh = qnnx.shardings((model, opt))   # NamedSharding per variable

The quantizer reads a weight that is *already sharded* when it is created
(``quantize`` on a model built under a mesh); :func:`follow_weight_shardings`
does it from the annotations (also for logical names and abstract models
from ``nnx.eval_shape``), and is idempotent.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from flax import nnx
from flax.core import spmd as core_spmd

from jaxqat.core import _sharding as sharding_lib
from jaxqat.flax.nnx import _workflow
from jaxqat.flax.nnx._quantizer import WEIGHT

__all__ = ["follow_weight_shardings", "shardings"]


def _mesh_of(var: nnx.Variable, mesh):
  if mesh is not None:
    return mesh
  if var.has_metadata("mesh") and var.get_metadata("mesh") is not None:
    return var.get_metadata("mesh")
  return jax.sharding.get_abstract_mesh()


def follow_weight_shardings(model: nnx.Module, mesh: Optional[Any] = None) -> nnx.Module:
  """Gives every weight quantizer's state the sharding annotation of its weight.

  For each quantized layer whose weight variable has ``out_sharding``
  metadata, the quantizer's ``scale``/``zero_point``/``log_scale``/``offset``
  get ``out_sharding`` (and the weight's ``sharding_rules`` and ``mesh``)
  by :func:`jaxqat.core.scale_partition_spec`; concrete values are moved to
  that sharding when a mesh is known. Weights without annotations leave their
  quantizers as they are (replicated).

  Args:
    model: a quantized NNX model.
    mesh: the mesh to check divisibility against and place values on
      (default: the weight's ``mesh`` metadata, else the current mesh of
      ``jax.set_mesh``).

  Returns:
    ``model`` (changed in place).

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if a scale cannot follow its weight's sharding (naming the
      layer, the weight axis and the mesh axes), or ``model`` is not
      quantized.

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> with jax.set_mesh(jax.make_mesh((1,), ("model",))):
    ...   layer = nnx.Linear(2, 4, kernel_metadata={"out_sharding": (None, "model")},
    ...                      rngs=nnx.Rngs(0))
    ...   m = follow_weight_shardings(quantize(layer))
    >>> m.kernel_quant.scale.get_metadata("out_sharding")  # per output channel
    (None, 'model')
  """
  _workflow._check_model(model, "follow_weight_shardings")
  for path, owner in _workflow._owners(model):
    for parts, wq, _ in owner.jaxqat_weights():
      if wq is None or wq.role != WEIGHT:
        continue
      wvar = _workflow._get(owner, parts)
      if not isinstance(wvar, nnx.Variable) or not wvar.has_metadata("out_sharding"):
        continue
      names = wvar.get_metadata("out_sharding")
      if not names:
        continue
      where = f"layer '{wq.path or '/'.join(str(p) for p in path)}'"
      shape = tuple(wvar.shape)
      k = len(wq.stack_shape)
      spec = wq.spec
      entries = sharding_lib.scale_partition_spec(names, shape, spec, stack_ndim=k, where=where,
                                                  check=False)
      rules = wvar.get_metadata("sharding_rules") if wvar.has_metadata("sharding_rules") else ()
      resolved = nnx.get_partition_spec(wvar).get_value() if core_spmd.get_logical_axis_rules() \
          or rules else jax.sharding.PartitionSpec(*names)
      m = _mesh_of(wvar, mesh)
      scale_spec = sharding_lib.scale_partition_spec(resolved, shape, spec, stack_ndim=k, mesh=m,
                                                     where=where)
      for var in wq.state_variables().values():
        full = tuple(entries) + (None,) * (len(var.shape) - len(tuple(entries)))
        meta = {"out_sharding": full}
        if rules:
          meta["sharding_rules"] = rules
        if wvar.has_metadata("mesh"):
          meta["mesh"] = wvar.get_metadata("mesh")
        var.set_metadata(**meta)
        value = var.get_value()
        if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and \
            isinstance(m, jax.sharding.Mesh) and not m.empty:
          var.set_value(jax.device_put(value, jax.sharding.NamedSharding(m, scale_spec)))
  return model


def shardings(node: Any, mesh: Optional[Any] = None) -> Any:
  """The ``NamedSharding`` of every variable of a model, an optimizer, or both.

  Reads the variables' annotations (``out_sharding`` metadata; quantizer
  state has them after :func:`follow_weight_shardings`, optimizer state
  copies them from the parameters); unannotated variables are replicated.
  Use the result with ``jax.device_put``/``nnx.update`` to place a model, as
  ``in_shardings``/``out_shardings`` of ``jax.jit``, or with orbax to
  restore a checkpoint onto another mesh.

  Args:
    node: an NNX graph node (model, ``nnx.Optimizer``, a tuple of them) or
      its ``nnx.State``.
    mesh: the mesh (default: the current mesh of ``jax.set_mesh``).

  Returns:
    A pytree of ``jax.sharding.NamedSharding`` with the structure of
    ``nnx.state(node)``.

  Raises:
    ValueError: if no mesh is given or set.

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> with jax.set_mesh(mesh):
    ...   layer = nnx.Linear(2, 4, kernel_metadata={"out_sharding": (None, "model")},
    ...                      rngs=nnx.Rngs(0))
    ...   m = quantize(layer)  # the quantizer reads its sharded kernel
    >>> shardings(m, mesh)["kernel_quant"]["scale"].get_value().spec
    P(None, 'model')
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError("mesh: not given, and no mesh is set (jax.set_mesh)")
  state = node if isinstance(node, nnx.State) else nnx.state(node)
  return nnx.get_named_sharding(state, mesh)
