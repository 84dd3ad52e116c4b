"""QAT recipes: the fine-tuning schedule and optimizers, from the float recipe.

The published rule of thumb for quantization-aware fine-tuning (Jacob et al.
2018; Krishnamoorthi 2018, "Quantizing deep convolutional networks for
efficient inference"; NVIDIA's QAT/QAD guides) starts from the trained float
(or PTQ) model and fine-tunes for a fraction of the original schedule, at a
small fraction of the original learning rate, with a short linear warmup
followed by cosine decay. Learned quantizer parameters (LSQ step sizes and
LSQ+ offsets, Esser et al. 2020; Bhalgat et al. 2020) get their own optimizer
and rate and no weight decay. :class:`QATRecipe` writes that rule down once;
every number is a keyword argument.

The recipe produces optax transformations (:meth:`QATRecipe.tx`,
:meth:`QATRecipe.quant_tx`) that each front end's ``qat_optimizer`` combines:
``qnnx.qat_optimizer(model, *recipe.optimizers())``.
"""

from __future__ import annotations

import dataclasses
import math

import optax

__all__ = ["QATRecipe", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam", "adamw")


def _positive(name, value, *, integer=False, allow_zero=False):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      integer and not isinstance(value, int)):
    raise TypeError(f"QATRecipe.{name}: expected {'an int' if integer else 'a number'}, "
                    f"got {value!r}")
  if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"QATRecipe.{name}: must be {'>= 0' if allow_zero else '> 0'} and finite, "
                     f"got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATRecipe:
  """The QAT fine-tuning recipe derived from the original float training recipe.

  Attributes:
    original_steps: the number of optimizer steps of the float training.
    original_lr: its (peak) learning rate.
    step_fraction: QAT steps as a fraction of ``original_steps`` (0.1).
    lr_fraction: the QAT peak rate as a fraction of ``original_lr`` (0.01).
    warmup_fraction: linear warmup, as a fraction of the QAT steps (0.1).
    end_lr_fraction: the rate at the last step as a fraction of the peak (0).
    optimizer: ``"sgd"`` (with momentum, the default), ``"adam"`` or
      ``"adamw"``, for the model's weights.
    momentum: SGD momentum (0.9); ``nesterov`` for SGD's Nesterov variant.
    nesterov: whether SGD uses Nesterov momentum (False).
    weight_decay: decoupled weight decay of ``"adamw"`` (or L2 added to the
      SGD/Adam updates) on the weights (0); never applied to quantizer
      parameters.
    quant_lr: the peak rate of the quantizer parameters (1e-3; Adam, same
      warmup and cosine shape). Quantizer step sizes are stored as
      ``log s`` (:func:`jaxqat.core.step_size_to_param`), so this is a
      relative rate: 1e-3 moves a step size by about 0.1% per step.

  At 2 bits the defaults are too timid: the step sizes must move far from
  their calibrated values and the weights must rearrange. On digits with a
  W2A2 MLP (first and last layer 8-bit, 200 steps; ``tests/integration/
  test_qad.py``) QAD came within 0.39 points of float on average with
  ``lr_fraction=1.0, quant_lr=3e-2`` and MSE-initialised weight step sizes,
  against 1.84 with ``lr_fraction=0.3, quant_lr=3e-3``.

  Examples:
    >>> r = QATRecipe(original_steps=10_000, original_lr=0.1)
    >>> r.steps, r.peak_lr, r.warmup_steps
    (1000, 0.001, 100)
    >>> s = r.schedule()
    >>> float(s(0)), float(s(100)), round(float(s(1000)), 9)
    (0.0, 0.001, 0.0)
    >>> QATRecipe(original_steps=100, original_lr=0.1, optimizer="lion")
    Traceback (most recent call last):
    ...
    ValueError: QATRecipe.optimizer: must be one of ('sgd', 'adam', 'adamw'), got 'lion'
  """

  original_steps: int
  original_lr: float
  step_fraction: float = 0.1
  lr_fraction: float = 0.01
  warmup_fraction: float = 0.1
  end_lr_fraction: float = 0.0
  optimizer: str = "sgd"
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 0.0
  quant_lr: float = 1e-3

  def __post_init__(self):
    _positive("original_steps", self.original_steps, integer=True)
    _positive("original_lr", self.original_lr)
    _positive("step_fraction", self.step_fraction)
    _positive("lr_fraction", self.lr_fraction)
    _positive("warmup_fraction", self.warmup_fraction, allow_zero=True)
    _positive("end_lr_fraction", self.end_lr_fraction, allow_zero=True)
    _positive("momentum", self.momentum, allow_zero=True)
    _positive("weight_decay", self.weight_decay, allow_zero=True)
    _positive("quant_lr", self.quant_lr)
    if self.warmup_fraction >= 1:
      raise ValueError(f"QATRecipe.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
    if self.end_lr_fraction > 1:
      raise ValueError(f"QATRecipe.end_lr_fraction: must be in [0, 1], got {self.end_lr_fraction}")
    if self.momentum >= 1:
      raise ValueError(f"QATRecipe.momentum: must be in [0, 1), got {self.momentum}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"QATRecipe.optimizer: must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if not isinstance(self.nesterov, bool):
      raise TypeError(f"QATRecipe.nesterov: expected a bool, got {self.nesterov!r}")

  @property
  def steps(self) -> int:
    """QAT steps: ``max(1, round(step_fraction * original_steps))``."""
    return max(1, round(self.step_fraction * self.original_steps))

  @property
  def peak_lr(self) -> float:
    """The peak rate of the weights: ``lr_fraction * original_lr``."""
    return self.lr_fraction * self.original_lr

  @property
  def warmup_steps(self) -> int:
    """Linear-warmup steps: ``round(warmup_fraction * steps)``, below ``steps``."""
    return min(self.steps - 1, round(self.warmup_fraction * self.steps))

  def _schedule(self, peak: float) -> optax.Schedule:
    warm = self.warmup_steps
    end = self.end_lr_fraction * peak
    if warm == 0:
      return optax.cosine_decay_schedule(peak, decay_steps=self.steps,
                                         alpha=self.end_lr_fraction)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=warm,
                                              decay_steps=self.steps, end_value=end)

  def schedule(self) -> optax.Schedule:
    """The weights' rate: 0 -> ``peak_lr`` linearly over the warmup, then cosine.

    It reaches ``end_lr_fraction * peak_lr`` at step ``steps``.

    Returns:
      An optax schedule (step -> rate).
    """
    return self._schedule(self.peak_lr)

  def quant_schedule(self) -> optax.Schedule:
    """The quantizer parameters' rate: the same shape, peaking at ``quant_lr``."""
    return self._schedule(self.quant_lr)

  def tx(self) -> optax.GradientTransformation:
    """The optimizer of the model's weights (with :meth:`schedule`).

    Returns:
      ``optax.sgd`` (momentum, optional Nesterov), ``optax.adam`` or
      ``optax.adamw``; with ``weight_decay`` as decoupled decay (adamw) or as
      ``optax.add_decayed_weights`` before SGD/Adam.
    """
    lr = self.schedule()
    if self.optimizer == "adamw":
      return optax.adamw(lr, weight_decay=self.weight_decay)
    base = (optax.sgd(lr, momentum=self.momentum or None, nesterov=self.nesterov)
            if self.optimizer == "sgd" else optax.adam(lr))
    if self.weight_decay:
      return optax.chain(optax.add_decayed_weights(self.weight_decay), base)
    return base

  def quant_tx(self) -> optax.GradientTransformation:
    """The optimizer of the quantizer parameters: Adam, :meth:`quant_schedule`, no decay."""
    return optax.adam(self.quant_schedule())

  def optimizers(self) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """``(tx(), quant_tx())``, the two arguments of a front end's ``qat_optimizer``."""
    return self.tx(), self.quant_tx()
