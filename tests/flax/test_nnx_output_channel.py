"""PerOutputChannel weight specs in the NNX front end: resolved per layer, same as Linen."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxqat import core
from jaxqat.core import IntFormat
from jaxqat.core import PerChannel
from jaxqat.core import PerOutputChannel
from jaxqat.core import PerTensor
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import linen as ql
from jaxqat.flax import nnx as qnnx
from jaxqat.flax.nnx import _intercept

W4 = QuantSpec(format=IntFormat(bits=4, narrow=True), granularity=PerOutputChannel())
A8 = QuantSpec(format="int8", symmetric=False, calibration="minmax")


def _r():
  return nnx.Rngs(0)


def _init(key, shape, dtype=jnp.float32):
  """A NumPy normal initializer: no jax.random compilation per shape (keeps tests fast)."""
  del key
  w = np.random.RandomState(sum(shape)).standard_normal(shape) / np.sqrt(shape[0])
  return jnp.asarray(w, dtype)


def _b(**kw):  # layer keyword arguments: NumPy weights
  return dict(kernel_init=_init, rngs=_r(), **kw)


def _x(key, shape):
  return jax.random.normal(jax.random.key(key), shape)


# name -> (float layer factory, example input, resolved axes, weight scale shape)
LAYERS = {
    "linear": (lambda: nnx.Linear(6, 5, **_b()), _x(1, (3, 6)), -1, (1, 5)),
    "conv2d": (lambda: nnx.Conv(3, 4, (3, 3), **_b()), _x(2, (2, 5, 5, 3)), -1, (1, 1, 1, 4)),
    "conv_grouped": (lambda: nnx.Conv(4, 6, (3,), feature_group_count=2, **_b()),
                     _x(3, (2, 7, 4)), -1, (1, 1, 6)),
    "conv_depthwise": (lambda: nnx.Conv(4, 4, (3, 3), feature_group_count=4, **_b()),
                       _x(4, (2, 5, 5, 4)), -1, (1, 1, 1, 4)),
    "linear_general": (lambda: nnx.LinearGeneral(6, (2, 3), **_b()), _x(5, (3, 6)),
                       (-2, -1), (1, 2, 3)),
    "linear_general_batch": (
        lambda: nnx.LinearGeneral(6, (2, 3), batch_axis={0: 4}, **_b()), _x(6, (4, 6)),
        (0, -2, -1), (4, 1, 2, 3)),
    "einsum": (lambda: nnx.Einsum("nta,hab->nthb", (8, 2, 4), (8, 4), **_b()),
               _x(7, (3, 5, 2)), (0, 2), (8, 1, 4)),
    "einsum_ellipsis_kept": (lambda: nnx.Einsum("...i,...io->...o", (3, 6, 4), **_b()),
                             _x(8, (3, 6)), (0, 2), (3, 1, 4)),
    "einsum_ellipsis_summed": (lambda: nnx.Einsum("...i,...io->o", (3, 6, 4), **_b()),
                               _x(9, (3, 6)), 2, (1, 1, 4)),
    "embed": (lambda: nnx.Embed(10, 4, embedding_init=_init, rngs=_r()),
              jnp.array([[0, 3, 9], [3, 3, 1]]), 0, (10, 1)),
}


def _weight(layer):
  return layer.embedding if isinstance(layer, nnx.Embed) else layer.kernel


# The numerics are checked on a subset (compilation per shape dominates the test time).
NUMERICS = ("conv_depthwise", "einsum", "einsum_ellipsis_kept", "embed", "linear",
            "linear_general_batch")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_resolved_axes_and_output_equals_core_by_hand(name):
  make, x, axes, scale_shape = LAYERS[name]
  layer = qnnx.quantize(make(), Rule(pattern=".*", weight=W4))
  # The quantizer, the report and (through it) the checkpoint hold the resolved axes.
  wq = layer.embedding_quant if isinstance(layer, nnx.Embed) else layer.kernel_quant
  assert wq.spec.granularity == PerChannel(axes)
  assert wq.scale.shape == scale_shape
  specs = {w.name: w.spec for w in qnnx.report(layer)[""].weights}
  assert specs["embedding" if name == "embed" else "kernel"] == wq.spec
  if name not in NUMERICS:
    return
  # Same output as the float layer run on the weight fake-quantized by hand.
  qnnx.freeze(layer)
  spec = W4.replace(granularity=PerChannel(axes))
  ref = make()
  y_float = ref(x)
  w = _weight(ref)[...]
  scale, zp = core.calibrate(spec, [w])
  assert scale.shape == scale_shape
  _weight(ref)[...] = core.quant_dequant(w, spec, scale, zp)
  y, y_ref = layer(x), ref(x)
  assert float(jnp.abs(y_ref - y_float).max()) > 1e-3  # quantization did something
  np.testing.assert_allclose(y, y_ref, atol=1e-6, rtol=0)


def test_stacked_einsum_axes_exclude_stack_axes():

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return nnx.Einsum("nta,hab->nthb", (8, 2, 4), kernel_init=_init, rngs=rngs)

  q = qnnx.quantize(make(nnx.Rngs(0)), Rule(pattern=".*", weight=W4))
  assert q.kernel_quant.spec.granularity == PerChannel((0, 2))
  assert q.kernel_quant.scale.shape == (3, 8, 1, 4)


def test_direct_construction_resolves():
  layer = qnnx.QuantEinsum("bi,hio->bho", (2, 6, 4), weight_spec=W4, **_b())
  assert layer.kernel_quant.spec.granularity == PerChannel((0, 2))
  # No kernel axis in the output: PerTensor.
  layer = qnnx.QuantEinsum("bi,ij->b", (6, 2), weight_spec=W4, **_b())
  assert layer.kernel_quant.spec.granularity == PerTensor()
  assert layer.kernel_quant.scale.shape == ()


def test_einsum_without_equation_names_the_layer():
  model = nnx.Dict(proj=nnx.Einsum("bi,io->bo", (6, 4), **_b()))
  model["proj"].einsum_str = None  # given at call time instead (allowed by Flax)
  with pytest.raises(ValueError, match="QuantEinsum 'proj'.*einsum_str"):
    qnnx.quantize(model, Rule(pattern=".*", weight=W4))
  assert type(model["proj"]) is nnx.Einsum  # left untouched


def test_intercepted_module_resolves_per_op():

  class Proj(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(_x(0, (4, 5)))

    def __call__(self, x):
      return x @ self.w[...]

  m = qnnx.quantize(Proj(), Rule(pattern=".*", weight=W4))
  wq = m.jaxqat_weight_quant["w"]
  assert wq.spec.granularity == PerChannel(-1) and wq.scale.shape == (1, 5)
  assert qnnx.report(m)[""].weights[0].spec == wq.spec


class HeadsProj(nnx.Module):
  """An attention projection written with einsum on a (D, heads, head_dim) kernel."""

  def __init__(self):
    self.w = nnx.Param(_x(0, (6, 2, 3)))

  def __call__(self, x):
    return jnp.einsum("btd,dhk->bthk", x, self.w[...])


def test_intercepted_einsum_kernel_gets_one_scale_per_head_and_head_dim():
  m = qnnx.quantize(HeadsProj(), Rule(pattern=".*", weight=W4))
  x = _x(1, (2, 4, 6))
  w = m.w[...]
  spec = W4.replace(granularity=PerChannel((1, 2)))
  s = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 7  # one scale per (head, head_dim)
  ref = jnp.einsum("btd,dhk->bthk", x, core.fake_quant(w, s, None, spec))
  np.testing.assert_allclose(m(x), ref, rtol=0, atol=1e-6)  # tracking range: per op at once
  qnnx.calibrate(m, [x])  # makes the stored state per (head, head_dim)
  wq = m.jaxqat_weight_quant["w"]
  assert wq.spec.granularity == PerChannel((-2, -1)) and wq.scale.shape == (1, 2, 3)
  qnnx.freeze(m)
  np.testing.assert_allclose(wq.scale[...], s, rtol=1e-6)
  np.testing.assert_allclose(m(x), ref, rtol=0, atol=1e-6)


def test_intercepted_einsum_lsq_kernel_is_resolved_by_calibrate():
  m = qnnx.quantize(HeadsProj(), Rule(pattern=".*", weight=W4.replace(learning="lsq")))
  x = _x(1, (2, 4, 6))
  with pytest.raises(ValueError, match=r"weight 'w' is used by an op whose output channels are "
                     r"its axes \(-2, -1\).*calibrate"):
    m(x)
  qnnx.calibrate(m, [x])
  wq = m.jaxqat_weight_quant["w"]
  assert wq.log_scale.shape == (1, 2, 3)
  s = jnp.max(jnp.abs(m.w[...]), axis=0, keepdims=True) / 7
  np.testing.assert_allclose(core.param_to_step_size(wq.log_scale[...]), s, rtol=1e-5)
  assert m(x).shape == (2, 4, 2, 3)


def test_default_weight_spec_is_per_output_channel():
  spec = core.default_weight_spec()
  assert spec.granularity == PerOutputChannel()
  m = qnnx.quantize(nnx.Linear(3, 2, **_b()))
  assert m.kernel_quant.spec == spec.resolve_output_channel((-1,))


def test_activation_spec_per_output_channel_is_rejected():
  bad = A8.replace(granularity=PerOutputChannel())
  layer = nnx.Linear(3, 2, **_b())
  with pytest.raises(ValueError, match="layer 'fc': the activation spec has granularity "
                     "PerOutputChannel\\(\\), which is for weights only"):
    qnnx.QuantLinear.from_float(layer, W4, bad, path="fc")
  assert type(layer) is nnx.Linear and not hasattr(layer, "kernel_quant")  # left untouched
  with pytest.raises(ValueError, match="QuantConv: the activation spec has granularity "
                     "PerOutputChannel"):
    qnnx.QuantConv(2, 2, (3,), act_spec=bad, **_b())
  with pytest.raises(ValueError, match="Rule.act: PerOutputChannel"):  # rules reject it early
    Rule(pattern=".*", act=bad)
  with pytest.raises(ValueError, match="PerOutputChannel\\(\\), which is for weights only"):
    qnnx.ActQuant(bad)

  class Proj(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.ones((3, 2)))

    def __call__(self, x):
      return x @ self.w[...]

  p = Proj()
  with pytest.raises(ValueError, match="layer 'p': the activation spec has granularity "
                     "PerOutputChannel"):
    _intercept.intercept(p, [(("w",), p.w)], None, bad, path="p")


# ---------------------------------------------------------------------------
# Same outputs as the Linen front end.
# ---------------------------------------------------------------------------


class LinenEinsum(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Einsum((8, 2, 4), "nta,hab->nthb", name="proj")(x)


class LinenEmbed(nn.Module):

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(10, 6, name="emb")
    return emb.attend(jnp.tanh(emb(ids)))


class NNXEinsum(nnx.Module):

  def __init__(self):
    self.proj = nnx.Einsum("nta,hab->nthb", (8, 2, 4), (8, 4), **_b())

  def __call__(self, x):
    return self.proj(x)


class NNXEmbed(nnx.Module):

  def __init__(self):
    self.emb = nnx.Embed(10, 6, embedding_init=_init, rngs=_r())

  def __call__(self, ids):
    return self.emb.attend(jnp.tanh(self.emb(ids)))


CASES = {
    "einsum": (LinenEinsum, NNXEinsum, "proj", ("kernel", "bias"),
               lambda: _x(11, (3, 5, 2))),
    "embed": (LinenEmbed, NNXEmbed, "emb", ("embedding",),
              lambda: jnp.array([[0, 3, 9], [3, 7, 1]])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_nnx_and_linen_agree_per_output_channel(name):
  linen_cls, nnx_cls, layer, params, make_x = CASES[name]
  x = make_x()
  rules = [Rule(pattern=".*", weight=W4, act=A8)]
  qlinen = ql.quantize(linen_cls(), rules)
  v = qlinen.init(jax.random.key(0), x)
  v = ql.calibrate(qlinen, v, [x])

  model = nnx_cls()
  for p in params:  # copy the Linen weights
    getattr(getattr(model, layer), p)[...] = v["params"][layer][p]
  float_out = model(x)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    qnnx.quantize(model, rules)
  qnnx.calibrate(model, [x])
  wq = getattr(getattr(model, layer), f"{params[0]}_quant")
  want = (8, 1, 4) if name == "einsum" else (10, 1)
  assert wq.scale.shape == want
  y_linen, y_nnx = qlinen.apply(v, x), model(x)
  assert float(jnp.abs(y_linen - float_out).max()) > 1e-3  # quantization did something
  np.testing.assert_allclose(y_linen, y_nnx, atol=1e-6, rtol=0)


def test_intercepted_torch_layout_conv_gets_one_scale_per_output_feature():

  class TorchConv(nnx.Module):
    """A PyTorch-layout convolution: kernel (out, in, width), NCW activations."""

    def __init__(self):
      self.weight = nnx.Param(_x(3, (4, 3, 3)))

    def __call__(self, x):
      return jax.lax.conv_general_dilated(x, self.weight[...], (1,), "SAME",
                                          dimension_numbers=("NCW", "OIW", "NCW"))

  m = qnnx.quantize(TorchConv(), Rule(pattern=".*", weight=W4))
  x = _x(4, (2, 3, 7))
  w = m.weight[...]
  s = jnp.max(jnp.abs(w), axis=(1, 2), keepdims=True) / 7  # per output feature (axis 0)
  ref = jax.lax.conv_general_dilated(x, core.fake_quant(w, s, None, W4.replace(
      granularity=PerChannel(0))), (1,), "SAME", dimension_numbers=("NCW", "OIW", "NCW"))
  np.testing.assert_allclose(m(x), ref, rtol=0, atol=1e-5)
  qnnx.calibrate(m, [x])
  assert m.jaxqat_weight_quant["weight"].scale.shape == (4, 1, 1)
