"""Sensitivity analysis, selective quantization and mixed precision, once for every front end.

The core drives the loop; a front end supplies two things:

* ``layers``: the paths of the layers its ``quantize`` quantizes under the
  base rules (from its ``report``);
* ``evaluate(rules)``: builds a fresh quantized copy of the float model with
  ``rules`` (a list of :class:`~jaxqat.core.Rule`), calibrates it, and
  returns the user's metric on the user's data; ``evaluate(None)`` returns
  the metric of the float model.

A trial is expressed in rules only (first match wins, ``re.fullmatch`` on
the escaped layer path): "keep layer ``L`` float" prepends
``Rule(pattern=re.escape(L), skip=True)`` to the base rules; "quantize only
``L``" is ``L``'s base rule restricted to ``L`` followed by a catch-all skip
rule. So whatever a front end accepts as rules, it accepts as a trial.

* :func:`sensitivity` measures, per layer, the metric with only that layer
  quantized (``"quantize_one"``: the damage it does alone) and with only that
  layer float (``"float_one"``: what keeping it float recovers), and
  optionally with only that layer quantized at each candidate weight format
  (for :func:`mixed_precision`). It returns a :class:`SensitivityTable`.
* :func:`selective_rules` keeps the ``k`` most sensitive layers float (or
  8-bit).
* :func:`mixed_precision` picks one weight format per layer that maximises
  the estimated metric under a weight-size budget (a multiple-choice
  knapsack).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import sys
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from jaxqat.core import _defaults
from jaxqat.core import _formats as formats_lib
from jaxqat.core import _rules as rules_lib
from jaxqat.core import _spec as spec_lib
from jaxqat.core._report import QuantizationWarning

__all__ = ["MODES", "Trials", "trials", "SensitivityRow", "SensitivityTable", "MixedPrecision",
           "sensitivity",
           "selective_rules", "mixed_precision", "search_mixed_precision", "check_layers",
           "check_reiterable", "layer_sizes", "normalize_candidates", "normalize_rules",
           "weight_bits", "weight_bytes", "layer_rule", "only_rules", "float_rules"]

MODES = ("quantize_one", "float_one", "both")

RulesLike = Union[rules_lib.RuleSet, Sequence[rules_lib.Rule], rules_lib.Rule, None]
Evaluate = Callable[[Optional[list]], float]

# Trials quantize a subset of the layers on purpose: a base rule that matches
# nothing in a trial (its layer is kept float) is expected, not worth a warning.
_TRIAL_WARNINGS = (r".*rule pattern .* matched no", r".*no layer (of|at all)")


def _base(base_rules: RulesLike) -> tuple[rules_lib.Rule, ...]:
  return rules_lib.as_ruleset(base_rules, _defaults.default_rules()).rules


def normalize_rules(rules: RulesLike) -> list[rules_lib.Rule]:
  """The base rules as a list (``None``: :func:`jaxqat.core.default_rules`).

  Raises:
    TypeError: if an element is not a Rule.

  Examples:
    >>> [r.pattern for r in normalize_rules(None)]
    ['.*']
  """
  return list(_base(rules))


def layer_rule(base_rules: RulesLike, layer: str) -> Optional[rules_lib.Rule]:
  """The first base rule matching ``layer`` (``None`` if none does).

  Examples:
    >>> from jaxqat.core import Rule
    >>> layer_rule([Rule(pattern="head", skip=True), Rule(pattern=".*")], "body").pattern
    '.*'
  """
  for r in _base(base_rules):
    if r.matches(layer):
      return r
  return None


def only_rules(layer: str, weight: Optional[spec_lib.QuantSpec],
               act: Optional[spec_lib.QuantSpec]) -> list[rules_lib.Rule]:
  """Rules quantizing ``layer`` only (weight ``weight``, input ``act``), every other layer float.

  Examples:
    >>> from jaxqat.core import QuantSpec
    >>> [(r.pattern, r.skip) for r in only_rules("layers/0", QuantSpec(), None)]
    [('layers/0', False), ('.*', True)]
  """
  head = (rules_lib.Rule(pattern=re.escape(layer), skip=True) if weight is None and act is None
          else rules_lib.Rule(pattern=re.escape(layer), weight=weight, act=act))
  return [head, rules_lib.Rule(pattern=".*", skip=True)]


def float_rules(layers: Iterable[str], base_rules: RulesLike) -> list[rules_lib.Rule]:
  """The base rules with every layer of ``layers`` kept float.

  Examples:
    >>> [(r.pattern, r.skip) for r in float_rules(["a.b"], None)]
    [('a\\\\.b', True), ('.*', False)]
  """
  return ([rules_lib.Rule(pattern=re.escape(l), skip=True) for l in layers]
          + list(_base(base_rules)))


def check_layers(requested: Optional[Iterable[str]], available: Sequence[str]) -> list[str]:
  """Validates a user's layer selection against the quantizable layers.

  Args:
    requested: layer paths, or ``None`` for all of ``available``.
    available: the layers the base rules quantize (the front end's report).

  Returns:
    The selected layers, in ``available`` order.

  Raises:
    ValueError: naming an unknown layer and listing the known ones, or if no
      layer is left.

  Examples:
    >>> check_layers(None, ["a", "b"]), check_layers(["b"], ["a", "b"])
    (['a', 'b'], ['b'])
    >>> check_layers(["c"], ["a", "b"])
    Traceback (most recent call last):
    ...
    ValueError: layers: unknown layer 'c'; the layers quantized by the rules are ['a', 'b']
  """
  available = list(available)
  if requested is None:
    chosen = available
  else:
    if isinstance(requested, str):
      requested = [requested]
    requested = list(requested)
    for l in requested:
      if l not in available:
        raise ValueError(f"layers: unknown layer {l!r}; the layers quantized by the rules are "
                         f"{available}")
    chosen = [l for l in available if l in set(requested)]
  if not chosen:
    raise ValueError("layers: no layer to analyse (the rules quantize no layer of the model)")
  return chosen


# Sizes ------------------------------------------------------------------------

_BLOCK_SCALE_BITS = {"e8m0": 8, "e4m3": 8}


def weight_bits(spec: Optional[spec_lib.QuantSpec]) -> float:
  """Storage bits per weight element for ``spec`` (``None``: float32, 32 bits).

  Element bits, plus for block formats the block scale spread over its block
  (per-tensor/per-channel scales are neglected).

  Examples:
    >>> from jaxqat.core import QuantSpec
    >>> weight_bits(QuantSpec(format="int4")), weight_bits(None)
    (4, 32)
    >>> weight_bits(QuantSpec(format="mxfp4"))  # 4-bit elements, an 8-bit scale per 32
    4.25
  """
  if spec is None:
    return 32
  fmt = spec.format
  if isinstance(fmt, formats_lib.BlockFormat):
    return fmt.bits + _BLOCK_SCALE_BITS.get(fmt.scale_format, 8) / fmt.block_size
  return fmt.bits


def weight_bytes(spec: Optional[spec_lib.QuantSpec], n: int) -> int:
  """Bytes of ``n`` weight elements stored in ``spec`` (rounded up).

  Examples:
    >>> from jaxqat.core import QuantSpec
    >>> weight_bytes(QuantSpec(format="int4"), 1001), weight_bytes(None, 10)
    (501, 40)
  """
  return int(math.ceil(n * weight_bits(spec) / 8))


def normalize_candidates(candidates) -> dict[str, Optional[spec_lib.QuantSpec]]:
  """``{name: weight spec or None (float)}`` from a dict, a list of specs or format names.

  ``None`` gives int8 and int4 (:func:`jaxqat.core.default_weight_spec`); a
  format name ``"intN"`` gives the default weight spec at ``N`` bits, other
  names the default weight spec with that format.

  Raises:
    ValueError: if empty, or two candidates share a name.
    TypeError: if an entry is not a QuantSpec, a format name or ``None``.

  Examples:
    >>> sorted(normalize_candidates(["int8", "int2"]))
    ['int2', 'int8']
    >>> normalize_candidates({"w4": "int4", "float": None})["w4"].qmax
    7
  """
  if candidates is None:
    candidates = ["int8", "int4"]
  if isinstance(candidates, Mapping):
    items = list(candidates.items())
  elif isinstance(candidates, (str, spec_lib.QuantSpec)):
    raise TypeError("candidates: expected a dict {name: spec} or a list of specs, got one "
                    f"{type(candidates).__name__}")
  else:
    items = [(None, c) for c in candidates]
  out: dict[str, Optional[spec_lib.QuantSpec]] = {}
  for name, c in items:
    if isinstance(c, str):
      m = re.fullmatch(r"int(\d+)", c)
      c = (_defaults.default_weight_spec(bits=int(m.group(1))) if m
           else _defaults.default_weight_spec().replace(format=c))
    elif c is not None and not isinstance(c, spec_lib.QuantSpec):
      raise TypeError(f"candidates: each candidate must be a QuantSpec, a format name or None "
                      f"(float), got {type(c).__name__}")
    if name is None:
      name = "float" if c is None else c.format.name.replace("_narrow", "")
    if not isinstance(name, str):
      raise TypeError(f"candidates: names must be strings, got {name!r}")
    if name in out:
      raise ValueError(f"candidates: two candidates named {name!r}; pass a dict with distinct "
                       "names")
    out[name] = c
  if not out:
    raise ValueError("candidates: at least one candidate format is needed")
  return out


# Progress ---------------------------------------------------------------------


class _Progress:
  """tqdm when installed, else one self-overwriting stderr line; silent when off."""

  def __init__(self, total: int, enabled: bool, desc: str):
    self.total, self.enabled, self.desc, self.n = total, enabled, desc, 0
    self.bar = None
    if enabled:
      try:
        import tqdm  # pylint: disable=import-outside-toplevel
        self.bar = tqdm.tqdm(total=total, desc=desc, file=sys.stderr)
      except ImportError:
        self.bar = None

  def step(self, what: str) -> None:
    self.n += 1
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.set_postfix_str(what)
      self.bar.update(1)
    else:
      sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} trials ({what})")
      sys.stderr.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.close()
    else:
      sys.stderr.write("\n")
      sys.stderr.flush()


# The table --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SensitivityRow:
  """One layer of a :class:`SensitivityTable`.

  Attributes:
    layer: the layer path.
    quantize_one: the metric with only this layer quantized (``None`` if not
      measured).
    float_one: the metric with only this layer float, every other layer
      quantized (``None`` if not measured).
    damage: how much worse than the float model quantizing only this layer
      is (``float_metric - quantize_one`` when higher is better, the reverse
      otherwise; positive = worse).
    recovery: how much better than the fully quantized model keeping only
      this layer float is (positive = better).
    score: the ranking key: ``damage``, ``recovery``, or their sum (mode
      ``"both"``).
    rank: 1 for the most sensitive layer.
    formats: ``{candidate name: metric with only this layer quantized in
      that weight format}`` (empty unless candidates were given).
  """

  layer: str
  quantize_one: Optional[float]
  float_one: Optional[float]
  damage: Optional[float]
  recovery: Optional[float]
  score: float
  rank: int
  formats: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
  """Per-layer sensitivity to quantization (see :func:`sensitivity`).

  Attributes:
    rows: one :class:`SensitivityRow` per layer, most sensitive first.
    float_metric: the metric of the float model.
    quant_metric: the metric of the model quantized with the base rules
      (``None`` if not measured).
    higher_is_better: the metric's direction.
    mode: ``"quantize_one"``, ``"float_one"``, ``"both"`` or ``None``
      (candidate formats only).
    base_rules: the base rules the analysis started from.
    candidates: ``{name: weight spec or None}`` measured per layer (may be
      empty).
  """

  rows: tuple
  float_metric: float
  quant_metric: Optional[float]
  higher_is_better: bool
  mode: Optional[str]
  base_rules: tuple = ()
  candidates: Mapping[str, Optional[spec_lib.QuantSpec]] = dataclasses.field(default_factory=dict)

  @property
  def layers(self) -> list[str]:
    """Layer paths, most sensitive first."""
    return [r.layer for r in self.rows]

  def most_sensitive(self, k: int) -> list[str]:
    """The ``k`` most sensitive layers."""
    return self.layers[:k]

  def __getitem__(self, layer: str) -> SensitivityRow:
    for r in self.rows:
      if r.layer == layer:
        return r
    raise KeyError(f"no layer {layer!r} in the sensitivity table; layers: {self.layers}")

  def to_dicts(self) -> list[dict]:
    """One dict per row (for pandas or JSON); per-format metrics as ``metric[name]``."""
    out = []
    for r in self.rows:
      d = {"rank": r.rank, "layer": r.layer, "quantize_one": r.quantize_one,
           "float_one": r.float_one, "damage": r.damage, "recovery": r.recovery,
           "score": r.score}
      d.update({f"metric[{k}]": v for k, v in r.formats.items()})
      out.append(d)
    return out

  def __str__(self) -> str:
    fmt = lambda v: "-" if v is None else (f"{v + 0.0:.4g}" if isinstance(v, float) else str(v))
    dicts = self.to_dicts()
    heads = [h for h in (list(dicts[0]) if dicts else ["rank", "layer"])  # measured columns
             if any(d[h] is not None for d in dicts)]
    rows = [[fmt(d[h]) for h in heads] for d in dicts]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    direction = "higher is better" if self.higher_is_better else "lower is better"
    title = f"float metric {fmt(self.float_metric)}"
    if self.quant_metric is not None:
      title += f", quantized metric {fmt(self.quant_metric)}"
    return "\n".join([f"{title} ({direction})", line(heads)] + [line(r) for r in rows])

  def plot(self, ax=None):
    """Bar chart of the per-layer metrics (matplotlib, imported here).

    Args:
      ax: a matplotlib ``Axes`` to draw into (``None``: a new figure).

    Returns:
      The ``Axes``.

    Raises:
      ImportError: if matplotlib is not installed (``pip install matplotlib``).
    """
    try:
      import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError("SensitivityTable.plot needs matplotlib, which is not installed; "
                        "pip install matplotlib (or use str(table) / table.to_dicts())") from None
    if ax is None:
      _, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(self.rows)), 3.5))
    series = []
    if any(r.quantize_one is not None for r in self.rows):
      series.append(("only this layer quantized", [r.quantize_one for r in self.rows]))
    if any(r.float_one is not None for r in self.rows):
      series.append(("only this layer float", [r.float_one for r in self.rows]))
    for name in self.candidates:
      series.append((f"only this layer {name}", [r.formats.get(name) for r in self.rows]))
    width = 0.8 / max(1, len(series))
    xs = list(range(len(self.rows)))
    for i, (label, vals) in enumerate(series):
      ax.bar([x + i * width for x in xs], [math.nan if v is None else v for v in vals],
             width=width, label=label)
    ax.axhline(self.float_metric, color="k", linestyle="--", linewidth=1, label="float")
    if self.quant_metric is not None:
      ax.axhline(self.quant_metric, color="r", linestyle=":", linewidth=1, label="quantized")
    ax.set_xticks([x + 0.4 - width / 2 for x in xs])
    ax.set_xticklabels(self.layers, rotation=45, ha="right")
    ax.set_ylabel("metric")
    ax.legend(fontsize="small")
    return ax


def _check_metric(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    try:
      value = float(value)  # a 0-d array
    except (TypeError, ValueError):
      raise TypeError(f"evaluate: must return a number, got {type(value).__name__} "
                      f"({what})") from None
  value = float(value)
  if math.isnan(value):
    raise ValueError(f"evaluate: returned NaN ({what})")
  return value


def _check_bool(value, name: str) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{name}: must be True or False, got {value!r}")
  return value


def sensitivity(
    layers: Sequence[str],
    evaluate: Evaluate,
    base_rules: RulesLike = None,
    *,
    mode: Optional[str] = "both",
    higher_is_better: bool = True,
    candidates=None,
    progress: bool = True,
) -> SensitivityTable:
  """Measures how much each layer's quantization costs.

  Trials (each one ``evaluate(rules)`` call, i.e. one fresh quantized model):
  the float model and the fully quantized model (the baselines), then per
  layer: only that layer quantized (``"quantize_one"``), only that layer
  float (``"float_one"``), and, for each entry of ``candidates``, only that
  layer quantized with that weight format (its input as in the base rules).

  Args:
    layers: the layer paths to analyse (the front end's quantized layers).
    evaluate: ``evaluate(rules) -> float``: the metric of a fresh copy of the
      model quantized with ``rules`` (a list of Rules) and calibrated;
      ``evaluate(None)``: the metric of the float model.
    base_rules: the scheme analysed (``None``: :func:`default_rules`).
    mode: ``"quantize_one"``, ``"float_one"``, ``"both"`` (rank by the sum
      of damage and recovery), or ``None`` to measure ``candidates`` only.
    higher_is_better: ``True`` for an accuracy, ``False`` for a loss.
    candidates: weight formats to measure per layer (for
      :func:`mixed_precision`): see :func:`normalize_candidates`.
      ``None``: none (unless ``mode`` is ``None``: int8 and int4).
    progress: a progress bar (tqdm if installed, else a stderr line).

  Returns:
    A :class:`SensitivityTable`, most sensitive layer first (with
    ``mode=None``: ranked by the damage of the smallest candidate).

  Raises:
    ValueError: for an unknown ``mode``, no layers, a duplicate layer, or an
      ``evaluate`` returning NaN.
    TypeError: if ``evaluate`` is not callable or returns no number.

  Examples:
    >>> def evaluate(rules):  # accuracy drops by 0.3 when "head" is quantized
    ...   if rules is None:
    ...     return 0.9
    ...   quantized = {l for l in ("body", "head") if not rules_lib.RuleSet(rules).match(l).skip}
    ...   return 0.9 - 0.3 * ("head" in quantized) - 0.01 * ("body" in quantized)
    >>> table = sensitivity(["body", "head"], evaluate, progress=False)
    >>> table.layers, round(table["head"].damage, 3), round(table.quant_metric, 3)
    (['head', 'body'], 0.3, 0.59)
  """
  if mode is not None and mode not in MODES:
    raise ValueError(f"mode: must be one of {MODES} or None (candidates only), got {mode!r}")
  if not callable(evaluate):
    raise TypeError(f"evaluate: must be a callable evaluate(rules) -> float, got "
                    f"{type(evaluate).__name__}")
  _check_bool(higher_is_better, "higher_is_better")
  _check_bool(progress, "progress")
  if isinstance(layers, str):
    layers = [layers]
  layers = list(layers)
  if not layers:
    raise ValueError("layers: no layer to analyse")
  dup = sorted({l for l in layers if layers.count(l) > 1})
  if dup:
    raise ValueError(f"layers: duplicate layer paths {dup}")
  base = _base(base_rules)
  cands = (normalize_candidates(candidates) if candidates is not None or mode is None else {})
  sign = 1.0 if higher_is_better else -1.0
  want_q1 = mode in ("quantize_one", "both")
  want_f1 = mode in ("float_one", "both")
  measured_cands = [n for n, s in cands.items() if s is not None]
  total = 1 + int(want_f1) + len(layers) * (int(want_q1) + int(want_f1) + len(measured_cands))
  bar = _Progress(total, progress, "jaxqat sensitivity")

  def run(rules, what):
    with warnings.catch_warnings():
      for msg in _TRIAL_WARNINGS:
        warnings.filterwarnings("ignore", message=msg, category=QuantizationWarning)
      value = _check_metric(evaluate(rules), what)
    bar.step(what)
    return value

  try:
    float_metric = run(None, "float model")
    quant_metric = run(list(base), "quantized model") if want_f1 else None
    rows = []
    for layer in layers:
      rule = layer_rule(base, layer)
      w = None if rule is None or rule.skip else rule.weight
      a = None if rule is None or rule.skip else rule.act
      q1 = run(only_rules(layer, w, a), f"only {layer} quantized") if want_q1 else None
      f1 = run(float_rules([layer], base), f"only {layer} float") if want_f1 else None
      formats = {}
      for name, spec in cands.items():
        formats[name] = (float_metric if spec is None
                         else run(only_rules(layer, spec, a), f"only {layer} {name}"))
      damage = None if q1 is None else sign * (float_metric - q1)
      recovery = None if f1 is None else sign * (f1 - quant_metric)
      if mode is None:
        worst = min(cands, key=lambda n: weight_bits(cands[n]))
        score = sign * (float_metric - formats[worst])
      else:
        score = (damage or 0.0) + (recovery or 0.0)
      rows.append([layer, q1, f1, damage, recovery, score, formats])
  finally:
    bar.close()
  order = sorted(range(len(rows)), key=lambda i: (-rows[i][5], i))
  table_rows = tuple(SensitivityRow(*rows[i][:6], rank=k + 1, formats=rows[i][6])
                     for k, i in enumerate(order))
  return SensitivityTable(rows=table_rows, float_metric=float_metric, quant_metric=quant_metric,
                          higher_is_better=higher_is_better, mode=mode, base_rules=tuple(base),
                          candidates=cands)


# Selective quantization --------------------------------------------------------


def _at_8bit(spec: Optional[spec_lib.QuantSpec], default: spec_lib.QuantSpec):
  if spec is None:
    return None
  fmt = spec.format
  if isinstance(fmt, formats_lib.IntFormat):
    if fmt.bits >= 8:
      return spec
    return spec.replace(format=formats_lib.IntFormat(bits=8, signed=fmt.signed, narrow=fmt.narrow))
  return default


def _check_k(k, name: str, n: int) -> int:
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
    raise ValueError(f"{name}: must be an int >= 0, got {k!r}")
  if k > n:
    raise ValueError(f"{name}: {k} is more than the {n} layers of the table")
  return int(k)


def selective_rules(table: SensitivityTable, base_rules: RulesLike = None, *,
                    keep_float: Optional[int] = None,
                    keep_8bit: Optional[int] = None) -> list[rules_lib.Rule]:
  """Rules keeping the most sensitive layers float (or at 8 bits).

  Args:
    table: a :class:`SensitivityTable`.
    base_rules: the rules for every other layer (``None``: the table's base
      rules).
    keep_float: keep the ``keep_float`` most sensitive layers in float.
    keep_8bit: quantize the ``keep_8bit`` most sensitive layers at 8 bits
      (integer weights and inputs of fewer bits are raised to 8 bits with
      the rest of their spec; other formats become the default int8 specs).

  Returns:
    A list of Rules: one per kept layer (its escaped path), then the base
    rules.

  Raises:
    ValueError: unless exactly one of ``keep_float`` / ``keep_8bit`` is
      given, as an int in ``[0, len(table.rows)]``.
    TypeError: if ``table`` is not a :class:`SensitivityTable`.

  Examples:
    >>> from jaxqat.core import QuantSpec, Rule
    >>> row = lambda l, s, k: SensitivityRow(l, None, None, None, None, s, k)
    >>> t = SensitivityTable(rows=(row("head", 0.3, 1), row("body", 0.0, 2)), float_metric=0.9,
    ...                      quant_metric=None, higher_is_better=True, mode="quantize_one")
    >>> [(r.pattern, r.skip) for r in selective_rules(t, keep_float=1)]
    [('head', True), ('.*', False)]
    >>> r = selective_rules(t, [Rule(pattern=".*", weight=QuantSpec(format="int4"))], keep_8bit=1)
    >>> r[0].pattern, r[0].weight.format.bits, r[1].weight.format.bits
    ('head', 8, 4)
    >>> selective_rules(t)
    Traceback (most recent call last):
    ...
    ValueError: selective_rules: give exactly one of keep_float or keep_8bit
  """
  if not isinstance(table, SensitivityTable):
    raise TypeError(f"table: expected a SensitivityTable, got {type(table).__name__}")
  if (keep_float is None) == (keep_8bit is None):
    raise ValueError("selective_rules: give exactly one of keep_float or keep_8bit")
  base = _base(base_rules if base_rules is not None else (table.base_rules or None))
  if keep_float is not None:
    k = _check_k(keep_float, "keep_float", len(table.rows))
    return float_rules(table.most_sensitive(k), base)
  k = _check_k(keep_8bit, "keep_8bit", len(table.rows))
  head = []
  for layer in table.most_sensitive(k):
    rule = layer_rule(base, layer)
    if rule is None or rule.skip or (rule.weight is None and rule.act is None):
      continue  # float under the base rules already
    head.append(rules_lib.Rule(pattern=re.escape(layer),
                               weight=_at_8bit(rule.weight, _defaults.default_weight_spec()),
                               act=_at_8bit(rule.act, _defaults.default_act_spec())))
  return head + list(base)


# Mixed precision --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
  """A per-layer weight-format assignment (see :func:`mixed_precision`).

  Attributes:
    assignment: ``{layer: candidate name}``.
    bytes: the weight bytes of the assigned layers.
    rules: the Rules implementing it (for the front ends' ``quantize``).
    estimated_metric: the metric predicted by the additive model (``None``
      without a float metric).
    budget_bytes: the budget it was chosen under.
    exact: whether the knapsack was solved exactly (``False`` when the
      frontier was thinned, see :func:`mixed_precision`).
    table: the :class:`SensitivityTable` the scores came from (front ends),
      or ``None``.
  """

  assignment: Mapping[str, str]
  bytes: int
  rules: list
  estimated_metric: Optional[float]
  budget_bytes: int
  exact: bool = True
  table: Optional[SensitivityTable] = None


def _solve(layers, options, budget, max_states):
  """Multiple-choice knapsack by a Pareto-frontier DP; returns (choice per layer, exact)."""
  suffix_min = [0] * (len(layers) + 1)
  for i in range(len(layers) - 1, -1, -1):
    suffix_min[i] = suffix_min[i + 1] + min(b for b, _ in options[i])
  states = [(0, 0.0, None)]  # (bytes, utility, (choice, parent))
  exact = True
  for i in range(len(layers)):
    new = []
    for b, u, link in states:
      for j, (bj, uj) in enumerate(options[i]):
        nb = b + bj
        if nb + suffix_min[i + 1] <= budget:
          new.append((nb, u + uj, (j, link)))
    new.sort(key=lambda s: (s[0], -s[1]))
    frontier, best = [], -math.inf
    for s in new:  # keep the states no smaller state beats
      if s[1] > best:
        frontier.append(s)
        best = s[1]
    if len(frontier) > max_states:  # thin: best utility per size bucket
      exact = False
      width = budget / max_states
      kept = {}
      for s in frontier:
        key = int(s[0] // width)
        if key not in kept or s[1] > kept[key][1]:
          kept[key] = s
      frontier = sorted(kept.values(), key=lambda s: s[0])
    states = frontier
  bbest = max(states, key=lambda s: (s[1], -s[0]))
  choice, link = [], bbest[2]
  while link is not None:
    choice.append(link[0])
    link = link[1]
  return choice[::-1], exact


def mixed_precision(
    scores,
    layer_sizes: Mapping[str, int],
    *,
    candidates=None,
    budget_bytes: Optional[int] = None,
    budget_ratio: Optional[float] = None,
    base_rules: RulesLike = None,
    higher_is_better: Optional[bool] = None,
    float_metric: Optional[float] = None,
    others: Optional[Sequence[str]] = None,
    max_states: int = 20000,
) -> MixedPrecision:
  """Chooses a weight format per layer maximising the metric under a size budget.

  Model: the metric of an assignment is estimated as the float metric plus
  the sum over layers of the change measured with only that layer quantized
  in its assigned format (additive, as in HAWQ-style mixed-precision
  search; interactions between layers are neglected). Maximising it under
  ``sum(bytes) <= budget`` is a multiple-choice knapsack, solved here
  exactly by dynamic programming over the Pareto frontier of (bytes,
  estimated metric) partial assignments, layer by layer: dominated partial
  assignments (larger and no better) are dropped, and so are those that
  cannot fit the budget even with the smallest formats for the remaining
  layers. Unlike a DP over a discretised size, no size is rounded; unlike a
  greedy by marginal utility per byte, it is optimal (greedy can miss the
  optimum when formats are not concave in size). Should the frontier grow
  past ``max_states`` (hundreds of layers with many distinct sizes), it is
  thinned to the best state per size bucket of ``budget / max_states``
  bytes, and the result says ``exact=False``.

  Args:
    scores: a :class:`SensitivityTable` measured with ``candidates`` (see
      :func:`sensitivity`), or ``{layer: {candidate name: metric with only
      that layer in that format}}``.
    layer_sizes: ``{layer: number of weight elements quantized}``.
    candidates: the formats to choose from, as for
      :func:`normalize_candidates` (``None``: the table's candidates, or
      int8/int4). A candidate ``None`` (float) needs no score.
    budget_bytes: the largest total weight size in bytes, or
    budget_ratio: the budget as a fraction of the float32 size
      (``0.25``: on average 8 bits per weight).
    base_rules: the rules for the inputs (each layer keeps its base rule's
      ``act``) and for the layers not in ``layer_sizes`` (``None``: the
      table's base rules, else :func:`default_rules`).
    higher_is_better: the metric's direction (default: the table's, else
      ``True``).
    float_metric: the float model's metric, for ``estimated_metric``
      (default: the table's).
    others: the other layers the base rules apply to, when known (the front
      ends know them): only the base rules matching one of them follow the
      per-layer rules (``None``: every base rule follows).
    max_states: frontier size above which it is thinned.

  Returns:
    A :class:`MixedPrecision`: ``assignment``, ``bytes``, ``rules``.

  Raises:
    ValueError: if no assignment fits the budget (naming the budget and the
      smallest achievable size), for both or neither budget given, a layer
      without a size or a score, a candidate missing from the scores.
    TypeError: for scores of the wrong type.

  Examples:
    >>> scores = {"a": {"int8": 0.90, "int4": 0.89}, "b": {"int8": 0.90, "int4": 0.70}}
    >>> mp = mixed_precision(scores, {"a": 1000, "b": 1000}, budget_bytes=1500,
    ...                      float_metric=0.9)
    >>> dict(mp.assignment), mp.bytes, round(mp.estimated_metric, 3)
    ({'a': 'int4', 'b': 'int8'}, 1500, 0.89)
    >>> mixed_precision(scores, {"a": 1000, "b": 1000}, budget_bytes=999)
    Traceback (most recent call last):
    ...
    ValueError: budget_bytes: no assignment fits 999 bytes; the smallest achievable size is 1000 bytes (every layer in its smallest candidate format)
  """
  if isinstance(scores, SensitivityTable):
    table = scores
    if not table.candidates:
      raise ValueError("scores: this SensitivityTable has no per-format metrics; measure it with "
                       "sensitivity(..., candidates=...)")
    per_layer = {r.layer: dict(r.formats) for r in table.rows}
    candidates = table.candidates if candidates is None else candidates
    base_rules = base_rules if base_rules is not None else (table.base_rules or None)
    higher_is_better = table.higher_is_better if higher_is_better is None else higher_is_better
    float_metric = table.float_metric if float_metric is None else float_metric
  elif isinstance(scores, Mapping):
    per_layer = {l: dict(v) for l, v in scores.items()}
    if higher_is_better is None:
      higher_is_better = True
  else:
    raise TypeError(f"scores: expected a SensitivityTable or {{layer: {{format: metric}}}}, got "
                    f"{type(scores).__name__}")
  _check_bool(higher_is_better, "higher_is_better")
  cands = normalize_candidates(candidates)
  if not isinstance(layer_sizes, Mapping) or not layer_sizes:
    raise ValueError("layer_sizes: expected a non-empty {layer: number of weight elements}")
  layers = list(layer_sizes)
  for l in layers:
    n = layer_sizes[l]
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
      raise ValueError(f"layer_sizes[{l!r}]: must be an int >= 0, got {n!r}")
    for name, spec in cands.items():
      if spec is not None and name not in per_layer.get(l, {}):
        raise ValueError(f"scores: no metric for layer {l!r} in format {name!r}; scores hold "
                         f"{sorted(per_layer.get(l, {}))} for it")
  if (budget_bytes is None) == (budget_ratio is None):
    raise ValueError("mixed_precision: give exactly one of budget_bytes or budget_ratio")
  if budget_ratio is not None:
    if isinstance(budget_ratio, bool) or not isinstance(budget_ratio, numbers.Real) or not (
        budget_ratio > 0):
      raise ValueError(f"budget_ratio: must be a number > 0, got {budget_ratio!r}")
    budget = int(math.floor(budget_ratio * sum(weight_bytes(None, layer_sizes[l]) for l in layers)))
    budget_name = f"budget_ratio={budget_ratio} ({budget} bytes)"
  else:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral) or (
        budget_bytes < 0):
      raise ValueError(f"budget_bytes: must be an int >= 0, got {budget_bytes!r}")
    budget = int(budget_bytes)
    budget_name = f"{budget} bytes"
  names = list(cands)
  sign = 1.0 if higher_is_better else -1.0
  ref = float_metric
  options = []
  for l in layers:
    row = []
    for name in names:
      spec = cands[name]
      if spec is None:
        metric = ref if ref is not None else per_layer.get(l, {}).get(name)
        if metric is None:
          raise ValueError(f"scores: a float candidate {name!r} needs float_metric (or a score)")
      else:
        metric = _check_metric(per_layer[l][name], f"layer {l!r}, format {name!r}")
      row.append((weight_bytes(spec, layer_sizes[l]), sign * metric))
    options.append(row)
  smallest = sum(min(b for b, _ in row) for row in options)
  if smallest > budget:
    raise ValueError(f"{'budget_ratio' if budget_ratio is not None else 'budget_bytes'}: no "
                     f"assignment fits {budget_name}; the smallest achievable size is "
                     f"{smallest} bytes (every layer in its smallest candidate format)")
  if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
    raise ValueError(f"max_states: must be a positive int, got {max_states!r}")
  choice, exact = _solve(layers, options, budget, max_states)
  assignment = {l: names[j] for l, j in zip(layers, choice)}
  total = sum(options[i][j][0] for i, j in enumerate(choice))
  est = None
  if ref is not None:
    est = ref + sum(sign * options[i][j][1] - ref for i, j in enumerate(choice))
  base = _base(base_rules)
  head = []
  for l in layers:
    rule = layer_rule(base, l)
    act = None if rule is None or rule.skip else rule.act
    spec = cands[assignment[l]]
    head.append(rules_lib.Rule(pattern=re.escape(l), skip=True) if spec is None and act is None
                else rules_lib.Rule(pattern=re.escape(l), weight=spec, act=act))
  tail = list(base) if others is None else [r for r in base if any(r.matches(o) for o in others)]
  return MixedPrecision(assignment=assignment, bytes=total, rules=head + tail,
                        estimated_metric=est, budget_bytes=budget, exact=exact)


# Front-end glue, written once ---------------------------------------------------


def layer_sizes(report, layers: Optional[Sequence[str]] = None) -> dict[str, int]:
  """``{layer: number of quantized weight elements}`` from a front end's report.

  Args:
    report: a :class:`~jaxqat.core.QuantizationReport` of the model
      quantized with the base rules.
    layers: restrict to these layers (default: every quantized layer).

  Returns:
    The element counts of each layer's quantized weights.

  Examples:
    >>> from jaxqat.core import LayerReport, QuantizationReport, QuantSpec, WeightReport
    >>> r = QuantizationReport(layers=[LayerReport("d", "Dense", "quantized",
    ...     [WeightReport("kernel", (4, 2), QuantSpec()), WeightReport("bias", (2,))])])
    >>> layer_sizes(r)
    {'d': 8}
  """
  chosen = report.quantized_paths() if layers is None else list(layers)
  return {l: sum(math.prod(w.shape) for w in report[l].weights if w.quantized) for l in chosen}


def check_reiterable(data, name: str):
  """Refuses a one-shot iterator: every trial iterates ``data`` again.

  Examples:
    >>> check_reiterable([1, 2], "data")
    [1, 2]
    >>> check_reiterable(iter([1, 2]), "calibration_data")
    Traceback (most recent call last):
    ...
    TypeError: calibration_data: must be iterable again for every trial (e.g. a list of batches), got a one-shot list_iterator
  """
  if data is not None and hasattr(data, "__next__") and iter(data) is data:
    raise TypeError(f"{name}: must be iterable again for every trial (e.g. a list of batches), "
                    f"got a one-shot {type(data).__name__}")
  return data


def search_mixed_precision(
    layers: Sequence[str],
    evaluate: Evaluate,
    sizes: Mapping[str, int],
    base_rules: RulesLike = None,
    *,
    candidates=None,
    budget_bytes: Optional[int] = None,
    budget_ratio: Optional[float] = None,
    higher_is_better: bool = True,
    progress: bool = True,
    others: Optional[Sequence[str]] = None,
) -> MixedPrecision:
  """:func:`sensitivity` per candidate format, then :func:`mixed_precision`.

  What the front ends' ``mixed_precision`` run: one trial for the float
  model, then one per (layer, quantized candidate).

  Args:
    layers: the layers to assign a format to.
    evaluate: as for :func:`sensitivity`.
    sizes: ``{layer: number of weight elements}`` (see :func:`layer_sizes`).
    base_rules: as for :func:`mixed_precision`.
    candidates, budget_bytes, budget_ratio, higher_is_better, progress,
      others: as for :func:`sensitivity` and :func:`mixed_precision`.

  Returns:
    A :class:`MixedPrecision` whose ``table`` holds the measurements.

  Raises:
    ValueError: as :func:`sensitivity` and :func:`mixed_precision`; an
      impossible budget is refused before any trial runs.

  Examples:
    >>> def evaluate(rules):  # int4 costs "b" 0.2, "a" 0.01
    ...   if rules is None:
    ...     return 0.9
    ...   r = rules[0]
    ...   return 0.9 - (r.weight.format.bits == 4) * {"a": 0.01, "b": 0.2}[r.pattern]
    >>> mp = search_mixed_precision(["a", "b"], evaluate, {"a": 100, "b": 100},
    ...                             budget_bytes=150, progress=False)
    >>> dict(mp.assignment), mp.bytes
    ({'a': 'int4', 'b': 'int8'}, 150)
  """
  sizes = {l: sizes[l] for l in layers}
  cands = normalize_candidates(candidates)
  # Refuse an impossible budget before spending any trial (same check, no scores).
  dummy = {l: {n: 0.0 for n in cands} for l in layers}
  mixed_precision(dummy, sizes, candidates=cands, budget_bytes=budget_bytes,
                  budget_ratio=budget_ratio, float_metric=0.0)
  table = sensitivity(layers, evaluate, base_rules, mode=None, candidates=cands,
                      higher_is_better=higher_is_better, progress=progress)
  mp = mixed_precision(table, sizes, budget_bytes=budget_bytes, budget_ratio=budget_ratio,
                       others=others)
  return dataclasses.replace(mp, table=table)


@dataclasses.dataclass(frozen=True)
class Trials:
  """What a front end hands the core: the layers, their sizes and one trial's runner.

  Built by :func:`trials`; its two methods are the front ends'
  ``sensitivity`` and ``mixed_precision``.

  Attributes:
    evaluate: ``evaluate(rules) -> float`` (``None``: the float model).
    base_rules: the base rules (a list).
    layers: the layers analysed.
    others: the other layers the base rules quantize.
    sizes: ``{layer: number of quantized weight elements}``.
  """

  evaluate: Evaluate
  base_rules: list
  layers: list
  others: list
  sizes: Mapping[str, int]

  def sensitivity(self, **kwargs) -> SensitivityTable:
    """:func:`sensitivity` over these layers (keyword arguments as there)."""
    return sensitivity(self.layers, self.evaluate, self.base_rules, **kwargs)

  def mixed_precision(self, **kwargs) -> MixedPrecision:
    """:func:`search_mixed_precision` over these layers (keyword arguments as there)."""
    return search_mixed_precision(self.layers, self.evaluate, self.sizes, self.base_rules,
                                  others=self.others, **kwargs)


def trials(report, evaluate: Evaluate, base_rules: RulesLike,
           layers: Optional[Sequence[str]] = None) -> Trials:
  """A front end's :class:`Trials` from the report of its model quantized with ``base_rules``.

  Args:
    report: the :class:`~jaxqat.core.QuantizationReport` of a copy of the
      model quantized with ``base_rules``.
    evaluate: ``evaluate(rules) -> float`` (``None``: the float model).
    base_rules: the base rules.
    layers: the user's selection (``None``: every quantized layer).

  Returns:
    The :class:`Trials`.

  Raises:
    ValueError: for a layer the base rules do not quantize (see
      :func:`check_layers`).

  Examples:
    >>> from jaxqat.core import LayerReport, QuantizationReport, QuantSpec, WeightReport
    >>> r = QuantizationReport(layers=[LayerReport(p, "Dense", "quantized",
    ...     [WeightReport("kernel", (4, 2), QuantSpec())]) for p in ("a", "b")])
    >>> t = trials(r, lambda rules: 1.0, None, ["b"])
    >>> t.layers, t.others, dict(t.sizes)
    (['b'], ['a'], {'b': 8})
  """
  quantized = report.quantized_paths()
  chosen = check_layers(layers, quantized)
  return Trials(evaluate=evaluate, base_rules=normalize_rules(base_rules), layers=chosen,
                others=[l for l in quantized if l not in chosen],
                sizes=layer_sizes(report, chosen))
