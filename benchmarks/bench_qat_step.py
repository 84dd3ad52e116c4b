"""Training-step time of float vs W8A8 QAT vs W4A4 LSQ QAT (jaxqat Linen, NNX, qwix).

Models: (a) an MLP of four 1024x1024 Dense layers, batch 256; (b) a small
pre-LN transformer (4 layers, width 256, 4 heads, MLP 1024, sequence 128,
batch 32). One step = loss, gradients and an optax Adam update, jitted.
Times are medians over ``--repeats`` steps after ``--warmup`` steps
(compilation excluded), with ``block_until_ready``.

(c) and (d): the small 1-D CNN and the small ResNet (BatchNorm) of
``bench_small_models.py`` (softmax cross-entropy there, MSE here).
Configurations: float, W8A8 (the default rules), W4A4 LSQ, and both with
``compute="integer"`` (``Rule.compute``: int8 x int8 -> int32 forward, the
same STE backward; NNX sets it per layer, as ``quantize`` will from the rule).
Opt-in, MLP only: ``--configs "float,W4A4 LSQ QAT,W4A4 LSQ QAT input fixed"``, W4A4 LSQ
with the model's input at a fixed int4 range: an LSQ step size on the input of the
first layer needs the gradient with respect to that input, a matmul the float step
never computes (issue 12: 0.10 of the MLP's 0.25x LSQ overhead).

Memory: XLA's own estimate for the compiled step
(``compiled.memory_analysis()``: arguments + outputs + temporaries, minus
aliased buffers), per configuration and deterministic (so it can be measured
on a loaded machine). On a GPU/TPU, every configuration also runs in a
process of its own (``--isolate``, the default there) that reports
``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``: the device peak
only grows within a process, so it cannot be split per configuration in one.

Run: ``python benchmarks/bench_qat_step.py [--models mlp,transformer,cnn1d,resnet]
[--repeats 20] [--frontends linen,nnx,qwix] [--memory-only] [--quick]``.
``--quick`` (GPU check, < 2 minutes on one H200): NNX only, 1 warm-up step,
3 timed steps, configurations in parallel processes (times then are not
comparable; memory is). ``--memory-only`` compiles and reports memory without
timing (what the lead measures under load).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxqat.core import IntFormat, PerOutputChannel, QuantSpec, Rule, default_rules
from jaxqat.flax import linen as ql

W4A4_LSQ = [Rule(pattern=".*",
                 weight=QuantSpec(format=IntFormat(bits=4, signed=True, narrow=True),
                                  granularity=PerOutputChannel(), learning="lsq"),
                 act=QuantSpec(format="int4", learning="lsq"))]
W4A4_LSQ_INT = [Rule(pattern=".*", weight=W4A4_LSQ[0].weight, act=W4A4_LSQ[0].act,
                     compute="integer")]
# The same, but the model's input (the first layer's input, which no float step
# differentiates) keeps a fixed, calibrated int4 range: the learned step size of that
# quantizer needs the gradient with respect to the input, one matmul the float step never
# computes (the first Dense of the MLP: "Dense_0" in Linen, "layers/0" in NNX).
W4A4_LSQ_INPUT_FIXED = [Rule(pattern="Dense_0|layers/0", weight=W4A4_LSQ[0].weight,
                             act=QuantSpec(format="int4"))] + W4A4_LSQ
# (label, rules): None = the default rules (W8A8), "float" = the float model
CONFIGS = (("float", "float"), ("W8A8 QAT", None), ("W4A4 LSQ QAT", W4A4_LSQ),
           ("W8A8 int QAT", default_rules(compute="integer")),
           ("W4A4 LSQ int QAT", W4A4_LSQ_INT))
# Opt-in (--configs): the MLP only, not qwix.
EXTRA_CONFIGS = (("W4A4 LSQ QAT input fixed", W4A4_LSQ_INPUT_FIXED),)
RULES = dict(CONFIGS + EXTRA_CONFIGS)  # label -> rules
CONV_MODELS = ("cnn1d", "resnet")  # from bench_small_models.py


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
  if name in CONV_MODELS:
    import bench_small_models as small  # pylint: disable=g-import-not-at-top
    x, y = small._data(name)  # pylint: disable=protected-access
    return name, x, y
  if name == "mlp":
    return MLP(), jax.random.normal(k1, (256, 1024)), jax.random.normal(k2, (256, 1024))
  return (Transformer(), jax.random.normal(k1, (32, 128, 256)),
          jax.random.normal(k2, (32, 128, 256)))


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def _xla_memory(compiled):
  """XLA's estimate for a compiled step: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
            m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return float("nan")


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
    self.xla = _xla_memory(self.compiled)

  def run(self):
    t = time.perf_counter()
    self.state = self.compiled(self.state, *self.batch)
    jax.block_until_ready(self.state)
    self.times.append(time.perf_counter() - t)

  @property
  def median(self):
    return statistics.median(self.times)


def paired_ratio(times, base_times):
  """Median and quartiles of the per-round ratios ``times[i] / base_times[i]``.

  The steps run interleaved, one of each configuration per round, so the two
  times of a round saw the same moment of the machine: the spread of these
  ratios shows how much of a difference between two configurations is noise.
  """
  n = min(len(times), len(base_times))
  if n < 4:
    return float("nan"), float("nan"), float("nan")
  q = statistics.quantiles([a / b for a, b in zip(times[:n], base_times[:n])], n=4)
  return q[1], q[0], q[2]


def fmt_paired(times, base_times):
  """``"1.07 [1.05-1.09]"``: :func:`paired_ratio` as a table cell."""
  m, lo, hi = paired_ratio(times, base_times)
  return "n/a" if m != m else f"{m:.2f} [{lo:.2f}-{hi:.2f}]"


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
  if isinstance(model, str):  # a conv model of bench_small_models.py
    import bench_small_models as small  # pylint: disable=g-import-not-at-top
    return _time(*small.linen_step(model, rules, x, y), (x, y), warmup, repeats)
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
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxqat.flax import nnx as qnnx  # pylint: disable=g-import-not-at-top
  if rules != "float":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      qnnx.quantize(model, rules)
    compute = rules[0].compute if rules else "fake"
    if compute != "fake":  # until quantize passes Rule.compute on to the layers
      for _, node in nnx.iter_graph(model):
        if hasattr(node, "jaxqat_set_compute"):
          node.jaxqat_set_compute(compute)
    qnnx.calibrate(model, batches)
  return model


def bench_nnx(model_name, x, y, rules, warmup, repeats):
  """The same step with the NNX front end (native NNX versions of the models)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if model_name in CONV_MODELS:
    import bench_small_models as small  # pylint: disable=g-import-not-at-top
    return _time(*small.nnx_step(model_name, rules, x, y), (x, y), warmup, repeats)

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
  if isinstance(model, str):  # a conv model of bench_small_models.py
    import bench_small_models as small  # pylint: disable=g-import-not-at-top
    return _time(*small.qwix_step(model, bits, x), (x, y), warmup, repeats)
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
  ap.add_argument("--memory-only", action="store_true", help="compile and report memory only")
  ap.add_argument("--quick", action="store_true", help="a short check (GPU: < 2 minutes)")
  return ap.parse_args()


def _runner(name, label, fe, model, x, y, rules, args):
  if fe == "linen":
    return bench_linen(model, x, y, rules, args.warmup, args.repeats)
  if fe == "nnx":
    return bench_nnx(name, x, y, rules, args.warmup, args.repeats)
  if label.endswith("int QAT"):
    return None  # qwix has no such mode
  return bench_qwix(model, x, y, 8 if rules is None else 4, args.warmup, args.repeats)


def _plan(args):
  """[(model, config label, front end)] in run order."""
  fes = args.frontends.split(",")
  out = []
  for name in args.models.split(","):
    for label in args.configs.split(","):
      extra = label in dict(EXTRA_CONFIGS)
      if extra and name != "mlp":
        continue
      for fe in ("linen", "nnx", "qwix"):
        if fe in fes and not ((label == "float" or extra) and fe == "qwix"):
          out.append((name, label, fe))
  return out


def _child(spec, args):
  """One configuration in this process: XLA estimate, device peak, median time (JSON)."""
  name, label, fe = spec.split("/")
  model, x, y = _inputs(name)
  rules = RULES[label]
  with jax.numpy_dtype_promotion("standard"):
    r = _runner(name, label, fe, model, x, y, rules, args)
    if r is None:
      return
    for _ in range(args.repeats):
      r.run()
  stats = jax.devices()[0].memory_stats() or {}
  print("RESULT " + json.dumps({"spec": spec, "ms": r.median * 1e3, "xla": r.xla,
                                "peak": stats.get("peak_bytes_in_use", float("nan"))}),
        flush=True)


def _isolated(plan, args, jobs):
  """Runs each configuration in its own process (``jobs`` at a time); {spec: result}."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")

  def one(item):
    spec = "/".join(item)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", spec,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in p.stdout.splitlines():
      if line.startswith("RESULT "):
        return item, json.loads(line[7:])
    if p.returncode:
      errors = [ln for ln in p.stderr.splitlines() if ln.split(":")[0].endswith(("Error", "Exception"))]
      print(f"  ({spec} failed: {(errors or p.stderr.strip().splitlines() or [''])[-1][:300]})")
    return item, None

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    return dict(pool.map(one, plan))


def main():
  args = parse_args(__doc__, "mlp,transformer,cnn1d,resnet", "linen,nnx,qwix",
                    child="", isolate="auto", jobs="1",
                    configs=",".join(label for label, _ in CONFIGS))
  memory_only = args.memory_only
  if args.quick:
    args.frontends, args.warmup, args.repeats, args.jobs = "nnx", 1, 3, "8"
  if args.child:
    return _child(args.child, args)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  on_device = jax.default_backend() != "cpu"
  isolate = on_device if args.isolate == "auto" else args.isolate in ("1", "true", "yes")
  print(f"machine: {_cpu()}; {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); jax {jax.__version__}; load {os.getloadavg()[0]:.1f}")
  plan = _plan(args)
  results = {}  # (model, label, fe) -> {"ms", "xla", "peak"}
  if isolate:
    results = {k: v for k, v in _isolated(plan, args, int(args.jobs)).items() if v}
    if int(args.jobs) > 1:
      print("(configurations ran in parallel processes: times are not comparable)")
  else:
    for name in args.models.split(","):
      model, x, y = _inputs(name)
      runners = []
      with jax.numpy_dtype_promotion("standard"):  # optax Adam's float ** int32
        for item in [p for p in plan if p[0] == name]:
          try:
            r = _runner(name, item[1], item[2], model, x, y, RULES[item[1]], args)
          except ImportError:
            continue
          except Exception as e:  # pylint: disable=broad-except
            print(f"  ({'/'.join(item)} skipped: {type(e).__name__}: {str(e)[:160]})")
            continue
          if r is not None:
            runners.append((item, r))
        # Interleaved rounds: a slow moment of the machine hits every configuration alike.
        for _ in range(0 if memory_only else args.repeats):
          for _, r in runners:
            r.run()
      for item, r in runners:
        results[item] = {"ms": r.median * 1e3 if r.times else float("nan"), "xla": r.xla,
                         "peak": float("nan"), "times": r.times}
        r.state = None  # free the buffers
  _table(results)


def _table(results):
  def base(item, key):
    fe = "linen" if item[2] == "qwix" else item[2]
    b = results.get((item[0], "float", fe))
    if key == "times":
      return (b or {}).get("times", [])
    return b[key] if b else float("nan")

  print("\n(x float: against the float step of the same front end; qwix against Linen. "
        "paired: the median [quartiles] of the per-round ratios of interleaved runs)")
  print("| model | config | front end | median ms | x float | paired x float | XLA memory MiB "
        "| x float | device peak MiB | x float |")
  print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for item, r in results.items():
    cells = []
    for key, scale in (("ms", 1.0), ("xla", 2.0**-20), ("peak", 2.0**-20)):
      v = r[key]
      cells += [f"{v * scale:.1f}", f"{v / base(item, key):.2f}"]
      if key == "ms":
        cells.append(fmt_paired(r.get("times", []), base(item, "times")))
    print(f"| {item[0]} | {item[1]} | {item[2]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
