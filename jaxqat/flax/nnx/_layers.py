"""Quantized versions of Flax NNX's layers, and an explicit activation quantizer.

Each quantized layer *is* its float layer: ``QuantLinear`` subclasses
``nnx.Linear`` and so on, keeps the parameters (``kernel``, ``bias``,
``embedding``: same names, shapes, dtypes, same arrays) and adds two
:class:`~jaxqat.flax.nnx.Quantizer` children:

* ``kernel_quant`` (``embedding_quant`` for ``Embed``): the weight quantizer;
* ``input_quant``: the input-activation quantizer.

Either may be ``None`` (no quantization of that operand). The layer computes
exactly what Flax's float layer computes, with the two operands of the
matmul/convolution replaced by their fake-quantized values: Flax calls the
layer's ``promote_dtype`` hook right before the ``dot_general`` /
``einsum`` / ``conv_general_dilated`` / ``take``, and the quantized layers
install a hook that promotes as the original one did and then fake-quantizes
the input and the kernel. So padding modes, masks, grouped convolutions,
``batch_axis``, ``dot_general`` overrides and sharding arguments all behave as
in Flax.

**Compute modes** (:attr:`jaxqat.core.Rule.compute`, the layer's
``jaxqat_compute``). The hook does not fake-quantize the operands itself: it
resolves both quantizers' current ranges (:meth:`Quantizer.ranges`), and the
layer's op attribute (``dot_general`` of ``Linear``/``LinearGeneral``,
``einsum_op`` of ``Einsum``, ``conv_general_dilated`` of ``Conv``), which
the quantized layer sets, runs :func:`jaxqat.core.qat_op` on the float
operands with these ranges: ``"fake"`` (the default) gives the fake-quant
values with a lean backward (the step keeps the float operands, not their
fake-quantized copies), ``"integer"`` an int8 x int8 -> int32 forward with
the same backward. A layer whose rule asks for ``"integer"`` but whose specs
cannot take it (weight-only, a float or block format, more than 8 bits, a
per-channel input, weight scales along a contracted axis, an affine conv
kernel) raises a ``ValueError`` naming the layer and the reason when it is
quantized (or, for what only the call shows, at its first call). A layer
given its own op (``dot_general=...``, ``dot_general_cls``,
``einsum_op=...``, ``conv_general_dilated=...``) and ``Embed`` keep the
fake-quantized operands in the hook (``"fake"`` only).

Layers are normally made by :func:`jaxqat.flax.nnx.quantize` from a float
model, but they can also be built directly::

    QuantLinear(3, 4, weight_spec=QuantSpec(...), act_spec=None, rngs=rngs)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxqat import core
from jaxqat.core import _integer as integer_lib
from jaxqat.core._rules import COMPUTE_MODES
from jaxqat.flax.nnx._quantizer import ACT
from jaxqat.flax.nnx._quantizer import Quantizer
from jaxqat.flax.nnx._quantizer import WEIGHT

__all__ = [
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantEinsum",
    "QuantConv",
    "QuantEmbed",
    "ActQuant",
    "QUANT_LAYERS",
]

_STATE = threading.local()


def _stack():
  if not hasattr(_STATE, "layers"):
    _STATE.layers = []
  return _STATE.layers


# Nodes reached by item (``[key]``), not attribute: NNX containers, and the plain lists, tuples
# and dicts that legacy graph-mode modules (``pytree=False``) hold sub-modules in.
_ITEM_NODES = (nnx.List, nnx.Dict, list, tuple, dict)


def get_path(node, parts):
  """The node at ``parts`` (a graph path, as ``nnx.iter_graph`` gives it) below ``node``."""
  for p in parts:
    node = node[p] if isinstance(node, _ITEM_NODES) else getattr(node, p)
  return node


def set_path(node, parts, value) -> None:
  """Puts ``value`` at ``parts`` below ``node`` (the parent must exist)."""
  parent = get_path(node, parts[:-1])
  if isinstance(parent, _ITEM_NODES):
    parent[parts[-1]] = value
  else:
    setattr(parent, parts[-1], value)


def set_static(module, name: str, value) -> None:
  """Sets a static attribute that records what a run saw (``nnx.jit`` carries it out).

  A transform that forbids changing the graph leaves it unset (unknown).
  """
  if getattr(module, "__dict__", {}).get(name) != value:
    try:
      setattr(module, name, value)
    except Exception:  # pylint: disable=broad-except
      pass


def mark_ran(layer) -> None:
  """Records (a static attribute) that ``layer``'s own op ran: its weight reached it.

  :func:`~jaxqat.flax.nnx.convert` keeps float the weight of a quantized
  layer that never ran while others did: another module read the weight
  directly (``embedder.embedding[...].at[ids].get()``), in float.
  """
  set_static(layer, "jaxqat_ran", True)


def ran(layer) -> bool:
  """Whether :func:`mark_ran` saw ``layer`` run."""
  return bool(getattr(layer, "__dict__", {}).get("jaxqat_ran", False))


@contextlib.contextmanager
def _active(layer):
  stack = _stack()
  stack.append(layer)
  try:
    yield
  finally:
    stack.pop()


def _quant_promote(args, /, **kwargs):
  """``promote_dtype`` hook installed on quantized layers (see module docstring)."""
  layer = _stack()[-1] if _stack() else None
  if layer is None or not isinstance(layer, _QuantMixin):
    raise RuntimeError("jaxqat: a quantized layer's promote_dtype hook was called outside of "
                       "the layer's __call__")
  out = layer.jaxqat_float_promote(args, **kwargs)
  return layer.jaxqat_quantize_operands(tuple(out))


def _take_ranges():
  """The (act, weight, weight tracked) the hook left for the active layer's op."""
  stack = _stack()
  layer = stack[-1] if stack else None
  pending = getattr(_STATE, "pending", None)
  _STATE.pending = None
  if pending is None or pending[0] is not layer:
    return layer, None, None, False
  return layer, pending[1], pending[2], pending[3]


def _run(op, x, w, out_sharding, **kw):
  layer, act, weight, tracked = _take_ranges()
  compute = getattr(layer, "jaxqat_compute", "fake")
  if compute == "integer" and (act is None or weight is None):
    compute = "fake"  # "float"/"calibrate" mode, or an input that stays float
  if out_sharding is not None and compute == "fake":
    # The op itself takes the output sharding: on an explicit mesh, a contraction over a
    # sharded axis (row-parallel layers) needs it to know how its output is sharded.
    kw["out_sharding"] = out_sharding
    out_sharding = None
  try:
    y = core.qat_op(op, x, w, act=act, weight=weight, compute=compute, weight_tracked=tracked,
                    **kw)
  except ValueError as e:
    where = getattr(layer, "jaxqat_path", "") or type(layer).__name__
    raise ValueError(f"layer '{where}': {e}") from None
  return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)


def _qat_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                     out_sharding=None):
  """The ``dot_general`` of quantized ``Linear``/``LinearGeneral`` layers: ``core.qat_op``."""
  return _run("dot_general", x, w, out_sharding, dimension_numbers=dimension_numbers,
              precision=precision, preferred_element_type=preferred_element_type)


def _qat_einsum(subscripts, x, w, precision=None, preferred_element_type=None,
                out_sharding=None):
  """The ``einsum_op`` of quantized ``Einsum`` layers: ``core.qat_op``."""
  return _run("einsum", x, w, out_sharding, subscripts=subscripts, precision=precision,
              preferred_element_type=preferred_element_type)


def _qat_conv(x, w, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None, out_sharding=None):
  """The ``conv_general_dilated`` of quantized ``Conv`` layers: ``core.qat_op``."""
  return _run("conv_general_dilated", x, w, out_sharding, window_strides=window_strides,
              padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              batch_group_count=batch_group_count, precision=precision,
              preferred_element_type=preferred_element_type)


# the op attribute of each layer type, Flax's default for it, and its qat_op version
_OP_ATTRS = {
    "dot_general": ((None, lax.dot_general), _qat_dot_general),
    "einsum_op": ((jnp.einsum,), _qat_einsum),
    "conv_general_dilated": ((lax.conv_general_dilated,), _qat_conv),
}


class _QuantMixin(nnx.Module):
  """Shared conversion logic; mixed in before the Flax layer class."""

  float_type: type = nnx.Module  # the Flax layer class this one quantizes
  weight_attr = "kernel"  # the parameter that is the weight
  quant_attr = "kernel_quant"  # the attribute holding the weight quantizer
  act_optional = False  # whether the input quantizer may see no data (Embed: attend only)
  attends = False  # Embed: its matmul is attend's, run by the layer itself through core.qat_op

  # -- construction --------------------------------------------------------

  op_attr: Optional[str] = "dot_general"  # the Flax op attribute routed to core.qat_op

  def __init__(self, *args, weight_spec: Optional[core.QuantSpec] = None,
               act_spec: Optional[core.QuantSpec] = None, compute: str = "fake", **kwargs):
    super().__init__(*args, **kwargs)
    self.jaxqat_attach(weight_spec, act_spec, path="", stack_ndim=0, compute=compute)

  @classmethod
  def from_float(cls, layer, weight_spec, act_spec, *, path: str = "", stack_ndim: int = 0,
                 compute: str = "fake"):
    """Converts ``layer`` (an instance of ``cls.float_type``) in place.

    The object keeps its identity, its attributes and its parameters; its
    class becomes ``cls`` and it gains the quantizer children.

    Args:
      layer: the float layer.
      weight_spec: the weight QuantSpec, or None.
      act_spec: the input-activation QuantSpec, or None.
      path: the layer path (for error messages).
      stack_ndim: number of leading stacked (``nnx.vmap``) axes on the weight.
      compute: ``"fake"`` or ``"integer"`` (:attr:`jaxqat.core.Rule.compute`).

    Returns:
      ``layer``, now an instance of ``cls``.

    Raises:
      TypeError: if ``layer`` is not a ``cls.float_type``.
      ValueError: if a spec does not fit the layer, or ``compute="integer"``
        cannot run it (naming ``path`` and the reason).
    """
    if type(layer) is not cls.float_type:
      raise TypeError(f"{cls.__name__}.from_float: expected a {cls.float_type.__name__} at "
                      f"'{path}', got {type(layer).__name__}")
    # Build the quantizers first so that a bad spec leaves the layer untouched.
    quants = cls._make_quantizers(layer, weight_spec, act_spec, path, stack_ndim)
    cls._check_compute(layer, quants, compute, path)
    layer.__class__ = cls
    layer._jaxqat_install(*quants, path=path, compute=compute)
    return layer

  def jaxqat_attach(self, weight_spec, act_spec, *, path: str, stack_ndim: int,
                    compute: str = "fake"):
    quants = self._make_quantizers(self, weight_spec, act_spec, path, stack_ndim)
    self._check_compute(self, quants, compute, path)
    self._jaxqat_install(*quants, path=path, compute=compute)

  def jaxqat_set_compute(self, compute: str) -> None:
    """Sets the compute mode of this quantized layer (validated as at quantize time).

    Raises:
      ValueError: if ``compute`` is unknown or ``"integer"`` cannot run this
        layer (naming the layer and the reason).
    """
    quants = (getattr(self, self.quant_attr), self.input_quant, self.jaxqat_stack)
    self._check_compute(self, quants, compute, getattr(self, "jaxqat_path", ""))
    self.jaxqat_compute = compute

  @classmethod
  def _routed(cls, layer) -> bool:
    """Whether the layer's op is Flax's default one, which core.qat_op replaces."""
    if cls.op_attr is None or getattr(layer, "dot_general_cls", None) is not None:
      return False
    cur = getattr(layer, cls.op_attr, None)
    defaults, ours = _OP_ATTRS[cls.op_attr]
    return cur is ours or any(cur is d for d in defaults)

  @classmethod
  def _contracted_axes(cls, layer) -> Optional[tuple[int, ...]]:
    """The kernel axes the op contracts (unstacked layout), None if only the call shows."""
    return (0,)

  @classmethod
  def _check_compute(cls, layer, quants, compute, path):
    if compute not in COMPUTE_MODES:
      raise ValueError(f"compute: must be one of {COMPUTE_MODES}, got {compute!r}")
    if compute == "fake":
      return
    where = f"layer '{path}'" if path else cls.__name__
    wq, aq, stack = quants
    if cls.attends and stack:
      reason = "its table is stacked (nnx.vmap): attend runs on the fake-quantized table"
    elif not cls._routed(layer) and not cls.attends:
      reason = ("it computes with its own op (a custom dot_general, dot_general_cls, "
                "einsum_op or conv_general_dilated)")
    else:
      w_ndim = getattr(layer, cls.weight_attr)[...].ndim - len(stack)
      reason = integer_lib.spec_reason(
          None if aq is None else aq.spec, None if wq is None else wq.spec, w_ndim,
          cls._contracted_axes(layer) or (), conv=cls.op_attr == "conv_general_dilated")
    if reason is not None:
      raise ValueError(f"{where}: compute='integer' cannot run this layer in integer "
                       f"arithmetic: {reason}")

  @classmethod
  def _make_quantizers(cls, layer, weight_spec, act_spec, path, stack_ndim):
    weight = getattr(layer, cls.weight_attr)[...]
    if stack_ndim > weight.ndim:
      raise ValueError(f"layer '{path}': stack_ndim {stack_ndim} exceeds the weight's rank")
    stack = tuple(weight.shape[:stack_ndim])
    wq = aq = None
    if isinstance(act_spec, core.QuantSpec) and act_spec.is_output_channel:
      where = f"layer '{path}'" if path else cls.__name__
      raise ValueError(f"{where}: the activation spec has granularity PerOutputChannel(), which "
                       "is for weights only; quantize input activations per tensor "
                       "(PerTensor()), per channel on the last axis (PerChannel(-1)) or per "
                       "block")
    if isinstance(weight_spec, core.QuantSpec) and weight_spec.is_output_channel:
      weight_spec = weight_spec.resolve_output_channel(cls._output_axes(layer, path))
    if weight_spec is not None:
      wq = Quantizer(weight_spec, role=WEIGHT, shape=weight.shape[stack_ndim:],
                     stack_shape=stack, path=path, weight=weight)
    if act_spec is not None:
      aq = Quantizer(act_spec, role=ACT, shape=(1, cls._in_channels(layer, path)),
                     stack_shape=stack, path=path, optional=cls.act_optional)
    return wq, aq, stack

  @classmethod
  def _in_channels(cls, layer, path) -> int:
    raise NotImplementedError

  @classmethod
  def _output_axes(cls, layer, path) -> tuple[int, ...]:
    """The weight's output-channel axes (unstacked layout), for PerOutputChannel."""
    return (-1,)

  def _jaxqat_install(self, wq, aq, stack, *, path: str = "", compute: str = "fake"):
    # Keep Flax's own promotion, then quantize the promoted operands.
    if getattr(self, "promote_dtype", None) is not _quant_promote:
      self.jaxqat_float_promote = self.promote_dtype
    self.promote_dtype = _quant_promote
    self.jaxqat_stack = stack
    self.jaxqat_path = path
    self.jaxqat_compute = compute
    self.jaxqat_routed = type(self)._routed(self)
    if self.jaxqat_routed:
      setattr(self, self.op_attr, _OP_ATTRS[self.op_attr][1])
    setattr(self, self.quant_attr, wq)
    self.input_quant = aq

  # -- call ----------------------------------------------------------------

  def jaxqat_quantize_operands(self, args):
    inputs, kernel = args[0], args[1]
    wq = getattr(self, self.quant_attr)
    if getattr(self, "jaxqat_routed", False):
      # The op (core.qat_op) quantizes: hand it the ranges, keep the float operands.
      act = None if self.input_quant is None else self.input_quant.ranges(inputs)
      weight = None if wq is None else wq.ranges(kernel)
      # A fixed-range weight that is not frozen: its range is this kernel's (core.weight_range).
      tracked = weight is not None and wq.tracks()
      _STATE.pending = (self, act, weight, tracked)
      return tuple(args)
    if self.input_quant is not None:
      inputs = self.input_quant(inputs)
    if wq is not None:
      kernel = wq(kernel)
    return (inputs, kernel) + tuple(args[2:])

  def __call__(self, *args, **kwargs):
    mark_ran(self)
    with _active(self):
      return super().__call__(*args, **kwargs)

  def jaxqat_weights(self):
    """``[(param_path_parts, weight_quantizer_or_None, input_quantizer_or_None)]``."""
    return [((self.weight_attr,), getattr(self, self.quant_attr), self.input_quant)]


def einsum_output_axes(einsum_str: Optional[str], ndim: int, where: str) -> tuple[int, ...]:
  """The axes of an einsum's rhs (of rank ``ndim``) whose subscripts appear in its output.

  Args:
    einsum_str: an explicit two-operand equation ``"lhs,rhs->out"``.
    ndim: the rank of the rhs operand (the kernel, without stacked axes).
    where: the layer, for error messages.

  Returns:
    The non-negative rhs axes that are not contracted, in order.

  Raises:
    ValueError: if the equation is missing, not of that form, or its rhs
      term does not fit a kernel of rank ``ndim``; the message names ``where``.
  """
  if not isinstance(einsum_str, str):
    raise ValueError(f"{where}: a PerOutputChannel() weight spec needs the layer's einsum_str "
                     "(given to the constructor) to find the kernel's output axes; got "
                     f"{einsum_str!r}. Use an explicit granularity (PerChannel(axes)) instead")
  eq = einsum_str.replace(" ", "")
  if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
    raise ValueError(f"{where}: einsum_str {einsum_str!r} is not an explicit two-operand "
                     "equation 'lhs,rhs->out'; cannot resolve PerOutputChannel()")
  inputs, out = eq.split("->")
  rhs = inputs.split(",")[1]
  n_named = len(rhs.replace("...", ""))
  if rhs.count("...") > 1 or n_named > ndim or ("..." not in rhs and n_named != ndim):
    raise ValueError(f"{where}: the kernel term {rhs!r} of einsum_str {einsum_str!r} does not "
                     f"fit a kernel of rank {ndim}; cannot resolve PerOutputChannel()")
  labels = []
  head, _, tail = rhs.partition("...")
  labels += list(head)
  if "..." in rhs:
    labels += ["..."] * (ndim - n_named)
    labels += list(tail)
  return tuple(k for k, c in enumerate(labels) if c in out.replace("...", "") or
               (c == "..." and "..." in out))


class QuantLinear(_QuantMixin, nnx.Linear):
  """``nnx.Linear`` with fake-quantized kernel and input.

  Args:
    *args: the arguments of ``nnx.Linear``.
    weight_spec: QuantSpec of the kernel (shape ``(in, out)``), or None.
      ``PerOutputChannel()`` resolves to ``PerChannel(-1)``.
    act_spec: QuantSpec of the input, or None.
    **kwargs: the keyword arguments of ``nnx.Linear``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, PerChannel
    >>> layer = QuantLinear(3, 2, weight_spec=QuantSpec(granularity=PerChannel(-1)),
    ...                     rngs=nnx.Rngs(0))
    >>> sorted(k for k in nnx.state(layer).keys())
    ['bias', 'kernel', 'kernel_quant']
    >>> layer(jnp.ones((1, 3))).shape  # usable right away: the range tracks the kernel
    (1, 2)
  """

  float_type = nnx.Linear

  @classmethod
  def _in_channels(cls, layer, path):
    return layer.in_features


class QuantLinearGeneral(_QuantMixin, nnx.LinearGeneral):
  """``nnx.LinearGeneral`` with fake-quantized kernel and input.

  The kernel has shape ``(*batch, *in_features, *out_features)``; a
  per-channel activation spec needs a single input axis ``-1``. A
  ``PerOutputChannel()`` weight spec resolves to the batch axes and the
  ``out_features`` axes: ``PerChannel((0, ..., nb - 1, -no, ..., -1))``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, PerOutputChannel
    >>> layer = QuantLinearGeneral(4, (2, 3), act_spec=QuantSpec(), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((5, 4)))  # the input range needs calibrate()
    Traceback (most recent call last):
    ...
    ValueError: Quantizer: the input quantizer was never calibrated; run jaxqat.flax.nnx.calibrate(model, data) before using the model in 'quant' mode (or quantize this layer with a rule without an act spec)
    >>> layer = QuantLinearGeneral(4, (2, 3), rngs=nnx.Rngs(0),
    ...     weight_spec=QuantSpec(granularity=PerOutputChannel()))
    >>> layer.kernel_quant.spec.granularity, layer.kernel_quant.scale.shape
    (PerChannel(axis=(-2, -1)), (1, 2, 3))
  """

  float_type = nnx.LinearGeneral

  @classmethod
  def _contracted_axes(cls, layer):
    nb, ni = len(layer.batch_axis), len(layer.in_features)
    return tuple(range(nb, nb + ni))

  @classmethod
  def _output_axes(cls, layer, path):
    nb, no = len(layer.batch_axis), len(layer.out_features)
    return tuple(range(nb)) + tuple(range(-no, 0))

  @classmethod
  def _in_channels(cls, layer, path):
    if tuple(layer.axis) in ((-1,),) and len(layer.in_features) == 1:
      return layer.in_features[0]
    return 1  # only per-tensor activation specs fit (checked by the Quantizer)


class QuantEinsum(_QuantMixin, nnx.Einsum):
  """``nnx.Einsum`` with fake-quantized kernel (the rhs) and input (the lhs).

  A ``PerOutputChannel()`` weight spec resolves to the kernel axes whose
  subscripts appear in the output of the layer's ``einsum_str`` (the one
  given to the constructor; an equation passed at call time is not seen).
  Axes under ``...`` in the kernel term count as output axes when the output
  has ``...`` too (otherwise they are summed). A layer without an
  ``einsum_str`` cannot resolve it (ValueError naming the layer).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, PerOutputChannel
    >>> layer = QuantEinsum('nta,hab->nthb', (8, 2, 4), (8, 4),
    ...                     weight_spec=QuantSpec(), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((16, 11, 2))).shape
    (16, 11, 8, 4)
    >>> layer = QuantEinsum('nta,hab->nthb', (8, 2, 4), (8, 4), rngs=nnx.Rngs(0),
    ...     weight_spec=QuantSpec(granularity=PerOutputChannel()))
    >>> layer.kernel_quant.spec.granularity, layer.kernel_quant.scale.shape
    (PerChannel(axis=(0, 2)), (8, 1, 4))
  """

  float_type = nnx.Einsum
  op_attr = "einsum_op"

  @classmethod
  def _contracted_axes(cls, layer):
    if not isinstance(layer.einsum_str, str) or "..." in layer.einsum_str:
      return None  # checked at the call
    plan = integer_lib._einsum_plan(  # pylint: disable=protected-access
        layer.einsum_str, len(layer.einsum_str.split(",")[0].replace("...", "")),
        len(layer.kernel_shape))
    return None if isinstance(plan, str) else plan[0][0][1]

  @classmethod
  def _output_axes(cls, layer, path):
    return einsum_output_axes(layer.einsum_str, len(layer.kernel_shape),
                              f"QuantEinsum '{path}'" if path else "QuantEinsum")

  @classmethod
  def _in_channels(cls, layer, path):
    return 1  # the lhs layout is free-form: per-tensor activation specs only


class QuantConv(_QuantMixin, nnx.Conv):
  """``nnx.Conv`` (1D/2D/3D, grouped, depthwise) with fake-quantized kernel and input.

  The kernel has shape ``(*kernel_size, in_features // groups, out_features)``;
  its last axis is the output channel, so a ``PerOutputChannel()`` weight
  spec resolves to ``PerChannel(-1)`` (also for grouped and depthwise
  convolutions). A mask is applied after the kernel is quantized (masked
  entries stay exactly zero).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec
    >>> conv = QuantConv(4, 4, (3,), feature_group_count=4, weight_spec=QuantSpec(),
    ...                  rngs=nnx.Rngs(0))
    >>> conv.kernel.shape, conv(jnp.ones((2, 5, 4))).shape
    ((3, 1, 4), (2, 5, 4))
  """

  float_type = nnx.Conv
  op_attr = "conv_general_dilated"

  @classmethod
  def _contracted_axes(cls, layer):
    return tuple(range(len(layer.kernel_shape) - 1))

  @classmethod
  def _in_channels(cls, layer, path):
    return layer.in_features


class QuantEmbed(_QuantMixin, nnx.Embed):
  """``nnx.Embed`` with a fake-quantized embedding table.

  The weight quantizer is ``embedding_quant`` (table shape
  ``(num_embeddings, features)``; ``PerChannel(0)`` gives one scale per
  token, ``PerChannel(-1)`` one per feature). A ``PerOutputChannel()`` spec
  resolves to the rows, ``PerChannel(0)``: each looked-up vector has its own
  scale, as in the Linen front end. Lookups take integer inputs, so
  ``input_quant`` (if any) applies only to the query of :meth:`attend`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxqat.core import QuantSpec, PerChannel
    >>> emb = QuantEmbed(5, 3, weight_spec=QuantSpec(format="int4",
    ...                  granularity=PerChannel(0)), rngs=nnx.Rngs(0))
    >>> emb(jnp.array([0, 4])).shape
    (2, 3)
  """

  float_type = nnx.Embed
  op_attr = None
  weight_attr = "embedding"
  quant_attr = "embedding_quant"
  act_optional = True

  @classmethod
  def _output_axes(cls, layer, path):
    return (0,)

  @classmethod
  def _in_channels(cls, layer, path):
    return layer.features

  attends = True

  @classmethod
  def _contracted_axes(cls, layer):
    return (1,)  # attend: query @ embedding.T contracts the features

  def jaxqat_quantize_operands(self, args):
    if len(args) == 1:  # __call__: (embedding,)
      wq = self.embedding_quant
      return (wq(args[0]) if wq is not None else args[0],)
    return super().jaxqat_quantize_operands(args)  # attend: (query, embedding)

  def attend(self, query, *args, **kwargs):
    """``query @ embedding.T``; with ``compute="integer"`` through :func:`jaxqat.core.qat_op`.

    In ``"quant"`` mode with ``compute="integer"`` the tied head's matmul
    runs the integer forward (one scale per row of the table: per output
    logit) with the fake path's STE backward. ``"fake"`` (and calibration,
    float, a stacked table, an output sharding) runs Flax's ``attend`` on the
    fake-quantized operands: the lookup reads the same fake-quantized table,
    and keeping it for both costs less memory than the lean op's
    recomputation (a tied 8192 x 256 head, XLA's estimate of the step: W8A8
    1.038x against 1.047x float, W4A4 LSQ 1.085x against 1.132x).
    """
    mark_ran(self)
    wq, aq = self.embedding_quant, self.input_quant
    out_sharding = kwargs.get("out_sharding", args[0] if args else None)
    if (self.jaxqat_compute == "integer" and wq is not None and wq.mode == "quant"
        and not self.jaxqat_stack and out_sharding is None
        and (aq is None or aq.mode == "quant") and jnp.ndim(query) >= 1):
      query, table = self.jaxqat_float_promote((query, self.embedding[...]), dtype=self.dtype)
      act = None if aq is None else aq.ranges(query)
      weight = wq.ranges(table)
      compute = self.jaxqat_compute if act is not None else "fake"
      tracked = wq.tracks()
      dims = (((jnp.ndim(query) - 1,), (1,)), ((), ()))
      try:
        return core.qat_op("dot_general", query, table, act=act, weight=weight, compute=compute,
                           weight_tracked=tracked, dimension_numbers=dims)
      except ValueError as e:
        raise ValueError(f"layer '{self.jaxqat_path}': {e}") from None
    with _active(self):
      return super().attend(query, *args, **kwargs)


QUANT_LAYERS: dict[type, type] = {
    nnx.Linear: QuantLinear,
    nnx.LinearGeneral: QuantLinearGeneral,
    nnx.Einsum: QuantEinsum,
    nnx.Conv: QuantConv,
    nnx.Embed: QuantEmbed,
}


class ActQuant(nnx.Module):
  """An explicit activation-quantization point (residual adds, attention scores...).

  Put it anywhere in a model by hand: ``y = self.res_quant(x + h)``. It is
  calibrated and trained like the input quantizers of the quantized
  layers (its ``quantizer`` is a :class:`~jaxqat.flax.nnx.Quantizer`). For
  a functional form with an explicit scale use
  :func:`jaxqat.core.quant_dequant`.

  Args:
    spec: the QuantSpec (default: int8 affine per tensor, min/max
      calibration, the default activation spec of :func:`quantize`).
    features: the size of the last axis, needed only for a per-channel spec.
    stack_shape: leading axes when the module is created under ``nnx.vmap``
      by hand (usually left empty).

  Raises:
    ValueError: if ``spec`` is per channel on an axis other than the last,
      or has the weight-only granularity ``PerOutputChannel()``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec
    >>> from jaxqat.flax.nnx import calibrate
    >>> q = calibrate(ActQuant(QuantSpec(format="int8")), [jnp.array([-2.0, 1.0])])
    >>> q(jnp.array([1.0]))  # step 2/127
    Array([1.007874], dtype=float32)
  """

  def __init__(self, spec: Optional[core.QuantSpec] = None, *, features: int = 1,
               stack_shape: Sequence[int] = ()):
    if spec is None:
      spec = core.default_act_spec()
    self.quantizer = Quantizer(spec, role=ACT, shape=(1, features), stack_shape=stack_shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns ``x`` fake-quantized (or observed, while calibrating)."""
    return self.quantizer(x)

  def jaxqat_weights(self):
    """No weight: ``[((), None, quantizer)]``."""
    return [((), None, self.quantizer)]
