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
from jaxqat.flax.linen._serve import convert as convert
from jaxqat.flax.linen._serve import size_report as size_report
from jaxqat.flax.linen._serve import export_encodings as export_encodings
from jaxqat.flax.linen._serve import save_encodings as save_encodings
from jaxqat.flax.linen._serve import load_encodings as load_encodings
from jaxqat.flax.linen._serve import export_serving as export_serving
from jaxqat.flax.linen._checkpoint import save_served as save_served
from jaxqat.flax.linen._checkpoint import restore_served as restore_served
from jaxqat.flax.linen._sharding import partition_specs as partition_specs
from jaxqat.flax.linen._sharding import shardings as shardings
from jaxqat.flax.linen._qad import qad_train_step as qad_train_step

__all__ = [
    "ActQuant",
    "QuantizedModule",
    "calibrate",
    "convert",
    "export_encodings",
    "export_serving",
    "freeze",
    "layer_paths",
    "load_encodings",
    "mixed_precision",
    "partition_specs",
    "qad_train_step",
    "qat_optimizer",
    "quantize",
    "report",
    "restore",
    "restore_served",
    "save",
    "save_encodings",
    "save_served",
    "sensitivity",
    "set_mode",
    "shardings",
    "size_report",
    "unfreeze",
]
