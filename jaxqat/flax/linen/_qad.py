"""Quantization-aware distillation (QAD) for Linen: one jitted train step on a TrainState.

The student is a :func:`~jaxqat.flax.linen.quantize` model in a
``flax.training.train_state.TrainState`` whose ``params`` are its trainable
collections (``{"params": ..., "quant_params": ...}``) and whose ``tx`` is
:func:`~jaxqat.flax.linen.qat_optimizer`; the teacher is the float Linen
model (``qmodel.model``: quantize leaves it untouched) with its float
variables. The teacher runs forward only, under ``jax.lax.stop_gradient``,
inside the same compiled step (``jax.jit``, cached on the state's structure,
the teacher module and the loss)::

    qmodel = ql.quantize(model, rules)
    variables = ql.calibrate(qmodel, {**qmodel.init(rng, x), "params": params}, batches)
    trainable = {k: variables[k] for k in ("params", "quant_params") if k in variables}
    fixed = {k: v for k, v in variables.items() if k not in trainable}
    state = TrainState.create(apply_fn=qmodel.apply, params=trainable,
                              tx=ql.qat_optimizer(qmodel, *recipe.optimizers()))
    for x, y in data:
      state, loss = ql.qad_train_step(state, fixed, model, {"params": params}, x, y,
                                      loss=QADLoss(temperature=2.0))

**Features.** ``QADLoss(features=(...), feature_weight=w)`` matches values of
the ``intermediates`` collection, named by their ``/``-joined path: values
sown with ``self.sow("intermediates", "name", x)`` (``"Block_0/feat"``) and
every submodule's output (the step applies both models with
``capture_intermediates=True``: ``"Dense_0/__call__"``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from flax.training import train_state

from jaxqat.core._distill import QADLoss

__all__ = ["qad_train_step"]


def _apply(apply_fn, variables, inputs, features):
  kw = dict(capture_intermediates=True, mutable=["intermediates"]) if features else {}
  if isinstance(inputs, tuple):
    out = apply_fn(variables, *inputs, **kw)
  elif isinstance(inputs, dict):
    out = apply_fn(variables, **inputs, **kw)
  else:
    out = apply_fn(variables, inputs, **kw)
  if not features:
    return out, {}
  out, state = out
  flat = {}
  for path, value in jax.tree_util.tree_flatten_with_path(
      state.get("intermediates", {}), is_leaf=lambda v: isinstance(v, tuple))[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    flat[name] = value[-1] if isinstance(value, tuple) else value
  return out, flat


def _pick(flat, names, who):
  for n in names:
    if n not in flat:
      raise ValueError(f"features: {n!r} is not an intermediate of the {who}; it has "
                       f"{sorted(flat)}")
  return {n: flat[n] for n in names}


@functools.partial(jax.jit, static_argnames=("teacher", "loss"))
def _step(state, variables, teacher_variables, inputs, labels, *, teacher, loss):
  t_out, t_flat = _apply(teacher.apply, teacher_variables, inputs, loss.features)
  t_feats = jax.lax.stop_gradient(_pick(t_flat, loss.features, "teacher"))
  t_out = jax.lax.stop_gradient(t_out)

  def loss_fn(params):
    s_out, s_flat = _apply(state.apply_fn, {**variables, **params}, inputs, loss.features)
    s_feats = _pick(s_flat, loss.features, "student")
    return loss(s_out, t_out, labels, student_features=s_feats or None,
                teacher_features=t_feats or None)

  value, grads = jax.value_and_grad(loss_fn)(state.params)
  with jax.numpy_dtype_promotion("standard"):  # optax's step counts are int32
    state = state.apply_gradients(grads=grads)
  return state, value


def qad_train_step(state: train_state.TrainState, variables: dict, teacher: nn.Module,
                   teacher_variables: dict, inputs, labels=None, *,
                   loss: QADLoss = QADLoss()) -> tuple[train_state.TrainState, Any]:
  """One jitted QAD step: the student's TrainState learns from the frozen float teacher.

  Args:
    state: the student's ``TrainState``: ``apply_fn=qmodel.apply``,
      ``params`` its trainable collections (``{"params", "quant_params"}``),
      ``tx`` e.g. ``ql.qat_optimizer(qmodel, *recipe.optimizers())``.
    variables: the student's other collections (``{"quant_stats": ...}``),
      not trained.
    teacher: the float Linen model (e.g. ``qmodel.model``).
    teacher_variables: its variables (``{"params": float_params}``); not
      modified.
    inputs: the batch: an array, a tuple of positional arguments or a dict of
      keyword arguments.
    labels: integer labels (for ``loss.label_weight > 0``).
    loss: the :class:`jaxqat.core.QADLoss` mix.

  Returns:
    ``(new_state, loss before the update)``.

  Raises:
    TypeError: if ``state`` is not a ``TrainState``, ``teacher`` not a Linen
      module or ``loss`` not a ``QADLoss``.
    ValueError: if the teacher's output shape differs from the student's or a
      feature name does not exist (each naming it).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> from flax.training.train_state import TrainState
    >>> from jaxqat.core._distill import QADLoss
    >>> from jaxqat.flax import linen as ql
    >>> model, x = nn.Dense(3), jnp.linspace(-1, 1, 8).reshape(2, 4)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> qmodel = ql.quantize(model)
    >>> v = ql.calibrate(qmodel, {**qmodel.init(jax.random.key(0), x), "params": params}, [x])
    >>> state = TrainState.create(apply_fn=qmodel.apply, params={"params": v["params"]},
    ...                           tx=optax.sgd(0.1))
    >>> fixed = {"quant_stats": v["quant_stats"]}
    >>> loss = QADLoss(mse_weight=1.0)
    >>> state, l0 = qad_train_step(state, fixed, model, {"params": params}, x, loss=loss)
    >>> state, l1 = qad_train_step(state, fixed, model, {"params": params}, x, loss=loss)
    >>> bool(l1 < l0)
    True
  """
  if not isinstance(state, train_state.TrainState):
    raise TypeError(f"state: expected a flax.training.train_state.TrainState, got "
                    f"{type(state).__name__}")
  if not isinstance(teacher, nn.Module):
    raise TypeError(f"teacher: expected a flax.linen.Module, got {type(teacher).__name__}")
  if not isinstance(loss, QADLoss):
    raise TypeError(f"loss: expected a jaxqat.core.QADLoss, got {type(loss).__name__}")
  return _step(state, variables, teacher_variables, inputs, labels, teacher=teacher, loss=loss)
