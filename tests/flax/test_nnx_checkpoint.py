"""Orbax checkpoints of quantized NNX models: round trip, and loud failures."""

import glob
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxqat.core import PerChannel
from jaxqat.core import QuantSpec
from jaxqat.core import Rule
from jaxqat.flax import nnx as qnnx


class Net(nnx.Module):

  def __init__(self, seed=0, with_head=True):
    rngs = nnx.Rngs(seed)
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs) if with_head else nnx.data(None)

  def __call__(self, x):
    h = nnx.relu(self.conv(x)).mean(axis=(1, 2))
    return self.head(h) if self.head is not None else h


W = QuantSpec(format="int4", granularity=PerChannel(-1), learning="lsq")
A = QuantSpec(format="int8", symmetric=False, calibration="minmax", learning="lsq_plus")
RULES = [Rule(pattern=".*", weight=W, act=A)]
X = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = qnnx.calibrate(qnnx.quantize(Net(0), RULES), [X])
  model.head.kernel_quant.log_scale[...] += 0.1  # state that only the checkpoint knows
  qnnx.set_mode(model.conv, "float")  # a mode that only the checkpoint knows
  path = tmp_path_factory.mktemp("nnx") / "ckpt"
  qnnx.save(path, model)
  return path, model


def _copy(path, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  dst = tmp_path / "copy"
  shutil.copytree(path, dst)
  return dst


def test_round_trip_is_bit_identical_with_modes(saved):
  path, model = saved
  fresh = qnnx.quantize(Net(1), RULES)  # other weights, not calibrated
  assert not fresh.conv.input_quant.calibrated
  restored = qnnx.restore(path, fresh)
  assert restored.head.input_quant.calibrated and restored.head.input_quant.mode == "quant"
  assert restored.conv.input_quant.mode == "float"
  np.testing.assert_array_equal(restored(X), model(X))
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(restored)),
                            nnx.to_flat_state(nnx.state(model))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))


def test_different_spec_shape_names_the_quantizer_and_entry(saved):
  path, _ = saved
  per_tensor = [Rule(pattern=".*", weight=W.replace(granularity=QuantSpec().granularity),
                     act=A)]
  with pytest.raises(ValueError, match=r"quantizer 'conv/kernel_quant'.*entry "
                                       r"'conv/kernel_quant/log_scale': the checkpoint has shape "
                                       r"\(1, 1, 1, 4\)"):
    qnnx.restore(path, qnnx.quantize(Net(0), per_tensor))


def test_int4_model_refuses_an_int8_checkpoint(saved):
  path, _ = saved
  int8 = [Rule(pattern=".*", weight=W.replace(format="int8"), act=A)]
  with pytest.raises(ValueError, match=r"quantizer 'head/kernel_quant': the checkpoint's spec is "
                                       r"int4 .*the model's int8"):
    qnnx.restore(path, qnnx.quantize(Net(0), int8))


def test_missing_layer_names_the_entries(saved):
  path, _ = saved
  with pytest.raises(ValueError, match=r"entries missing from the model: \['head/bias'"):
    qnnx.restore(path, qnnx.quantize(Net(0, with_head=False), RULES))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    qnnx.restore(path.parent / "nope", qnnx.quantize(Net(0), RULES))


def test_flipped_bit_in_a_data_file_is_a_checksum_error_naming_the_file(saved, tmp_path):
  path = _copy(saved[0], tmp_path)
  files = sorted(glob.glob(str(path / "d" / "*")), key=os.path.getsize)
  data = bytearray(open(files[-1], "rb").read())
  data[len(data) // 2] ^= 0x10
  open(files[-1], "wb").write(bytes(data))
  with pytest.raises(ValueError, match=r"(?s)" + os.path.basename(files[-1]) +
                     r".*checksum verification failed") as e:
    qnnx.restore(path, qnnx.quantize(Net(1), RULES))
  assert "missing" not in str(e.value)


def test_truncated_metadata_file_names_the_file(saved, tmp_path):
  path = _copy(saved[0], tmp_path)
  meta = path / "_METADATA"
  meta.write_bytes(meta.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"_METADATA cannot be read \(truncated"):
    qnnx.restore(path, qnnx.quantize(Net(1), RULES))


def test_jaxqat_metadata_deleted_or_truncated_fails(saved, tmp_path):
  path = _copy(saved[0], tmp_path)
  meta = path / "jaxqat.json"
  meta.write_text(meta.read_text()[:50])
  with pytest.raises(ValueError, match=r"jaxqat.json cannot be read \(truncated"):
    qnnx.restore(path, qnnx.quantize(Net(1), RULES))
  meta.unlink()
  model = qnnx.quantize(Net(1), RULES)
  with pytest.raises(ValueError, match=r"jaxqat.json is missing"):
    qnnx.restore(path, model)
  assert not model.conv.input_quant.calibrated  # nothing was restored


def test_float_model_refuses_a_quantized_checkpoint(saved):
  path, _ = saved
  with pytest.raises(ValueError, match=r"quantizers missing from the model: \['conv/input_quant'"):
    qnnx.restore(path, Net(1))


def test_invalid_mode_in_the_metadata_names_the_quantizer(saved, tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  path = _copy(saved[0], tmp_path)
  meta = json.loads((path / "jaxqat.json").read_text())
  meta["quantizers"]["head/kernel_quant"]["mode"] = "calibrate"
  (path / "jaxqat.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"quantizer 'head/kernel_quant': the checkpoint's "
                     r"mode/flags are invalid \(mode 'calibrate'"):
    qnnx.restore(path, qnnx.quantize(Net(1), RULES))


class _WithDropout(nnx.Module):
  """Holds an RNG stream (a typed key array) in its state."""

  def __init__(self, seed):
    rngs = nnx.Rngs(seed)
    self.lin = nnx.Linear(4, 3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.lin(x))


def test_models_holding_rng_streams_round_trip_with_their_keys(tmp_path):
  x = np.ones((2, 4), np.float32)
  m = _WithDropout(0)
  qnnx.quantize(m)
  qnnx.calibrate(m, [x])
  m.drop.rngs()  # advance the stream: the count and key differ from a fresh model's
  qnnx.save(str(tmp_path / "ck"), m)
  m2 = _WithDropout(7)
  qnnx.quantize(m2)
  qnnx.restore(str(tmp_path / "ck"), m2)
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(m2.drop.rngs.key[...])),
                                np.asarray(jax.random.key_data(m.drop.rngs.key[...])))
  assert int(m2.drop.rngs.count[...]) == int(m.drop.rngs.count[...]) >= 1
  np.testing.assert_array_equal(np.asarray(m2(x)), np.asarray(m(x)))  # same dropout mask too


class _ScaledEmbed(nnx.Embed):
  def __call__(self, ids):
    return super().__call__(ids) * np.float32(np.sqrt(self.features))


class _Tied(nnx.Module):
  def __init__(self, seed, vocab=16):
    self.emb = _ScaledEmbed(vocab, 8, rngs=nnx.Rngs(seed))

  def __call__(self, ids):
    return self.emb.attend(self.emb(ids))


def test_fresh_target_takes_the_output_channels_and_lookups_calibrate_resolved(tmp_path):
  """A tied embedding resolves PerOutputChannel() to its rows in calibrate; a fresh twin
  (not run yet) restores it, and its first call reads the table as the saved model does."""
  from jaxqat.core import PerOutputChannel  # pylint: disable=import-outside-toplevel
  rules = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerOutputChannel(),
                                               learning="lsq"), act=A)]
  ids = np.arange(6).reshape(2, 3)
  m = _Tied(0)
  qnnx.quantize(m, rules)
  qnnx.calibrate(m, [ids])
  assert m.emb.jaxqat_weight_quant["embedding"].spec.granularity == PerChannel(-2)
  qnnx.save(str(tmp_path / "ck"), m)
  bad = _Tied(1, vocab=12)
  qnnx.quantize(bad, rules)
  with pytest.raises(ValueError, match="embedding"):
    qnnx.restore(str(tmp_path / "ck"), bad)
  assert bad.emb.jaxqat_weight_quant["embedding"].spec.granularity == PerChannel(-1)  # unchanged
  m2 = _Tied(1)
  qnnx.quantize(m2, rules)
  qnnx.restore(str(tmp_path / "ck"), m2)
  assert m2.emb.jaxqat_weight_quant["embedding"].spec.granularity == PerChannel(-2)
  np.testing.assert_array_equal(np.asarray(m2(ids)), np.asarray(m(ids)))
