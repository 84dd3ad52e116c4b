"""PTQ/QAT workflow for NNX models: calibrate, freeze/unfreeze, modes, the optimizer.

The steps, after :func:`jaxqat.flax.nnx.quantize` (the verbs of
``docs/contract.md``):

1. **Calibrate** (post-training quantization): :func:`calibrate` runs a few
   batches through the model in float while the activation observers of
   :func:`jaxqat.core.observer` record the layer inputs, then sets every
   activation range, initialises learned step sizes and LSQ+ offsets, and
   leaves the model in ``"quant"`` mode.
2. **QAT**: train with ``nnx.Optimizer(model, qat_optimizer(model, tx,
   quant_tx), wrt=nnx.Param)``. Fixed-range weight quantizers recompute
   their range from the current weights at every step.
3. **Freeze** (for conversion/export, or on request): :func:`freeze` stores
   the current weight ranges and stops the tracking; :func:`unfreeze`
   resumes it.
4. **Compare**: :func:`set_mode` ``"float"`` runs the float model, ``"quant"``
   the fake-quantized one.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import optax
from flax import nnx

from jaxqat.core._batches import join_static, split_static
from jaxqat.flax.nnx import _intercept
from jaxqat.flax.nnx import _layers
from jaxqat.flax.nnx._convert import is_quantized
from jaxqat.flax.nnx._quantizer import ACT
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._quantizer import WEIGHT
from jaxqat.flax.nnx._variables import QuantParam

__all__ = ["quantizers", "set_mode", "freeze", "unfreeze", "calibrate", "qat_optimizer"]

_USER_MODES = ("quant", "float")


_get = _layers.get_path


def _owners(model) -> Iterator[tuple[tuple, Any]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(type(node), "jaxqat_weights"):
      yield tuple(path), node


def _weight_quantizers(model) -> list[tuple[Quantizer, Any]]:
  """``[(weight quantizer, its weight array)]``, each quantizer once."""
  out, seen = [], set()
  for _, owner in _owners(model):
    for parts, wq, _ in owner.jaxqat_weights():
      if wq is not None and id(wq) not in seen:
        seen.add(id(wq))
        out.append((wq, _get(owner, parts)[...]))
  return out


def quantizers(model: nnx.Module) -> list[Quantizer]:
  """All :class:`Quantizer` modules of ``model`` (each once).

  Examples:
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> len(quantizers(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))))  # weight + input
    2
  """
  return [n for _, n in nnx.iter_graph(model) if isinstance(n, Quantizer)]


def _check_model(model, fn: str) -> list[Quantizer]:
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  qs = quantizers(model)
  if not qs and not is_quantized(model):
    raise ValueError(f"model: {fn} needs a quantized model; run "
                     "jaxqat.flax.nnx.quantize(model, rules) first")
  return qs


def set_mode(model: nnx.Module, mode: str) -> nnx.Module:
  """Sets every quantizer of ``model`` to ``"quant"`` or ``"float"``.

  ``"quant"`` (the default after :func:`quantize`) fake-quantizes;
  ``"float"`` makes every quantizer pass its input through: the float model,
  for comparison. The mode is static (part of the graph definition): set it
  outside of jitted code.

  Args:
    model: a quantized model.
    mode: ``"quant"`` or ``"float"``.

  Returns:
    ``model`` (changed in place).

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: on another ``mode``, or a model that is not quantized.

  Examples:
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> m = set_mode(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), "float")
    >>> {q.mode for q in quantizers(m)}
    {'float'}
  """
  if mode not in _USER_MODES:
    raise ValueError(f"mode: must be one of {_USER_MODES}, got {mode!r}")
  for q in _check_model(model, "set_mode"):
    q.mode = mode
  return model


def freeze(model: nnx.Module) -> nnx.Module:
  """Stores the current fixed-range weight ranges and stops their per-step tracking.

  During QAT a ``learning="fixed"`` weight quantizer recomputes its range
  from the current weight at every call; after ``freeze`` it uses the range
  stored here (in ``scale``/``zero_point``), as a converted or exported
  model does. Learned (LSQ) and activation ranges are not affected. Ranges
  are computed by one jitted function per distinct (spec, weight shape).

  Args:
    model: a quantized model.

  Returns:
    ``model`` (changed in place).

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if ``model`` is not quantized.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import Rule, QuantSpec
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), Rule(pattern=".*", weight=QuantSpec()))
    >>> freeze(m).kernel_quant.frozen, unfreeze(m).kernel_quant.frozen
    (True, False)
  """
  _check_model(model, "freeze")
  for wq, w in _weight_quantizers(model):
    wq.store_weight_range(w)
  return model


def unfreeze(model: nnx.Module) -> nnx.Module:
  """Resumes the per-step range tracking of fixed-range weight quantizers.

  Args:
    model: a quantized model.

  Returns:
    ``model`` (changed in place).

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if ``model`` is not quantized.

  Examples:
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> unfreeze(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))).kernel_quant.frozen
    False
  """
  for q in _check_model(model, "unfreeze"):
    if q.role == WEIGHT:
      q.frozen = False
  return model


def _call(model, batch):
  if isinstance(batch, tuple):
    return model(*batch)
  if isinstance(batch, dict):
    return model(**batch)
  return model(batch)


def calibrate(
    model: nnx.Module,
    data: Iterable,
    *,
    steps: Optional[int] = None,
    forward: Optional[Callable[[nnx.Module, Any], Any]] = None,
) -> nnx.Module:
  """Post-training calibration: observe the data, set ranges, leave the model quantized.

  The data runs through the model in float (every quantizer passes its
  input through) while the activation observers record the layer inputs
  (non-finite values are ignored). Then every activation range is set from
  its observer; learned step sizes are initialised (activations from the
  calibrated range, weights from the current weights; stored as
  ``log_scale``) and LSQ+ offsets set to ``β = -z·s``; ``PerOutputChannel()``
  weights of intercepted modules are resolved per op; frozen weight ranges
  are refreshed. The model is left in ``"quant"`` mode. Every range is
  computed by one jitted function per distinct (spec, shape).

  An activation quantizer that saw no batch, or no finite value, stays float
  with a :class:`jaxqat.core.QuantizationWarning` naming its layer (the
  :func:`report` says so). ``Embed``'s query quantizer, used only by
  ``attend``, stays float silently when ``attend`` was not called.

  Args:
    model: a quantized model.
    data: an iterable of batches: each an array (``model(batch)``), a tuple
      of positional arguments (``model(*batch)``) or a dict of keyword
      arguments (``model(**batch)``). Arrays are traced; other values
      (``train=False``) reach the model as they are (one compilation per
      distinct value).
    steps: the largest number of batches to use (default: all).
    forward: ``forward(model, batch)`` to run instead of calling the model
      (it is jitted with ``nnx.jit``).

  Returns:
    ``model`` (changed in place).

  Raises:
    TypeError: if ``model`` is not an NNX module.
    ValueError: if ``model`` is not quantized, ``data`` is empty or
      ``steps`` is not a positive int.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> m = calibrate(m, [jnp.ones((4, 2)), -jnp.ones((4, 2))])
    >>> round(float(m.input_quant.scale[...]) * 255, 5)  # affine int8 over [-1, 1]
    2.0
  """
  if steps is not None and (not isinstance(steps, numbers.Integral) or isinstance(steps, bool)
                            or steps < 1):
    raise ValueError(f"steps: must be a positive int or None, got {steps!r}")
  if forward is not None and not callable(forward):
    raise TypeError(f"forward: expected a callable forward(model, batch), got "
                    f"{type(forward).__name__}")
  qs = _check_model(model, "calibrate")
  fwd = forward if forward is not None else _call

  def step(m, arrays, static):  # flags in a batch (train=False) stay Python values
    fwd(m, join_static(arrays, static))

  jitted = nnx.jit(step, static_argnums=2)
  step_fn = lambda m, b: jitted(m, *split_static(b))  # noqa: E731
  _intercept.take_resolutions()
  for q in qs:
    q.mode = "calibrate"
    if q.role == ACT:
      q.reset_stats()
  n = 0
  try:
    for b in data:
      if steps is not None and n >= steps:
        break
      step_fn(model, b)
      n += 1
  finally:
    for q in qs:
      q.mode = "quant"
  if n == 0:
    raise ValueError("data: calibration needs at least one batch, got an empty iterable")
  resolved = _intercept.take_resolutions()
  for _, owner in _owners(model):
    if isinstance(owner, _intercept.InterceptMixin) and owner.jaxqat_weight_quant is not None:
      for name in list(owner.jaxqat_weight_quant.keys()):
        wq = owner.jaxqat_weight_quant[name]
        if wq.output_channel_spec is not None and wq.uid in resolved:
          _intercept.reresolve(owner, name, resolved[wq.uid])
  for q in quantizers(model):
    if q.role == ACT:
      q.set_from_observer()
  for wq, w in _weight_quantizers(model):
    if wq.frozen:
      wq.store_weight_range(w)
    else:
      wq.init_from_weight(w)
  return model


def _key_of(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def qat_optimizer(model: nnx.Module, tx: optax.GradientTransformation,
                  quant_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """An optax transformation: ``quant_tx`` for quantizer parameters, ``tx`` for the rest.

  Quantizer parameters (:class:`QuantParam`: the learned ``log_scale`` and
  LSQ+ ``offset``) get their own learning rate and no weight decay (pass a
  ``quant_tx`` without decay); every other trainable parameter gets ``tx``.
  Use it as ``nnx.Optimizer(model, qat_optimizer(model, tx, quant_tx),
  wrt=nnx.Param)``, after :func:`calibrate`.

  Args:
    model: the quantized model (read once, for the paths of its QuantParams).
    tx: the transformation of the model's own parameters.
    quant_tx: the transformation of the quantizer parameters.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform``).

  Raises:
    TypeError: if ``model`` is not an NNX module or ``tx``/``quant_tx`` are
      not optax transformations.

  Examples:
    >>> import jax, optax
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...              Rule(pattern=".*", weight=QuantSpec(learning="lsq")))
    >>> opt = nnx.Optimizer(m, qat_optimizer(m, optax.adamw(1e-3), optax.adam(1e-2)),
    ...                     wrt=nnx.Param)
    >>> type(opt).__name__
    'Optimizer'
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  for name, t in (("tx", tx), ("quant_tx", quant_tx)):
    if not (hasattr(t, "init") and hasattr(t, "update")):
      raise TypeError(f"{name}: expected an optax.GradientTransformation, got "
                      f"{type(t).__name__}")
  qpaths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, QuantParam))}

  def labels_fn(params):
    def label(path, leaf):
      if isinstance(leaf, nnx.Variable):
        return "quant" if isinstance(leaf, QuantParam) else "params"
      parts = tuple(_key_of(k) for k in path)
      if parts in qpaths or parts[:-1] in qpaths and parts[-1:] == ("value",):
        return "quant"
      return "params"

    return jax.tree_util.tree_map_with_path(
        label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

  return optax.multi_transform({"params": tx, "quant": quant_tx}, labels_fn)
