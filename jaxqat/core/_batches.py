"""Model inputs with static leaves: arrays traced, flags and other Python values kept.

A batch handed to ``calibrate`` (or the example inputs of ``export_serving``)
is a pytree of a model's arguments. Its array leaves are traced; its other
leaves (``train=False``, ``deterministic=True``, a mode string, ``None``) must
reach the model as the Python values they are, since models branch on them.
:func:`split_static` separates the two, :func:`join_static` puts them back.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax
import numpy as np


def is_array(x) -> bool:
  """Whether ``x`` is an array leaf (traced), as opposed to a Python value (static)."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or hasattr(
      x, "aval")


def split_static(tree: Any) -> tuple[list, Hashable]:
  """Splits a pytree into its array leaves and a hashable description of the rest.

  Args:
    tree: any pytree (e.g. ``(args, kwargs)`` of a model call).

  Returns:
    ``(arrays, static)``: the array leaves (``jax.Array``, NumPy arrays and
    scalars, ``jax.ShapeDtypeStruct``) in order, and a hashable value holding
    the tree structure and every other leaf (Python bools, ints, floats,
    strings...), to pass as a static argument of ``jax.jit``.

  Raises:
    TypeError: if a non-array leaf is not hashable (it cannot be static).

  Examples:
    >>> import jax.numpy as jnp
    >>> arrays, static = split_static(((jnp.ones(2),), {"train": False}))
    >>> len(arrays), join_static([jnp.zeros(2)], static)[1]
    (1, {'train': False})
  """
  leaves, treedef = jax.tree.flatten(tree)
  arrays, static = [], []
  for leaf in leaves:
    if is_array(leaf):
      arrays.append(leaf)
      static.append(_ARRAY)
    else:
      try:
        hash(leaf)
      except TypeError:
        raise TypeError(f"a model input of type {type(leaf).__name__} is neither an array nor "
                        "a hashable Python value (bool, int, float, str): it can be neither "
                        "traced nor passed as a static argument") from None
      static.append(leaf)
  return arrays, (treedef, tuple(static))


def join_static(arrays, static: Hashable) -> Any:
  """Inverse of :func:`split_static`: the pytree with ``arrays`` in the array leaves.

  Args:
    arrays: the array leaves (e.g. traced).
    static: the second value :func:`split_static` returned.

  Returns:
    The pytree.

  Examples:
    >>> import jax.numpy as jnp
    >>> join_static(*split_static({"x": jnp.ones(1), "mode": "eval"}))["mode"]
    'eval'
  """
  treedef, leaves = static
  it = iter(arrays)
  return jax.tree.unflatten(treedef, [next(it) if leaf is _ARRAY else leaf for leaf in leaves])


_ARRAY = object()  # an array leaf's place in the static description (hashed by identity)
