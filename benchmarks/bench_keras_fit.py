"""Keras QAT fit step time vs the float model (same model; JAX or torch backend).

Usage: KERAS_BACKEND=jax python benchmarks/bench_keras_fit.py [--steps 30] [--batch 128]
       KERAS_BACKEND=torch python benchmarks/bench_keras_fit.py [--jit-compile]

Times ``model.train_on_batch`` (one optimizer step; jit-compiled on JAX,
eager on torch unless ``--jit-compile`` asks for ``torch.compile``) after a
warm-up that excludes compilation, for: the float model, W8A8 fixed-range
QAT (absmax observers), W4A4 LSQ QAT, each with and without Conv+BN folding,
and on JAX W8A8 with ``compute="integer"`` (int8 x int8 -> int32 forward) on
the model without BatchNorm.
The steps of the three variants of a model run interleaved (one step of each
per round), so that a slow moment of a shared machine hits all alike; the
median over ``--steps`` rounds is reported in a Markdown table with the
machine load: wall time, and the process's CPU time (all its threads), which
a loaded machine disturbs less; and the median number of page faults per step
(minor faults of the process: on torch's CPU eager path every fresh buffer
that glibc takes from the system is first-touch faults, which cost float and
QAT alike but grow with the number of fresh activation-sized buffers).

On a shared machine run torch with ``--threads 1``: torch's intra-op thread
pool spins while it waits, so with more threads than idle cores a step can
take several times longer, for float and QAT alike but not by the same
factor.
"""

import argparse
import os
import platform
import resource
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from jaxqat.core import PerChannel, QuantSpec, Rule  # noqa: E402
import jaxqat.keras as jqk  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qat_step import fmt_paired  # noqa: E402  pylint: disable=g-import-not-at-top


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


def rnn():
  """A recurrent classifier: LSTM(128) then GRU(128) over 40 steps of 32 features."""
  keras.utils.set_random_seed(0)
  inp = keras.Input((40, 32))
  x = keras.layers.LSTM(128, return_sequences=True, name="lstm")(inp)
  x = keras.layers.GRU(128, name="gru")(x)
  return keras.Model(inp, keras.layers.Dense(10, name="head")(x))


def compile_model(m, jit_compile):
  m.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return m


def time_interleaved(models, x, y, steps):
  """Median step time of each model, the models' steps interleaved round by round.

  Returns the medians of wall time, of CPU time and of page faults per step,
  and the paired ratio of each model's steps to the first model's
  (``bench_qat_step.fmt_paired``).
  """
  for m in models:
    for _ in range(3):  # compile + warm up
      m.train_on_batch(x, y)
  times = [[] for _ in models]
  cpu = [[] for _ in models]
  faults = [[] for _ in models]
  for _ in range(steps):
    for m, ts, cs, fs in zip(models, times, cpu, faults):
      f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t, c = time.perf_counter(), time.process_time()
      np.asarray(m.train_on_batch(x, y))  # the loss, fetched: the step has finished
      ts.append(time.perf_counter() - t)
      cs.append(time.process_time() - c)
      fs.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
  paired = [fmt_paired(ts, times[0]) for ts in times]
  med = lambda vs: [float(np.median(v)) for v in vs]  # noqa: E731
  return med(times), med(cpu), med(faults), paired


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--jit-compile", action="store_true",
                 help="torch: compile the step with torch.compile (JAX always jit-compiles)")
  p.add_argument("--threads", type=int, default=0,
                 help="torch: intra-op threads (torch.set_num_threads; 0: torch's default)")
  p.add_argument("--models", default="cnn",
                 help="comma-separated: cnn (5-conv CNN, with and without BatchNorm), rnn "
                      "(LSTM + GRU over 40 steps)")
  args = p.parse_args()
  backend = keras.backend.backend()
  if backend == "torch" and args.threads:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.threads)
  if backend == "torch" and args.jit_compile:
    # Keras compiles each layer's forward as its own frame; layers of one class at other
    # spatial sizes make dynamo recompile with symbolic sizes, and torch 2.13's inductor
    # then fails on the strided conv backward (ValueRangeError). Static shapes compile.
    import torch  # pylint: disable=import-outside-toplevel
    torch._dynamo.config.automatic_dynamic_shapes = False  # pylint: disable=protected-access
    torch._dynamo.config.recompile_limit = 64  # pylint: disable=protected-access
  jit = backend == "jax" or args.jit_compile
  rng = np.random.RandomState(0)
  inputs = {"cnn": rng.rand(args.batch, 32, 32, 3).astype(np.float32),
            "rnn": rng.normal(size=(args.batch, 40, 32)).astype(np.float32)}
  y = rng.randint(0, 10, args.batch)
  w8 = [Rule(pattern=".*", weight=QuantSpec(granularity=PerChannel(-1)), act=QuantSpec())]
  w4 = [Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerChannel(-1),
                                            learning="lsq"),
             act=QuantSpec(format="int4", learning="lsq"))]
  rows = []
  load = os.getloadavg()[0]
  cases = [("cnn", bn) for bn in (False, True)] + [("rnn", False)]
  for kind, bn in [c for c in cases if c[0] in args.models.split(",")]:
    make = (lambda bn=bn: cnn(bn)) if kind == "cnn" else rnn
    x = inputs[kind]
    models = [compile_model(make(), jit)]
    labels = ["float"]
    variants = [("W8A8 QAT (absmax observers)", w8), ("W4A4 LSQ QAT", w4)]
    if backend == "jax" and kind == "cnn" and not bn:  # the integer forward (not folded Conv+BN)
      variants.append(("W8A8 QAT, compute='integer'", [Rule(
          pattern=".*", weight=QuantSpec(granularity=PerChannel(-1)), act=QuantSpec(),
          compute="integer")]))
    for name, rules in variants:
      q = jqk.quantize(make(), rules)
      jqk.calibrate(q, x[:32], verbose=0)
      models.append(compile_model(q, jit))
      labels.append(name + (" (BN folded)" if bn else ""))
    times, cpu, faults, paired = time_interleaved(models, x, y, args.steps)
    for label, t, c, f, pr in zip(labels, times, cpu, faults, paired):
      name = f"5-conv CNN{' + BN' if bn else ''}" if kind == "cnn" else "LSTM + GRU, 40 steps"
      rows.append((name, label, t, t / times[0], pr, c, c / cpu[0], f))
  threads = ""
  if backend == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    threads = f", {torch.get_num_threads()} torch threads"
  print(f"Keras {keras.__version__}, backend {backend} ({'compiled' if jit else 'eager'}), "
        f"{platform.processor() or platform.machine()}{threads}, batch {args.batch}, "
        f"median of {args.steps} interleaved steps, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
  print("(paired: the median [quartiles] of the per-round ratios to the float step)")
  print("| model | variant | step (ms) | vs float | paired | CPU (ms) | CPU vs float "
        "| page faults / step |")
  print("|---|---|---|---|---|---|---|---|")
  for model, variant, t, r, pr, c, rc, f in rows:
    print(f"| {model} | {variant} | {t * 1e3:.1f} | {r:.2f}x | {pr} | {c * 1e3:.1f} | "
          f"{rc:.2f}x | {f:.0f} |")


if __name__ == "__main__":
  main()
