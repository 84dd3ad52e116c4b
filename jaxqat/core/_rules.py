"""Rules: which layers to quantize, and how.

A :class:`Rule` pairs a regular expression over a layer's path with the
:class:`~jaxqat.core.QuantSpec` for its weight and for its input activation.
Paths are strings of names joined by ``/`` (``"encoder/layers/0/attn/query"``);
each front end documents how it builds them. The first rule whose pattern
``re.fullmatch``-es the path wins. A :class:`RuleSet` remembers which rules
matched, so a converter can report the ones that matched nothing.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Iterable, Optional, Sequence

from jaxqat.core import _spec as spec_lib

__all__ = ["Rule", "RuleSet", "COMPUTE_MODES"]

COMPUTE_MODES = ("fake", "integer")  # Rule.compute, jaxqat.core.qat_op(compute=...)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Selects layers by path and says how to quantize them.

  Attributes:
    pattern: a regular expression matched with ``re.fullmatch`` against the
      layer path (``".*"`` matches every layer).
    weight: the spec for the layer's weight (kernel/embedding), or ``None``
      to leave the weight in float.
    act: the spec for the layer's input activation, or ``None``.
    skip: leave matching layers entirely float (``weight`` and ``act`` must
      then be ``None``); useful to exempt layers before a catch-all rule.
    compute: how the layer's matmul/einsum/conv runs in QAT
      (:func:`~jaxqat.core.qat_op`): ``"fake"`` (the default: fake-quantized
      float operands, lean backward) or ``"integer"`` (int8 x int8 -> int32
      forward, same STE backward; the layer's input and weight must be
      integer formats of <= 8 bits, the input per tensor, the weight per
      tensor or per output channel; otherwise the front end raises a
      ValueError naming the layer and the reason).

  Examples:
    >>> from jaxqat.core import QuantSpec, Rule
    >>> r = Rule(pattern=r".*dense.*", weight=QuantSpec(format="int4"))
    >>> r.matches("block/dense_1"), r.matches("block/conv")
    (True, False)
    >>> Rule(pattern="(", weight=None)
    Traceback (most recent call last):
    ...
    ValueError: Rule.pattern: invalid regular expression '(': missing ), unterminated subpattern at position 0
    >>> Rule(pattern=".*", compute="int8")
    Traceback (most recent call last):
    ...
    ValueError: Rule.compute: must be one of ('fake', 'integer'), got 'int8'
  """

  pattern: str
  weight: Optional[spec_lib.QuantSpec] = None
  act: Optional[spec_lib.QuantSpec] = None
  skip: bool = False
  compute: str = "fake"

  def __post_init__(self):
    if self.compute not in COMPUTE_MODES:
      raise ValueError(f"Rule.compute: must be one of {COMPUTE_MODES}, got {self.compute!r}")
    if not isinstance(self.pattern, str):
      raise TypeError(f"Rule.pattern: must be a string, got {type(self.pattern).__name__}")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern: invalid regular expression {self.pattern!r}: {e}") from None
    for name in ("weight", "act"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, spec_lib.QuantSpec):
        raise TypeError(f"Rule.{name}: must be a QuantSpec or None, got {type(value).__name__}")
    if self.act is not None and self.act.is_output_channel:
      raise ValueError(f"Rule.act: PerOutputChannel() is a weight granularity (rule "
                       f"{self.pattern!r}); quantize activations per tensor or PerChannel(-1)")
    if self.skip and (self.weight is not None or self.act is not None):
      raise ValueError(f"Rule.skip: a skip rule ({self.pattern!r}) takes no weight or act spec")

  def matches(self, path: str) -> bool:
    """Whether ``pattern`` fully matches ``path``."""
    return re.fullmatch(self.pattern, path) is not None


class RuleSet:
  """An ordered list of rules that records which ones matched.

  Args:
    rules: the rules, in priority order (first match wins).

  Raises:
    TypeError: if an element is not a :class:`Rule`.

  Examples:
    >>> from jaxqat.core import QuantSpec, Rule, RuleSet
    >>> rules = RuleSet([Rule(pattern="head", skip=True),
    ...                  Rule(pattern=".*", weight=QuantSpec()),
    ...                  Rule(pattern="nothing")])
    >>> rules.match("head").skip, rules.match("body/dense").weight.format.name
    (True, 'int8')
    >>> [r.pattern for r in rules.unused()]
    ['nothing']
  """

  def __init__(self, rules: Iterable[Rule]):
    rules = list(rules) if not isinstance(rules, Rule) else [rules]
    for i, r in enumerate(rules):
      if not isinstance(r, Rule):
        raise TypeError(f"rules[{i}]: expected a jaxqat Rule, got {type(r).__name__}")
    self.rules: tuple[Rule, ...] = tuple(rules)
    self._hits = [0] * len(self.rules)

  def match(self, path: str) -> Optional[Rule]:
    """Returns the first rule matching ``path`` (or ``None``) and records it.

    Args:
      path: the layer path.

    Returns:
      The first matching rule, or ``None``.
    """
    for i, r in enumerate(self.rules):
      if r.matches(path):
        self._hits[i] += 1
        return r
    return None

  def unused(self) -> list[Rule]:
    """The rules that matched no path so far."""
    return [r for r, n in zip(self.rules, self._hits) if n == 0]

  def warn_unused(self, where: str = "model") -> list[Rule]:
    """Emits a :class:`~jaxqat.core.QuantizationWarning` per unused rule; returns them."""
    from jaxqat.core._report import QuantizationWarning  # pylint: disable=import-outside-toplevel
    unused = self.unused()
    for r in unused:
      warnings.warn(f"jaxqat: rule pattern {r.pattern!r} matched no layer of the {where}",
                    QuantizationWarning, stacklevel=3)
    return unused

  def __len__(self) -> int:
    return len(self.rules)

  def __repr__(self) -> str:
    return f"RuleSet({list(self.rules)!r})"


def as_ruleset(rules: "RuleSet | Sequence[Rule] | Rule | None", default: Sequence[Rule]) -> RuleSet:
  """Builds a fresh RuleSet from user input (``None`` takes ``default``).

  Examples:
    >>> len(as_ruleset(None, [Rule(pattern=".*")]))
    1
  """
  if rules is None:
    return RuleSet(default)
  if isinstance(rules, RuleSet):
    return RuleSet(rules.rules)
  if isinstance(rules, (str, bytes)):
    raise TypeError("rules: expected a Rule or a sequence of Rules, got a string")
  return RuleSet(rules)
