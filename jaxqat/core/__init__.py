"""jaxqat.core: the numerics, in pure JAX (no Flax, no Keras).

Formats, QuantSpec, the fake-quant primitives (custom_vjp STE, LSQ, LSQ+,
block formats), real quantization, calibration observers and rules.
"""

from jaxqat.core._calibration import Observer as Observer
from jaxqat.core._calibration import calibrate as calibrate
from jaxqat.core._calibration import observer as observer
from jaxqat.core._calibration import weight_range as weight_range
from jaxqat.core._defaults import default_act_spec as default_act_spec
from jaxqat.core._defaults import default_rules as default_rules
from jaxqat.core._defaults import default_weight_spec as default_weight_spec
from jaxqat.core._report import LayerReport as LayerReport
from jaxqat.core._report import QuantizationReport as QuantizationReport
from jaxqat.core._report import QuantizationWarning as QuantizationWarning
from jaxqat.core._report import WeightReport as WeightReport
from jaxqat.core._serialize import spec_fingerprint as spec_fingerprint
from jaxqat.core._serialize import spec_from_dict as spec_from_dict
from jaxqat.core._serialize import spec_to_dict as spec_to_dict
from jaxqat.core._step_size import init_step_size as init_step_size
from jaxqat.core._step_size import param_to_step_size as param_to_step_size
from jaxqat.core._step_size import step_size_to_param as step_size_to_param
from jaxqat.core._encoding import Encoding as Encoding
from jaxqat.core._encoding import encoding_from_state as encoding_from_state
from jaxqat.core._encoding import encodings_from_dict as encodings_from_dict
from jaxqat.core._encoding import encodings_to_dict as encodings_to_dict
from jaxqat.core._export import SizeReport as SizeReport
from jaxqat.core._export import SizeRow as SizeRow
from jaxqat.core._export import export_serving as export_serving
from jaxqat.core._export import load_serving as load_serving
from jaxqat.core._export import size_row as size_row
from jaxqat.core._integer import fake_quantize_input as fake_quantize_input
from jaxqat.core._integer import integer_error_bound as integer_error_bound
from jaxqat.core._integer import integer_forward as integer_forward
from jaxqat.core._integer import unclipped_weight as unclipped_weight
from jaxqat.core._integer import integer_reason as integer_reason
from jaxqat.core._integer import quantize_weight as quantize_weight
from jaxqat.core._integer import quantized_conv_general_dilated as quantized_conv_general_dilated
from jaxqat.core._integer import quantized_conv_transpose as quantized_conv_transpose
from jaxqat.core._integer import quantized_dot_general as quantized_dot_general
from jaxqat.core._integer import quantized_einsum as quantized_einsum
from jaxqat.core._integer import quantized_take as quantized_take
from jaxqat.core._distill import distillation_loss as distillation_loss
from jaxqat.core._distill import feature_distillation as feature_distillation
from jaxqat.core._distill import kl_distillation as kl_distillation
from jaxqat.core._recipe import QATRecipe as QATRecipe
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
from jaxqat.core._quantize import pack_qtensor as pack_qtensor
from jaxqat.core._quantize import quantize as quantize
from jaxqat.core._quantize import unpack as unpack
from jaxqat.core._rules import Rule as Rule
from jaxqat.core._rules import RuleSet as RuleSet
from jaxqat.core._spec import Calibration as Calibration
from jaxqat.core._spec import PerBlock as PerBlock
from jaxqat.core._spec import PerOutputChannel as PerOutputChannel
from jaxqat.core._spec import PerChannel as PerChannel
from jaxqat.core._spec import PerTensor as PerTensor
from jaxqat.core._spec import QuantSpec as QuantSpec
from jaxqat.core._spec import normalize_axes as normalize_axes
from jaxqat.core._sensitivity import SensitivityTable as SensitivityTable
from jaxqat.core._sensitivity import SensitivityRow as SensitivityRow
from jaxqat.core._sensitivity import MixedPrecision as MixedPrecision
from jaxqat.core._sensitivity import sensitivity as sensitivity
from jaxqat.core._sensitivity import selective_rules as selective_rules
from jaxqat.core._sensitivity import mixed_precision as mixed_precision
from jaxqat.core._sensitivity import search_mixed_precision as search_mixed_precision
from jaxqat.core._sensitivity import weight_bytes as weight_bytes
from jaxqat.core._sharding import scale_partition_spec as scale_partition_spec
from jaxqat.core._sharding import follow_shape as follow_shape
from jaxqat.core._sharding import state_shardings as state_shardings
from jaxqat.core._distill import QADLoss as QADLoss
from jaxqat.core._encoding import read_encodings as read_encodings
from jaxqat.core._qat_op import qat_op as qat_op

__all__ = [
    "BlockFormat",
    "Calibration",
    "Encoding",
    "FloatFormat",
    "IntFormat",
    "LayerReport",
    "MixedPrecision",
    "Observer",
    "PerBlock",
    "PerChannel",
    "PerOutputChannel",
    "PerTensor",
    "QADLoss",
    "QATRecipe",
    "QTensor",
    "QuantSpec",
    "QuantizationReport",
    "QuantizationWarning",
    "Rule",
    "RuleSet",
    "SensitivityRow",
    "SensitivityTable",
    "SizeReport",
    "SizeRow",
    "WeightReport",
    "block_fake_quant",
    "block_scales",
    "calibrate",
    "default_act_spec",
    "default_rules",
    "default_weight_spec",
    "dequantize",
    "distillation_loss",
    "encoding_from_state",
    "encodings_from_dict",
    "encodings_to_dict",
    "export_serving",
    "fake_quant",
    "fake_quantize_input",
    "feature_distillation",
    "follow_shape",
    "get_format",
    "init_step_size",
    "integer_error_bound",
    "integer_forward",
    "unclipped_weight",
    "integer_reason",
    "kl_distillation",
    "load_serving",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "mixed_precision",
    "normalize_axes",
    "observer",
    "pack",
    "pack_qtensor",
    "qat_op",
    "param_to_step_size",
    "quant_dequant",
    "quantize",
    "quantize_weight",
    "quantized_conv_general_dilated",
    "quantized_conv_transpose",
    "quantized_dot_general",
    "quantized_einsum",
    "quantized_take",
    "read_encodings",
    "scale_partition_spec",
    "search_mixed_precision",
    "selective_rules",
    "sensitivity",
    "size_row",
    "spec_fingerprint",
    "spec_from_dict",
    "spec_to_dict",
    "state_shardings",
    "step_size_to_param",
    "unpack",
    "weight_bytes",
    "weight_range",
]
