"""Export: the size report of a converted model and its serialized serving function.

:class:`SizeReport` lists, per layer, the weight format, granularity, float
bytes and quantized bytes (codes, scales, zero points) and the total
compression ratio; every front end's ``size_report`` returns one.

:func:`export_serving` serializes a serving function with :mod:`jax.export`
(StableHLO plus calling convention), so it runs again through
:func:`load_serving` without the model's Python code; the converted weights
are baked into the program as constants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxqat.core import _batches
from jaxqat.core import _encoding
from jaxqat.core import _quantize
from jaxqat.core import _spec as spec_lib

__all__ = ["SizeRow", "SizeReport", "size_row", "export_serving", "load_serving"]


@dataclasses.dataclass(frozen=True)
class SizeRow:
  """One weight of a converted model.

  Attributes:
    layer: the layer path (and weight name).
    format: the stored format (``"int8"``, ``"int4"``, ``"fp8_e4m3"``, or
      ``"float32"`` for a weight left float).
    granularity: ``"per-tensor"``, ``"per-channel"``, ``"per-block"`` or ``"-"``.
    float_bytes: bytes of the float weight.
    quant_bytes: bytes held by the converted model for it.
  """

  layer: str
  format: str
  granularity: str
  float_bytes: int
  quant_bytes: int


def _granularity(spec: spec_lib.QuantSpec) -> str:
  return _encoding.enc_type(spec).lower().replace("_", "-")  # "PER_CHANNEL" -> "per-channel"


def size_row(layer: str, weight: Union[_quantize.QTensor, Any], float_dtype=jnp.float32) -> SizeRow:
  """The :class:`SizeRow` of one weight, quantized (a QTensor) or float.

  Args:
    layer: the name to show.
    weight: a :class:`~jaxqat.core.QTensor` or a float array.
    float_dtype: the dtype the float model held the weight in.

  Returns:
    The row.

  Raises:
    TypeError: if ``weight`` is neither a QTensor nor an array.

  Examples:
    >>> import jax.numpy as jnp
    >>> size_row("fc", jnp.zeros((4, 4))).quant_bytes
    64
  """
  itemsize = jnp.dtype(float_dtype).itemsize
  if isinstance(weight, _quantize.QTensor):
    n = int(np.prod(weight.shape))
    return SizeRow(layer, weight.spec.format.name, _granularity(weight.spec), n * itemsize,
                   weight.nbytes)
  if not hasattr(weight, "shape") or not hasattr(weight, "dtype"):
    raise TypeError(f"weight: expected a QTensor or an array, got {type(weight).__name__}")
  n = int(np.prod(weight.shape))
  return SizeRow(layer, str(jnp.dtype(weight.dtype)), "-", n * itemsize,
                 n * jnp.dtype(weight.dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Per-layer weight sizes of a converted model and the compression ratio.

  Attributes:
    rows: one :class:`SizeRow` per weight.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxqat.core import QuantSpec, quantize
    >>> r = SizeReport([size_row("fc", quantize(jnp.ones((64, 64)), 0.1, spec=QuantSpec()))])
    >>> round(r.ratio, 3), r.quant_bytes
    (0.25, 4100)
  """

  rows: Sequence[SizeRow]

  @property
  def float_bytes(self) -> int:
    return int(sum(r.float_bytes for r in self.rows))

  @property
  def quant_bytes(self) -> int:
    return int(sum(r.quant_bytes for r in self.rows))

  @property
  def ratio(self) -> float:
    """Quantized bytes over float bytes (0.25 for int8 against float32)."""
    return self.quant_bytes / self.float_bytes if self.float_bytes else 1.0

  def to_dicts(self) -> list[dict]:
    """The rows as dicts (for pandas or JSON)."""
    return [dataclasses.asdict(r) for r in self.rows]

  def __str__(self) -> str:
    head = ("layer", "format", "granularity", "float bytes", "quantized bytes")
    body = [(r.layer, r.format, r.granularity, f"{r.float_bytes:,}", f"{r.quant_bytes:,}")
            for r in self.rows]
    body.append(("total", "", "", f"{self.float_bytes:,}", f"{self.quant_bytes:,}"))
    widths = [max(len(str(row[i])) for row in [head] + body) for i in range(5)]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    lines.append(f"compression: {self.ratio:.3f} of float ({1 / max(self.ratio, 1e-12):.2f}x "
                 "smaller)")
    return "\n".join(lines)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def plain_outputs(tree: Any) -> Any:
  """``tree`` with every pytree node jax.export cannot serialize made a dict.

  Tuples, lists, dicts and ``None`` are kept; a NamedTuple, a dataclass
  output (a Flax ``struct.dataclass``, the HF ``ModelOutput`` classes) or any
  other registered node becomes a dict of its children, keyed by field name.

  Args:
    tree: a model's output.

  Returns:
    The same arrays in built-in containers.

  Examples:
    >>> import collections, jax.numpy as jnp
    >>> Out = collections.namedtuple("Out", "logits aux")
    >>> sorted(plain_outputs(Out(jnp.ones(2), None)))
    ['aux', 'logits']
  """
  if tree is None or isinstance(tree, (jax.Array, np.ndarray, np.generic, bool, int, float)):
    return tree
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return {f: plain_outputs(getattr(tree, f)) for f in tree._fields}
  if type(tree) in (tuple, list):
    return type(tree)(plain_outputs(v) for v in tree)
  if type(tree) is dict:
    return {k: plain_outputs(v) for k, v in tree.items()}
  children, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
  if len(children) == 1 and children[0][1] is tree:
    return tree  # a leaf of another kind: jax.export says what it makes of it
  return {_key_name(path[0]): plain_outputs(v) for path, v in children}


def export_serving(fn: Callable, *example_args: Any, batch_polymorphic: bool = False,
                   platforms: Optional[Sequence[str]] = None, **example_kwargs: Any) -> bytes:
  """Serializes ``fn`` with :mod:`jax.export` (StableHLO); reload with :func:`load_serving`.

  Array inputs, positional or keyword, are the program's inputs; keyword
  arguments that hold no array (``deterministic=True``, ``None``) are fixed
  into the program. Outputs in containers jax.export cannot serialize (a
  model's output dataclass or NamedTuple) come back as dicts of their fields
  (:func:`plain_outputs`).

  Args:
    fn: the serving function (closing over the converted weights).
    *example_args: arrays (or ``jax.ShapeDtypeStruct``) giving the input
      shapes and dtypes.
    batch_polymorphic: make the leading axis of every input symbolic, so the
      exported program takes any batch size.
    platforms: target platforms (default: the current backend), e.g.
      ``("cpu", "cuda")``.
    **example_kwargs: keyword inputs of ``fn``: arrays (given again by name
      when the program is called) or Python values (fixed).

  Returns:
    The serialized program (bytes).

  Raises:
    TypeError: if ``fn`` is not callable, or a keyword input mixes arrays
      and Python values.
    ValueError: if there are no example arguments.

  Examples:
    >>> import jax.numpy as jnp
    >>> blob = export_serving(lambda x: x * 2, jnp.ones((3,)))
    >>> load_serving(blob)(jnp.arange(3.0))
    Array([0., 2., 4.], dtype=float32)
    >>> f = lambda x, *, scale, negate=False: -x * scale if negate else x * scale
    >>> run = load_serving(export_serving(f, jnp.ones(2), scale=jnp.ones(2), negate=True))
    >>> run(jnp.ones(2), scale=jnp.full(2, 3.0))
    Array([-3., -3.], dtype=float32)
  """
  if not callable(fn):
    raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
  if not example_args and not example_kwargs:
    raise ValueError("example_args: give at least one example input")
  fixed, traced = {}, {}
  for name, value in example_kwargs.items():
    leaves = jax.tree.leaves(value)
    arrays = [l for l in leaves if _batches.is_array(l)]
    static_leaves = [l for l in leaves if not _batches.is_array(l)]
    if not arrays:
      fixed[name] = value
    elif static_leaves:
      raise TypeError(f"example_kwargs: '{name}' mixes arrays and Python values "
                      f"({type(static_leaves[0]).__name__}); give arrays only, or only fixed "
                      "values")
    else:
      traced[name] = value
  specs = []
  scope = jax.export.SymbolicScope()
  for a in jax.tree_util.tree_leaves((example_args, traced)):
    shape = tuple(a.shape)
    if batch_polymorphic and shape:
      sym = jax.export.symbolic_shape("b", scope=scope)
      shape = (sym[0],) + shape[1:]
    specs.append(jax.ShapeDtypeStruct(shape, a.dtype))
  treedef = jax.tree_util.tree_structure((example_args, traced))
  args, kwargs = jax.tree_util.tree_unflatten(treedef, specs)

  def serve(*a, **k):
    return plain_outputs(fn(*a, **k, **fixed))

  exported = jax.export.export(jax.jit(serve), platforms=platforms)(*args, **kwargs)
  return bytes(exported.serialize())


def load_serving(blob: Union[bytes, bytearray]) -> Callable:
  """Reloads a function serialized by :func:`export_serving`.

  Args:
    blob: the bytes.

  Returns:
    A callable taking the example arguments' shapes and dtypes.

  Raises:
    TypeError: if ``blob`` is not bytes.
    ValueError: if ``blob`` is not a serialized jax.export program.

  Examples:
    >>> import jax.numpy as jnp
    >>> load_serving(export_serving(jnp.sin, jnp.zeros(())))(jnp.float32(0.0))
    Array(0., dtype=float32)
  """
  if not isinstance(blob, (bytes, bytearray)):
    raise TypeError(f"blob: expected bytes, got {type(blob).__name__}")
  try:
    exported = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"blob: not a serialized jax.export program ({type(e).__name__}: {e})") from None
  return exported.call
