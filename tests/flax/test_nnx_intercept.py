"""Interception of matmuls/convolutions in modules that are not Flax layers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqat import core
from jaxqat.core import PerChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx

W = QuantSpec(format="int4", granularity=PerChannel(-1))
A = QuantSpec(format="int8", symmetric=False, calibration="minmax")
RULES = [Rule(pattern=".*", weight=W, act=A)]


class Ops(nnx.Module):
  """Every way of writing a matmul on an own parameter."""

  def __init__(self, how: str):
    k = jax.random.key(0)
    self.how = how
    self.w = nnx.Param(jax.random.normal(k, (3, 3, 4) if how == "conv" else (4, 5)))
    self.b = nnx.Param(jnp.ones((5,)))  # rank 1: not a weight

  def __call__(self, x, *, flag=True):
    w = self.w[...]
    if self.how == "einsum":
      y = jnp.einsum("bi,io->bo", x, w)
    elif self.how == "einsum_t":  # transposed then cast: identified through layout ops
      y = jnp.einsum("bi,oi->bo", x, w.T.astype(jnp.float32))
    elif self.how == "matmul":
      y = x @ w
    elif self.how == "dot":
      y = jnp.dot(x, w)
    elif self.how == "dot_general":
      y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())))
    elif self.how == "lhs":  # the weight as the left operand: (o, b), transposed back
      y = jax.lax.dot_general(w, x, (((0,), (1,)), ((), ()))).T
    else:  # conv, NWC
      return jax.lax.conv_general_dilated(x, w, (1,), "SAME",
                                          dimension_numbers=("NWC", "WIO", "NWC"))
    return y + self.b[...] if flag else y


@pytest.mark.parametrize("how", ["einsum", "einsum_t", "matmul", "dot", "dot_general", "conv"])
def test_intercepted_op_equals_core_by_hand(how):
  m = Ops(how)
  x = jax.random.normal(jax.random.key(1), (6, 4) if how != "conv" else (2, 6, 3))
  w = m.w[...]
  q = qnnx.quantize(m, RULES)
  rep = qnnx.report(q)
  assert rep.quantized_paths() == [""] and rep[""].reason == "intercepted __call__"
  assert {w.name: w.quantized for w in rep[""].weights} == {"w": True, "b": False}
  qnnx.calibrate(q, [x])
  s = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True) / 7  # tracks the weight
  wq = core.fake_quant(w, s, None, W)
  aq = q.jaxqat_input_quant["w"]
  xq = core.fake_quant(x, aq.scale[...], aq.zero_point[...], A)
  ref = Ops(how)
  ref.w[...] = wq
  np.testing.assert_allclose(q(x), ref(xq), rtol=0, atol=1e-5)
  np.testing.assert_allclose(q(x, flag=False), ref(xq, flag=False), rtol=0, atol=1e-5)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(q, x), ref(xq), rtol=0, atol=1e-5)


class _Up(nnx.Module):
  """nnx.ConvTranspose (lax.conv_transpose: the kernel reaches its convolution through rev and
  transpose when transpose_kernel) and a head read transposed."""

  def __init__(self, transpose_kernel):
    self.up = nnx.ConvTranspose(3, 6, (3, 3), strides=(2, 2), transpose_kernel=transpose_kernel,
                                rngs=nnx.Rngs(0))
    self.head = nnx.Param(jax.random.normal(jax.random.key(2), (5, 6)) * 0.3)

  def __call__(self, x):
    return jnp.einsum("bhwc,dc->bhwd", self.up(x), self.head[...])


def _case(how):
  """(model factory, input) of an Ops or _Up case."""
  if how.startswith("up"):
    make, shape = (lambda: _Up(how == "up_transpose_kernel")), (2, 5, 5, 3)
  else:
    make, shape = (lambda: Ops(how)), ((2, 6, 3) if how == "conv" else (6, 4))
  return make, jax.random.normal(jax.random.key(1), shape)


@pytest.mark.parametrize("how", ["einsum_t", "lhs", "conv", "up", "up_transpose_kernel"])
def test_intercepted_integer_forward_matches_fake_same_gradients(how):
  """compute="integer" on intercepted modules: core.qat_op's int8 x int8 -> int32 forward on
  the op the jaxpr holds, the weight's per-channel scales carried through its layout ops."""
  rules = lambda c: [Rule(pattern=".*", weight=core.default_weight_spec(),  # noqa: E731
                          act=QuantSpec(format="int8", learning="lsq"), compute=c)]
  make, x = _case(how)
  res = {}
  for compute in ("fake", "integer"):
    q = qnnx.quantize(make(), rules(compute))
    qnnx.calibrate(q, [x])
    r = jax.random.normal(jax.random.key(3), q(x).shape)
    y, g = nnx.value_and_grad(lambda q: jnp.sum(q(x) * r))(q)
    res[compute] = (q(x), jax.tree_util.tree_leaves(g), str(jax.make_jaxpr(lambda x: q(x))(x)))
  (yf, gf, jf), (yi, gi, ji) = res["fake"], res["integer"]
  n_ops = 2 if how.startswith("up") else 1
  assert ji.count("preferred_element_type=int32") >= n_ops
  assert "preferred_element_type=int32" not in jf
  scale = float(jnp.max(jnp.abs(yf)))
  np.testing.assert_allclose(np.asarray(yi), np.asarray(yf), rtol=0, atol=2e-6 * scale)
  assert len(gi) == len(gf)
  for a, b in zip(gi, gf):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(b))))
  # A weight-only rule cannot run in integer arithmetic: refused when quantizing.
  with pytest.raises(ValueError, match="compute='integer' cannot run this layer.*weight-only"):
    qnnx.quantize(Ops("einsum"), [Rule(pattern=".*", weight=W, compute="integer")])


@pytest.mark.parametrize("how", ["matmul", "einsum_t", "lhs", "conv", "up",
                                 "up_transpose_kernel"])
def test_served_intercepted_modules_run_the_integer_forward(how):
  """convert(integer=True) serves an intercepted module's ops on the weight's codes through the
  integer forward: bit for bit the QAT model trained with compute="integer" (same ranges);
  integer=False keeps the dequantize path, bit for bit the fake-quant model."""
  rules = lambda c: [Rule(pattern=".*", weight=core.default_weight_spec(), act=A,  # noqa: E731
                          compute=c)]
  make, x = _case(how)
  q = {}
  for compute in ("fake", "integer"):
    q[compute] = qnnx.quantize(make(), rules(compute))
    qnnx.calibrate(q[compute], [x])
  run = nnx.jit(lambda m, x: m(x))
  y_fake, y_int = np.asarray(q["fake"](x)), np.asarray(q["integer"](x))
  assert np.any(y_fake != y_int)  # the two forwards differ (summation order)
  for compute in ("fake", "integer"):
    served = qnnx.convert(q[compute])
    np.testing.assert_array_equal(np.asarray(served(x)), y_int)
    np.testing.assert_array_equal(np.asarray(run(served, x)), np.asarray(run(q["integer"], x)))
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(lambda x: served(x))(x))
    plain = qnnx.convert(q[compute], integer=False)
    np.testing.assert_array_equal(np.asarray(plain(x)), y_fake)
    assert "preferred_element_type=int32" not in str(jax.make_jaxpr(lambda x: plain(x))(x))


@pytest.mark.parametrize("how", ["einsum", "einsum_t", "lhs", "conv"])
def test_intercepted_fake_ops_run_the_lean_core_op_same_values_and_gradients(how, monkeypatch):
  """In "fake" mode an intercepted op runs core.qat_op (its lean backward): the values and
  gradients of fake-quantizing the operands first (the unrouted path), LSQ included."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 3) if how == "conv" else (6, 4))
  rules = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1),
                                               learning="lsq"),
                act=QuantSpec(format="int8", learning="lsq"))]
  r = jax.random.normal(jax.random.key(3), (2, 6, 5) if how == "conv" else (6, 5))

  def run():
    q = qnnx.quantize(Ops(how), rules)
    qnnx.calibrate(q, [x])
    return nnx.value_and_grad(lambda q: jnp.sum(q(x, flag=False) * r[..., :4 if how == "conv"
                                                                        else 5]))(q)

  (v1, g1), calls = run(), []
  orig = qnnx._intercept._Interpreter._routed  # pylint: disable=protected-access
  monkeypatch.setattr(qnnx._intercept._Interpreter, "_routed",  # pylint: disable=protected-access
                      lambda *a: calls.append(orig(*a)))
  v2, g2 = run()
  assert any(c is not None for c in calls)  # the routed path ran (then was dropped)
  assert float(v1) == float(v2)
  g1, g2 = jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)
  assert len(g1) == len(g2) >= 3
  for a, b in zip(g1, g2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Embedder(nnx.Module):
  """A third-party tied embedder: encode looks rows up, decode multiplies by the table."""

  def __init__(self):
    self.table = nnx.Param(jax.random.normal(jax.random.key(0), (12, 6)))

  def encode(self, ids):
    return self.table[...][ids]

  def decode(self, h):
    return h @ self.table[...].T


def test_a_looked_up_table_runs_the_lean_op_only_for_the_integer_forward(qat_op_calls):
  """A table that is also looked up keeps its fake-quantized copy in "fake" (the lookup needs
  it anyway: the lean op's recomputation only adds memory); "integer" runs the core op."""
  ids = jnp.array([[1, 5, 11], [0, 2, 2]])
  calls = qat_op_calls
  out = {}
  for compute in ("fake", "integer"):
    m = qnnx.quantize(_Embedder(), [Rule(pattern=".*", weight=core.default_weight_spec(),
                                         act=core.default_act_spec(), compute=compute)],
                      methods={"": ("encode", "decode")})
    qnnx.calibrate(m, [ids], forward=lambda m, ids: m.decode(m.encode(ids)))
    assert m.jaxqat_lookup_weights == ("table",)
    calls.clear()
    out[compute] = m.decode(m.encode(ids))
    assert calls == ([] if compute == "fake" else ["integer"])
  np.testing.assert_allclose(np.asarray(out["integer"]), np.asarray(out["fake"]), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(out["fake"]))))


class _ConvStack(nnx.Module):
  """A third-party 1-D CNN: its own kernels, lax.conv_general_dilated."""

  def __init__(self):
    keys = jax.random.split(jax.random.key(0), 4)
    self.k = nnx.List([nnx.Param(jax.random.normal(k, (3, 32, 32)) * 0.2) for k in keys])

  def __call__(self, x):
    for k in self.k:
      x = jax.nn.relu(jax.lax.conv_general_dilated(x, k[...], (1,), "SAME",
                                                   dimension_numbers=("NWC", "WIO", "NWC")))
    return x


def test_intercepted_qat_step_memory_near_float():
  """The lean backward of intercepted ops: XLA's memory of a W4A4 LSQ step stays within 1.10x
  of the float step (fake-quantized copies and masks kept, as before: 1.37x on a larger CNN)."""
  x = jax.random.normal(jax.random.key(1), (64, 40, 32))
  rules = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1),
                                               learning="lsq"),
                act=QuantSpec(format="int4", learning="lsq"))]

  def mem(q):
    m = _ConvStack()
    if q:
      qnnx.quantize(m, rules)
      qnnx.calibrate(m, [x])
    gd, st = nnx.split(m)
    step = lambda st: jax.grad(lambda st: jnp.mean(nnx.merge(gd, st)(x) ** 2))(st)  # noqa: E731
    a = jax.jit(step).lower(st).compile().memory_analysis()
    return a.temp_size_in_bytes + a.output_size_in_bytes + a.argument_size_in_bytes

  assert mem(True) <= 1.10 * mem(False), (mem(True), mem(False))


def test_weight_not_reaching_a_matmul_is_reported():

  class Masked(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.ones((4, 4)))

    def __call__(self, x):
      return x @ (self.w[...] * jnp.tril(jnp.ones((4, 4))))  # not a layout op

  q = qnnx.quantize(Masked(), [Rule(pattern=".*", weight=W)])
  with pytest.warns(core.QuantizationWarning, match=r"layer '<root>' \(Masked\): parameters \['w'\] feed no"):
    q(jnp.ones((2, 4)))


def test_state_updates_inside_an_intercepted_module_are_kept():

  class WithBN(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jax.random.normal(jax.random.key(0), (3, 3)))
      self.bn = nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.bn(x @ self.w[...])

  q = qnnx.quantize(WithBN(), RULES)
  x = jax.random.normal(jax.random.key(1), (8, 3)) + 2.0
  qnnx.calibrate(q, [x])
  mean0 = q.bn.mean[...]
  nnx.jit(lambda m, x: m(x))(q, x)
  assert float(jnp.max(jnp.abs(q.bn.mean[...] - mean0))) > 1e-3  # batch stats were updated


def test_explicit_stack_axes_for_custom_stacked_blocks():

  class Custom(nnx.Module):

    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 4)))

    def __call__(self, x):
      return jnp.tanh(x @ self.w[...])

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return Custom(rngs)

  holder = nnx.Dict({"stack": make(nnx.Rngs(0))})
  q = qnnx.quantize(holder, RULES, stacked={"stack": 1})
  assert q["stack"].jaxqat_weight_quant["w"].scale.shape == (3, 1, 4)
  assert q["stack"].jaxqat_input_quant["w"].scale.shape == (3,)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def run(x, layer):
    return layer(x)

  x = jax.random.normal(jax.random.key(1), (2, 4))
  qnnx.calibrate(q, [x], forward=lambda m, b: run(b, m["stack"]))
  assert len(set(np.asarray(q["stack"].jaxqat_input_quant["w"].scale[...]).tolist())) == 3
  y = run(x, q["stack"])
  # Reference: the same three layers applied by hand with the sliced quantizer state.
  h = x
  for i in range(3):
    aq_ = q["stack"].jaxqat_input_quant["w"]
    w_i = q["stack"].w[...][i]
    wi = core.fake_quant(w_i, jnp.max(jnp.abs(w_i), axis=0, keepdims=True) / 7, None, W)
    hi = core.fake_quant(h, aq_.scale[...][i], aq_.zero_point[...][i], A)
    h = jnp.tanh(hi @ wi)
  np.testing.assert_allclose(y, h, rtol=0, atol=1e-5)


def test_per_channel_input_spec_is_rejected_for_intercepted_modules():
  with pytest.raises(ValueError, match=r"layer '<root>': intercepted modules quantize matmul "
                                       r"inputs per tensor"):
    qnnx.quantize(Ops("einsum"), [Rule(pattern=".*", act=QuantSpec(granularity=PerChannel(-1)))])


def test_methods_argument_is_validated_and_reported():
  with pytest.raises(TypeError, match="methods: expected a mapping"):
    qnnx.quantize(Ops("einsum"), RULES, methods=["__call__"])
  with pytest.raises(ValueError, match=r"methods: layer '<root>' \(Ops\) has no method 'decode'"):
    qnnx.quantize(Ops("einsum"), RULES, methods={"": "decode"})
  q = qnnx.quantize(Ops("einsum"), RULES, methods={"": ("__call__",)})
  assert qnnx.report(q)[""].layer_type == "Ops"  # the class before conversion
  lin = qnnx.quantize(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))
  assert qnnx.report(lin)["layers/0"].layer_type == "Linear"


def test_module_with_weights_and_no_public_method_fails_with_a_warning():

  class Bare(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 2)))

  with pytest.warns(core.QuantizationWarning, match=r"layer '<root>' \(Bare\).*no __call__ "
                    "and no public method"):
    q = qnnx.quantize(Bare(), RULES)
  assert qnnx.report(q)[""].status == "failed"


class _ScaledEmbed(nnx.Embed):
  """examples/gemma's ScaledEmbed: an Embed subclass with its own __call__ (intercepted)."""

  def __call__(self, ids):
    return super().__call__(ids) * np.float32(np.sqrt(self.features))


class _TiedLM(nnx.Module):
  def __init__(self):
    self.emb = _ScaledEmbed(16, 8, rngs=nnx.Rngs(0))
    self.mix = nnx.Param(jnp.full((8, 8), 0.5))  # used elementwise only: stays float

  def __call__(self, ids):
    return self.emb.attend(self.emb(ids) * self.mix[...][0])


def test_unused_weight_warning_spares_tables_another_method_multiplies_by():
  """An Embed subclass's first call only looks the table up; its ``attend`` (a tied head)
  multiplies by it later: no warning. A weight of a module without other methods that feeds
  no matmul is named at once."""
  ids = jnp.arange(6).reshape(2, 3)
  m = _TiedLM()
  qnnx.quantize(m, RULES, methods={"": ("__call__",)})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    qnnx.calibrate(m, [ids])
  msgs = [str(w.message) for w in caught if issubclass(w.category, core.QuantizationWarning)]
  assert not [t for t in msgs if "'emb'" in t]  # the table feeds attend's matmul
  assert [t for t in msgs if "['mix'] feed no matmul" in t]
