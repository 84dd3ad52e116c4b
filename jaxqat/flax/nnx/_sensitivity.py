"""NNX glue for :mod:`jaxqat.core._sensitivity`: sensitivity analysis and mixed precision.

The loop, the table and the knapsack live in the core; here a trial is
``quantize(nnx.clone(model), rules)``, then :func:`calibrate` on the
calibration data (when given), then the user's metric.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from flax import nnx

from jaxqat.core import _sensitivity as sens
from jaxqat.flax.nnx import _convert
from jaxqat.flax.nnx import _report
from jaxqat.flax.nnx import _workflow

__all__ = ["sensitivity", "mixed_precision"]

Metric = Callable[[nnx.Module, Any], float]


def _setup(model, metric, data, rules, calibration_data, calibration_steps, layers):
  """The core's Trials: layers from the report of a copy quantized with the base rules."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model: expected a flax.nnx.Module, got {type(model).__name__}")
  if _convert.is_quantized(model):
    raise ValueError("model: pass the float model (every trial quantizes its own nnx.clone); "
                     "this one is quantized already")
  if not callable(metric):
    raise TypeError(f"metric: must be a callable metric(model, data) -> float, got "
                    f"{type(metric).__name__}")
  sens.check_reiterable(calibration_data, "calibration_data")
  base = sens.normalize_rules(rules)
  probe = _convert.quantize(nnx.clone(model), base)
  rep = _report.report(probe)

  def evaluate(trial_rules):
    if trial_rules is None:
      return metric(model, data)
    m = _convert.quantize(nnx.clone(model), trial_rules)
    if calibration_data is not None:
      _workflow.calibrate(m, calibration_data, steps=calibration_steps)
    return metric(m, data)

  return sens.trials(rep, evaluate, base, layers)


def sensitivity(
    model: nnx.Module,
    metric: Metric,
    data: Any,
    *,
    rules=None,
    calibration_data: Optional[Iterable] = None,
    calibration_steps: Optional[int] = None,
    layers: Optional[Sequence[str]] = None,
    mode: Optional[str] = "both",
    candidates=None,
    higher_is_better: bool = True,
    progress: bool = True,
) -> sens.SensitivityTable:
  """Per-layer sensitivity of an NNX model to quantization.

  Each trial quantizes ``nnx.clone(model)`` with rules that quantize only one
  layer (or keep only one layer float), calibrates it on
  ``calibration_data`` and returns ``metric(quantized_model, data)``; the
  float model gives the baseline. See :func:`jaxqat.core.sensitivity`.

  Args:
    model: the float model (not modified).
    metric: ``metric(model, data) -> float`` (accuracy, loss...).
    data: the evaluation data handed to ``metric``.
    rules: the scheme analysed (``None``: :func:`jaxqat.core.default_rules`).
    calibration_data: batches for :func:`calibrate` (a list: it is iterated
      once per trial); ``None`` skips calibration (weight-only rules).
    calibration_steps: at most this many calibration batches.
    layers, mode, candidates, higher_is_better, progress: as for
      :func:`jaxqat.core.sensitivity`; ``layers`` defaults to every layer
      the rules quantize.

  Returns:
    A :class:`jaxqat.core.SensitivityTable`, most sensitive layer first.

  Raises:
    TypeError: if ``model`` is not an NNX module or ``metric`` not callable.
    ValueError: if ``model`` is quantized already, a layer in ``layers`` is
      not quantized by the rules (the message lists those that are), or for
      a bad ``mode``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.linspace(-1, 1, 32).reshape(8, 4)
    >>> err = lambda m, x: -float(jnp.mean((m(x) - model(x)) ** 2))  # vs the float model
    >>> rules = [Rule(pattern="layers/2", weight=QuantSpec(format="int2")),
    ...          Rule(pattern=".*", weight=QuantSpec(format="int8"))]
    >>> table = sensitivity(model, err, x, rules=rules, mode="quantize_one", progress=False)
    >>> table.layers
    ['layers/2', 'layers/0']
  """
  trials = _setup(model, metric, data, rules, calibration_data, calibration_steps, layers)
  return trials.sensitivity(
      mode=mode, candidates=candidates, higher_is_better=higher_is_better, progress=progress)


def mixed_precision(
    model: nnx.Module,
    metric: Metric,
    data: Any,
    *,
    budget_bytes: Optional[int] = None,
    budget_ratio: Optional[float] = None,
    candidates=None,
    rules=None,
    calibration_data: Optional[Iterable] = None,
    calibration_steps: Optional[int] = None,
    layers: Optional[Sequence[str]] = None,
    higher_is_better: bool = True,
    progress: bool = True,
) -> sens.MixedPrecision:
  """Chooses a weight format per layer of an NNX model under a weight-size budget.

  Measures every layer in every candidate format (one trial each, as in
  :func:`sensitivity`), then solves the knapsack of
  :func:`jaxqat.core.mixed_precision`. Quantize with the result's ``rules``:
  ``quantize(model, mp.rules)``.

  Args:
    model: the float model (not modified).
    metric: ``metric(model, data) -> float``.
    data: the evaluation data handed to ``metric``.
    budget_bytes, budget_ratio, candidates: the budget and formats, as for
      :func:`jaxqat.core.mixed_precision` (default candidates: int8, int4).
    rules: base rules: each layer's input spec, and the rules for layers
      outside ``layers`` (``None``: :func:`jaxqat.core.default_rules`).
    calibration_data: batches for :func:`calibrate` (a list).
    calibration_steps: at most this many calibration batches.
    layers, higher_is_better, progress: as for :func:`sensitivity`.

  Returns:
    The :class:`jaxqat.core.MixedPrecision` (with its ``table``);
    ``quantize(model, mp.rules)`` applies it (in place).

  Raises:
    ValueError: as :func:`sensitivity`, and for a budget that no assignment
      meets (raised before any trial).

  Examples:
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> mixed_precision(model, lambda m, x: 0.0, None, budget_bytes=20, candidates=["int8", "int4"],
    ...                 progress=False)  # 48 weights: 24 bytes at 4 bits
    Traceback (most recent call last):
    ...
    ValueError: budget_bytes: no assignment fits 20 bytes; the smallest achievable size is 24 bytes (every layer in its smallest candidate format)
  """
  trials = _setup(model, metric, data, rules, calibration_data, calibration_steps, layers)
  return trials.mixed_precision(
      candidates=candidates, budget_bytes=budget_bytes, budget_ratio=budget_ratio,
      higher_is_better=higher_is_better, progress=progress)

