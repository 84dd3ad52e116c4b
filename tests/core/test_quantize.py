"""Tests for real quantization, QTensor and int4/int2 packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxqat import core
from jaxqat.core import PerBlock, PerChannel, QuantSpec


def _x(shape, seed=0, scale=1.0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "spec,scale,zp",
    [
        (QuantSpec(format="int8"), 0.02, None),
        (QuantSpec(format="int4", granularity=PerChannel(0)), np.linspace(0.1, 0.4, 8)[:, None], None),
        (QuantSpec(format="uint8", symmetric=False, granularity=PerChannel(-1)),
         np.full((16,), 0.01), np.arange(16) * 10.0),
        (QuantSpec(format="int2", granularity=PerBlock(4, axis=1)), np.full((8, 4), 0.5), None),
        (QuantSpec(format="int16"), 1e-4, None),
        (QuantSpec(format="fp8_e4m3", granularity=PerChannel(-1)), np.linspace(0.001, 0.01, 16), None),
        (QuantSpec(format="fp8_e5m2"), 0.25, None),
        (QuantSpec(format="fp6_e3m2"), 0.25, None),
        (QuantSpec(format="fp6_e2m3"), 0.25, None),
        (QuantSpec(format="fp4_e2m1"), 0.25, None),
        (QuantSpec(format="mxfp4"), None, None),
        (QuantSpec(format="mxfp8"), None, None),
        (QuantSpec(format="mxfp6"), None, None),
        (QuantSpec(format="nvfp4"), None, None),
        (QuantSpec(format="nvfp4"), 0.003, None),
    ],
    ids=lambda v: getattr(getattr(v, "format", None), "name", None),
)
def test_dequantize_quantize_equals_fake_quant_bit_for_bit(spec, scale, zp, dtype):
  x = _x((8, 32) if spec.is_block else (8, 16), scale=2.0, dtype=dtype)
  scale = None if scale is None else jnp.asarray(scale, jnp.float32)
  zp = None if zp is None else jnp.asarray(zp, jnp.float32)
  qt = jax.jit(lambda v: core.quantize(v, scale, zp, spec))(x)
  fq = core.fake_quant(x, scale, zp, spec)
  y = core.dequantize(qt)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(fq, np.float32))
  if spec.is_int:
    assert qt.values.dtype == spec.format.storage_dtype
    v = np.asarray(qt.values)
    assert v.min() >= spec.qmin and v.max() <= spec.qmax


def test_quantize_codes_by_hand():
  qt = core.quantize(jnp.array([0.26, -0.05, 9.0, -9.0]), 0.1, spec=QuantSpec(format="int4"))
  np.testing.assert_array_equal(np.asarray(qt.values), [3, 0, 7, -8])  # -0.5 rounds to even 0
  assert qt.zero_point is None and qt.values.dtype == jnp.int8
  qt = core.quantize(jnp.array([0.0, 1.0]), 0.5, 3, spec=QuantSpec(format="uint8", symmetric=False))
  np.testing.assert_array_equal(np.asarray(qt.values), [3, 5])
  assert qt.zero_point.dtype == jnp.int32 and int(qt.zero_point) == 3


def test_block_qtensor_scale_dtypes():
  x = _x((2, 32))
  mx = core.quantize(x, None, spec=QuantSpec(format="mxfp4"))
  assert mx.values.dtype == jnp.float4_e2m1fn and mx.scale.dtype == jnp.float8_e8m0fnu
  assert mx.scale.shape == (2, 1) and mx.tensor_scale is None
  nv = core.quantize(x, None, spec=QuantSpec(format="nvfp4"))
  assert nv.scale.dtype == jnp.float8_e4m3fn and nv.scale.shape == (2, 2)
  assert nv.tensor_scale.dtype == jnp.float32


def test_qtensor_is_a_pytree():
  spec = QuantSpec(format="uint8", symmetric=False)
  qt = core.quantize(_x((4,)), 0.1, 7, spec)
  leaves, treedef = jax.tree_util.tree_flatten(qt)
  assert len(leaves) == 3  # values, scale, zero_point (spec/dtype are static)
  qt2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert qt2.spec == spec
  out = jax.jit(core.dequantize)(qt)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(core.dequantize(qt)))


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (2, True), (2, False)])
def test_pack_unpack_round_trip(bits, signed):
  rng = np.random.default_rng(0)
  lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
  v = rng.integers(lo, hi + 1, size=(3, 5, 16)).astype(np.int8 if signed else np.uint8)
  p = core.pack(jnp.asarray(v), bits)
  assert p.dtype == jnp.int8 and p.shape == (3, 5, 16 * bits // 8)
  np.testing.assert_array_equal(np.asarray(core.unpack(p, bits, signed=signed)), v)


def test_pack_layout_by_hand():
  # int4: first code in the low nibble. [1, -2] -> 0x1 | (0xE << 4) = 0xE1.
  p = core.pack(jnp.array([1, -2], jnp.int8), 4)
  assert int(np.asarray(p).view(np.uint8)[0]) == 0xE1
  # int2: codes 0..3 in bit pairs from the low end: [1, 2, 3, 0] -> 0b00111001.
  p = core.pack(jnp.array([1, 2, 3, 0], jnp.uint8), 2)
  assert int(np.asarray(p).view(np.uint8)[0]) == 0b00111001


def test_pack_quantized_weights_end_to_end():
  spec = QuantSpec(format="int4", granularity=PerChannel(-1))
  w = _x((8, 6))
  s = jnp.max(jnp.abs(w), axis=0) / 7
  qt = core.quantize(w, s, spec=spec)
  packed = core.pack(qt.values.T, 4)  # pack along the input axis
  restored = core.unpack(packed, 4).T
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(qt.values))


def test_bad_input():
  with pytest.raises(ValueError, match="bits: pack supports 2 or 4"):
    core.pack(jnp.zeros(4, jnp.int8), 3)
  with pytest.raises(ValueError, match="values: last axis"):
    core.pack(jnp.zeros(3, jnp.int8), 4)
  with pytest.raises(TypeError, match="values: expected an integer array"):
    core.pack(jnp.zeros(4), 4)
  with pytest.raises(TypeError, match="packed: expected an int8"):
    core.unpack(jnp.zeros(4, jnp.int32), 4)
  with pytest.raises(TypeError, match="qt: expected a QTensor"):
    core.dequantize(jnp.zeros(3))
  with pytest.raises(ValueError, match="scale: a step size is required"):
    core.quantize(jnp.zeros(3), None, spec=QuantSpec())
  with pytest.raises(ValueError, match="zero_point: block format"):
    core.quantize(jnp.zeros(32), None, 1.0, spec=QuantSpec(format="mxfp4"))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "mxfp6", "mxfp8"])
def test_block_round_trip_matches_fake_quant_where_xla_rewrites_the_tensor_scale(fmt):
  # Found by hypothesis: under jit XLA turns tamax / 2688 into tamax * (1/2688), one ulp
  # away from the exact division; quantize() now runs jitted like block_fake_quant.
  x = jnp.asarray(np.float32([0.0] * 31 + [9013.5458984375]))
  spec = QuantSpec(format=fmt)
  np.testing.assert_array_equal(np.asarray(core.dequantize(core.quantize(x, None, spec=spec))),
                                np.asarray(core.block_fake_quant(x, spec)))
