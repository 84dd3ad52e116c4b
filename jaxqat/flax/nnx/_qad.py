"""Quantization-aware distillation (QAD) for NNX: one jitted train step.

The frozen float teacher (``nnx.clone(model)`` taken before
:func:`~jaxqat.flax.nnx.quantize`) and the quantized student run on the same
batch; the student minimises :class:`jaxqat.core.QADLoss` (KL on
temperature-softened logits, logit MSE, hard labels, named features). The
teacher's forward runs outside the gradient (``jax.lax.stop_gradient`` on its
outputs): it receives no gradient and no update, and it is compiled once, in
the same program as the student's step (``nnx.jit``, cached on the models'
graph structure and the loss config)::

    teacher = nnx.clone(model)                   # the float model, frozen
    student = qnnx.quantize(model, rules)
    qnnx.calibrate(student, batches)
    opt = nnx.Optimizer(student, qnnx.qat_optimizer(student, *recipe.optimizers()),
                        wrt=nnx.Param)
    for x, y in data:
      loss = qnnx.qad_train_step(teacher, student, opt, x, y, loss=QADLoss(temperature=2.0))

**Features.** ``QADLoss(features=(...), feature_weight=w)`` matches named
intermediate values of the two models: values sown with
``self.sow(nnx.Intermediate, "name", x)`` (named by their dotted path, e.g.
``"blocks.0.feat"``) and the outputs of every module method (``nnx.capture``
with ``method_outputs``: ``"blocks.0.mlp.__call__"``). Quantization keeps
the model's attribute paths, so a name means the same place in both.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from flax import nnx

from jaxqat.core._distill import QADLoss
from jaxqat.core._distill import check_qad_args

__all__ = ["qad_train_step", "qad_forward"]


def _call(model, inputs, forward):
  if forward is not None:
    return forward(model, inputs)
  if isinstance(inputs, tuple):
    return model(*inputs)
  if isinstance(inputs, dict):
    return model(**inputs)
  return model(inputs)


def _flat_features(state) -> dict[str, Any]:
  out = {}
  for path, var in nnx.to_flat_state(state):
    value = var.get_value() if hasattr(var, "get_value") else var
    if isinstance(value, tuple):  # sow appends to a tuple: the last value
      value = value[-1]
    out[".".join(str(p) for p in path)] = value
  return out


def qad_forward(model: nnx.Module, inputs, *, features: tuple[str, ...] = (),
                forward: Optional[Callable] = None):
  """Runs ``model`` on ``inputs``; returns ``(outputs, features)``.

  Args:
    model: an NNX module (teacher or student).
    inputs: an array, a tuple of positional arguments or a dict of keyword
      arguments of the model (or what ``forward`` takes).
    features: names of intermediate values to return (see the module
      docstring); ``()`` returns ``{}`` without capturing anything.
    forward: ``forward(model, inputs) -> outputs``, instead of calling the
      model.

  Returns:
    ``(outputs, {name: value})`` for the requested names.

  Raises:
    ValueError: naming a feature that the model does not produce, with the
      names it does.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> y, f = qad_forward(m, jnp.ones((1, 2)), features=("__call__",))
    >>> bool((f["__call__"] == y).all())
    True
    >>> qad_forward(m, jnp.ones((1, 2)), features=("block9",))
    Traceback (most recent call last):
    ...
    ValueError: features: 'block9' is not a feature of the Linear; it has ['__call__']
  """
  fn = lambda m, i: _call(m, i, forward)
  if not features:  # still captured: values the model sows are not left on it
    return nnx.capture(fn, nnx.Intermediate)(model, inputs)[0], {}
  out, state = nnx.capture(fn, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, inputs)
  feats = _flat_features(state)
  for name in features:
    if name not in feats:
      raise ValueError(f"features: {name!r} is not a feature of the {type(model).__name__}; it "
                       f"has {sorted(feats)}")
  return out, {n: feats[n] for n in features}


def _step(teacher, student, optimizer, inputs, labels, loss, forward):
  t_out, t_feats = qad_forward(teacher, inputs, features=loss.features, forward=forward)
  t_out, t_feats = jax.lax.stop_gradient((t_out, t_feats))

  def loss_fn(student):
    s_out, s_feats = qad_forward(student, inputs, features=loss.features, forward=forward)
    if jax.tree.structure(s_out) != jax.tree.structure(t_out) or not hasattr(s_out, "shape"):
      raise ValueError(f"teacher: the teacher returns {jax.tree.structure(t_out)} and the student "
                       f"{jax.tree.structure(s_out)}; both must return one logits array")
    return loss(s_out, t_out, labels, student_features=s_feats or None,
                teacher_features=t_feats or None)

  value, grads = nnx.value_and_grad(loss_fn)(student)
  with jax.numpy_dtype_promotion("standard"):  # optax's step counts are int32
    optimizer.update(student, grads)
  return value


_jit_step = nnx.jit(_step, static_argnames=("loss", "forward"))


def qad_train_step(teacher: nnx.Module, student: nnx.Module, optimizer: nnx.Optimizer, inputs,
                   labels=None, *, loss: QADLoss = QADLoss(),
                   forward: Optional[Callable] = None) -> jax.Array:
  """One jitted QAD step: the student learns from the frozen teacher on one batch.

  The teacher runs forward only (its outputs under ``stop_gradient``); the
  student's gradient of ``loss`` updates it through ``optimizer`` (e.g.
  ``nnx.Optimizer(student, qat_optimizer(student, *recipe.optimizers()),
  wrt=nnx.Param)``). The step is compiled once per models' structure,
  ``loss`` and ``forward``; later calls reuse it. Put a teacher with dropout
  or batch norm in ``teacher.eval()`` mode first.

  Args:
    teacher: the float model (before quantization); not modified.
    student: the quantized model (trained in place).
    optimizer: the student's ``nnx.Optimizer``.
    inputs: the batch: an array, a tuple of positional arguments or a dict of
      keyword arguments of the models (or what ``forward`` takes).
    labels: integer labels (used when ``loss.label_weight > 0``).
    loss: the :class:`jaxqat.core.QADLoss` mix.
    forward: ``forward(model, inputs) -> logits`` when the logits are not
      ``model(inputs)`` (a hashable function, e.g. module level).

  Returns:
    The loss before the update (a float32 scalar).

  Raises:
    TypeError: if ``loss`` is not a ``QADLoss`` or a model is not an NNX module.
    ValueError: if the teacher's output shape differs from the student's, a
      feature name does not exist, or ``labels`` are missing when
      ``loss.label_weight > 0`` (each naming it).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from jaxqat.core._distill import QADLoss
    >>> from jaxqat.flax import nnx as qnnx
    >>> teacher = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> student = qnnx.quantize(nnx.clone(teacher))
    >>> _ = qnnx.calibrate(student, [jnp.ones((2, 4))])
    >>> opt = nnx.Optimizer(student, optax.sgd(0.1), wrt=nnx.Param)
    >>> x = jnp.linspace(-1, 1, 8).reshape(2, 4)
    >>> l0 = qad_train_step(teacher, student, opt, x, loss=QADLoss(mse_weight=1.0))
    >>> l1 = qad_train_step(teacher, student, opt, x, loss=QADLoss(mse_weight=1.0))
    >>> bool(l1 < l0)
    True
  """
  check_qad_args(teacher, student, loss, nnx.Module, "flax.nnx.Module",
                 "e.g. nnx.clone(model) taken before quantize")
  return _jit_step(teacher, student, optimizer, inputs, labels, loss, forward)
