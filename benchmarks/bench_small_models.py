"""QAT step vs float step on small convolutional models (NNX, Linen, Keras-on-JAX).

Models: (a) a small 1-D CNN: four Conv1D(64, kernel 3) + ReLU over a
sequence of 40 steps with 16 channels, mean pool, Dense(10); batch 128;
(b) a small ResNet at 32x32x3: a Conv+BN stem and three basic residual
blocks (16, 32, 64 channels; BatchNorm in training mode), global average
pool, Dense(10); batch 64. Configurations: float, W8A8 (the default rules)
and W4A4 LSQ (int4 weights per output channel and int4 inputs, learned step
sizes). Keras folds each Conv+BatchNorm pair when quantizing. Opt-in
(``--configs``): "W8A8 int" and "W4A4 LSQ int", the same with
``compute="integer"`` (int8 x int8 -> int32 forward; Keras then leaves the
Conv+BatchNorm pairs unfolded, a folded pair has no integer forward).

One step = softmax cross-entropy, gradients and an Adam update, jitted.
Keras runs twice: ``keras`` times ``train_on_batch`` (``jit_compile=True``),
which adds Keras's per-call Python (every variable read into the step's
state and written back; it grows with the quantizers' variables), and
``keras-step`` times the model's own jitted ``train_step`` on a carried
state, which is what ``fit`` runs per step (``--frontends`` picks them).
Every configuration is compiled and warmed up first; then the steps run
interleaved (one step of each configuration per round), so that a slow
moment of a shared machine hits all alike; the table gives the median per
configuration and its ratio to the float step of the same front end.
Memory: XLA's estimate for the compiled step (arguments + outputs +
temporaries - aliased), as ``bench_qat_step.py`` measures it (not available
for ``train_on_batch``).

Usage: ``KERAS_BACKEND=jax python benchmarks/bench_small_models.py
[--models cnn1d,resnet] [--frontends nnx,linen,keras,keras-step] [--repeats 20]
[--configs "float,W8A8,W4A4 LSQ,W8A8 int,W4A4 LSQ int"]``
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qat_step import W4A4_LSQ, W4A4_LSQ_INT  # noqa: E402  pylint: disable=g-import-not-at-top
from bench_qat_step import _cpu  # noqa: E402  pylint: disable=g-import-not-at-top
from bench_qat_step import fmt_paired  # noqa: E402  pylint: disable=g-import-not-at-top
from bench_qat_step import _Runner  # noqa: E402  pylint: disable=g-import-not-at-top
from bench_qat_step import parse_args  # noqa: E402  pylint: disable=g-import-not-at-top
from bench_qat_step import quantize_nnx  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxqat.core import default_rules  # noqa: E402  pylint: disable=g-import-not-at-top

CONFIGS = (("float", "float"), ("W8A8", None), ("W4A4 LSQ", W4A4_LSQ),
           # opt-in (--configs): compute="integer", int8 x int8 -> int32 forward
           ("W8A8 int", default_rules(compute="integer")), ("W4A4 LSQ int", W4A4_LSQ_INT))
SHAPES = {"cnn1d": ((128, 40, 16), 10), "resnet": ((64, 32, 32, 3), 10)}


def _data(name):
  shape, classes = SHAPES[name]
  k1, k2 = jax.random.split(jax.random.key(0))
  return jax.random.normal(k1, shape), jax.random.randint(k2, (shape[0],), 0, classes)


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


# ---------------------------------------------------------------------------
# Linen.
# ---------------------------------------------------------------------------


class LinenCNN1D(nn.Module):

  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = nn.relu(nn.Conv(64, (3,))(x))
    return nn.Dense(10)(x.mean(axis=1))


class LinenBlock(nn.Module):
  features: int
  stride: int
  train: bool = True

  @nn.compact
  def __call__(self, x):
    bn = lambda: nn.BatchNorm(use_running_average=not self.train)
    h = nn.relu(bn()(nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)))
    h = bn()(nn.Conv(self.features, (3, 3), use_bias=False)(h))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = bn()(nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(x + h)


class LinenResNet(nn.Module):
  train: bool = True  # BatchNorm on batch statistics (and updating them)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not self.train)(x))
    for f, s in ((16, 1), (32, 2), (64, 2)):
      x = LinenBlock(f, s, self.train)(x)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def linen_step(name, rules, x, y):
  """(jitted step, state) for the Linen model, float or quantized with ``rules``."""
  from jaxqat.flax import linen as ql  # pylint: disable=g-import-not-at-top
  make = (lambda train: LinenCNN1D()) if name == "cnn1d" else LinenResNet
  model = make(True)
  if rules != "float":
    model = ql.quantize(model, rules)
  v = jax.jit(model.init)(jax.random.key(0), x)
  if rules != "float":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      # Linen calibrate keeps batch_stats immutable: calibrate the same model with
      # BatchNorm on its running statistics (same variables).
      v = ql.calibrate(ql.quantize(make(False), rules), v, [x])
  return _linen_train(model, v)


def _linen_train(model, v):
  """(jitted Adam step, state) of a Linen model with variables ``v`` (BatchNorm updated)."""
  trainable = {k: v[k] for k in ("params", "quant_params") if k in v}
  rest = {k: v[k] for k in v if k not in trainable}
  mutable = ["batch_stats"] if "batch_stats" in rest else []

  def loss(t, rest, x, y):
    out, upd = model.apply({**rest, **t}, x, mutable=mutable)
    return _xent(out, y), upd

  return _adam_step(loss), _adam_state(trainable, rest)


def qwix_step(name, bits, x):
  """(jitted step, state) for the Linen model under qwix QAT (``QtProvider``, int``bits``)."""
  import qwix  # pylint: disable=g-import-not-at-top
  model = LinenCNN1D() if name == "cnn1d" else LinenResNet(True)
  rule = qwix.QtRule(module_path=".*", weight_qtype=f"int{bits}", act_qtype=f"int{bits}")
  model = qwix.quantize_model(model, qwix.QtProvider([rule]))
  return _linen_train(model, jax.jit(model.init)(jax.random.key(0), x))


# ---------------------------------------------------------------------------
# NNX.
# ---------------------------------------------------------------------------


def _nnx_model(name):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  rngs = nnx.Rngs(0)
  if name == "cnn1d":

    class CNN1D(nnx.Module):

      def __init__(self):
        chans = (16, 64, 64, 64, 64)
        self.convs = nnx.List([nnx.Conv(a, b, (3,), rngs=rngs) for a, b in zip(chans, chans[1:])])
        self.head = nnx.Linear(64, 10, rngs=rngs)

      def __call__(self, x):
        for c in self.convs:
          x = nnx.relu(c(x))
        return self.head(x.mean(axis=1))

    return CNN1D()

  def conv_bn(cin, cout, k, stride):
    return (nnx.Conv(cin, cout, (k, k), strides=stride, use_bias=False, rngs=rngs),
            nnx.BatchNorm(cout, use_running_average=False, rngs=rngs))

  class Block(nnx.Module):

    def __init__(self, cin, cout, stride):
      self.c1, self.b1 = conv_bn(cin, cout, 3, stride)
      self.c2, self.b2 = conv_bn(cout, cout, 3, 1)
      self.short = nnx.List(conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else [])

    def __call__(self, x):
      h = nnx.relu(self.b1(self.c1(x)))
      h = self.b2(self.c2(h))
      if len(self.short):
        x = self.short[1](self.short[0](x))
      return nnx.relu(x + h)

  class ResNet(nnx.Module):

    def __init__(self):
      self.stem, self.bn = conv_bn(3, 16, 3, 1)
      self.blocks = nnx.List([Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2)])
      self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn(self.stem(x)))
      for b in self.blocks:
        x = b(x)
      return self.head(x.mean(axis=(1, 2)))

  return ResNet()


def nnx_step(name, rules, x, y):
  """(jitted step, state) for the NNX model, float or quantized with ``rules``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = quantize_nnx(_nnx_model(name), rules, [x])
  graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)

  def step(state, x, y):
    trainable, opt_state, rest = state
    m = nnx.merge(graphdef, trainable, rest)  # BatchNorm updates its statistics in place
    g = nnx.grad(lambda m: _xent(m(x), y))(m)
    _, new_trainable, new_rest = nnx.split(m, nnx.Param, ...)
    u, opt_state = _TX.update(g, opt_state, new_trainable)
    return optax.apply_updates(new_trainable, u), opt_state, new_rest

  return jax.jit(step, donate_argnums=0), _adam_state(trainable, rest)


# ---------------------------------------------------------------------------
# Shared step.
# ---------------------------------------------------------------------------

_TX = optax.adam(1e-3)


def _adam_state(trainable, rest):
  return trainable, _TX.init(trainable), rest


def _adam_step(loss_fn):
  def step(state, x, y):
    trainable, opt_state, rest = state
    g, upd = jax.grad(loss_fn, has_aux=True)(trainable, rest, x, y)
    u, opt_state = _TX.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, u), opt_state, {**rest, **upd}

  return jax.jit(step, donate_argnums=0)


# ---------------------------------------------------------------------------
# Keras on JAX.
# ---------------------------------------------------------------------------


def keras_model(name):
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  L = keras.layers
  if name == "cnn1d":
    inp = keras.Input(SHAPES[name][0][1:])
    x = inp
    for i in range(4):
      x = L.Conv1D(64, 3, padding="same", activation="relu", name=f"conv{i}")(x)
    return keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling1D()(x)))

  def conv_bn(x, f, k, s, tag):
    x = L.Conv2D(f, k, strides=s, padding="same", use_bias=False, name=f"conv_{tag}")(x)
    return L.BatchNormalization(name=f"bn_{tag}")(x)

  inp = keras.Input(SHAPES[name][0][1:])
  x = L.ReLU()(conv_bn(inp, 16, 3, 1, "stem"))
  for i, (f, s) in enumerate(((16, 1), (32, 2), (64, 2))):
    h = L.ReLU()(conv_bn(x, f, 3, s, f"{i}a"))
    h = conv_bn(h, f, 3, 1, f"{i}b")
    if s != 1 or x.shape[-1] != f:
      x = conv_bn(x, f, 1, s, f"{i}s")
    x = L.ReLU()(L.Add()([x, h]))
  return keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(x)))


def _keras_rules(rules):
  """The same schemes for Keras: its Conv/Dense kernels put output channels last."""
  return rules


def keras_compiled(name, rules, x, y):
  """The Keras model, float or quantized with ``rules`` and calibrated, compiled (Adam)."""
  import keras  # pylint: disable=g-import-not-at-top
  import jaxqat.keras as jqk  # pylint: disable=g-import-not-at-top
  m = keras_model(name)
  if rules != "float":
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      # A Conv folded with its BatchNorm has no integer forward: integer rules run unfolded.
      fold = all(getattr(r, "compute", "fake") == "fake" for r in rules or ())
      m = jqk.quantize(m, _keras_rules(rules), fold_batchnorm=fold)
      jqk.calibrate(m, x[:32], verbose=0)
  m.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return m


class _KerasRunner:
  """``train_on_batch``: the compiled step plus Keras's per-call Python (state in, state out)."""

  def __init__(self, name, rules, x, y, warmup):
    xn, yn = np.asarray(x), np.asarray(y)
    m = keras_compiled(name, rules, xn, yn)
    self.model, self.x, self.y, self.times = m, xn, yn, []
    self.memory = float("nan")
    for _ in range(max(warmup, 1)):
      m.train_on_batch(xn, yn)

  def run(self):
    t = time.perf_counter()
    jax.block_until_ready(self.model.train_on_batch(self.x, self.y))
    self.times.append(time.perf_counter() - t)


def keras_step(name, rules, x, y):
  """(jitted step, state): the Keras model's own ``train_step``, as ``fit`` runs it.

  ``fit`` on JAX keeps the variables' values as one state between steps and
  calls ``jax.jit(model.train_step, donate_argnums=0)`` on it; this is that
  step (``train_on_batch`` adds, per call, reading every variable into the
  state and writing the new state back). Being a plain jitted step, it also
  gives XLA's memory estimate, as for NNX and Linen.
  """
  xn, yn = np.asarray(x), np.asarray(y)
  m = keras_compiled(name, rules, xn, yn)
  m.train_on_batch(xn, yn)  # builds the optimizer's and the metrics' variables
  state = m._get_jax_state(trainable_variables=True, non_trainable_variables=True,  # pylint: disable=protected-access
                           optimizer_variables=True, metrics_variables=True)
  state = jax.tree.map(jnp.copy, state)  # the step donates it; the model keeps its own

  def step(state, x, y):
    return m.train_step(state, (x, y))[1]

  return jax.jit(step, donate_argnums=0), state


# ---------------------------------------------------------------------------


STEPS = {"nnx": nnx_step, "linen": linen_step, "keras-step": keras_step}


def main():
  args = parse_args(__doc__, "cnn1d,resnet", "nnx,linen,keras,keras-step",
                    configs="float,W8A8,W4A4 LSQ")
  fes = args.frontends.split(",")
  configs = [c for c in CONFIGS if c[0] in args.configs.split(",")]
  print(f"machine: {_cpu()}; {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"jax {jax.__version__}; load {os.getloadavg()[0]:.1f}")
  for name in args.models.split(","):
    x, y = _data(name)
    runners = []
    with jax.numpy_dtype_promotion("standard"):  # optax Adam's float ** int32
      for fe in fes:
        for label, rules in configs:
          if fe == "keras":
            r = _KerasRunner(name, rules, x, y, args.warmup)
          else:
            step, state = STEPS[fe](name, rules, x, y)
            r = _Runner(step, state, (x, y), args.warmup)
          runners.append((fe, label, r))
      load = os.getloadavg()[0]
      for _ in range(args.repeats):
        for *_, r in runners:
          r.run()
    med = {(fe, label): statistics.median(r.times) for fe, label, r in runners}
    mem = {(fe, label): r.memory for fe, label, r in runners}
    print(f"\n{name}: load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    times = {(fe, label): r.times for fe, label, r in runners}
    print("(paired: the median [quartiles] of the per-round ratios to the float step)")
    print("| model | front end | config | median ms | x float | paired x float | memory MiB "
          "| x float |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for fe, label, r in runners:
      t, m = med[(fe, label)], mem[(fe, label)]
      t0, m0 = med.get((fe, "float"), float("nan")), mem.get((fe, "float"), float("nan"))
      paired = fmt_paired(r.times, times.get((fe, "float"), []))
      print(f"| {name} | {fe} | {label} | {t * 1e3:.1f} | {t / t0:.2f} | {paired} | "
            f"{m / 2**20:.1f} | {m / m0:.2f} |", flush=True)
      r.state = None  # free the buffers


if __name__ == "__main__":
  main()
