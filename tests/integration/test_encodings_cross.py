"""Encodings cross front ends: a Flax NNX model's encodings load into the equivalent Keras model.

The same MLP weights in Flax NNX and Keras (layers named differently, so the
file's names are mapped with ``names=``), the default W8A8 rules; the NNX
model is calibrated, its encodings (AIMET 1.0.0 layout) are loaded into the
never-calibrated Keras model, and both give the same outputs.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxqat.flax import nnx as qnnx  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
  pytest.skip("the Keras half of this test runs on the JAX backend", allow_module_level=True)
from jaxqat.keras import _saving as keras_enc  # noqa: E402
import jaxqat.keras as jqk  # noqa: E402

nnx_export = getattr(qnnx, "export_encodings", None)
if nnx_export is None:  # pragma: no cover - the NNX verb, not exported yet
  from jaxqat.flax.nnx._encodings import export_encodings as nnx_export

from test_front_end_equivalence import _NnxMLP, _data  # noqa: E402  (the same MLP and data)

NAMES = {"hidden/kernel": "fc1/kernel", "hidden/input": "fc1/input",
         "head/kernel": "fc2/kernel", "head/input": "fc2/input"}


def _keras_mlp(w):
  inp = keras.Input((16,))
  h = keras.layers.Dense(32, activation="relu", name="fc1")(inp)
  model = keras.Model(inp, keras.layers.Dense(4, name="fc2")(h))
  model.get_layer("fc1").set_weights(list(w["hidden"]))
  model.get_layer("fc2").set_weights(list(w["head"]))
  return jqk.quantize(model)


def test_nnx_encodings_load_into_keras():
  w, x, _ = _data()
  nmodel = _NnxMLP(w)
  qnnx.quantize(nmodel)
  qnnx.calibrate(nmodel, [x[:32], x[32:]])
  data = nnx_export(nmodel)
  assert sorted(e["name"] for e in data["activation_encodings"] + data["param_encodings"]) == \
      sorted(NAMES)
  kmodel = _keras_mlp(w)  # never calibrated: the file gives every range
  keras_enc.load_encodings(kmodel, data, names=NAMES)
  y_nnx = np.asarray(nmodel(x))
  y_keras = keras.ops.convert_to_numpy(kmodel(x))
  np.testing.assert_allclose(y_keras, y_nnx, rtol=0, atol=1e-6)
