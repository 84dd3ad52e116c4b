"""qat_optimizer: learned quantizer parameters get their own Keras optimizer.

LSQ step sizes (``log_scale``) and LSQ+ offsets (``offset``) want a learning
rate of their own and no weight decay (decaying ``log s`` towards 0 pulls
every step size towards 1). :func:`qat_optimizer` returns one
``keras.optimizers.Optimizer`` for ``model.compile`` that applies
``quant_optimizer`` to those variables and ``optimizer`` to every other
trainable variable: the Keras counterpart of the Flax front ends' optax
partition. It works with ``compile``/``fit`` on every backend (on JAX through
the stateless path Keras' trainer uses) and is saved with the model.
"""

from __future__ import annotations

import warnings

from jaxqat.core._report import QuantizationWarning
from jaxqat.keras._backend import keras

__all__ = ["QATOptimizer", "qat_optimizer", "is_quant_param"]


def is_quant_param(variable) -> bool:
  """Whether ``variable`` is a learned quantizer parameter (``log_scale`` or ``offset``).

  Examples:
    >>> import keras
    >>> is_quant_param(keras.Variable(1.0))
    False
  """
  return bool(getattr(variable, "jaxqat_quant_param", False))


def _no_rate():
  return 0.0


def _get(opt, what):
  if isinstance(opt, dict):
    opt = keras.saving.deserialize_keras_object(opt)
  elif isinstance(opt, str):
    opt = keras.optimizers.get(opt)
  if not isinstance(opt, keras.optimizers.Optimizer):
    raise TypeError(f"{what}: expected a keras.optimizers.Optimizer, got {type(opt).__name__}")
  if isinstance(opt, QATOptimizer):
    raise TypeError(f"{what}: is a QATOptimizer already; pass the plain optimizers")
  return opt


@keras.saving.register_keras_serializable(package="jaxqat")
class QATOptimizer(keras.optimizers.Optimizer):
  """Applies ``quant_optimizer`` to learned quantizer parameters, ``optimizer`` to the rest.

  Built by :func:`qat_optimizer`; see there. ``learning_rate`` reads and sets
  the rate of ``optimizer`` (so Keras' learning-rate callbacks drive the
  model's weights); ``quant_optimizer`` keeps its own. ``quant_optimizer``'s
  weight decay is switched off (quantizer parameters get none).

  Args:
    optimizer: the optimizer (or its config) of every other trainable variable.
    quant_optimizer: the optimizer (or its config) of ``log_scale``/``offset``.
    name: the optimizer name.

  Raises:
    TypeError: if an argument is not a Keras optimizer.
    ValueError: if both are the same object.
  """

  def __init__(self, optimizer, quant_optimizer, name=None, **kwargs):
    for key in ("learning_rate", "weight_decay"):  # from a generic config
      kwargs.pop(key, None)
    super().__init__(learning_rate=_no_rate, name=name or "qat_optimizer", **kwargs)
    optimizer = _get(optimizer, "optimizer")
    quant_optimizer = _get(quant_optimizer, "quant_optimizer")
    if optimizer is quant_optimizer:
      raise ValueError("quant_optimizer: must be a different optimizer object than optimizer "
                       "(each keeps its own state)")
    self.optimizer = optimizer
    self.quant_optimizer = quant_optimizer

  @property
  def learning_rate(self):
    return self.optimizer.learning_rate

  @learning_rate.setter
  def learning_rate(self, value):
    self.optimizer.learning_rate = value

  @property
  def variables(self):
    return self._variables[:] + self.optimizer.variables + self.quant_optimizer.variables

  def build(self, variables):
    if self.built:
      return
    variables = list(variables)
    quant = [v for v in variables if is_quant_param(v)]
    rest = [v for v in variables if not is_quant_param(v)]
    if self.quant_optimizer.built or self.optimizer.built:
      raise ValueError("QATOptimizer: give qat_optimizer fresh (unbuilt) optimizers")
    self.quant_optimizer.weight_decay = None  # no weight decay on quantizer parameters
    self.optimizer.build(rest)
    self.quant_optimizer.build(quant)
    super().build(variables)

  def apply(self, grads, trainable_variables=None):
    if trainable_variables is None:
      if not self.built:
        raise ValueError("QATOptimizer: build it on the trainable variables before apply(grads)")
      trainable_variables = self._trainable_variables
    else:
      trainable_variables = list(trainable_variables)
      if not self.built:
        self.build(trainable_variables)
    grads = list(grads)
    if len(grads) != len(trainable_variables):
      raise ValueError(f"QATOptimizer: {len(grads)} gradients for {len(trainable_variables)} "
                       "variables")
    pairs = list(zip(grads, trainable_variables))
    for opt, sel in ((self.optimizer, False), (self.quant_optimizer, True)):
      part = [(g, v) for g, v in pairs if is_quant_param(v) == sel]
      if part:
        opt.apply([g for g, _ in part], [v for _, v in part])
    self._iterations.assign_add(1)

  def get_config(self):
    return {"name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.optimizer),
            "quant_optimizer": keras.saving.serialize_keras_object(self.quant_optimizer)}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)


def qat_optimizer(model, optimizer, quant_optimizer) -> QATOptimizer:
  """One Keras optimizer: ``quant_optimizer`` for quantizer parameters, ``optimizer`` for the rest.

  Learned quantizer parameters (``log_scale``, ``offset``) get
  ``quant_optimizer`` (its own learning rate, no weight decay); every other
  trainable variable gets ``optimizer`` (with its weight decay, if any).
  Pass the result to ``model.compile``.

  Args:
    model: a model returned by :func:`jaxqat.keras.quantize`.
    optimizer: a Keras optimizer (instance, name or config) for the model's
      own variables.
    quant_optimizer: a different Keras optimizer for the quantizer parameters.

  Returns:
    A :class:`QATOptimizer`.

  Raises:
    TypeError: if ``model`` is not a Keras model or an optimizer is not a
      Keras optimizer.
    ValueError: if both optimizers are the same object.

  Warns:
    QuantizationWarning: if the model has no learned quantizer parameter
      (no LSQ/LSQ+ spec): ``quant_optimizer`` then has nothing to train.

  Examples:
    >>> import keras
    >>> import jaxqat.keras as jqk
    >>> from jaxqat.core import QuantSpec, Rule
    >>> lsq = QuantSpec(format="int4", learning="lsq")
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> q = jqk.quantize(m, [Rule(pattern=".*", weight=lsq, act=lsq)])
    >>> opt = jqk.qat_optimizer(q, keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
    ...                         keras.optimizers.Adam(1e-2))
    >>> q.compile(optimizer=opt, loss="mse")
    >>> float(opt.learning_rate), float(opt.quant_optimizer.learning_rate)
    (0.001, 0.01)
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
  opt = QATOptimizer(optimizer, quant_optimizer)
  if not any(is_quant_param(v) for v in model.trainable_variables):
    warnings.warn(f"model {model.name!r} has no learned quantizer parameters (log_scale, offset): "
                  "quant_optimizer has nothing to train", QuantizationWarning, stacklevel=2)
  return opt
