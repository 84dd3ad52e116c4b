"""Published Keras architectures: served int8 forward and integer QAT step vs float (JAX).

Models from ``keras.applications`` (random weights, ``weights=None``; nothing is
downloaded), 10 classes, at ``--size`` x ``--size`` x 3: by default MobileNetV2
and EfficientNetB0 (depthwise convolutions) and ResNet50V2 (none).

* ``--mode serve`` (default): the float model's jitted forward against the
  served model's (``jqk.quantize`` with the default W8A8 rules, ``calibrate``,
  ``convert``: int8 x int8 -> int32 convolutions and dots), batch ``--batch``.
* ``--mode train``: ``train_on_batch`` (``jit_compile=True``, Adam; QAT models
  with ``qat_optimizer``) of the float model, W8A8 fake-quant QAT (Conv+BN
  folded) and W8A8 ``compute="integer"`` QAT (Conv+BN unfolded: a folded pair
  has no integer forward).

``--compare-dot`` adds the integer configurations again with every CPU int8
convolution forced to the dot over the input's windows (the form grouped
convolutions took before they became a sum of int32 products: an A/B of
``jaxqat.core._integer._int8_conv``'s choice, for this benchmark only).

The configurations run interleaved, one call of each per round, after
compilation and warm-up; the table gives each one's median, its ratio to the
float model's median, and the median of the per-round ratios. ``serve`` also
checks that the forced-dot and the default served outputs are equal bit for bit.

Usage: ``KERAS_BACKEND=jax python benchmarks/bench_keras_apps.py [--mode serve|train]
[--models MobileNetV2,EfficientNetB0,ResNet50V2] [--size 32] [--batch 16] [--repeats 10]
[--compare-dot]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qat_step import _cpu  # noqa: E402  pylint: disable=g-import-not-at-top
from bench_qat_step import fmt_paired  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxqat.core import _integer  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxqat.core import default_rules  # noqa: E402  pylint: disable=g-import-not-at-top
import jaxqat.keras as jqk  # noqa: E402  pylint: disable=g-import-not-at-top


_DEFAULT_SUM = _integer._SUM_MAX_GROUP  # pylint: disable=protected-access


def _forced_dot(dot: bool):
  """Sets the grouped-convolution form for what is traced next (the A/B of --compare-dot)."""
  _integer._SUM_MAX_GROUP = 0 if dot else _DEFAULT_SUM  # pylint: disable=protected-access


def _model(name, size, seed=0):
  keras.utils.set_random_seed(seed)
  return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                           classes=10, classifier_activation=None)


def _forward(model):
  """The model's jitted inference forward on its current variables: ``x -> y``."""
  tv = [v.value for v in model.trainable_variables]
  ntv = [v.value for v in model.non_trainable_variables]
  f = jax.jit(lambda x: model.stateless_call(tv, ntv, x, training=False)[0])
  return lambda x: np.asarray(f(x))


def serve_runners(name, x, compare_dot):
  """{label: () -> output} of the float and served forwards."""
  model = _model(name, x.shape[1])
  q = jqk.quantize(model)
  jqk.calibrate(q, x, verbose=0)
  served = jqk.convert(q)
  runs = {"float": _forward(model)}
  forms = ((True, "W8A8 served, windows dot"),) if compare_dot else ()
  for dot, label in forms + ((False, "W8A8 served"),):
    _forced_dot(dot)
    f = _forward(served)
    f(x)  # traced under this form
    runs[label] = f
  _forced_dot(False)
  return {k: (lambda f=f: f(x)) for k, f in runs.items()}


def train_runners(name, x, y, compare_dot):
  """{label: () -> loss} of the float, fake and integer QAT ``train_on_batch``."""
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  configs = [("float", None, False), ("W8A8 fake", default_rules(), False)]
  if compare_dot:
    configs.append(("W8A8 integer, windows dot", default_rules(compute="integer"), True))
  configs.append(("W8A8 integer", default_rules(compute="integer"), False))
  runs = {}
  for label, rules, dot in configs:
    _forced_dot(dot)
    model = _model(name, x.shape[1])
    if rules is None:
      opt = keras.optimizers.Adam(1e-3)
    else:
      model = jqk.quantize(model, rules, fold_batchnorm=rules[0].compute == "fake")
      jqk.calibrate(model, x, verbose=0)
      opt = jqk.qat_optimizer(model, keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    model.compile(opt, loss, jit_compile=True)
    model.train_on_batch(x, y)  # compiled under this form
    runs[label] = lambda m=model: m.train_on_batch(x, y)
  _forced_dot(False)
  return runs


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mode", choices=("serve", "train"), default="serve")
  ap.add_argument("--models", default="MobileNetV2,EfficientNetB0,ResNet50V2")
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--compare-dot", action="store_true")
  args = ap.parse_args()
  print(f"machine: {_cpu()}; {jax.default_backend()}; jax {jax.__version__}; keras "
        f"{keras.__version__}; load {os.getloadavg()[0]:.1f}; mode {args.mode}, "
        f"{args.size}x{args.size}, batch {args.batch}")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
  y = rng.integers(0, 10, args.batch)
  print("| model | config | median ms | x float | paired x float |")
  print("|---|---|---:|---:|---:|")
  for name in args.models.split(","):
    runs = (serve_runners(name, x, args.compare_dot) if args.mode == "serve"
            else train_runners(name, x, y, args.compare_dot))
    outs = {}
    for _ in range(args.warmup):
      outs = {k: f() for k, f in runs.items()}
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
      for k, f in runs.items():
        t = time.perf_counter()
        jax.block_until_ready(f())
        times[k].append(time.perf_counter() - t)
    base = statistics.median(times["float"])
    for k, ts in times.items():
      med = statistics.median(ts)
      print(f"| {name} | {k} | {med * 1e3:.1f} | {med / base:.2f} | "
            f"{fmt_paired(ts, times['float'])} |")
    if args.mode == "serve" and args.compare_dot:
      same = np.array_equal(outs["W8A8 served"], outs["W8A8 served, windows dot"])
      print(f"| {name} | served outputs, both forms, equal bit for bit | {same} | | |")


if __name__ == "__main__":
  main()
