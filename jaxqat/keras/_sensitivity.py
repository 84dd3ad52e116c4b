"""Keras glue for :mod:`jaxqat.core._sensitivity`: sensitivity analysis and mixed precision.

The loop, the table and the knapsack live in the core; here a trial is
``quantize(model, rules)`` (a converted copy of a Sequential or Functional
model, the original untouched), :func:`calibrate` on the calibration data
(when given), then the user's metric.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from jaxqat.core import _sensitivity as sens
from jaxqat.keras import _calibrate
from jaxqat.keras import _convert
from jaxqat.keras import _graph
from jaxqat.keras import _report
from jaxqat.keras._backend import keras

__all__ = ["sensitivity", "mixed_precision"]

Metric = Callable[[Any, Any], float]


def _setup(model, metric, data, rules, calibration_data, calibration_steps, batch_size, layers):
  """The core's Trials: layers from the report of a copy quantized with the base rules."""
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
  plain = _convert._is_plain_graph  # pylint: disable=protected-access
  copied = plain(model) or _graph.is_functional(model)
  if not copied:
    raise ValueError(f"model: {type(model).__name__} is a subclassed model, which quantize "
                     "converts in place; every trial needs a fresh copy, so pass a Sequential "
                     "or Functional model")
  if not callable(metric):
    raise TypeError(f"metric: must be a callable metric(model, data) -> float, got "
                    f"{type(metric).__name__}")
  sens.check_reiterable(calibration_data, "calibration_data")
  base = sens.normalize_rules(rules)

  def build(trial_rules):
    q = _convert.quantize(model, trial_rules)
    if q is model:
      raise ValueError(f"model: {model.name!r} could not be copied, so quantize converted it in "
                       "place; sensitivity needs a model that quantize copies")
    return q

  rep = _report.report(build(base))

  def evaluate(trial_rules):
    if trial_rules is None:
      return metric(model, data)
    q = build(trial_rules)
    if calibration_data is not None:
      _calibrate.calibrate(q, calibration_data, steps=calibration_steps, batch_size=batch_size)
    return metric(q, data)

  return sens.trials(rep, evaluate, base, layers)


def sensitivity(
    model,
    metric: Metric,
    data: Any,
    *,
    rules=None,
    calibration_data: Any = None,
    calibration_steps: Optional[int] = None,
    batch_size: int = 32,
    layers: Optional[Sequence[str]] = None,
    mode: Optional[str] = "both",
    candidates=None,
    higher_is_better: bool = True,
    progress: bool = True,
):
  """Per-layer sensitivity of a Keras model to quantization.

  Each trial converts a copy of ``model`` with rules that quantize only one
  layer (or keep only one layer float), calibrates it on
  ``calibration_data`` and returns ``metric(quantized_model, data)``; the
  float model gives the baseline. See :func:`jaxqat.core.sensitivity`.

  Args:
    model: the float Sequential or Functional model (not modified).
    metric: ``metric(model, data) -> float`` (e.g. accuracy from
      ``model.predict``, or ``model.evaluate``'s loss).
    data: the evaluation data handed to ``metric``.
    rules: the scheme analysed (``None``: :func:`jaxqat.core.default_rules`).
    calibration_data: what :func:`calibrate` accepts (arrays or a list of
      batches; not a one-shot generator); ``None`` skips calibration.
    calibration_steps: at most this many calibration batches.
    batch_size: calibration batch size for array data.
    layers, mode, candidates, higher_is_better, progress: as for
      :func:`jaxqat.core.sensitivity`; ``layers`` defaults to every layer
      the rules quantize.

  Returns:
    A :class:`jaxqat.core.SensitivityTable`, most sensitive layer first.

  Raises:
    TypeError: if ``model`` is not a Keras model or ``metric`` not callable.
    ValueError: for a subclassed model (converted in place by quantize), a
      quantized model, a layer in ``layers`` that the rules do not quantize
      (the message lists those they do), or a bad ``mode``.

  Examples:
    >>> import numpy as np
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> x = np.linspace(-1, 1, 32, dtype="float32").reshape(8, 4)
    >>> out = lambda m, x: keras.ops.convert_to_numpy(m(x))
    >>> ref = out(model, x)
    >>> err = lambda m, x: -float(np.mean((out(m, x) - ref) ** 2))
    >>> rules = [Rule(pattern="head", weight=QuantSpec(format="int2")),
    ...          Rule(pattern=".*", weight=QuantSpec(format="int8"))]
    >>> sensitivity(model, err, x, rules=rules, mode="quantize_one", progress=False).layers
    ['head', 'body']
  """
  trials = _setup(model, metric, data, rules, calibration_data, calibration_steps, batch_size,
                  layers)
  return trials.sensitivity(
      mode=mode, candidates=candidates, higher_is_better=higher_is_better, progress=progress)


def mixed_precision(
    model,
    metric: Metric,
    data: Any,
    *,
    budget_bytes: Optional[int] = None,
    budget_ratio: Optional[float] = None,
    candidates=None,
    rules=None,
    calibration_data: Any = None,
    calibration_steps: Optional[int] = None,
    batch_size: int = 32,
    layers: Optional[Sequence[str]] = None,
    higher_is_better: bool = True,
    progress: bool = True,
):
  """Chooses a weight format per layer of a Keras model under a weight-size budget.

  Measures every layer in every candidate format (one trial each, as in
  :func:`sensitivity`), then solves the knapsack of
  :func:`jaxqat.core.mixed_precision`; ``quantize(model, mp.rules)`` applies
  the result.

  Args:
    model: the float Sequential or Functional model.
    metric: ``metric(model, data) -> float``.
    data: the evaluation data handed to ``metric``.
    budget_bytes, budget_ratio, candidates: the budget and formats, as for
      :func:`jaxqat.core.mixed_precision` (default candidates: int8, int4).
    rules: base rules (each layer's input spec; the other layers' rules).
    calibration_data: what :func:`calibrate` accepts (not a generator).
    calibration_steps: at most this many calibration batches.
    batch_size: calibration batch size for array data.
    layers, higher_is_better, progress: as for :func:`sensitivity`.

  Returns:
    The :class:`jaxqat.core.MixedPrecision` (with its ``table``);
    ``quantize(model, mp.rules)`` converts a copy with it.

  Raises:
    ValueError: as :func:`sensitivity`, and for a budget that no assignment
      meets (raised before any trial).

  Examples:
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body")])
    >>> mixed_precision(model, lambda m, x: 0.0, None, budget_ratio=0.1, progress=False)
    Traceback (most recent call last):
    ...
    ValueError: budget_ratio: no assignment fits budget_ratio=0.1 (12 bytes); the smallest achievable size is 16 bytes (every layer in its smallest candidate format)
  """
  trials = _setup(model, metric, data, rules, calibration_data, calibration_steps, batch_size,
                  layers)
  return trials.mixed_precision(
      candidates=candidates, budget_bytes=budget_bytes, budget_ratio=budget_ratio,
      higher_is_better=higher_is_better, progress=progress)
