"""jaxqat.flax.linen: quantization-aware training for unmodified Flax Linen models.

Quick start::

  qmodel = jaxqat.flax.linen.quantize(model)           # W8A8 by default
  variables = qmodel.init(rng, x)                      # params + quant_params + quant_stats
  variables["params"] = float_params                   # the float tree loads unchanged
  variables = jaxqat.flax.linen.calibrate(qmodel, variables, batches)
  variables = jaxqat.flax.linen.freeze(qmodel, variables, x)
  y = qmodel.apply(variables, x)                       # fake-quantized forward

See :func:`quantize` for how layers are found and quantized.
"""

from jaxqat.flax.linen._intercept import UnquantizedLayerWarning as UnquantizedLayerWarning
from jaxqat.flax.linen._module import ActQuant as ActQuant
from jaxqat.flax.linen._module import QuantizedModule as QuantizedModule
from jaxqat.flax.linen._module import default_rules as default_rules
from jaxqat.flax.linen._module import layer_paths as layer_paths
from jaxqat.flax.linen._module import per_output_channel as per_output_channel
from jaxqat.flax.linen._module import quantize as quantize
from jaxqat.flax.linen._workflow import calibrate as calibrate
from jaxqat.flax.linen._workflow import freeze as freeze
from jaxqat.flax.linen._workflow import qat_optimizer as qat_optimizer
from jaxqat.flax.linen._workflow import restore as restore
from jaxqat.flax.linen._workflow import save as save

__all__ = [
    "ActQuant",
    "QuantizedModule",
    "UnquantizedLayerWarning",
    "calibrate",
    "default_rules",
    "freeze",
    "layer_paths",
    "per_output_channel",
    "qat_optimizer",
    "quantize",
    "restore",
    "save",
]
