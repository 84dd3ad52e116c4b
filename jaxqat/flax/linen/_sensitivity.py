"""Linen glue for :mod:`jaxqat.core._sensitivity`: sensitivity analysis and mixed precision.

The loop, the table and the knapsack live in the core; here a trial is
``quantize(model, rules)`` (a wrapper: ``model`` is untouched), ``init`` on
the example inputs with the float variables loaded, :func:`calibrate` on the
calibration data (when given), then the user's metric.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax

from jaxqat.core import _sensitivity as sens
from jaxqat.flax.linen import _module
from jaxqat.flax.linen import _workflow

__all__ = ["sensitivity", "mixed_precision"]

Metric = Callable[[nn.Module, Mapping[str, Any], Any], float]


def _setup(model, variables, metric, data, rules, calibration_data, calibration_steps, layers,
           example):
  """The core's Trials: layers from the report of a copy quantized with the base rules."""
  if not isinstance(model, nn.Module):
    raise TypeError(f"model: expected a flax.linen Module, got {type(model).__name__}")
  if isinstance(model, _module.QuantizedModule):
    raise ValueError("model: pass the float model (every trial wraps it with quantize); this one "
                     "is quantized already")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError("variables: expected the float model's variables dict (with 'params'), got "
                    f"{type(variables).__name__}")
  if not callable(metric):
    raise TypeError(f"metric: must be a callable metric(module, variables, data) -> float, got "
                    f"{type(metric).__name__}")
  sens.check_reiterable(calibration_data, "calibration_data")
  if example is None:
    if calibration_data is None:
      raise ValueError("example: Linen inits every quantized copy on example inputs; pass "
                       "example= (a batch, as for calibrate) or calibration_data")
    example = next(iter(calibration_data))
  args, kwargs = _workflow._call(example)  # pylint: disable=protected-access
  base = sens.normalize_rules(rules)

  def build(trial_rules, calibrate):
    qmodel = _module.quantize(model, trial_rules)
    qvars = dict(qmodel.init(jax.random.key(0), *args, **kwargs))
    qvars.update(variables)  # the float params (and any other float collection)
    if calibrate and calibration_data is not None:
      qvars = _workflow.calibrate(qmodel, qvars, calibration_data, steps=calibration_steps)
    return qmodel, qvars

  rep = _workflow.report(*build(base, False))

  def evaluate(trial_rules):
    if trial_rules is None:
      return metric(model, variables, data)
    return metric(*build(trial_rules, True), data)

  return sens.trials(rep, evaluate, base, layers)


def sensitivity(
    model: nn.Module,
    variables: Mapping[str, Any],
    metric: Metric,
    data: Any,
    *,
    rules=None,
    calibration_data: Optional[Iterable] = None,
    calibration_steps: Optional[int] = None,
    example: Any = None,
    layers: Optional[Sequence[str]] = None,
    mode: Optional[str] = "both",
    candidates=None,
    higher_is_better: bool = True,
    progress: bool = True,
) -> sens.SensitivityTable:
  """Per-layer sensitivity of a Linen model to quantization.

  Each trial wraps ``model`` with rules that quantize only one layer (or
  keep only one layer float), inits it on ``example`` with ``variables``
  loaded, calibrates it on ``calibration_data`` and returns
  ``metric(qmodel, qvariables, data)``; ``metric(model, variables, data)``
  gives the float baseline. See :func:`jaxqat.core.sensitivity`.

  Args:
    model: the float Linen module (not modified).
    variables: its variables (``params``, ...).
    metric: ``metric(module, variables, data) -> float``.
    data: the evaluation data handed to ``metric``.
    rules: the scheme analysed (``None``: :func:`jaxqat.core.default_rules`).
    calibration_data: batches for :func:`calibrate` (a list: iterated once
      per trial); ``None`` skips calibration (weight-only rules).
    calibration_steps: at most this many calibration batches.
    example: inputs for ``init`` (a batch as for :func:`calibrate`);
      default: the first calibration batch.
    layers, mode, candidates, higher_is_better, progress: as for
      :func:`jaxqat.core.sensitivity`; ``layers`` defaults to every layer
      the rules quantize.

  Returns:
    A :class:`jaxqat.core.SensitivityTable`, most sensitive layer first.

  Raises:
    TypeError: for a model that is not a Linen module, variables without
      ``params`` or a metric that is not callable.
    ValueError: if ``model`` is quantized already, no ``example`` nor
      ``calibration_data`` is given, a layer in ``layers`` is not quantized
      by the rules (the message lists those that are), or a bad ``mode``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.linspace(-1, 1, 32).reshape(8, 4)
    >>> variables = model.init(jax.random.key(0), x)
    >>> ref = model.apply(variables, x)
    >>> err = lambda m, v, x: -float(jnp.mean((m.apply(v, x) - ref) ** 2))
    >>> rules = [Rule(pattern="layers_2", weight=QuantSpec(format="int2")),
    ...          Rule(pattern=".*", weight=QuantSpec(format="int8"))]
    >>> table = sensitivity(model, variables, err, x, rules=rules, example=x,
    ...                     mode="quantize_one", progress=False)
    >>> table.layers
    ['layers_2', 'layers_0']
  """
  trials = _setup(model, variables, metric, data, rules, calibration_data, calibration_steps,
                  layers, example)
  return trials.sensitivity(
      mode=mode, candidates=candidates, higher_is_better=higher_is_better, progress=progress)


def mixed_precision(
    model: nn.Module,
    variables: Mapping[str, Any],
    metric: Metric,
    data: Any,
    *,
    budget_bytes: Optional[int] = None,
    budget_ratio: Optional[float] = None,
    candidates=None,
    rules=None,
    calibration_data: Optional[Iterable] = None,
    calibration_steps: Optional[int] = None,
    example: Any = None,
    layers: Optional[Sequence[str]] = None,
    higher_is_better: bool = True,
    progress: bool = True,
) -> sens.MixedPrecision:
  """Chooses a weight format per layer of a Linen model under a weight-size budget.

  Measures every layer in every candidate format (one trial each, as in
  :func:`sensitivity`), then solves the knapsack of
  :func:`jaxqat.core.mixed_precision`; ``quantize(model, mp.rules)`` applies
  the result.

  Args:
    model: the float Linen module.
    variables: its variables.
    metric: ``metric(module, variables, data) -> float``.
    data: the evaluation data handed to ``metric``.
    budget_bytes, budget_ratio, candidates: the budget and formats, as for
      :func:`jaxqat.core.mixed_precision` (default candidates: int8, int4).
    rules: base rules (each layer's input spec; the other layers' rules).
    calibration_data: batches for :func:`calibrate` (a list).
    calibration_steps: at most this many calibration batches.
    example: inputs for ``init`` (default: the first calibration batch).
    layers, higher_is_better, progress: as for :func:`sensitivity`.

  Returns:
    The :class:`jaxqat.core.MixedPrecision` (with its ``table``);
    ``quantize(model, mp.rules)`` wraps the model with it.

  Raises:
    ValueError: as :func:`sensitivity`, and for a budget that no assignment
      meets (raised before any trial).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import default_rules
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((2, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> mixed_precision(model, variables, lambda m, v, x: 0.0, x, budget_bytes=10, example=x,
    ...                 rules=default_rules(act_bits=None), progress=False)
    Traceback (most recent call last):
    ...
    ValueError: budget_bytes: no assignment fits 10 bytes; the smallest achievable size is 24 bytes (every layer in its smallest candidate format)
  """
  trials = _setup(model, variables, metric, data, rules, calibration_data, calibration_steps,
                  layers, example)
  return trials.mixed_precision(
      candidates=candidates, budget_bytes=budget_bytes, budget_ratio=budget_ratio,
      higher_is_better=higher_is_better, progress=progress)
