"""keras.applications MobileNetV2: convert, calibrate, exact .keras round trip.

MobileNetV2 covers depthwise and pointwise Conv+BN folding (every BatchNorm
folded) and residual adds on a published model. (ResNet50 was checked the same
way before; it added minutes of CPU compilation and no new layer pattern.)
"""

import os

import keras
import numpy as np
import pytest

import jaxqat.keras as jqk

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs on the JAX backend")]


def _check(model, tmp_path, expect_depthwise):
  n_bn = sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)
  n_conv = sum(type(l) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
               for l in model.layers)
  q = jqk.quantize(model)
  fused = [l for l in q.layers if isinstance(l, jqk.QuantConvBatchNorm)]
  assert len(fused) == n_bn  # every BatchNorm follows its conv: all folded
  assert not any(isinstance(l, keras.layers.BatchNormalization) for l in q.layers)
  assert any(l.depthwise for l in fused) == expect_depthwise
  assert len(jqk.quant_layers(q)) == n_conv + 1  # convs (folded or not) + the classifier
  assert any(isinstance(l, keras.layers.Add) for l in q.layers)  # residual adds kept
  rng = np.random.RandomState(0)
  x = rng.rand(4, 32, 32, 3).astype(np.float32)
  jqk.calibrate(q, x, batch_size=4)  # one batch: activation ranges
  assert all(l.input_quantizer.calibrated for l in fused)
  rep = jqk.report(q)
  assert len(rep.quantized_paths()) == n_conv + 1 and not rep.paths("unsupported")
  out = q.predict(x, verbose=0)
  assert np.all(np.isfinite(out))
  path = os.path.join(tmp_path, "m.keras")
  jqk.save(path, q)
  r = jqk.restore(path)
  np.testing.assert_array_equal(r.predict(x, verbose=0), out)


def test_mobilenet_v2(tmp_path):
  # Conversion, calibration, inference and the exact .keras round trip. The jitted training
  # step through folded depthwise convolutions is covered, at a fraction of the compile time,
  # by tests/keras/test_keras_deep.py (squeeze-excite, swish, 12+ folded Conv+BN).
  keras.utils.set_random_seed(0)
  model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                         classes=10)
  _check(model, tmp_path, expect_depthwise=True)
