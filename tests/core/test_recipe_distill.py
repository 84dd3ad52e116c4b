"""QATRecipe schedules/optimizers and the QAD losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxqat.core._distill import distillation_loss, feature_distillation, kl_distillation
from jaxqat.core._recipe import QATRecipe


def test_schedule_follows_the_rule():
  r = QATRecipe(original_steps=5000, original_lr=0.4)
  assert r.steps == 500 and r.warmup_steps == 50
  assert r.peak_lr == pytest.approx(0.004)
  s = r.schedule()
  assert float(s(0)) == 0.0
  assert float(s(25)) == pytest.approx(0.002, rel=1e-6)  # linear warmup
  assert float(s(50)) == pytest.approx(0.004, rel=1e-6)  # end of warmup: the peak
  mid = 50 + (500 - 50) // 2
  assert float(s(mid)) == pytest.approx(0.002, rel=1e-3)  # cosine half way
  assert float(s(500)) == pytest.approx(0.0, abs=1e-12)  # last step
  q = r.quant_schedule()
  assert float(q(50)) == pytest.approx(1e-3) and float(q(0)) == 0.0


def test_end_fraction_and_no_warmup():
  r = QATRecipe(original_steps=100, original_lr=1.0, warmup_fraction=0.0, end_lr_fraction=0.1)
  s = r.schedule()
  assert float(s(0)) == pytest.approx(0.01) and float(s(10)) == pytest.approx(0.001)


@pytest.fixture(autouse=True)
def _standard_promotion():
  with jax.numpy_dtype_promotion("standard"):  # optax's step counts are int32
    yield


def test_quantizer_params_get_no_weight_decay_and_own_rate():
  r = QATRecipe(original_steps=100, original_lr=1.0, optimizer="adamw", weight_decay=0.5,
                warmup_fraction=0.0, quant_lr=0.05)
  params = {"w": jnp.full((3,), 2.0), "log_scale": jnp.full((), -1.0)}
  tx = optax.partition({"params": r.tx(), "quant": r.quant_tx()},
                       lambda t: {k: "quant" if k == "log_scale" else "params" for k in t})
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, state = tx.update(zero, state, params)
  # Zero gradient: weights still decay (lr 0.01 * wd 0.5 * w 2.0), the quantizer param does not.
  np.testing.assert_allclose(upd["w"], -0.01 * 0.5 * 2.0, rtol=1e-6)
  assert float(upd["log_scale"]) == 0.0
  upd, _ = tx.update({"w": jnp.zeros(3), "log_scale": jnp.ones(())}, tx.init(params), params)
  # Adam's first step moves by exactly the rate: the quantizer's own, 0.05, not the weights' 0.01.
  assert float(upd["log_scale"]) == pytest.approx(-0.05, rel=1e-4)


def test_sgd_is_the_default_with_momentum():
  r = QATRecipe(original_steps=10, original_lr=100.0, warmup_fraction=0.0)
  p = {"w": jnp.ones(())}
  tx = r.tx()
  st = tx.init(p)
  u1, st = tx.update({"w": jnp.ones(())}, st)
  u2, _ = tx.update({"w": jnp.ones(())}, st)
  lr0, lr1 = float(r.schedule()(0)), float(r.schedule()(1))
  assert float(u1["w"]) == pytest.approx(-lr0)
  assert float(u2["w"]) == pytest.approx(-lr1 * 1.9)  # momentum 0.9


@pytest.mark.parametrize("kw,msg", [
    (dict(original_steps=0, original_lr=1.0), "original_steps"),
    (dict(original_steps=10, original_lr=float("nan")), "original_lr"),
    (dict(original_steps=10, original_lr=1.0, warmup_fraction=1.0), "warmup_fraction"),
    (dict(original_steps=10, original_lr=1.0, optimizer="rmsprop"), "optimizer"),
    (dict(original_steps=10.5, original_lr=1.0), "original_steps"),
])
def test_recipe_bad_input(kw, msg):
  with pytest.raises((ValueError, TypeError), match=f"QATRecipe.{msg}"):
    QATRecipe(**kw)


def test_kl_matches_numpy_reference_and_gradient():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(4, 5)).astype("float32")
  t = rng.normal(size=(4, 5)).astype("float32")
  T = 3.0
  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  pt, ps = softmax(t / T), softmax(s / T)
  ref = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
  assert float(kl_distillation(s, t, temperature=T)) == pytest.approx(ref, rel=1e-5)
  g = jax.grad(lambda s: kl_distillation(s, t, temperature=T))(jnp.asarray(s))
  np.testing.assert_allclose(g, T * (ps - pt) / 4, rtol=1e-4, atol=1e-6)


def test_distillation_mix_and_errors():
  s = jnp.array([[2.0, 0.0, 0.0]])
  t = jnp.array([[0.0, 0.0, 0.0]])
  y = jnp.array([0])
  ce = -float(jax.nn.log_softmax(s)[0, 0])
  mse = 4.0 / 3
  got = distillation_loss(s, t, y, kl_weight=0.0, mse_weight=2.0, label_weight=0.5)
  assert float(got) == pytest.approx(2.0 * mse + 0.5 * ce, rel=1e-6)
  feats = {"a": jnp.ones((2,)), "b": jnp.zeros((2,))}
  got = distillation_loss(s, s, kl_weight=1.0, student_features=feats,
                          teacher_features={"a": jnp.zeros((2,)), "b": jnp.zeros((2,))},
                          feature_names=["a", "b"], feature_weight=1.0)
  assert float(got) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="teacher's output has shape"):
    distillation_loss(s, t[:, :2])
  with pytest.raises(ValueError, match="'c' is not a feature"):
    feature_distillation(feats, feats, ["c"])
  with pytest.raises(ValueError, match="label_weight > 0 needs"):
    distillation_loss(s, t, label_weight=1.0)
  with pytest.raises(ValueError, match="every weight is 0"):
    distillation_loss(s, t, kl_weight=0.0)
  with pytest.raises(ValueError, match="temperature"):
    kl_distillation(s, t, temperature=0.0)
