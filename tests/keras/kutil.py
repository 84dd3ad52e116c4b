"""Backend-agnostic helpers for the Keras tests (values and gradients on any backend)."""

import numpy as np
import keras

BACKEND = keras.backend.backend()


def to_np(x):
  if isinstance(x, keras.Variable):
    x = x.value
  return np.asarray(keras.ops.convert_to_numpy(x))


def value_and_grads(fn, arrays):
  """fn(*backend_tensors) -> scalar; returns (value, [grad per array]) as numpy."""
  arrays = [np.asarray(a, np.float32) for a in arrays]
  if BACKEND == "jax":
    import jax
    import jax.numpy as jnp
    v, g = jax.value_and_grad(fn, argnums=tuple(range(len(arrays))))(
        *[jnp.asarray(a) for a in arrays])
    return np.asarray(v), [np.asarray(t) for t in g]
  if BACKEND == "torch":
    import torch
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    v = fn(*ts)
    v.backward()
    return (v.detach().numpy(), [t.grad.numpy() if t.grad is not None else np.zeros_like(a)
                                 for t, a in zip(ts, arrays)])
  import tensorflow as tf
  ts = [tf.Variable(a) for a in arrays]
  with tf.GradientTape() as tape:
    v = fn(*ts)
  g = tape.gradient(v, ts)
  return v.numpy(), [np.zeros_like(a) if t is None else t.numpy() for t, a in zip(g, arrays)]


def layer_value_and_grads(layer, x, r, training=False):
  """Output of layer(x), and grads of sum(out * r) w.r.t. x and the trainable variables."""
  x = np.asarray(x, np.float32)
  r = np.asarray(r, np.float32)
  tvars = list(layer.trainable_variables)
  if BACKEND == "jax":
    import jax
    import jax.numpy as jnp
    ntv = [v.value for v in layer.non_trainable_variables]

    def loss(tv, xx):
      out, _ = layer.stateless_call(tv, ntv, xx, training=training)
      return jnp.sum(out * r), out

    (_, out), (gtv, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        [v.value for v in tvars], jnp.asarray(x))
    return np.asarray(out), np.asarray(gx), {v.path: np.asarray(g) for v, g in zip(tvars, gtv)}
  if BACKEND == "torch":
    import torch
    xt = torch.tensor(x, requires_grad=True)
    for v in tvars:
      v.value.grad = None
    out = layer(xt, training=training)
    (out * torch.tensor(r)).sum().backward()
    return (out.detach().numpy(), xt.grad.numpy(),
            {v.path: (v.value.grad.numpy() if v.value.grad is not None
                      else np.zeros(v.shape, np.float32)) for v in tvars})
  import tensorflow as tf
  xt = tf.Variable(x)
  with tf.GradientTape() as tape:
    out = layer(xt, training=training)
    loss = tf.reduce_sum(out * r)
  g = tape.gradient(loss, [xt] + [v.value for v in tvars])
  return out.numpy(), g[0].numpy(), {v.path: (np.zeros(v.shape, np.float32) if t is None
                                              else np.asarray(t)) for v, t in zip(tvars, g[1:])}


def assert_close(a, b, tol=1e-6, what=""):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
  scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
  err = float(np.max(np.abs(a - b))) if a.size else 0.0
  assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


@keras.saving.register_keras_serializable(package="jaxqat_test")
class ReversibleEmbedding(keras.layers.Embedding):
  """An Embedding subclass with its own call (as in transformer libraries): the tied output
  projection of a language model."""

  def call(self, inputs, reverse=False):
    if reverse:
      return keras.ops.matmul(inputs, keras.ops.transpose(self.embeddings))
    return super().call(inputs)

  def compute_output_spec(self, inputs, reverse=False):
    if reverse:
      return keras.KerasTensor(inputs.shape[:-1] + (self.input_dim,), dtype=inputs.dtype)
    return super().compute_output_spec(inputs)
