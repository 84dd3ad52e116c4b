"""QAT recipes and QAD in every front end: NNX, Linen, Keras (JAX; torch in a subprocess).

Digits (sklearn, 8x8) with small MLPs so that each front end compiles a few
programs only. Seeds are fixed; measured numbers are in the comments next to
the assertions.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxqat.core import IntFormat, PerOutputChannel, QuantSpec, Rule
from jaxqat.core._distill import QADLoss, distillation_loss
from jaxqat.core._recipe import QATRecipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  perm = np.random.RandomState(0).permutation(len(d.target))
  x = (d.data / 16.0).astype(np.float32)[perm]
  y = d.target.astype(np.int32)[perm]
  return x[:1300], y[:1300], x[1300:], y[1300:]


def _lsq_rules(bits, weight_calibration="absmax"):
  """First and last layer W8A8 (fixed ranges); the rest ``bits``-bit LSQ weights and inputs.

  ``weight_calibration`` initialises the learned weight step sizes: ``"mse"``
  (the clipping range of least quantization error) instead of the absolute
  maximum, which at 2 bits (codes -1, 0, 1) rounds most weights to 0.
  """
  w8 = QuantSpec(format=IntFormat(bits=8, narrow=True), granularity=PerOutputChannel())
  a8 = QuantSpec(format="int8", symmetric=False, calibration="minmax")
  wq = QuantSpec(format=IntFormat(bits=bits, narrow=True), granularity=PerOutputChannel(),
                 learning="lsq", calibration=weight_calibration)
  aq = QuantSpec(format=IntFormat(bits=bits, signed=False), calibration="minmax",
                 learning="lsq")
  return [Rule(pattern="^(fc1|head)$", weight=w8, act=a8), Rule(pattern=".*", weight=wq, act=aq)]


# --------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------

def _nnx_mlp():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(64, 64, rngs=rngs)
      self.fc2 = nnx.Linear(64, 64, rngs=rngs)
      self.fc3 = nnx.Linear(64, 64, rngs=rngs)
      self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      x = jax.nn.relu(self.fc1(x))
      x = jax.nn.relu(self.fc2(x))
      self.sow(nnx.Intermediate, "feat", x)
      return self.head(jax.nn.relu(self.fc3(x)))

  return MLP(nnx.Rngs(0))


def _nnx_logits(model, x):
  from jaxqat.flax.nnx._qad import qad_forward  # pylint: disable=g-import-not-at-top
  return qad_forward(model, x)[0]  # captures what the MLP sows instead of leaving it on the model


def _nnx_ce_steps(model, opt, xs, ys):
  """Cross-entropy steps over the leading axis of ``xs``/``ys`` in one program (``nnx.scan``)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
  def body(carry, x, y):
    m, o = carry
    g = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
        _nnx_logits(m, x), y).mean())(m)
    with jax.numpy_dtype_promotion("standard"):  # optax's step counts are int32
      o.update(m, g)
    return m, o

  body((model, opt), xs, ys)


def test_nnx_recipe_qad_w2a2_digits(digits):
  """W2A2 (first and last layer W8A8) on digits: PTQ, recipe QAT, recipe QAD; and the helper's contract.

  What brings W2A2 within 3 points of float, measured with this model and
  data over 12 runs (3 seeds of the float model and its data x 4 seeds of the
  200 fine-tuning batches; QAT and QAD get the same steps and batches); points
  below float, mean (worst):

  fine-tuning (200 steps)                               QAT          QAD (KL, T=2)
  absmax init, quant_lr 3e-3, weights 0.3x (before)     1.41 (2.41)  1.84 (3.82)
  MSE init,    quant_lr 1e-2, weights 1.0x              0.34 (1.41)  0.96 (1.81)
  absmax init, quant_lr 3e-2, weights 1.0x                           0.77 (1.61)
  MSE init,    quant_lr 3e-2, weights 0.3x                           0.87 (1.81)
  MSE init,    quant_lr 3e-2, weights 1.0x (this test)  0.23 (1.41)  0.39 (1.21)
  MSE init,    quant_lr 1e-1, weights 1.0x                           0.89 (1.41)

  What got it there, by size: (1) the quantizer rate. Step sizes are learnt
  as ``log s`` and at 2 bits (codes -1, 0, 1 for weights, 0..3 for inputs)
  they must move far from their calibrated value within 200 steps: QAD's
  mean gap is 0.96 at quant_lr 1e-2, 0.39 at 3e-2, 0.89 at 1e-1. (2) The
  weights at the full float rate instead of the rule of thumb's fraction
  (0.3x: 0.87, 1.0x: 0.39): at 2 bits the weights must rearrange, not only
  adjust. (3) The weight step sizes initialised by ``calibration="mse"``
  (the clipping range of least quantization error) instead of absmax, which
  rounds most weights to 0 at 2 bits: PTQ 83.9% -> 95.0% on this seed and
  the QAD gap 0.77 -> 0.39. What did not help: progressive 8 -> 4 -> 2 bits
  at the same total steps (60 steps at 4 bits, then the 2-bit step sizes
  re-initialised from the 4-bit model's weights, 140 steps; MSE init,
  quant_lr 1e-2, weights 1.0x; one run on each of 3 seeds: QAD 1.21 points
  below float on average against 0.80 direct), another temperature (T=1
  0.92, T=2 0.96 at quant_lr 1e-2), a logit MSE instead of the KL (4.23 vs
  3.02 with the old rates, one run). Adding the label cross-entropy to the
  KL is on a par (0.27 (1.21) at quant_lr 3e-2). On digits QAD does not beat
  QAT reliably (the labels are clean and the teacher only 97.8% accurate;
  the KL+CE mix is QAD's best). Single runs move by
  about +-0.8 points with the last bits of the float model (a program
  compiled differently), so the margins asserted are wide.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxqat.flax import nnx as qnnx  # pylint: disable=g-import-not-at-top
  from jaxqat.flax.nnx._qad import qad_forward, qad_train_step  # pylint: disable=g-import-not-at-top
  xtr, ytr, xte, yte = digits
  teacher = _nnx_mlp()
  float_steps, float_lr, batch = 400, 3e-3, 64
  order = np.random.RandomState(0).randint(0, len(ytr), size=(float_steps, batch))
  ce_steps = nnx.jit(_nnx_ce_steps)
  ce_steps(teacher, nnx.Optimizer(teacher, optax.adam(float_lr), wrt=nnx.Param),
           xtr[order], ytr[order])
  acc = nnx.jit(lambda m, x: 100.0 * jnp.mean(jnp.argmax(_nnx_logits(m, x), -1) == yte))
  float_acc = float(acc(teacher, xte))

  ptq = qnnx.quantize(nnx.clone(teacher), _lsq_rules(2, weight_calibration="mse"))
  qnnx.calibrate(ptq, [xtr[:512]])
  ptq_acc = float(acc(ptq, xte))
  recipe = QATRecipe(original_steps=float_steps, original_lr=float_lr, step_fraction=0.5,
                     lr_fraction=1.0, optimizer="adamw", weight_decay=1e-4, quant_lr=3e-2)

  # Zero gradients through qnnx.qat_optimizer: kernels decay, log_scale gets exactly 0.
  tx = qnnx.qat_optimizer(ptq, *recipe.optimizers())
  params = nnx.state(ptq, nnx.Param)
  zeros, st, update = jax.tree.map(jnp.zeros_like, params), tx.init(params), jax.jit(tx.update)
  for _ in range(recipe.warmup_steps + 1):
    with jax.numpy_dtype_promotion("standard"):
      upd, st = update(zeros, st, params)
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(upd)}
  w = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}
  ls = [k for k in flat if k.endswith("log_scale")]
  assert ls and all(float(jnp.max(jnp.abs(flat[k][...]))) == 0.0 for k in ls)
  np.testing.assert_allclose(flat["fc2.kernel"][...], -recipe.peak_lr * 1e-4 * w["fc2.kernel"][...],
                             rtol=1e-4)

  # QAT (cross-entropy, all steps in one program) and QAD (the helper, one call a step): the same
  # recipe, steps and batches from the same PTQ model.
  data = np.random.RandomState(1).randint(0, len(ytr), size=(recipe.steps, batch))
  accs = {}
  for name in ("qat", "qad"):
    s = nnx.clone(ptq)
    o = nnx.Optimizer(s, qnnx.qat_optimizer(s, *recipe.optimizers()), wrt=nnx.Param)
    if name == "qat":
      ce_steps(s, o, xtr[data], ytr[data])
    else:
      for x in xtr[data]:
        qad_train_step(teacher, s, o, x, loss=QADLoss(temperature=2.0))
    accs[name] = float(acc(s, xte))
  print(f"\nNNX digits W2A2: float {float_acc:.2f}%, PTQ {ptq_acc:.2f}%, QAT {accs['qat']:.2f}%, "
        f"QAD {accs['qad']:.2f}%")
  # Measured: float 97.79%, PTQ 94.97%, QAT 97.18% (0.61 below float; 96.98% with XLA at
  # optimisation level 0), QAD 96.18% (1.61 below; the issue asks for 3 points). QAD trails QAT
  # here by 1.00 (6 test digits); over 12 runs by 0.16 on average (see the docstring).
  assert float_acc >= 95.0
  assert accs["qad"] >= float_acc - 2.0 and accs["qat"] >= float_acc - 2.0
  assert min(accs["qat"], accs["qad"]) >= ptq_acc + 0.6
  assert accs["qad"] >= accs["qat"] - 1.5, f"QAD trails QAT by {accs['qat'] - accs['qad']:.2f}"

  # The helper: the teacher gets no update, its forward is traced once, features, bad input.
  before = jax.tree.map(jnp.copy, nnx.state(teacher))
  calls = []

  def forward(model, x):
    calls.append(type(model).__name__)
    return model(x)

  s = nnx.clone(ptq)
  o = nnx.Optimizer(s, optax.sgd(1e-3), wrt=nnx.Param)
  feat_loss = QADLoss(features=("feat",), feature_weight=1.0)
  for i in range(3):
    qad_train_step(teacher, s, o, xtr[i * 64:(i + 1) * 64], loss=feat_loss, forward=forward)
  assert len(calls) == 2  # one trace of the teacher and one of the student, for three steps
  jax.tree.map(np.testing.assert_array_equal, nnx.state(teacher), before)
  feat = lambda m: qad_forward(m, xte, features=("feat",))[1]["feat"]  # traced only, not compiled
  assert nnx.eval_shape(feat, teacher).shape == nnx.eval_shape(feat, s).shape == (len(yte), 64)
  with pytest.raises(ValueError, match="'fc9' is not a feature of the MLP"):
    qad_train_step(teacher, s, o, xtr[:64], loss=QADLoss(features=("fc9",), feature_weight=1.0))
  small = nnx.Linear(64, 5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"teacher's output has shape \(64, 5\)"):
    qad_train_step(small, s, o, xtr[:64])
  with pytest.raises(ValueError, match="teacher: is the student itself"):
    qad_train_step(s, s, o, xtr[:64])


# --------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------

def test_linen_qad_train_step(digits):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax.training.train_state import TrainState  # pylint: disable=g-import-not-at-top
  from jaxqat.flax import linen as ql  # pylint: disable=g-import-not-at-top
  from jaxqat.flax.linen._qad import qad_train_step  # pylint: disable=g-import-not-at-top
  xtr, ytr, _, _ = map(jnp.asarray, digits)

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(32, name="fc1")(x))
      x = nn.relu(nn.Dense(32, name="fc2")(x))
      self.sow("intermediates", "feat", x)
      return nn.Dense(10, name="head")(x)

  model = MLP()
  params = model.init(jax.random.key(0), xtr[:2])["params"]
  qmodel = ql.quantize(model, _lsq_rules(4))
  # The quantized init's params are replaced and calibrate sets every range and step size
  # (the same bits from any key): one jitted init on an rbg key, ~2 s less than eager.
  v = ql.calibrate(qmodel, {**jax.jit(qmodel.init)(jax.random.key(0, impl="rbg"), xtr[:2]),
                            "params": params}, [xtr[:256]])
  trainable = {k: v[k] for k in ("params", "quant_params")}
  fixed = {k: x for k, x in v.items() if k not in trainable}
  recipe = QATRecipe(original_steps=100, original_lr=0.3, lr_fraction=0.1, warmup_fraction=0.0)
  state = TrainState.create(apply_fn=qmodel.apply, params=trainable,
                            tx=ql.qat_optimizer(qmodel, *recipe.optimizers()))
  loss = QADLoss(temperature=2.0, mse_weight=0.1, features=("feat",), feature_weight=0.5)
  teacher_vars = {"params": params}
  before = jax.tree.map(jnp.copy, teacher_vars)
  losses = []
  for i in range(recipe.steps):
    state, l = qad_train_step(state, fixed, model, teacher_vars, xtr[i * 64:(i + 1) * 64],
                              loss=loss)
    losses.append(float(l))
  s_out = qmodel.apply({**fixed, **trainable}, xtr[:64])
  t_out = model.apply(teacher_vars, xtr[:64])
  assert losses[0] == pytest.approx(float(distillation_loss(
      s_out, t_out, temperature=2.0, mse_weight=0.1, feature_weight=0.5, feature_names=["f"],
      student_features={"f": qmodel.apply({**fixed, **trainable}, xtr[:64], mutable=["intermediates"])[1]["intermediates"]["feat"][0]},
      teacher_features={"f": model.apply(teacher_vars, xtr[:64], mutable=["intermediates"])[1]["intermediates"]["feat"][0]})), rel=1e-5)
  assert losses[-1] < 0.9 * losses[0]  # measured: 5.40e-4 -> 4.46e-4 in 10 steps
  jax.tree.map(np.testing.assert_array_equal, teacher_vars, before)
  with pytest.raises(ValueError, match="'nope' is not an intermediate of the teacher"):
    qad_train_step(state, fixed, model, teacher_vars, xtr[:8],
                   loss=QADLoss(features=("nope",), feature_weight=1.0))
  other = nn.Dense(5)
  with pytest.raises(ValueError, match=r"teacher's output has shape \(8, 5\)"):
    qad_train_step(state, fixed, other, other.init(jax.random.key(0), xtr[:1]), xtr[:8])


# --------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------

def _keras_mlp(keras):
  keras.utils.set_random_seed(0)
  return keras.Sequential([
      keras.Input((64,)),
      keras.layers.Dense(64, activation="relu", name="fc1"),
      keras.layers.Dense(64, activation="relu", name="fc2"),
      keras.layers.Dense(64, activation="relu", name="fc3"),
      keras.layers.Dense(10, name="head")])


def test_keras_recipe_and_qad_with_fit(digits):
  import keras  # pylint: disable=g-import-not-at-top
  import jaxqat.keras as jqk  # pylint: disable=g-import-not-at-top
  from jaxqat.keras._optimizer import is_quant_param  # pylint: disable=g-import-not-at-top
  from jaxqat.keras._qad import QADModel, recipe_optimizers, recipe_schedules  # pylint: disable=g-import-not-at-top
  if keras.backend.backend() != "jax":
    pytest.skip("the JAX backend runs this; torch runs test_keras_qad_on_torch")
  xtr, ytr, xte, yte = digits

  # The Keras schedules equal the recipe's optax schedules (step 0, warmup end, last step).
  recipe = QATRecipe(original_steps=2000, original_lr=0.1, optimizer="adamw",
                     weight_decay=0.5, quant_lr=0.01)
  ks, kq = recipe_schedules(recipe)
  for step in (0, 7, recipe.warmup_steps, 111, recipe.steps):
    assert float(ks(step)) == pytest.approx(float(recipe.schedule()(step)), abs=1e-9)
    assert float(kq(step)) == pytest.approx(float(recipe.quant_schedule()(step)), abs=1e-9)
  assert float(ks(recipe.warmup_steps)) == pytest.approx(0.001)

  ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  teacher = _keras_mlp(keras)
  teacher.compile(optimizer=keras.optimizers.Adam(3e-3), loss=ce)
  teacher.fit(xtr, ytr, epochs=20, batch_size=64, verbose=0)

  def accuracy(model):  # an eager call: no predict function compiled per model
    return float(np.mean(np.argmax(keras.ops.convert_to_numpy(model(xte)), -1) == yte) * 100)

  float_acc = accuracy(teacher)

  # QAT and QAD at W2A2 (first/last layer 8-bit) from the same float weights, same recipe and data;
  # the rates of test_nnx_recipe_qad_w2a2_digits. The weight step sizes start from absmax: Keras
  # runs the MSE observer eagerly, about 6 s more here (with MSE: PTQ 93.56%, QAT and QAD 97.38%).
  w2_recipe = QATRecipe(original_steps=400, original_lr=3e-3, step_fraction=0.25, lr_fraction=1.0,
                        optimizer="adam", quant_lr=3e-2)
  epochs, batch = 5, 64
  n = (len(xtr) // batch) * batch
  assert w2_recipe.steps == epochs * n // batch  # the schedule ends with the fit
  accs = {}
  for name in ("qat", "qad"):
    keras.utils.set_random_seed(1)
    student = jqk.quantize(teacher, _lsq_rules(2))
    jqk.calibrate(student, xtr[:256])
    accs["ptq"] = accuracy(student)
    opt = jqk.qat_optimizer(student, *recipe_optimizers(w2_recipe))
    if name == "qat":
      model = student
      model.compile(optimizer=opt, loss=ce)
    else:
      model = QADModel(student, teacher, loss=QADLoss(temperature=2.0))
      model.compile(optimizer=opt)
    model.fit(xtr[:n], ytr[:n], epochs=epochs, batch_size=batch, verbose=0, shuffle=False)
    accs[name] = accuracy(student)
  print(f"\nKeras digits W2A2: float {float_acc:.2f}%, PTQ {accs['ptq']:.2f}%, "
        f"QAT {accs['qat']:.2f}%, QAD {accs['qad']:.2f}%")
  # Measured: float 97.79%, PTQ 89.74%, QAT 97.18%, QAD 96.18% (1.61 below float; the issue asks
  # for 3 points). QAD does NOT beat QAT in Keras here (1.0 point, 5 test digits, below; a tie with
  # the MSE initialisation); the last assertion bounds the shortfall.
  assert float_acc >= 95.0
  assert accs["qad"] >= float_acc - 2.0 and accs["qat"] >= float_acc - 2.0
  assert min(accs["qat"], accs["qad"]) >= accs["ptq"] + 3.0
  assert accs["qad"] >= accs["qat"] - 1.5, f"QAD trails QAT by {accs['qat'] - accs['qad']:.2f}"

  # Zero gradients (on the trained QAD student): AdamW decays the kernels, the quantizer
  # parameters get exactly no update.
  opt = jqk.qat_optimizer(student, *recipe_optimizers(recipe))
  tv = student.trainable_variables
  opt.build(tv)
  opt.optimizer.iterations.assign(recipe.warmup_steps)  # each inner optimizer counts its steps
  opt.quant_optimizer.iterations.assign(recipe.warmup_steps)
  before = [keras.ops.convert_to_numpy(v) for v in tv]
  opt.apply([keras.ops.zeros(v.shape) for v in tv], tv)
  kinds = [(is_quant_param(v), "kernel" in v.path, b, keras.ops.convert_to_numpy(v))
           for v, b in zip(tv, before)]
  assert any(q for q, *_ in kinds) and any(k for _, k, *_ in kinds)
  for q, k, b, a in kinds:
    if q:
      np.testing.assert_array_equal(a, b)
    elif k:  # lr(warmup end) * wd * w
      np.testing.assert_allclose(a, b - 0.001 * 0.5 * b, rtol=1e-5, atol=1e-8)

  # Bad input: a teacher with another output shape, a feature name that does not exist.
  other = keras.Sequential([keras.Input((64,)), keras.layers.Dense(5)])
  with pytest.raises(ValueError, match=r"teacher's output has shape \(None, 5\)"):
    QADModel(student, other)
  with pytest.raises(ValueError, match="'fc9' is not a layer of the student"):
    QADModel(student, teacher, loss=QADLoss(features=("fc9",), feature_weight=1.0))
  # Features: matching fc2's output adds its MSE to the KL.
  qad = QADModel(student, teacher, loss=QADLoss(features=("fc2",), feature_weight=1.0))
  s_all = keras.Model(student.inputs, [student.outputs[0], student.get_layer("fc2").output])
  t_all = keras.Model(teacher.inputs, [teacher.outputs[0], teacher.get_layer("fc2").output])
  (sl, sf), (tl, tf) = s_all(xte), t_all(xte)
  want = distillation_loss(sl, tl, student_features={"f": sf}, teacher_features={"f": tf},
                           feature_names=["f"], feature_weight=1.0)
  got = qad.compute_loss(xte, None, qad(xte))
  assert float(got) == pytest.approx(float(want), rel=1e-5)


_TORCH_SCRIPT = textwrap.dedent("""
    import numpy as np, keras
    import jaxqat.keras as jqk
    from jaxqat.core._distill import QADLoss
    from jaxqat.keras._qad import QADModel
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                keras.layers.Dense(4)])
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    student = jqk.quantize(teacher)
    jqk.calibrate(student, x)
    qad = QADModel(student, teacher, loss=QADLoss(temperature=2.0, mse_weight=0.5))
    qad.compile(optimizer=keras.optimizers.Adam(1e-2))
    w0 = [np.array(v) for v in teacher.weights]
    h = qad.fit(x, epochs=4, batch_size=16, verbose=0).history["loss"]
    same = all(np.array_equal(a, np.array(b)) for a, b in zip(w0, teacher.weights))
    print("RESULT", keras.backend.backend(), h[0], h[-1], same)
""")


def test_keras_qad_on_torch():
  """``QADModel.fit`` on the torch backend (a subprocess: the backend is fixed per process)."""
  pytest.importorskip("torch")
  env = dict(os.environ, KERAS_BACKEND="torch")
  out = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
  assert line, out.stderr[-3000:]
  _, backend, first, last, same = line[0].split()
  assert backend == "torch"
  assert float(last) < float(first)  # the student learns
  assert same == "True"  # the teacher does not
