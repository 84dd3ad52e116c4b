"""Serving latency of converted int8 / int4 models against the float model (Flax Linen).

Models: the MLP (four 1024x1024 Dense layers) and the transformer (4 layers,
width 256, 4 heads, MLP 1024, sequence 128) of ``bench_qat_step.py``; opt-in
(``--models cnn1d,resnet``), the small 1-D CNN (four Conv1D(64, 3), 40 steps)
and the small ResNet at 32x32x3 (BatchNorm on running statistics) of
``bench_small_models.py``, whose served convolutions are int8 x int8 -> int32.
Configurations: the float model; W8A8 converted (int8 per-channel weights,
int8 per-tensor inputs: int8 x int8 -> int32 dots); W4A8 converted (packed
int4 per-channel weights, int8 inputs); W8 weight-only converted (int8
weights dequantized on the fly, float inputs). Each is a jitted forward;
times are medians after compilation and warm-up, with the configurations
interleaved round by round in one process, so a slow moment of the machine
hits them alike. Weight memory is the converted model's
``ql.size_report`` (codes, scales, zero points) against float32.

Run: ``python benchmarks/bench_serving.py [--models mlp,transformer,cnn1d,resnet]
[--batches 1,256] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxqat.core import IntFormat, PerOutputChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qat_step import MLP, Transformer, _cpu  # noqa: E402  pylint: disable=g-import-not-at-top

W4A8 = [Rule(pattern=".*",
             weight=QuantSpec(format=IntFormat(bits=4, signed=True, narrow=True),
                              granularity=PerOutputChannel()),
             act=QuantSpec(format="int8", symmetric=False))]
W8 = [Rule(pattern=".*", weight=QuantSpec(format=IntFormat(bits=8, signed=True, narrow=True),
                                          granularity=PerOutputChannel()), act=None)]


def _input(name, batch):
  key = jax.random.key(0)
  if name == "mlp":
    return MLP(), jax.random.normal(key, (batch, 1024))
  if name in ("cnn1d", "resnet"):
    import bench_small_models as small  # pylint: disable=g-import-not-at-top
    shape = small.SHAPES[name][0]
    model = small.LinenCNN1D() if name == "cnn1d" else small.LinenResNet(train=False)
    return model, jax.random.normal(key, (batch,) + shape[1:])
  return Transformer(), jax.random.normal(key, (batch, 128, 256))


class _Runner:

  def __init__(self, fn, args, warmup):
    self.fn = jax.jit(fn).lower(*args).compile()
    self.args = args
    for _ in range(warmup):
      jax.block_until_ready(self.fn(*args))
    self.times = []

  def run(self):
    t = time.perf_counter()
    jax.block_until_ready(self.fn(*self.args))
    self.times.append(time.perf_counter() - t)

  @property
  def median(self):
    return statistics.median(self.times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="mlp,transformer")
  ap.add_argument("--batches", default="1,256")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  print(f"machine: {_cpu()}; {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); jax {jax.__version__}; load {os.getloadavg()[0]:.1f}")
  rows, sizes = [], []
  for name in args.models.split(","):
    model, x_cal = _input(name, 8)
    params = jax.jit(model.init)(jax.random.key(1), x_cal)
    served = {}
    for label, rules in (("W8A8 int8", None), ("W4A8 int4", W4A8), ("W8 weight-only", W8)):
      qmodel = ql.quantize(model, rules)
      v = ql.calibrate(qmodel, jax.jit(qmodel.init)(jax.random.key(1), x_cal), [x_cal])
      v = {**v, "params": params["params"]}
      smod, svars = ql.convert(qmodel, v)
      served[label] = (smod, svars)
      rep = ql.size_report(smod, svars)
      sizes.append((name, label, rep.float_bytes, rep.quant_bytes, rep.ratio))
    for batch in (int(b) for b in args.batches.split(",")):
      _, x = _input(name, batch)
      runners = [("float", _Runner(lambda p, x: model.apply(p, x), (params, x), args.warmup))]
      for label, (smod, svars) in served.items():
        runners.append((label, _Runner(lambda v, x, m=smod: m.apply(v, x), (svars, x),
                                       args.warmup)))
      for _ in range(args.repeats):
        for _, r in runners:
          r.run()
      base = runners[0][1].median
      for label, r in runners:
        rows.append((name, batch, label, r.median, r.median / base))
  print(f"\n{'model':<12}{'batch':>6}  {'config':<16}{'median ms':>10}{'x float':>9}")
  for name, batch, label, t, ratio in rows:
    print(f"{name:<12}{batch:>6}  {label:<16}{t * 1e3:>10.2f}{ratio:>9.2f}")
  print(f"\n{'model':<12}{'config':<16}{'float MiB':>10}{'served MiB':>11}{'ratio':>7}")
  for name, label, fb, qb, ratio in sizes:
    print(f"{name:<12}{label:<16}{fb / 2**20:>10.2f}{qb / 2**20:>11.2f}{ratio:>7.3f}")


if __name__ == "__main__":
  main()
