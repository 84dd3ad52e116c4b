"""Multi-device checks of sharded QAT, calibration and checkpoints (8 simulated CPU devices).

Run by tests/integration/test_sharding.py in its own process, since
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
initialises. Prints ``SHARDING CHECKS PASSED`` on success; any failure is an
AssertionError with its traceback. Usable alone:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \\
        python tests/integration/_sharding_checks.py [nnx linen keras calib ckpt error]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxqat import core  # noqa: E402
from jaxqat.flax import nnx as qnnx  # noqa: E402
from jaxqat.flax.nnx import _sharding as nnx_sharding  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

RTOL, ATOL = 2e-5, 2e-6
D_IN, D_H, D_OUT, BATCH = 16, 32, 8, 32

W8A8 = None  # default_rules(): int8 per-channel fixed weights, int8 affine minmax inputs
W4A4 = core.Rule(pattern=".*",
                 weight=core.QuantSpec(format="int4", granularity=core.PerOutputChannel(),
                                       learning="lsq"),
                 act=core.QuantSpec(format="int4", symmetric=False, learning="lsq"))
SCHEMES = {"W8A8": W8A8, "W4A4-LSQ": W4A4}

# The layouts each scheme is checked under. W4A4 LSQ (learned, per-channel step sizes that
# follow the kernels, optimizer state included) under all three; W8A8 (weight ranges
# recomputed from the weights at every step) under tensor parallelism only, whose column-
# and row-parallel kernels reduce both over a sharded channel axis and across a sharded
# contraction axis (what FSDP's row sharding adds; data parallelism replicates the weights).
SCHEME_LAYOUTS = {"W8A8": ("tp",), "W4A4-LSQ": ("dp", "fsdp", "tp")}

# (mesh shape, mesh axes, l1 kernel, l2 kernel, l3 kernel, batch spec)
LAYOUTS = {
    "dp": ((8,), ("data",), None, None, None, P("data")),
    "fsdp": ((8,), ("data",), ("data", None), ("data", None), ("data", None), P("data")),
    # Megatron MLP block: column- then row-parallel; the small head is replicated.
    "tp": ((2, 4), ("data", "model"), (None, "model"), ("model", None), None, P("data")),
}


def _data():
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (BATCH, D_IN), jnp.float32)
  y = jax.random.normal(k2, (BATCH, D_OUT), jnp.float32)
  return np.asarray(x), np.asarray(y)


class MLP(nnx.Module):
  """Three Linear layers; ``shard``: the kernels' out_sharding (or None: not annotated)."""

  def __init__(self, shard=None, *, rngs):
    # Random biases: with both matmul operands on quantization grids, a pre-activation
    # can cancel to exactly 0 in one summation order and to +-1 ulp in another (a
    # row-parallel all-reduce), flipping ReLU's derivative; a bias moves it off the kink.
    def meta(s):
      m = {"bias_init": nnx.initializers.normal(0.1)}
      return m if s is None else {**m, "kernel_metadata": {"out_sharding": s}}

    s1, s2, s3 = shard or (None, None, None)
    self.l1 = nnx.Linear(D_IN, D_H, **meta(s1), rngs=rngs)
    self.l2 = nnx.Linear(D_H, D_H, **meta(s2), rngs=rngs)
    self.l3 = nnx.Linear(D_H, D_OUT, **meta(s3), rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.l1(x))
    h = jax.nn.relu(self.l2(h, out_sharding=_act_sharding()))
    return self.l3(h, out_sharding=_act_sharding())


def _act_sharding():
  """Under explicit sharding a row-parallel matmul needs its output sharding (batch on data)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.explicit_axes:
    return None
  return P("data")


def _tree_np(tree):
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def _close(a, b, what):
  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert fa.keys() == fb.keys(), f"{what}: different entries"
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=RTOL, atol=ATOL,
                               err_msg=f"{what}: {jax.tree_util.keystr(k)}")


_TRAINED = {}


def _nnx_train(layout, rules, x, y, axis_type=AxisType.Explicit):
  """Quantize, calibrate, one QAT step; (loss, model, mesh, HLO of TP steps); memoized."""
  key = (layout, id(rules), axis_type)
  if key not in _TRAINED:
    _TRAINED[key] = _nnx_train_once(layout, rules, x, y, axis_type)
  return _TRAINED[key]


def _nnx_train_once(layout, rules, x, y, axis_type):
  if layout is None:
    ctx, shard, dspec, mesh = _nullmesh(), None, None, None
  else:
    shape, names, s1, s2, s3, dspec = LAYOUTS[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    ctx, shard = jax.set_mesh(mesh), (s1, s2, s3)
  with ctx:
    model = qnnx.quantize(MLP(shard, rngs=nnx.Rngs(0)), rules)
    xs, ys = (x, y) if mesh is None else (
        jax.device_put(x, NamedSharding(mesh, dspec)), jax.device_put(y, NamedSharding(mesh, dspec)))
    qnnx.calibrate(model, [xs])
    tx = qnnx.qat_optimizer(model, optax.sgd(0.1), optax.sgd(0.05))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    def step(state, xb, yb):
      m, o = nnx.merge(graphdef, state)

      def loss_fn(m):
        return jnp.mean(jnp.square(m(xb) - yb))

      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(m)
      o.update(m, grads)
      return loss, nnx.state((m, o))

    if mesh is None:
      jstep = jax.jit(step)
    else:  # the helper's shardings: the updated state keeps the model's layout (auto mode too)
      state_sh = nnx_sharding.shardings((model, opt), mesh)
      jstep = jax.jit(step, in_shardings=(state_sh, NamedSharding(mesh, dspec),
                                          NamedSharding(mesh, dspec)),
                      out_shardings=(NamedSharding(mesh, P()), state_sh))
    compiled = jstep.lower(state, xs, ys).compile()  # one compile, for the HLO and the step
    loss, new_state = compiled(state, xs, ys)
    hlo = compiled.as_text() if layout == "tp" else ""
    nnx.update((model, opt), new_state)
  return float(loss), model, mesh, hlo


class _nullmesh:
  def __enter__(self):
    return None

  def __exit__(self, *a):
    return False


def _params(model):
  return _tree_np(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def check_nnx():
  x, y = _data()
  for scheme, rules in SCHEMES.items():
    ref_loss, ref_model, _, _ = _nnx_train(None, rules, x, y)
    ref = _params(ref_model)
    for layout in SCHEME_LAYOUTS[scheme]:
      both = layout == "tp" and rules is W4A4  # auto axes too (one scheme: compile time)
      for at in ((AxisType.Explicit, AxisType.Auto) if both else (AxisType.Explicit,)):
        loss, model, mesh, hlo = _nnx_train(layout, rules, x, y, at)
        what = f"nnx {scheme} {layout} {at}"
        np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg=what)
        _close(_params(model), ref, what)
        if layout == "tp":
          _check_tp(model, mesh, hlo, scheme, what)
    print(f"nnx {scheme}: {'/'.join(SCHEME_LAYOUTS[scheme])} == single device "
          f"(loss {ref_loss:.6f})")


def _check_tp(model, mesh, hlo, scheme, what):
  """Kernels and their per-channel scales stay sharded; no all-gather of a full kernel."""
  assert model.l1.kernel[...].sharding.spec == P(None, "model"), what
  assert model.l2.kernel[...].sharding.spec == P("model", None), what
  if scheme == "W4A4-LSQ":
    s1 = model.l1.kernel_quant.log_scale[...]
    assert s1.sharding.spec == P(None, "model"), (what, s1.sharding)
    assert s1.addressable_shards[0].data.shape == (1, D_H // 4), what
    s2 = model.l2.kernel_quant.log_scale[...]  # row-parallel: channels (columns) are whole
    assert s2.sharding.spec in (P(), P(None, None), P(None)), (what, s2.sharding)
    assert model.l1.input_quant.log_scale[...].sharding.is_fully_replicated, what
  gathers = re.findall(r"= f32\[([0-9,]*)\][^=\n]* all-gather\(", hlo)
  full = {f"{D_IN},{D_H}", f"{D_H},{D_H}"}
  assert not full & set(gathers), f"{what}: all-gather of a full kernel: {gathers}"


def check_calibration():
  """Every observer: statistics of a batch sharded over 8 devices == one device.

  Two batches (the second widens the range, so histograms regrid); inside jit
  on an explicit mesh with the rows sharded, and under shard_map with
  ``axis_name`` (each device sees its rows). Granularity and symmetry vary
  across the methods; all methods share one program per way of running.
  """
  x = np.asarray(jax.random.normal(jax.random.key(3), (64, 16), jnp.float32)) * 3.0
  x[:32] *= 0.5
  x[0, 0] = np.inf
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  cases = [("absmax", core.PerChannel(-1), True), ("minmax", core.PerTensor(), False),
           ("ema", core.PerChannel(-1), False), ("percentile", core.PerTensor(), True),
           ("mse", core.PerChannel(-1), True), ("entropy", core.PerTensor(), False)]
  # rows [0:32] then [32:64] globally; under shard_map device d holds rows 4d..4d+3 of each
  xx = np.concatenate([x[:32].reshape(8, 4, 16), x[32:].reshape(8, 4, 16)], 1).reshape(64, 16)
  # Every method in one jitted program and one shard_map program (two compiles, not twelve).
  obs, sobs, refs = [], [], []
  for method, gran, sym in cases:
    spec = core.QuantSpec(format="int8", symmetric=sym, granularity=gran,
                          calibration=core.Calibration(method=method, num_bins=256))
    o = core.observer(spec)
    obs.append(o)
    sobs.append(core.observer(spec, axis_name="data"))
    refs.append(o.compute(o.update(o.update(o.init(x), x[:32]), x[32:])))
  inits = [so.init(x) for so in sobs]

  def all_jit(a, b):
    return [o.compute(o.update(o.update(o.init(a), a), b)) for o in obs]

  def all_local(b):
    return [so.compute(so.update(so.update(init, b[:4]), b[4:])) for so, init in zip(sobs, inits)]

  with jax.set_mesh(mesh):
    xa, xb = (jax.device_put(h, NamedSharding(mesh, P("data"))) for h in (x[:32], x[32:]))
    got = jax.jit(all_jit)(xa, xb)
  xs = jax.device_put(xx, NamedSharding(mesh, P("data")))
  got_sm = jax.jit(jax.shard_map(all_local, mesh=mesh, in_specs=P("data"), out_specs=P()))(xs)
  for (method, gran, sym), ref, g, g_sm in zip(cases, refs, got, got_sm):
    what = f"calibration {method} {gran} sym={sym}"
    _close(_tree_np(g), _tree_np(ref), what)
    _close(_tree_np(g_sm), _tree_np(ref), what + " (shard_map)")
  print("calibration: absmax, minmax, ema, percentile, mse, entropy: batch sharded over 8 "
        "devices (jit) == shard_map(axis_name) == one device")


def check_nnx_calibrate_explicit():
  """Calibrating an NNX model on an explicit mesh == on one device (used to raise)."""
  x, _ = _data()
  ref = qnnx.calibrate(qnnx.quantize(MLP(None, rngs=nnx.Rngs(0))), [x, -2 * x])
  shape, names, s1, s2, s3, dspec = LAYOUTS["tp"]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    m = qnnx.quantize(MLP((s1, s2, s3), rngs=nnx.Rngs(0)))
    xs = jax.device_put(x, NamedSharding(mesh, dspec))
    qnnx.calibrate(m, [xs, -2 * xs])
    qnnx.freeze(m)
    out = m(xs)
  qnnx.freeze(ref)
  _close(_tree_np(nnx.to_pure_dict(nnx.state(m))), _tree_np(nnx.to_pure_dict(nnx.state(ref))),
         "nnx calibrate+freeze on explicit mesh")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref(x)), rtol=RTOL, atol=ATOL)
  print("nnx: calibrate + freeze on an explicit 2x4 mesh == one device")


def check_checkpoint():
  """An orbax checkpoint saved from an 8-device FSDP mesh restores onto 4x2 and onto 1."""
  import orbax.checkpoint as ocp
  x, y = _data()
  _, model, mesh, _ = _nnx_train("fsdp", W4A4, x, y)
  with jax.set_mesh(mesh):
    want = np.asarray(model(jax.device_put(x, NamedSharding(mesh, P("data")))))
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "ckpt")
    qnnx.save(path, model)
    # 8 -> 4x2 (tensor parallel): restore straight into the new shardings.
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    _, _, s1, s2, s3, _ = LAYOUTS["tp"]
    with jax.set_mesh(mesh2):
      m2 = qnnx.quantize(MLP((s1, s2, s3), rngs=nnx.Rngs(7)), W4A4)
      qnnx.calibrate(m2, [jax.device_put(x, NamedSharding(mesh2, P("data")))])
      state = nnx.state(m2)
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nnx.to_pure_dict(state),
                            nnx.to_pure_dict(nnx_sharding.shardings(m2, mesh2)))
      restored = ocp.StandardCheckpointer().restore(path, target)
      nnx.replace_by_pure_dict(state, restored)
      nnx.update(m2, state)
      assert m2.l1.kernel_quant.log_scale[...].sharding.spec == P(None, "model")
      got2 = np.asarray(m2(jax.device_put(x, NamedSharding(mesh2, P("data")))))
    np.testing.assert_allclose(got2, want, rtol=RTOL, atol=ATOL, err_msg="8 -> 4x2")
    # 8 -> 1: the front end's own restore into an unsharded model.
    m1 = qnnx.quantize(MLP(None, rngs=nnx.Rngs(7)), W4A4)
    qnnx.calibrate(m1, [x])
    qnnx.restore(path, m1)
    np.testing.assert_allclose(np.asarray(m1(x)), want, rtol=RTOL, atol=ATOL, err_msg="8 -> 1")
  print("checkpoint: FSDP(8) -> TP(4x2) and -> 1 device give the same outputs")


def check_errors():
  """A scale that cannot follow its weight's sharding: error naming the layer and the axis."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  rule = core.Rule(pattern="l1", weight=core.QuantSpec(granularity=core.PerBlock(8, axis=0)))
  with jax.set_mesh(mesh):
    try:
      qnnx.quantize(MLP((("data", None), None, None), rngs=nnx.Rngs(0)), rule)
    except ValueError as e:
      msg = str(e)
    else:
      raise AssertionError("no error for 2 blocks sharded over 8 devices")
  assert "layer 'l1'" in msg and "axis 0" in msg and "'data'" in msg and "2 blocks" in msg, msg
  # Annotations only (logical names / abstract models): follow_weight_shardings checks too.
  m = qnnx.quantize(MLP(None, rngs=nnx.Rngs(0)), rule)
  m.l1.kernel.set_metadata(out_sharding=("data", None))
  with jax.set_mesh(mesh):
    try:
      nnx_sharding.follow_weight_shardings(m)
    except ValueError as e:
      msg = str(e)
    else:
      raise AssertionError("no error from follow_weight_shardings")
  assert "layer 'l1'" in msg and "axis 0" in msg and "'data'" in msg, msg
  print("errors: a scale that cannot follow its weight names the layer and the axis")


def _linen_mlp(shard):
  import flax.linen as nn

  class LMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      def dense(n, sh):
        init = nn.initializers.lecun_normal()
        return nn.Dense(n, kernel_init=init if sh is None else nn.with_partitioning(init, sh),
                        bias_init=nn.initializers.normal(0.1))

      s1, s2, s3 = shard or (None, None, None)
      h = nn.relu(dense(D_H, s1)(x))
      h = nn.relu(dense(D_H, s2)(h))
      return dense(D_OUT, s3)(h)

  return LMLP()


def _linen_train(layout, rules, x, y):
  """Linen: quantize, calibrate (on the sharded batch), one jitted QAT step (auto mode)."""
  import flax.linen as nn
  from jaxqat.core import _sharding as core_sharding
  from jaxqat.flax import linen as ql
  from jaxqat.flax.linen import _sharding as lsh
  shard = mesh = None
  if layout is not None:
    shape, names, s1, s2, s3, dspec = LAYOUTS[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    shard = (s1, s2, s3)
  qm = ql.quantize(_linen_mlp(shard), rules)
  boxed = qm.init(jax.random.key(0), x[:1])
  v = nn.unbox(boxed)
  tx = ql.qat_optimizer(qm, optax.sgd(0.1), optax.sgd(0.05, momentum=0.9))

  def step(t, o, rest, xb, yb):
    loss, g = jax.value_and_grad(lambda t: jnp.mean(jnp.square(qm.apply({**rest, **t}, xb) - yb)))(t)
    u, o = tx.update(g, o, t)
    return loss, optax.apply_updates(t, u), o

  def split(v):
    t = {k: v[k] for k in ("params", "quant_params") if k in v}
    return t, {k: v[k] for k in v if k not in t}

  if mesh is None:
    v = ql.calibrate(qm, v, [x])
    t, rest = split(v)
    loss, t, _ = jax.jit(step)(t, tx.init(t), rest, x, y)
    return float(loss), _tree_np(t), None
  with jax.set_mesh(mesh):
    v = jax.device_put(v, lsh.shardings(boxed, mesh))
    xs, ys = (jax.device_put(a, NamedSharding(mesh, dspec)) for a in (x, y))
    v = ql.calibrate(qm, v, [xs])
    sh = lsh.shardings({**v, "params": boxed["params"]}, mesh)  # calibrated structure
    v = jax.device_put(v, sh)
    t, rest = split(v)
    tsh, rsh = split(sh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t, tsh)
    osh = core_sharding.state_shardings(jax.eval_shape(tx.init, t), abstract)
    o = jax.jit(tx.init, out_shardings=osh)(t)
    dsh = NamedSharding(mesh, dspec)
    jstep = jax.jit(step, in_shardings=(tsh, osh, rsh, dsh, dsh),
                    out_shardings=(NamedSharding(mesh, P()), tsh, osh))
    loss, t, o = jstep(t, o, rest, xs, ys)
    if layout == "tp" and "quant_params" in t:
      assert t["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "model")
      assert t["quant_params"]["Dense_0"]["kernel"]["log_scale"].sharding.spec == P(None, "model")
      specs = {leaf.sharding.spec for path, leaf in jax.tree_util.tree_flatten_with_path(o)[0]
               if "log_scale" in jax.tree_util.keystr(path) and leaf.shape == (1, D_H)}
      assert P(None, "model") in specs, specs  # the optimizer state follows too
  return float(loss), _tree_np(t), mesh


def check_linen():
  x, y = _data()
  for scheme, rules in SCHEMES.items():
    ref_loss, ref, _ = _linen_train(None, rules, x, y)
    for layout in SCHEME_LAYOUTS[scheme]:
      loss, got, _ = _linen_train(layout, rules, x, y)
      what = f"linen {scheme} {layout}"
      np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg=what)
      _close(got, ref, what)
    print(f"linen {scheme}: {'/'.join(SCHEME_LAYOUTS[scheme])} == single device "
          f"(loss {ref_loss:.6f})")


def check_keras():
  """Keras fit under keras.distribution.DataParallel == fit on one device (W4A4 LSQ)."""
  import keras
  from jaxqat import keras as jqk
  x, y = _data()

  def build(fit=True):
    keras.utils.set_random_seed(0)
    bias = keras.initializers.RandomNormal(stddev=0.1, seed=1)
    m = keras.Sequential([
        keras.Input((D_IN,)),
        keras.layers.Dense(D_H, activation="relu", bias_initializer=bias, name="da"),
        keras.layers.Dense(D_H, activation="relu", bias_initializer=bias, name="db"),
        keras.layers.Dense(D_OUT, bias_initializer=bias, name="dc")], name="net")
    m = jqk.quantize(m, W4A4)
    if not fit:
      return m
    jqk.calibrate(m, x, batch_size=BATCH)
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    hist = m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return hist.history["loss"][0], {v.path: v.value for v in m.weights}

  ref_loss, ref = build()
  dp = keras.distribution.DataParallel(devices=jax.devices())
  with dp.scope():
    loss, got = build()
  assert any("log_scale" in k for k in got), sorted(got)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg="keras DataParallel loss")
  ref = _tree_np(ref)
  _close(_tree_np(got), ref, "keras DataParallel")
  # ModelParallel: column/row-parallel kernels; the quantizer weights follow them.
  from jaxqat.keras._sharding import follow_layout_map
  mesh = keras.distribution.DeviceMesh((2, 4), ["data", "model"], jax.devices())
  layout_map = keras.distribution.LayoutMap(mesh)
  layout_map[".*/da/kernel"] = (None, "model")
  layout_map[".*/db/kernel"] = ("model", None)
  follow_layout_map(layout_map, build(fit=False))
  with keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="data").scope():
    loss, got = build()
  assert got["net/da/kernel_quantizer/log_scale"].sharding.spec == P(None, "model")
  assert got["net/db/kernel"].sharding.spec == P("model", None)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg="keras ModelParallel loss")
  _close(_tree_np(got), ref, "keras ModelParallel")
  print(f"keras: fit under DataParallel(8) and ModelParallel(2x4) == one device "
        f"(loss {ref_loss:.6f})")


CHECKS = {
    "keras": check_keras,
    "linen": check_linen,
    "nnx": check_nnx,
    "calib": check_calibration,
    "nnxcal": check_nnx_calibrate_explicit,
    "ckpt": check_checkpoint,
    "error": check_errors,
}


def main(argv):
  assert jax.device_count() == 8, f"needs 8 devices, got {jax.device_count()}"
  names = argv or list(CHECKS)
  for name in names:
    t = time.perf_counter()
    CHECKS[name]()
    print(f"  [{name}: {time.perf_counter() - t:.1f} s]", flush=True)
  print("SHARDING CHECKS PASSED")


if __name__ == "__main__":
  main(sys.argv[1:])
