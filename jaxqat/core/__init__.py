"""jaxqat.core: the numerics, in pure JAX (no Flax, no Keras).

Formats, QuantSpec, the fake-quant primitives (custom_vjp STE, LSQ, LSQ+,
block formats), real quantization, calibration observers and rules.
"""

from jaxqat.core._calibration import Observer as Observer
from jaxqat.core._calibration import calibrate as calibrate
from jaxqat.core._calibration import observer as observer
from jaxqat.core._fake_quant import block_fake_quant as block_fake_quant
from jaxqat.core._fake_quant import block_scales as block_scales
from jaxqat.core._fake_quant import fake_quant as fake_quant
from jaxqat.core._fake_quant import lsq_fake_quant as lsq_fake_quant
from jaxqat.core._fake_quant import lsq_grad_scale as lsq_grad_scale
from jaxqat.core._fake_quant import quant_dequant as quant_dequant
from jaxqat.core._formats import BlockFormat as BlockFormat
from jaxqat.core._formats import FloatFormat as FloatFormat
from jaxqat.core._formats import IntFormat as IntFormat
from jaxqat.core._formats import get_format as get_format
from jaxqat.core._quantize import QTensor as QTensor
from jaxqat.core._quantize import dequantize as dequantize
from jaxqat.core._quantize import pack as pack
from jaxqat.core._quantize import quantize as quantize
from jaxqat.core._quantize import unpack as unpack
from jaxqat.core._rules import Rule as Rule
from jaxqat.core._rules import RuleSet as RuleSet
from jaxqat.core._rules import UnusedRuleWarning as UnusedRuleWarning
from jaxqat.core._spec import Calibration as Calibration
from jaxqat.core._spec import PerBlock as PerBlock
from jaxqat.core._spec import PerOutputChannel as PerOutputChannel
from jaxqat.core._spec import PerChannel as PerChannel
from jaxqat.core._spec import PerTensor as PerTensor
from jaxqat.core._spec import QuantSpec as QuantSpec
from jaxqat.core._spec import normalize_axes as normalize_axes

__all__ = [
    "BlockFormat",
    "Calibration",
    "FloatFormat",
    "IntFormat",
    "Observer",
    "PerBlock",
    "PerOutputChannel",
    "PerChannel",
    "PerTensor",
    "QTensor",
    "QuantSpec",
    "Rule",
    "RuleSet",
    "UnusedRuleWarning",
    "block_fake_quant",
    "block_scales",
    "calibrate",
    "dequantize",
    "fake_quant",
    "get_format",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "normalize_axes",
    "observer",
    "pack",
    "quant_dequant",
    "quantize",
    "unpack",
]
