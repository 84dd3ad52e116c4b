"""Training-step time of float vs W8A8 QAT vs W4A4 LSQ QAT (jaxqat Linen, NNX, qwix).

Models: (a) an MLP of four 1024x1024 Dense layers, batch 256; (b) a small
pre-LN transformer (4 layers, width 256, 4 heads, MLP 1024, sequence 128,
batch 32). One step = loss, gradients and an optax Adam update, jitted.
Times are medians over ``--repeats`` steps after ``--warmup`` steps
(compilation excluded), with ``block_until_ready``.

Memory: ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` where the
backend reports it (GPU/TPU); on CPU, XLA's own estimate for the compiled
step (``compiled.memory_analysis()``: arguments + outputs + temporaries,
minus aliased buffers), which is per configuration (a process RSS peak only
grows and cannot be split per configuration).

Run: ``python benchmarks/bench_qat_step.py [--models mlp,transformer]
[--repeats 20] [--frontends linen,nnx,qwix]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxqat.core import IntFormat, PerOutputChannel, QuantSpec, Rule
from jaxqat.flax import linen as ql

W4A4_LSQ = [Rule(pattern=".*",
                 weight=QuantSpec(format=IntFormat(bits=4, signed=True, narrow=True),
                                  granularity=PerOutputChannel(), learning="lsq"),
                 act=QuantSpec(format="int4", learning="lsq"))]


# ---------------------------------------------------------------------------
# Models (plain Linen).
# ---------------------------------------------------------------------------


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Dense(1024)(x))
    return nn.Dense(1024)(x)


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=256)(nn.LayerNorm()(x))
    x = x + h
    h = nn.Dense(256)(nn.gelu(nn.Dense(1024)(nn.LayerNorm()(x))))
    return x + h


class Transformer(nn.Module):

  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = Block()(x)
    return nn.Dense(256)(nn.LayerNorm()(x))


def _inputs(name):
  k1, k2 = jax.random.split(jax.random.key(0))
  if name == "mlp":
    return MLP(), jax.random.normal(k1, (256, 1024)), jax.random.normal(k2, (256, 1024))
  return (Transformer(), jax.random.normal(k1, (32, 128, 256)),
          jax.random.normal(k2, (32, 128, 256)))


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def _memory(compiled):
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "device peak"
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)
    return total, "XLA estimate"
  except Exception:  # pylint: disable=broad-except
    return float("nan"), "n/a"


class _Runner:
  """A compiled step and its state; ``run()`` times one step."""

  def __init__(self, step, state, batch, warmup):
    self.compiled = step.lower(state, *batch).compile()
    self.state, self.batch = state, batch
    for _ in range(warmup):
      self.state = self.compiled(self.state, *batch)
    jax.block_until_ready(self.state)
    self.times = []
    self.memory, self.memory_kind = _memory(self.compiled)

  def run(self):
    t = time.perf_counter()
    self.state = self.compiled(self.state, *self.batch)
    jax.block_until_ready(self.state)
    self.times.append(time.perf_counter() - t)

  @property
  def median(self):
    return statistics.median(self.times)


def _time(step, state, batch, warmup, repeats):
  del repeats  # the steps are run by main(), interleaved across configurations
  return _Runner(step, state, batch, warmup)


def _train_step(loss_fn, tx):
  """A jitted ``(trainable, opt_state, rest) -> same`` Adam step on ``loss_fn``."""

  def step(state, x, y):
    trainable, opt_state, rest = state
    g = jax.grad(loss_fn)(trainable, rest, x, y)
    upd, opt_state = tx.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, upd), opt_state, rest

  return jax.jit(step, donate_argnums=0)


def _mse(y, t):
  return jnp.mean((y.astype(jnp.float32) - t) ** 2)


def bench_linen(model, x, y, rules, warmup, repeats):
  """(seconds, memory, kind) of a Linen QAT step; rules 'float' for the float model."""
  if rules == "float":
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    loss = lambda t, rest, x, y: _mse(model.apply({"params": t}, x), y)
    tx = optax.adam(1e-4)
    return _time(_train_step(loss, tx), (params, tx.init(params), {}), (x, y), warmup, repeats)
  qmodel = ql.quantize(model, rules)
  v = jax.jit(qmodel.init)(jax.random.key(0), x)
  v = ql.calibrate(qmodel, v, [x])
  trainable = {k: v[k] for k in ("params", "quant_params") if k in v}
  rest = {k: v[k] for k in v if k not in trainable}
  loss = lambda t, rest, x, y: _mse(qmodel.apply({**rest, **t}, x), y)
  tx = optax.adam(1e-4)
  return _time(_train_step(loss, tx), (trainable, tx.init(trainable), rest), (x, y), warmup,
               repeats)


def _nnx_model(name):
  """The same two models written natively in NNX."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  rngs = nnx.Rngs(0)
  if name == "mlp":

    class NMLP(nnx.Module):

      def __init__(self):
        self.layers = nnx.List([nnx.Linear(1024, 1024, rngs=rngs) for _ in range(4)])

      def __call__(self, x):
        for layer in self.layers[:-1]:
          x = nnx.relu(layer(x))
        return self.layers[-1](x)

    return NMLP()

  class NBlock(nnx.Module):

    def __init__(self):
      self.ln1, self.ln2 = nnx.LayerNorm(256, rngs=rngs), nnx.LayerNorm(256, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=256, qkv_features=256,
                                         decode=False, rngs=rngs)
      self.fc1, self.fc2 = nnx.Linear(256, 1024, rngs=rngs), nnx.Linear(1024, 256, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(self.ln1(x))
      return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

  class NTransformer(nnx.Module):

    def __init__(self):
      self.blocks = nnx.List([NBlock() for _ in range(4)])
      self.ln, self.head = nnx.LayerNorm(256, rngs=rngs), nnx.Linear(256, 256, rngs=rngs)

    def __call__(self, x):
      for b in self.blocks:
        x = b(x)
      return self.head(self.ln(x))

  return NTransformer()


def quantize_nnx(model, rules, batches):
  """Quantizes (warnings silenced) and calibrates an NNX model in place; 'float': unchanged."""
  import warnings  # pylint: disable=g-import-not-at-top
  from jaxqat.flax import nnx as qnnx  # pylint: disable=g-import-not-at-top
  if rules != "float":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      qnnx.quantize(model, rules)
    qnnx.calibrate(model, batches)
  return model


def bench_nnx(model_name, x, y, rules, warmup, repeats):
  """The same step with the NNX front end (native NNX versions of the models)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model = quantize_nnx(_nnx_model(model_name), rules, [x])
  graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-4)

  def loss(t, rest, x, y):
    return _mse(nnx.merge(graphdef, t, rest)(x), y)

  return _time(_train_step(loss, tx), (trainable, tx.init(trainable), rest), (x, y), warmup,
               repeats)


def bench_qwix(model, x, y, bits, warmup, repeats):
  """qwix QAT (QtProvider) on the same Linen model, if qwix is installed."""
  import qwix  # pylint: disable=g-import-not-at-top
  rule = qwix.QtRule(module_path=".*", weight_qtype=f"int{bits}", act_qtype=f"int{bits}")
  qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
  v = jax.jit(qmodel.init)(jax.random.key(0), x)
  params = v["params"]
  rest = {k: v[k] for k in v if k != "params"}
  loss = lambda t, rest, x, y: _mse(qmodel.apply({**rest, "params": t}, x), y)
  tx = optax.adam(1e-4)
  return _time(_train_step(loss, tx), (params, tx.init(params), rest), (x, y), warmup, repeats)


def _cpu():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def parse_args(doc, models, frontends, **extra):
  """The benchmarks' command line: --models, --frontends, --warmup, --repeats (+ extra)."""
  ap = argparse.ArgumentParser(description=doc.split("\n")[0])
  ap.add_argument("--models", default=models)
  ap.add_argument("--frontends", default=frontends)
  for name, default in extra.items():
    ap.add_argument(f"--{name}", default=default)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=20)
  return ap.parse_args()


def main():
  args = parse_args(__doc__, "mlp,transformer", "linen,nnx,qwix")
  frontends = args.frontends.split(",")
  print(f"machine: {_cpu()}; {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); jax {jax.__version__}")
  rows = []
  for name in args.models.split(","):
    model, x, y = _inputs(name)
    runners = []  # (config, front end, baseline key, runner)
    with jax.numpy_dtype_promotion("standard"):  # optax Adam's float ** int32
      runners.append(("float", "flax linen", "linen",
                      bench_linen(model, x, y, "float", args.warmup, args.repeats)))
      if "nnx" in frontends:
        runners.append(("float", "flax nnx", "nnx",
                        bench_nnx(name, x, y, "float", args.warmup, args.repeats)))
      for label, rules in (("W8A8 QAT", None), ("W4A4 LSQ QAT", W4A4_LSQ)):
        if "linen" in frontends:
          runners.append((label, "jaxqat linen", "linen",
                          bench_linen(model, x, y, rules, args.warmup, args.repeats)))
        if "nnx" in frontends:
          try:
            runners.append((label, "jaxqat nnx", "nnx",
                            bench_nnx(name, x, y, rules, args.warmup, args.repeats)))
          except Exception as e:  # pylint: disable=broad-except
            print(f"  (nnx {name} {label} skipped: {type(e).__name__}: {str(e)[:120]})")
        if "qwix" in frontends:
          try:
            runners.append((label, "qwix", "linen",
                            bench_qwix(model, x, y, 8 if rules is None else 4, args.warmup,
                                       args.repeats)))
          except ImportError:
            pass
          except Exception as e:  # pylint: disable=broad-except
            print(f"  (qwix {name} {label} skipped: {type(e).__name__}: {str(e)[:120]})")
      # Interleaved rounds: a slow moment of the machine hits every configuration alike.
      for _ in range(args.repeats):
        for *_, r in runners:
          r.run()
    base = {fe: r.median for label, _, fe, r in runners if label == "float"}
    for label, fe_name, fe, r in runners:
      rows.append((name, label, fe_name, r.median, r.median / base[fe], r.memory, r.memory_kind))
      r.state = None  # free the buffers
  print("\n(x float: against the float step of the same front end; qwix against Linen)")
  print(f"\n{'model':<12}{'config':<15}{'front end':<14}{'median ms':>10}{'x float':>9}"
        f"{'memory MiB':>12}  memory kind")
  for name, label, fe, t, r, mem, kind in rows:
    print(f"{name:<12}{label:<15}{fe:<14}{t * 1e3:>10.1f}{r:>9.2f}{mem / 2**20:>12.1f}  {kind}")
  try:
    import qwix  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("(qwix is not installed: no peer comparison)")


if __name__ == "__main__":
  main()
