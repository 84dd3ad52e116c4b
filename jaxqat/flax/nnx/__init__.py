"""jaxqat.flax.nnx: quantization-aware training for Flax NNX models.

Convert a model written without jaxqat in mind, calibrate, fine-tune, save
(the verbs of ``docs/contract.md``)::

    from jaxqat.flax import nnx as qnnx
    model = qnnx.quantize(model, rules)      # in place; rules=None: W8A8
    qnnx.calibrate(model, batches)           # PTQ: ranges set, model quantized
    opt = nnx.Optimizer(model, qnnx.qat_optimizer(model, tx, quant_tx), wrt=nnx.Param)
    qnnx.save(path, model)
    print(qnnx.report(model))

See :func:`quantize` for how layers are found and converted.
"""

from jaxqat.flax.nnx._checkpoint import restore as restore
from jaxqat.flax.nnx._checkpoint import save as save
from jaxqat.flax.nnx._convert import quantize as quantize
from jaxqat.flax.nnx._intercept import intercept as intercept
from jaxqat.flax.nnx._layers import ActQuant as ActQuant
from jaxqat.flax.nnx._layers import QuantConv as QuantConv
from jaxqat.flax.nnx._layers import QuantEinsum as QuantEinsum
from jaxqat.flax.nnx._layers import QuantEmbed as QuantEmbed
from jaxqat.flax.nnx._layers import QuantLinear as QuantLinear
from jaxqat.flax.nnx._layers import QuantLinearGeneral as QuantLinearGeneral
from jaxqat.flax.nnx._quantizer import Quantizer as Quantizer
from jaxqat.flax.nnx._report import report as report
from jaxqat.flax.nnx._variables import QuantParam as QuantParam
from jaxqat.flax.nnx._variables import QuantStat as QuantStat
from jaxqat.flax.nnx._workflow import calibrate as calibrate
from jaxqat.flax.nnx._workflow import freeze as freeze
from jaxqat.flax.nnx._workflow import qat_optimizer as qat_optimizer
from jaxqat.flax.nnx._workflow import quantizers as quantizers
from jaxqat.flax.nnx._workflow import set_mode as set_mode
from jaxqat.flax.nnx._workflow import unfreeze as unfreeze
from jaxqat.flax.nnx._sensitivity import sensitivity as sensitivity
from jaxqat.flax.nnx._sensitivity import mixed_precision as mixed_precision
from jaxqat.flax.nnx._serve import convert as convert
from jaxqat.flax.nnx._serve import size_report as size_report
from jaxqat.flax.nnx._serve import export_serving as export_serving
from jaxqat.flax.nnx._serve import ServedArray as ServedArray
from jaxqat.flax.nnx._serve import ServedWeight as ServedWeight
from jaxqat.flax.nnx._serve import ServedEncoding as ServedEncoding
from jaxqat.flax.nnx._serve import ServedLinear as ServedLinear
from jaxqat.flax.nnx._serve import ServedLinearGeneral as ServedLinearGeneral
from jaxqat.flax.nnx._serve import ServedEinsum as ServedEinsum
from jaxqat.flax.nnx._serve import ServedConv as ServedConv
from jaxqat.flax.nnx._serve import ServedEmbed as ServedEmbed
from jaxqat.flax.nnx._serve import ServedActQuant as ServedActQuant
from jaxqat.flax.nnx._encodings import export_encodings as export_encodings
from jaxqat.flax.nnx._encodings import save_encodings as save_encodings
from jaxqat.flax.nnx._encodings import load_encodings as load_encodings
from jaxqat.flax.nnx._sharding import follow_weight_shardings as follow_weight_shardings
from jaxqat.flax.nnx._sharding import shardings as shardings
from jaxqat.flax.nnx._qad import qad_train_step as qad_train_step
from jaxqat.flax.nnx._qad import qad_forward as qad_forward

__all__ = [
    "ActQuant",
    "QuantConv",
    "QuantEinsum",
    "QuantEmbed",
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantParam",
    "QuantStat",
    "Quantizer",
    "ServedActQuant",
    "ServedArray",
    "ServedConv",
    "ServedEinsum",
    "ServedEmbed",
    "ServedEncoding",
    "ServedLinear",
    "ServedLinearGeneral",
    "ServedWeight",
    "calibrate",
    "convert",
    "export_encodings",
    "export_serving",
    "follow_weight_shardings",
    "freeze",
    "intercept",
    "load_encodings",
    "mixed_precision",
    "qad_forward",
    "qad_train_step",
    "qat_optimizer",
    "quantize",
    "quantizers",
    "report",
    "restore",
    "save",
    "save_encodings",
    "sensitivity",
    "set_mode",
    "shardings",
    "size_report",
    "unfreeze",
]
