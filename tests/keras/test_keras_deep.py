"""Issue 14.4: an EfficientNet-style network trains W4A8 LSQ without NaN (any backend).

Squeeze-excite blocks, swish, depthwise convolutions and 12 Conv+BatchNorm
pairs that the converter folds, random weights, activations calibrated on
near-zero inputs (the case that gave step sizes of 1e-8 and NaN at step 3).
The torch run is test_keras_backends.py's subprocess over this folder.
"""

import keras
import numpy as np

from jaxqat.core import PerOutputChannel, QuantSpec, Rule
import jaxqat.keras as jqk
from kutil import BACKEND, to_np


def _conv_bn(x, filters, kernel, name, strides=1, act=True, depthwise=False):
  if depthwise:
    x = keras.layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False,
                                     name=f"{name}_dw")(x)
  else:
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
  x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
  return keras.layers.Activation("swish")(x) if act else x


def _mbconv(x, filters, expand, strides, name):
  c = x.shape[-1]
  h = _conv_bn(x, c * expand, 1, f"{name}_expand") if expand > 1 else x
  h = _conv_bn(h, None, 3, f"{name}_dw", strides=strides, depthwise=True)
  se = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)  # squeeze-excite
  se = keras.layers.Conv2D(max(1, c // 4), 1, activation="swish", name=f"{name}_se_reduce")(se)
  se = keras.layers.Conv2D(h.shape[-1], 1, activation="sigmoid", name=f"{name}_se_expand")(se)
  h = keras.layers.Multiply()([h, se])
  h = _conv_bn(h, filters, 1, f"{name}_project", act=False)
  return keras.layers.Add()([x, h]) if strides == 1 and c == filters else h


def efficientnet_like(seed=0):
  keras.utils.set_random_seed(seed)
  # 16x16 inputs and one width (8 channels, 16 expanded): the same 12 folded pairs, SE and
  # residual adds, with few distinct shapes (each new shape costs eager compiles in build,
  # quantize and calibrate).
  inp = keras.Input((16, 16, 3))
  x = _conv_bn(inp, 8, 3, "stem", strides=2)
  for i, (filters, expand, strides) in enumerate([(8, 1, 1), (8, 2, 2), (8, 2, 1),
                                                  (8, 2, 2)]):
    x = _mbconv(x, filters, expand, strides, f"block{i}")
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inp, keras.layers.Dense(10, name="head")(x))


W4A8_LSQ = [Rule(pattern=".*",
                 weight=QuantSpec(format="int4", granularity=PerOutputChannel(), learning="lsq"),
                 act=QuantSpec(format="int8", symmetric=False, learning="lsq_plus"))]


def test_efficientnet_like_w4a8_lsq_trains_10_steps_without_nan():
  model = efficientnet_like()
  q = jqk.quantize(model, W4A8_LSQ)
  folded = [l for l in jqk.quant_layers(q) if isinstance(l, jqk.QuantConvBatchNorm)]
  assert len(folded) >= 12, len(folded)
  rng = np.random.RandomState(0)
  jqk.calibrate(q, (1e-6 * rng.randn(16, 16, 16, 3)).astype(np.float32), batch_size=8)
  steps = [to_np(l.input_quantizer.step_size()) for l in jqk.quant_layers(q)
           if l.input_quantizer is not None]
  assert min(float(s.min()) for s in steps) >= 0.999e-6  # floored at 1e-6, not 1e-8
  x = rng.randn(80, 16, 16, 3).astype(np.float32)
  y = rng.randint(0, 10, 80)
  q.compile(optimizer=jqk.qat_optimizer(q, keras.optimizers.Adam(1e-3),
                                        keras.optimizers.Adam(1e-2)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=BACKEND == "jax")
  hist = q.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[jqk.CheckFinite()])
  assert q.optimizer.iterations.numpy() == 10
  assert np.all(np.isfinite(hist.history["loss"]))
  for v in q.weights:
    assert np.all(np.isfinite(to_np(v))), v.path
  for quantizer in jqk.quantizers(q):
    if quantizer.learned:
      assert float(to_np(quantizer.step_size()).min()) > 0, quantizer.where
  assert np.all(np.isfinite(to_np(q.predict(x[:8], verbose=0))))
