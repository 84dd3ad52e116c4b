"""The contract's verbs for Linen: calibrate, freeze, unfreeze, qat_optimizer, report.

PTQ: ``calibrate`` over a few batches; the model is then quantized, ready for
inference or QAT. QAT: train ``{"params", "quant_params"}`` with
``qat_optimizer`` (the quantizers' ``log_scale`` / ``offset`` get their own
transformation). Fixed-range weights track the current weights during QAT;
``freeze`` stores their ranges (for conversion / export), ``unfreeze`` resumes
tracking. See ``docs/contract.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Iterable, Mapping, Optional

import jax
import optax

from jaxqat import core
from jaxqat.core._batches import join_static, split_static
from jaxqat.flax.linen import _intercept
from jaxqat.flax.linen import _module
from jaxqat.flax.linen import _quantizer

STATS, PARAMS = _quantizer.STATS, _quantizer.PARAMS


def _check_variables(variables) -> dict:
  if not isinstance(variables, Mapping):
    raise TypeError("variables: expected the dict of the quantized model's variables (from "
                    f"qmodel.init), got {type(variables).__name__}")
  return {k: v for k, v in variables.items()}


def mutable(variables: Mapping[str, Any], *own: str) -> list:
  """``own`` collections plus the model's own state collections, for ``apply(mutable=...)``.

  jaxqat's runs (calibrate, freeze, report, convert) keep only what they
  collect in ``own``; a model that writes its own state on every call (a
  decoding ``cache``, ``batch_stats`` in training mode, a sown collection)
  must still be allowed to, or Flax refuses the run. Those writes are
  dropped: the variables given stay the model's.
  """
  return list(own) + [c for c in variables if c not in ("params", STATS, PARAMS) + own]


def _call(batch) -> tuple[tuple, dict]:
  """A batch as (args, kwargs): an array, a tuple of positional args, a dict of kwargs."""
  if isinstance(batch, Mapping):
    return (), dict(batch)
  if isinstance(batch, (tuple, list)):
    return tuple(batch), {}
  return (batch,), {}


def _unfrozen(tree):
  """``tree`` with every ``FROZEN`` key dropped (nested dicts rebuilt)."""
  if not hasattr(tree, "items"):
    return tree
  return {k: _unfrozen(v) for k, v in tree.items() if k != _quantizer.FROZEN}


def _replace_entries(tree, fn, prefix=()):
  """Rebuilds a quant_stats tree with ``fn(path, entry)`` applied to every quantizer entry."""
  if not hasattr(tree, "items"):
    return tree
  if "fingerprint" in tree:
    return fn(prefix, dict(tree))
  return {k: _replace_entries(v, fn, prefix + (str(k),)) for k, v in tree.items()}


def _drop(tree, path: tuple, *, prune: bool = False):
  """``tree`` (nested dicts) without the entry at ``path`` (no-op if absent).

  With ``prune``, parents left empty by the removal are removed too.
  """
  if not hasattr(tree, "items") or not path or path[0] not in tree:
    return tree
  out = dict(tree)
  if len(path) == 1:
    del out[path[0]]
  else:
    out[path[0]] = _drop(out[path[0]], path[1:], prune=prune)
    if prune and not out[path[0]]:
      del out[path[0]]
  return out


def _where(path: tuple) -> str:
  layer, name = "/".join(path[:-1]), path[-1]
  return f"layer {_quantizer.describe(layer)} input activation '{name}'"


def calibrate(qmodel: _module.QuantizedModule, variables: Mapping[str, Any], data: Iterable[Any],
              *, steps: Optional[int] = None) -> dict:
  """Calibrates ``qmodel``: observe, set activation ranges, initialise LSQ.

  The batches run through the model in float (jitted once) while the
  activation observers record them (non-finite values are ignored). Then
  every activation range is set from its observer (fixed: ``scale`` /
  ``zero_point``; LSQ: ``log_scale`` from the calibrated step size, LSQ+:
  ``offset = -z s``), LSQ weights get ``log_scale`` from the current weights
  and fixed weight ranges are recomputed. The model is then quantized, ready
  for inference or QAT. Observers start afresh at every call.

  An activation quantizer that saw no batch or no finite value gets a
  :class:`~jaxqat.core.QuantizationWarning` naming its layer and stays float
  (``quant_stats[...]["stays_float"]``; :func:`report` lists it).

  Args:
    qmodel: the quantized model.
    variables: its variables (from ``qmodel.init``, float params loaded).
    data: an iterable of batches; a batch is an array (one positional
      argument), a tuple of positional arguments, or a dict of keyword
      arguments. Arrays are traced; other values (``train=False``) reach
      the model as they are (one compilation per distinct value).
    steps: at most this many batches (``None``: all).

  Returns:
    ``variables`` with updated ``quant_stats`` and ``quant_params``.

  Raises:
    TypeError: if ``qmodel`` is not a :class:`QuantizedModule` or
      ``variables`` not a variables dict.
    ValueError: if ``data`` is empty or ``steps`` is not a positive int.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = _module.quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> v = calibrate(qmodel, v, [jnp.full((1, 4), 2.55), jnp.zeros((1, 4))])
    >>> round(float(v["quant_stats"]["input"]["scale"]), 6)  # min/max [0, 2.55] over 255 steps
    0.01
  """
  _module.check_qmodel(qmodel)
  variables = _check_variables(variables)
  if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
    raise ValueError(f"steps: expected a positive int or None, got {steps!r}")

  def fresh(path, entry):
    if "observer" in entry:
      entry["observer"] = jax.tree.map(jax.numpy.zeros_like, entry["observer"])
      entry["count"] = jax.numpy.zeros_like(entry["count"])
    return entry

  variables[STATS] = _replace_entries(variables.get(STATS, {}), fresh)
  observe = _module.with_mode(qmodel, "calibrate")

  @functools.partial(jax.jit, static_argnums=2)
  def step(v, arrays, static):  # flags (train=False) stay Python values
    args, kwargs = join_static(arrays, static)
    return observe.apply(v, *args, **kwargs, mutable=mutable(v, STATS))[1][STATS]

  first, n = None, 0
  for batch in data:
    if steps is not None and n >= steps:
      break
    args, kwargs = _call(batch)
    if first is None:
      first = (args, kwargs)
    variables[STATS] = step(variables, *split_static((args, kwargs)))
    n += 1
  if n == 0:
    raise ValueError("data: calibration needs at least one batch, got an empty iterable")
  if getattr(qmodel, "_jaxqat_example", None) is None:
    _module._remember(qmodel, *first)  # pylint: disable=protected-access

  empty = []

  def mark(path, entry):
    if "observer" not in entry:
      return entry
    for k in ("scale", "zero_point", _quantizer.STAYS_FLOAT):
      entry.pop(k, None)
    if _quantizer.saw_no_data(entry):
      empty.append(path)
      entry[_quantizer.STAYS_FLOAT] = jax.numpy.ones((), jax.numpy.int32)
    return entry

  variables[STATS] = _replace_entries(variables[STATS], mark)
  for path in empty:
    warnings.warn(f"jaxqat: calibrate: {_where(path)} saw no batch or no finite value; it "
                  "stays float", core.QuantizationWarning, stacklevel=2)
    if PARAMS in variables:
      variables[PARAMS] = _drop(variables[PARAMS], path)
  setter = _module.with_mode(qmodel, "set")

  @functools.partial(jax.jit, static_argnums=2)
  def set_ranges(v, arrays, static):
    args, kwargs = join_static(arrays, static)
    with _quantizer.batched_step_sizes() as convert:
      updates = setter.apply(v, *args, **kwargs, mutable=mutable(v, STATS, PARAMS))[1]
      return convert({k: updates[k] for k in (STATS, PARAMS) if k in updates})

  updates = set_ranges(variables, *split_static(first))
  variables.update({k: v for k, v in updates.items() if v or k in variables})
  return variables


def freeze(qmodel: _module.QuantizedModule, variables: Mapping[str, Any]) -> dict:
  """Stores the current fixed weight ranges and stops tracking them.

  During QAT a fixed-range weight quantizer recomputes its range from the
  current weight at every step; after ``freeze`` it uses the range stored
  now (``quant_stats[...]["scale"/"zero_point"]``, marked ``frozen``), e.g.
  for conversion or export. Activation ranges and learned step sizes are
  unchanged. The model is traced once with zeros shaped like the example
  inputs of ``qmodel.init`` (weight ranges do not depend on the inputs).

  Args:
    qmodel: the quantized model (initialised in this process).
    variables: its variables.

  Returns:
    ``variables`` with the weight ranges stored and frozen.

  Raises:
    TypeError: if ``qmodel`` is not a :class:`QuantizedModule`.
    ValueError: if ``qmodel`` was never initialised (no example inputs).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = _module.quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> v["params"]["kernel"] = jnp.full((4, 3), 1.27)
    >>> v = freeze(qmodel, v)
    >>> v["quant_stats"]["kernel"]["scale"]  # absmax 1.27 / 127 per output channel
    Array([[0.01, 0.01, 0.01]], dtype=float32)
    >>> "frozen" in unfreeze(qmodel, v)["quant_stats"]["kernel"]
    False
  """
  _module.check_qmodel(qmodel)
  variables = _check_variables(variables)
  args, kwargs = qmodel.example()
  frz = _module.with_mode(qmodel, "freeze")

  @jax.jit
  def run(v):
    return frz.apply(v, *args, **kwargs, mutable=mutable(v, STATS))[1][STATS]

  variables[STATS] = run(variables)
  return variables


def unfreeze(qmodel: _module.QuantizedModule, variables: Mapping[str, Any]) -> dict:
  """Resumes the per-step tracking of fixed weight ranges (undoes :func:`freeze`).

  Args:
    qmodel: the quantized model.
    variables: its variables.

  Returns:
    ``variables`` without the ``frozen`` marks.

  Raises:
    TypeError: if ``qmodel`` is not a :class:`QuantizedModule`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = _module.quantize(nn.Dense(3))
    >>> v = freeze(qmodel, qmodel.init(jax.random.key(0), jnp.ones((1, 4))))
    >>> sorted(unfreeze(qmodel, v)["quant_stats"]["kernel"])
    ['fingerprint', 'scale', 'zero_point']
  """
  _module.check_qmodel(qmodel)
  variables = _check_variables(variables)
  variables[STATS] = _unfrozen(variables.get(STATS, {}))
  return variables


def qat_optimizer(qmodel: _module.QuantizedModule, tx: optax.GradientTransformation,
                  quant_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """One optax optimizer for ``{"params": ..., "quant_params": ...}``.

  The learned quantizer parameters (``quant_params``: ``log_scale`` and
  ``offset``) get ``quant_tx`` (own learning rate, no weight decay); every
  other top-level entry (the float weights) gets ``tx``.

  Args:
    qmodel: the quantized model the optimizer is for.
    tx: the transformation for the float weights.
    quant_tx: the one for the learned quantizer parameters.

  Returns:
    An ``optax.partition`` of the two over a dict of collections.

  Raises:
    TypeError: if ``qmodel`` is not a :class:`QuantizedModule` or ``tx`` /
      ``quant_tx`` is not an optax GradientTransformation.

  Examples:
    >>> import optax, jax.numpy as jnp, flax.linen as nn
    >>> tx = qat_optimizer(_module.quantize(nn.Dense(2)), optax.sgd(0.5), optax.sgd(0.25))
    >>> t = {"params": {"w": jnp.ones(2)}, "quant_params": {"s": jnp.ones(())}}
    >>> u, _ = tx.update(t, tx.init(t), t)
    >>> float(u["params"]["w"][0]), float(u["quant_params"]["s"])
    (-0.5, -0.25)
  """
  _module.check_qmodel(qmodel)
  for name, t in (("tx", tx), ("quant_tx", quant_tx)):
    if not isinstance(t, optax.GradientTransformation):
      raise TypeError(f"{name}: expected an optax GradientTransformation, got {type(t).__name__}")

  def labels(tree):
    return {k: "quant" if k == PARAMS else "float" for k in tree}

  return optax.partition({"float": tx, "quant": quant_tx}, labels)


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

_BIAS_REASON = "not a matmul/conv/lookup operand"


def _layer_report(path: str, rec) -> core.LayerReport:
  rule = rec.rule
  pattern = rule.pattern if rule is not None else None
  names = list(rec.params) + [n for n in rec.quantized if n not in rec.params]
  shapes = dict(rec.params)

  def weights(reason_of):
    return [core.WeightReport(n, shapes.get(n, ()), rec.quantized.get(n), "" if
                              rec.quantized.get(n) is not None else reason_of(n)) for n in names]

  if rule is None:
    return core.LayerReport(path, rec.kind, "unmatched", weights(lambda n: "no rule matched"),
                            reason="no rule matched its path")
  if rule.skip or (rule.weight is None and rule.act is None):
    return core.LayerReport(path, rec.kind, "skipped",
                            weights(lambda n: f"rule {rule.pattern!r} skips it"), rule=pattern,
                            reason=f"rule {rule.pattern!r} skips it")
  if rec.quantized or rec.act is not None:
    reason = (lambda n: _BIAS_REASON if rule.weight is not None else "the rule has no weight spec")
    return core.LayerReport(path, rec.kind, "quantized", weights(reason), act=rec.act,
                            rule=pattern, reason="intercepted")
  if rec.elementwise:
    why = "no matmul or convolution (elementwise layer)"
  elif rule.weight is None:
    why = "the rule has no weight spec and the layer has no quantized input"
  else:
    why = f"none of its parameters reached an intercepted op ({', '.join(_intercept.OPS)})"
  return core.LayerReport(path, rec.kind, "unsupported", weights(lambda n: why), rule=pattern,
                          reason=why)


def report(qmodel: _module.QuantizedModule, variables: Mapping[str, Any]) -> core.QuantizationReport:
  """What :func:`quantize` does to each layer, weight by weight.

  Traces the model once (abstractly, with inputs shaped like the example of
  ``qmodel.init``) and lists every module that holds parameters (or an input
  quantizer): quantized or not, each weight's resolved spec or the reason it
  stays float (an input that calibration found no data for is reported
  float), and the rules that matched nothing.

  Args:
    qmodel: the quantized model (initialised in this process).
    variables: its variables.

  Returns:
    A :class:`jaxqat.core.QuantizationReport`.

  Raises:
    TypeError: if ``qmodel`` is not a :class:`QuantizedModule`.
    ValueError: if ``qmodel`` was never initialised (no example inputs).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = _module.quantize(nn.Sequential([nn.Dense(4), nn.LayerNorm()]))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> r = report(qmodel, v)
    >>> r.quantized_paths(), r["layers_1"].status
    (['layers_0'], 'unsupported')
    >>> [(w.name, w.quantized) for w in r["layers_0"].weights]
    [('bias', False), ('kernel', True)]
  """
  _module.check_qmodel(qmodel)
  variables = _check_variables(variables)
  args, kwargs = qmodel.example()
  flt = _module.with_mode(qmodel, "float")
  runs: list = []
  _module._RUNS.append(runs)  # pylint: disable=protected-access
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", core.QuantizationWarning)
      jax.eval_shape(lambda v: flt.apply(v, *args, **kwargs, mutable=mutable(v)), variables)
  finally:
    _module._RUNS.pop()  # pylint: disable=protected-access
  ctx = runs[-1]
  paths = sorted(ctx.layers, key=lambda p: ctx.order.get(p, len(ctx.order)))
  layers = [_layer_report(path, ctx.layers[path]) for path in paths]
  float_inputs = {"/".join(p[:-1]) for p, e in _quantizer.quantizer_entries(
      variables.get(STATS, {})) if _quantizer.STAYS_FLOAT in e}
  layers = [dataclasses.replace(l, act=None, reason=f"{l.reason}; input stays float: "
                                "calibration saw no finite value")
            if l.path in float_inputs else l for l in layers]
  unused = [r.pattern for r in ctx.ruleset.unused()]
  return core.QuantizationReport(layers=layers, unused_rules=unused)
