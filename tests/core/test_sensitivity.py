"""Sensitivity analysis, selective rules, mixed precision and the range-learning switch.

The front ends are not involved: ``evaluate`` is a pure function of the rules
whose answer is known (each quantized layer costs a fixed amount, by format).
"""

import dataclasses
import itertools
import re
import sys

import pytest

from jaxqat.core import IntFormat
from jaxqat.core import PerOutputChannel
from jaxqat.core import PerTensor
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.core import RuleSet
from jaxqat.core import _defaults
from jaxqat.core import _sensitivity as sens

# "b.c" and "bxc" check that trial patterns are escaped: an unescaped "b.c" would match "bxc".
LAYERS = ["a", "b.c", "bxc", "head"]
# Metric cost of quantizing a layer, per weight bit width (absent: float).
COST = {"a": {8: 0.0, 4: 0.01, 2: 0.05}, "b.c": {8: 0.01, 4: 0.03, 2: 0.2},
        "bxc": {8: 0.0, 4: 0.02, 2: 0.1}, "head": {8: 0.02, 4: 0.3, 2: 0.6}}
FLOAT = 0.95


def _quantized(rules):
  """{layer: weight bits} that ``rules`` give, as a front end would apply them."""
  rs = RuleSet(rules)
  out = {}
  for layer in LAYERS:
    r = rs.match(layer)
    if r is not None and not r.skip and r.weight is not None:
      out[layer] = r.weight.format.bits
  return out


class Evaluate:
  """Accuracy = FLOAT - the cost of each quantized layer; counts its calls."""

  def __init__(self, higher_is_better=True):
    self.calls = []
    self.sign = 1.0 if higher_is_better else -1.0

  def __call__(self, rules):
    self.calls.append(rules)
    q = {} if rules is None else _quantized(rules)
    acc = FLOAT - sum(COST[l][b] for l, b in q.items())
    return acc if self.sign > 0 else 1.0 - acc  # a loss: lower is better


BASE = [Rule(pattern="head", weight=QuantSpec(format="int2")),
        Rule(pattern=".*", weight=QuantSpec(format="int4"))]


def test_sensitivity_ranks_known_costs_both_modes_and_directions(capsys):
  ev = Evaluate()
  table = sens.sensitivity(LAYERS, ev, BASE, mode="both", progress=False)
  assert capsys.readouterr().err == ""  # progress=False is silent
  # 2 baselines + 2 trials per layer, and nothing else.
  assert len(ev.calls) == 2 + 2 * len(LAYERS) and ev.calls[0] is None
  quant = FLOAT - (0.01 + 0.03 + 0.02 + 0.6)
  assert table.float_metric == FLOAT and table.quant_metric == pytest.approx(quant)
  # quantize_one damage = own cost; float_one recovery = own cost too (additive toy).
  for layer, bits in {"a": 4, "b.c": 4, "bxc": 4, "head": 2}.items():
    row = table[layer]
    assert row.quantize_one == pytest.approx(FLOAT - COST[layer][bits])
    assert row.damage == pytest.approx(COST[layer][bits])
    assert row.recovery == pytest.approx(COST[layer][bits])
    assert row.score == pytest.approx(2 * COST[layer][bits])
  assert table.layers == ["head", "b.c", "bxc", "a"]
  assert [r.rank for r in table.rows] == [1, 2, 3, 4]

  # A loss (lower is better) ranks the same; only quantize_one trials run.
  ev = Evaluate(higher_is_better=False)
  table_loss = sens.sensitivity(LAYERS, ev, BASE, mode="quantize_one", higher_is_better=False,
                                progress=False)
  assert len(ev.calls) == 1 + len(LAYERS)
  assert table_loss.layers == table.layers and table_loss.quant_metric is None
  assert table_loss["head"].damage == pytest.approx(0.6)
  assert table_loss["head"].float_one is None

  # float_one alone
  table_f = sens.sensitivity(LAYERS, Evaluate(), BASE, mode="float_one", progress=False)
  assert table_f.layers == table.layers and table_f["a"].quantize_one is None

  # Printing and data.
  text = str(table)
  lines = text.splitlines()
  assert lines[0] == "float metric 0.95, quantized metric 0.29 (higher is better)"
  assert lines[1].split() == ["rank", "layer", "quantize_one", "float_one", "damage", "recovery",
                              "score"]
  assert lines[2].split()[:5] == ["1", "head", "0.35", "0.89", "0.6"]
  assert [l.split()[1] for l in lines[2:]] == ["head", "b.c", "bxc", "a"]
  dicts = table.to_dicts()
  assert dicts[0]["layer"] == "head" and dicts[0]["rank"] == 1
  assert dicts[0]["damage"] == pytest.approx(0.6)
  # Columns not measured are not printed.
  assert str(table_loss).splitlines()[1].split() == ["rank", "layer", "quantize_one", "damage",
                                                     "score"]


def test_sensitivity_progress_and_plot_without_matplotlib(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain stderr line
  table = sens.sensitivity(["a", "head"], Evaluate(), BASE, mode="quantize_one", progress=True)
  err = capsys.readouterr().err
  assert "jaxqat sensitivity: 3/3 trials (only head quantized)" in err and err.endswith("\n")
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
  with pytest.raises(ImportError, match="needs matplotlib, which is not installed; pip install "
                     "matplotlib"):
    table.plot()


def test_sensitivity_bad_input():
  with pytest.raises(ValueError, match=re.escape("mode: must be one of ('quantize_one', "
                                                 "'float_one', 'both') or None")):
    sens.sensitivity(LAYERS, Evaluate(), mode="one")
  with pytest.raises(ValueError, match=re.escape("layers: duplicate layer paths ['a']")):
    sens.sensitivity(["a", "a"], Evaluate(), progress=False)
  with pytest.raises(TypeError, match="evaluate: must return a number, got str"):
    sens.sensitivity(["a"], lambda r: "x", progress=False)
  with pytest.raises(ValueError, match=re.escape("evaluate: returned NaN (only a quantized)")):
    sens.sensitivity(["a"], lambda r: 1.0 if r is None else float("nan"), mode="quantize_one",
                     progress=False)
  with pytest.raises(ValueError, match=re.escape(
      "layers: unknown layer 'nope'; the layers quantized by the rules are ['a', 'b.c']")):
    sens.check_layers(["a", "nope"], ["a", "b.c"])
  with pytest.raises(KeyError, match="no layer 'z' in the sensitivity table"):
    sens.sensitivity(["a"], Evaluate(), mode="quantize_one", progress=False)["z"]


def test_selective_rules_keep_float_and_8bit():
  table = sens.sensitivity(LAYERS, Evaluate(), BASE, mode="quantize_one", progress=False)
  ev = Evaluate()
  # Keeping the 2 most sensitive float removes exactly their cost.
  kept = sens.selective_rules(table, keep_float=2)
  assert _quantized(kept) == {"bxc": 4, "a": 4}
  assert ev(kept) == pytest.approx(FLOAT - 0.02 - 0.01)
  # At 8 bits instead: head and b.c at 8 bits, the rest of each spec unchanged.
  kept8 = sens.selective_rules(table, BASE, keep_8bit=2)
  assert _quantized(kept8) == {"head": 8, "b.c": 8, "bxc": 4, "a": 4}
  assert kept8[0].weight == BASE[0].weight.replace(format=IntFormat(bits=8))
  assert ev(kept8) == pytest.approx(FLOAT - 0.02 - 0.01 - 0.02 - 0.01)
  assert sens.selective_rules(table, keep_float=0) == BASE
  with pytest.raises(ValueError, match="keep_float: 5 is more than the 4 layers of the table"):
    sens.selective_rules(table, keep_float=5)
  with pytest.raises(ValueError, match="give exactly one of keep_float or keep_8bit"):
    sens.selective_rules(table, keep_float=1, keep_8bit=1)


def _brute_force(scores, sizes, cands, budget):
  best = None
  names = list(cands)
  for combo in itertools.product(names, repeat=len(sizes)):
    b = sum(sens.weight_bytes(cands[n], sizes[l]) for l, n in zip(sizes, combo))
    if b > budget:
      continue
    u = sum(scores[l][n] for l, n in zip(sizes, combo))
    if best is None or u > best[0] + 1e-12:
      best = (u, b, dict(zip(sizes, combo)))
  return best


def test_mixed_precision_is_optimal_vs_brute_force():
  import numpy as np  # pylint: disable=g-import-not-at-top
  cands = sens.normalize_candidates(["int8", "int4", "int2"])
  rng = np.random.RandomState(0)
  for trial in range(6):
    sizes = {f"l{i}": int(n) for i, n in enumerate(rng.randint(10, 400, size=5))}
    scores = {l: {"int8": 0.9 - rng.uniform(0, 0.01), "int4": 0.9 - rng.uniform(0, 0.1),
                  "int2": 0.9 - rng.uniform(0, 0.5)} for l in sizes}
    lo = sum(sens.weight_bytes(cands["int2"], n) for n in sizes.values())
    hi = sum(sens.weight_bytes(cands["int8"], n) for n in sizes.values())
    for budget in np.linspace(lo, hi, 7).astype(int):
      mp = sens.mixed_precision(scores, sizes, candidates=cands, budget_bytes=int(budget),
                                float_metric=0.9)
      u, b, _ = _brute_force(scores, sizes, cands, budget)
      got = sum(scores[l][n] for l, n in mp.assignment.items())
      assert got == pytest.approx(u, abs=1e-12), (trial, budget)
      assert mp.bytes <= budget and mp.exact
      assert mp.estimated_metric == pytest.approx(0.9 + sum(
          scores[l][n] - 0.9 for l, n in mp.assignment.items()))
  # A loss (lower is better) minimises.
  loss = {"x": {"int8": 0.1, "int4": 0.5}, "y": {"int8": 0.1, "int4": 0.2}}
  mp = sens.mixed_precision(loss, {"x": 100, "y": 100}, budget_bytes=150,
                            higher_is_better=False)
  assert dict(mp.assignment) == {"x": "int8", "y": "int4"}


def test_mixed_precision_end_to_end_rules_and_errors():
  ev = Evaluate()
  sizes = {"a": 1000, "b.c": 1000, "bxc": 1000, "head": 200}
  # int8 everywhere is 3200 bytes; at 2000 the cheap-to-quantize layers go low.
  mp = sens.search_mixed_precision(LAYERS, ev, sizes, BASE, candidates=["int8", "int4", "int2"],
                                   budget_bytes=2000, progress=False)
  assert len(ev.calls) == 1 + 3 * len(LAYERS)
  assert mp.bytes <= 2000 and mp.table is not None
  assert mp.table["head"].formats["int2"] == pytest.approx(FLOAT - 0.6)
  # The rules apply the assignment (escaped patterns, catch-all after).
  bits = {n: int(n[3:]) for n in ("int8", "int4", "int2")}
  assert _quantized(mp.rules) == {l: bits[n] for l, n in mp.assignment.items()}
  cands = sens.normalize_candidates(["int8", "int4", "int2"])
  u, b, best = _brute_force({l: {n: FLOAT - COST[l][bits[n]] for n in bits} for l in sizes},
                            sizes, cands, 2000)
  assert dict(mp.assignment) == best
  assert ev(mp.rules) == pytest.approx(mp.estimated_metric)  # additive toy: exact estimate
  # others=[] drops base rules that would match nothing; budget_ratio is of float32 bytes.
  mp2 = sens.mixed_precision(mp.table, sizes, budget_ratio=2000 / (4 * 3200), others=[])
  assert dict(mp2.assignment) == best and len(mp2.rules) == len(LAYERS)
  # Float as a candidate (needs no trial).
  mpf = sens.mixed_precision({"a": {"int4": 0.5}}, {"a": 10}, candidates={"int4": "int4",
                                                                         "f32": None},
                             budget_bytes=40, float_metric=0.9,
                             base_rules=[Rule(pattern=".*", weight=QuantSpec())])
  assert dict(mpf.assignment) == {"a": "f32"} and mpf.rules[0].skip

  # An impossible budget is refused before any trial, naming both sizes.
  ev = Evaluate()
  with pytest.raises(ValueError, match=re.escape(
      "budget_bytes: no assignment fits 500 bytes; the smallest achievable size is 800 bytes "
      "(every layer in its smallest candidate format)")):
    sens.search_mixed_precision(LAYERS, ev, sizes, BASE, candidates=["int8", "int2"],
                                budget_bytes=500, progress=False)
  assert ev.calls == []
  with pytest.raises(ValueError, match=re.escape(
      "budget_ratio: no assignment fits budget_ratio=0.01 (128 bytes)")):
    sens.mixed_precision(mp.table, sizes, budget_ratio=0.01)
  with pytest.raises(ValueError, match="give exactly one of budget_bytes or budget_ratio"):
    sens.mixed_precision(mp.table, sizes)
  with pytest.raises(ValueError, match=re.escape(
      "scores: no metric for layer 'a' in format 'int3'")):
    sens.mixed_precision(mp.table, sizes, candidates=["int3"], budget_bytes=10 ** 6)
  with pytest.raises(ValueError, match="has no per-format metrics"):
    sens.mixed_precision(sens.sensitivity(["a"], Evaluate(), progress=False), {"a": 1},
                         budget_bytes=10)
  with pytest.raises(ValueError, match="candidates: two candidates named 'int4'"):
    sens.normalize_candidates([QuantSpec(format="int4"), "int4"])


def test_mixed_precision_thinned_frontier_is_flagged():
  sizes = {f"l{i}": 100 + 7 * i for i in range(12)}
  scores = {l: {"int8": 1.0, "int4": 0.9 + 0.001 * i, "int2": 0.5 + 0.01 * i}
            for i, l in enumerate(sizes)}
  budget = sum(sizes.values())  # bytes of all-int8
  exact = sens.mixed_precision(scores, sizes, candidates=["int8", "int4", "int2"],
                               budget_bytes=budget // 2)
  thin = sens.mixed_precision(scores, sizes, candidates=["int8", "int4", "int2"],
                              budget_bytes=budget // 2, max_states=4)
  assert exact.exact and not thin.exact and thin.bytes <= budget // 2
  got = lambda mp: sum(scores[l][n] for l, n in mp.assignment.items())
  assert got(thin) <= got(exact) + 1e-12


def test_range_learning_switch_keeps_defaults():
  # The defaults are unchanged (W8A8, fixed ranges).
  assert _defaults.default_weight_spec() == QuantSpec(
      format=IntFormat(bits=8, signed=True, narrow=True), granularity=PerOutputChannel(),
      symmetric=True, calibration="absmax")
  assert _defaults.default_act_spec() == QuantSpec(format="int8", granularity=PerTensor(),
                                                   symmetric=False, calibration="minmax")
  assert _defaults.default_rules() == _defaults.default_rules(range_learning=False)
  # range_learning=True: LSQ weights, LSQ+ affine inputs, same formats and calibration.
  (fixed,) = _defaults.default_rules(weight_bits=4, act_bits=8)
  (learned,) = _defaults.default_rules(weight_bits=4, act_bits=8, range_learning=True)
  assert (fixed.weight.learning, fixed.act.learning) == ("fixed", "fixed")
  assert (learned.weight.learning, learned.act.learning) == ("lsq", "lsq_plus")
  assert learned.weight == dataclasses.replace(fixed.weight, learning="lsq")
  assert learned.act == dataclasses.replace(fixed.act, learning="lsq_plus")
  assert (learned.weight.qmin, learned.weight.qmax) == (-7, 7)
  assert _defaults.default_rules(weight_bits=2, act_bits=None)[0].act is None
  with pytest.raises(ValueError, match=re.escape("weight_bits: must be an int in [2, 16], got 1")):
    _defaults.default_rules(weight_bits=1)
  with pytest.raises(ValueError, match=re.escape("act_bits: must be an int in [2, 16], got 32")):
    _defaults.default_rules(act_bits=32)
  with pytest.raises(TypeError, match="range_learning: must be True"):
    _defaults.default_weight_spec(range_learning=1)
