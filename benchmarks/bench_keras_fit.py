"""Keras QAT fit step time vs the float model (same model, JAX backend, jit_compile).

Usage: KERAS_BACKEND=jax python benchmarks/bench_keras_fit.py [--steps 30] [--batch 128]

Times ``model.train_on_batch`` (one jit-compiled optimizer step) after a
warm-up that excludes compilation, reports the median over ``--steps`` steps
for: the float model, W8A8 fixed-range QAT (absmax observers), W4A4 LSQ QAT,
each with and without Conv+BN folding, and prints a Markdown table.
"""

import argparse
import os
import platform
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from jaxqat.core import PerChannel, QuantSpec, Rule  # noqa: E402
import jaxqat.keras as jqk  # noqa: E402


def cnn(bn: bool):
  keras.utils.set_random_seed(0)
  inp = keras.Input((32, 32, 3))
  x = inp
  for i, (f, s) in enumerate([(32, 1), (64, 2), (64, 1), (128, 2), (128, 1)]):
    x = keras.layers.Conv2D(f, 3, strides=s, padding="same", use_bias=not bn, name=f"conv{i}")(x)
    if bn:
      x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
    x = keras.layers.ReLU()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inp, keras.layers.Dense(10, name="head")(x))


def compile_model(m):
  m.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return m


def time_steps(model, x, y, steps):
  for _ in range(3):  # compile + warm up
    model.train_on_batch(x, y)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    loss = model.train_on_batch(x, y)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args()
  rng = np.random.RandomState(0)
  x = rng.rand(args.batch, 32, 32, 3).astype(np.float32)
  y = rng.randint(0, 10, args.batch)
  w8 = [Rule(pattern=".*", weight=QuantSpec(granularity=PerChannel(-1)), act=QuantSpec())]
  w4 = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1),
                                            learning="lsq"),
             act=QuantSpec(format="int4", learning="lsq"))]
  rows = []
  for bn in (False, True):
    base = cnn(bn)
    t_float = time_steps(compile_model(base), x, y, args.steps)
    rows.append((f"5-conv CNN{' + BN' if bn else ''}", "float", t_float, 1.0))
    for name, rules in (("W8A8 QAT (absmax observers)", w8), ("W4A4 LSQ QAT", w4)):
      q = jqk.quantize(cnn(bn), rules)
      jqk.calibrate(q, x[:32], verbose=0)
      t = time_steps(compile_model(q), x, y, args.steps)
      label = name + (" (BN folded)" if bn else "")
      rows.append((f"5-conv CNN{' + BN' if bn else ''}", label, t, t / t_float))
  print(f"Keras {keras.__version__}, JAX {jax.__version__}, backend {keras.backend.backend()}, "
        f"device {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}, "
        f"batch {args.batch} x 32x32x3, median of {args.steps} steps")
  print("| model | variant | step (ms) | vs float |")
  print("|---|---|---|---|")
  for model, variant, t, r in rows:
    print(f"| {model} | {variant} | {t * 1e3:.1f} | {r:.2f}x |")


if __name__ == "__main__":
  main()
