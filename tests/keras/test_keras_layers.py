"""Quantized Keras layers == float layer on core-fake-quantized operands (any backend)."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxqat.core import PerChannel, PerOutputChannel, QuantSpec, param_to_step_size
from jaxqat.core import quant_dequant as core_qd
import jaxqat.keras as jqk
from jaxqat.keras._convert import copy_weights
from kutil import BACKEND, assert_close, layer_value_and_grads, to_np

W4 = QuantSpec(format="int4", granularity=PerOutputChannel())
A8 = QuantSpec(format="int8")

CASES = {
    "dense": (lambda: keras.layers.Dense(5, name="l"), (3, 6)),
    "einsum": (lambda: keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 5),
                                                bias_axes="d", name="l"), (2, 3, 6)),
    "einsum_heads": (lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3),
                                                      name="l"), (2, 3, 6)),
    "conv1d": (lambda: keras.layers.Conv1D(4, 3, padding="same", name="l"), (2, 8, 3)),
    "conv2d": (lambda: keras.layers.Conv2D(4, 3, strides=2, name="l"), (2, 8, 8, 3)),
    "depthwise2d": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="l"),
                    (2, 6, 6, 3)),
    "separable2d": (lambda: keras.layers.SeparableConv2D(4, 3, name="l"), (2, 6, 6, 3)),
}

EXPECTED_SCALE_SHAPES = {
    "dense": {"_kernel": (1, 5)},
    "einsum": {"_kernel": (1, 5)},
    "einsum_heads": {"_kernel": (1, 2, 3)},
    "conv1d": {"_kernel": (1, 1, 4)},
    "conv2d": {"_kernel": (1, 1, 1, 4)},
    "depthwise2d": {"kernel": (1, 1, 3, 2)},
    "separable2d": {"depthwise_kernel": (1, 1, 3, 1), "pointwise_kernel": (1, 1, 1, 4)},
}


def _make(name, weight_spec=W4, act_spec=A8, seed=0):
  make, shape = CASES[name]
  keras.utils.set_random_seed(seed)
  float_layer = make()
  x = np.random.RandomState(seed).randn(*shape).astype(np.float32)
  float_layer(x)
  qcls = jqk.quantized_class(type(float_layer))
  cfg = float_layer.get_config()
  q = qcls.from_config({**cfg, "weight_spec": weight_spec, "act_spec": act_spec})
  q.build(x.shape)  # calling it first would be an error: the input range is not set yet
  copy_weights(float_layer, q)
  q.init_weight_ranges()
  if q.input_quantizer is not None:
    q.input_quantizer.set_range(np.float32(0.05))
  return float_layer, q, x


@pytest.mark.parametrize("name", sorted(CASES))
def test_quant_layer_equals_float_layer_on_quantized_operands(name):
  float_layer, q, x = _make(name)
  for attr, quantizer in q.weight_quantizers.items():
    assert quantizer.scale.shape == EXPECTED_SCALE_SHAPES[name][attr]
  # Reference: the float layer run on core-fake-quantized input and weights.
  xq = np.asarray(core_qd(jnp.asarray(x), A8, np.float32(0.05)))
  for attr, quantizer in q.weight_quantizers.items():
    w = to_np(getattr(q, attr))
    wq = np.asarray(core_qd(jnp.asarray(w), quantizer.spec, to_np(quantizer.scale)))
    assert len(np.unique(wq)) > 3
    getattr(float_layer, attr).assign(wq)
  assert_close(to_np(q(x)), to_np(float_layer(xq)), what=name)


def test_quant_dense_gradients_match_core():
  """Output and gradients (input, kernel, bias, both LSQ step sizes) vs a JAX/core reference."""
  w_spec = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
  a_spec = QuantSpec(format="int4", learning="lsq")
  _, q, x = _make("dense", w_spec, a_spec)
  q.input_quantizer.set_range(np.float32(0.3))
  # Move the weight range off the exact absmax: an element sitting exactly on the clip
  # boundary (w / s == qmax) is masked or not depending on a 1-ulp division difference
  # (XLA may divide by multiplying with the reciprocal).
  q.kernel_quantizer.set_range(to_np(q.kernel_quantizer.step_size()) * 0.93)
  r = np.random.RandomState(3).randn(3, 5).astype(np.float32)
  out, gx, gvars = layer_value_and_grads(q, x, r, training=True)
  k, b = to_np(q._kernel), to_np(q.bias)
  # Learned step sizes are stored as log_scale = log s (jaxqat.core.param_to_step_size).
  tw, ta = to_np(q.kernel_quantizer.log_scale), to_np(q.input_quantizer.log_scale)

  def ref(x, k, b, ta, tw):
    y = (core_qd(x, a_spec, param_to_step_size(ta))
         @ core_qd(k, w_spec, param_to_step_size(tw)) + b)
    return jnp.sum(y * r), y

  (_, y_ref), grads = jax.value_and_grad(ref, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      jnp.asarray(x), k, b, ta, tw)
  assert_close(out, np.asarray(y_ref), what="output")
  assert_close(gx, np.asarray(grads[0]), what="d/dx")
  by_name = {p.split("/")[-2] + "/" + p.split("/")[-1]: g for p, g in gvars.items()}
  assert_close(by_name["l/kernel"], np.asarray(grads[1]), what="d/dkernel")
  assert_close(by_name["l/bias"], np.asarray(grads[2]), what="d/dbias")
  assert_close(by_name["input_quantizer/log_scale"], np.asarray(grads[3]), what="d/dlog_s_act")
  assert_close(by_name["kernel_quantizer/log_scale"], np.asarray(grads[4]),
               what="d/dlog_s_weight")
  assert np.abs(np.asarray(grads[4])).sum() > 0


def test_quant_embedding_is_per_token_and_ignores_act_spec():
  keras.utils.set_random_seed(0)
  emb = keras.layers.Embedding(10, 4, name="emb")
  ids = np.array([[1, 2, 9], [0, 0, 3]], np.int32)
  emb(ids)
  q = jqk.QuantEmbedding.from_config({**emb.get_config(), "weight_spec": W4, "act_spec": A8})
  q(ids)
  copy_weights(emb, q)
  q.init_weight_ranges()
  assert q.input_quantizer is None and q.act_spec is None
  assert q.embeddings_quantizer.scale.shape == (10, 1)
  table = np.asarray(core_qd(jnp.asarray(to_np(emb.embeddings)), QuantSpec(
      format="int4", granularity=PerChannel(0)), to_np(q.embeddings_quantizer.scale)))
  assert_close(to_np(q(ids)), table[ids], what="embedding")


@pytest.mark.parametrize("name", ["dense", "conv2d", "separable2d"])
def test_quant_layer_config_round_trip(name):
  _, q, _ = _make(name)
  config = q.get_config()
  clone = type(q).from_config(config)
  assert clone.get_config() == config
  assert clone.weight_spec == W4 and clone.act_spec == A8


def test_quantizer_layer_rejects_bad_arguments():
  with pytest.raises(ValueError, match="role must be 'act' or 'weight'"):
    jqk.Quantizer(A8, role="bias")
  with pytest.raises(ValueError, match="observe=True needs an activation quantizer with "
                                       "learning='fixed'"):
    jqk.Quantizer(QuantSpec(learning="lsq"), observe=True)
  config = {"format": "int8", "symmetric": True, "calibration": "absmax", "learning": "fixed",
            "rounding": "nearest_even"}
  with pytest.raises(ValueError, match=r"QuantDense 'd' weight_spec: missing key 'granularity'"):
    jqk.QuantDense(3, name="d", weight_spec=config)
  q = jqk.Quantizer(A8, name="q")
  q.build((None, 4))
  with pytest.raises(ValueError, match="Quantizer 'q': step size must be finite and > 0"):
    q.set_range(np.float32(0.0))


def test_keras_ops_weight_range_equals_core_with_non_finite_entries():
  """The per-step weight range off JAX (keras.ops, torch) == jaxqat.core.weight_range."""
  from jaxqat.core import weight_range
  from jaxqat.keras._quantizer import _ops_weight_range, _reduce_axes, _torch_weight_range
  w = np.random.RandomState(0).randn(6, 4).astype(np.float32) * 3
  w[0, 0], w[1, 1], w[2, 1] = np.nan, np.inf, -np.inf
  w[:, 2] = np.nan  # a channel with no finite entry: the core's fallback range
  w[:, 3] = 0.0  # a zero range: the fallback as well
  for spec in (QuantSpec(format="int4", granularity=PerChannel(-1)),
               QuantSpec(format="uint8", granularity=PerChannel(-1), symmetric=False),
               QuantSpec(format="int8", symmetric=False, calibration="minmax"),
               QuantSpec(format="int8", calibration="ema")):
    shape = spec.scale_shape(w.shape)
    s_core, z_core = weight_range(jnp.asarray(w), spec)
    fns = [_ops_weight_range] + ([_torch_weight_range] if BACKEND == "torch" else [])
    for fn in fns:
      s, z = fn(spec, keras.ops.convert_to_tensor(w), _reduce_axes(w.shape, shape), shape)
      # Bit for bit on torch; JAX may turn a division by a constant into a multiplication.
      rtol = 2e-7 if BACKEND == "jax" else 0.0
      np.testing.assert_allclose(to_np(s), np.asarray(s_core), rtol=rtol, err_msg=str(spec))
      if not spec.symmetric:
        np.testing.assert_array_equal(to_np(z), np.asarray(z_core), err_msg=str(spec))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_transposed_convolutions_quantize_per_filter_and_serve(rank):
  """Conv{1,2,3}DTranspose kernels are (k..., filters, in): one scale per filter (axis -2).
  Reference: the float layer run on a NumPy fake-quantized kernel and input."""
  rng = np.random.default_rng(rank)
  shape = (4,) + (5,) * rank + (3,)
  x = rng.normal(size=shape).astype("float32")
  cls = getattr(keras.layers, f"Conv{rank}DTranspose")
  inp = keras.Input(shape[1:])
  model = keras.Model(inp, cls(6, 3, strides=2, padding="same", name="up")(inp))
  q = jqk.calibrate(jqk.quantize(model), x, batch_size=4)
  up = q.get_layer("up")
  assert type(up).__name__ == f"QuantConv{rank}DTranspose"
  kernel, bias = (to_np(w) for w in model.get_layer("up").get_weights())
  axes = tuple(i for i in range(rank + 2) if i != rank)
  s = np.abs(kernel).max(axis=axes, keepdims=True) / np.float32(127)
  assert to_np(up.kernel_quantizer.scale).shape == s.shape == (1,) * rank + (6, 1)
  kq = (np.clip(np.round(kernel * (np.float32(1) / s)), -127, 127) * s).astype("float32")
  sx, zx = float(to_np(up.input_quantizer.scale)), float(to_np(up.input_quantizer.zero_point))
  xq = ((np.clip(np.round(x * np.float32(1 / np.float32(sx))) + zx, -128, 127) - zx)
        * np.float32(sx)).astype("float32")
  ref = cls(6, 3, strides=2, padding="same")
  ref.build(shape)
  ref.set_weights([kq, bias])
  y = to_np(q(x))
  np.testing.assert_allclose(y, to_np(ref(xq)), rtol=0, atol=1e-6)
  # Served as ServedConvTranspose: the fake-quant values bit for bit on the dequantize path
  # (integer=False, and keras.ops off JAX); on JAX the integer path (int8 codes, int32 sums)
  # up to float summation order.
  served = jqk.convert(q, integer=False)
  assert type(served.get_layer("up")).__name__ == "ServedConvTranspose"
  np.testing.assert_array_equal(to_np(served(x)), y)
  served = jqk.convert(q)
  np.testing.assert_allclose(to_np(served(x)), y, rtol=0, atol=1e-5 * np.abs(y).max())
  if BACKEND == "jax":
    jaxpr = str(jax.make_jaxpr(lambda x: served(x))(x))
    assert "preferred_element_type=int32" in jaxpr
  else:
    np.testing.assert_array_equal(to_np(served(x)), y)
