"""QAT step time with the integer forward (``jaxqat.core.qat_op``) vs fake quant.

An MLP of four ``--width`` x ``--width`` layers (default 1024), batch
``--batch`` (default 256), W8A8 (int8 per-channel weights with per-step
ranges, int8 per-tensor inputs), written directly on the core (no front end),
trained with SGD. Four steps, jitted, interleaved round by round: the float
step; the fake-quant QAT step as the composition ``op(fq(x), fq(w))``
("fake plain"); ``qat_op(compute="fake")`` (same values, lean backward);
``qat_op(compute="integer")`` (int8 x int8 -> int32 forward, STE backward).
Also the XLA memory estimate of each compiled step.

Run: ``python benchmarks/bench_integer_forward.py [--repeats 20] [--width 4096
--batch 4096]`` (the large sizes are for a GPU with int8 matrix units).
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

from bench_qat_step import _xla_memory  # noqa: E402  pylint: disable=g-import-not-at-top

W = core.QuantSpec(format=core.IntFormat(bits=8, signed=True, narrow=True),
                   granularity=core.PerChannel(-1))
A = core.QuantSpec(format="int8", symmetric=False)
DOT = (((1,), (0,)), ((), ()))


def _layer(mode, x, w, a_scale, a_zp):
  if mode == "float":
    return x @ w
  w_scale, _ = core.weight_range(w, W)
  if mode == "fake plain":
    xq = core.quant_dequant(x, A, a_scale, a_zp)
    return lax.dot_general(xq, core.quant_dequant(w, W, w_scale), DOT)
  compute = "fake" if mode == "fake" else "integer"
  return core.qat_op("dot_general", x, w, act=(A, a_scale, a_zp, None),
                     weight=(W, w_scale, None, None), compute=compute, dimension_numbers=DOT)


def _step(mode):
  def loss(ws, x, y, ranges):
    h = x
    for i, w in enumerate(ws):
      h = _layer(mode, h, w, *ranges[i])
      if i < len(ws) - 1:
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  def step(ws, x, y, ranges):
    g = jax.grad(loss)(ws, x, y, ranges)
    return [w - 1e-3 * gw for w, gw in zip(ws, g)]

  return jax.jit(step, donate_argnums=0)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=256)
  args = ap.parse_args()
  keys = jax.random.split(jax.random.key(0), 6)
  n = args.width
  x = jax.random.normal(keys[0], (args.batch, n))
  y = jax.random.normal(keys[1], (args.batch, n))
  ws0 = [jax.random.normal(k, (n, n)) / n**0.5 for k in keys[2:]]
  ranges = []
  h = x
  for i, w in enumerate(ws0):  # calibrate the input ranges once (min/max)
    s, z = core.calibrate(A, [h])
    ranges.append((s, z))
    h = h @ w
    h = jax.nn.relu(h) if i < 3 else h
  runs = {}
  for mode in ("float", "fake plain", "fake", "integer"):
    ws = [jnp.array(w) for w in ws0]
    compiled = _step(mode).lower(ws, x, y, ranges).compile()
    for _ in range(args.warmup):
      ws = compiled(ws, x, y, ranges)
    jax.block_until_ready(ws)
    runs[mode] = [compiled, ws, [], _xla_memory(compiled)]
  for _ in range(args.repeats):
    for mode, r in runs.items():
      t = time.perf_counter()
      r[1] = r[0](r[1], x, y, ranges)
      jax.block_until_ready(r[1])
      r[2].append(time.perf_counter() - t)
  base = statistics.median(runs["float"][2])
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), load "
        f"{os.getloadavg()[0]:.1f}; width {n}, batch {args.batch}")
  print(f"{'step':<12}{'median ms':>10}{'x float':>9}{'memory MiB':>12}{'x float':>9}")
  for mode, r in runs.items():
    med = statistics.median(r[2])
    print(f"{mode:<12}{med * 1e3:>10.1f}{med / base:>9.2f}{r[3] / 2**20:>12.1f}"
          f"{r[3] / runs['float'][3]:>9.2f}")


if __name__ == "__main__":
  main()
