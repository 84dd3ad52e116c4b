"""Real-model shapes that used to stay (partly) float in NNX now quantize completely (issue 8).

One small model per failure seen on third-party code: a plain ``nnx.Embed``
used only for lookup; a module holding a layer it never calls (it reads the
kernel); a Gemma-style embedder with ``encode``/``decode`` and no
``__call__`` (tied output head); a root module computing
``h @ embed.embedding.T``; an attention projection written as an einsum on a
``(D, heads, head_dim)`` kernel. Each passes the default W8A8 workflow and a
few steps of W4A8 LSQ QAT, and the jaxpr shows that every matmul with a
weight operand receives it through a fake-quant call.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend import core as jex_core

from jaxqat import core
from jaxqat.core import PerChannel
from jaxqat.core import PerOutputChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx

pytestmark = pytest.mark.slow

V, D, H, K = 11, 8, 2, 4


def _p(key, shape):
  return nnx.Param(jax.random.normal(jax.random.key(key), shape) / np.sqrt(shape[0]))


class LookupEmbed(nnx.Module):
  """A plain nnx.Embed used only for lookup, then a Linear head."""

  def __init__(self):
    self.emb = nnx.Embed(V, D, rngs=nnx.Rngs(0))
    self.head = nnx.Linear(D, 3, rngs=nnx.Rngs(1))

  def __call__(self, ids):
    return self.head(self.emb(ids).mean(axis=1))


class ReadsKernel(nnx.Module):
  """Holds a Linear that it never calls: it reads the kernel and transposes it."""

  def __init__(self):
    self.inp = nnx.Linear(3, D, rngs=nnx.Rngs(0))
    self.proj = nnx.Linear(D, D, rngs=nnx.Rngs(1))

  def __call__(self, x):
    h = nnx.relu(self.inp(x))
    return h @ self.proj.kernel[...].T


class Embedder(nnx.Module):
  """Gemma-style tied embedding: encode/decode methods, no __call__."""

  def __init__(self):
    self.table = _p(2, (V, D))

  def encode(self, ids):
    return jnp.take(self.table[...], ids, axis=0) * np.sqrt(D)

  def decode(self, h):
    return jnp.einsum("btd,vd->btv", h, self.table[...])


class TiedLM(nnx.Module):

  def __init__(self):
    self.embedder = Embedder()
    self.mlp = nnx.Linear(D, D, rngs=nnx.Rngs(3))

  def __call__(self, ids):
    return self.embedder.decode(nnx.gelu(self.mlp(self.embedder.encode(ids))))


class RootTied(nnx.Module):
  """A root module computing h @ embedding.T with a plain nnx.Embed."""

  def __init__(self):
    self.embed = nnx.Embed(V, D, rngs=nnx.Rngs(4))
    self.mlp = nnx.Linear(D, D, rngs=nnx.Rngs(5))

  def __call__(self, ids):
    h = nnx.gelu(self.mlp(self.embed(ids)))
    return h @ self.embed.embedding[...].T


class HeadsAttention(nnx.Module):
  """Query/key/value projections as einsums on (D, heads, head_dim) kernels."""

  def __init__(self):
    self.wq, self.wk, self.wv = _p(6, (D, H, K)), _p(7, (D, H, K)), _p(8, (D, H, K))
    self.wo = _p(9, (H, K, D))

  def __call__(self, x):
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (self.wq, self.wk, self.wv))
    p = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K), axis=-1)
    return jnp.einsum("bhts,bshk,hkd->btd", p, v, self.wo[...])


_IDS = jnp.array([[0, 3, 5, 10], [2, 2, 7, 1]])
_X3 = jax.random.normal(jax.random.key(10), (2, 4, 3))
_XD = jax.random.normal(jax.random.key(11), (2, 4, D))

# name -> (model factory, input, quantize keyword arguments, weights (paths), weight matmuls)
MODELS = {
    "lookup_embed": (LookupEmbed, _IDS, {}, ["emb/embedding", "head/kernel"], 1),
    "reads_kernel": (ReadsKernel, _X3, {"methods": {"": "__call__"}},
                     ["inp/kernel", "proj/kernel"], 2),
    "embedder_encode_decode": (TiedLM, _IDS, {}, ["embedder/table", "mlp/kernel"], 2),
    "root_tied_head": (RootTied, _IDS, {"methods": {"": "__call__"}},
                       ["embed/embedding", "mlp/kernel"], 2),
    "einsum_heads": (HeadsAttention, _XD, {}, ["wk", "wo", "wq", "wv"], 4),
}

# ---------------------------------------------------------------------------
# The jaxpr check: every matmul with a weight operand gets it through fake quant.
# ---------------------------------------------------------------------------

_FQ = ("custom_vjp_call", "custom_vjp_call_jaxpr", "custom_jvp_call")
_LAYOUT = ("reshape", "transpose", "convert_element_type", "broadcast_in_dim", "squeeze",
           "expand_dims", "copy", "copy_p", "slice", "dynamic_slice", "rev")


def _sub(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      j = getattr(x, "jaxpr", x)
      if hasattr(j, "eqns"):
        yield j


def _has_matmul(eqn):
  return any(e.primitive.name in ("dot_general", "conv_general_dilated") or _has_matmul(e)
             for j in _sub(eqn) for e in j.eqns)


def _is_fq(eqn):
  if _has_matmul(eqn):  # core.qat_op: the fake quant and the op in one custom_vjp; walk into it
    return False
  return eqn.primitive.name in _FQ or any(_is_fq(e) for j in _sub(eqn) for e in j.eqns)


def _walk(jaxpr, tags, out):
  """Tags values ``("w", name)`` (a weight, through layout ops) or ``("fq", name)``."""
  tag = lambda v: None if isinstance(v, jex_core.Literal) else tags.get(v)
  for eqn in jaxpr.eqns:
    ins = [tag(v) for v in eqn.invars]
    name = eqn.primitive.name
    res = [None] * len(eqn.outvars)
    if _is_fq(eqn):
      if ins and ins[0] is not None:
        res = [("fq", ins[0][1])] * len(eqn.outvars)
    elif name in _LAYOUT:
      res = [ins[0]]
    elif name in ("dot_general", "conv_general_dilated"):
      out.append((name, ins[0], ins[1]))
    else:
      for j in _sub(eqn):
        if len(j.invars) == len(eqn.invars):
          sub_tags = {v: t for v, t in zip(j.invars, ins) if t is not None}
          _walk(j, sub_tags, out)
          if len(j.outvars) == len(eqn.outvars):
            res = [sub_tags.get(v) if not isinstance(v, jex_core.Literal) else None
                   for v in j.outvars]
    for v, t in zip(eqn.outvars, res):
      if t is not None:
        tags[v] = t


def weight_matmuls(model, x):
  """``[(primitive, lhs tag, rhs tag)]`` of every matmul/conv that touches a weight."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp[:-1])
           for kp, _ in leaves]
  weights = [n for n, (_, v) in zip(names, leaves) if v.ndim >= 2]
  closed = jax.make_jaxpr(
      lambda p, x: nnx.merge(graphdef, p, rest)(x))(params, x)
  invars = closed.jaxpr.invars[:len(leaves)]
  tags = {v: ("w", n) for v, n in zip(invars, names) if n in weights}
  out = []
  _walk(closed.jaxpr, tags, out)
  return [m for m in out if m[1] is not None or m[2] is not None], weights


def _assert_every_weight_matmul_quantized(model, x, want_weights, n_matmuls):
  mm, weights = weight_matmuls(model, x)
  assert sorted(w for w in weights if not w.split("/")[-1].startswith(("log_scale", "offset"))
                and "quant" not in w) == sorted(want_weights)
  raw = [m for m in mm if (m[1] or ("",))[0] == "w" or (m[2] or ("",))[0] == "w"]
  assert raw == [], f"matmuls with a float weight operand: {raw}"
  assert len(mm) == n_matmuls
  fed = {t[1] for m in mm for t in m[1:] if t is not None}
  lookups = {w for w in want_weights if w.endswith("embedding") or w.endswith("table")}
  assert fed | lookups >= set(want_weights)  # every weight (tied heads included) is quantized


# ---------------------------------------------------------------------------


def _w4a8_lsq():
  w = QuantSpec(format="int4", granularity=PerOutputChannel(), learning="lsq")
  a = QuantSpec(format="int8", symmetric=False, calibration="minmax", learning="lsq_plus")
  return [Rule(pattern=".*", weight=w, act=a)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_w8a8_workflow_quantizes_every_weight_matmul(name, recwarn):
  make, x, kw, weights, n = MODELS[name]
  model = make()
  y_float = model(x)
  qnnx.quantize(model, **kw)
  qnnx.calibrate(model, [x])
  assert not [w for w in recwarn.list if issubclass(w.category, core.QuantizationWarning)]
  _assert_every_weight_matmul_quantized(model, x, weights, n)
  y = model(x)
  err = float(jnp.max(jnp.abs(y - y_float)))
  assert 0.0 < err < 0.05 * float(jnp.max(jnp.abs(y_float)))  # W8A8: close, not equal
  rep = qnnx.report(model)
  assert rep.paths("failed") == [] and rep.paths("unmatched") == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_w4a8_lsq_qat_trains_with_every_weight_matmul_quantized(name):
  make, x, kw, weights, n = MODELS[name]
  model = make()
  qnnx.quantize(model, _w4a8_lsq(), **kw)
  qnnx.calibrate(model, [x])
  _assert_every_weight_matmul_quantized(model, x, weights, n)
  target = jax.random.normal(jax.random.key(0), model(x).shape)
  opt = nnx.Optimizer(model, qnnx.qat_optimizer(model, optax.adam(1e-2), optax.adam(1e-2)),
                      wrt=nnx.Param)
  loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    with jax.numpy_dtype_promotion("standard"):
      opt.update(m, grads)
    return loss, grads

  theta0 = {id(q): q.log_scale[...] for q in qnnx.quantizers(model) if q.log_scale is not None}
  losses = [float(step(model, opt)[0]) for _ in range(5)]
  assert losses[-1] < losses[0]
  moved = [q for q in qnnx.quantizers(model) if q.log_scale is not None
           and float(jnp.max(jnp.abs(q.log_scale[...] - theta0[id(q)]))) > 0]
  assert len(moved) >= len(weights)  # the step sizes of every weight (at least) were trained


def test_embed_lookup_only_keeps_the_attend_query_float_and_reports_it():
  model = qnnx.quantize(LookupEmbed())
  qnnx.calibrate(model, [_IDS])
  layer = qnnx.report(model)["emb"]
  assert layer.status == "quantized" and layer.act is None
  assert "attend() was not called" in layer.reason
  assert layer.weights[0].spec.granularity == PerChannel(0)


def test_embedder_decode_gets_one_scale_per_vocabulary_row():
  model = qnnx.quantize(TiedLM())
  qnnx.calibrate(model, [_IDS])
  wq = model.embedder.jaxqat_weight_quant["table"]
  # decode contracts D: the output channels are the rows (vocabulary), resolved per op.
  assert wq.spec.granularity == PerChannel(-2) and wq.scale.shape == (V, 1)
  assert qnnx.report(model)["embedder"].reason == "intercepted decode, encode"


def test_tied_embedder_lookup_reads_the_quantized_table_and_serves_equal():
  # encode gathered rows of the float table while decode multiplied by the quantized one;
  # the served model holds codes only, so it was 1.2% off the fake-quant model.
  model = qnnx.quantize(TiedLM())
  qnnx.calibrate(model, [_IDS])
  table = model.embedder.table[...]
  tq = model.embedder.jaxqat_weight_quant["table"](table)
  assert float(jnp.abs(tq - table).max()) > 0
  np.testing.assert_array_equal(model.embedder.encode(_IDS),
                                jnp.take(tq, _IDS, axis=0) * np.sqrt(D))
  with warnings.catch_warnings():
    warnings.simplefilter("error", core.QuantizationWarning)
    served = qnnx.convert(model, integer=False)
  np.testing.assert_array_equal(served(_IDS), model(_IDS))


class EncodeOnly(nnx.Module):
  """A custom embedder whose table feeds no matmul of its own."""

  def __init__(self, rngs):
    self.table = nnx.Param(jax.random.normal(rngs.params(), (V, D)))

  def encode(self, ids):
    return jnp.take(self.table[...], ids, axis=0)


class HeadReadsTable(nnx.Module):
  """Intercepted (own weight w); multiplies by its child's table read directly."""

  def __init__(self, rngs):
    self.emb = EncodeOnly(rngs)
    self.lin = nnx.Linear(D, D, rngs=rngs)
    self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)) / np.sqrt(D))

  def __call__(self, ids):
    return (self.lin(self.emb.encode(ids)) @ self.w[...]) @ self.emb.table[...].T


def test_served_module_reading_a_childs_codes_gets_them_dequantized():
  # The served root's call read the child's int8 codes as if they were floats: 52x off.
  ids = jax.random.randint(jax.random.key(1), (3, 5), 0, V)
  model = qnnx.quantize(HeadReadsTable(nnx.Rngs(0)))
  qnnx.calibrate(model, [ids])
  y = model(ids)
  served = qnnx.convert(model, integer=False)
  assert served.emb.table[...].dtype == jnp.int8
  np.testing.assert_array_equal(served(ids), y)
  np.testing.assert_allclose(qnnx.convert(model)(ids), y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Calibrate/freeze compile once per distinct (spec, shape), not once per quantizer.
# ---------------------------------------------------------------------------


class Deep(nnx.Module):

  def __init__(self, n, width=D):
    rngs = nnx.Rngs(0)
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(n)])

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return x


def _count_compiles(fn):
  import logging  # pylint: disable=import-outside-toplevel
  names = []

  class Handler(logging.Handler):

    def emit(self, record):
      msg = record.getMessage()
      if msg.startswith("Compiling "):
        names.append(msg.split()[1])

  handler = Handler()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  old = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)
  try:
    fn()
  finally:
    jax.config.update("jax_log_compiles", old)
    logger.removeHandler(handler)
  return names


def test_calibrate_and_freeze_compile_once_per_spec_and_shape_on_24_layers():
  w = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
  a = QuantSpec(format="int8", symmetric=False, calibration="minmax", learning="lsq_plus")
  rules = [Rule(pattern=".*", weight=w.replace(learning="fixed"), act=a)]
  x = jax.random.normal(jax.random.key(0), (4, D))
  model = qnnx.quantize(Deep(24), rules)
  qnnx.calibrate(qnnx.quantize(Deep(1), rules), [x])  # warms the caches for this spec/shape
  calib = _count_compiles(lambda: qnnx.calibrate(model, [x]))
  frz = _count_compiles(lambda: qnnx.freeze(model))
  print(f"\ncompiles: calibrate {calib}, freeze {frz}")
  assert calib == ["jit(step)"]  # the forward pass; the ranges were compiled by the warm-up
  assert frz == ["jit(_weight_state)"]  # once for 24 quantizers of one (spec, shape)
  # A (spec, shape) seen for the first time compiles each function once, not 24 times.
  rules2 = [Rule(pattern=".*", weight=w.replace(format="int3"), act=a.replace(format="int3"))]
  x5 = jax.random.normal(jax.random.key(0), (4, 5))
  calib2 = _count_compiles(lambda: qnnx.calibrate(qnnx.quantize(Deep(24, 5), rules2), [x5]))
  assert calib2.count("jit(_weight_state)") == 1 and calib2.count("jit(_observer_state)") == 1


# ---------------------------------------------------------------------------
# Shapes of the jax-ml/bonsai model zoo: a lookup that reads an Embed's table
# directly (Qwen3), class token and position table of a ViT embedding layer.
# ---------------------------------------------------------------------------


class DirectLookup(nnx.Module):
  """Qwen3's ``self.embedder.embedding[...].at[ids].get()``: the Embed is never called."""

  def __init__(self, rngs):
    self.embedder = nnx.Embed(V, D, rngs=rngs)
    self.head = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, ids):
    return self.head(self.embedder.embedding[...].at[(ids,)].get())


class TiedByHand(nnx.Module):
  """Mamba2's tie: the Embed looks up, and its table is read again for the head."""

  def __init__(self, rngs):
    self.embedder = nnx.Embed(V, D, rngs=rngs)
    self.mix = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, ids):
    return self.mix(self.embedder(ids)) @ self.embedder.embedding[:].T


class PatchEmbed(nnx.Module):
  """A ViT embedding layer: class token (1, 1, D), position table (1, N, D), a Linear."""

  def __init__(self, rngs):
    self.proj = nnx.Linear(6, D, rngs=rngs)
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, D)))
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 5, D)))

  def __call__(self, x):
    h = self.proj(x)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, D))
    return jnp.concatenate([cls, h], axis=1) + self.pos[...]


@pytest.mark.parametrize("weight", [QuantSpec(), QuantSpec(format="int4", learning="lsq")])
def test_layer_read_directly_and_never_called_stays_float(weight):
  ids = jax.random.randint(jax.random.key(1), (3, 5), 0, V)
  model = qnnx.quantize(DirectLookup(nnx.Rngs(0)), [Rule(pattern=".*", weight=weight,
                                                         act=core.default_act_spec())])
  qnnx.calibrate(model, [ids])
  r = qnnx.report(model)
  assert r["embedder"].status == "unsupported" and "never called" in r["embedder"].reason
  with warnings.catch_warnings():
    warnings.simplefilter("error", core.QuantizationWarning)
    served = qnnx.convert(model, integer=False)
  # The served lookup reads the float table, as the fake-quant model did (W4: 30% off before).
  np.testing.assert_array_equal(served(ids), model(ids))
  np.testing.assert_array_equal(served.embedder.embedding[...], model.embedder.embedding[...])
  assert served.head.kernel.values[...].dtype == jnp.int8


def test_served_weight_also_read_directly_is_dequantized_with_a_warning():
  ids = jax.random.randint(jax.random.key(1), (3, 5), 0, V)
  model = qnnx.quantize(TiedByHand(nnx.Rngs(0)))
  qnnx.calibrate(model, [ids])
  y = model(ids)  # fake quant: the lookup is quantized, the tie read the float table
  with pytest.warns(core.QuantizationWarning, match="read directly by a module other than"):
    served = qnnx.convert(model, integer=False)
    ys = served(ids)
  table = core.dequantize(served.embedder.embedding.qtensor())
  np.testing.assert_allclose(ys, served.mix(table[ids]) @ table.T, rtol=1e-6, atol=1e-6)
  assert 0 < float(jnp.abs(ys - y).max()) < 0.05 * float(jnp.abs(y).max())


class TinyViT(nnx.Module):
  """The embedding layer (intercepted: it has weights of its own) and a head."""

  def __init__(self, rngs):
    self.embed = PatchEmbed(rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.embed(x))


def test_class_token_and_position_table_stay_float_without_a_warning():
  x = jax.random.normal(jax.random.key(1), (3, 4, 6))
  model = TinyViT(nnx.Rngs(0))
  y_float = model(x)
  with warnings.catch_warnings():
    warnings.simplefilter("error", core.QuantizationWarning)
    qnnx.quantize(model)
    qnnx.calibrate(model, [x])
  r = qnnx.report(model)
  floats = {w.name: w.reason for w in r.float_weights()}
  assert "fed no matmul" in floats["cls_token"] and "fed no matmul" in floats["pos"]
  # The projection runs inside the intercepted layer (on a traced copy): it ran.
  assert {"embed/proj", "head"} <= {l.path for l in r.layers if l.status == "quantized"}
  y = model(x)
  assert 0 < float(jnp.abs(y - y_float).max()) < 0.05 * float(jnp.abs(y_float).max())
  # The fake-quant call adds the float tables; so does the served model (it quantized
  # them before, 0.9% of the output off).
  np.testing.assert_array_equal(qnnx.convert(model, integer=False)(x), y)
  served = qnnx.convert(model)  # the integer matmul of proj: float rounding only
  np.testing.assert_allclose(served(x), y, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(served.embed.cls_token[...], model.embed.cls_token[...])
  assert served.embed.proj.kernel.values[...].dtype == jnp.int8


# ---------------------------------------------------------------------------
# bonsai's SAM 2: legacy graph-mode modules (``pytree=False``) holding their
# blocks in plain lists, and a position encoding whose weight is used by two
# methods (``__call__`` and ``forward_with_coords``).
# ---------------------------------------------------------------------------


def _legacy_net(pytree: bool):
  """One architecture, as a pytree Module (``nnx.List``) or a legacy one (a plain list)."""

  class Block(nnx.Module, pytree=pytree):

    def __init__(self, rngs):
      self.lin = nnx.Linear(D, D, rngs=rngs)
      self.norm = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, x):
      return self.norm(nnx.relu(self.lin(x)))

  class Net(nnx.Module, pytree=pytree):
    """Intercepted (its own weight ``w``), with quantized layers in a list."""

    def __init__(self, rngs):
      self.stem = nnx.Conv(3, D, (3, 3), rngs=rngs)
      self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)) / np.sqrt(D))
      blocks = [Block(rngs), Block(rngs)]
      self.blocks = nnx.List(blocks) if pytree else blocks

    def __call__(self, x):
      h = self.stem(x)
      for b in self.blocks:
        h = b(h)
      return (h @ self.w[...]).mean(axis=(1, 2))

  return Net(nnx.Rngs(0))


def _qat_and_serve(model, x, y):
  qnnx.quantize(model, _w4a8_lsq())
  qnnx.calibrate(model, [x])
  opt = nnx.Optimizer(model, qnnx.qat_optimizer(model, optax.adam(1e-2), optax.adam(1e-2)),
                      wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    def loss_fn(m):
      return optax.softmax_cross_entropy(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    with jax.numpy_dtype_promotion("standard"):  # optax's step count
      opt.update(m, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(3)]
  served = qnnx.convert(model, integer=False)
  rows = [(l.path, l.status, l.reason) for l in qnnx.report(model).layers]
  return losses, model(x), served(x), rows


def test_legacy_graph_mode_module_with_plain_lists_trains_and_serves_as_its_pytree_twin():
  # calibrate raised TraceContextError: the intercepted class was a pytree Module, which
  # took the attributes a legacy instance had set before the swap for static ones.
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  y = jax.nn.one_hot(jnp.arange(4) % D, D)
  twin = _qat_and_serve(_legacy_net(True), x, y)
  legacy = _qat_and_serve(_legacy_net(False), x, y)
  assert legacy[0] == twin[0] and twin[0][-1] < twin[0][0]
  np.testing.assert_array_equal(legacy[1], twin[1])
  np.testing.assert_array_equal(legacy[2], twin[2])
  np.testing.assert_array_equal(legacy[2], legacy[1])  # served = QAT
  assert legacy[3] == twin[3]
  assert {p for p, s, _ in legacy[3] if s == "quantized"} == {
      "", "stem", "blocks/0/lin", "blocks/1/lin"}


class RandomPosEnc(nnx.Module):
  """SAM 2's PositionEmbeddingRandom: one Gaussian matrix, a grid and a coordinate method."""

  def __init__(self, rngs):
    self.g = nnx.Param(jax.random.normal(rngs.params(), (2, D)))

  def encode(self, c):
    return jnp.sin(c @ self.g[...])

  def __call__(self, n):
    grid = jnp.stack(jnp.meshgrid(jnp.linspace(0, 1, n), jnp.linspace(0, 1, n)), -1)
    return self.encode(grid)

  def forward_with_coords(self, c):
    return self.encode(c / 3.0)

  def make_cache(self, n):
    return nnx.Variable(jnp.zeros((n, D)))  # not a forward pass: runs in float


class Prompt(nnx.Module):

  def __init__(self, rngs):
    self.pe = RandomPosEnc(rngs)
    self.lin = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, c):
    return self.lin(self.pe(4).mean((0, 1)) + self.pe.forward_with_coords(c))


def test_other_public_methods_of_an_intercepted_module_are_intercepted_too():
  c = jax.random.uniform(jax.random.key(1), (5, 2))
  model = qnnx.quantize(Prompt(nnx.Rngs(0)))
  qnnx.calibrate(model, [c])
  r = qnnx.report(model)["pe"]
  assert r.reason == "intercepted __call__; also encode, forward_with_coords, make_cache"
  g = model.pe.g[...]
  gq = model.pe.jaxqat_weight_quant["g"](g)
  assert float(jnp.abs(gq - g).max()) > 0
  aq = model.pe.jaxqat_input_quant["g"]
  # forward_with_coords multiplies by the fake-quantized matrix, as __call__ does
  # (it read the float matrix: the served model, which holds codes, was 2.05 off).
  np.testing.assert_allclose(model.pe.forward_with_coords(c), jnp.sin(aq(c / 3.0) @ gq),
                             rtol=1e-6, atol=1e-6)
  # encode called by __call__ runs inside __call__'s interception (quantized once).
  grid = jnp.stack(jnp.meshgrid(jnp.linspace(0, 1, 4), jnp.linspace(0, 1, 4)), -1)
  np.testing.assert_allclose(model.pe(4), jnp.sin(aq(grid) @ gq), rtol=1e-6, atol=1e-6)
  assert model.pe.make_cache(3)[...].shape == (3, D)
  served = qnnx.convert(model, integer=False)
  np.testing.assert_array_equal(served(c), model(c))
  np.testing.assert_array_equal(served.pe.forward_with_coords(c), model.pe.forward_with_coords(c))
  assert served.pe.g[...].dtype == jnp.int8


class _ScaledEmbed(nnx.Embed):
  """examples/gemma's ScaledEmbed, here untied: an Embed subclass with its own __call__."""

  def __call__(self, ids):
    return super().__call__(ids) * np.float32(np.sqrt(self.features))


class _UntiedLM(nnx.Module):
  def __init__(self, rngs):
    self.emb = _ScaledEmbed(V, D, rngs=rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, ids):
    return self.head(self.emb(ids))


def test_intercepted_lookup_quantizes_rows_as_the_embed_layer_and_linen_do():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jaxqat.flax import linen as ql  # pylint: disable=import-outside-toplevel
  rules = [Rule(pattern=".*", weight=QuantSpec(format="int4"), act=core.default_act_spec())]
  model = _UntiedLM(nnx.Rngs(0))
  table = model.emb.embedding[...]
  with warnings.catch_warnings():
    warnings.simplefilter("error", core.QuantizationWarning)
    qnnx.quantize(model, rules)
    qnnx.calibrate(model, [_IDS])
    served = qnnx.convert(model, integer=False)
  assert qnnx.report(model)["emb"].weights[0].quantized
  # The Embed layer's own quantized lookup: one int4 scale per row.
  plain = nnx.Embed(V, D, rngs=nnx.Rngs(0))
  plain.embedding[...] = table
  qnnx.quantize(plain, rules)
  want = plain(_IDS) * np.float32(np.sqrt(D))
  assert float(jnp.max(jnp.abs(want - table[_IDS] * np.float32(np.sqrt(D))))) > 1e-3
  np.testing.assert_array_equal(model.emb(_IDS), want)
  np.testing.assert_array_equal(served(_IDS), model(_IDS))
  assert served.emb.embedding[...].dtype == jnp.int8

  class LinenScaled(nn.Embed):
    def __call__(self, ids):
      return super().__call__(ids) * np.float32(np.sqrt(self.features))

  q = ql.quantize(LinenScaled(V, D), rules)
  v = q.init(jax.random.key(0), _IDS)
  v["params"]["embedding"] = table
  np.testing.assert_array_equal(q.apply(ql.calibrate(q, v, [_IDS]), _IDS), want)
