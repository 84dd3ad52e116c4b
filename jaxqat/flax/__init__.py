"""jaxqat.flax: the Flax front ends, NNX (:mod:`jaxqat.flax.nnx`) and Linen (:mod:`jaxqat.flax.linen`).

Flax is imported only inside this package; ``import jaxqat`` does not load it.
"""

from jaxqat.flax import linen as linen
from jaxqat.flax import nnx as nnx

__all__ = ["linen", "nnx"]
