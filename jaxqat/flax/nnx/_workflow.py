"""PTQ/QAT workflow for NNX models: calibrate, freeze, set modes, optimizer labels.

The steps, after :func:`jaxqat.flax.nnx.quantize`:

1. **Calibrate** (post-training quantization): :func:`calibrate` runs a few
   batches through the model with every quantizer in ``"calibrate"`` mode
   (the model computes in float while the activation observers of
   :func:`jaxqat.core.observer` collect statistics), then :func:`freeze`.
2. **Freeze**: each quantizer computes its range (activations from their
   observer, weights directly from the weight), initializes learned LSQ/LSQ+
   parameters from it and switches to ``"quant"`` mode.
3. **QAT**: train with any optax optimizer; :func:`param_labels` lets
   ``optax.multi_transform`` give :class:`QuantParam` its own learning rate and
   no weight decay.
4. **Inference**: the model in ``"quant"`` mode computes the fake-quantized
   forward pass.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import jax
from flax import nnx

from jaxqat.flax.nnx._intercept import InterceptMixin
from jaxqat.flax.nnx._quantizer import MODES
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._variables import QuantParam

__all__ = ["quantizers", "set_mode", "freeze", "calibrate", "param_labels"]


def _owners(model) -> Iterator[tuple[tuple, object]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(type(node), "jaxqat_quantizers"):
      yield tuple(path), node


def quantizers(model: nnx.Module) -> list[Quantizer]:
  """All :class:`Quantizer` modules of ``model`` (each once).

  Examples:
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> len(quantizers(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))))  # weight + input
    2
  """
  return [n for _, n in nnx.iter_graph(model) if isinstance(n, Quantizer)]


def set_mode(model: nnx.Module, mode: str, *, role: Optional[str] = None) -> nnx.Module:
  """Sets the mode of every quantizer (or of one role) in ``model``.

  ``"calibrate"`` also un-freezes the quantizers, so that the next
  :func:`freeze` recomputes their ranges (re-initializing LSQ step sizes).

  Args:
    model: a quantized model.
    mode: ``"float"``, ``"calibrate"`` or ``"quant"``.
    role: ``"weight"`` or ``"act"`` to change only those quantizers.

  Returns:
    ``model`` (changed in place).

  Raises:
    ValueError: on an unknown ``mode`` or ``role``, or ``"quant"`` for a
      quantizer that was never frozen.

  Examples:
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> m = set_mode(quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), "float")
    >>> {q.mode for q in quantizers(m)}
    {'float'}
  """
  if mode not in MODES:
    raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
  if role not in (None, "weight", "act"):
    raise ValueError(f"role: must be None, 'weight' or 'act', got {role!r}")
  for q in quantizers(model):
    if role is not None and q.role != role:
      continue
    if mode == "quant" and not q.frozen:
      raise ValueError(f"set_mode: quantizer of layer '{q.path}' was never frozen; run "
                       "calibrate(model, batches) or freeze(model) first")
    if mode == "calibrate":
      q.frozen = False
    q.mode = mode
  return model


def freeze(model: nnx.Module) -> nnx.Module:
  """Computes every unfrozen quantizer's range and switches it to ``"quant"``.

  Activation quantizers use their observer statistics (collected by
  :func:`calibrate`); weight quantizers calibrate on the current weight, so a
  weight-only model needs no data: ``freeze(quantize(model, rules))``.
  LSQ step sizes are initialized from the calibrated scale, LSQ+ offsets to
  ``β = -z·s``.

  Args:
    model: a quantized model.

  Returns:
    ``model`` (changed in place).

  Raises:
    ValueError: if an activation quantizer saw no data (naming the layer).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import Rule, QuantSpec
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), Rule(pattern=".*", weight=QuantSpec()))
    >>> {q.mode for q in quantizers(freeze(m))}
    {'quant'}
  """
  seen = set()
  for _, owner in _owners(model):
    unseen = "warn" if isinstance(owner, InterceptMixin) else "raise"
    for q, w in owner.jaxqat_quantizers():
      if id(q) not in seen:
        seen.add(id(q))
        q.freeze(w, unseen=unseen)
  for q in quantizers(model):  # any quantizer outside a known owner
    if id(q) not in seen:
      q.freeze(None)
  return model


def calibrate(
    model: nnx.Module,
    batches: Iterable,
    *,
    forward: Optional[Callable] = None,
    freeze_after: bool = True,
    jit: bool = True,
) -> nnx.Module:
  """Post-training calibration: observe a few batches, then :func:`freeze`.

  Every unfrozen quantizer is put in ``"calibrate"`` mode (float compute,
  observers on), each batch is run through ``forward(model, batch)``, and the
  ranges are computed.

  Args:
    model: a quantized model.
    batches: an iterable of inputs (anything ``forward`` accepts).
    forward: ``forward(model, batch)``; default ``model(batch)``.
    freeze_after: call :func:`freeze` at the end (default True).
    jit: run ``forward`` under ``nnx.jit`` (one trace for all batches of one
      shape).

  Returns:
    ``model`` (changed in place).

  Raises:
    ValueError: if ``batches`` is empty, or an activation quantizer saw no
      data (naming the layer).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> m = calibrate(m, [jnp.ones((4, 2)), -jnp.ones((4, 2))])
    >>> round(float(m.input_quant.scale[...]) * 255, 5)  # affine int8 over [-1, 1]
    2.0
  """
  for q in quantizers(model):
    if not q.frozen:
      q.mode = "calibrate"
  fwd = forward if forward is not None else (lambda m, b: m(b))

  def step(m, b):
    fwd(m, b)

  step_fn = nnx.jit(step) if jit else step
  n = 0
  for b in batches:
    step_fn(model, b)
    n += 1
  if n == 0:
    raise ValueError("batches: calibration needs at least one batch, got an empty iterable")
  if freeze_after:
    freeze(model)
  return model


def param_labels(model: nnx.Module, *, quant: str = "quant", other: str = "params") -> Callable:
  """A labelling function for ``optax.multi_transform``: QuantParam vs the rest.

  The returned function maps a parameter tree (an ``nnx.State`` of Variables
  as given to ``tx.init`` by ``nnx.Optimizer``, or the matching tree of
  arrays given to ``tx.update``) to the same tree of labels: ``quant`` for
  :class:`QuantParam` leaves (LSQ step sizes and offsets) and ``other`` for
  everything else.

  Args:
    model: the quantized model (read once, for the paths of its QuantParams).
    quant: the label of quantizer parameters.
    other: the label of all other parameters.

  Returns:
    ``labels_fn(params) -> labels``.

  Examples:
    >>> import jax, optax
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, Rule
    >>> from jaxqat.flax.nnx import quantize
    >>> m = quantize(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...              Rule(pattern=".*", weight=QuantSpec(learning="lsq")))
    >>> tx = optax.multi_transform({"params": optax.adamw(1e-3, weight_decay=1e-4),
    ...                             "quant": optax.adam(1e-2)}, param_labels(m))
    >>> opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
    >>> sorted(jax.tree.leaves(param_labels(m)(nnx.state(m, nnx.Param))))
    ['params', 'params', 'quant']
  """
  qpaths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, QuantParam))}

  def key_of(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return getattr(k, attr)
    return k

  def labels_fn(params):
    def label(path, leaf):
      if isinstance(leaf, nnx.Variable):
        return quant if isinstance(leaf, QuantParam) else other
      parts = tuple(key_of(k) for k in path)
      if parts in qpaths or parts[:-1] in qpaths and parts[-1:] == ("value",):
        return quant
      return other

    return jax.tree_util.tree_map_with_path(
        label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

  return labels_fn
