"""bat_jax.losses against NumPy references: values, gradients, Theorem 3."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax import losses

B, C = 6, 5


# ----------------------------------------------------------------------------
# NumPy references (float64), written from docs/ALGORITHMS.md section 1.
# ----------------------------------------------------------------------------


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y]


def np_kl(p_logits, q_logits):
  lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def np_margin(z, y):
  p = np.exp(np_log_softmax(z))
  py = p[np.arange(len(y)), y]
  p_other = p.copy()
  p_other[np.arange(len(y)), y] = -np.inf
  return py - p_other.max(-1)


def np_trades(clean, adv, y, beta):
  return np_ce(clean, y).mean() + beta * np_kl(clean, adv).mean()


def np_bat(clean, bridges, y, beta):
  path = [clean] + list(bridges)
  bridge_sum = sum(np_kl(path[k], path[k + 1]).mean() for k in range(len(bridges)))
  return np_ce(clean, y).mean() + beta * bridge_sum


def np_mart(clean, adv, y, beta):
  idx = np.arange(len(y))
  adv_p = np.exp(np_log_softmax(adv))
  # The reference: argsort, take the top class unless it is y, then the second.
  order = np.argsort(adv_p, axis=1)
  wrong = np.where(order[:, -1] == y, order[:, -2], order[:, -1])
  bce = np_ce(adv, y).mean() + (-np.log(1.0001 - adv_p[idx, wrong])).mean()
  nat_p = np.exp(np_log_softmax(clean))
  kl = (nat_p * (np.log(nat_p + 1e-12) - np.log(adv_p + 1e-12))).sum(1)
  return bce + beta * (kl * (1.0000001 - nat_p[idx, y])).mean()


def np_smoothed_ce(z, y, s):
  """CE to the target distribution (1 - s) * onehot(y) + s / C, as a dot product."""
  target = (1 - s) * np.eye(z.shape[-1])[y] + s / z.shape[-1]
  return -(target * np_log_softmax(z)).sum(-1)


def numeric_grad(f, args, which, h=1e-5):
  """Central finite differences of a float64 NumPy function in args[which]."""
  args = [np.array(a, np.float64) if i != len(args) - 1 else a
          for i, a in enumerate(args)]
  base = args[which]
  grad = np.zeros_like(base)
  for idx in np.ndindex(base.shape):
    plus, minus = base.copy(), base.copy()
    plus[idx] += h
    minus[idx] -= h
    grad[idx] = (f(*args[:which], plus, *args[which + 1:]) -
                 f(*args[:which], minus, *args[which + 1:])) / (2 * h)
  return grad


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  clean = rng.normal(size=(B, C)) * 2
  adv = clean + rng.normal(size=(B, C))
  mid = (clean + adv) / 2 + 0.3 * rng.normal(size=(B, C))
  labels = rng.integers(0, C, size=B)
  return clean, adv, mid, labels


# ----------------------------------------------------------------------------
# Per-example functions.
# ----------------------------------------------------------------------------


def test_per_example_values(logits):
  clean, adv, _, y = logits
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  np.testing.assert_allclose(losses.cross_entropy(f32(clean), y), np_ce(clean, y),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.kl_divergence(f32(clean), f32(adv)),
                             np_kl(clean, adv), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses.margin(f32(clean), y), np_margin(clean, y),
                             rtol=1e-5, atol=1e-6)
  assert losses.cross_entropy(f32(clean), y).shape == (B,)


def test_kl_nonnegative_and_zero_on_equal(logits):
  clean, adv, _, _ = logits
  kl = losses.kl_divergence(jnp.asarray(clean), jnp.asarray(adv))
  assert np.all(np.asarray(kl) >= 0)
  np.testing.assert_allclose(losses.kl_divergence(jnp.asarray(clean),
                                                  jnp.asarray(clean)), 0, atol=1e-6)


def test_margin_bounds(logits):
  clean, _, _, y = logits
  m = np.asarray(losses.margin(jnp.asarray(clean), y))
  assert np.all(m <= 1) and np.all(m >= -1)
  assert np.all((m > 0) == (clean.argmax(-1) == y))


# ----------------------------------------------------------------------------
# Objectives: values and gradients (targets NOT detached, as the reference).
# ----------------------------------------------------------------------------

OBJECTIVES = {
    "trades": (lambda c, a, y: losses.trades_loss(c, a, y, 5.0),
               lambda c, a, y: np_trades(c, a, y, 5.0)),
    "mart": (lambda c, a, y: losses.mart_loss(c, a, y, 5.0),
             lambda c, a, y: np_mart(c, a, y, 5.0)),
    "bat_m1": (lambda c, a, y: losses.bat_loss(c, a[None], y, 5.0),
               lambda c, a, y: np_bat(c, [a], y, 5.0)),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_value_and_grads(name, logits):
  clean, adv, _, y = logits
  jax_fn, np_fn = OBJECTIVES[name]
  loss, aux = jax_fn(jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32), y)
  assert loss.shape == () and all(v.shape == () for v in aux.values())
  np.testing.assert_allclose(loss, np_fn(clean, adv, y), rtol=1e-5)
  g_clean, g_adv = jax.grad(lambda c, a: jax_fn(c, a, y)[0], argnums=(0, 1))(
      jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32))
  np.testing.assert_allclose(g_clean, numeric_grad(np_fn, [clean, adv, y], 0),
                             atol=2e-4)
  np.testing.assert_allclose(g_adv, numeric_grad(np_fn, [clean, adv, y], 1),
                             atol=2e-4)


def test_bat_two_bridges_value_and_grads(logits):
  clean, adv, mid, y = logits
  np_fn = lambda c, b1, b2, y: np_bat(c, [b1, b2], y, 5.0)
  jax_fn = lambda c, b1, b2: losses.bat_loss(c, jnp.stack([b1, b2]), y, 5.0)[0]
  args32 = [jnp.asarray(a, jnp.float32) for a in (clean, mid, adv)]
  np.testing.assert_allclose(jax_fn(*args32), np_fn(clean, mid, adv, y), rtol=1e-5)
  grads = jax.grad(jax_fn, argnums=(0, 1, 2))(*args32)
  for i, g in enumerate(grads):
    np.testing.assert_allclose(g, numeric_grad(np_fn, [clean, mid, adv, y], i),
                               atol=2e-4)
  # The middle bridge is a target AND a prediction: its gradient has both parts.
  assert np.abs(np.asarray(grads[1])).sum() > 1e-3


def test_standard_and_at(logits):
  clean, adv, _, y = logits
  np.testing.assert_allclose(losses.standard_loss(jnp.asarray(clean), y)[0],
                             np_ce(clean, y).mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.at_loss(jnp.asarray(adv), y)[0],
                             np_ce(adv, y).mean(), rtol=1e-5)


def test_bat_with_one_bridge_equals_trades(logits):
  clean, adv, _, y = logits
  c, a = jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32)
  bat, bat_aux = losses.bat_loss(c, a[None], y, 6.0)
  trades, trades_aux = losses.trades_loss(c, a, y, 6.0)
  # Different programs compute the same formula: equal to float rounding.
  assert float(bat) == pytest.approx(float(trades), rel=1e-6)
  assert float(bat_aux["kl"]) == pytest.approx(float(trades_aux["kl"]), rel=1e-6)
  g_bat = jax.grad(lambda c: losses.bat_loss(c, a[None], y, 6.0)[0])(c)
  g_trades = jax.grad(lambda c: losses.trades_loss(c, a, y, 6.0)[0])(c)
  np.testing.assert_allclose(g_bat, g_trades, rtol=1e-6, atol=1e-9)


def test_stop_gradient_target_option(logits):
  clean, adv, _, y = logits
  c, a = jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32)
  # With detached targets only CE's gradient reaches the clean logits.
  g = jax.grad(lambda c: losses.trades_loss(c, a, y, 5.0,
                                            stop_gradient_target=True)[0])(c)
  g_ce = jax.grad(lambda c: losses.standard_loss(c, y)[0])(c)
  np.testing.assert_allclose(g, g_ce, atol=1e-7)
  g_default = jax.grad(lambda c: losses.trades_loss(c, a, y, 5.0)[0])(c)
  assert np.abs(np.asarray(g_default - g_ce)).max() > 1e-3


def test_bat_rejects_missing_bridge_axis(logits):
  clean, adv, _, y = logits
  with pytest.raises(ValueError, match=r"\[m, B, C\]"):
    losses.bat_loss(jnp.asarray(clean), jnp.asarray(adv), y, 5.0)


# ----------------------------------------------------------------------------
# Label smoothing: the CE terms' targets (1 - s) * onehot + s / C.
# ----------------------------------------------------------------------------

S = 0.1


def test_smoothed_cross_entropy_is_the_ce_to_the_smoothed_target(logits):
  clean, _, _, y = logits
  for s in (0.0, S, 0.5):
    np.testing.assert_allclose(
        losses.cross_entropy(jnp.asarray(clean, jnp.float32), y, label_smoothing=s),
        np_smoothed_ce(clean, y, s), rtol=1e-5, atol=1e-6)
  # Its minimum is at p = the smoothed target: the gradient (p - target) vanishes there.
  target = (1 - S) * np.eye(C)[y] + S / C
  at_target = jax.grad(lambda z: losses.cross_entropy(z, y, S).sum())(
      jnp.asarray(np.log(target), jnp.float32))
  np.testing.assert_allclose(at_target, 0, atol=1e-6)


def test_zero_smoothing_is_the_plain_programs(logits):
  """s = 0.0 traces the very program of the call without it (so it is bitwise equal)."""
  clean, adv, _, y = logits
  c, a = jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32)
  pairs = [
      (lambda c, a: losses.cross_entropy(c, y),
       lambda c, a: losses.cross_entropy(c, y, label_smoothing=0.0)),
      (lambda c, a: losses.standard_loss(c, y), lambda c, a: losses.standard_loss(c, y, 0.0)),
      (lambda c, a: losses.at_loss(a, y), lambda c, a: losses.at_loss(a, y, 0.0)),
      (lambda c, a: losses.trades_loss(c, a, y, 5.0),
       lambda c, a: losses.trades_loss(c, a, y, 5.0, label_smoothing=0.0)),
      (lambda c, a: losses.mart_loss(c, a, y, 5.0),
       lambda c, a: losses.mart_loss(c, a, y, 5.0, label_smoothing=0.0)),
      (lambda c, a: losses.bat_loss(c, a[None], y, 5.0),
       lambda c, a: losses.bat_loss(c, a[None], y, 5.0, label_smoothing=0.0)),
  ]
  for plain, zero in pairs:
    assert str(jax.make_jaxpr(plain)(c, a)) == str(jax.make_jaxpr(zero)(c, a))
  smoothed = jax.make_jaxpr(lambda c: losses.cross_entropy(c, y, S))(c)
  assert str(smoothed) != str(jax.make_jaxpr(lambda c: losses.cross_entropy(c, y))(c))


SMOOTHED = {  # the CE term smoothed, every other term as in the plain objective
    "standard": (lambda c, a, y: losses.standard_loss(c, y, S),
                 lambda c, a, y: np_smoothed_ce(c, y, S).mean()),
    "at": (lambda c, a, y: losses.at_loss(a, y, S),
           lambda c, a, y: np_smoothed_ce(a, y, S).mean()),
    "trades": (lambda c, a, y: losses.trades_loss(c, a, y, 5.0, label_smoothing=S),
               lambda c, a, y: np_trades(c, a, y, 5.0) + (
                   np_smoothed_ce(c, y, S) - np_ce(c, y)).mean()),
    "mart": (lambda c, a, y: losses.mart_loss(c, a, y, 5.0, label_smoothing=S),
             lambda c, a, y: np_mart(c, a, y, 5.0) + (
                 np_smoothed_ce(a, y, S) - np_ce(a, y)).mean()),
    "bat_m2": (lambda c, a, y: losses.bat_loss(c, jnp.stack([(c + a) / 2, a]), y, 5.0,
                                               label_smoothing=S),
               lambda c, a, y: np_bat(c, [(c + a) / 2, a], y, 5.0) + (
                   np_smoothed_ce(c, y, S) - np_ce(c, y)).mean()),
}


@pytest.mark.parametrize("name", sorted(SMOOTHED))
def test_smoothed_objectives_value_and_grads(name, logits):
  clean, adv, _, y = logits
  jax_fn, np_fn = SMOOTHED[name]
  c, a = jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32)
  loss, aux = jax_fn(c, a, y)
  np.testing.assert_allclose(loss, np_fn(clean, adv, y), rtol=1e-5)
  ce_key = {"standard": "ce", "at": "adv_ce", "mart": "adv_ce"}.get(name, "ce")
  ce_logits = adv if name in ("at", "mart") else clean
  np.testing.assert_allclose(aux[ce_key], np_smoothed_ce(ce_logits, y, S).mean(), rtol=1e-5)
  grads = jax.grad(lambda c, a: jax_fn(c, a, y)[0], argnums=(0, 1))(c, a)
  for i, g in enumerate(grads):
    np.testing.assert_allclose(g, numeric_grad(np_fn, [clean, adv, y], i), atol=2e-4)


# ----------------------------------------------------------------------------
# Theorem 3: along a monotone path, the bridge sum never exceeds the direct KL.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_bridges", [1, 2, 3, 8])
def test_theorem3_binary_monotone_paths(num_bridges):
  rng = np.random.default_rng(num_bridges)
  batch = 256
  # p_y along the path: decreasing in t (Assumption 1), sampled at m + 1 points.
  p_true = -np.sort(-rng.uniform(0.001, 0.999, size=(batch, num_bridges + 1)), axis=1)
  logit = np.log(p_true) - np.log1p(-p_true)
  path = np.stack([logit, np.zeros_like(logit)], axis=-1)  # [B, m+1, 2], y = 0
  path = jnp.asarray(np.moveaxis(path, 1, 0), jnp.float32)  # [m+1, B, 2]
  labels = jnp.zeros(batch, jnp.int32)
  per_bridge = jax.vmap(losses.kl_divergence)(path[:-1], path[1:]).sum(0)
  direct = losses.kl_divergence(path[0], path[-1])
  assert np.all(np.asarray(per_bridge) <= np.asarray(direct) + 1e-6)
  # The batch-mean form used in training obeys the same inequality.
  bat_kl = losses.bat_loss(path[0], path[1:], labels, 1.0)[1]["kl"]
  trades_kl = losses.trades_loss(path[0], path[-1], labels, 1.0)[1]["kl"]
  assert float(bat_kl) <= float(trades_kl) + 1e-6
  if num_bridges > 1:
    assert float(bat_kl) < float(trades_kl)


def test_theorem3_multiclass_componentwise_monotone():
  # A mixture path p(t) = (1 - t) p0 + t p1 is monotone in every component.
  rng = np.random.default_rng(3)
  p0 = rng.dirichlet(np.ones(C), size=64)
  p1 = rng.dirichlet(np.ones(C), size=64)
  ts = np.linspace(0, 1, 5)
  path = jnp.asarray(np.log(np.stack([(1 - t) * p0 + t * p1 for t in ts])),
                     jnp.float32)
  bridged = jax.vmap(losses.kl_divergence)(path[:-1], path[1:]).sum(0)
  assert np.all(np.asarray(bridged) <= np.asarray(
      losses.kl_divergence(path[0], path[-1])) + 1e-6)


# ----------------------------------------------------------------------------
# The path and the import boundary.
# ----------------------------------------------------------------------------


def test_bridge_points():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(3, 4, 4, 1)), jnp.float32)
  x_adv = jnp.clip(x + 0.1 * jnp.sign(jnp.asarray(rng.normal(size=x.shape))), 0, 1)
  pts = losses.bridge_points(x, x_adv, 4)
  assert pts.shape == (4,) + x.shape
  for k in range(1, 5):
    np.testing.assert_allclose(pts[k - 1], x + k / 4 * (x_adv - x), atol=1e-6)
  np.testing.assert_array_equal(pts[-1], x_adv)
  # delta is a constant of the attack: no gradient flows into x_adv.
  g = jax.grad(lambda xa: losses.bridge_points(x, xa, 2).sum())(x_adv)
  np.testing.assert_array_equal(g, 0)
  with pytest.raises(ValueError, match="num_bridges"):
    losses.bridge_points(x, x_adv, 0)


def test_losses_import_no_flax():
  code = ("import sys, bat_jax.losses, bat_jax.attacks; "
          "bad = [m for m in sys.modules if m == 'flax' or m.startswith('flax.') "
          "or m.startswith('bat_jax.train') or m.startswith('optax')]; "
          "print(bad); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
