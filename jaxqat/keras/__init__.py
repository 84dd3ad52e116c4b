"""jaxqat.keras: quantization-aware training for Keras 3, on any backend.

The only part of jaxqat that imports Keras. Layers compute with
``keras.ops`` (on the JAX backend they call the :mod:`jaxqat.core`
primitives directly), so models train with ``model.fit`` on the JAX, torch
and TensorFlow backends and save to ``.keras`` files.

Quick start::

    import keras, jaxqat.keras as jqk
    qmodel = jqk.quantize(model)                 # W8A8 (jaxqat.core.default_rules())
    jqk.calibrate(qmodel, x_calib, steps=8)      # activation ranges
    print(jqk.report(qmodel))                    # every layer with weights, and why
    qmodel.compile(...); qmodel.fit(...)         # QAT
    jqk.save("q.keras", qmodel); qmodel = jqk.restore("q.keras")

Raises:
  ImportError: on import, when Keras cannot import its configured backend
    (set ``KERAS_BACKEND=jax`` or ``torch``, or install the backend).
"""

from jaxqat.keras._backend import keras as _keras  # noqa: F401  (fails early, clearly)
from jaxqat.keras._calibrate import CheckFinite as CheckFinite
from jaxqat.keras._calibrate import FreezeQuantizers as FreezeQuantizers
from jaxqat.keras._calibrate import calibrate as calibrate
from jaxqat.keras._calibrate import check_finite as check_finite
from jaxqat.keras._calibrate import freeze as freeze
from jaxqat.keras._calibrate import quantizers as quantizers
from jaxqat.keras._calibrate import set_mode as set_mode
from jaxqat.keras._calibrate import unfreeze as unfreeze
from jaxqat.keras._convert import quant_layers as quant_layers
from jaxqat.keras._convert import quantize as quantize
from jaxqat.keras._fold import QuantConvBatchNorm as QuantConvBatchNorm
from jaxqat.keras._layers import QuantConv1D as QuantConv1D
from jaxqat.keras._layers import QuantConv1DTranspose as QuantConv1DTranspose
from jaxqat.keras._layers import QuantConv2D as QuantConv2D
from jaxqat.keras._layers import QuantConv2DTranspose as QuantConv2DTranspose
from jaxqat.keras._layers import QuantConv3D as QuantConv3D
from jaxqat.keras._layers import QuantConv3DTranspose as QuantConv3DTranspose
from jaxqat.keras._layers import QuantDense as QuantDense
from jaxqat.keras._layers import QuantDepthwiseConv1D as QuantDepthwiseConv1D
from jaxqat.keras._layers import QuantDepthwiseConv2D as QuantDepthwiseConv2D
from jaxqat.keras._layers import QuantEinsumDense as QuantEinsumDense
from jaxqat.keras._layers import QuantEmbedding as QuantEmbedding
from jaxqat.keras._layers import QuantConvLSTMCell as QuantConvLSTMCell
from jaxqat.keras._layers import QuantGRUCell as QuantGRUCell
from jaxqat.keras._layers import QuantLayer as QuantLayer
from jaxqat.keras._layers import QuantLSTMCell as QuantLSTMCell
from jaxqat.keras._layers import QuantSeparableConv1D as QuantSeparableConv1D
from jaxqat.keras._layers import QuantSeparableConv2D as QuantSeparableConv2D
from jaxqat.keras._layers import QuantSimpleRNNCell as QuantSimpleRNNCell
from jaxqat.keras._layers import quantized_class as quantized_class
from jaxqat.keras._ops import quant_dequant as quant_dequant
from jaxqat.keras._optimizer import QATOptimizer as QATOptimizer
from jaxqat.keras._optimizer import qat_optimizer as qat_optimizer
from jaxqat.keras._quantizer import Quantizer as Quantizer
from jaxqat.keras._report import report as report
from jaxqat.keras._saving import restore as restore
from jaxqat.keras._saving import save as save
from jaxqat.keras._sensitivity import sensitivity as sensitivity
from jaxqat.keras._sensitivity import mixed_precision as mixed_precision
from jaxqat.keras._serve import convert as convert
from jaxqat.keras import _serve_inplace  # noqa: F401  (registers jaxqat>ServedModel)
from jaxqat.keras._serve import size_report as size_report
from jaxqat.keras._serve import export_serving as export_serving
from jaxqat.keras._layers import ComputeModeError as ComputeModeError
from jaxqat.keras._serve import ServedLayer as ServedLayer
from jaxqat.keras._serve import ServedDense as ServedDense
from jaxqat.keras._serve import ServedEinsumDense as ServedEinsumDense
from jaxqat.keras._serve import ServedConv as ServedConv
from jaxqat.keras._serve import ServedConvTranspose as ServedConvTranspose
from jaxqat.keras._serve import ServedDepthwiseConv as ServedDepthwiseConv
from jaxqat.keras._serve import ServedEmbedding as ServedEmbedding
from jaxqat.keras._serve import ServedSeparableConv as ServedSeparableConv
from jaxqat.keras._saving import export_encodings as export_encodings
from jaxqat.keras._saving import save_encodings as save_encodings
from jaxqat.keras._saving import load_encodings as load_encodings
from jaxqat.keras._sharding import follow_layout_map as follow_layout_map
from jaxqat.keras._qad import QADModel as QADModel
from jaxqat.keras._qad import recipe_optimizers as recipe_optimizers
from jaxqat.keras._qad import recipe_schedules as recipe_schedules

__all__ = [
    "CheckFinite",
    "ComputeModeError",
    "FreezeQuantizers",
    "QADModel",
    "QATOptimizer",
    "QuantConv1D",
    "QuantConv1DTranspose",
    "QuantConv2D",
    "QuantConv2DTranspose",
    "QuantConv3D",
    "QuantConv3DTranspose",
    "QuantConvBatchNorm",
    "QuantDense",
    "QuantDepthwiseConv1D",
    "QuantDepthwiseConv2D",
    "QuantEinsumDense",
    "QuantEmbedding",
    "QuantConvLSTMCell",
    "QuantGRUCell",
    "QuantLSTMCell",
    "QuantLayer",
    "QuantSeparableConv1D",
    "QuantSeparableConv2D",
    "QuantSimpleRNNCell",
    "Quantizer",
    "ServedConv",
    "ServedConvTranspose",
    "ServedDense",
    "ServedDepthwiseConv",
    "ServedEinsumDense",
    "ServedSeparableConv",
    "ServedEmbedding",
    "ServedLayer",
    "calibrate",
    "check_finite",
    "convert",
    "export_encodings",
    "export_serving",
    "follow_layout_map",
    "freeze",
    "load_encodings",
    "mixed_precision",
    "qat_optimizer",
    "quant_dequant",
    "quant_layers",
    "quantize",
    "quantized_class",
    "quantizers",
    "recipe_optimizers",
    "recipe_schedules",
    "report",
    "restore",
    "save",
    "save_encodings",
    "sensitivity",
    "set_mode",
    "size_report",
    "unfreeze",
]
