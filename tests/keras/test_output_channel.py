"""PerOutputChannel() weight specs in the Keras front end: per-layer axes, literal axes, saving."""

import os

import keras
import numpy as np
import pytest

from jaxqat.core import PerChannel, PerOutputChannel, PerTensor, QuantSpec, Rule
from jaxqat.core import default_rules, spec_from_dict, spec_to_dict
import jaxqat.keras as jqk
from jaxqat.keras._convert import copy_weights
from kutil import to_np

W8 = QuantSpec(format="int8", granularity=PerOutputChannel())

# name -> (float layer factory, input shape, input dtype,
#          {weight attr: (resolved granularity, scale shape, axes reduced for the absmax)})
CASES = {
    "dense": (lambda: keras.layers.Dense(5, name="l"), (2, 6), "float32",
              {"_kernel": (PerChannel(1), (1, 5), (0,))}),
    "einsum_heads": (lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3),
                                                      name="l"), (2, 3, 6), "float32",
                     {"_kernel": (PerChannel((1, 2)), (1, 2, 3), (0,))}),
    "einsum_no_output_axis": (lambda: keras.layers.EinsumDense("ab,b->a", output_shape=(),
                                                               name="l"), (2, 6), "float32",
                              {"_kernel": (PerTensor(), (), (0,))}),
    "conv2d": (lambda: keras.layers.Conv2D(4, 3, name="l"), (2, 6, 6, 3), "float32",
               {"_kernel": (PerChannel(3), (1, 1, 1, 4), (0, 1, 2))}),
    "depthwise2d": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="l"),
                    (2, 6, 6, 3), "float32",
                    {"kernel": (PerChannel((2, 3)), (1, 1, 3, 2), (0, 1))}),
    "separable2d": (lambda: keras.layers.SeparableConv2D(4, 3, name="l"), (2, 6, 6, 3), "float32",
                    {"depthwise_kernel": (PerChannel((2, 3)), (1, 1, 3, 1), (0, 1)),
                     "pointwise_kernel": (PerChannel(3), (1, 1, 1, 4), (0, 1, 2))}),
    "embedding": (lambda: keras.layers.Embedding(10, 4, name="l"), (2, 3), "int32",
                  {"_embeddings": (PerChannel(0), (10, 1), (1,))}),
}


def _quant_layer(name, weight_spec, seed=0):
  make, shape, dtype, _ = CASES[name]
  keras.utils.set_random_seed(seed)
  float_layer = make()
  float_layer.build(shape)
  qcls = jqk.quantized_class(type(float_layer))
  q = qcls.from_config({**float_layer.get_config(), "weight_spec": weight_spec})
  q.build(shape)
  copy_weights(float_layer, q)
  q.init_weight_ranges()
  return q


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_output_channel_resolves_per_layer(name):
  q = _quant_layer(name, W8)
  expected = CASES[name][3]
  assert set(q.weight_quantizers) == set(expected)
  assert q.weight_spec == W8  # the layer keeps what the user gave
  assert q.get_config()["weight_spec"]["granularity"] == {"type": "per_output_channel"}
  for attr, quantizer in q.weight_quantizers.items():
    granularity, scale_shape, reduce_axes = expected[attr]
    assert quantizer.spec == W8.replace(granularity=granularity)
    assert tuple(quantizer.scale.shape) == scale_shape
    # absmax over the contracted axes, / 127, one value per output channel.
    w = to_np(getattr(q, attr))
    ref = np.abs(w).max(axis=reduce_axes, keepdims=True) / 127
    np.testing.assert_allclose(to_np(quantizer.scale), ref.reshape(scale_shape), rtol=1e-6)


def test_literal_per_channel_minus_one_is_the_last_axis_on_a_depthwise_kernel():
  spec = QuantSpec(format="int8", granularity=PerChannel(-1))
  q = _quant_layer("depthwise2d", spec)
  quantizer = q.kernel_quantizer
  assert quantizer.spec.granularity == PerChannel(-1)
  assert tuple(quantizer.scale.shape) == (1, 1, 1, 2)  # one scale per depth multiplier
  k = to_np(q.kernel)  # (3, 3, 3, 2)
  np.testing.assert_allclose(to_np(quantizer.scale),
                             np.abs(k).max(axis=(0, 1, 2), keepdims=True) / 127, rtol=1e-6)
  # Embedding: PerChannel(-1) is one scale per embedding column, not per token.
  q = _quant_layer("embedding", spec)
  assert tuple(q.embeddings_quantizer.scale.shape) == (1, 4)


def _conv_bn(depthwise):
  keras.utils.set_random_seed(0)
  conv = (keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="c") if depthwise
          else keras.layers.Conv2D(4, 3, name="c"))
  bn = keras.layers.BatchNormalization(name="bn")
  x = np.random.RandomState(0).randn(2, 6, 6, 3).astype(np.float32)
  conv.build(x.shape)
  bn.build(conv.compute_output_shape(x.shape))
  rng = np.random.RandomState(1)
  for v in bn.weights:
    v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
  return conv, bn, x


@pytest.mark.parametrize("depthwise,granularity,scale_shape,reduce_axes", [
    (False, PerOutputChannel(), (1, 1, 1, 4), (0, 1, 2)),
    (True, PerOutputChannel(), (1, 1, 3, 2), (0, 1)),
    (True, PerChannel(-1), (1, 1, 1, 2), (0, 1, 2)),
])
def test_folded_conv_batchnorm_resolves_output_channels(depthwise, granularity, scale_shape,
                                                        reduce_axes):
  conv, bn, x = _conv_bn(depthwise)
  spec = QuantSpec(format="int4", granularity=granularity)
  fused = jqk.QuantConvBatchNorm(conv, bn, weight_spec=spec)
  fused.build(x.shape)
  fused.conv.set_weights(conv.get_weights())
  fused.bn.set_weights(bn.get_weights())
  fused.init_weight_ranges()
  q = fused.kernel_quantizer
  expected = {(False, (1, 1, 1, 4)): PerChannel(3), (True, (1, 1, 3, 2)): PerChannel((2, 3)),
              (True, (1, 1, 1, 2)): PerChannel(-1)}[(depthwise, scale_shape)]
  assert q.spec.granularity == expected
  assert fused.weight_spec == spec
  assert tuple(q.scale.shape) == scale_shape
  w_fold = to_np(fused.folded_kernel())
  np.testing.assert_allclose(to_np(q.scale), np.abs(w_fold).max(reduce_axes, keepdims=True) / 7,
                             rtol=1e-6)


def test_spec_config_round_trip_keeps_per_output_channel():
  spec = QuantSpec(format="int4", granularity=PerOutputChannel(), symmetric=False)
  config = spec_to_dict(spec)
  assert config["granularity"] == {"type": "per_output_channel"}
  assert spec_from_dict(config) == spec
  q = _quant_layer("depthwise2d", spec)
  clone = type(q).from_config(q.get_config())
  assert clone.get_config() == q.get_config() and clone.weight_spec == spec
  # The weight quantizer's own config holds the resolved axes.
  assert q.kernel_quantizer.get_config()["spec"]["granularity"] == {"type": "per_channel",
                                                                    "axis": [2, 3]}
  with pytest.raises(ValueError, match="per_row"):
    spec_from_dict({**config, "granularity": {"type": "per_row"}})


def _model():
  keras.utils.set_random_seed(0)
  return keras.Sequential([
      keras.Input((6, 6, 3)),
      keras.layers.Conv2D(4, 3, use_bias=False, name="c1"),
      keras.layers.BatchNormalization(name="bn1"),  # folded into c1
      keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw"),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.EinsumDense("ab,bc->ac", output_shape=3, name="proj")])


def _default_weight_spec():
  (rule,) = default_rules()
  assert rule.weight.granularity == PerOutputChannel()
  return rule.weight


def test_keras_file_round_trip_with_per_output_channel(tmp_path):
  x = np.random.RandomState(0).randn(8, 6, 6, 3).astype(np.float32)
  q = jqk.quantize(_model())  # default_rules(): PerOutputChannel() weights
  assert [type(l).__name__ for l in q.layers] == ["QuantConvBatchNorm", "QuantDepthwiseConv2D",
                                                  "GlobalAveragePooling2D", "QuantEinsumDense"]
  folded = jqk.report(q)["c1"]
  assert (folded.status, folded.layer_type) == ("quantized", "Conv2D+BatchNormalization")
  assert [(w.name, w.quantized) for w in folded.weights] == [
      ("kernel", True), ("gamma", False), ("beta", False), ("moving_mean", False),
      ("moving_variance", False)]
  assert folded.weights[1].reason == "folded into the kernel and bias with bn1"
  for quantizer in jqk.quantizers(q):
    if quantizer.role == "act":
      quantizer.set_range(np.float32(0.05))  # cheaper than calibrate; any fixed range will do
  out = to_np(q.predict(x, verbose=0))
  path = os.path.join(tmp_path, "q.keras")
  q.save(path)
  r = keras.saving.load_model(path)
  np.testing.assert_array_equal(to_np(r.predict(x, verbose=0)), out)
  expected = {"c1": (PerChannel(3), (1, 1, 1, 4)), "dw": (PerChannel((2, 3)), (1, 1, 4, 2)),
              "proj": (PerChannel(1), (1, 3))}
  for name, (granularity, shape) in expected.items():
    saved, loaded = q.get_layer(name), r.get_layer(name)
    assert loaded.weight_spec == saved.weight_spec == _default_weight_spec(), name
    assert loaded.kernel_quantizer.spec.granularity == granularity, name
    assert tuple(loaded.kernel_quantizer.scale.shape) == shape, name
    np.testing.assert_array_equal(to_np(loaded.kernel_quantizer.scale),
                                  to_np(saved.kernel_quantizer.scale))


def test_activation_spec_with_per_output_channel_is_a_clear_error():
  bad = QuantSpec(granularity=PerOutputChannel())
  with pytest.raises(ValueError, match=r"QuantDense 'x': act_spec has granularity "
                                       r"PerOutputChannel\(\), a weight granularity"):
    jqk.QuantDense(3, name="x", act_spec=bad)
  with pytest.raises(ValueError, match=r"QuantConvBatchNorm 'c': act_spec has granularity "
                                       r"PerOutputChannel\(\)"):
    jqk.QuantConvBatchNorm(keras.layers.Conv2D(4, 3, name="c"),
                           keras.layers.BatchNormalization(), act_spec=bad)
  with pytest.raises(ValueError, match=r"Quantizer q: spec has granularity PerOutputChannel\(\), "
                                       "a weight granularity"):
    jqk.Quantizer(bad, role="act", name="q")
  with pytest.raises(ValueError, match=r"Quantizer w: spec has granularity PerOutputChannel\(\), "
                                       "which the quantized layer that owns the weight resolves"):
    jqk.Quantizer(bad, role="weight", name="w")
  with pytest.raises(ValueError, match=r"Rule.act: PerOutputChannel\(\) is a weight granularity"):
    Rule(pattern=".*", weight=W8, act=bad)  # so quantize never sees one
