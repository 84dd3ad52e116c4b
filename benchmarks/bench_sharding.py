"""Sharded training step: float vs W8A8 QAT vs W4A4 LSQ QAT (NNX), on a device mesh.

Model: an MLP of ``--layers`` Linear layers of width ``--width`` (batch
``--batch``), Megatron-style: kernels alternate column-parallel
``(None, "model")`` and row-parallel ``("model", None)``; the batch is
sharded over ``"data"``. Layouts: ``dp`` (mesh ``(n,)``, replicated
params), ``fsdp`` (mesh ``(n,)``, kernels sharded on their input axis),
``tp`` (mesh ``(n/4, 4)``: data x model). Explicit sharding
(``jax.sharding.AxisType.Explicit``); the step is ``jax.jit`` with the
shardings of :func:`jaxqat.flax.nnx.shardings` as in/out shardings (loss,
gradients, optax SGD update). Times are medians over ``--repeats`` steps
after ``--warmup`` (compilation excluded), ``block_until_ready``.

On CPU, run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set
by this script when unset): the 8 "devices" share the host's cores, so only
the QAT/float *ratio* means anything there.

Run: ``python benchmarks/bench_sharding.py [--layouts dp,fsdp,tp]
[--width 512] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxqat.core import PerOutputChannel, QuantSpec, Rule  # noqa: E402
from jaxqat.flax import nnx as qnnx  # noqa: E402
from jaxqat.flax.nnx import _sharding as nnx_sharding  # noqa: E402

W4A4 = Rule(pattern=".*", weight=QuantSpec(format="int4", granularity=PerOutputChannel(),
                                           learning="lsq"),
            act=QuantSpec(format="int4", symmetric=False, learning="lsq"))
SCHEMES = {"float": "float", "W8A8": None, "W4A4-LSQ": W4A4}


class MLP(nnx.Module):

  def __init__(self, width, layers, kernel_specs, *, rngs):
    self.layers = nnx.List([
        nnx.Linear(width, width, rngs=rngs,
                   **({} if s is None else {"kernel_metadata": {"out_sharding": s}}))
        for s in kernel_specs[:layers]])

  def __call__(self, x):
    mesh = jax.sharding.get_abstract_mesh()
    out = P("data") if not mesh.empty and mesh.explicit_axes else None
    for layer in self.layers:
      x = jax.nn.relu(layer(x, out_sharding=out))
    return x


def _layout(name, n, layers):
  if name == "dp":
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Explicit,)), [None] * layers
  if name == "fsdp":
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Explicit,)), [("data", None)] * layers
  model = 4 if n % 4 == 0 else n
  mesh = jax.make_mesh((n // model, model), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  return mesh, [(None, "model") if i % 2 == 0 else ("model", None) for i in range(layers)]


def _time_step(layout, scheme, args):
  n = jax.device_count()
  mesh, specs = _layout(layout, n, args.layers)
  key = jax.random.key(0)
  x = jax.random.normal(key, (args.batch, args.width), jnp.float32)
  y = jax.random.normal(jax.random.key(1), (args.batch, args.width), jnp.float32)
  with jax.set_mesh(mesh):
    model = MLP(args.width, args.layers, specs, rngs=nnx.Rngs(0))
    dsh = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, dsh), jax.device_put(y, dsh)
    if scheme == "float":
      tx = optax.sgd(1e-3)
    else:
      qnnx.quantize(model, scheme)
      qnnx.calibrate(model, [xs])
      tx = qnnx.qat_optimizer(model, optax.sgd(1e-3), optax.sgd(1e-3))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    sh = nnx_sharding.shardings((model, opt), mesh)

    def step(state, xb, yb):
      m, o = nnx.merge(graphdef, state)
      loss, g = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(xb) - yb)),
                                   argnums=nnx.DiffState(0, nnx.Param))(m)
      o.update(m, g)
      return loss, nnx.state((m, o))

    jstep = jax.jit(step, in_shardings=(sh, dsh, dsh), out_shardings=(NamedSharding(mesh, P()), sh),
                    donate_argnums=0)
    for _ in range(args.warmup):
      loss, state = jstep(state, xs, ys)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      loss, state = jstep(state, xs, ys)
      jax.block_until_ready((loss, state))
      times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layouts", default="dp,fsdp,tp")
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()
  devs = jax.devices()
  print(f"# {len(devs)} x {devs[0].device_kind} ({jax.default_backend()}), host "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; jax "
        f"{jax.__version__}; MLP {args.layers}x{args.width}, batch {args.batch}; medians of "
        f"{args.repeats} steps")
  print(f"{'layout':8s} {'float ms':>10s} {'W8A8 ms':>10s} {'W4A4-LSQ ms':>12s} "
        f"{'W8A8/float':>11s} {'W4A4/float':>11s}")
  for layout in args.layouts.split(","):
    t = {name: _time_step(layout, scheme, args) for name, scheme in SCHEMES.items()}
    print(f"{layout:8s} {t['float'] * 1e3:10.2f} {t['W8A8'] * 1e3:10.2f} "
          f"{t['W4A4-LSQ'] * 1e3:12.2f} {t['W8A8'] / t['float']:11.2f} "
          f"{t['W4A4-LSQ'] / t['float']:11.2f}")


if __name__ == "__main__":
  main()
