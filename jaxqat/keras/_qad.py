"""QAT recipes and quantization-aware distillation (QAD) for Keras 3, on every backend.

* :func:`recipe_optimizers` turns a :class:`jaxqat.core.QATRecipe` into the
  two Keras optimizers of :func:`jaxqat.keras.qat_optimizer`, with Keras
  learning-rate schedules equal to the recipe's optax schedules (linear
  warmup from 0, then cosine):
  ``model.compile(optimizer=jqk.qat_optimizer(model, *jqk.recipe_optimizers(recipe)))``.
* :class:`QADModel` wraps a quantized student and its frozen float teacher;
  ``fit`` trains the student on :class:`jaxqat.core.QADLoss` (KL on
  temperature-softened logits, logit MSE, hard labels, named features;
  Hinton et al. 2015; Romero et al. 2015). The teacher is not trainable and
  runs in inference mode inside the same compiled train step; no gradient
  reaches it. The loss is written with ``keras.ops`` (JAX, torch, TF
  backends) and equals :func:`jaxqat.core.distillation_loss`.
"""

from __future__ import annotations

from jaxqat.core._distill import QADLoss
from jaxqat.core._distill import check_qad_args
from jaxqat.core._recipe import QATRecipe
from jaxqat.keras._backend import keras

__all__ = ["recipe_optimizers", "recipe_schedules", "QADModel"]

ops = keras.ops


def _schedule(recipe: QATRecipe, peak: float):
  warm = recipe.warmup_steps
  if warm == 0:
    return keras.optimizers.schedules.CosineDecay(peak, recipe.steps, alpha=recipe.end_lr_fraction)
  # Keras' CosineDecay decays over decay_steps *after* the warmup; optax's counts the warmup.
  return keras.optimizers.schedules.CosineDecay(
      0.0, recipe.steps - warm, alpha=recipe.end_lr_fraction, warmup_target=peak,
      warmup_steps=warm)


def recipe_schedules(recipe: QATRecipe):
  """The recipe's two rates as Keras schedules: ``(weights, quantizer parameters)``.

  Args:
    recipe: a :class:`jaxqat.core.QATRecipe`.

  Returns:
    Two ``keras.optimizers.schedules.CosineDecay`` with linear warmup, equal
    to ``recipe.schedule()`` and ``recipe.quant_schedule()`` at every step.

  Raises:
    TypeError: if ``recipe`` is not a ``QATRecipe``.

  Examples:
    >>> from jaxqat.core._recipe import QATRecipe
    >>> w, q = recipe_schedules(QATRecipe(original_steps=1000, original_lr=0.1))
    >>> [round(float(w(s)), 6) for s in (0, 10, 100)], round(float(q(10)), 6)
    ([0.0, 0.001, 0.0], 0.001)
  """
  if not isinstance(recipe, QATRecipe):
    raise TypeError(f"recipe: expected a jaxqat.core.QATRecipe, got {type(recipe).__name__}")
  return _schedule(recipe, recipe.peak_lr), _schedule(recipe, recipe.quant_lr)


def recipe_optimizers(recipe: QATRecipe):
  """The recipe as Keras optimizers: ``(optimizer, quant_optimizer)``.

  The counterpart of :meth:`jaxqat.core.QATRecipe.optimizers` for
  :func:`jaxqat.keras.qat_optimizer`: SGD with momentum (and Nesterov), Adam
  or AdamW for the weights, with the recipe's schedule; Adam with the
  quantizer schedule and no weight decay for ``log_scale``/``offset``.
  ``weight_decay`` is Keras' decoupled decay (``w -= lr · wd · w``) for every
  optimizer choice; optax's SGD/Adam recipe adds it to the gradient instead
  (the two agree for AdamW).

  Args:
    recipe: a :class:`jaxqat.core.QATRecipe`.

  Returns:
    ``(optimizer, quant_optimizer)``, fresh Keras optimizers.

  Raises:
    TypeError: if ``recipe`` is not a ``QATRecipe``.

  Examples:
    >>> from jaxqat.core._recipe import QATRecipe
    >>> opt, qopt = recipe_optimizers(QATRecipe(original_steps=100, original_lr=1.0))
    >>> type(opt).__name__, float(opt.momentum), type(qopt).__name__
    ('SGD', 0.9, 'Adam')
  """
  lr, qlr = recipe_schedules(recipe)
  wd = recipe.weight_decay or None
  if recipe.optimizer == "sgd":
    opt = keras.optimizers.SGD(lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               weight_decay=wd)
  elif recipe.optimizer == "adam":
    opt = keras.optimizers.Adam(lr, weight_decay=wd)
  else:
    opt = keras.optimizers.AdamW(lr, weight_decay=recipe.weight_decay)
  return opt, keras.optimizers.Adam(qlr)


def _log_softmax(z):
  return z - ops.logsumexp(z, axis=-1, keepdims=True)


def _distill(loss: QADLoss, s, t, y, s_feats, t_feats):
  """``jaxqat.core.distillation_loss`` in keras.ops (every backend)."""
  s = ops.cast(s, "float32")
  t = ops.stop_gradient(ops.cast(t, "float32"))
  total = ops.zeros((), "float32")
  if loss.kl_weight:
    temp = loss.temperature
    lt, ls = _log_softmax(t / temp), _log_softmax(s / temp)
    kl = ops.mean(ops.sum(ops.exp(lt) * (lt - ls), axis=-1))
    total = total + loss.kl_weight * temp * temp * kl
  if loss.mse_weight:
    total = total + loss.mse_weight * ops.mean(ops.square(s - t))
  if loss.label_weight:
    if y is None:
      raise ValueError("labels: label_weight > 0 needs integer labels: pass y to fit")
    y = ops.cast(ops.reshape(y, ops.shape(s)[:-1]), "int32")
    ce = ops.take_along_axis(_log_softmax(s), ops.expand_dims(y, -1), axis=-1)
    total = total - loss.label_weight * ops.mean(ce)
  if loss.feature_weight:
    fm = ops.zeros((), "float32")
    for n in loss.features:
      fs, ft = ops.cast(s_feats[n], "float32"), ops.stop_gradient(ops.cast(t_feats[n], "float32"))
      fm = fm + ops.mean(ops.square(fs - ft))
    total = total + loss.feature_weight * fm / len(loss.features)
  return total


def _feature_model(model, names, who):
  if not names:
    return None
  graph = isinstance(model, keras.Sequential) or any(
      c.__name__ == "Functional" for c in type(model).__mro__)
  if not graph:
    raise ValueError(f"features: matching named features needs a Functional or Sequential "
                     f"{who}; {model.name!r} is a subclassed {type(model).__name__}")
  layers = {l.name: l for l in model.layers}
  outs = []
  for n in names:
    if n not in layers:
      raise ValueError(f"features: {n!r} is not a layer of the {who} {model.name!r}; it has "
                       f"{sorted(layers)}")
    outs.append(layers[n].output)
  return keras.Model(model.inputs, [model.outputs[0]] + outs, name=f"{model.name}_features")


@keras.saving.register_keras_serializable(package="jaxqat")
class QADModel(keras.Model):
  """Quantization-aware distillation with ``fit``: the student learns from a frozen teacher.

  ``QADModel(student, teacher, loss=QADLoss(...))`` predicts with the
  student; its ``compute_loss`` is the QAD loss between the student's and the
  teacher's outputs on the same batch (plus any loss given to ``compile``,
  on the labels). Compile it with :func:`jaxqat.keras.qat_optimizer` over
  the student (optionally with :func:`recipe_optimizers`) and call ``fit``;
  ``y`` is only needed for ``loss.label_weight > 0``, a compiled loss or
  metrics. The teacher is set non-trainable and called with
  ``training=False``; its variables never change.

  Args:
    student: the quantized Keras model (trained).
    teacher: the float model, e.g. the model before ``jqk.quantize``
      (Sequential/Functional ``quantize`` leaves it untouched).
    loss: the :class:`jaxqat.core.QADLoss` mix; ``features`` name layers
      present in both models (Functional/Sequential models only).
    **kwargs: ``keras.Model`` arguments (``name``).

  Raises:
    TypeError: if a model is not a ``keras.Model`` or ``loss`` not a ``QADLoss``.
    ValueError: if the teacher's output shape differs from the student's, a
      feature name is not a layer of both, or the teacher is the student.

  Examples:
    >>> import keras, numpy as np
    >>> import jaxqat.keras as jqk
    >>> from jaxqat.core._distill import QADLoss
    >>> keras.utils.set_random_seed(0)
    >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> student = jqk.quantize(keras.models.clone_model(teacher))  # other weights than the teacher
    >>> x = np.linspace(-1, 1, 32, dtype="float32").reshape(8, 4)
    >>> _ = jqk.calibrate(student, x)
    >>> qad = QADModel(student, teacher, loss=QADLoss(mse_weight=1.0, kl_weight=0.0))
    >>> qad.compile(optimizer=keras.optimizers.SGD(0.1))
    >>> h = qad.fit(x, epochs=3, batch_size=8, verbose=0).history["loss"]
    >>> bool(h[-1] < 0.8 * h[0])  # the student moves towards the teacher
    True
  """

  def __init__(self, student, teacher, *, loss: QADLoss = QADLoss(), **kwargs):
    super().__init__(**kwargs)
    check_qad_args(teacher, student, loss, keras.Model, "keras.Model",
                   "the one given to jqk.quantize (or a clone taken before an in-place quantize)")
    s_shape, t_shape = getattr(student, "output_shape", None), getattr(teacher, "output_shape",
                                                                        None)
    if s_shape is not None and t_shape is not None and tuple(s_shape) != tuple(t_shape):
      raise ValueError(f"teacher: the teacher's output has shape {tuple(t_shape)} but the "
                       f"student's has shape {tuple(s_shape)}; they must match")
    self.student = student
    self.teacher = teacher
    self.teacher.trainable = False
    self.qad_loss = loss
    self._s_feats = _feature_model(student, loss.features, "student")
    self._t_feats = _feature_model(teacher, loss.features, "teacher")

  def call(self, inputs, training=None):
    return self.student(inputs, training=training)

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    """The QAD loss of the batch (plus the compiled loss on ``y``, if any)."""
    loss = self.qad_loss
    s_feats = t_feats = None
    if self._s_feats is not None:
      s_out = self._s_feats(x, training=training)
      t_out = self._t_feats(x, training=False)
      y_pred, s_feats = s_out[0], dict(zip(loss.features, s_out[1:]))
      t_logits, t_feats = t_out[0], dict(zip(loss.features, t_out[1:]))
    else:
      t_logits = self.teacher(x, training=False)
    if tuple(t_logits.shape[1:]) != tuple(y_pred.shape[1:]):
      raise ValueError(f"teacher: the teacher's output has shape {tuple(t_logits.shape)} but the "
                       f"student's has shape {tuple(y_pred.shape)}; they must match")
    total = _distill(loss, y_pred, t_logits, y, s_feats, t_feats)
    if self._compile_loss is not None and y is not None:
      total = total + super().compute_loss(x, y, y_pred, sample_weight, training)
    elif self.losses:
      total = total + ops.sum(self.losses)
    return total

  def get_config(self):
    return {"name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "loss": {f: getattr(self.qad_loss, f) for f in (
                "temperature", "kl_weight", "mse_weight", "label_weight", "feature_weight",
                "features")}}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    student = keras.saving.deserialize_keras_object(config.pop("student"))
    teacher = keras.saving.deserialize_keras_object(config.pop("teacher"))
    loss = config.pop("loss")
    loss["features"] = tuple(loss.get("features", ()))
    return cls(student, teacher, loss=QADLoss(**loss), **config)
