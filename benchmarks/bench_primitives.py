"""Forward+backward time of the fake-quant primitives vs a memory-bound reference.

Each case times one jitted call that returns the forward output and the
gradients (``jax.vjp`` with a fixed cotangent) on a 4096x4096 float32 array,
after compilation, and reports the median over repeats (fake quant and
reference timed alternately). The reference is a fused elementwise op with
the same memory traffic, ``jnp.clip(x * a + b, lo, hi)``, differentiated the same way (with respect to ``x``, and to ``a`` where
the case also returns a scale gradient). Targets: ratio <= 1.5; fp8 <= 1.15
(issue 12). The last two rows time fp8 with the rounding it replaced (frexp/ldexp)
and with XLA's native f32 -> f8 -> f32 conversions, for comparison.

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
from jaxqat.core import _grid
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


def _xla_convert_round(v, fmt):
  """Rounding by XLA's own conversion to the ml_dtypes type and back (fp8 and fp4 only)."""
  return v.astype(fmt.dtype).astype(v.dtype)


def _bit_round_previous(v, fmt):
  """The rounding float_round used before the magic-number addition (bit masks + a select)."""
  uint = jnp.uint32
  drop = 23 - fmt.mbits
  bits = jax.lax.bitcast_convert_type(v, uint)
  bias = uint((1 << (drop - 1)) - 1) + ((bits >> uint(drop)) & uint(1))
  normal = jax.lax.bitcast_convert_type((bits + bias) & uint(0xFFFFFFFF ^ ((1 << drop) - 1)),
                                        v.dtype)
  sub = jnp.round(v * 2.0 ** (fmt.mbits - fmt.emin)) * 2.0 ** (fmt.emin - fmt.mbits)
  return jnp.where(jnp.abs(v) >= 2.0 ** fmt.emin, normal, sub)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--only", default="", help="run only the cases whose name contains this")
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
      ("per-tensor fp4_e2m1 (STE)", QuantSpec(format="fp4_e2m1"), jnp.float32(0.5), False),
  ]
  # fp8 with the roundings it replaced (frexp/ldexp; bit masks with a select for subnormals)
  # and with XLA's own conversions.
  alternatives = {"fp8_e4m3, frexp rounding": _grid.float_round_reference,
                  "fp8_e4m3, bit masks (previous)": _bit_round_previous,
                  "fp8_e4m3, XLA convert": _xla_convert_round}
  cases += [(name, QuantSpec(format="fp8_e4m3"), jnp.float32(0.01), False) for name in alternatives]
  print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"array: {n}x{n} float32, forward + backward, median of {args.repeats} after warm-up "
        f"(fake quant and reference interleaved); load {os.getloadavg()[0]:.1f}\n")
  print(f"{'case':30s} {'fake quant ms':>14s} {'reference ms':>13s} {'ratio':>7s}")
  fast_round = _grid.float_round
  for name, spec, scale, wrt_scale in [c for c in cases if args.only in c[0]]:
    fq = lambda v, s, spec=spec: jaxqat.quant_dequant(v, spec, s)
    a = jnp.float32(1.1) if not wrt_scale else jnp.full(jnp.shape(scale), 1.1, jnp.float32)
    _grid.float_round = alternatives.get(name, fast_round)
    jax.clear_caches()  # retrace the primitive with the rounding chosen
    t_fq, t_ref = _time_pair(_fwd_bwd(fq, wrt_scale), (x, scale, g), _fwd_bwd(ref, wrt_scale),
                             (x, a, g), args.repeats)
    _grid.float_round = fast_round
    print(f"{name:30s} {t_fq * 1e3:14.2f} {t_ref * 1e3:13.2f} {t_fq / t_ref:7.2f}")


if __name__ == "__main__":
  main()
