"""Walking a Keras model: every layer once, with its rule path and its locator.

A layer has two addresses:

* its **path**, what the rules match: its name prefixed by the names of the
  models / layers that contain it, joined by ``/`` (``"block/mha/query"``);
* its **locator**, how to find it again in a model rebuilt from its saved
  config: the list of steps from the root, each ``["#layers", i]`` (the
  i-th layer of a Sequential/Functional model) or ``[attribute, key]`` (the
  sublayer held in an attribute; ``key`` is ``None``, a list index or a dict
  key). Locators do not use layer names, which Keras makes unique per process
  (``dense_3`` here is ``dense`` in a fresh process).
"""

from __future__ import annotations

from typing import Iterator

from jaxqat.keras._backend import keras

__all__ = ["is_functional", "children", "walk", "locate", "own_weights"]

# Attributes that hold Keras/torch bookkeeping, never a user's sublayer.
_SKIP_ATTRS = frozenset({
    "_layers", "_tracker", "_inbound_nodes", "_outbound_nodes", "_operations", "_functional",
    "_metrics", "_seed_generators", "_trainable_variables", "_non_trainable_variables",
    "_compile_metrics", "_compile_loss", "_loss_tracker", "optimizer", "_input_layers",
    "_output_layers", "_self_setattr_tracking", "_build_shapes_dict", "_jaxqat_inplace",
    "_modules", "_parameters", "_buffers", "_torch_params",  # torch.nn.Module internals
})


def is_functional(model) -> bool:
  """Whether ``model`` is a Functional model (a subclass of one included), not Sequential."""
  from keras.src.models.functional import Functional  # no public alias in Keras 3
  return isinstance(model, Functional) and not isinstance(model, keras.Sequential)


def _is_graph(layer) -> bool:
  return isinstance(layer, keras.Sequential) or is_functional(layer)


def children(layer) -> list:
  """The direct sublayers of ``layer`` as ``(step, sublayer)`` pairs (see the module doc).

  Args:
    layer: a Keras layer or model.

  Returns:
    The graph layers of a Sequential/Functional model; for any other layer,
    the layers held in its attributes (directly, in a list/tuple or in a
    dict), in attribute order.
  """
  if _is_graph(layer):
    return [(["#layers", i], sub) for i, sub in enumerate(layer.layers)]
  found = []
  attrs = dict(vars(layer))
  attrs.update(vars(layer).get("_modules", {}) or {})  # torch backend: sublayers live in _modules
  for name, value in attrs.items():
    if name in _SKIP_ATTRS:
      continue
    if isinstance(value, keras.layers.Layer) and value is not layer:
      found.append(([name, None], value))
    elif isinstance(value, (list, tuple)):
      found += [([name, i], item) for i, item in enumerate(value)
                if isinstance(item, keras.layers.Layer)]
    elif isinstance(value, dict):
      found += [([name, k], item) for k, item in value.items()
                if isinstance(item, keras.layers.Layer) and isinstance(k, (str, int))]
  return found


def walk(model, stop=lambda layer: False) -> Iterator[tuple]:
  """Every layer under ``model``, depth first, each once (where it is first found).

  Args:
    model: the root layer or model (not itself yielded).
    stop: do not descend into the layers for which it is true (checked after
      the layer is yielded, so a caller may convert it first).

  Yields:
    ``(locator, path, layer)``.
  """
  seen = {id(model)}

  def rec(layer, locator, prefix):
    for step, sub in children(layer):
      if id(sub) in seen or isinstance(sub, keras.layers.InputLayer):
        continue
      seen.add(id(sub))
      loc = locator + [step]
      path = prefix + sub.name
      yield loc, path, sub
      if not stop(sub):
        yield from rec(sub, loc, path + "/")

  yield from rec(model, [], "")


def locate(model, locator):
  """The layer at ``locator`` (see the module doc) under ``model``.

  Raises:
    ValueError: naming the step that does not exist.
  """
  layer = model
  for attr, key in locator:
    try:
      if attr == "#layers":
        layer = layer.layers[key]
      else:
        layer = getattr(layer, attr)
        if key is not None:
          layer = layer[key]
    except (AttributeError, IndexError, KeyError, TypeError) as e:
      raise ValueError(f"no layer at {format_locator(locator)} (step {attr}[{key}]: {e})") from e
  if not isinstance(layer, keras.layers.Layer):
    raise ValueError(f"{format_locator(locator)} is a {type(layer).__name__}, not a layer")
  return layer


def format_locator(locator) -> str:
  """A locator for messages: ``layers[2].attn._query_dense``."""
  parts = []
  for attr, key in locator:
    if attr == "#layers":
      parts.append(f"layers[{key}]")
    else:
      parts.append(attr if key is None else f"{attr}[{key!r}]")
  return ".".join(parts) or "<root>"


def own_weights(layer) -> list:
  """The variables ``layer`` creates itself (not those of its sublayers)."""
  return list(layer._trainable_variables) + list(layer._non_trainable_variables)
