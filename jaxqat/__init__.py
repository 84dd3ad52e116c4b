"""jaxqat: quantization-aware training for JAX, Flax and Keras 3.

``import jaxqat`` loads only the JAX numerics core. The front ends are
imported explicitly: ``jaxqat.flax`` (Flax NNX and Linen) and
``jaxqat.keras`` (Keras 3, any backend).
"""

from jaxqat import core as core
from jaxqat.core import *  # noqa: F401,F403  (re-exports the core's public names)
from jaxqat.core import __all__ as _core_all

__version__ = "0.1.0"

__all__ = ["core", "__version__", *_core_all]
