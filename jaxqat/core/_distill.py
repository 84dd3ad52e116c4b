"""Quantization-aware distillation (QAD) losses, pure JAX.

The quantized student learns from the frozen float teacher (the model before
quantization): Hinton et al. 2015 ("Distilling the knowledge in a neural
network") for the temperature-softened KL term, scaled by ``T**2`` so that
its gradient does not shrink with the temperature; Mishra and Marr 2018
(Apprentice) and Polino et al. 2018 for distillation into low-precision
students; an MSE on logits and on named intermediate features (Romero et al.
2015, FitNets) as options. The teacher's outputs pass through
``jax.lax.stop_gradient``: no gradient reaches the teacher.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from jaxqat.core._typing import Array, ArrayLike

__all__ = ["QADLoss", "distillation_loss", "kl_distillation", "feature_distillation"]


def _check_pair(student, teacher, name: str):
  s, t = jnp.asarray(student), jnp.asarray(teacher)
  if s.shape != t.shape:
    raise ValueError(f"{name}: the teacher's output has shape {t.shape} but the student's has "
                     f"shape {s.shape}; they must match")
  if not (jnp.issubdtype(s.dtype, jnp.floating) and jnp.issubdtype(t.dtype, jnp.floating)):
    raise TypeError(f"{name}: expected floating point outputs, got {s.dtype} and {t.dtype}")
  return s, jax.lax.stop_gradient(t)


def kl_distillation(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                    temperature: float = 1.0) -> Array:
  """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over all leading axes.

  Args:
    student_logits: the quantized model's logits, ``(..., classes)``.
    teacher_logits: the float teacher's logits, same shape (no gradient).
    temperature: the softening temperature ``T > 0``.

  Returns:
    A float32 scalar (0 when the two distributions agree).

  Raises:
    ValueError: if the shapes differ or ``temperature <= 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> t = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(kl_distillation(t, t, temperature=2.0))
    0.0
    >>> kl_distillation(t, t[:, :2])
    Traceback (most recent call last):
    ...
    ValueError: logits: the teacher's output has shape (1, 2) but the student's has shape (1, 3); they must match
  """
  if not temperature > 0:
    raise ValueError(f"temperature: must be > 0, got {temperature!r}")
  s, t = _check_pair(student_logits, teacher_logits, "logits")
  s = s.astype(jnp.float32) / temperature
  t = t.astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return jnp.mean(kl) * temperature ** 2


def feature_distillation(student: Mapping[str, ArrayLike], teacher: Mapping[str, ArrayLike],
                         names) -> Array:
  """Mean over ``names`` of the MSE between student and teacher features.

  Args:
    student: name -> the student's intermediate feature.
    teacher: name -> the teacher's feature of the same shape (no gradient).
    names: the feature names to match.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: naming a feature missing from ``student`` or ``teacher`` (and
      listing the names that exist), if a pair's shapes differ or if
      ``names`` is empty.

  Examples:
    >>> import jax.numpy as jnp
    >>> f = {"block1": jnp.ones((2, 3))}
    >>> float(feature_distillation(f, {"block1": jnp.zeros((2, 3))}, ["block1"]))
    1.0
    >>> feature_distillation(f, f, ["block9"])
    Traceback (most recent call last):
    ...
    ValueError: features: 'block9' is not a feature of the student; it has ['block1']
  """
  names = list(names)
  if not names:
    raise ValueError("features: no feature names given")
  total = jnp.zeros((), jnp.float32)
  for n in names:
    for side, feats in (("student", student), ("teacher", teacher)):
      if n not in feats:
        raise ValueError(f"features: {n!r} is not a feature of the {side}; it has "
                       f"{sorted(feats)}")
    s, t = _check_pair(student[n], teacher[n], f"features[{n!r}]")
    total = total + jnp.mean(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)))
  return total / len(names)


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: Optional[ArrayLike] = None,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    mse_weight: float = 0.0,
    label_weight: float = 0.0,
    student_features: Optional[Mapping[str, ArrayLike]] = None,
    teacher_features: Optional[Mapping[str, ArrayLike]] = None,
    feature_names=(),
    feature_weight: float = 0.0,
) -> Array:
  """The QAD loss: a weighted mix of KL, logit MSE, hard-label CE and feature MSE.

  .. math::

    L = w_{kl} T^2 \\mathrm{KL}(p_t^T \\| p_s^T) + w_{mse} \\|s - t\\|^2
        + w_{ce} \\mathrm{CE}(s, y) + w_f \\frac{1}{|F|}\\sum_{f \\in F}
        \\|s_f - t_f\\|^2

  Args:
    student_logits: the quantized student's logits, ``(..., classes)``.
    teacher_logits: the float teacher's logits (no gradient reaches them).
    labels: integer labels of shape ``student_logits.shape[:-1]``, needed
      when ``label_weight > 0``.
    temperature: the KL temperature.
    kl_weight: weight of the KL term.
    mse_weight: weight of the logit MSE.
    label_weight: weight of the cross-entropy with ``labels``.
    student_features: name -> student feature, for the feature term.
    teacher_features: name -> teacher feature.
    feature_names: the features to match.
    feature_weight: weight of the feature term.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: on mismatched shapes, a negative weight, all weights zero,
      ``label_weight > 0`` without labels, or a feature name that does not
      exist.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> s, t = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
    >>> round(float(distillation_loss(s, t, mse_weight=1.0, kl_weight=0.0)), 6)
    1.0
    >>> g = jax.grad(lambda t: distillation_loss(s, t))(t)  # the teacher gets nothing
    >>> bool((g == 0).all())
    True
  """
  weights = {"kl_weight": kl_weight, "mse_weight": mse_weight, "label_weight": label_weight,
             "feature_weight": feature_weight}
  for k, w in weights.items():
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
      raise ValueError(f"{k}: must be a number >= 0, got {w!r}")
  if not any(weights.values()):
    raise ValueError("distillation_loss: every weight is 0; set kl_weight, mse_weight, "
                     "label_weight or feature_weight")
  s, t = _check_pair(student_logits, teacher_logits, "logits")
  total = jnp.zeros((), jnp.float32)
  if kl_weight:
    total = total + kl_weight * kl_distillation(s, t, temperature=temperature)
  if mse_weight:
    total = total + mse_weight * jnp.mean(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)))
  if label_weight:
    if labels is None:
      raise ValueError("labels: label_weight > 0 needs integer labels")
    y = jnp.asarray(labels)
    if y.shape != s.shape[:-1]:
      raise ValueError(f"labels: expected shape {s.shape[:-1]} (the logits without the class "
                       f"axis), got {y.shape}")
    log_p = jax.nn.log_softmax(s.astype(jnp.float32), axis=-1)
    total = total - label_weight * jnp.mean(jnp.take_along_axis(log_p, y[..., None], -1))
  if feature_weight:
    if student_features is None or teacher_features is None:
      raise ValueError("student_features/teacher_features: feature_weight > 0 needs both")
    total = total + feature_weight * feature_distillation(student_features, teacher_features,
                                                          feature_names)
  return total


def _weight(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      math.isfinite(value) and value >= 0):
    raise ValueError(f"QADLoss.{name}: must be a finite number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QADLoss:
  """The QAD loss mix, as a hashable config (a static argument of ``jax.jit``).

  Every front end's QAD helper (``qad_train_step`` in NNX and Linen,
  ``QADModel`` in Keras) takes one; calling it evaluates
  :func:`distillation_loss` with these weights.

  Attributes:
    temperature: the KL softening temperature ``T`` (1.0).
    kl_weight: weight of ``T² · KL(teacher ‖ student)`` (1.0).
    mse_weight: weight of the MSE between the logits (0.0).
    label_weight: weight of the cross-entropy with the hard labels (0.0).
    feature_weight: weight of the mean feature MSE (0.0; set it with
      ``features``).
    features: names of intermediate features to match (front-end specific
      names: NNX sown/method-output paths such as ``"block1.feat"``, Linen
      intermediates paths such as ``"Dense_0/__call__"``, Keras layer names).

  Raises:
    ValueError: on a negative or non-finite weight, ``temperature <= 0``, all
      weights 0, ``features`` without ``feature_weight`` or the reverse.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = QADLoss(temperature=2.0, mse_weight=0.5)
    >>> t = jnp.array([[1.0, 0.0]])
    >>> float(loss(t, t))
    0.0
    >>> QADLoss(features=("block1",))
    Traceback (most recent call last):
    ...
    ValueError: QADLoss.features: given ('block1',) but feature_weight is 0; set feature_weight > 0
  """

  temperature: float = 1.0
  kl_weight: float = 1.0
  mse_weight: float = 0.0
  label_weight: float = 0.0
  feature_weight: float = 0.0
  features: tuple[str, ...] = ()

  def __post_init__(self):
    for name in ("kl_weight", "mse_weight", "label_weight", "feature_weight"):
      _weight(name, getattr(self, name))
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
      raise ValueError(f"QADLoss.temperature: must be a finite number > 0, got {t!r}")
    feats = self.features
    if isinstance(feats, str):
      feats = (feats,)
    if not all(isinstance(f, str) for f in feats):
      raise TypeError(f"QADLoss.features: expected a tuple of names (str), got {feats!r}")
    object.__setattr__(self, "features", tuple(feats))
    if self.features and not self.feature_weight:
      raise ValueError(f"QADLoss.features: given {self.features} but feature_weight is 0; set "
                       "feature_weight > 0")
    if self.feature_weight and not self.features:
      raise ValueError("QADLoss.feature_weight: > 0 but no features are named; set features")
    if not (self.kl_weight or self.mse_weight or self.label_weight or self.feature_weight):
      raise ValueError("QADLoss: every weight is 0; set kl_weight, mse_weight, label_weight or "
                       "feature_weight")

  def __call__(self, student_logits: ArrayLike, teacher_logits: ArrayLike,
               labels: Optional[ArrayLike] = None, *,
               student_features: Optional[Mapping[str, ArrayLike]] = None,
               teacher_features: Optional[Mapping[str, ArrayLike]] = None) -> Array:
    """:func:`distillation_loss` with this mix (see there for Args and Raises)."""
    return distillation_loss(
        student_logits, teacher_logits, labels, temperature=self.temperature,
        kl_weight=self.kl_weight, mse_weight=self.mse_weight, label_weight=self.label_weight,
        student_features=student_features, teacher_features=teacher_features,
        feature_names=self.features, feature_weight=self.feature_weight)


def check_qad_args(teacher, student, loss, model_type: type, type_name: str, hint: str) -> None:
  """The front ends' shared QAD argument checks (models' types, identity, loss config).

  Raises:
    TypeError: if a model is not a ``model_type`` or ``loss`` not a :class:`QADLoss`.
    ValueError: if the teacher is the student (``hint`` says what to pass).
  """
  for name, m in (("teacher", teacher), ("student", student)):
    if not isinstance(m, model_type):
      raise TypeError(f"{name}: expected a {type_name}, got {type(m).__name__}")
  if teacher is student:
    raise ValueError(f"teacher: is the student itself; pass the float model, {hint}")
  if not isinstance(loss, QADLoss):
    raise TypeError(f"loss: expected a jaxqat.core.QADLoss, got {type(loss).__name__}")
