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
import re

import flax
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
W4 = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1)))]
U = 2.0**-24


def _gamma(n):
  return n * U / (1 - n * U)


Z = nn.initializers.zeros_init()  # init compiles no RNG; _load puts the float weights in


class _Conv1D(nn.Module):
  """GPT-2's Conv1D as Flax ports write it: kernel (features, in), transposed into dot_general."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", Z, (4, x.shape[-1]))
    return jax.lax.dot_general(x, kernel.transpose(), (((1,), (0,)), ((), ())))


class _Net(nn.Module):
  """One layer of each type, each on a model input (so each layer's input is known), and a
  chain of two 256-wide Dense layers (a whole model whose weights dominate the bytes)."""

  @nn.compact
  def __call__(self, x, ids, img, h):
    emb = nn.Embed(12, 8, embedding_init=Z, name="embed")
    h = nn.relu(nn.Dense(256, kernel_init=Z, name="mlp_0")(h))
    e = emb(ids)
    return {
        # A head tied to the embedding through a nested Module.apply (state under "Dense_0").
        "tied": nn.Dense(12, use_bias=False).apply({"params": {"kernel": emb.embedding.T}}, x),
        "conv1d": _Conv1D(name="conv1d")(x),
        "dense": nn.Dense(6, use_bias=False, kernel_init=Z, name="dense")(x),
        "einsum": nn.Einsum((8, 2, 3), "bd,dhk->bhk", use_bias=False, kernel_init=Z,
                            name="einsum")(x),
        "conv": nn.Conv(4, (3, 3), use_bias=False, kernel_init=Z, name="conv")(img),
        "depthwise": nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False, kernel_init=Z,
                             name="depthwise")(img),
        "embed": e,
        "attend": emb.attend(x),  # jnp.dot(x, embedding.T): a transposed weight
        "mlp": nn.Dense(10, kernel_init=Z, name="mlp_1")(h),
    }


def _load(variables):
  """``variables`` with float weights loaded: normal, scaled by 1/sqrt(fan in)."""
  rng = np.random.default_rng(0)

  def one(p):
    fan_in = int(np.prod(p.shape[:-1])) if p.ndim >= 2 else 100
    return jnp.asarray(rng.normal(size=p.shape) / np.sqrt(fan_in), jnp.float32)

  return dict(variables, params=jax.tree.map(one, variables["params"]))


def _inputs():
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k1, (5, 8)) + 0.2
  img = jax.random.normal(k2, (2, 6, 6, 4))
  return x, jnp.array([0, 3, 11]), img, jax.random.normal(k3, (4, 256))


_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b.* : \((tensor<[^>]*>), (tensor<[^>]*>)\)"
                 r" -> (tensor<[^>]*>)")


def _ops(hlo: str) -> list:
  """(op, lhs, rhs, result element types) of every dot_general / convolution of a program."""
  elem = lambda t: re.search(r"([a-z]+[0-9]+)>$", t.split("x")[-1]).group(1)  # noqa: E731
  return sorted((m[1], elem(m[2]), elem(m[3]), elem(m[4])) for m in _OP.finditer(hlo))


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


@pytest.fixture(scope="module")
def net():
  """The calibrated W8A8 (default rules) model, its served model and both outputs."""
  inputs = _inputs()
  qmodel = ql.quantize(_Net())
  v0 = _load(jax.jit(qmodel.init)(KEY, *inputs))
  v = ql.calibrate(qmodel, v0, [inputs])
  served, sv = serve.convert(qmodel, v)
  apply_served = jax.jit(served.apply)
  return dict(inputs=inputs, qmodel=qmodel, v0=v0, v=v, served=served, sv=sv,
              apply_served=apply_served, fake=jax.jit(qmodel.apply)(v, *inputs),
              y=apply_served(sv, *inputs))


def test_each_layer_type_and_whole_model_parity_and_integer_jaxpr(net, monkeypatch):
  inputs, served, sv, fake, y = net["inputs"], net["served"], net["sv"], net["fake"], net["y"]
  x, _, img, _ = inputs
  s = sv["served"]
  dot = (((1,), (0,)), ((), ()))
  bounds = {
      "dense": core.integer_error_bound(x, s["dense"]["kernel"], s["dense"]["input"], dot),
      "einsum": core.integer_error_bound(x, s["einsum"]["kernel"], s["einsum"]["input"], dot),
      "attend": core.integer_error_bound(x, s["embed"]["embedding"], s["embed"]["input"],
                                         (((1,), (1,)), ((), ()))),
      "conv1d": core.integer_error_bound(x, s["conv1d"]["kernel"], s["conv1d"]["input"],
                                         (((1,), (1,)), ((), ()))),
      "tied": core.integer_error_bound(x, s["Dense_0"]["kernel"], s["Dense_0"]["input"], dot),
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
  # The two-layer chain: the per-op bound plus the code flips it can cause in the second
  # layer's input quantizer; within 1% of the output's range.
  err = float(jnp.max(jnp.abs(y["mlp"] - fake["mlp"])))
  assert err <= 1e-2 * float(jnp.max(jnp.abs(fake["mlp"]))), err
  # The served forward's program (its jaxpr lowered, dead code removed): every matmul / conv
  # is int8 x int8 -> int32: dense, einsum, attend, conv1d, tied, the chain's two, and per
  # conv the conv and the batch-1 conv that removes the input zero point. On CPU each
  # convolution is an int8 dot over the input's windows (`_integer._int8_conv`), or, for
  # the depthwise one, a sum of int32 products of the codes: both give the same output.
  monkeypatch.setattr(core._integer, "_SUM_MAX_GROUP", 0)  # pylint: disable=protected-access
  hlo = jax.jit(lambda *a: served.apply(sv, *a)).lower(*inputs).as_text()
  y_dot = jax.jit(served.apply)(sv, *inputs)
  for name in ("conv", "depthwise", "mlp"):
    np.testing.assert_array_equal(np.asarray(y_dot[name]), np.asarray(y[name]), err_msg=name)
  conv = "dot_general" if jax.default_backend() == "cpu" else "convolution"
  assert _ops(hlo) == sorted([(conv, "i8", "i8", "i32")] * 4
                             + [("dot_general", "i8", "i8", "i32")] * 7), _ops(hlo)
  # No float copy of any quantized weight: not in the served variables (only the chain's
  # biases stay in params), not in the program.
  assert jax.tree.map(jnp.shape, sv["params"]) == {"mlp_0": {"bias": (256,)},
                                                   "mlp_1": {"bias": (10,)}}
  assert sorted(s) == ["Dense_0", "conv", "conv1d", "dense", "depthwise", "einsum", "embed",
                       "mlp_0", "mlp_1"]
  kernels = [l.shape for l in jax.tree.leaves(net["v"]["params"]) if l.ndim >= 2] + [(8, 12)]
  assert len(kernels) == 9
  for shape in kernels:
    assert f"tensor<{'x'.join(map(str, shape))}xf32>" not in hlo, shape
  assert "tensor<256x256xi8>" in hlo
  # integer=False: the dequantize path, bit for bit the fake-quant model.
  served_f, sv_f = serve.convert(net["qmodel"], net["v"], integer=False)
  assert not served_f.integer
  _assert_same(sv_f, sv)  # the flag is the module's; the variables are the same
  _assert_same(jax.jit(served_f.apply)(sv, *inputs), fake)


def test_int4_weight_only_bit_exact_and_sizes(net):
  inputs, served, sv = net["inputs"], net["served"], net["sv"]
  r = serve.size_report(served, sv)
  assert r.rows[0].layer == "Dense_0/kernel" and r.rows[0].format == "int8_narrow"
  # Every float parameter, and the tied head's own quantized copy of the embedding.
  assert r.float_bytes == 4 * (sum(l.size for l in jax.tree.leaves(net["v"]["params"])) + 96)
  assert r.ratio <= 0.27, r.ratio
  assert "compression" in str(r)
  # int4, packed, weight only: bit for bit with fake quant, every layer type; <= 15% of f32.
  q4 = ql.quantize(_Net(), W4)
  v4 = _load(jax.jit(q4.init)(KEY, *inputs))
  served4, sv4 = serve.convert(q4, v4)
  assert sv4["served"]["mlp_0"]["kernel"].values.shape == (256, 128)
  assert sv4["served"]["conv"]["kernel"].packed == 4
  assert not [n for n in jax.tree.leaves(sv4["served"]) if isinstance(n, core.Encoding)]
  r4 = serve.size_report(served4, sv4)
  assert r4.ratio <= 0.15, r4.ratio
  _assert_same(jax.jit(served4.apply)(sv4, *inputs), jax.jit(q4.apply)(v4, *inputs))


def test_round_trips_encodings_orbax_and_jax_export(net, tmp_path):
  inputs, qmodel, v, served, sv = net["inputs"], net["qmodel"], net["v"], net["served"], net["sv"]
  # Encodings JSON: export, load into a fresh (uncalibrated) copy: same outputs exactly.
  f = tmp_path / "enc.json"
  serve.save_encodings(f, qmodel, v)
  data = json.loads(f.read_text())
  assert data["version"] == "1.0.0"
  assert sorted(e["name"] for e in data["param_encodings"]) == [
      "Dense_0/kernel", "conv/kernel", "conv1d/kernel", "dense/kernel", "depthwise/kernel",
      "einsum/kernel", "embed/embedding", "mlp_0/kernel", "mlp_1/kernel"]
  assert sorted(e["name"] for e in data["activation_encodings"]) == [
      "Dense_0/input", "conv/input", "conv1d/input", "dense/input", "depthwise/input",
      "einsum/input", "embed/input", "mlp_0/input", "mlp_1/input"]
  fresh = ql.quantize(_Net())
  jax.eval_shape(fresh.init, KEY, *inputs)  # example inputs; the variables: an uncalibrated init
  loaded = serve.load_encodings(fresh, net["v0"], f)
  assert "frozen" in loaded["quant_stats"]["dense"]["kernel"]
  _assert_same(jax.jit(fresh.apply)(loaded, *inputs), net["fake"])
  # orbax: the served model.
  d = os.fspath(tmp_path / "served")
  ckpt.save_served(d, served, sv)
  served2, sv2 = ckpt.restore_served(d, ql.quantize(_Net()))
  assert served2 == served
  assert sv2["served"]["mlp_0"]["kernel"].values.dtype == jnp.int8
  _assert_same(net["apply_served"](sv2, *inputs), net["y"])
  with pytest.raises(ValueError, match="exists already"):
    ckpt.save_served(d, served, sv)
  # jax.export: reloads without the model's code.
  blob = serve.export_serving(served, sv, *inputs)
  _assert_same(core.load_serving(blob)(*inputs), net["y"])


def test_bad_input_names_the_layer_or_entry_and_changes_nothing(net, tmp_path):
  qmodel, v0, v = net["qmodel"], net["v0"], net["v"]
  before = jax.tree.map(np.asarray, v0)
  with pytest.raises(ValueError, match=r"layer '\w+' \(\w+\) input activation 'input'"
                     r".*never calibrated"):
    serve.convert(qmodel, v0)
  _assert_same(v0, before)
  with pytest.raises(ValueError, match="mode 'float'"):
    serve.convert(ql.set_mode(qmodel, "float"), v)
  with pytest.raises(TypeError, match="served_module"):
    serve.size_report(qmodel, v)
  with pytest.raises(ValueError, match="variables returned by jaxqat.flax.linen.convert"):
    net["served"].apply(v, *net["inputs"])
  good = serve.export_encodings(qmodel, v)
  text = json.dumps(good)
  trunc = tmp_path / "trunc.json"
  trunc.write_text(text[:len(text) // 2])
  names = [e["name"] for e in good["param_encodings"]]
  bad_bw = json.loads(text)
  bad_bw["param_encodings"][1]["bw"] = 4
  unknown = json.loads(text)
  unknown["activation_encodings"][0]["name"] = "layers_9/input"
  short = json.loads(text)
  short["param_encodings"][2]["scale"] = short["param_encodings"][2]["scale"][:1]
  missing = json.loads(text)
  gone = missing["activation_encodings"].pop()["name"]
  cases = [(trunc, "not valid JSON"),
           (bad_bw, rf"entry '{names[1]}': bw is 4"),
           (unknown, r"entry 'layers_9/input': the model has no activation quantizer"),
           (short, rf"entry '{names[2]}': 'scale' has 1 values"),
           (missing, rf"no entry for the model's quantizer\(s\) \['{gone}'\]")]
  for data, msg in cases:
    with pytest.raises(ValueError, match=msg):
      serve.load_encodings(qmodel, v0, data)
  _assert_same(v0, before)  # nothing applied


# ---------------------------------------------------------------------------
# Flags among the inputs (train=False), keyword inputs and dataclass outputs.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class _Output:
  logits: jax.Array
  hidden: jax.Array
  attentions: object = None


class _FlagNet(nn.Module):
  """The Flax examples' pattern: ``__call__(x, train)`` with BatchNorm and Dropout."""

  @nn.compact
  def __call__(self, x, train: bool = True, mask=None):
    h = nn.Dense(8, name="hidden")(x)
    h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
    h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
    if mask is not None:
      h = h * mask
    return _Output(nn.Dense(3, name="head")(h), h)


@pytest.mark.parametrize("batch", ["tuple", "dict"])
def test_calibrate_keeps_python_flags_static(batch):
  x = jax.random.normal(jax.random.key(1), (16, 4))
  qmodel = ql.quantize(_FlagNet())
  v = qmodel.init(KEY, x, False)
  data = [(x, False)] if batch == "tuple" else [{"x": x, "train": False}]
  v = ql.calibrate(qmodel, v, data)  # a traced flag failed here (bool of a tracer)
  # The head's input range is that of its eval-mode input (running averages, no dropout).
  h = _FlagNet().apply({k: v[k] for k in ("params", "batch_stats")}, x, False).hidden
  np.testing.assert_allclose(float(v["quant_stats"]["head"]["input"]["scale"]),
                             (float(h.max()) - min(float(h.min()), 0.0)) / 255, rtol=1e-5)


def test_export_serving_takes_keyword_inputs_fixes_flags_and_returns_dataclass_fields():
  x = jax.random.normal(jax.random.key(1), (16, 4))
  mask = (jax.random.uniform(jax.random.key(2), (16, 8)) > 0.3).astype(jnp.float32)
  qmodel = ql.quantize(_FlagNet())
  v = ql.calibrate(qmodel, qmodel.init(KEY, x, False), [{"x": x, "train": False, "mask": mask}])
  served, sv = ql.convert(qmodel, v)
  want = served.apply(sv, x, train=False, mask=mask)
  run = core.load_serving(ql.export_serving(served, sv, x, mask=mask, train=False,
                                            batch_polymorphic=True))
  out = run(x[:5], mask=mask[:5])  # train is fixed in the program; mask is an input
  assert sorted(out) == ["attentions", "hidden", "logits"] and out["attentions"] is None
  np.testing.assert_allclose(out["logits"], want.logits[:5], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["hidden"], want.hidden[:5], rtol=1e-6, atol=1e-6)
  with pytest.raises(TypeError, match="'mask' mixes arrays and Python values"):
    ql.export_serving(served, sv, x, mask=(mask, "no"))
