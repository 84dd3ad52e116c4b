"""jaxqat.flax.nnx: quantization-aware training for Flax NNX models.

Convert a model written without jaxqat in mind, calibrate, fine-tune, save::

    from jaxqat.flax import nnx as qnnx
    model = qnnx.quantize(model, rules)        # in place; rules=None: W8A8
    qnnx.calibrate(model, batches)             # PTQ: observe, then freeze
    # QAT: nnx.Optimizer(model, tx, wrt=nnx.Param) trains weights + LSQ scales
    qnnx.save_checkpoint(path, model)

See :func:`quantize` for how layers are found and converted.
"""

from jaxqat.flax.nnx._checkpoint import restore_checkpoint as restore_checkpoint
from jaxqat.flax.nnx._checkpoint import save_checkpoint as save_checkpoint
from jaxqat.flax.nnx._convert import QuantizationReport as QuantizationReport
from jaxqat.flax.nnx._convert import QuantizationWarning as QuantizationWarning
from jaxqat.flax.nnx._convert import default_act_spec as default_act_spec
from jaxqat.flax.nnx._convert import default_rules as default_rules
from jaxqat.flax.nnx._convert import default_weight_spec as default_weight_spec
from jaxqat.flax.nnx._convert import per_output_channel as per_output_channel
from jaxqat.flax.nnx._convert import quantize as quantize
from jaxqat.flax.nnx._intercept import intercept as intercept
from jaxqat.flax.nnx._layers import ActQuant as ActQuant
from jaxqat.flax.nnx._layers import QuantConv as QuantConv
from jaxqat.flax.nnx._layers import QuantEinsum as QuantEinsum
from jaxqat.flax.nnx._layers import QuantEmbed as QuantEmbed
from jaxqat.flax.nnx._layers import QuantLinear as QuantLinear
from jaxqat.flax.nnx._layers import QuantLinearGeneral as QuantLinearGeneral
from jaxqat.flax.nnx._quantizer import Quantizer as Quantizer
from jaxqat.flax.nnx._variables import QuantParam as QuantParam
from jaxqat.flax.nnx._variables import QuantStat as QuantStat
from jaxqat.flax.nnx._workflow import calibrate as calibrate
from jaxqat.flax.nnx._workflow import freeze as freeze
from jaxqat.flax.nnx._workflow import param_labels as param_labels
from jaxqat.flax.nnx._workflow import quantizers as quantizers
from jaxqat.flax.nnx._workflow import set_mode as set_mode

__all__ = [
    "ActQuant",
    "QuantConv",
    "QuantEinsum",
    "QuantEmbed",
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantParam",
    "QuantStat",
    "QuantizationReport",
    "QuantizationWarning",
    "Quantizer",
    "calibrate",
    "default_act_spec",
    "default_rules",
    "default_weight_spec",
    "freeze",
    "intercept",
    "param_labels",
    "per_output_channel",
    "quantize",
    "quantizers",
    "restore_checkpoint",
    "save_checkpoint",
    "set_mode",
]
