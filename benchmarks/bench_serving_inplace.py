"""Serving latency of layers served *in place*: integer kernels against the dequantize path.

Two models whose quantized layers no graph rebuild can hold, as model zoos write them:

* ``keras``: a Keras (JAX backend) subclassed decoder, 4 blocks of width 256 (4 heads,
  MLP 1024), sequence 128, whose attention projections (``EinsumDense``) and MLPs
  (``Dense``) are created and called by a custom block layer, as in ``keras_hub``;
  :func:`jaxqat.keras.convert` serves them in place on a copy of the model;
* ``nnx``: an NNX module multiplying by its own 1024x1024 parameters with
  ``jnp.einsum`` (4 layers, batch 256), which :func:`jaxqat.flax.nnx.quantize`
  intercepts and :func:`jaxqat.flax.nnx.convert` serves as codes inside the module.

Configurations: the float model; W8A8 served with ``integer=True`` (int8 x int8 -> int32
ops on the stored codes); the same served with ``integer=False`` (codes dequantized on the
fly, the fake-quant values bit for bit). Each is a jitted forward; the configurations run
interleaved round by round in one process; medians after warm-up, and the median of the
per-round ratios.

Run: ``python benchmarks/bench_serving_inplace.py [--models keras,nnx] [--repeats 30]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _keras_model():
  import keras  # pylint: disable=g-import-not-at-top

  @keras.saving.register_keras_serializable(package="jaxqat_bench")
  class Block(keras.layers.Layer):

    def __init__(self, width=256, heads=4, mlp=1024, **kwargs):
      super().__init__(**kwargs)
      hd = width // heads
      self.qkv = [keras.layers.EinsumDense("btd,dhk->bthk", (None, heads, hd), name=n)
                  for n in ("q", "k", "v")]
      self.o = keras.layers.EinsumDense("bthk,hkd->btd", (None, width), name="o")
      self.up = keras.layers.Dense(mlp, activation="gelu", name="up")
      self.down = keras.layers.Dense(width, name="down")
      self.n1 = keras.layers.LayerNormalization(name="n1")
      self.n2 = keras.layers.LayerNormalization(name="n2")

    def call(self, x):
      h = self.n1(x)
      q, k, v = (p(h) for p in self.qkv)
      a = keras.ops.softmax(keras.ops.einsum("bqhk,bthk->bhqt", q, k) / 8.0, axis=-1)
      x = x + self.o(keras.ops.einsum("bhqt,bthk->bqhk", a, v))
      return x + self.down(self.up(self.n2(x)))

  @keras.saving.register_keras_serializable(package="jaxqat_bench")
  class Decoder(keras.Model):

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      self.blocks = [Block(name=f"block{i}") for i in range(4)]

    def call(self, x):
      for b in self.blocks:
        x = b(x)
      return x

  keras.utils.set_random_seed(0)
  model = Decoder()
  x = np.random.default_rng(0).normal(size=(8, 128, 256)).astype("float32")
  model(x)
  return model, x


def _keras(repeats):
  import jaxqat.keras as jqk  # pylint: disable=g-import-not-at-top
  model, x = _keras_model()
  q = jqk.calibrate(jqk.quantize(model), x)

  def jitted(m):
    tv = [v.value for v in m.trainable_variables]
    ntv = [v.value for v in m.non_trainable_variables]
    return jax.jit(lambda x: m.stateless_call(tv, ntv, x)[0])

  served = {"integer": jqk.convert(q), "dequantize": jqk.convert(q, integer=False)}
  return {"float": jitted(model), **{k: jitted(m) for k, m in served.items()}}, (x,)


def _nnx(repeats):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxqat.core import Rule, default_act_spec, default_weight_spec  # pylint: disable=g-import-not-at-top
  from jaxqat.flax import nnx as qnnx  # pylint: disable=g-import-not-at-top

  class MLP(nnx.Module):

    def __init__(self, n=4, d=1024):
      keys = jax.random.split(jax.random.key(0), n)
      self.ws = nnx.List([nnx.Param(jax.random.normal(k, (d, d)) / d**0.5) for k in keys])

    def __call__(self, x):
      for w in self.ws:
        x = jax.nn.relu(jnp.einsum("bi,io->bo", x, w[...]))
      return x

  x = jax.random.normal(jax.random.key(1), (256, 1024))
  q = qnnx.quantize(MLP(), [Rule(pattern=".*", weight=default_weight_spec(),
                                 act=default_act_spec())])
  qnnx.calibrate(q, [x])
  run = nnx.jit(lambda m, x: m(x))
  models = {"float": MLP(), "integer": qnnx.convert(q), "dequantize": qnnx.convert(q, integer=False)}
  return {k: (lambda x, m=m: run(m, x)) for k, m in models.items()}, (x,)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  ap.add_argument("--models", default="keras,nnx")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=30)
  args = ap.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
  for name in args.models.split(","):
    fns, inputs = {"keras": _keras, "nnx": _nnx}[name](args.repeats)
    for _ in range(args.warmup):
      for f in fns.values():
        jax.block_until_ready(f(*inputs))
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
      for k, f in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(*inputs))
        times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in fns:
      paired = statistics.median(a / b for a, b in zip(times[k], times["float"]))
      print(f"{name:6s} {k:10s} {1e3 * med[k]:8.2f} ms  x float {med[k] / med['float']:.2f} "
            f"(paired {paired:.2f})")
    print(f"{name:6s} integer / dequantize: {med['integer'] / med['dequantize']:.2f}")


if __name__ == "__main__":
  main()
