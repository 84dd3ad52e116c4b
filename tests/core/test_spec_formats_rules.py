"""Tests for formats, QuantSpec validation and rules."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxqat import core
from jaxqat.core import PerBlock, PerChannel, PerTensor, QuantSpec, Rule, RuleSet


@pytest.mark.parametrize("bits", range(2, 17))
def test_int_format_ranges(bits):
  f = core.IntFormat(bits=bits)
  assert (f.qmin, f.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  n = core.IntFormat(bits=bits, narrow=True)
  assert n.qmin == -n.qmax
  u = core.IntFormat(bits=bits, signed=False)
  assert (u.qmin, u.qmax) == (0, 2**bits - 1)
  assert core.get_format(f"int{bits}") == f


@pytest.mark.parametrize("name,dt,emax", [
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 8), ("fp8_e5m2", ml_dtypes.float8_e5m2, 15),
    ("fp6_e3m2", ml_dtypes.float6_e3m2fn, 4), ("fp6_e2m3", ml_dtypes.float6_e2m3fn, 2),
    ("fp4_e2m1", ml_dtypes.float4_e2m1fn, 2)])
def test_float_formats_match_ml_dtypes(name, dt, emax):
  f = core.get_format(name)
  info = ml_dtypes.finfo(dt)
  assert f.max == float(info.max) and f.emax == emax
  assert 2.0 ** f.emin == float(info.smallest_normal)
  assert f.bits == info.bits


def test_block_formats():
  assert core.get_format("nvfp4").block_size == 16 and core.get_format("nvfp4").scale_format == "e4m3"
  for name in ("mxfp4", "mxfp6", "mxfp8"):
    f = core.get_format(name)
    assert f.block_size == 32 and f.scale_format == "e8m0" and not f.tensor_scale


def test_spec_is_hashable_and_a_valid_static_argument():
  a = QuantSpec(format="int4", granularity=PerChannel((0, 2)))
  b = QuantSpec(format=core.IntFormat(bits=4), granularity=PerChannel((0, 2)))
  assert a == b and hash(a) == hash(b)
  assert len({a, b, QuantSpec()}) == 2
  f = jax.jit(lambda x, spec: core.fake_quant(x, 0.5, spec=spec), static_argnums=1)
  np.testing.assert_array_equal(np.asarray(f(jnp.array([0.7]), a.replace(granularity=PerTensor()))), [0.5])
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.symmetric = False  # type: ignore[misc]


def test_spec_fills_block_granularity_and_scale_shapes():
  assert QuantSpec(format="mxfp8").granularity == PerBlock(32, -1)
  assert QuantSpec(format="nvfp4", granularity=PerBlock(16, 0)).scale_shape((64, 3)) == (4, 3)
  assert QuantSpec(granularity=PerChannel((0, 2))).scale_shape((2, 3, 4)) == (2, 1, 4)
  assert QuantSpec().scale_shape((5, 5)) == ()


@pytest.mark.parametrize("kwargs,match", [
    (dict(format="int17"), "bits must be in"),
    (dict(format="uint8_narrow"), "narrow=True"),
    (dict(format="fp8", symmetric=False), "affine .* needs an integer format"),
    (dict(learning="lsq_plus"), "needs symmetric=False"),
    (dict(format="nvfp4", learning="lsq"), "derives its scales"),
    (dict(rounding="up"), "QuantSpec.rounding"),
    (dict(format="fp8", rounding="stochastic"), "only implemented for integer"),
    (dict(calibration="median"), "Calibration: method must be one of"),
    (dict(granularity="per_channel"), "QuantSpec.granularity"),
    (dict(format="mxfp4", granularity=PerBlock(16)), "mxfp4 needs PerBlock\\(32"),
    (dict(format=3), "QuantSpec.format"),
])
def test_spec_validation_names_the_field(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    QuantSpec(**kwargs)


def test_granularity_validation():
  with pytest.raises(ValueError, match="PerBlock: size must be a positive int"):
    PerBlock(0)
  with pytest.raises(TypeError, match="PerChannel: axis must be an int"):
    PerChannel(1.5)
  with pytest.raises(ValueError, match="repeated"):
    PerChannel((1, 1))
  with pytest.raises(ValueError, match="percentile must be in"):
    core.Calibration(method="percentile", percentile=0.0)


def test_rules_first_match_wins_and_unused_reported():
  w4 = QuantSpec(format="int4")
  rules = RuleSet([
      Rule(pattern=r"head/.*", skip=True),
      Rule(pattern=r".*conv.*", weight=w4, act=QuantSpec()),
      Rule(pattern=r".*", weight=QuantSpec()),
      Rule(pattern=r"never"),
  ])
  assert rules.match("head/dense").skip
  assert rules.match("block1/conv_2").weight == w4
  assert rules.match("block1/dense").weight == QuantSpec()
  assert rules.match("conv") is not None  # fullmatch of ".*conv.*"
  with pytest.warns(core.QuantizationWarning, match="'never' matched no layer"):
    unused = rules.warn_unused()
  assert [r.pattern for r in unused] == ["never"]


def test_rule_fullmatch_not_search():
  r = Rule(pattern="dense")
  assert r.matches("dense") and not r.matches("block/dense") and not r.matches("dense_1")


def test_rule_validation():
  with pytest.raises(ValueError, match="Rule.pattern: invalid regular expression"):
    Rule(pattern="[unclosed")
  with pytest.raises(TypeError, match="Rule.weight: must be a QuantSpec"):
    Rule(pattern=".*", weight="int8")
  with pytest.raises(ValueError, match="Rule.skip"):
    Rule(pattern=".*", weight=QuantSpec(), skip=True)
  with pytest.raises(TypeError, match=r"rules\[1\]: expected a jaxqat Rule"):
    RuleSet([Rule(pattern=".*"), "x"])
  with pytest.raises(ValueError, match="Rule.act: PerOutputChannel.. is a weight granularity"):
    Rule(pattern="dense", act=QuantSpec(granularity=core.PerOutputChannel()))


def test_per_output_channel_resolution():
  spec = QuantSpec(format="int4", granularity=core.PerOutputChannel(), learning="lsq")
  assert spec.is_output_channel and hash(spec) == hash(spec.replace())
  got = spec.resolve_output_channel((0, 2))
  assert got.granularity == PerChannel((0, 2)) and got.learning == "lsq" and got.format.bits == 4
  assert spec.resolve_output_channel([3]).granularity == PerChannel(3)
  assert spec.resolve_output_channel(()).granularity == core.PerTensor()
  plain = QuantSpec(granularity=PerChannel(1))
  assert plain.resolve_output_channel((0,)) is plain  # concrete specs are left alone
  msg = r"PerOutputChannel\(\) is resolved to axes by the layer"
  with pytest.raises(ValueError, match=msg):
    spec.scale_shape((4, 3))
  with pytest.raises(ValueError, match=msg):
    core.fake_quant(jnp.ones((4, 3)), 1.0, spec=spec.replace(learning="fixed"))
  with pytest.raises(ValueError, match=msg):
    core.lsq_fake_quant(jnp.ones((4, 3)), 1.0, spec=spec)
  with pytest.raises(ValueError, match=msg):
    core.observer(spec)
  with pytest.raises(ValueError, match="nvfp4 needs PerBlock"):
    QuantSpec(format="nvfp4", granularity=core.PerOutputChannel())


def test_import_jaxqat_does_not_import_keras_or_flax():
  import subprocess
  import sys
  code = ("import sys, jaxqat; bad = [m for m in sys.modules if m.split('.')[0] in ('keras', 'flax')];"
          "print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
