"""Type aliases shared by the core modules."""

import jax
import jax.typing

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
