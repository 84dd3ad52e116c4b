"""``quantize(model, rules)``: an unmodified Linen model made quantization aware.

The wrapper :class:`QuantizedModule` runs the wrapped model bound to its own
scope, so the ``params`` collection of the
quantized model is exactly the float model's: a float checkpoint loads
unchanged. Quantizer state goes to the ``quant_params`` (trainable LSQ step
sizes / offsets) and ``quant_stats`` (observers, frozen ranges) collections,
under each layer's own path. How layers are found and quantized is described
in :mod:`jaxqat.flax.linen._intercept`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax

from jaxqat import core
from jaxqat.core import _rules as rules_lib
from jaxqat.flax.linen import _intercept
from jaxqat.flax.linen import _quantizer

RulesLike = Union[core.RuleSet, Sequence[core.Rule], core.Rule, None]


def per_output_channel(spec: core.QuantSpec) -> core.QuantSpec:
  """Returns a copy of a weight ``spec`` with one scale per output channel.

  Shorthand for ``spec.replace(granularity=PerOutputChannel())``. The channel
  axes are resolved per layer from the op that uses the weight: the weight
  axes that the op does not contract. That is the last axis of a ``Dense`` or
  ``Conv`` kernel, the feature axes (and batch axes) of a ``DenseGeneral``
  kernel, the kernel axes of an ``Einsum`` that appear in its output, and the
  rows of an ``Embed`` table.

  Args:
    spec: a weight QuantSpec.

  Returns:
    A marked copy of ``spec``.

  Raises:
    TypeError: if ``spec`` is not a QuantSpec.

  Examples:
    >>> from jaxqat.core import QuantSpec, Rule
    >>> w4 = per_output_channel(QuantSpec(format="int4"))
    >>> w4.granularity
    PerOutputChannel()
  """
  if not isinstance(spec, core.QuantSpec):
    raise TypeError(f"spec: expected a jaxqat QuantSpec, got {type(spec).__name__}")
  return spec.replace(granularity=core.PerOutputChannel())


_W8 = per_output_channel(core.QuantSpec(format=core.IntFormat(bits=8, signed=True, narrow=True),
                                        calibration="absmax"))
_A8 = core.QuantSpec(format="int8", symmetric=False, calibration="minmax")


def default_rules() -> list[core.Rule]:
  """The rules used when ``rules=None``: W8A8.

  Weights int8 symmetric on the narrow range ``[-127, 127]``, one scale per
  output channel (:func:`per_output_channel`), absmax; input activations int8
  affine per tensor, range from a min/max calibration (most inputs follow a
  ReLU/GELU or are images in ``[0, 1]``). The same specs as the NNX front
  end's defaults.

  Returns:
    A list with one catch-all :class:`~jaxqat.core.Rule`.

  Examples:
    >>> [r.pattern for r in default_rules()]
    ['.*']
  """
  return [core.Rule(pattern=".*", weight=_W8, act=_A8)]


def _check_mode(mode) -> str:
  if mode not in _quantizer.MODES:
    raise ValueError(f"mode: must be one of {_quantizer.MODES}, got {mode!r}")
  return mode


class QuantizedModule(nn.Module):
  """A Linen model run with fake quantization of its matmuls and convolutions.

  Build it with :func:`quantize`. ``init`` returns the float model's
  ``params`` tree unchanged plus ``quant_params`` and ``quant_stats``.

  Modes (a module attribute, so ``jax.jit`` sees a constant):

  * ``"calibrate"``: runs the model in float while activation observers
    record statistics; ``apply(..., mutable=["quant_stats"])``.
  * ``"freeze"``: turns observer statistics into ranges (fixed scales, or the
    initial LSQ step size and LSQ+ offset ``β = -z s``); LSQ weight step
    sizes are re-initialised from the current weights; then runs quantized.
    ``apply(..., mutable=["quant_stats", "quant_params"])``.
  * ``"train"`` (default): fake quant with the frozen / learned ranges;
    gradients reach ``params`` (straight-through) and ``quant_params`` (LSQ).
  * ``"eval"``: as train; stochastic rounding becomes round half to even.

  Attributes:
    model: the float Linen model (any ``nn.Module``; it is not modified).
    rules: the rules (first match wins), or ``None`` for
      :func:`default_rules` (W8A8).
    mode: one of ``calibrate``, ``freeze``, ``train``, ``eval``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> sorted(v), jax.tree.map(jnp.shape, v["params"])
    (['params', 'quant_stats'], {'bias': (3,), 'kernel': (4, 3)})
  """

  model: nn.Module
  rules: Optional[tuple[core.Rule, ...]] = None
  mode: str = "train"

  def __call__(self, *args, **kwargs):
    """Runs the wrapped model's ``__call__`` with quantization.

    Args:
      *args: positional arguments of the model.
      **kwargs: keyword arguments of the model.

    Returns:
      The model's output.

    Raises:
      ValueError: on a bad mode, a spec that does not fit a layer (the error
        names the layer), or missing / immutable quantizer state.
    """
    mode = _check_mode(self.mode)
    ruleset = rules_lib.as_ruleset(self.rules, default_rules())
    context = _intercept.Context(ruleset, mode, self.scope.path)
    # Bound to this module's own scope: the params tree is the model's, unprefixed.
    model = self.model.clone(parent=self.scope, _deep_clone=True)
    with _intercept.active(context):
      out = model(*args, **kwargs)
    if self.is_initializing():
      where = f"Linen model {type(self.model).__name__}"
      ruleset.warn_unused(where)
      context.warn_unquantized(where)
    return out

  @nn.nowrap
  def with_mode(self, mode: str) -> "QuantizedModule":
    """Returns a copy in ``mode`` (``calibrate``, ``freeze``, ``train``, ``eval``).

    Examples:
      >>> import flax.linen as nn
      >>> quantize(nn.Dense(3)).with_mode("eval").mode
      'eval'
    """
    return self.clone(mode=_check_mode(mode))


def quantize(model: nn.Module, rules: RulesLike = None, *, mode: str = "train") -> QuantizedModule:
  """Makes an unmodified Linen model quantization aware.

  Every module whose path (``"/"``-joined Linen names relative to ``model``,
  e.g. ``"Dense_0"`` or ``"encoder/attn/query"``; the model itself is ``""``)
  matches a rule gets the rule's ``weight`` spec on each of its own
  parameters that feeds ``jax.lax.dot_general``, ``jax.lax.conv_general_dilated``,
  ``jnp.einsum``, ``jnp.dot``, ``jnp.matmul`` or ``jnp.take`` (the weight),
  and the rule's ``act`` spec on the other operand of that op (its input
  activation). Flax's ``Dense``, ``DenseGeneral``, ``Conv``, ``Einsum``,
  ``Embed`` and the attention built on them are covered, and so are
  modules from other libraries that call those functions on their own
  parameters.

  Numerics, per quantized op: input activation fake-quantized with its
  scale, then the weight, then the float op (textbook STE; see
  :mod:`jaxqat.core`).

  Warnings at ``init``: :class:`~jaxqat.core.UnusedRuleWarning` for a rule
  that matched no module; :class:`UnquantizedLayerWarning` for a matched
  module with parameters none of which reached an intercepted op.

  Args:
    model: a Linen module (unbound).
    rules: a :class:`~jaxqat.core.RuleSet`, a sequence of
      :class:`~jaxqat.core.Rule`, one Rule, or ``None`` for
      :func:`default_rules` (W8A8).
    mode: the initial mode (see :class:`QuantizedModule`).

  Returns:
    A :class:`QuantizedModule`; use its ``init`` / ``apply`` like the model's.

  Raises:
    TypeError: if ``model`` is not a Linen module or a rule is not a Rule.
    ValueError: if ``mode`` is not a known mode.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxqat.core import QuantSpec, Rule
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> rules = [Rule(pattern="layers_2", skip=True),
    ...          Rule(pattern=".*", weight=QuantSpec(format="int4"), act=QuantSpec())]
    >>> qmodel = quantize(model, rules)
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> list(v["quant_stats"])
    ['layers_0']
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"model: expected a flax.linen Module, got {type(model).__name__}")
  if rules is not None:
    rules = rules_lib.as_ruleset(rules, ()).rules
  return QuantizedModule(model=model, rules=rules, mode=_check_mode(mode))


class ActQuant(nn.Module):
  """An explicit activation quantization point (residual adds, attention scores).

  Inside a model run by :func:`quantize`, fake-quantizes its input with
  ``spec`` (or, when ``spec`` is None, the ``act`` spec of the rule matching
  its path), with the same state and modes as a layer's input quantizer
  (state under ``quant_stats/<path>/input``). Outside a quantized model, and
  where no spec applies, it returns its input unchanged, so a float model can
  carry ActQuant layers at no cost.

  Attributes:
    spec: the activation spec, or None to take it from the rules.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class Residual(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return ActQuant(name="sum")(x + nn.Dense(4)(x))
    >>> v = quantize(Residual()).init(jax.random.key(0), jnp.ones((1, 4)))
    >>> sorted(v["quant_stats"])
    ['Dense_0', 'sum']
  """

  spec: Optional[core.QuantSpec] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Fake-quantizes ``x`` (identity outside a quantized model).

    Args:
      x: the activation.

    Returns:
      ``x`` fake-quantized, or ``x``.
    """
    if self.spec is not None and not isinstance(self.spec, core.QuantSpec):
      raise TypeError(f"ActQuant.spec: expected a QuantSpec or None, got {type(self.spec).__name__}")
    ctx = _intercept.current_context()
    if ctx is None:
      return x
    path = ctx.path_of(self)
    rule = ctx.match(path)
    if rule is not None and rule.skip:
      return x
    spec = self.spec if self.spec is not None else (rule.act if rule is not None else None)
    if spec is None:
      return x
    where = f"ActQuant {_quantizer.describe(path)} input"
    with _intercept._guard():  # pylint: disable=protected-access
      return _quantizer.quantize_activation(self, "input", x, spec, ctx.mode, where)


def layer_paths(variables) -> list[str]:
  """Paths of the quantizers in a quantized model's variables.

  Args:
    variables: the dict returned by ``QuantizedModule.init``.

  Returns:
    Sorted ``"layer/quantizer"`` strings, e.g. ``["Dense_0/input",
    "Dense_0/kernel"]``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> v = quantize(nn.Dense(3)).init(jax.random.key(0), jnp.ones((1, 2)))
    >>> layer_paths(v)
    ['input', 'kernel']
  """
  out = []

  def walk(tree, prefix):
    if hasattr(tree, "items"):
      if "spec_id" in tree:
        out.append(prefix)
        return
      for k, v in tree.items():
        walk(v, f"{prefix}/{k}" if prefix else str(k))

  walk(variables.get(_quantizer.STATS, {}), "")
  return sorted(out)
