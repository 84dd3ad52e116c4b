"""compute="integer" in Keras (JAX backend): int8 x int8 -> int32 forward, the fake path's STE."""

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxqat.core import PerOutputChannel, QuantSpec, Rule, integer_error_bound
from jaxqat.core import _integer
from jaxqat.core import quantize as core_quantize
import jaxqat.keras as jqk
from jaxqat.keras import _layers
from kutil import BACKEND, assert_close

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="the integer forward runs on JAX")

W8 = QuantSpec(format="int8_narrow", granularity=PerOutputChannel())
A8_LSQ = QuantSpec(format="int8", learning="lsq")
A8 = QuantSpec(format="uint8", symmetric=False)


def _layer(make, shape, act=A8_LSQ, seed=0):
  """A quantized layer (compute="integer"), its input, and a cotangent."""
  keras.utils.set_random_seed(seed)
  float_layer = make()
  rng = np.random.RandomState(seed)
  x = np.abs(rng.randn(*shape)).astype(np.float32) if act is A8 else rng.randn(*shape).astype(
      np.float32)
  float_layer(x)
  q = _layers.quantize_in_place(float_layer, W8, act, compute="integer")
  q.input_quantizer.set_range(np.float32(np.abs(x).max() / 100))  # some inputs clip (LSQ)
  r = rng.randn(*q.compute_output_shape(shape)).astype(np.float32)
  return q, x, r


def _both(q, x, r):
  """(output, input grad, variable grads) of the integer path, then of the fake path (jitted)."""
  tvars = list(q.trainable_variables)
  ntv = [v.value for v in q.non_trainable_variables]

  def loss(tv, xx):
    out, _ = q.stateless_call(tv, ntv, xx)
    return jnp.sum(out * r), out

  res = []
  for compute in ("integer", "fake"):
    q.compute = compute
    (_, out), (gtv, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        [v.value for v in tvars], jnp.asarray(x))
    res.append((np.asarray(out), np.asarray(gx),
                {v.path: np.asarray(g) for v, g in zip(tvars, gtv)}))
  q.compute = "integer"
  return res


def test_integer_dense_within_the_core_bound_same_gradients_int8_dot():
  q, x, r = _layer(lambda: keras.layers.Dense(5, name="d"), (4, 24))
  (yi, gxi, gvi), (yf, gxf, gvf) = _both(q, x, r)
  # The bound of jaxqat.core.integer_error_bound on the same codes, plus the bias add's rounding.
  s_x = q.input_quantizer.current_range(x)[0]

  @jax.jit
  def bound_of(x, w, s_x):
    s_w, z_w = q.kernel_quantizer.tracked_range(w)
    aenc = _integer._train_encoding(A8_LSQ, s_x, None, None)  # pylint: disable=protected-access
    wenc = _integer._train_encoding(q.kernel_quantizer.spec, s_w, z_w, None)  # pylint: disable=protected-access
    qt = core_quantize(w, wenc.scale, wenc.zero_point, wenc.spec)
    return integer_error_bound(x, qt, aenc, (((1,), (0,)), ((), ())))

  bound = np.asarray(bound_of(x, q._kernel.value, s_x))
  err = np.abs(yi - yf)
  assert np.all(err <= bound + 2 * np.finfo(np.float32).eps * np.abs(yf)), float(err.max())
  assert err.max() > 0 or np.all(bound < 1e-5)  # another summation order, not the same program
  np.testing.assert_array_equal(gxi, gxf)
  assert set(gvi) == set(gvf) and "input_quantizer/log_scale" in gvi
  for k in gvf:
    assert_close(gvi[k], gvf[k], tol=1e-6, what=k)
  assert np.abs(gvi["input_quantizer/log_scale"]).sum() > 0
  # The compiled forward holds an int8 x int8 dot accumulating in int32.
  tv = [v.value for v in q.trainable_variables]
  ntv = [v.value for v in q.non_trainable_variables]
  jaxpr = str(jax.make_jaxpr(lambda x: q.stateless_call(tv, ntv, x)[0])(x))
  assert "i8[4,24]" in jaxpr and "i8[24,5]" in jaxpr and "preferred_element_type=int32" in jaxpr


@pytest.mark.parametrize("name", ["einsum", "conv2d", "conv1d_causal", "depthwise2d",
                                  "depthwise1d", "conv2d_transpose", "conv1d_transpose",
                                  "separable2d", "separable1d"])
def test_integer_einsum_and_conv_equal_fake_up_to_summation_order(name):
  make, shape, act = {
      "einsum": (lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(3, 2, 4),
                                                  bias_axes="de", name="l"), (2, 3, 6), A8_LSQ),
      "conv2d": (lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same", name="l"),
                 (2, 7, 7, 3), A8),
      # (no activation: a ReLU's mask would follow the forwards' rounding differences)
      "conv1d_causal": (lambda: keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2,
                                                    name="l"), (2, 9, 3), A8_LSQ),
      # per (channel, multiplier) kernel ranges laid out over the C * M output channels
      "depthwise2d": (lambda: keras.layers.DepthwiseConv2D(3, strides=2, padding="same",
                                                           depth_multiplier=2, name="l"),
                      (2, 7, 7, 3), A8),
      "depthwise1d": (lambda: keras.layers.DepthwiseConv1D(3, dilation_rate=2, name="l"),
                      (2, 9, 4), A8_LSQ),
      # lax.conv_transpose's convolution (input dilated by the strides), Keras's padding
      "conv2d_transpose": (lambda: keras.layers.Conv2DTranspose(
          4, 3, strides=2, padding="same", output_padding=1, name="l"), (2, 5, 5, 3), A8),
      "conv1d_transpose": (lambda: keras.layers.Conv1DTranspose(
          4, 3, padding="valid", dilation_rate=2, data_format="channels_first", name="l"),
          (2, 3, 6), A8_LSQ),
      # the depthwise convolution integer, the (weight-only) pointwise one fake
      "separable2d": (lambda: keras.layers.SeparableConv2D(
          5, 3, strides=2, padding="same", depth_multiplier=2, name="l"), (2, 7, 7, 3), A8),
      "separable1d": (lambda: keras.layers.SeparableConv1D(
          4, 3, dilation_rate=2, data_format="channels_first", name="l"), (2, 3, 9), A8_LSQ),
  }[name]
  q, x, r = _layer(make, shape, act)
  (yi, gxi, gvi), (yf, gxf, gvf) = _both(q, x, r)
  assert_close(yi, yf, tol=1e-5, what="forward")
  assert_close(gxi, gxf, tol=1e-6, what="input grad")
  for k in gvf:
    assert_close(gvi[k], gvf[k], tol=1e-6, what=k)
  tv = [v.value for v in q.trainable_variables]
  ntv = [v.value for v in q.non_trainable_variables]
  jaxpr = str(jax.make_jaxpr(lambda x: q.stateless_call(tv, ntv, x)[0])(x)).replace(" ", "")
  # int8 codes, summed in int32: by an int8 dot, or (depthwise, on CPU) by int32 products
  assert ":i8[" in jaxpr
  if name.startswith(("depthwise", "separable")) and jax.default_backend() == "cpu":
    assert len(re.findall(r":i32\[[\d,]*\]=mul", jaxpr)) >= 3  # one per kernel offset
  else:
    assert "preferred_element_type=int32" in jaxpr


def _mlp(compute, seed=0):
  keras.utils.set_random_seed(seed)
  m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="d1"),
                        keras.layers.Dense(3, name="d2")])
  q = jqk.quantize(m, [Rule(pattern=".*", weight=W8, act=QuantSpec(learning="lsq"),
                            compute=compute)])
  x = np.random.RandomState(1).randn(16, 6).astype(np.float32)
  jqk.calibrate(q, x, verbose=0)
  q.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  return q, x


def test_fit_step_as_fake_and_save_load_keeps_compute(tmp_path):
  y = np.random.RandomState(2).randn(16, 3).astype(np.float32)
  models = {c: _mlp(c) for c in ("fake", "integer")}
  before = np.asarray(models["integer"][0].get_layer("d1").kernel.value)
  for q, x in models.values():
    q.train_on_batch(x, y)
  (qf, x), (qi, _) = models["fake"], models["integer"]
  assert [l.compute for l in qi.layers] == ["integer", "integer"]
  for vf, vi in zip(qf.trainable_variables, qi.trainable_variables):
    assert vf.path.split("/", 1)[1] == vi.path.split("/", 1)[1]
    assert_close(np.asarray(vi.value), np.asarray(vf.value), tol=1e-5, what=vi.path)
  moved = np.asarray(qi.get_layer("d1").kernel.value) - before
  assert np.abs(moved).max() > 1e-3  # the step did change the weights
  path = str(tmp_path / "m.keras")
  qi.save(path)
  r = keras.saving.load_model(path)
  assert [l.compute for l in r.layers] == ["integer", "integer"]
  np.testing.assert_array_equal(np.asarray(r.predict(x, verbose=0)),
                                np.asarray(qi.predict(x, verbose=0)))


def test_layers_that_cannot_run_integer_raise_naming_the_layer(monkeypatch):
  m = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3, name="conv"),
                        keras.layers.BatchNormalization(name="bn"), keras.layers.Flatten(),
                        keras.layers.Dense(2, name="head")])
  with pytest.raises(ValueError, match="layer 'head': compute='integer' cannot run this layer in "
                     "integer arithmetic: the input is not quantized"):
    jqk.quantize(m, [Rule(pattern="head", weight=W8, compute="integer")])
  with pytest.raises(ValueError, match="layer 'conv': compute='integer' cannot run a Conv folded "
                     "with its BatchNormalization"):
    jqk.quantize(m, [Rule(pattern="conv", weight=W8, act=A8, compute="integer")])
  with pytest.raises(ValueError, match="layer 'conv': .* the kernel is affine"):
    jqk.quantize(m, [Rule(pattern="conv", weight=QuantSpec(symmetric=False), act=A8,
                          compute="integer")], fold_batchnorm=False)
  # On another Keras backend (here pretended) the layer refuses at construction.
  monkeypatch.setattr(_layers, "is_jax", lambda: False)
  monkeypatch.setattr(_layers, "backend_name", lambda: "torch")
  with pytest.raises(ValueError, match="QuantDense 'd': compute='integer' cannot run this layer "
                     "in integer arithmetic: the integer forward .* needs the JAX backend; Keras "
                     "runs on 'torch' here: use compute='fake'"):
    _layers.QuantDense(2, name="d", weight_spec=W8, act_spec=A8, compute="integer")
