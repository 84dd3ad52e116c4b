"""quantize on models shaped like published ones (issue 14), written here in plain Keras.

Each pattern: Functional with op nodes, a third-party layer whose config holds a
derived key, a subclassed model, a block holding sublayers (attention included),
a Functional subclass plugged into a wrapper, an embedding-like layer and a
Conv+BatchNorm inside a custom layer. These tests also run on the torch backend
(test_keras_backends.py runs this folder again with KERAS_BACKEND=torch).
"""

import os
import tempfile
import warnings

import keras
import numpy as np
import pytest

import jaxqat.keras as jqk
from jaxqat.core import QuantizationWarning
from jaxqat.keras import _graph
from kutil import ReversibleEmbedding, to_np

_WEIGHT_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D,
                  keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Embedding)


def _assert_all_matmul_weights_quantized(q):
  """Walks the model: every Dense/EinsumDense/Conv/DepthwiseConv/Embedding is quantized,
  and the report agrees (one quantized entry each, its kernel/table quantized; no layer of
  those types reported float)."""
  rep = jqk.report(q)
  found = []
  for _, path, layer in _graph.walk(q, stop=lambda l: isinstance(l, (jqk.QuantLayer,
                                                                     jqk.QuantConvBatchNorm))):
    if isinstance(layer, _WEIGHT_LAYERS) or isinstance(layer, jqk.QuantConvBatchNorm):
      assert isinstance(layer, (jqk.QuantLayer, jqk.QuantConvBatchNorm)), (path, type(layer))
      found.append(layer)
  assert found
  quantized = [l for l in rep.layers if l.status == "quantized"]
  assert len(quantized) >= len(found)  # + embedding-like layers of other classes
  assert all(any(w.quantized for w in l.weights) for l in quantized), rep
  names = {c.__name__ for c in _WEIGHT_LAYERS}
  assert not [l for l in rep.layers if l.status != "quantized" and l.layer_type in names], rep
  return rep


def _save_load_equal(q, x, y, tmp_path, resume=True):
  """Train a step, save, load: same outputs, variables and optimizer state; with ``resume``,
  one more step on each gives the same outputs again."""
  q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  q.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
  path = os.path.join(str(tmp_path), "q.keras")
  jqk.save(path, q)
  r = jqk.restore(path)
  np.testing.assert_array_equal(to_np(r(x)), to_np(q(x)))
  # Same variables in the same order (paths hold per-process auto names: compare names, shapes).
  assert [(v.name, tuple(v.shape)) for v in r.trainable_variables] == \
      [(v.name, tuple(v.shape)) for v in q.trainable_variables]
  assert len(r.optimizer.variables) == len(q.optimizer.variables)
  for a, b in zip(r.optimizer.variables, q.optimizer.variables):
    np.testing.assert_array_equal(to_np(a), to_np(b))
  if resume:
    q.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    r.fit(x, y, epochs=1, batch_size=len(x), verbose=0)
    np.testing.assert_allclose(to_np(r(x)), to_np(q(x)), rtol=1e-5, atol=1e-6)
  return r


# -- 14.1: Functional graphs with op nodes ----------------------------------------


def _ops_model():
  keras.utils.set_random_seed(0)
  ids = keras.Input((6,), dtype="int32")
  e = keras.layers.Embedding(20, 8, name="tok")(ids)
  e = e * float(np.sqrt(8.0))                       # embedding scaled by sqrt(d)
  h = keras.layers.Dense(8, name="d1")(e)
  h = keras.layers.ReLU(6.0)(h + 3.0) / 6.0          # hard sigmoid from operators
  g = keras.ops.clip(keras.layers.Dense(8, name="gate")(e) * 0.2 + 0.5, 0.0, 1.0)  # keras.ops
  out = keras.layers.Dense(3, name="head")(keras.ops.mean(h * g, axis=1))
  return keras.Model(ids, out)


def test_functional_with_op_nodes_converts(tmp_path):
  model = _ops_model()
  x = np.random.RandomState(0).randint(0, 20, (8, 6)).astype("int32")
  ref = to_np(model(x))
  q = jqk.quantize(model)
  assert type(model.get_layer("d1")) is keras.layers.Dense  # the original is untouched
  rep = _assert_all_matmul_weights_quantized(q)
  assert sorted(rep.quantized_paths()) == ["d1", "gate", "head", "tok"]
  jqk.calibrate(q, x)
  out = to_np(q(x))
  assert 0 < np.abs(out - ref).max() < 0.05 * max(1.0, np.abs(ref).max())
  path = os.path.join(str(tmp_path), "ops.keras")
  jqk.save(path, q)
  np.testing.assert_array_equal(to_np(jqk.restore(path)(x)), out)


# -- 14.2 / 14.5 / 14.7: third-party layers, a Functional-subclass backbone, a wrapper ----------


@keras.saving.register_keras_serializable(package="jaxqat_test")
class DerivedKeyProjection(keras.layers.Layer):
  """A third-party layer whose get_config() holds a derived key __init__ does not take."""

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.inv_sqrt_units = 1.0 / float(np.sqrt(units))
    self.proj = keras.layers.Dense(units, name="proj")

  def build(self, input_shape):
    self.proj.build(input_shape)

  def call(self, x):
    return self.proj(x) * self.inv_sqrt_units

  def get_config(self):
    config = super().get_config()
    config.update(units=self.units, inv_sqrt_units=self.inv_sqrt_units)  # not an __init__ arg
    return config


@keras.saving.register_keras_serializable(package="jaxqat_test")
class PositionEmbedding(keras.layers.Layer):
  """Holds a (sequence, dim) table that it slices (as model-zoo position embeddings do)."""

  def __init__(self, sequence_length, **kwargs):
    super().__init__(**kwargs)
    self.sequence_length = sequence_length

  def build(self, input_shape):
    self.position_embeddings = self.add_weight(
        name="embeddings", shape=(self.sequence_length, input_shape[-1]),
        initializer="random_normal")

  def call(self, x):
    return keras.ops.broadcast_to(self.position_embeddings[: x.shape[1]], keras.ops.shape(x))

  def get_config(self):
    return {**super().get_config(), "sequence_length": self.sequence_length}


@keras.saving.register_keras_serializable(package="jaxqat_test")
class Backbone(keras.Model):
  """A Functional subclass, rebuilt from its constructor arguments (a model-zoo backbone)."""

  def __init__(self, vocab=16, dim=8, length=5, **kwargs):
    ids = keras.Input((length,), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab, dim, name="tok")(ids)
    x = x + PositionEmbedding(length, name="pos")(x)
    x = DerivedKeyProjection(dim, name="derived")(x)
    h = keras.layers.Dense(dim, name="ffn")(x)
    x = x + h * keras.ops.sigmoid(h)
    super().__init__(ids, x, **kwargs)
    self.vocab, self.dim, self.length = vocab, dim, length

  def get_config(self):
    return {"vocab": self.vocab, "dim": self.dim, "length": self.length, "name": self.name}


@keras.saving.register_keras_serializable(package="jaxqat_test")
class CausalLM(keras.Model):
  """A task model built around a backbone passed as an argument."""

  def __init__(self, backbone, **kwargs):
    ids = keras.Input((backbone.length,), dtype="int32")
    logits = keras.layers.Dense(backbone.vocab, name="lm_head")(backbone(ids))
    super().__init__(ids, logits, **kwargs)
    self.backbone = backbone

  def get_config(self):
    return {"backbone": keras.saving.serialize_keras_object(self.backbone), "name": self.name}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
    return cls(**config)


def test_functional_subclass_keeps_its_class_and_plugs_into_a_task_model(tmp_path):
  keras.utils.set_random_seed(0)
  backbone = Backbone()
  ids = np.random.RandomState(0).randint(0, 16, (4, 5)).astype("int32")
  ref = to_np(backbone(ids))
  q = jqk.quantize(backbone)
  assert isinstance(q, Backbone) and q is not backbone  # rebuilt through its own class
  assert type(backbone.get_layer("ffn")) is keras.layers.Dense  # the original is untouched
  np.testing.assert_array_equal(to_np(backbone(ids)), ref)
  rep = _assert_all_matmul_weights_quantized(q)
  assert sorted(rep.quantized_paths()) == ["derived/proj", "ffn", "pos", "tok"]
  assert "rebuilt as Backbone" in rep["ffn"].reason
  pos = rep["pos"]  # embedding-like: its table fake-quantized per row when read
  assert [(w.name, w.quantized) for w in pos.weights] == [("embeddings", True)]
  assert pos.weights[0].spec.granularity.axes == (0,)
  jqk.calibrate(q, ids)
  lm = CausalLM(q)
  y = np.random.RandomState(1).randn(4, 5, 16).astype("float32")
  r = _save_load_equal(lm, ids, y, tmp_path, resume=False)
  assert isinstance(r.backbone, Backbone)
  assert isinstance(r.backbone.get_layer("derived").proj, jqk.QuantDense)
  assert jqk.report(r.backbone)["pos"].status == "quantized"


def test_layer_with_derived_config_key_falls_back_to_in_place():
  keras.utils.set_random_seed(0)
  inp = keras.Input((6,))
  out = keras.layers.Dense(3, name="head")(DerivedKeyProjection(4, name="derived")(inp))
  model = keras.Model(inp, out)
  derived = model.get_layer("derived")
  with pytest.warns(QuantizationWarning, match=r"converted in place: the model could not be "
                                               r"copied \(layer 'derived'"):
    q = jqk.quantize(model)
  assert q is model and model.get_layer("derived") is derived  # nothing re-instantiated
  rep = _assert_all_matmul_weights_quantized(q)
  assert sorted(rep.quantized_paths()) == ["derived/proj", "head"]
  assert rep["head"].reason.startswith("converted in place")


# -- 14.3: in-place conversions survive save/load ---------------------------------------


@keras.saving.register_keras_serializable(package="jaxqat_test")
class ConvBlock(keras.layers.Layer):
  """Conv + BatchNorm inside a custom layer (not foldable: reported)."""

  def __init__(self, filters, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)
    self.bn = keras.layers.BatchNormalization()
    self.dw = keras.layers.DepthwiseConv2D(3, padding="same")

  def call(self, x, training=None):
    h = keras.activations.relu(self.bn(self.conv(x), training=training))
    return self.dw(h)

  def get_config(self):
    return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="jaxqat_test")
class SmallNet(keras.Model):
  """A subclassed model written the ordinary way: sublayers as attributes and in a list."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.block = ConvBlock(4)
    self.pool = keras.layers.GlobalAveragePooling2D()
    self.heads = [keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)]

  def call(self, x, training=None):
    h = self.pool(self.block(x, training=training))
    for layer in self.heads:
      h = layer(h)
    return h


def test_subclassed_model_keeps_its_class_and_reloads_quantized(tmp_path):
  keras.utils.set_random_seed(0)
  model = SmallNet()
  x = np.random.RandomState(0).randn(4, 6, 6, 3).astype("float32")
  model(x)
  q = jqk.quantize(model)
  assert q is model and isinstance(q, SmallNet)
  rep = _assert_all_matmul_weights_quantized(q)
  assert len(rep.quantized_paths()) == 4  # conv, depthwise, two heads
  bn = [l for l in rep.layers if l.layer_type == "BatchNormalization"]
  assert len(bn) == 1 and bn[0].reason.startswith("not folded: it sits inside ConvBlock")
  with pytest.raises(ValueError, match="is quantized already"):
    jqk.quantize(q)
  jqk.calibrate(q, x)
  y = np.random.RandomState(1).randn(4, 2).astype("float32")
  r = _save_load_equal(q, x, y, tmp_path)
  assert isinstance(r, SmallNet) and isinstance(r.heads[1], jqk.QuantDense)
  # Same layers quantized (paths hold per-process auto names: compare types and specs).
  assert [(l.layer_type, l.status, [w.spec for w in l.weights]) for l in jqk.report(r).layers] \
      == [(l.layer_type, l.status, [w.spec for w in l.weights]) for l in jqk.report(q).layers]


@keras.saving.register_keras_serializable(package="jaxqat_test")
class EncoderBlock(keras.layers.Layer):
  """A transformer block: attention and a feed-forward list, created in __init__."""

  def __init__(self, dim, **kwargs):
    super().__init__(**kwargs)
    self.dim = dim
    self.attn = keras.layers.MultiHeadAttention(2, dim // 2)
    self.norm = keras.layers.LayerNormalization()
    self.ffn = [keras.layers.Dense(2 * dim, activation="gelu"), keras.layers.Dense(dim)]

  def call(self, x):
    x = self.norm(x + self.attn(x, x))
    h = x
    for layer in self.ffn:
      h = layer(h)
    return x + h

  def get_config(self):
    return {**super().get_config(), "dim": self.dim}


def test_block_holding_attention_reloads_quantized(tmp_path):
  keras.utils.set_random_seed(0)
  inp = keras.Input((5, 8))
  model = keras.Model(inp, keras.layers.Dense(2, name="head")(EncoderBlock(8, name="enc")(inp)))
  x = np.random.RandomState(0).randn(4, 5, 8).astype("float32")
  q = jqk.quantize(model)
  rep = _assert_all_matmul_weights_quantized(q)
  assert len(rep.quantized_paths()) == 7  # q, k, v, output, two ffn, head
  assert rep["head"].reason == "copied as QuantDense"
  # Inside the copied block, in place, under the path of the original (rules see those).
  query = rep["enc/" + model.get_layer("enc").attn.name + "/query"]
  assert query.reason == "converted in place, inside the copy"
  jqk.calibrate(q, x)
  y = np.random.RandomState(1).randn(4, 5, 2).astype("float32")
  r = _save_load_equal(q, x, y, tmp_path)
  assert isinstance(r.get_layer("enc").attn._query_dense, jqk.QuantEinsumDense)


# -- contract details -----------------------------------------------------------------


def test_nothing_quantized_warns_and_quantize_is_quiet_on_every_backend():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
  from jaxqat.core import Rule
  with pytest.warns(QuantizationWarning, match="no layer of model .* was quantized"):
    jqk.quantize(model, [Rule(pattern="other", skip=True)])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jqk.quantize(model)
  assert not [str(w.message) for w in caught], [str(w.message)[:200] for w in caught]


def test_a_saved_record_that_does_not_match_the_model_is_a_clear_error(tmp_path):
  from jaxqat.keras import _saving
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  gone = {"at": [["#layers", 5]], "path": "gone", "weight": None, "act": None}
  with pytest.raises(ValueError, match=r"layer 'gone': the loaded model has no layer at "
                                       r"layers\[5\]"):
    _saving.reapply(model, {"version": _saving.RECORD_VERSION, "in_place": [gone]})
  with pytest.raises(ValueError, match="expected version 1, got 99"):
    _saving.reapply(model, {"version": 99, "in_place": []})
  with pytest.raises(ValueError, match=r"path: must end in '.keras'"):
    jqk.save(os.path.join(str(tmp_path), "q.h5"), jqk.quantize(model))


def test_a_users_own_quantizer_layer_does_not_make_a_model_quantized():
  from jaxqat.core import QuantSpec
  model = keras.Sequential([keras.Input((4,)), jqk.Quantizer(QuantSpec(), name="act_q"),
                            keras.layers.Dense(3, name="d")])
  q = jqk.quantize(model)
  assert type(q.get_layer("d")) is jqk.QuantDense and type(q.get_layer("act_q")) is jqk.Quantizer


class UnrebuildableBackbone(keras.Model):
  """A Functional subclass whose config cannot rebuild it (its __init__ needs an argument)."""

  def __init__(self, width):
    inp = keras.Input((4,))
    super().__init__(inp, keras.layers.Dense(width, name="proj")(inp))


def test_functional_subclass_that_cannot_be_rebuilt_is_converted_in_place():
  keras.utils.set_random_seed(0)
  model = UnrebuildableBackbone(3)
  with pytest.warns(QuantizationWarning, match="the float model is now the quantized one"):
    q = jqk.quantize(model)
  assert q is model and isinstance(q, UnrebuildableBackbone)
  assert isinstance(q.get_layer("proj"), jqk.QuantDense)
  rep = jqk.report(q)
  assert rep["proj"].reason.startswith("converted in place: UnrebuildableBackbone could not be "
                                       "rebuilt from its config")


# -- convert: layers inside custom layers and subclasses of Keras layers, served in place --------


def test_convert_serves_layers_inside_custom_layers_in_place_and_reloads(tmp_path):
  keras.utils.set_random_seed(0)
  ids = np.random.RandomState(0).randint(0, 16, (4, 5)).astype("int32")
  q = jqk.quantize(Backbone())
  jqk.calibrate(q, ids)
  ref = to_np(q(ids))
  served = jqk.convert(q)
  # The QAT model is untouched: same classes, same output.
  assert type(q.get_layer("derived").proj).__name__ == "QuantDense"
  np.testing.assert_array_equal(to_np(q(ids)), ref)
  # The copy keeps its class; every quantized layer holds codes and scales, no float weight.
  assert isinstance(served, Backbone)
  proj = served.get_layer("derived").proj
  assert type(proj).__name__ == "InPlaceServedDense" and isinstance(proj, keras.layers.Dense)
  names = {v.name: str(v.dtype) for v in proj.weights}
  assert names == {"bias": "float32", "kernel_codes": "int8", "kernel_scale": "float32",
                   "input_scale": "float32", "input_zero_point": "int32"}, names
  pos = served.get_layer("pos")
  assert [v.name for v in pos.weights] == ["position_embeddings_codes", "position_embeddings_scale"]
  assert not [v for _, _, l in _graph.walk(served) for v in _graph.own_weights(l)
              if len(v.shape) >= 2 and str(v.dtype) == "float32" and not v.name.endswith("scale")]
  # The values of the QAT model in inference: dequantized weights, fixed input ranges.
  out = to_np(served(ids))
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  rep = jqk.size_report(served)
  rows = {r.layer: r for r in rep.rows}
  assert rows["derived/proj/kernel"].format == "int8_narrow"
  assert rows["derived/proj/kernel"].quant_bytes == 8 * 8 + 8 * 4  # codes + one scale a column
  assert rows["pos/position_embeddings"].quant_bytes == 5 * 8 + 5 * 4
  # The .keras file holds the codes and reloads through the model's own class.
  path = str(tmp_path / "served.keras")
  served.save(path)
  back = keras.saving.load_model(path)
  assert isinstance(back, Backbone)
  assert type(back.get_layer("pos")).__name__ == "InPlaceServedPositionEmbedding"
  np.testing.assert_array_equal(to_np(back(ids)), out)


def test_convert_serves_a_subclass_with_its_own_call_in_place():
  keras.utils.set_random_seed(0)
  ids = keras.Input((5,), dtype="int32")
  emb = ReversibleEmbedding(16, 8, name="emb")
  h = keras.layers.Dense(8, name="ffn")(emb(ids))
  model = keras.Model(ids, emb(h, reverse=True))
  x = np.random.RandomState(0).randint(0, 16, (4, 5)).astype("int32")
  q = jqk.quantize(model)
  jqk.calibrate(q, x)
  served = jqk.convert(q)
  assert type(served.get_layer("emb")).__name__ == "InPlaceServedReversibleEmbedding"
  assert str(served.get_layer("emb").embeddings_codes.dtype) == "int8"
  np.testing.assert_allclose(to_np(served(x)), to_np(q(x)), rtol=1e-6, atol=1e-6)
  path = os.path.join(tempfile.mkdtemp(), "served.keras")
  served.save(path)
  back = keras.saving.load_model(path)
  assert type(back.get_layer("emb")).__name__ == "InPlaceServedReversibleEmbedding"
  np.testing.assert_array_equal(to_np(back(x)), to_np(served(x)))
  # A folded Conv+BatchNorm has no in-place serving: a clear error, nothing returned.
  inp = keras.Input((6, 6, 2))
  c = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inp))
  ids2 = keras.Input((5,), dtype="int32")
  out = keras.layers.Dense(2)(keras.layers.Flatten()(c)) + keras.ops.sum(
      ReversibleEmbedding(16, 2, name="emb2")(ids2), axis=1)
  qb = jqk.quantize(keras.Model([inp, ids2], out), fold_batchnorm=True)
  jqk.calibrate(qb, [np.ones((2, 6, 6, 2), "float32"), x[:2]])
  with pytest.raises(NotImplementedError, match="folded Conv\\+BatchNorm cannot be served"):
    jqk.convert(qb)


# -- untied output projections, and embedding-like layers holding a projection ------------------


def test_untied_reversible_embedding_quantizes_its_output_projection():
  keras.utils.set_random_seed(0)
  ids = keras.Input((5,), dtype="int32")
  emb = keras.layers.ReversibleEmbedding(16, 8, tie_weights=False, name="emb")
  model = keras.Model(ids, emb(keras.layers.Dense(8, name="ffn")(emb(ids)), reverse=True))
  x = np.random.RandomState(0).randint(0, 16, (4, 5)).astype("int32")
  q = jqk.quantize(model)
  rep = jqk.report(q)["emb"]
  assert [(w.name, w.quantized) for w in rep.weights] == [("embeddings", True),
                                                          ("reverse_embeddings", True)]
  assert rep.weights[1].spec.granularity.axes == (1,)  # one scale per output logit
  jqk.calibrate(q, x)
  layer = q.get_layer("emb")
  w = to_np(layer.reverse_embeddings)
  s = to_np(layer.reverse_embeddings_quantizer.scale)
  assert s.shape == (1, 16)
  wq = np.clip(np.round(w / s), -127, 127) * s
  h = to_np(q.get_layer("ffn")(to_np(layer(x))))
  np.testing.assert_allclose(to_np(q(x)), h @ wq, rtol=1e-5, atol=1e-5)
  served = jqk.convert(q)
  assert str(served.get_layer("emb").reverse_embeddings_codes.dtype) == "int8"
  np.testing.assert_allclose(to_np(served(x)), to_np(q(x)), rtol=1e-6, atol=1e-6)


@keras.saving.register_keras_serializable(package="jaxqat_test")
class PatchEmbedding(keras.layers.Layer):
  """A vision model's embeddings: a patch projection (Conv2D) plus a learned position table."""

  def __init__(self, dim, **kwargs):
    super().__init__(**kwargs)
    self.dim = dim
    self.projection = keras.layers.Conv2D(dim, 4, strides=4, name="projection")

  def build(self, input_shape):
    self.projection.build(input_shape)
    n = (input_shape[1] // 4) * (input_shape[2] // 4)
    self.position_embeddings = self.add_weight(name="position_embeddings", shape=(1, n, self.dim),
                                               initializer="random_normal")

  def call(self, images):
    p = self.projection(images)
    return keras.ops.reshape(p, (-1, p.shape[1] * p.shape[2], self.dim)) + self.position_embeddings

  def get_config(self):
    return {**super().get_config(), "dim": self.dim}


def test_embedding_like_layer_quantizes_the_projection_it_holds(tmp_path):
  keras.utils.set_random_seed(0)
  images = keras.Input((8, 8, 3))
  model = keras.Model(images, keras.layers.Dense(4, name="head")(PatchEmbedding(6, name="patch")(
      images)))
  x = np.random.RandomState(0).rand(2, 8, 8, 3).astype("float32")
  q = jqk.quantize(model)
  rep = jqk.report(q)
  assert sorted(rep.quantized_paths()) == ["head", "patch", "patch/projection"]
  assert type(q.get_layer("patch").projection).__name__ == "QuantConv2D"
  jqk.calibrate(q, x)
  served = jqk.convert(q)
  proj = served.get_layer("patch").projection
  assert type(proj).__name__ == "InPlaceServedConv2D" and str(proj.kernel_codes.dtype) == "int8"
  np.testing.assert_allclose(to_np(served(x)), to_np(q(x)), rtol=1e-6, atol=1e-6)
  path = str(tmp_path / "q.keras")
  jqk.save(path, q)
  back = jqk.restore(path)
  assert type(back.get_layer("patch").projection).__name__ == "QuantConv2D"
  np.testing.assert_array_equal(to_np(back(x)), to_np(q(x)))
