"""Tests for jaxqat.flax.linen convert / export (issue 10): the served integer model.

Parity of the integer path is checked against the bound the core proves for
one op (:func:`jaxqat.core.integer_error_bound`, module docstring of
``jaxqat.core._integer``): with exact integers ``a = q_x - z_x`` and
``b = q_w - z_w`` over ``K`` contracted elements,
``|y_int - y_fq| <= (gamma_{K+2} + gamma_3) (1 + u)^2 s_x s_w sum_k |a_k b_k|``
(``u = 2**-24``, ``gamma_n = n u / (1 - n u)``). For convolutions the same
bound is computed here with a convolution of ``|a|`` and ``|b|`` (zero padding
adds exact zeros to both paths).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxqat import core
from jaxqat.core import PerChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql
from jaxqat.flax.linen import _checkpoint as ckpt
from jaxqat.flax.linen import _serve as serve

KEY = jax.random.key(0, impl="rbg")
W_ONLY = [Rule(pattern=".*", weight=core.default_weight_spec())]
W4 = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1)))]
U = 2.0**-24


def _gamma(n):
  return n * U / (1 - n * U)


class _Branches(nn.Module):
  """One layer of each type, each on a model input (so each layer's input is known)."""

  @nn.compact
  def __call__(self, x, ids, img):
    emb = nn.Embed(12, 8, name="embed")
    return {
        "dense": nn.Dense(6, use_bias=False, name="dense")(x),
        "einsum": nn.Einsum((8, 2, 3), "bd,dhk->bhk", use_bias=False, name="einsum")(x),
        "conv": nn.Conv(4, (3, 3), use_bias=False, name="conv")(img),
        "depthwise": nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False,
                             name="depthwise")(img),
        "embed": emb(ids),
        "attend": emb.attend(x),  # jnp.dot(x, embedding.T): a transposed weight
    }


def _branch_inputs():
  k1, k2 = jax.random.split(jax.random.key(3))
  x = jax.random.normal(k1, (5, 8)) + 0.2
  img = jax.random.normal(k2, (2, 6, 6, 4))
  return x, jnp.array([0, 3, 11]), img


def _mlp(out=10):
  return nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(256), nn.relu, nn.Dense(out)])


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _ops(fn, *args):
  """(primitive, operand dtypes, output dtype) of every dot_general / conv in fn's jaxpr."""
  return sorted((e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars),
                 str(e.outvars[0].aval.dtype)) for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr)
                if e.primitive.name in ("dot_general", "conv_general_dilated"))


def _assert_same(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def _conv_bound(x, qt, act, groups):
  """The core's bound for a SAME, stride-1 NHWC/HWIO convolution (see the module docstring)."""
  xq = core.quantize(x, act.scale, act.zero_point, act.spec)
  zx = 0 if act.zero_point is None else act.zero_point
  a = jnp.abs(xq.codes.astype(jnp.int32) - zx).astype(jnp.float32)
  b = jnp.abs(qt.codes.astype(jnp.float32))
  s = lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               feature_group_count=groups, precision=lax.Precision.HIGHEST)
  k = int(np.prod(qt.shape[:3]))
  return (_gamma(k + 2) + _gamma(3)) * (1 + U)**2 * act.scale * qt.scale.reshape(-1) * s


def test_each_layer_type_w8a8_within_bound_integer_false_and_weight_only_exact():
  x, ids, img = _branch_inputs()
  qmodel = ql.quantize(_Branches())  # default W8A8
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, x, ids, img), [(x, ids, img)])
  fake = jax.jit(qmodel.apply)(v, x, ids, img)
  served, sv = ql_convert(qmodel, v)
  y = jax.jit(served.apply)(sv, x, ids, img)
  s = sv["served"]
  dot = (((1,), (0,)), ((), ()))
  bounds = {
      "dense": core.integer_error_bound(x, s["dense"]["kernel"], s["dense"]["input"], dot),
      "einsum": core.integer_error_bound(x, s["einsum"]["kernel"], s["einsum"]["input"], dot),
      "attend": core.integer_error_bound(x, s["embed"]["embedding"], s["embed"]["input"],
                                         (((1,), (1,)), ((), ()))),
      "conv": _conv_bound(img, s["conv"]["kernel"], s["conv"]["input"], 1),
      "depthwise": _conv_bound(img, s["depthwise"]["kernel"], s["depthwise"]["input"], 4),
  }
  for name, bound in bounds.items():
    diff = jnp.abs(y[name] - fake[name])
    assert diff.shape == bound.shape, name
    assert float(jnp.max(diff - bound)) <= 0.0, name
    assert float(jnp.max(jnp.abs(fake[name]))) > 0.1, name  # not a vacuous comparison
  # The embedding lookup has no input quantizer: bit for bit.
  np.testing.assert_array_equal(np.asarray(y["embed"]), np.asarray(fake["embed"]))
  # Every matmul / conv of the served model is int8 x int8 -> int32: dense, einsum, attend,
  # and per conv the conv itself and the batch-1 conv that removes the input zero point.
  ops = _ops(lambda a, b, c: served.apply(sv, a, b, c), x, ids, img)
  assert ops == sorted([("conv_general_dilated", ("int8", "int8"), "int32")] * 4
                       + [("dot_general", ("int8", "int8"), "int32")] * 3), ops
  # integer=False: the dequantize path, bit for bit the fake-quant model.
  served_f, sv_f = ql_convert(qmodel, v, integer=False)
  _assert_same(jax.jit(served_f.apply)(sv_f, x, ids, img), fake)
  # Weight-only quantization: bit for bit.
  qw = ql.quantize(_Branches(), W_ONLY)
  vw = jax.jit(qw.init)(KEY, x, ids, img)
  served_w, sv_w = ql_convert(qw, vw)
  _assert_same(jax.jit(served_w.apply)(sv_w, x, ids, img), jax.jit(qw.apply)(vw, x, ids, img))
  # No float copy of any quantized weight: every kernel left params.
  assert sv["params"] == {} and sv_w["params"] == {}
  assert sorted(s) == ["conv", "dense", "depthwise", "einsum", "embed"]


def ql_convert(qmodel, v, **kw):
  return serve.convert(qmodel, v, **kw)


@pytest.fixture(scope="module")
def mlp():
  """A calibrated W8A8 MLP of 256-wide layers, its input and its served model."""
  x = jax.random.normal(jax.random.key(5), (4, 256))
  qmodel = ql.quantize(_mlp())
  v0 = jax.jit(qmodel.init)(KEY, x)
  v = ql.calibrate(qmodel, v0, [x])
  served, sv = serve.convert(qmodel, v)
  return dict(x=x, qmodel=qmodel, v0=v0, v=v, served=served, sv=sv,
              fake=jax.jit(qmodel.apply)(v, x), y=jax.jit(served.apply)(sv, x))


def test_whole_model_integer_jaxpr_sizes_and_int4(mlp):
  x, served, sv = mlp["x"], mlp["served"], mlp["sv"]
  # Whole model, integer path: the three int8 matmuls agree with fake quant to a few
  # output steps of the layer inputs (the per-op bound plus code flips downstream).
  err = float(jnp.max(jnp.abs(mlp["y"] - mlp["fake"])))
  assert err <= 1e-2 * float(jnp.max(jnp.abs(mlp["fake"]))), err
  fn = lambda a: served.apply(sv, a)  # noqa: E731
  assert _ops(fn, x) == [("dot_general", ("int8", "int8"), "int32")] * 3
  # No float copy of a kernel: not in the served variables, not in the compiled program.
  leaves = jax.tree.leaves(sv)
  assert not [l for l in leaves if l.dtype == jnp.float32 and l.ndim == 2 and min(l.shape) > 1]
  hlo = jax.jit(fn).lower(x).as_text()
  assert "tensor<256x256xf32>" not in hlo and "tensor<256x10xf32>" not in hlo
  assert "tensor<256x256xi8>" in hlo
  r = serve.size_report(served, sv)
  assert [row.layer for row in r.rows] == [
      "layers_0/bias", "layers_0/kernel", "layers_2/bias", "layers_2/kernel", "layers_4/bias",
      "layers_4/kernel"]
  assert r.float_bytes == 4 * (2 * 256 * 256 + 256 * 10 + 2 * 256 + 10)
  assert r.ratio <= 0.27, r.ratio
  assert "compression" in str(r)
  # int4 packed, weight-only: <= 15% of float32, bit for bit with fake quant.
  q4 = ql.quantize(_mlp(), W4)
  v4 = jax.jit(q4.init)(KEY, x)
  served4, sv4 = serve.convert(q4, v4)
  assert sv4["served"]["layers_0"]["kernel"].values.shape == (256, 128)
  r4 = serve.size_report(served4, sv4)
  assert r4.ratio <= 0.15, r4.ratio
  _assert_same(jax.jit(served4.apply)(sv4, x), jax.jit(q4.apply)(v4, x))


def test_round_trips_encodings_orbax_and_jax_export(mlp, tmp_path):
  x, qmodel, v, served, sv = mlp["x"], mlp["qmodel"], mlp["v"], mlp["served"], mlp["sv"]
  # Encodings JSON: export, load into a fresh (uncalibrated) copy: same outputs exactly.
  f = tmp_path / "enc.json"
  serve.save_encodings(f, qmodel, v)
  data = json.loads(f.read_text())
  assert data["version"] == "1.0.0"
  assert [e["name"] for e in data["param_encodings"]] == [
      "layers_0/kernel", "layers_2/kernel", "layers_4/kernel"]
  assert [e["name"] for e in data["activation_encodings"]] == [
      "layers_0/input", "layers_2/input", "layers_4/input"]
  fresh = ql.quantize(_mlp())
  v_fresh = jax.jit(fresh.init)(KEY, x)
  loaded = serve.load_encodings(fresh, v_fresh, f)
  _assert_same(jax.jit(fresh.apply)(loaded, x), mlp["fake"])
  assert "frozen" in loaded["quant_stats"]["layers_0"]["kernel"]
  # orbax: the served model.
  d = os.fspath(tmp_path / "served")
  ckpt.save_served(d, served, sv)
  served2, sv2 = ckpt.restore_served(d, ql.quantize(_mlp()))
  assert sv2["served"]["layers_2"]["kernel"].values.dtype == jnp.int8
  _assert_same(jax.jit(served2.apply)(sv2, x), mlp["y"])
  with pytest.raises(ValueError, match="exists already"):
    ckpt.save_served(d, served, sv)
  # jax.export: reloads without the model's code; any batch size.
  blob = serve.export_serving(served, sv, x, batch_polymorphic=True)
  run = core.load_serving(blob)
  _assert_same(run(x), mlp["y"])
  assert run(x[:1]).shape == (1, 10)


def test_bad_input_names_the_layer_or_entry_and_changes_nothing(mlp, tmp_path):
  qmodel, v0, v = mlp["qmodel"], mlp["v0"], mlp["v"]
  before = jax.tree.map(np.asarray, v0)
  with pytest.raises(ValueError, match=r"layer 'layers_0' \(Dense\) input activation 'input'"
                     r".*never calibrated"):
    serve.convert(qmodel, v0)
  _assert_same(v0, before)
  with pytest.raises(ValueError, match="mode 'float'"):
    serve.convert(ql.set_mode(qmodel, "float"), v)
  with pytest.raises(TypeError, match="served_module"):
    serve.size_report(qmodel, v)
  good = serve.export_encodings(qmodel, v)
  text = json.dumps(good)
  trunc = tmp_path / "trunc.json"
  trunc.write_text(text[:len(text) // 2])
  bad_bw = json.loads(text)
  bad_bw["param_encodings"][1]["bw"] = 4
  unknown = json.loads(text)
  unknown["activation_encodings"][0]["name"] = "layers_9/input"
  short = json.loads(text)
  short["param_encodings"][2]["scale"] = short["param_encodings"][2]["scale"][:3]
  missing = json.loads(text)
  del missing["activation_encodings"][2]
  cases = [(trunc, "not valid JSON"),
           (bad_bw, r"entry 'layers_2/kernel': bw is 4"),
           (unknown, r"entry 'layers_9/input': the model has no activation quantizer"),
           (short, r"entry 'layers_4/kernel': 'scale' has 3 values"),
           (missing, r"no entry for the model's quantizer\(s\) \['layers_4/input'\]")]
  for data, msg in cases:
    with pytest.raises(ValueError, match=msg):
      serve.load_encodings(qmodel, v0, data)
  _assert_same(v0, before)  # nothing applied
