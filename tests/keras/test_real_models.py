"""quantize on models shaped like published ones (issue 14), written here in plain Keras.

Each pattern: Functional with op nodes, a third-party layer whose config holds a
derived key, a subclassed model, a block holding sublayers (attention included),
a Functional subclass plugged into a wrapper, an embedding-like layer and a
Conv+BatchNorm inside a custom layer. These tests also run on the torch backend
(test_keras_backends.py runs this folder again with KERAS_BACKEND=torch).
"""

import os
import warnings

import keras
import numpy as np
import pytest

import jaxqat.keras as jqk
from jaxqat.core import QuantizationWarning
from jaxqat.keras import _graph
from kutil import to_np

_WEIGHT_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv1D,
                  keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Embedding)


def _assert_all_matmul_weights_quantized(q):
  """Walks the model: every Dense/EinsumDense/Conv/DepthwiseConv/Embedding is quantized,
  and the report says so, with its kernel/embedding quantized."""
  rep = jqk.report(q)
  found = 0
  for _, path, layer in _graph.walk(q, stop=lambda l: isinstance(l, (jqk.QuantLayer,
                                                                     jqk.QuantConvBatchNorm))):
    if isinstance(layer, _WEIGHT_LAYERS) or isinstance(layer, jqk.QuantConvBatchNorm):
      found += 1
      assert isinstance(layer, (jqk.QuantLayer, jqk.QuantConvBatchNorm)), (path, type(layer))
      entry = rep[path]
      assert entry.status == "quantized", (path, entry)
      assert [w.name for w in entry.weights if w.quantized], (path, entry)
  assert found > 0
  return rep


def _fit_twice_equal(q, x, y, tmp_path):
  """Train 2 steps, save, load; one more step on each: outputs and weights identical."""
  q.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  q.fit(x, y, epochs=2, batch_size=len(x), verbose=0)
  path = os.path.join(str(tmp_path), "q.keras")
  jqk.save(path, q)
  r = jqk.restore(path)
  np.testing.assert_array_equal(to_np(r(x)), to_np(q(x)))
  assert [v.path for v in r.trainable_variables] == [v.path for v in q.trainable_variables]
  assert len(r.optimizer.variables) == len(q.optimizer.variables)
  for a, b in zip(r.optimizer.variables, q.optimizer.variables):
    np.testing.assert_array_equal(to_np(a), to_np(b))
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
  jqk.calibrate(q, [x])
  out = to_np(q(x))
  assert 0 < np.abs(out - ref).max() < 0.05 * max(1.0, np.abs(ref).max())
  y = np.random.RandomState(1).randn(8, 3).astype("float32")
  _fit_twice_equal(q, x, y, tmp_path)
