"""Forward+backward time of the fake-quant primitives vs a memory-bound reference.

Each case times one jitted call that returns the forward output and the
gradients (``jax.vjp`` with a fixed cotangent) on a 4096x4096 float32 array,
after compilation, and reports the median over repeats (fake quant and
reference timed alternately). The reference is a fused elementwise op with
the same memory traffic, ``jnp.clip(x * a + b, lo, hi)``, differentiated the same way (with respect to ``x``, and to ``a`` where
the case also returns a scale gradient). Target: ratio <= 1.5.

Usage: python benchmarks/bench_primitives.py [--size 4096] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import jaxqat
from jaxqat import PerChannel, PerTensor, QuantSpec


def _time_pair(f1, args1, f2, args2, repeats):
  """Medians of two jitted calls, timed alternately (a slow moment hits both)."""
  for f, args in ((f1, args1), (f2, args2)):
    jax.block_until_ready(f(*args))  # compile + warm up
    jax.block_until_ready(f(*args))
  times = ([], [])
  for _ in range(repeats):
    for f, args, ts in ((f1, args1, times[0]), (f2, args2, times[1])):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      ts.append(time.perf_counter() - t0)
  return statistics.median(times[0]), statistics.median(times[1])


def _fwd_bwd(f, wrt_scale):
  if wrt_scale:
    def run(x, s, g):
      y, vjp = jax.vjp(f, x, s)
      return y, *vjp(g)
  else:
    def run(x, s, g):
      y, vjp = jax.vjp(lambda v: f(v, s), x)
      return y, *vjp(g)
  return jax.jit(run)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=30)
  args = p.parse_args()
  n = args.size
  key = jax.random.key(0)
  x = jax.random.normal(key, (n, n), jnp.float32)
  g = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)

  ref = lambda v, a: jnp.clip(v * a + 0.5, -3.0, 3.0)
  cases = [
      ("per-tensor int8 (STE)", QuantSpec(format="int8", granularity=PerTensor()), jnp.float32(0.02), False),
      ("per-channel int8 (STE)", QuantSpec(format="int8", granularity=PerChannel(-1)),
       jnp.full((n,), 0.02, jnp.float32), False),
      ("per-tensor int4 LSQ", QuantSpec(format="int4", learning="lsq"), jnp.float32(0.3), True),
      ("per-channel int4 LSQ", QuantSpec(format="int4", learning="lsq", granularity=PerChannel(-1)),
       jnp.full((n,), 0.3, jnp.float32), True),
      ("per-tensor fp8_e4m3 (STE)", QuantSpec(format="fp8_e4m3"), jnp.float32(0.01), False),
  ]
  print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"array: {n}x{n} float32, forward + backward, median of {args.repeats} after warm-up "
        f"(fake quant and reference interleaved); load {os.getloadavg()[0]:.1f}\n")
  print(f"{'case':30s} {'fake quant ms':>14s} {'reference ms':>13s} {'ratio':>7s}")
  for name, spec, scale, wrt_scale in cases:
    fq = lambda v, s, spec=spec: jaxqat.quant_dequant(v, spec, s)
    a = jnp.float32(1.1) if not wrt_scale else jnp.full(jnp.shape(scale), 1.1, jnp.float32)
    t_fq, t_ref = _time_pair(_fwd_bwd(fq, wrt_scale), (x, scale, g), _fwd_bwd(ref, wrt_scale),
                             (x, a, g), args.repeats)
    print(f"{name:30s} {t_fq * 1e3:14.2f} {t_ref * 1e3:13.2f} {t_fq / t_ref:7.2f}")


if __name__ == "__main__":
  main()
