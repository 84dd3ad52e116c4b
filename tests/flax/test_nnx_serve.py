"""Served NNX models (jaxqat.flax.nnx.convert): parity, integer jaxpr, size, round trips, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxqat import core
from jaxqat.core import PerChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx
from jaxqat.flax.nnx import _encodings
from jaxqat.flax.nnx import _serve

U = 2.0**-24
DOT = lambda nd: (((nd - 1,), (0,)), ((), ()))  # noqa: E731


class Net(nnx.Module):
  """Every served layer type: Embed (lookup and tied attend), depthwise and plain Conv,
  LinearGeneral, Einsum, Linear."""

  def __init__(self, seed=0):
    r, rng = nnx.Rngs(seed), np.random.default_rng(seed)
    # numpy initializers: no compile per weight shape (keeps the test fast)
    init = lambda key, shape, dtype=jnp.float32: jnp.asarray(  # noqa: E731
        rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), dtype)
    kw = dict(kernel_init=init, bias_init=init, rngs=r)
    self.emb = nnx.Embed(16, 8, embedding_init=init, rngs=r)
    self.dw = nnx.Conv(8, 8, (3,), feature_group_count=8, **kw)
    self.conv = nnx.Conv(8, 12, (3,), padding="CAUSAL", **kw)
    self.lg = nnx.LinearGeneral(12, (2, 4), **kw)
    self.ein = nnx.Einsum("bthd,hdo->bto", (2, 4, 8), (8,), **kw)
    self.fc = nnx.Linear(8, 8, **kw)

  def stages(self, ids):
    """The input of every layer, in order (the last entry is attend's query)."""
    out = {"emb": ids}
    h = self.emb(ids)
    for name in ("dw", "conv", "lg", "ein", "fc"):
      out[name] = h
      h = getattr(self, name)(h)
      h = nnx.relu(h) if name == "dw" else h
    out["attend"] = h
    return out

  def __call__(self, ids):
    return self.emb.attend(self.stages(ids)["attend"])


IDS = jax.random.randint(jax.random.key(1), (3, 6), 0, 16)
W4 = [Rule(pattern="fc", weight=QuantSpec(format="int4", learning="lsq")),
      Rule(pattern="ein", weight=QuantSpec(format="fp8_e4m3", granularity=PerChannel(-1))),
      Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1)))]


def _np(x):
  return np.asarray(x)


_fwd = nnx.jit(lambda model, ids: model(ids))  # one compile per graph definition


@pytest.fixture(scope="module")
def w8a8():
  qat = qnnx.calibrate(qnnx.quantize(Net()), [IDS])
  return qat, _serve.convert(qat), _serve.convert(qat, integer=False)


LAYERS = ("dw", "conv", "lg", "ein", "fc")


@nnx.jit
def _outputs(qat, models, ids):
  """Each model's layers applied to the fake-quant model's layer inputs, and the whole models."""
  xs = qat.stages(ids)
  out = {}
  for k, m in enumerate(models):
    out[f"{k}/emb"] = m.emb(ids)
    out[f"{k}/attend"] = m.emb.attend(xs["attend"])
    out[f"{k}/model"] = m(ids)
    for name in LAYERS:
      out[f"{k}/{name}"] = getattr(m, name)(xs[name])
  return xs, out


def _conv_bound(x, layer, qt, act):
  """The bound of core.integer_error_bound for a convolution: with exact integers a = q_x - z_x
  and b = q_w, (gamma_{K+2} + gamma_3)(1+u)^2 s_x s_w conv(|a|, |b|)."""
  s_x = act.scale
  a = jnp.abs(jnp.round(core.fake_quantize_input(x, act) / s_x))
  b = jnp.abs(qt.codes.astype(jnp.float32))
  pad = [(2, 0)] if layer.padding == "CAUSAL" else "SAME"
  s = lax.conv_general_dilated(a, b, (1,), pad, dimension_numbers=("NWC", "WIO", "NWC"),
                               feature_group_count=layer.feature_group_count,
                               precision=lax.Precision.HIGHEST)
  k = b.shape[0] * b.shape[1]
  gamma = lambda n: n * U / (1 - n * U)  # noqa: E731
  return (gamma(k + 2) + gamma(3)) * (1 + U)**2 * s_x * qt.scale.reshape(-1) * s


@nnx.jit
def _bounds(served, xs):
  out = {}
  for name in LAYERS + ("attend",):
    x = xs[name]
    layer = served.emb if name == "attend" else getattr(served, name)
    qt = (layer.embedding if name == "attend" else layer.kernel).qtensor()
    act = layer.input_encoding.encoding()
    if name in ("dw", "conv"):
      out[name] = _conv_bound(x, layer, qt, act)
    elif name == "ein":
      out[name] = core.integer_error_bound(x, qt, act, (((2, 3), (0, 1)), ((), ())))
    elif name == "attend":
      out[name] = core.integer_error_bound(x, qt, act, (((x.ndim - 1,), (1,)), ((), ())))
    else:
      out[name] = core.integer_error_bound(x, qt, act, DOT(x.ndim))
  return out


def test_w8a8_parity_per_layer_and_model(w8a8):
  """Integer path: |served - fake| <= core.integer_error_bound (for Conv the same formula from
  the codes, _conv_bound) + 2^-23 (|y_served| + |y_fake|) for the float bias add that follows.
  integer=False: bit for bit. The whole model: integer=False bit for bit, integer close."""
  qat, served, deq = w8a8
  xs, out = _outputs(qat, (qat, served, deq), IDS)
  bounds = _bounds(served, xs)
  np.testing.assert_array_equal(_np(out["1/emb"]), _np(out["0/emb"]))
  for name in LAYERS + ("attend", "model"):
    fake, got, flt = out[f"0/{name}"], out[f"1/{name}"], out[f"2/{name}"]
    np.testing.assert_array_equal(_np(flt), _np(fake), err_msg=name)
    if name == "model":
      np.testing.assert_allclose(_np(got), _np(fake), rtol=1e-4, atol=1e-4)
      continue
    err = jnp.abs(got - fake) - bounds[name] - 2.0**-23 * (jnp.abs(got) + jnp.abs(fake))
    assert float(jnp.max(err)) <= 0.0, name
  # The QAT model is untouched: its layers are still fake-quant layers with float kernels.
  assert type(qat.fc).__name__ == "QuantLinear" and qat.fc.kernel[...].dtype == jnp.float32


def test_served_jaxpr_is_integer_and_holds_no_float_kernel(w8a8, monkeypatch):
  qat, served, _ = w8a8
  graphdef, state = nnx.split(served)
  kernel_shapes = {tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(qat, nnx.Param))
                   if p[-1] in ("kernel", "embedding")}
  leaves = jax.tree.leaves(state)
  assert not [x.shape for x in leaves
              if jnp.issubdtype(x.dtype, jnp.floating) and tuple(x.shape) in kernel_shapes]
  codes = [v for p, v in nnx.to_flat_state(state) if p[-1] == "values"]
  assert len(codes) == 6 and all(v[...].dtype == jnp.int8 for v in codes)
  assert all(isinstance(v, _serve.ServedArray) and not isinstance(v, nnx.Param) for v in codes)
  y = _fwd(served, IDS)
  # On CPU a convolution is an int8 dot over the input's windows (`_integer._int8_conv`) or,
  # when depthwise, a sum of int32 products of the codes; the dot form is counted below, and
  # both give the same output.
  monkeypatch.setattr(core._integer, "_SUM_MAX_GROUP", 0)  # pylint: disable=protected-access
  fwd = lambda st, ids: nnx.merge(graphdef, st)(ids)  # noqa: E731
  np.testing.assert_array_equal(_np(jax.jit(fwd)(state, IDS)), _np(y))
  jaxpr = jax.make_jaxpr(fwd)(state, IDS)
  ops = [(e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars), str(e.outvars[0].aval.dtype))
         for e in jaxpr.jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
  ints = [o for o in ops if o[1] == ("int8", "int8") and o[2] == "int32"]
  # dw, conv (plus the zero-point correction conv each), lg, ein, fc, attend.
  cpu = jax.default_backend() == "cpu"
  assert {o[0] for o in ints} == ({"dot_general"} if cpu else
                                  {"dot_general", "conv_general_dilated"})
  assert len([o for o in ints if o[0] == "dot_general"]) == (8 if cpu else 4)
  assert all(o in ints for o in ops), ops
  # nnx.jit over the served model and over split/merge copies agree.
  np.testing.assert_array_equal(_np(_fwd(served, IDS)),
                                _np(_fwd(nnx.merge(graphdef, state), IDS)))


def test_weight_only_int4_lsq_fp8_bit_exact():
  qat = qnnx.quantize(Net(), W4)
  served = _serve.convert(qat)
  _, out = _outputs(qat, (qat, served), IDS)
  for name in LAYERS + ("emb", "attend", "model"):
    np.testing.assert_array_equal(_np(out[f"1/{name}"]), _np(out[f"0/{name}"]), err_msg=name)
  assert served.conv.kernel.packed == 4 and served.conv.kernel.values.shape == (3, 8, 6)
  assert served.ein.kernel.values[...].dtype == jnp.float8_e4m3fn
  assert served.fc.kernel.values[...].dtype == jnp.int8 and served.fc.input_encoding is None


def test_size_ratio_int8_and_packed_int4():
  mlp = lambda: nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0)), nnx.relu,  # noqa: E731
                               nnx.Linear(256, 256, rngs=nnx.Rngs(1)))
  ratios = {}
  for fmt in ("int8", "int4"):
    rules = [Rule(pattern=".*", weight=QuantSpec(format=fmt, granularity=PerChannel(-1)))]
    report = _serve.size_report(_serve.convert(qnnx.quantize(mlp(), rules)))
    ratios[fmt] = report.ratio
    assert [r.layer for r in report.rows] == ["layers/0/kernel", "layers/2/kernel"]
    assert report.float_bytes == 2 * 256 * 256 * 4
    assert "compression" in str(report)
  assert ratios["int8"] <= 0.27 and ratios["int4"] <= 0.15, ratios
  assert ratios["int8"] == pytest.approx((256 * 256 + 256 * 4) / (256 * 256 * 4))


def test_round_trips_encodings_orbax_jax_export(w8a8, tmp_path):
  qat, served, _ = w8a8
  ref = _fwd(served, IDS)
  # Encodings JSON -> a fresh quantized copy (same float weights, never calibrated).
  f = tmp_path / "enc.json"
  _encodings.save_encodings(f, qat)
  data = json.loads(f.read_text())
  assert {e["name"] for e in data["param_encodings"]} == {
      "emb/embedding", "dw/kernel", "conv/kernel", "lg/kernel", "ein/kernel", "fc/kernel"}
  assert "fc/input" in {e["name"] for e in data["activation_encodings"]}
  fresh = _encodings.load_encodings(qnnx.quantize(Net()), f)
  assert fresh.fc.kernel_quant.frozen and fresh.fc.input_quant.calibrated
  np.testing.assert_array_equal(_np(_fwd(fresh, IDS)), _np(_fwd(qat, IDS)))
  # Orbax: served model -> served model of another seed.
  qnnx.save(tmp_path / "ckpt", served)
  other = _serve.convert(_encodings.load_encodings(qnnx.quantize(Net(seed=3)), data))
  assert not np.array_equal(_np(_fwd(other, IDS)), _np(ref))
  np.testing.assert_array_equal(_np(_fwd(qnnx.restore(tmp_path / "ckpt", other), IDS)), _np(ref))
  int4 = _serve.convert(qnnx.quantize(Net(), W4))
  with pytest.raises(ValueError, match=r"served 'conv/kernel': the checkpoint has .*int8"):
    qnnx.restore(tmp_path / "ckpt", int4)
  # jax.export: reload without the model's code, any batch size.
  blob = _serve.export_serving(served, IDS, batch_polymorphic=True)
  fn = core.load_serving(blob)
  np.testing.assert_array_equal(_np(fn(IDS)), _np(ref))
  assert fn(IDS[:1]).shape == (1, 6, 16)


def _state(model):
  return [(p, np.asarray(v[...])) for p, v in nnx.to_flat_state(nnx.state(model))]


def _same(a, b):
  return len(a) == len(b) and all(p == q and np.array_equal(x, y) for (p, x), (q, y) in zip(a, b))


def test_bad_input_names_layer_or_entry_and_changes_nothing(w8a8, tmp_path):
  qat = w8a8[0]
  raw = qnnx.quantize(Net())
  before = _state(raw)
  with pytest.raises(ValueError, match=r"convert: layer 'conv': the input quantizer was never "
                     "calibrated"):
    _serve.convert(raw)
  assert _same(_state(raw), before) and not raw.conv.input_quant.calibrated
  qnnx.set_mode(raw.fc, "float")
  with pytest.raises(ValueError, match=r"convert: layer 'fc': the quantizer is in 'float' mode"):
    _serve.convert(raw)

  tied = qnnx.quantize(Tied(), methods={"": "__call__"})
  with pytest.raises(ValueError, match=r"convert: layer '<root>' \(Tied\) is intercepted only "
                     "to read the weights of its quantized layers"):
    _serve.convert(qnnx.calibrate(tied, [jnp.ones((2, 4))]))
  # Encodings: malformed, truncated, mismatched -> error naming the entry, nothing applied.
  good = _encodings.export_encodings(qat)
  target = qnnx.quantize(Net(seed=5))
  before = _state(target)
  bad_bw = json.loads(json.dumps(good))
  bad_bw["param_encodings"][-1]["bw"] = 4
  bad_scale = json.loads(json.dumps(good))
  bad_scale["activation_encodings"][-1]["scale"] = [0.1, 0.2]
  unknown = json.loads(json.dumps(good))
  unknown["param_encodings"][0]["name"] = "nope/kernel"
  last_param = bad_bw["param_encodings"][-1]["name"]
  last_act = bad_scale["activation_encodings"][-1]["name"]
  cases = [(bad_bw, rf"entry '{last_param}': bw is 4"),
           (bad_scale, rf"entry '{last_act}': 'scale' has 2 values"),
           (unknown, r"entry 'nope/kernel': the model has no quantizer"),
           (json.dumps(good)[:200], r"not valid JSON")]
  for data, msg in cases:
    if isinstance(data, str):
      (tmp_path / "truncated.json").write_text(data)
      data = tmp_path / "truncated.json"
    with pytest.raises(ValueError, match=msg):
      _encodings.load_encodings(target, data)
    assert _same(_state(target), before) and not target.fc.input_quant.calibrated


class Proj(nnx.Module):
  """A foreign module (intercepted): an einsum on its own weight, BatchNorm, a Flax layer."""

  def __init__(self):
    self.w = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)), jnp.float32))
    self.bn = nnx.BatchNorm(6, use_running_average=True, rngs=nnx.Rngs(0))
    self.fc = nnx.Linear(6, 2, rngs=nnx.Rngs(1))

  def __call__(self, x):
    h = jnp.einsum("bi,ihk->bhk", x, self.w[...]).reshape(x.shape[0], 6)
    return self.fc(self.bn(h))


class Tied(nnx.Module):
  """Reads its Linear's kernel directly (intercepted with methods=, no weight of its own)."""

  def __init__(self):
    self.fc = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.fc(x) @ self.fc.kernel[...].T


def test_intercepted_module_serves_codes_on_the_dequantize_path():
  """Intercepted weights are stored as codes and dequantized at the call: bit for bit with the
  fake-quant module (W8A8, integer=False, so the nested Linear is exact too)."""
  x = jnp.linspace(-1.0, 1.0, 20).reshape(5, 4)
  qat = qnnx.calibrate(qnnx.quantize(Proj()), [x])
  served = _serve.convert(qat, integer=False)
  assert served.w.dtype == jnp.int8 and not isinstance(served.w, nnx.Param)
  assert type(served).__name__ == "ServedProj"
  np.testing.assert_array_equal(_np(_fwd(served, x)), _np(_fwd(qat, x)))
  np.testing.assert_array_equal(_np(served(x)), _np(_fwd(qat, x)))  # eager, twice: no
  np.testing.assert_array_equal(_np(served(x)), _np(_fwd(qat, x)))  # state changed by a call
  rows = {r.layer: r for r in _serve.size_report(served).rows}
  assert rows["w"].format == "int8_narrow" and rows["w"].quant_bytes == 24 + 3 * 4 * 2
  assert {e["name"] for e in _encodings.export_encodings(qat)["activation_encodings"]} == {
      "w/input", "fc/input"}


def test_stacked_vmap_layers_convert_slice_by_slice():
  """nnx.vmap-created layers run under nnx.scan: codes and scales keep the stacked axis."""

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return nnx.Linear(4, 4, rngs=rngs)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def run(x, layer):
    return layer(x)

  rules = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1)))]
  qat = qnnx.quantize(make(nnx.Rngs(0)), rules)
  served = _serve.convert(qat)
  assert served.kernel.values.shape == (3, 4, 2) and served.kernel.scale.shape == (3, 1, 4)
  x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  np.testing.assert_array_equal(_np(run(x, served)), _np(run(x, qat)))
  enc = _encodings.export_encodings(qat)
  assert enc["param_encodings"][0]["shape"] == [3, 1, 4]


def test_act_quant_point_serves_its_encoding():
  """A hand-placed ActQuant becomes a ServedActQuant with the calibrated range (bit for bit)."""

  class Head(nnx.Module):

    def __init__(self):
      self.proj = nnx.Linear(2, 3, rngs=nnx.Rngs(2))
      self.out_quant = qnnx.ActQuant(QuantSpec(format="int4"))

    def __call__(self, x):
      return self.out_quant(nnx.relu(self.proj(x)))

  x = jnp.array([[0.3, -1.2], [2.0, 0.7]])
  qat = qnnx.calibrate(qnnx.quantize(Head()), [x])
  served = _serve.convert(qat, integer=False)
  assert type(served.out_quant).__name__ == "ServedActQuant"
  np.testing.assert_array_equal(_np(served.out_quant.input_encoding.scale[...]),
                                _np(qat.out_quant.quantizer.scale[...]))
  np.testing.assert_array_equal(_np(served(x)), _np(qat(x)))
  assert "out_quant/input" in {e["name"] for e in
                               _encodings.export_encodings(qat)["activation_encodings"]}


class _FlagNet(nnx.Module):
  """``__call__(x, train)``: BatchNorm and Dropout follow a Python flag."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, train: bool = True, mask=None):
    h = self.bn(self.hidden(x), use_running_average=not train)
    h = self.drop(nnx.relu(h), deterministic=not train)
    if mask is not None:
      h = h * mask
    return {"logits": self.head(h), "hidden": h}


@pytest.mark.parametrize("batch", ["tuple", "dict"])
def test_calibrate_keeps_python_flags_static(batch):
  x = jax.random.normal(jax.random.key(1), (16, 4))
  model = _FlagNet(nnx.Rngs(0))
  model.bn.mean[...] = jnp.full((8,), 0.3)  # running statistics that differ from the batch's
  want = model(x, False)["hidden"]
  qnnx.quantize(model)
  data = [(x, False)] if batch == "tuple" else [{"x": x, "train": False}]
  qnnx.calibrate(model, data)  # a traced flag failed here (bool of a tracer)
  np.testing.assert_allclose(float(model.head.input_quant.scale[...]),
                             (float(want.max()) - min(float(want.min()), 0.0)) / 255, rtol=1e-5)


def test_export_serving_takes_keyword_inputs_and_fixes_flags():
  x = jax.random.normal(jax.random.key(1), (16, 4))
  mask = (jax.random.uniform(jax.random.key(2), (16, 8)) > 0.3).astype(jnp.float32)
  model = qnnx.quantize(_FlagNet(nnx.Rngs(0)))
  qnnx.calibrate(model, [{"x": x, "train": False, "mask": mask}])
  served = qnnx.convert(model)
  want = served(x, train=False, mask=mask)
  run = core.load_serving(qnnx.export_serving(served, x, mask=mask, train=False))
  out = run(x, mask=mask)
  np.testing.assert_allclose(out["logits"], want["logits"], rtol=1e-6, atol=1e-6)


def test_near_tie_inputs_quantize_alike_eager_compiled_and_on_the_integer_path():
  """Inputs within an ulp of a rounding tie get one code everywhere.

  XLA computes ``x / s`` as ``x * (1 / s)`` once compiled; eager op-by-op
  division is exact, so near-ties used to flip one code between eager QAT and
  the served integer path (73 of 750 such inputs).
  """
  m = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  qnnx.quantize(m)
  qnnx.calibrate(m, [jnp.asarray([[0.0, 2.345600128173828, 1.0, 0.5]], jnp.float32)])
  s = np.float32(m.input_quant.scale[...])
  ties = np.float32((np.arange(1, 250) + 0.5) * s)
  near = np.concatenate([np.nextafter(ties, np.float32(0)), ties, np.nextafter(ties, np.float32(9))])
  x = jnp.asarray(np.pad(near[:, None], ((0, 0), (0, 3))), jnp.float32)
  spec = m.input_quant.spec
  eager = core.fake_quant(x, m.input_quant.scale[...], m.input_quant.zero_point[...], spec)
  compiled = jax.jit(core.fake_quant, static_argnums=3)(
      x, m.input_quant.scale[...], m.input_quant.zero_point[...], spec)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(compiled))
  y = np.asarray(m(x))
  for integer in (True, False):
    np.testing.assert_allclose(np.asarray(qnnx.convert(m, integer=integer)(x)), y,
                               rtol=1e-5, atol=1e-5 * np.abs(y).max())
