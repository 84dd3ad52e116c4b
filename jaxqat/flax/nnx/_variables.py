"""Variable types of the NNX quantizer state.

Two types, so that optimizers and checkpoints can tell quantizer state apart
from the model's own parameters:

* :class:`QuantParam` -- a subclass of :class:`flax.nnx.Param` for the
  quantizer state that is *learned* by gradient descent: the LSQ step size
  (Esser et al. 2020) and the LSQ+ offset (Bhalgat et al. 2020). Being a
  ``Param``, it is trained by ``nnx.Optimizer(model, tx, wrt=nnx.Param)``;
  being its own type, ``optax.multi_transform`` (see
  :func:`jaxqat.flax.nnx.qat_optimizer`) can give it its own learning rate
  and no weight decay.
* :class:`QuantStat` -- a plain :class:`flax.nnx.Variable` (not a ``Param``)
  for everything that is *not* trained: observer statistics and calibrated
  (fixed) scales and zero points. ``nnx.grad(..., argnums=nnx.DiffState(0,
  nnx.Param))`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone.
"""

from __future__ import annotations

from flax import nnx

__all__ = ["QuantParam", "QuantStat"]


class QuantParam(nnx.Param):
  """A learned quantizer parameter (LSQ step size, LSQ+ offset).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> s = QuantParam(jnp.ones(()))
    >>> isinstance(s, nnx.Param), isinstance(s, QuantStat)
    (True, False)
  """


class QuantStat(nnx.Variable):
  """Non-trainable quantizer state: observer statistics, fixed scale/zero point.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> isinstance(QuantStat(jnp.zeros(())), nnx.Param)
    False
  """
