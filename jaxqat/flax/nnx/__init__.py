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
    "calibrate",
    "freeze",
    "intercept",
    "mixed_precision",
    "qat_optimizer",
    "quantize",
    "quantizers",
    "report",
    "restore",
    "save",
    "sensitivity",
    "set_mode",
    "unfreeze",
]
