"""jaxqat.flax.linen: quantization-aware training for unmodified Flax Linen models.

Quick start (the verbs of ``docs/contract.md``)::

  qmodel = ql.quantize(model)                          # W8A8 by default; model untouched
  variables = qmodel.init(rng, x)                      # params + quant_stats (+ quant_params)
  variables["params"] = float_params                   # the float tree loads unchanged
  variables = ql.calibrate(qmodel, variables, batches) # activation ranges, LSQ init
  y = qmodel.apply(variables, x)                       # fake-quantized forward
  tx = ql.qat_optimizer(qmodel, optax.adam(1e-3), optax.adam(1e-4))

See :func:`quantize` for how layers are found and quantized.
"""

from jaxqat.flax.linen._checkpoint import restore as restore
from jaxqat.flax.linen._checkpoint import save as save
from jaxqat.flax.linen._module import ActQuant as ActQuant
from jaxqat.flax.linen._module import QuantizedModule as QuantizedModule
from jaxqat.flax.linen._module import layer_paths as layer_paths
from jaxqat.flax.linen._module import quantize as quantize
from jaxqat.flax.linen._module import set_mode as set_mode
from jaxqat.flax.linen._workflow import calibrate as calibrate
from jaxqat.flax.linen._workflow import freeze as freeze
from jaxqat.flax.linen._workflow import qat_optimizer as qat_optimizer
from jaxqat.flax.linen._workflow import report as report
from jaxqat.flax.linen._workflow import unfreeze as unfreeze
from jaxqat.flax.linen._sensitivity import sensitivity as sensitivity
from jaxqat.flax.linen._sensitivity import mixed_precision as mixed_precision

__all__ = [
    "ActQuant",
    "QuantizedModule",
    "calibrate",
    "freeze",
    "layer_paths",
    "mixed_precision",
    "qat_optimizer",
    "quantize",
    "report",
    "restore",
    "save",
    "sensitivity",
    "set_mode",
    "unfreeze",
]
