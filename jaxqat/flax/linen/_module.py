"""``quantize(model, rules)``: an unmodified Linen model made quantization aware.

The wrapper :class:`QuantizedModule` runs the wrapped model bound to its own
scope, so the ``params`` collection of the
quantized model is exactly the float model's: a float checkpoint loads
unchanged. Quantizer state goes to the ``quant_params`` (trainable LSQ
``log_scale`` / ``offset``) and ``quant_stats`` (observers, ranges) collections,
under each layer's own path. How layers are found and quantized is described
in :mod:`jaxqat.flax.linen._intercept`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxqat import core
from jaxqat.core import _rules as rules_lib
from jaxqat.flax.linen import _intercept
from jaxqat.flax.linen import _quantizer

RulesLike = Union[core.RuleSet, Sequence[core.Rule], core.Rule, None]


# The quantizer modes plus conversion's (inspect, convert) and the served model's.
MODES = _quantizer.MODES + _intercept.SERVING_MODES


def _check_mode(mode, allowed=MODES, name="mode") -> str:
  if mode not in allowed:
    raise ValueError(f"{name}: must be one of {allowed}, got {mode!r}")
  return mode


def _contains_quantized(module, seen=None) -> bool:
  """Whether a (unbound) module or one of its dataclass fields is a QuantizedModule."""
  seen = set() if seen is None else seen
  if id(module) in seen:
    return False
  seen.add(id(module))
  if isinstance(module, QuantizedModule):
    return True
  if not isinstance(module, nn.Module):
    return False
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    v = getattr(module, f.name, None)
    items = v if isinstance(v, (list, tuple)) else (v.values() if isinstance(v, dict) else (v,))
    for item in items:
      if isinstance(item, nn.Module) and _contains_quantized(item, seen):
        return True
  return False


def _abstract(tree):
  """Array leaves as ShapeDtypeStructs; other leaves (flags, strings) kept."""
  def one(x):
    if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval"):
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return x
  return jax.tree.map(one, tree)


class QuantizedModule(nn.Module):
  """A Linen model run with fake quantization of its matmuls and convolutions.

  Build it with :func:`quantize`. ``init`` returns the float model's
  ``params`` tree unchanged plus ``quant_stats`` (and ``quant_params`` for
  LSQ weights); :func:`~jaxqat.flax.linen.calibrate` adds the activation
  ranges. The example inputs given to ``init`` are remembered (as shapes), so
  that :func:`~jaxqat.flax.linen.freeze` and
  :func:`~jaxqat.flax.linen.report` can trace the model without data.

  Modes (a module attribute, so ``jax.jit`` sees a constant; change it with
  :func:`set_mode`):

  * ``"quant"`` (default): fake quantization; gradients reach ``params``
    (straight-through) and ``quant_params`` (LSQ). An activation quantizer
    that was never calibrated raises a ``ValueError`` naming its layer.
  * ``"float"``: every quantizer passes its input through (the float model).
  * ``"served"``: the converted model of :func:`~jaxqat.flax.linen.convert`
    (integer weight codes in the ``served`` collection, core integer
    kernels).

  Attributes:
    model: the float Linen model (any ``nn.Module``; it is not modified).
    rules: the rules (first match wins), or ``None`` for
      :func:`jaxqat.core.default_rules` (W8A8).
    mode: ``"quant"`` or ``"float"`` (and internal modes used by
      ``calibrate``, ``freeze`` and ``convert``).
    integer: served mode: use the integer kernels where they apply (else
      the dequantize path everywhere).
    pack: convert mode: pack 2- and 4-bit weight codes.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> qmodel = quantize(nn.Dense(3))
    >>> v = qmodel.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> sorted(v), jax.tree.map(jnp.shape, v["params"])
    (['params', 'quant_stats'], {'bias': (3,), 'kernel': (4, 3)})
  """

  model: nn.Module
  rules: Optional[tuple[core.Rule, ...]] = None
  mode: str = "quant"
  integer: bool = True
  pack: bool = True

  def __call__(self, *args, **kwargs):
    """Runs the wrapped model's ``__call__`` with quantization.

    Args:
      *args: positional arguments of the model.
      **kwargs: keyword arguments of the model.

    Returns:
      The model's output.

    Raises:
      ValueError: on a bad mode, a spec that does not fit a layer (the error
        names the layer), missing / immutable quantizer state, an activation
        quantizer used before calibration, or a quantized model inside
        another.
    """
    return self.run_method("__call__", *args, **kwargs)

  def run_method(self, name: str, *args, **kwargs):
    """Runs the wrapped model's method ``name`` with quantization.

    ``qmodel.apply(variables, x, method="encode")`` (or
    ``method=Model.encode``) comes here: the model's other entry points
    (an encoder and a decoder run apart in beam search, a generator) run
    quantized, in every mode, on the same variables.

    Args:
      name: the name of a method of the wrapped model.
      *args: its positional arguments.
      **kwargs: its keyword arguments.

    Returns:
      The method's output.

    Raises:
      ValueError: as ``__call__``.
    """
    mode = _check_mode(self.mode)
    if mode == _intercept.SERVED and any(c in self.variables for c in (_quantizer.STATS,
                                                                       _quantizer.PARAMS)):
      raise ValueError("variables: the served model runs on the variables returned by "
                       "jaxqat.flax.linen.convert (params and 'served'), not on the quantized "
                       "model's (with 'quant_stats' / 'quant_params')")
    ruleset = rules_lib.as_ruleset(self.rules, core.default_rules())
    context = _intercept.Context(ruleset, mode, self.scope.path, integer=self.integer,
                                 pack=self.pack)
    # Bound to this module's own scope: the params tree is the model's, unprefixed.
    model = self.model.clone(parent=self.scope, _deep_clone=True)
    with _intercept.active(context):
      out = getattr(model, name)(*args, **kwargs)
    if _RUNS:
      _RUNS[-1].append(context)
    if self.is_initializing() and name == "__call__":
      where = f"Linen model {type(self.model).__name__}"
      ruleset.warn_unused(where)
      context.warn(where)
    return out

  def _register_submodules(self, name, val):
    """Flax adopts Module fields as children; ``model`` is not one.

    The wrapped model runs in this module's own scope (its params tree is
    the float model's, unprefixed), so its name must not be reserved here: a
    model whose ``setup`` assigns ``self.model = ...`` (the HF Flax causal
    LMs) would otherwise meet a ``NameInUseError``.
    """
    if name == "model":
      return
    super()._register_submodules(name, val)  # pytype: disable=attribute-error

  @nn.nowrap
  def init_with_output(self, rngs, *args, method=None, **kwargs):  # pylint: disable=arguments-differ
    """``nn.Module.init_with_output`` (and so ``init``); remembers the example inputs' shapes."""
    if method is None:
      model_kwargs = {k: v for k, v in kwargs.items() if k not in _FLAX_INIT_KWARGS}
      _remember(self, args, model_kwargs, rngs)
    return super().init_with_output(rngs, *args, method=self._model_method(method), **kwargs)

  @nn.nowrap
  def apply(self, variables, *args, method=None, **kwargs):  # pylint: disable=arguments-differ
    """``nn.Module.apply``; ``method`` may name a method of the wrapped model.

    Args:
      variables: the variables (from ``init``, ``calibrate``, ``convert``).
      *args: the model's inputs.
      method: ``None`` (the model's ``__call__``), the name of a method of
        the wrapped model or that method itself (``Model.encode``): it runs
        quantized (see :meth:`run_method`); other callables as in
        ``nn.Module.apply`` (they receive this QuantizedModule).
      **kwargs: ``nn.Module.apply``'s keyword arguments (``mutable``,
        ``rngs``...) and the model's.

    Returns:
      As ``nn.Module.apply``.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> class AE(nn.Module):
      ...   def setup(self):
      ...     self.enc, self.dec = nn.Dense(2), nn.Dense(4)
      ...   def encode(self, x):
      ...     return self.enc(x)
      ...   def __call__(self, x):
      ...     return self.dec(self.encode(x))
      >>> from jaxqat.flax.linen import calibrate
      >>> qmodel = quantize(AE())
      >>> x = jnp.ones((1, 4))
      >>> v = calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x])
      >>> qmodel.apply(v, x, method="encode").shape
      (1, 2)
    """
    return super().apply(variables, *args, method=self._model_method(method), **kwargs)

  @nn.nowrap
  def _model_method(self, method):
    """``method`` of ``apply``/``init``: a method of the wrapped model, run by ``run_method``."""
    if method is None:
      return None
    name = method if isinstance(method, str) else getattr(method, "__name__", None)
    model_cls = type(self.model)
    own = getattr(model_cls, name, None) if isinstance(name, str) else None
    if own is None or (not isinstance(method, str) and own is not method):
      return method  # not the model's: Flax's own handling
    if name == "__call__":
      return None
    if hasattr(nn.Module, name):
      return method
    return lambda module, *a, **k: module.run_method(name, *a, **k)

  @nn.nowrap
  def init(self, rngs, *args, **kwargs):  # pylint: disable=arguments-differ
    """``nn.Module.init``, with the LSQ step sizes converted all at once.

    The step sizes init gives LSQ weights become their ``log_scale``
    parameters through one :func:`jaxqat.core.step_size_to_param` call on all
    of them: the same values as one call per weight, and a jitted init
    compiles the exact-logarithm search once instead of once per weight. (The
    forward pass init runs, whose output it drops, quantizes with the step
    sizes themselves; ``init_with_output`` converts per weight, so that its
    output is the one ``apply`` gives.)

    Args:
      rngs: the PRNG key(s), as for ``nn.Module.init``.
      *args: the model's example inputs.
      **kwargs: ``nn.Module.init``'s keyword arguments (``method``,
        ``mutable``...) and the model's.

    Returns:
      The variables: ``params`` plus ``quant_stats`` (and ``quant_params``
      for LSQ weights).

    Raises:
      ValueError: as ``__call__`` (a spec that does not fit a layer, a
        collection that is not mutable inside a lifted transform...).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxqat.core import QuantSpec, Rule
      >>> rules = [Rule(pattern=".*", weight=QuantSpec(format="int4", learning="lsq"))]
      >>> qmodel = quantize(nn.Sequential([nn.Dense(3), nn.Dense(2)]), rules)
      >>> v = qmodel.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> jax.tree.map(jnp.shape, v["quant_params"])
      {'layers_0': {'kernel': {'log_scale': ()}}, 'layers_1': {'kernel': {'log_scale': ()}}}
      >>> out, v2 = qmodel.init_with_output(jax.random.key(0), jnp.ones((1, 4)))
      >>> all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v2)))
      True
    """
    with _quantizer.batched_step_sizes() as convert:
      variables = super().init(rngs, *args, **kwargs)
      converted = convert(variables)
    if isinstance(variables, flax.core.FrozenDict):
      converted = flax.core.freeze(converted)
    return converted

  @nn.nowrap
  def example(self) -> tuple[tuple, dict]:
    """Zeros shaped like the example inputs given to ``init`` (or ``calibrate``).

    Raises:
      ValueError: if the model was never initialised in this process.
    """
    ex = getattr(self, "_jaxqat_example", None)
    if ex is None:
      raise ValueError("qmodel: this quantized model has no example inputs yet; call "
                       "qmodel.init(rng, *inputs) (or calibrate) first: freeze and report trace "
                       "the model with inputs shaped like init's")
    zeros = lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
    kwargs = jax.tree.map(zeros, ex[1])
    if len(ex) > 2 and ex[2]:  # streams the model draws from while it runs (Flax apply's rngs)
      kwargs["rngs"] = {name: jax.random.key(0) for name in ex[2]}
    return jax.tree.map(zeros, ex[0]), kwargs


_FLAX_INIT_KWARGS = ("mutable", "capture_intermediates")
_RUNS: list = []  # collectors of the Contexts of the runs in progress (report)


def _remember(qmodel: QuantizedModule, args, kwargs, rngs=None) -> None:
  """Stores the abstract example inputs on the (unbound) quantized model.

  With them, the names of the RNG streams given to ``init`` or in a batch's
  ``rngs`` other than ``params`` (a decoder sampling from an ``"lstm"``
  stream), so that the runs on the example inputs get keys for them.
  """
  kwargs = dict(kwargs)
  streams = kwargs.pop("rngs", None)
  names = set()
  for r in (rngs, streams):
    if isinstance(r, Mapping):
      names.update(str(k) for k in r if k != "params")
  object.__setattr__(qmodel, "_jaxqat_example", (_abstract(tuple(args)), _abstract(kwargs),
                                                 tuple(sorted(names))))


def set_mode(qmodel: QuantizedModule, mode: str) -> QuantizedModule:
  """Returns ``qmodel`` in ``mode``: ``"quant"`` (fake quantized) or ``"float"``.

  Args:
    qmodel: a model from :func:`quantize`.
    mode: ``"quant"`` (the default: fake quantization) or ``"float"`` (every
      quantizer passes its input through: the float model, for comparison).

  Returns:
    A copy of ``qmodel`` in ``mode`` (the same variables apply).

  Raises:
    TypeError: if ``qmodel`` is not a QuantizedModule.
    ValueError: if ``mode`` is not ``"quant"`` or ``"float"``.

  Examples:
    >>> import flax.linen as nn
    >>> set_mode(quantize(nn.Dense(3)), "float").mode
    'float'
  """
  check_qmodel(qmodel)
  return with_mode(qmodel, _check_mode(mode, _quantizer.PUBLIC_MODES))


def with_mode(qmodel: QuantizedModule, mode: str, **attrs) -> QuantizedModule:
  """A copy of ``qmodel`` in any internal mode (keeps the example inputs)."""
  out = qmodel.clone(mode=_check_mode(mode), **attrs)
  ex = getattr(qmodel, "_jaxqat_example", None)
  if ex is not None:
    object.__setattr__(out, "_jaxqat_example", ex)
  return out


def check_qmodel(qmodel) -> QuantizedModule:
  if not isinstance(qmodel, QuantizedModule):
    raise TypeError(f"qmodel: expected a QuantizedModule from jaxqat.flax.linen.quantize(), got "
                    f"{type(qmodel).__name__}")
  return qmodel


def quantize(model: nn.Module, rules: RulesLike = None) -> QuantizedModule:
  """Makes an unmodified Linen model quantization aware.

  Every module whose path (``"/"``-joined Linen names relative to ``model``,
  e.g. ``"Dense_0"`` or ``"encoder/attn/query"``; the model itself is ``""``)
  matches a rule gets the rule's ``weight`` spec on each of its own
  parameters that feeds ``jax.lax.dot_general``, ``jax.lax.conv_general_dilated``,
  ``jnp.einsum``, ``jnp.dot``, ``jnp.matmul`` or ``jnp.take`` (the weight,
  also through ``.T`` / ``transpose``), and the rule's ``act`` spec on the
  other operand of that op (its input activation). Flax's ``Dense``,
  ``DenseGeneral``, ``Conv``, ``Einsum``, ``Embed`` and the attention built
  on them are covered, and so are modules from other libraries that call
  those functions on their own parameters, and layers run through a nested
  ``Module.apply`` (a tied output head).

  Numerics, per quantized op: input activation fake-quantized with its
  scale, then the weight, then the float op (textbook STE; see
  :mod:`jaxqat.core`). Fixed-range weights track the current weight at every
  step until :func:`~jaxqat.flax.linen.freeze`.

  ``model`` is not modified: the returned module wraps it, and
  ``model.init``'s float ``params`` load unchanged into the quantized
  model's variables. Warnings at ``init``
  (:class:`~jaxqat.core.QuantizationWarning`): a rule that matched no
  module, a matched module none of whose parameters reached an intercepted
  op, and a model in which no layer was quantized.

  Args:
    model: a Linen module (unbound, not quantized already).
    rules: a :class:`~jaxqat.core.RuleSet`, a sequence of
      :class:`~jaxqat.core.Rule`, one Rule, or ``None`` for
      :func:`jaxqat.core.default_rules` (W8A8).

  Returns:
    A :class:`QuantizedModule`; use its ``init`` / ``apply`` like the model's.

  Raises:
    TypeError: if ``model`` is not a Linen module or a rule is not a Rule.
    ValueError: if ``model`` is (or contains) a quantized model already.

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
  if isinstance(model, QuantizedModule) or _contains_quantized(model):
    raise ValueError(f"model: {type(model).__name__} is quantized already (it is or contains a "
                     "jaxqat QuantizedModule); quantize the float model once")
  if not isinstance(model, nn.Module):
    raise TypeError(f"model: expected a flax.linen Module, got {type(model).__name__}")
  if rules is not None:
    rules = rules_lib.as_ruleset(rules, ()).rules
  return QuantizedModule(model=model, rules=rules)


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

    Raises:
      TypeError: if ``spec`` is neither a QuantSpec nor None.
      ValueError: as a layer's input quantizer (uncalibrated use, bad spec).
    """
    if self.spec is not None and not isinstance(self.spec, core.QuantSpec):
      raise TypeError(f"ActQuant.spec: expected a QuantSpec or None, got {type(self.spec).__name__}")
    ctx = _intercept.current_context()
    if ctx is None:
      return x
    frame = _intercept._STATE.frames[-1]  # pylint: disable=protected-access
    rule = ctx.match(frame.path)
    if rule is not None and rule.skip:
      return x
    spec = self.spec if self.spec is not None else (rule.act if rule is not None else None)
    if spec is None:
      return x
    where = f"ActQuant {_quantizer.describe(frame.path)} input"
    with _intercept._guard():  # pylint: disable=protected-access
      ctx.record(frame, None, None, act=spec)
      if ctx.mode == _intercept.SERVED:
        enc = frame.store.get(_intercept.SERVED, "input")
        return core.fake_quantize_input(x, enc) if isinstance(enc, core.Encoding) else x
      if ctx.mode in (_intercept.CONVERT, _intercept.INSPECT):
        _intercept.record_activation(frame.store, "input", x, spec, ctx.mode, where)
        return x
      return _quantizer.quantize_activation(frame.store, "input", x, spec, ctx.mode, where)


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
  entries = _quantizer.quantizer_entries(variables.get(_quantizer.STATS, {}))
  return sorted("/".join(p) for p, _ in entries)
