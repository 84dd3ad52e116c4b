"""Large matmuls: int8 x int8 -> int32 against bf16 and float32, raw and as a served layer.

For each size ``M x K x N`` it times, interleaved round by round in one
process (medians after compilation and warm-up):

* ``f32``: ``x @ w`` in float32 (XLA's default precision for the backend);
* ``bf16``: ``x @ w`` with bfloat16 operands and float32 accumulation;
* ``int8 raw``: ``lax.dot_general`` of int8 operands with
  ``preferred_element_type=int32`` (the GEMM alone);
* ``W8A8 served``: :func:`jaxqat.core.quantized_dot_general` on a bf16 input
  with a static int8 per-tensor input encoding and an int8 per-channel
  weight: quantize the input, the int8 GEMM, one rescale: what a converted
  jaxqat layer runs.

It prints TFLOP/s (``2 M K N`` operations) and each time relative to bf16.
On hardware with int8 matrix units (an H100/H200 runs int8 at twice its bf16
rate) the int8 GEMM should beat bf16 on large matmuls; on a CPU it usually
does not.

Run: ``python benchmarks/bench_gemm.py [--sizes 4096x4096x4096,...] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from jaxqat import core

DOT = (((1,), (0,)), ((), ()))


def _timed(fn, args, warmup):
  compiled = jax.jit(fn).lower(*args).compile()
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))

  def run():
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t

  return run


def _configs(m, k, n):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
  w_spec = core.QuantSpec(format=core.IntFormat(bits=8, signed=True, narrow=True),
                          granularity=core.PerChannel(-1))
  a_spec = core.QuantSpec(format="int8")
  w_scale, _ = core.weight_range(w, w_spec)
  qt = core.quantize_weight(w, core.Encoding(w_scale, None, w_spec))
  act = core.Encoding(jnp.float32(4.0 / 127), None, a_spec)
  xi = jnp.clip(jnp.round(x * 30), -127, 127).astype(jnp.int8)
  wi = qt.values.astype(jnp.int8)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return [
      ("f32", lambda a, b: a @ b, (x, w)),
      ("bf16", lambda a, b: lax.dot_general(a, b, DOT, preferred_element_type=jnp.float32),
       (xb, wb)),
      ("int8 raw", lambda a, b: lax.dot_general(a, b, DOT, preferred_element_type=jnp.int32),
       (xi, wi)),
      ("W8A8 served", lambda a, q: core.quantized_dot_general(a, q, DOT, act=act,
                                                              preferred_element_type=jnp.bfloat16),
       (xb, qt)),
  ]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="1024x1024x1024,4096x4096x4096,8192x8192x8192")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"{jax.device_count()} x {dev.device_kind} ({jax.default_backend()}); jax {jax.__version__}; "
        f"load {os.getloadavg()[0]:.1f}")
  print(f"\n{'M x K x N':<18}{'config':<14}{'median ms':>10}{'TFLOP/s':>9}{'x bf16':>8}")
  for size in args.sizes.split(","):
    m, k, n = (int(v) for v in size.split("x"))
    runs = [(label, _timed(fn, a, args.warmup)) for label, fn, a in _configs(m, k, n)]
    times = {label: [] for label, _ in runs}
    for _ in range(args.repeats):
      for label, run in runs:
        times[label].append(run())
    med = {label: statistics.median(t) for label, t in times.items()}
    for label, t in med.items():
      print(f"{size:<18}{label:<14}{t * 1e3:>10.3f}{2 * m * k * n / t / 1e12:>9.1f}"
            f"{t / med['bf16']:>8.2f}")


if __name__ == "__main__":
  main()
