"""orbax checkpoints of a quantized Linen model: round trip and mismatch errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxqat.core import PerChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql

LSQ = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1),
                                           learning="lsq"),
            act=QuantSpec(format="int8", symmetric=False, learning="lsq_plus"))]
FIXED = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1)),
              act=QuantSpec(format="int8", symmetric=False))]


def _key(seed):
  return jax.random.key(seed, impl="rbg")  # compiles much faster than threefry on CPU


def _model(width=8):
  return nn.Sequential([nn.Dense(width), nn.relu, nn.Dense(3)])


def _x():
  return jax.random.normal(jax.random.key(1), (16, 4))


_TRAINED = {}


def _trained(rules, width=8):
  """``_trained_once``, shared by the tests (which only read it: jax arrays, fresh dicts)."""
  key = (id(rules), width)
  if key not in _TRAINED:
    _TRAINED[key] = _trained_once(rules, width)
  qmodel, v = _TRAINED[key]
  return qmodel, jax.tree.map(lambda a: a, v)  # a fresh nest of dicts around the same arrays


def _trained_once(rules, width):
  """A calibrated model, one SGD step into QAT (so nothing equals its init)."""
  qmodel = ql.quantize(_model(width), rules)
  x = _x()
  v = jax.jit(qmodel.init)(_key(0), x)
  v = ql.calibrate(qmodel, v, [x])
  t = {k: v[k] for k in ("params", "quant_params") if k in v}
  g = jax.jit(jax.grad(lambda t: jnp.sum(qmodel.apply({**v, **t}, x) ** 2)))(t)
  t = jax.tree.map(lambda a, b: a - 0.01 * b, t, g)
  return qmodel, {**v, **t}


def test_round_trip_is_bit_identical(tmp_path):
  qmodel, v = _trained(LSQ)
  path = tmp_path / "ckpt"
  ql.save(path, v)
  fresh = jax.jit(qmodel.init)(_key(7), _x())  # another init: other values
  restored = ql.restore(path, fresh)
  assert jax.tree.structure(restored) == jax.tree.structure(v)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(v)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(qmodel.apply(restored, _x()), qmodel.apply(v, _x()))


def test_restore_into_other_structure_names_the_entry(tmp_path):
  _, v = _trained(FIXED, width=8)
  ql.save(tmp_path / "ckpt", v)
  qmodel = ql.quantize(_model(width=6), FIXED)
  target = jax.jit(qmodel.init)(_key(0), _x())
  with pytest.raises(ValueError, match=r"entry 'params/layers_0/bias' is \(8,\) float32 in the "
                                       r"checkpoint but \(6,\) float32 in the model"):
    ql.restore(tmp_path / "ckpt", target)


def test_restore_with_missing_quantizer_names_the_entry(tmp_path):
  _, v = _trained(FIXED)
  ql.save(tmp_path / "ckpt", v)
  rules = [Rule(pattern="layers_2", skip=True)] + FIXED
  target = jax.jit(ql.quantize(_model(), rules).init)(_key(0), _x())
  with pytest.raises(ValueError, match=r"checkpoint entry 'quant_stats/layers_2/input/count' has "
                                       r"no counterpart"):
    ql.restore(tmp_path / "ckpt", target)


def test_restore_with_other_spec_same_shapes_names_the_entry(tmp_path):
  _, v = _trained(FIXED)
  ql.save(tmp_path / "ckpt", v)
  int8 = [Rule(pattern=".*", weight=QuantSpec(format="int8", granularity=PerChannel(-1)),
               act=FIXED[0].act)]  # same shapes as int4, other grid
  target = jax.jit(ql.quantize(_model(), int8).init)(_key(0), _x())
  with pytest.raises(ValueError, match=r"'quant_stats/layers_0/kernel/fingerprint'.*another QuantSpec"):
    ql.restore(tmp_path / "ckpt", target)


def test_frozen_mark_round_trips_into_an_init_target(tmp_path):
  qmodel, v = _trained(FIXED)
  v = ql.freeze(qmodel, v)
  ql.save(tmp_path / "ckpt", v)
  target = jax.jit(qmodel.init)(_key(3), _x())  # not calibrated, not frozen
  restored = ql.restore(tmp_path / "ckpt", target)
  assert "frozen" in restored["quant_stats"]["layers_0"]["kernel"]
  np.testing.assert_array_equal(qmodel.apply(restored, _x()), qmodel.apply(v, _x()))


def test_restore_from_missing_directory_names_the_path(tmp_path):
  qmodel = ql.quantize(_model(), FIXED)
  target = jax.jit(qmodel.init)(_key(0), _x())
  with pytest.raises(FileNotFoundError, match=r"no checkpoint directory at .*nowhere"):
    ql.restore(tmp_path / "nowhere", target)


def test_restore_from_corrupted_directory_names_the_path(tmp_path):
  qmodel, v = _trained(FIXED)
  ql.save(tmp_path / "ckpt", v)
  files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
  for p in files:  # every file truncated
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
  with pytest.raises(ValueError, match=r"restore: .*ckpt"):
    ql.restore(tmp_path / "ckpt", v)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"restore: .*empty"):
    ql.restore(tmp_path / "empty", v)


def test_save_refuses_an_existing_directory(tmp_path):
  _, v = _trained(FIXED)
  ql.save(tmp_path / "ckpt", v)
  with pytest.raises(ValueError, match=r"path: .*ckpt exists already"):
    ql.save(tmp_path / "ckpt", v)


class _Partitioned(nn.Module):
  """Parameters boxed by nn.with_logical_partitioning (flax examples lm1b, wmt)."""

  @nn.compact
  def __call__(self, x):
    p = nn.with_logical_partitioning
    x = nn.LayerNorm(scale_init=p(nn.initializers.ones, ("embed",)),
                     bias_init=p(nn.initializers.zeros, ("embed",)))(x)
    return nn.Dense(3, kernel_init=p(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)


def test_partitioning_boxes_survive_restore_and_restore_served(tmp_path):
  x = _x()
  qmodel = ql.quantize(_Partitioned(), FIXED)
  v = ql.calibrate(qmodel, qmodel.init(_key(0), x), [x])
  y = qmodel.apply(v, x)
  ql.save(str(tmp_path / "ck"), v)
  r = ql.restore(str(tmp_path / "ck"), qmodel.init(_key(5), x))
  box = r["params"]["Dense_0"]["kernel"]
  assert isinstance(box, nn.LogicallyPartitioned) and box.names == ("embed", "mlp")
  np.testing.assert_array_equal(np.asarray(qmodel.apply(r, x)), np.asarray(y))
  served, sv = ql.convert(qmodel, v)
  ql.save_served(str(tmp_path / "sv"), served, sv)
  served2, sv2 = ql.restore_served(str(tmp_path / "sv"), qmodel)
  ln = sv2["params"]["LayerNorm_0"]["scale"]
  assert isinstance(ln, nn.LogicallyPartitioned) and ln.names == ("embed",)
  np.testing.assert_array_equal(np.asarray(served2.apply(sv2, x)), np.asarray(served.apply(sv, x)))
