"""keras.ops fake quant == jaxqat.core (values and gradients), on the current Keras backend."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from jaxqat.core import PerBlock, PerChannel, QuantSpec
from jaxqat.core import quant_dequant as core_qd
from jaxqat.keras import _ops
from kutil import BACKEND, assert_close, to_np, value_and_grads

SPECS = {
    "int8_tensor_fixed": QuantSpec(format="int8"),
    "int4_channel_fixed_affine": QuantSpec(format="int4", granularity=PerChannel(-1),
                                           symmetric=False),
    "uint8_tensor_fixed_affine": QuantSpec(format="uint8", symmetric=False),
    "int4_tensor_lsq": QuantSpec(format="int4", learning="lsq"),
    "int3_channel_lsq": QuantSpec(format="int3", granularity=PerChannel(0), learning="lsq"),
    "int4_channel_lsq_plus": QuantSpec(format="int4", granularity=PerChannel(-1),
                                       symmetric=False, learning="lsq_plus"),
    "int4_block_lsq": QuantSpec(format="int4", granularity=PerBlock(4, axis=-1), learning="lsq"),
    "int8_narrow_block_fixed": QuantSpec(format="int8_narrow", granularity=PerBlock(4, 0)),
}


def _inputs(spec, shape=(8, 12), seed=0):
  rng = np.random.RandomState(seed)
  x = (rng.randn(*shape) * 2).astype(np.float32)
  x[0, :4] = [0.5, 1.5, -2.5, 0.25]  # exact ties (scale 0.5 below) hit round-half-even
  sshape = spec.scale_shape(shape)
  s = rng.uniform(0.2, 0.6, sshape).astype(np.float32)
  if sshape == ():
    s = np.float32(0.5)
  z = None
  if not spec.symmetric:
    if spec.learning == "lsq_plus":
      z = rng.uniform(-0.5, 0.5, sshape).astype(np.float32)  # offset beta
    else:
      lo, hi = (spec.qmin, spec.qmax)
      z = np.round(rng.uniform(lo, hi, sshape)).astype(np.float32) if sshape else np.float32(3)
  return x, s, z


def test_keras_round_is_half_to_even():
  y = to_np(keras.ops.round(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)))
  np.testing.assert_array_equal(y, [0, 2, 2, 0, -2, -2])


# force_ops=True: the keras.ops implementation; False: the backend's own path (the core
# on JAX, the torch autograd Functions on torch).
@pytest.mark.parametrize("force_ops", [True, False])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_ops_fake_quant_matches_core(name, force_ops):
  spec = SPECS[name]
  x, s, z = _inputs(spec)
  r = np.random.RandomState(1).randn(*x.shape).astype(np.float32)
  args = [x, s] + ([] if z is None else [z])

  plus = spec.learning == "lsq_plus"  # z is the LSQ+ offset beta, passed as offset=

  def third(a):
    z = a[2] if len(a) > 2 else None
    return {"offset": z} if plus else {"zero_point": z}

  def keras_loss(*a):
    y = _ops.quant_dequant(a[0], spec, a[1], **third(a), force_ops=force_ops)
    return keras.ops.sum(y * keras.ops.convert_to_tensor(r))

  def core_loss(*a):
    return jnp.sum(core_qd(a[0], spec, a[1], **third(a)) * r)

  y_keras = to_np(_ops.quant_dequant(x, spec, s, **third(args), force_ops=force_ops))
  y_core = np.asarray(core_qd(jnp.asarray(x), spec, s, **third(args)))
  assert_close(y_keras, y_core, what=f"{name} forward")
  _, g_keras = value_and_grads(keras_loss, args)
  g_core = jax.grad(core_loss, argnums=tuple(range(len(args))))(*[jnp.asarray(a) for a in args])
  for i, (a, b) in enumerate(zip(g_keras, g_core)):
    assert_close(a, np.asarray(b), what=f"{name} grad {i}")
  if spec.learning != "fixed":  # the learned parameters do get a gradient
    assert np.abs(g_keras[1]).sum() > 0


@pytest.mark.parametrize("force_ops", [True, False])
def test_ops_fake_quant_bfloat16_keeps_dtype(force_ops):
  x = keras.ops.cast(np.array([0.3, 2.0, -0.7], np.float32), "bfloat16")
  for spec in (QuantSpec(format="int4", learning="lsq"), QuantSpec(format="int4")):
    y = _ops.quant_dequant(x, spec, np.float32(0.25), force_ops=force_ops)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    np.testing.assert_allclose(to_np(keras.ops.cast(y, "float32")), [0.25, 1.75, -0.75])


def test_ops_float_format_off_jax_is_a_clear_error():
  spec = QuantSpec(format="fp8_e4m3")
  if BACKEND == "jax":
    y = _ops.quant_dequant(np.array([1.0, 3.3], np.float32), spec, np.float32(1.0))
    np.testing.assert_allclose(to_np(y), [1.0, 3.25])
  else:
    with pytest.raises(NotImplementedError, match="fp8_e4m3 is implemented on the JAX backend"):
      _ops.quant_dequant(np.array([1.0], np.float32), spec, np.float32(1.0), where="layer 'd'")


def test_lsq_with_zero_point_and_fixed_with_offset_are_rejected():
  with pytest.raises(ValueError, match="learning='lsq' takes no integer zero point"):
    _ops.quant_dequant(np.ones(3, np.float32), QuantSpec(learning="lsq"), np.float32(1.0),
                       np.float32(0.0), force_ops=True)
  with pytest.raises(ValueError, match="offset is the LSQ\\+ offset"):
    _ops.quant_dequant(np.ones(3, np.float32), QuantSpec(symmetric=False), np.float32(1.0),
                       offset=np.float32(0.0), force_ops=True)


@pytest.mark.parametrize("force_ops", [True, False])
def test_nan_element_passes_no_gradient_as_in_the_core(force_ops):
  x = np.array([0.3, np.nan, 5.0, -0.2], np.float32)  # 5.0 is clipped (int4, s = 0.25)
  for spec in (QuantSpec(format="int4"), QuantSpec(format="int4", learning="lsq")):
    def loss(v):
      y = _ops.quant_dequant(v, spec, np.float32(0.25), force_ops=force_ops)
      return keras.ops.sum(keras.ops.where(keras.ops.isnan(y), 0.0, y))
    _, (g,) = value_and_grads(loss, [x])
    np.testing.assert_array_equal(g, [1.0, 0.0, 0.0, 1.0], err_msg=spec.learning)


@pytest.mark.parametrize("force_ops", [True, False])
@pytest.mark.parametrize("spec", [QuantSpec(format="int8"),
                                  QuantSpec(format="int4", granularity=PerChannel(-1))])
def test_unclipped_tracked_weight_same_values_and_grads_as_masked(spec, force_ops):
  from jaxqat.core import unclipped_weight, weight_range
  x, _, _ = _inputs(spec)
  x[:, 2] = 0.0  # an all-zero channel (its scale falls back to 1)
  s = np.asarray(weight_range(jnp.asarray(x), spec)[0])  # the range a tracked weight has
  r = np.random.RandomState(2).randn(*x.shape).astype(np.float32)
  assert unclipped_weight(spec)
  out = {}
  for unclipped in (False, True):
    def loss(x, unclipped=unclipped):
      y = _ops.quant_dequant(x, spec, s, force_ops=force_ops, unclipped=unclipped)
      return keras.ops.sum(y * keras.ops.convert_to_tensor(r))
    out[unclipped] = value_and_grads(loss, [x])
  np.testing.assert_array_equal(to_np(out[True][0]), to_np(out[False][0]))
  np.testing.assert_array_equal(to_np(out[True][1][0]), to_np(out[False][1][0]))
  y = {u: to_np(_ops.quant_dequant(x, spec, s, force_ops=force_ops, unclipped=u))
       for u in (False, True)}
  np.testing.assert_array_equal(y[True], y[False])
  np.testing.assert_array_equal(to_np(out[True][1][0]), r)  # every weight inside: g passes


@pytest.mark.parametrize("force_ops", [True, False])
@pytest.mark.parametrize("spec", [QuantSpec(format="int4"), QuantSpec(format="int4", learning="lsq"),
                                  QuantSpec(format="int4", symmetric=False, learning="lsq_plus")],
                         ids=["fixed", "lsq", "lsq_plus"])
@pytest.mark.parametrize("non_finite", ["both", "input", "grad"])
def test_non_finite_inputs_and_gradients_match_the_core(spec, force_ops, non_finite):
  # The torch Functions mask by multiplication and fall back to a select on non-finite values;
  # LSQ's backward reads a finite upstream gradient off its step-size sum. "grad" puts an
  # infinite gradient on an element whose step-size derivative is 0 (x = 0) and on a clipped one.
  x = np.array([0.3, np.nan, 5.0, -0.2, np.inf, -np.inf, 1.1, -3.0], np.float32)
  r = np.array([1.0, 2.0, np.inf, -1.0, 3.0, 1.0, -np.inf, 0.5], np.float32)  # upstream grad
  if non_finite == "input":
    r = np.array([1.0, 2.0, 0.5, -1.0, 3.0, 1.0, -2.0, 0.5], np.float32)
  elif non_finite == "grad":
    x = np.array([0.3, 0.0, 5.0, -0.2, 9.0, -7.0, 1.1, -3.0], np.float32)
    r = np.array([1.0, np.inf, np.inf, -1.0, 3.0, 1.0, -np.inf, np.nan], np.float32)
  s = np.float32(0.25)
  plus = spec.learning == "lsq_plus"
  args = [x, s] + ([np.float32(-0.3)] if plus else [])
  kw = lambda a: {"offset": a[2]} if plus else {}  # noqa: E731

  def keras_loss(*a):
    y = _ops.quant_dequant(a[0], spec, a[1], **kw(a), force_ops=force_ops)
    return keras.ops.sum(y * keras.ops.convert_to_tensor(r))

  def core_loss(*a):
    return jnp.sum(core_qd(a[0], spec, a[1], **kw(a)) * r)

  _, g_keras = value_and_grads(keras_loss, args)
  g_core = jax.grad(core_loss, argnums=tuple(range(len(args))))(*[jnp.asarray(a) for a in args])
  n = 1 if spec.learning == "fixed" else len(args)  # fixed ranges get no gradient
  for i in range(n):
    np.testing.assert_array_equal(np.asarray(g_keras[i]), np.asarray(g_core[i]), err_msg=str(i))


@pytest.mark.skipif(BACKEND != "torch", reason="the torch autograd Functions")
@pytest.mark.parametrize("kind,fresh", [("fixed", 2), ("lsq", 3), ("lsq_plus", 4)])
def test_torch_functions_write_few_activation_sized_buffers(kind, fresh):
  # On CPU each fresh activation-sized buffer is first-touch page faults: the forward writes
  # over buffers it no longer needs. LSQ keeps its step-size derivative and the 0/1 mask
  # (and returns the output): three buffers; LSQ+ adds one temporary, fixed ranges keep a mask.
  import torch  # pylint: disable=import-outside-toplevel
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel

  x = torch.tensor(np.random.RandomState(0).randn(64, 256).astype(np.float32) * 3,
                   requires_grad=True)
  s = torch.tensor(0.25, requires_grad=True)
  b = torch.tensor(0.1, requires_grad=True)
  with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    if kind == "fixed":
      y = _ops.torch_fake_quant(x, torch.tensor(0.25), None, -8, 7)
    else:
      y = _ops.torch_lsq_fake_quant(x, s, b if kind == "lsq_plus" else None, -8, 7)
  big = [e.name for e in prof.events() if e.self_cpu_memory_usage >= x.nbytes]
  assert len(big) == fresh, big
  saved = y.grad_fn.saved_tensors
  assert [tuple(t.shape) for t in saved] == [(64, 256)] * (1 if kind == "fixed" else 2)
  inside = saved[-1]
  v = x.detach() / 0.25
  code = torch.round(v) + (torch.round(-b.detach() / 0.25) if kind == "lsq_plus" else 0)
  want_inside = ((code >= -8) & (code <= 7)).float()
  np.testing.assert_array_equal(inside.numpy(), want_inside.numpy())
  if kind != "fixed":
    want_ds = torch.where(want_inside > 0, torch.round(v) - v, code.clamp(-8, 7))
    np.testing.assert_array_equal(saved[0].numpy(), want_ds.numpy())
