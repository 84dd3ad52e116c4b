"""Linen models written the way published ports write them quantize completely (issue 8).

Each model below has the shape of a failure seen on third-party code: a tied
output head applied through a nested ``Module.apply`` with the transposed
embedding as its kernel; GPT-2's Conv1D, whose kernel reaches
``lax.dot_general`` through ``kernel.transpose()``; an einsum kernel of shape
(D, heads, head_dim) under ``PerOutputChannel()``; the HF Flax causal-LM
wrapper (its body assigned to ``self.model`` in ``setup``, the head tied by
reading ``self.model.variables``, an RMSNorm and a (1, N, D) position table of
its own). Each runs the default W8A8 workflow, a few steps of W4A8 LSQ QAT and
``convert``, and the jaxpr shows that every matmul with a weight operand takes
the fake-quantized weight.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxqat import core
from jaxqat.core import IntFormat, PerOutputChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql

V, D, T = 32, 16, 6
KEY = jax.random.key(0, impl="rbg")  # compiles much faster than threefry on CPU
W4A8_LSQ = [Rule(pattern=".*",
                 weight=QuantSpec(format=IntFormat(bits=4, signed=True, narrow=True),
                                  granularity=PerOutputChannel(), learning="lsq"),
                 act=QuantSpec(format="int8", symmetric=False, learning="lsq_plus"))]


class TiedHeadLM(nn.Module):
  """Embedding, one MLP layer, output head tied through a nested ``Module.apply``."""

  @nn.compact
  def __call__(self, ids):
    wte = nn.Embed(V, D, name="wte")
    h = jnp.tanh(nn.Dense(D, name="mlp")(wte(ids)))
    return nn.Dense(V, use_bias=False).apply({"params": {"kernel": wte.embedding.T}}, h)


class Conv1D(nn.Module):
  """GPT-2's Conv1D as Flax ports write it: kernel (features, in), used transposed."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.2), (self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    kernel = jnp.asarray(kernel.transpose(), x.dtype)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


class GPT2Block(nn.Module):

  @nn.compact
  def __call__(self, h):
    b, t, _ = h.shape
    qkv = Conv1D(3 * D, name="c_attn")(nn.LayerNorm(name="ln_1")(h))
    q, k, v = (a.reshape(b, t, 2, D // 2) for a in jnp.split(qkv, 3, axis=-1))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // 2)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, D)
    h = h + Conv1D(D, name="c_proj")(a)
    m = Conv1D(D, name="mlp_c_proj")(jax.nn.gelu(Conv1D(4 * D, name="c_fc")(
        nn.LayerNorm(name="ln_2")(h))))
    return h + m


class GPT2(nn.Module):
  """GPT-2 blocks, lm head tied to wte through ``Embed.attend``: 4 * n_layer + 1 weight matmuls."""
  n_layer: int = 1

  @nn.compact
  def __call__(self, ids):
    wte = nn.Embed(V, D, name="wte")
    h = wte(ids) + nn.Embed(T, D, name="wpe")(jnp.arange(ids.shape[1]))
    for i in range(self.n_layer):
      h = GPT2Block(name=f"h_{i}")(h)
    return wte.attend(nn.LayerNorm(name="ln_f")(h))


class RMSNorm(nn.Module):
  """A port's own norm layer: one vector parameter, no matmul."""

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


class HFStyleBody(nn.Module):
  """Embedding plus a (1, T, D) position table added by broadcasting, one MLP, RMSNorm."""

  def setup(self):
    self.wte = nn.Embed(V, D)
    self.position_embeddings = self.param("position_embeddings", nn.initializers.normal(0.1),
                                          (1, T, D))
    self.mlp = nn.Dense(D)
    self.norm = RMSNorm()

  def __call__(self, ids):
    h = self.wte(ids) + self.position_embeddings[:, :ids.shape[1]]
    return self.norm(h + jnp.tanh(self.mlp(h)))


class HFStyleCausalLM(nn.Module):
  """As the HF Flax causal LMs: ``self.model`` in setup, head tied through ``.variables``."""

  def setup(self):
    self.model = HFStyleBody()
    self.lm_head = nn.Dense(V, use_bias=False)

  def __call__(self, ids):
    h = self.model(ids)
    kernel = self.model.variables["params"]["wte"]["embedding"].T
    return self.lm_head.apply({"params": {"kernel": kernel}}, h)


class HeadsEinsum(nn.Module):
  """Attention projections with (D, heads, head_dim) kernels, as Gemma-style ports."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(V, D, name="embedder")(ids)
    w = self.param("q_einsum", nn.initializers.normal(0.3), (D, 4, 4))
    q = jnp.einsum("btd,dhk->bthk", h, w)
    o = nn.Einsum((4, 4, D), "bthk,hkd->btd", name="attn_vec_einsum")(jnp.tanh(q))
    return nn.Dense(V, name="head")(o)


# ---------------------------------------------------------------------------
# Reading the jaxpr: is every matmul with a weight operand fake-quantized?
# ---------------------------------------------------------------------------

_PASS_THROUGH = {"transpose", "reshape", "convert_element_type", "broadcast_in_dim", "squeeze",
                 "expand_dims", "copy", "copy_p"}
_FAKE_QUANT = ("_fake_quant", "_lsq", "_block_fq")
_MATMULS = {"dot_general", "conv_general_dilated"}


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    j = getattr(v, "jaxpr", v)
    if hasattr(j, "eqns"):
      yield j


def _weight_matmuls(fn, params):
  """(quantized, float): matmuls whose weight operand is fake-quantized / a raw param.

  Walks into ``core.qat_op``'s custom_vjp (the fake quant and the matmul in one call),
  mapping its inputs to the caller's.
  """
  closed = jax.make_jaxpr(fn)(params)
  counts = [0, 0]

  def walk(jaxpr, params_in, outer_source):
    producer = {}
    for eqn in jaxpr.eqns:
      for o in eqn.outvars:
        producer[id(o)] = eqn

    def source(var):
      """'param', 'quant(<source of its input>)' or 'other', through layout-only ops."""
      while True:
        if id(var) in params_in:
          return "param"
        if id(var) in outer_source:
          return outer_source[id(var)]
        eqn = producer.get(id(var))
        if eqn is None:
          return "other"
        name = str(eqn.params.get("name", ""))
        if eqn.primitive.name in ("jit", "pjit") and name in _FAKE_QUANT:
          return "quant:" + source(eqn.invars[0])
        if eqn.primitive.name == "custom_jvp_call" and any(  # a tracked weight's unmasked STE
            e.primitive.name in ("jit", "pjit") and str(e.params.get("name", "")) in _FAKE_QUANT
            for j in _sub_jaxprs(eqn) for e in j.eqns):
          return "quant:" + source(eqn.invars[0])
        if eqn.primitive.name not in _PASS_THROUGH:
          return "other"
        var = eqn.invars[0]

    for eqn in jaxpr.eqns:
      assert eqn.primitive.name not in ("scan", "while"), "flatten the model for this check"
      if eqn.primitive.name in _MATMULS:
        srcs = [source(v) for v in eqn.invars[:2]]
        if "param" in srcs:
          counts[1] += 1
        elif "quant:param" in srcs:
          counts[0] += 1
      elif eqn.primitive.name.startswith("custom_vjp_call"):
        for j in _sub_jaxprs(eqn):
          if len(j.invars) == len(eqn.invars):
            walk(j, set(), {id(iv): source(ov) for iv, ov in zip(j.invars, eqn.invars)})

  walk(closed.jaxpr, set(map(id, closed.jaxpr.invars)), {})
  quantized, floating = counts
  return quantized, floating


def _lm_loss(logits, ids):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _ids(seed=1, n=8):
  return jax.random.randint(jax.random.key(seed), (n, T), 0, V)


MODELS = {
    "tied_head_nested_apply": (TiedHeadLM, 2),
    "gpt2_conv1d_transposed": (GPT2, 5),  # 4 Conv1D per block (all float before) + the head
    "einsum_heads_kernel": (HeadsEinsum, 3),
    "hf_causal_lm_wrapper": (HFStyleCausalLM, 2),  # mlp + the tied head (wte is a lookup)
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_w8a8_quantizes_every_weight_matmul(name):
  make, n_matmuls = MODELS[name]
  model, ids = make(), _ids()
  qmodel = ql.quantize(model)
  with warnings.catch_warnings():
    warnings.simplefilter("error", core.QuantizationWarning)  # nothing left float silently
    v = jax.jit(qmodel.init)(KEY, ids)
  v = ql.calibrate(qmodel, v, [ids])
  quantized, floating = _weight_matmuls(lambda p: qmodel.apply({**v, "params": p}, ids),
                                        v["params"])
  assert (quantized, floating) == (n_matmuls, 0)
  y, y_float = jax.jit(qmodel.apply)(v, ids), model.apply({"params": v["params"]}, ids)
  err = float(jnp.abs(y - y_float).max() / jnp.abs(y_float).max())
  assert 0 < err < 0.05
  r = ql.report(qmodel, v)
  assert not [w for w in r.float_weights() if w.name in ("kernel", "embedding", "q_einsum")]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_w4a8_lsq_qat_steps(name):
  make, n_matmuls = MODELS[name]
  ids = _ids()
  qmodel = ql.quantize(make(), W4A8_LSQ)
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, ids), [ids])
  t = {"params": v["params"], "quant_params": v["quant_params"]}
  tx = ql.qat_optimizer(qmodel, optax.adam(3e-3), optax.adam(1e-3))

  def loss(t):
    return _lm_loss(qmodel.apply({**v, **t}, ids), ids)

  @jax.jit
  def step(t, s):
    value, g = jax.value_and_grad(loss)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, value

  s = tx.init(t)
  losses = []
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(8):
      t, s, value = step(t, s)
      losses.append(float(value))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  quantized, floating = _weight_matmuls(lambda p: qmodel.apply({**v, **t, "params": p}, ids),
                                        t["params"])
  assert (quantized, floating) == (n_matmuls, 0)


def test_nested_apply_state_lives_in_the_enclosing_layer():
  ids = _ids()
  qmodel = ql.quantize(TiedHeadLM())
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, ids), [ids])
  assert ql.layer_paths(v) == ["Dense_0/input", "Dense_0/kernel", "mlp/input", "mlp/kernel",
                               "wte/embedding"]
  # The head's kernel is wte's table transposed: one scale per vocabulary entry.
  assert v["quant_stats"]["Dense_0"]["kernel"]["scale"].shape == (1, V)
  r = ql.report(qmodel, v)
  assert r["Dense_0"].status == "quantized" and r["Dense_0"].weights[0].shape == (D, V)


def test_conv1d_kernel_is_quantized_in_its_own_layout():
  x = jax.random.normal(jax.random.key(3), (4, 8))
  qmodel = ql.quantize(Conv1D(5))
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, x), [x])
  k = v["params"]["kernel"]  # (features, in): output channels are the rows
  spec = core.default_weight_spec().resolve_output_channel((0,))
  assert v["quant_stats"]["kernel"]["scale"].shape == (5, 1)
  s, _ = core.weight_range(k, spec)
  kq = core.fake_quant(k, s, None, spec)
  xs, xz = v["quant_stats"]["input"]["scale"], v["quant_stats"]["input"]["zero_point"]
  xq = core.fake_quant(x, xs, xz, core.default_act_spec())
  np.testing.assert_allclose(qmodel.apply(v, x), xq @ kq.T + v["params"]["bias"], atol=1e-6)


def test_per_output_channel_einsum_kernel_has_one_scale_per_head_and_dim():
  ids = _ids()
  qmodel = ql.quantize(HeadsEinsum())
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, ids), [ids])
  w = v["params"]["q_einsum"]
  scale = v["quant_stats"]["q_einsum"]["scale"]
  assert scale.shape == (1, 4, 4)  # (D, heads, head_dim): D is contracted
  np.testing.assert_allclose(scale, jnp.abs(w).max(0, keepdims=True) / 127, rtol=1e-6)
  assert len(np.unique(np.asarray(scale))) == 16  # not shared across heads
  assert v["quant_stats"]["attn_vec_einsum"]["kernel"]["scale"].shape == (1, 1, D)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_serves_the_qat_model(name):
  make, _ = MODELS[name]
  ids = _ids()
  qmodel = ql.quantize(make())
  v = ql.calibrate(qmodel, jax.jit(qmodel.init)(KEY, ids), [ids])
  y = jax.jit(qmodel.apply)(v, ids)
  served, sv = ql.convert(qmodel, v, integer=False)
  np.testing.assert_array_equal(jax.jit(served.apply)(sv, ids), y)  # bit for bit
  leaves = jax.tree_util.tree_leaves_with_path(sv["params"])
  assert not [p for p, x in leaves if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)
              and "position_embeddings" not in jax.tree_util.keystr(p)]  # no float weight
  served, sv = ql.convert(qmodel, v)  # integer kernels: float rounding, rare one-step flips
  y_int = jax.jit(served.apply)(sv, ids)
  assert float(jnp.linalg.norm(y_int - y) / jnp.linalg.norm(y)) < 2e-3
  assert float(jnp.mean(jnp.abs(y_int - y) < 1e-5 * jnp.abs(y).max())) > 0.95


def test_hf_style_wrapper_keeps_its_tree_and_reports_norms_as_elementwise():
  ids = _ids()
  model = HFStyleCausalLM()
  params = model.init(KEY, ids)["params"]
  qmodel = ql.quantize(model)  # the body's name "model" is not taken by the wrapper
  v = qmodel.init(KEY, ids)
  assert jax.tree.structure(v["params"]) == jax.tree.structure(params)
  r = ql.report(qmodel, ql.calibrate(qmodel, {**v, "params": params}, [ids]))
  assert r["model/norm"].status == "unsupported"
  assert "elementwise" in r["model/norm"].reason
  assert "elementwise" in r["model"].reason  # its own parameter: the position table
  assert r["lm_head"].status == "quantized" and r["lm_head"].weights[0].shape == (D, V)
