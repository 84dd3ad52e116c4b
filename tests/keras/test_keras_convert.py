"""quantize: Sequential, Functional, subclassed and nested models; rules; bad input."""

import warnings

import keras
import numpy as np
import pytest

from jaxqat.core import PerChannel, QuantSpec, Rule, QuantizationWarning
import jaxqat.keras as jqk
from kutil import ReversibleEmbedding, to_np


def _seq():
  keras.utils.set_random_seed(0)
  return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="d1"),
                           keras.layers.Dense(3, name="d2")], name="seq")


def test_sequential_is_cloned_with_float_weights():
  model = _seq()
  q = jqk.quantize(model)
  assert [type(l).__name__ for l in q.layers] == ["QuantDense", "QuantDense"]
  assert [type(l).__name__ for l in model.layers] == ["Dense", "Dense"]  # original untouched
  np.testing.assert_array_equal(to_np(q.layers[0].kernel), to_np(model.layers[0].kernel))
  d1 = q.get_layer("d1")
  assert d1.kernel_quantizer.spec.granularity == PerChannel(1)
  assert d1.kernel_quantizer.scale.shape == (1, 8)
  assert d1.input_quantizer.spec.format.name == "int8"
  # Weight ranges come from the float kernel (absmax / 127 per output channel).
  np.testing.assert_allclose(to_np(d1.kernel_quantizer.scale)[0],
                             np.abs(to_np(model.layers[0].kernel)).max(0) / 127, rtol=1e-6)


def test_rules_select_skip_and_set_specs():
  model = _seq()
  w4 = QuantSpec(format="int4", granularity=PerChannel(-1))
  rules = [Rule(pattern="d2", skip=True), Rule(pattern="d.*", weight=w4, act=None)]
  q = jqk.quantize(model, rules)
  assert type(q.get_layer("d2")) is keras.layers.Dense
  d1 = q.get_layer("d1")
  assert d1.input_quantizer is None and d1.kernel_quantizer.spec.format.name == "int4"


def test_rule_that_matches_nothing_warns():
  with pytest.warns(QuantizationWarning, match="'encoder/.*' matched no layer"):
    jqk.quantize(_seq(), [Rule(pattern="encoder/.*", weight=QuantSpec()),
                                Rule(pattern=".*", weight=QuantSpec())])


class _OwnMatmul(keras.layers.Layer):
  """A user's layer with its own kernel and call: jaxqat has no quantized version of it."""

  def build(self, input_shape):
    self.kernel = self.add_weight(shape=(input_shape[-1], 3), name="kernel")

  def call(self, x):
    return keras.ops.matmul(x, self.kernel)


def test_unsupported_layer_is_left_float_and_named():
  keras.utils.set_random_seed(0)
  inp = keras.Input((4,))
  x = _OwnMatmul(name="my_up")(inp)
  x = keras.layers.Dense(2, name="head")(x)
  model = keras.Model(inp, x)
  with pytest.warns(QuantizationWarning, match=r"my_up \(_OwnMatmul: _OwnMatmul has "
                                          r"no quantized version\)"):
    q = jqk.quantize(model)
  assert type(q.get_layer("my_up")) is _OwnMatmul
  assert type(q.get_layer("head")) is jqk.QuantDense
  rep = jqk.report(q)
  assert rep["my_up"].status == "unsupported"
  assert {w.name for w in rep["my_up"].weights} == {
      v.name for v in model.get_layer("my_up").weights}


def test_bad_inputs_are_clear_errors():
  with pytest.raises(TypeError, match="model: expected a keras.Model"):
    jqk.quantize(keras.layers.Dense(3))
  unbuilt = keras.Sequential([keras.layers.Dense(3)], name="lazy")
  with pytest.raises(ValueError, match="'lazy' is not built"):
    jqk.quantize(unbuilt)
  with pytest.raises(TypeError, match="rules"):
    jqk.quantize(_seq(), ["not a rule"])


class ScaledDense(keras.layers.Dense):

  def call(self, inputs, training=None):
    return super().call(inputs) * 0.5


class Block(keras.layers.Layer):
  """A layer holding sublayers: attention plus a list of Dense layers."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.attn = keras.layers.MultiHeadAttention(2, 4, name="mha")
    self.ffn = [keras.layers.Dense(8, activation="relu", name="ffn_in"),
                keras.layers.Dense(8, name="ffn_out")]
    self.norm = keras.layers.LayerNormalization(name="ln")

  def call(self, x):
    x = self.norm(x + self.attn(x, x))
    h = x
    for layer in self.ffn:
      h = layer(h)
    return x + h


def _transformer():
  keras.utils.set_random_seed(0)
  ids = keras.Input((5,), dtype="int32")
  emb = ReversibleEmbedding(20, 8, name="tok")
  x = emb(ids)
  x = Block(name="block")(x)
  x = ScaledDense(8, name="scaled")(x)
  logits = emb(x, reverse=True)
  return keras.Model(ids, logits)


def test_transformer_like_model_with_nested_layers_and_subclasses_converts():
  model = _transformer()
  ids = np.random.RandomState(0).randint(0, 20, (4, 5)).astype("int32")
  ref = to_np(model(ids))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q = jqk.quantize(model)
  paths = {l.path for l in jqk.quant_layers(q)}
  assert type(q.get_layer("tok")).__name__ == "QuantReversibleEmbedding"
  assert type(q.get_layer("scaled")).__name__ == "QuantScaledDense"
  block = q.get_layer("block")
  assert type(block.attn._query_dense).__name__ == "QuantEinsumDense"
  assert type(block.attn._output_dense).__name__ == "QuantEinsumDense"
  assert all(type(l).__name__ == "QuantDense" for l in block.ffn)
  assert len(jqk.quant_layers(q)) == 8, paths  # tok, scaled, 4 attention projections, 2 ffn
  assert not [w for w in caught if issubclass(w.category, QuantizationWarning)]
  jqk.calibrate(q, [ids], verbose=0)
  out = to_np(q(ids))
  # int8 everywhere: close to float, not equal.
  assert 0 < np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
  n_float = len(model.trainable_weights)
  assert len(q.trainable_weights) == n_float  # fixed ranges: no new trainable weights
  q2 = jqk.quantize(_transformer(), [Rule(pattern="block/mha/.*", skip=True),
                                           Rule(pattern=".*", weight=QuantSpec(learning="lsq"))])
  assert type(q2.get_layer("block").attn._query_dense) is keras.layers.EinsumDense
  assert len(q2.trainable_weights) == n_float + 4  # LSQ step sizes: tok, scaled, ffn x2


class Subclassed(keras.Model):

  def __init__(self):
    super().__init__()
    self.conv = keras.layers.Conv2D(4, 3, name="conv")
    self.pool = keras.layers.GlobalAveragePooling2D()
    self.head = keras.layers.Dense(2, name="head")

  def call(self, x):
    return self.head(self.pool(self.conv(x)))


def test_subclassed_model_is_converted_in_place():
  keras.utils.set_random_seed(0)
  model = Subclassed()
  x = np.random.RandomState(0).randn(2, 6, 6, 3).astype("float32")
  ref = to_np(model(x))
  q = jqk.quantize(model)
  assert q is model
  assert type(model.conv) is jqk.QuantConv2D and type(model.head) is jqk.QuantDense
  assert len(model.layers) == 3  # the float layers are no longer tracked
  jqk.calibrate(q, x, verbose=0)
  out = to_np(q(x))
  assert 0 < np.abs(out - ref).max() < 0.02 * max(1.0, np.abs(ref).max())


def test_nested_functional_and_sequential_models_convert():
  keras.utils.set_random_seed(0)
  inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, name="inner_dense")],
                           name="inner")
  inp = keras.Input((6,))
  out = keras.layers.Dense(2, name="outer_dense")(inner(inp))
  model = keras.Model(inp, out)
  seen = []
  q = jqk.quantize(model, [Rule(pattern="inner/.*", weight=QuantSpec(format="int4")),
                                 Rule(pattern=".*", weight=QuantSpec())])
  for layer in jqk.quant_layers(q):
    seen.append((layer.name, layer.weight_spec.format.name))
  assert sorted(seen) == [("inner_dense", "int4"), ("outer_dense", "int8")]
