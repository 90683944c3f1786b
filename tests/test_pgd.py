"""FGSM and PGD: constraints, strength, restarts, compile-once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bat_jax import attacks, losses
from mnist_helpers import load_mnist, mlp_apply, mlp_init  # tests/ is on sys.path

EPS = 0.3


@pytest.fixture(scope="module")
def mnist():
  return (load_mnist("train", 4000),
          load_mnist("test", 256))


@pytest.fixture(scope="module")
def trained_mlp(mnist):
  """An undefended MLP trained with plain CE on 4,000 real MNIST digits."""
  (x, y), _ = mnist
  params = mlp_init(jax.random.PRNGKey(0))
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads = jax.grad(lambda p: losses.standard_loss(mlp_apply(p, xb), yb)[0])(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for i in range(300):
    j = (i * 128) % (x.shape[0] - 128)
    params, opt_state = step(params, opt_state, x[j:j + 128], y[j:j + 128])
  return params


def accuracy(params, x, y):
  return float(jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == y))


def mean_ce(params, x, y):
  return float(jnp.mean(losses.cross_entropy(mlp_apply(params, x), y)))


def assert_in_ball(x_adv, x, eps, norm="linf"):
  assert x_adv.shape == x.shape
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  delta = np.asarray(x_adv - x).reshape(x.shape[0], -1)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-6
  else:
    assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5


@pytest.mark.parametrize("objective", ["ce", "kl"])
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_box(trained_mlp, mnist, objective, start, norm):
  _, (x, y) = mnist
  eps = EPS if norm == "linf" else 2.0
  x_adv = attacks.pgd(lambda z: mlp_apply(trained_mlp, z), x[:64], y[:64], eps=eps,
                      step_size=eps / 4, num_steps=5, key=jax.random.PRNGKey(1),
                      objective=objective, start=start, norm=norm)
  assert_in_ball(x_adv, x[:64], eps, norm)
  assert float(jnp.abs(x_adv - x[:64]).max()) > 0.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_steps_match_numpy_float64(trained_mlp, mnist, norm):
  """PGD (CE, no random start) against NumPy float64, step by step: from bat_jax's
  iterate k, ascend along sign(g) (L-inf) or g / ||g||_2 (L2), project onto the
  ball, clip to [0, 1], and compare with bat_jax's iterate k + 1."""
  from test_autoattack import np_mlp_ce_and_grad  # pylint: disable=g-import-not-at-top
  _, (x, y) = mnist
  x, y = x[:64], y[:64]
  eps = EPS if norm == "linf" else 2.0
  step_size = eps / 4
  run = jax.jit(lambda k: attacks.pgd(lambda z: mlp_apply(trained_mlp, z), x, y, eps=eps,
                                      step_size=step_size, num_steps=k, start="none",
                                      objective="ce", norm=norm), static_argnums=0)
  params = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in trained_mlp]
  x0 = np.asarray(x, np.float64).reshape(len(y), -1)
  flat = lambda v: np.asarray(v, np.float64).reshape(len(y), -1)
  current = flat(run(0))
  np.testing.assert_array_equal(current, x0)
  for k in range(1, 5):
    loss, _, grad = np_mlp_ce_and_grad(params, current, np.asarray(y))
    if norm == "linf":
      delta = np.clip(current + step_size * np.sign(grad) - x0, -eps, eps)
    else:
      unit = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)
      delta = current + step_size * unit - x0
      delta *= np.minimum(1.0, eps / np.maximum(
          np.linalg.norm(delta, axis=1, keepdims=True), 1e-12))
    want, got = np.clip(x0 + delta, 0.0, 1.0), flat(run(k))
    assert np.abs(want - current).max() > 0.1 * step_size  # the step moved
    if norm == "linf":  # a float32 gradient's sign may differ where it is ~0
      assert np.mean(np.abs(got - want) > 1e-5) < 0.002, k
    else:
      # Where CE is small, float32's softmax - onehot cancels (p_y rounds to 1), so
      # the gradient's direction is only ~1e-3 exact there; elsewhere to ~1e-5 of the step.
      accurate = loss > 0.05
      assert accurate.sum() >= 16, k
      np.testing.assert_allclose(got[accurate], want[accurate], rtol=0, atol=2e-5,
                                 err_msg=f"step {k}")
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * step_size,
                                 err_msg=f"step {k}")
    current = got


@pytest.mark.parametrize("per_example_keys", [False, True])
def test_normal_start_is_tpgd_clipped_to_the_box(mnist, per_example_keys):
  # torchattacks' TPGD start: clip(x + 0.001 z, 0, 1), z ~ N(0, 1). The same z
  # is drawn here from the same key(s); the clip is done in NumPy.
  _, (x, y) = mnist
  x, y = x[:32], y[:32]
  key = jax.random.PRNGKey(3)
  if per_example_keys:
    key = jax.random.split(key, x.shape[0])
    z = np.stack([np.asarray(jax.random.normal(k, x.shape[1:])) for k in key])
  else:
    z = np.asarray(jax.random.normal(key, x.shape))
  unclipped = np.asarray(x, np.float64) + 0.001 * z.astype(np.float64)
  expected = np.clip(unclipped, 0.0, 1.0)
  assert (unclipped < 0).any()  # MNIST's black background: the clip matters
  start = np.asarray(attacks.random_start(key, x, EPS, "normal"))
  assert start.min() >= 0.0 and start.max() <= 1.0
  np.testing.assert_allclose(start, expected, rtol=0, atol=1e-6)
  # PGD with no step returns that start (projected: already inside the ball).
  x0 = attacks.pgd(lambda v: mlp_apply(mlp_init(jax.random.PRNGKey(0)), v), x, y,
                   eps=EPS, step_size=0.01, num_steps=0, key=key, objective="kl",
                   start="normal")
  np.testing.assert_allclose(np.asarray(x0), expected, rtol=0, atol=1e-6)


def test_fgsm_in_ball_and_hurts(trained_mlp, mnist):
  _, (x, y) = mnist
  logits_fn = lambda z: mlp_apply(trained_mlp, z)
  x_adv = attacks.fgsm(logits_fn, x, y, EPS)
  assert_in_ball(x_adv, x, EPS)
  assert mean_ce(trained_mlp, x_adv, y) > mean_ce(trained_mlp, x, y)


def test_pgd_raises_loss_over_fgsm_and_breaks_undefended_model(trained_mlp, mnist):
  _, (x, y) = mnist
  logits_fn = lambda z: mlp_apply(trained_mlp, z)
  assert accuracy(trained_mlp, x, y) > 0.85
  x_fgsm = attacks.fgsm(logits_fn, x, y, EPS)
  x_pgd = attacks.pgd(logits_fn, x, y, eps=EPS, step_size=0.02, num_steps=20,
                      key=jax.random.PRNGKey(0))
  assert mean_ce(trained_mlp, x_pgd, y) > mean_ce(trained_mlp, x_fgsm, y)
  assert accuracy(trained_mlp, x_pgd, y) <= 0.02


def test_kl_objective_raises_kl(trained_mlp, mnist):
  _, (x, y) = mnist
  logits_fn = lambda z: mlp_apply(trained_mlp, z)
  clean = logits_fn(x)
  key = jax.random.PRNGKey(0)
  x_start = attacks.pgd(logits_fn, x, y, eps=0.1, step_size=0.01, num_steps=0,
                        key=key, objective="kl", start="normal")
  x_adv = attacks.pgd(logits_fn, x, y, eps=0.1, step_size=0.01, num_steps=10,
                      key=key, objective="kl", start="normal")
  kl = lambda z: float(jnp.mean(losses.kl_divergence(clean, logits_fn(z))))
  assert kl(x_adv) > 10 * kl(x_start)


def test_restarts_keep_each_examples_worst_case(trained_mlp, mnist):
  _, (x, y) = mnist
  logits_fn = lambda z: mlp_apply(trained_mlp, z)
  key = jax.random.PRNGKey(7)
  kwargs = dict(eps=0.08, step_size=0.02, num_steps=3)
  fooled_any = np.zeros(x.shape[0], bool)
  for i in range(4):
    single = attacks.pgd(logits_fn, x, y, key=jax.random.fold_in(key, i), **kwargs)
    fooled_any |= np.asarray(jnp.argmax(logits_fn(single), -1) != y)
  multi = attacks.pgd(logits_fn, x, y, key=key, num_restarts=4, **kwargs)
  fooled_multi = np.asarray(jnp.argmax(logits_fn(multi), -1) != y)
  # One program with 4 restarts vs 4 programs: rounding may differ, so an
  # example at a decision tie may flip (at most one of the batch).
  assert np.sum(fooled_multi != fooled_any) <= 1
  # The restarts must matter on this setting, or the test checks nothing.
  first = attacks.pgd(logits_fn, x, y, key=jax.random.fold_in(key, 0), **kwargs)
  assert fooled_any.sum() > np.sum(np.asarray(jnp.argmax(logits_fn(first), -1) != y))
  assert_in_ball(multi, x, 0.08)


@pytest.mark.slow
def test_pgd_compiles_once_per_shape(trained_mlp, mnist):
  _, (x, y) = mnist

  @jax.jit
  @chex.assert_max_traces(n=2)
  def attack(params, x, y, key):
    return attacks.pgd(lambda z: mlp_apply(params, z), x, y, eps=EPS,
                       step_size=0.02, num_steps=10, key=key)

  for i in range(3):  # same shape, new data and key: no retrace
    attack(trained_mlp, x[i:i + 32], y[i:i + 32], jax.random.PRNGKey(i))
  attack(trained_mlp, x[:16], y[:16], jax.random.PRNGKey(0))  # new shape: one trace
  with pytest.raises(AssertionError):
    attack(trained_mlp, x[:8], y[:8], jax.random.PRNGKey(0))  # a third shape


@pytest.mark.slow
def test_result_is_constant_to_the_trainer(trained_mlp, mnist):
  _, (x, y) = mnist

  def loss_through_attack(params):
    x_adv = attacks.pgd(lambda z: mlp_apply(params, z), x[:8], y[:8], eps=EPS,
                        step_size=0.1, num_steps=2, key=jax.random.PRNGKey(0))
    return jnp.sum(x_adv)

  grads = jax.grad(loss_through_attack)(trained_mlp)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_bad_arguments_are_named(trained_mlp, mnist):
  _, (x, y) = mnist
  f = lambda z: mlp_apply(trained_mlp, z)
  with pytest.raises(ValueError, match="objective"):
    attacks.pgd(f, x, y, eps=EPS, step_size=0.1, num_steps=1,
                key=jax.random.PRNGKey(0), objective="hinge")
  with pytest.raises(ValueError, match="key"):
    attacks.pgd(f, x, y, eps=EPS, step_size=0.1, num_steps=1)
  with pytest.raises(ValueError, match="norm"):
    attacks.pgd(f, x, y, eps=EPS, step_size=0.1, num_steps=1,
                key=jax.random.PRNGKey(0), norm="l1")
