"""AutoAttack in JAX: APGD, FAB-T, Square and the ensemble.

Checked against NumPy references written from the reference package's logic
(DLR losses, the APGD step-size rule, the FAB L-inf projection), and on real
MNIST: every attack breaks an undefended MLP at eps = 0.3, and on an
adversarially trained one AutoAttack is at least as strong as PGD^50 x 10.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bat_jax import attacks, losses
from mnist_helpers import load_mnist, mlp_apply, mlp_init  # tests/ is on sys.path
# The package exports functions named like these modules, hence import_module.
apgd_lib = importlib.import_module("bat_jax.attacks.apgd")
aa_lib = importlib.import_module("bat_jax.attacks.autoattack")
fab_lib = importlib.import_module("bat_jax.attacks.fab")
square_lib = importlib.import_module("bat_jax.attacks.square")

EPS = 0.3          # the undefended model's radius
AT_EPS = 0.1       # the adversarially trained model's (a few hundred steps reach it)
TOL = 1e-6         # float32 rounding of x + clip(delta)


# ----------------------------------------------------------------------------
# Models and data.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
  return (load_mnist("train", 6000),
          load_mnist("test", 200))


def train(x, y, *, steps, eps=None, seed=0):
  """Adam on CE, or on CE at PGD-CE points (Madry AT) when ``eps`` is given."""
  params = mlp_init(jax.random.PRNGKey(seed), sizes=(784, 256, 10))
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, xb, yb, key):
    if eps is not None:
      xb = attacks.pgd(lambda z: mlp_apply(params, z), xb, yb, eps=eps,
                       step_size=eps / 4, num_steps=7, key=key)
    grads = jax.grad(
        lambda p: jnp.mean(losses.cross_entropy(mlp_apply(p, xb), yb)))(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for i in range(steps):
    j = (i * 128) % (x.shape[0] - 128)
    params, opt_state = step(params, opt_state, x[j:j + 128], y[j:j + 128],
                             jax.random.PRNGKey(i))
  return params


@pytest.fixture(scope="module")
def undefended(mnist):
  (x, y), _ = mnist
  return train(x, y, steps=300)


@pytest.fixture(scope="module")
def robust(mnist):
  (x, y), _ = mnist
  return train(x, y, steps=400, eps=AT_EPS)


@pytest.fixture
def fast_compile():
  """For tests that compile much and run little: XLA's optimisation passes
  dominate them on a CPU. (Module fixtures, like the trained models, are set
  up before this one, with the optimisations.)"""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def accuracy(params, x, y):
  return float(jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == y))


def assert_in_ball(x_adv, x, eps):
  assert x_adv.shape == x.shape
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + TOL
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


# Small budgets for the undefended model; jitted once per attack.
SMALL = {
    "apgd-ce": functools.partial(attacks.apgd, n_iter=20),
    "apgd-t": functools.partial(attacks.apgd_targeted, n_iter=20, n_target_classes=3),
    "fab-t": functools.partial(attacks.fab_targeted, n_iter=20, n_target_classes=3),
    "square": functools.partial(attacks.square, n_queries=300),
}


@functools.lru_cache(maxsize=None)
def small_attack(name):
  return jax.jit(lambda params, x, y, key, eps: SMALL[name](
      lambda z: mlp_apply(params, z), x, y, eps=eps, key=key))


# ----------------------------------------------------------------------------
# NumPy references.
# ----------------------------------------------------------------------------


def np_dlr(z, y):
  zs = np.sort(z, axis=1)
  rows = np.arange(len(y))
  others = z.copy()
  others[rows, y] = -np.inf
  return -(z[rows, y] - others.max(1)) / (zs[:, -1] - zs[:, -3] + 1e-12)


def np_targeted_dlr(z, y, t):
  zs = np.sort(z, axis=1)
  rows = np.arange(len(y))
  return -(z[rows, y] - z[rows, t]) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def np_mlp_ce_and_grad(params, x, y):
  """CE loss, logits and input gradient of a one-hidden-layer MLP, by hand."""
  (w1, b1), (w2, b2) = params
  pre = x @ w1 + b1
  z = np.maximum(pre, 0) @ w2 + b2
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  rows = np.arange(len(y))
  loss = -np.log(p[rows, y])
  dz = p.copy()
  dz[rows, y] -= 1
  return loss, z, ((dz @ w2.T) * (pre > 0)) @ w1.T


def np_apgd_run(params, x, y, x_start, eps, n_iter, rho=0.75):
  """APGD-CE (L-inf), one run, in the reference's terms: a loss history buffer,
  an oscillation count over the last k entries, k shrinking by 3% to >= 6%."""
  proj = lambda v: np.clip(np.clip(v, x - eps, x + eps), 0, 1)
  k = max(int(0.22 * n_iter), 1)
  k_min, k_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
  x_adv = x_start.copy()
  loss, z, grad = np_mlp_ce_and_grad(params, x_adv, y)
  acc = z.argmax(1) == y
  x_best, x_best_adv, grad_best, loss_best = x_adv.copy(), x_adv.copy(), grad.copy(), loss.copy()
  step = np.full(len(y), 2 * eps)[:, None]
  x_old = x_adv.copy()
  history = np.zeros((n_iter, len(y)))
  counter = 0
  best_at_check, reduced_at_check = loss_best.copy(), np.ones(len(y), bool)
  for i in range(n_iter):
    momentum_diff = x_adv - x_old
    x_old = x_adv.copy()
    a = 0.75 if i > 0 else 1.0
    z1 = proj(x_adv + step * np.sign(grad))
    x_adv = proj(x_adv + (z1 - x_adv) * a + momentum_diff * (1 - a))
    loss, z, grad = np_mlp_ce_and_grad(params, x_adv, y)
    wrong = z.argmax(1) != y
    acc &= ~wrong
    x_best_adv[wrong] = x_adv[wrong]
    history[i] = loss
    better = loss > loss_best
    x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
    counter += 1
    if counter == k:
      increases = sum((history[i - c] > history[i - c - 1]).astype(float) for c in range(k))
      reduce = (increases <= k * rho) | (~reduced_at_check & (best_at_check >= loss_best))
      reduced_at_check, best_at_check = reduce.copy(), loss_best.copy()
      step[reduce] /= 2.0
      x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
      k = max(k - k_decr, k_min)
      counter = 0
  return dict(x_best=x_best, loss_best=loss_best, correct=acc,
              x_best_adv=x_best_adv, step=step[:, 0])


def np_fab_targeted_run(params, x, y, target, n_iter, alpha_max=0.1, eta=1.05, beta=0.9):
  """FAB-T (L-inf) from the clean point: project the iterate and the clean point
  onto the linearised boundary z_t = z_y, mix, overshoot, back off on success."""
  (w1, b1), (w2, b2) = params
  rows = np.arange(len(y))
  best, best_norm, x1 = x.copy(), np.full(len(y), 1e10), x.copy()
  for _ in range(n_iter):
    pre = x1 @ w1 + b1
    z = np.maximum(pre, 0) @ w2 + b2
    diff = z[rows, target] - z[rows, y]
    dz = np.zeros_like(z)
    dz[rows, target], dz[rows, y] = 1.0, -1.0
    w = ((dz @ w2.T) * (pre > 0)) @ w1.T
    b = -diff + np.sum(w * x1, 1)
    d1, d2 = np_linf_projection(x1, w, b), np_linf_projection(x, w, b)
    a1 = np.maximum(np.abs(d1).max(1), 1e-8)
    a2 = np.maximum(np.abs(d2).max(1), 1e-8)
    alpha = np.clip(a1 / (a1 + a2), 0, alpha_max)[:, None]
    x1 = np.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0, 1)
    z = np.maximum(x1 @ w1 + b1, 0) @ w2 + b2
    adv = z.argmax(1) != y
    norm = np.abs(x1 - x).max(1)
    better = adv & (norm < best_norm)
    best[better], best_norm[better] = x1[better], norm[better]
    x1[adv] = x[adv] + (x1[adv] - x[adv]) * beta
  return best_norm, best


def np_linf_projection(t, w, b, iters=200):
  """Minimal-L-inf d with <w, t + d> = b, t + d in [0, 1] (corner move if out of
  reach), by bisection on lambda: d_i = move_i * min(lambda, room_i)."""
  out = []
  for ti, wi, bi in zip(t, w, b):
    gap = bi - wi @ ti
    direction = np.sign(wi) * np.sign(gap)             # move that shifts <w, x> towards b
    room = np.where(direction > 0, 1 - ti, np.where(direction < 0, ti, 0.0))
    reach = lambda lmbd: np.abs(wi) @ np.minimum(lmbd, room)
    if reach(room.max()) <= abs(gap):
      out.append(direction * room)
      continue
    lo, hi = 0.0, room.max()
    for _ in range(iters):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if reach(mid) < abs(gap) else (lo, mid)
    out.append(direction * np.minimum(hi, room))
  return np.array(out)


# ----------------------------------------------------------------------------
# Unit tests against the references.
# ----------------------------------------------------------------------------


def test_apgd_checkpoints_follow_spec():
  p = [0.0, 0.22]
  while len(p) < 9:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  spec = [int(round(100 * v)) for v in p]
  assert spec == [0, 22, 41, 57, 70, 80, 87, 93, 99]
  assert attacks.apgd_checkpoints(100) == spec
  assert attacks.apgd_checkpoints(10)[:3] == [0, 2, 3]


def test_dlr_losses_match_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(32, 10)) * 3
  y = rng.integers(0, 10, 32)
  t = (y + rng.integers(1, 10, 32)) % 10
  z[:4, 0] = z[:4].max(1) + 1.0   # some examples with the true class on top
  y[:4] = 0
  np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y)),
                             np_dlr(z, y), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      attacks.targeted_dlr_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(t)),
      np_targeted_dlr(z, y, t), rtol=1e-5, atol=1e-6)
  # Scale and shift invariance, the reason DLR is used.
  np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(3 * z + 5, jnp.float32), jnp.asarray(y)),
                             np_dlr(z, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["bisect", "sort"])
@pytest.mark.usefixtures("fast_compile")
def test_projection_linf_matches_numpy(method):
  rng = np.random.default_rng(1)
  n, dim = 64, 50
  t = rng.uniform(size=(n, dim))
  t[:, :10] = np.round(t[:, :10])                    # pixels at the box's faces
  w = rng.normal(size=(n, dim)) * (rng.uniform(size=(n, dim)) > 0.2)
  b = np.sum(w * t, 1) + rng.normal(size=n) * np.linspace(0.01, 15, n)  # near to out of reach
  d = np.asarray(attacks.projection_linf(jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32),
                                         jnp.asarray(b, jnp.float32), method=method))
  expected = np_linf_projection(t, w, b)
  np.testing.assert_allclose(d, expected, atol=2e-5)
  assert (t + d).min() >= -1e-6 and (t + d).max() <= 1 + 1e-6
  reachable = np.abs(np.sum(w * (t + expected), 1) - b) < 1e-6
  assert reachable.sum() > 10 and (~reachable).sum() > 3      # both cases covered
  np.testing.assert_allclose(np.sum(w * (t + d), 1)[reachable], b[reachable], atol=1e-3)


@pytest.mark.usefixtures("fast_compile")
def test_apgd_run_matches_numpy_reference():
  """Momentum, best-point tracking and both step-halving rules, step for step."""
  rng = np.random.default_rng(2)
  dim, n, n_iter, eps = 20, 128, 40, 0.15
  params = [(rng.normal(size=(dim, 16)) * 0.8, rng.normal(size=16) * 0.1),
            (rng.normal(size=(16, 5)), rng.normal(size=5) * 0.1)]
  x = rng.uniform(size=(n, dim))
  y = rng.integers(0, 5, n)
  u = rng.uniform(-1, 1, size=(n, dim))
  x_start = np.clip(x + eps * u / np.abs(u).max(1, keepdims=True), 0, 1)
  expected = np_apgd_run(params, x, y, x_start, eps, n_iter)
  with jax.enable_x64(True):
    jparams = jax.tree.map(jnp.asarray, params)
    logits_fn = lambda z: mlp_apply(jparams, z)
    yj = jnp.asarray(y)
    got = apgd_lib._apgd_single_run(
        logits_fn, jnp.asarray(x), yj, eps, jnp.asarray(x_start),
        lambda z: losses.cross_entropy(z, yj), n_iter, 0.75)
    got = jax.tree.map(np.asarray, got)
  # The rules actually fired: some but not all step sizes were halved, unevenly.
  assert len(set(expected["step"])) >= 3
  for name in ("x_best", "loss_best", "x_best_adv", "step"):
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
  np.testing.assert_array_equal(got["correct"], expected["correct"])


@pytest.mark.usefixtures("fast_compile")
def test_fab_run_matches_numpy_reference():
  """Projections, the bias towards the clean point, overshoot, backward step."""
  rng = np.random.default_rng(3)
  dim, n, n_iter = 20, 32, 30
  params = [(rng.normal(size=(dim, 16)), rng.normal(size=16) * 0.1),
            (rng.normal(size=(16, 5)), rng.normal(size=5) * 0.1)]
  x = rng.uniform(size=(n, dim))
  logits = np.maximum(x @ params[0][0] + params[0][1], 0) @ params[1][0] + params[1][1]
  y = logits.argmax(1)
  target = np.argsort(logits, 1)[:, -2]
  expected_norm, expected = np_fab_targeted_run(params, x, y, target, n_iter)
  with jax.enable_x64(True):
    jparams = jax.tree.map(jnp.asarray, params)
    norm, best = fab_lib._fab_single_run(
        lambda z: mlp_apply(jparams, z), jnp.asarray(x), jnp.asarray(y),
        jnp.asarray(target), jnp.asarray(x), n_iter, 0.1, 1.05, 0.9)
  found = expected_norm < 1e10
  assert 0 < found.sum() and float(np.median(expected_norm[found])) < 0.2
  np.testing.assert_allclose(np.asarray(norm), expected_norm, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(best), expected, atol=1e-7)


def test_square_schedule():
  p = lambda i, **kw: attacks.square_p_selection(i, p_init=0.8, **kw)
  assert [p(i) for i in (0, 10, 11, 50, 51, 200, 201, 4999)] == [
      0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 128]
  assert p(9000, n_queries=10000) == 0.8 / 512
  # Rescaled to the budget (the stand-alone default; AutoAttack does not rescale).
  assert p(26, n_queries=500, rescale_schedule=True) == 0.8 / 16
  sides = square_lib.square_sizes(5000, 28, 28)
  assert sides[0] == 25 and sides[11] == 18 and sides[-1] == 2


# ----------------------------------------------------------------------------
# Each attack on an undefended MLP (real MNIST, eps = 0.3).
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.usefixtures("fast_compile")
def test_attack_breaks_undefended_model_inside_ball(name, mnist, undefended):
  _, (x, y) = mnist
  assert accuracy(undefended, x, y) > 0.85
  x_adv = small_attack(name)(undefended, x, y, jax.random.PRNGKey(3), EPS)
  assert_in_ball(x_adv, x, EPS)
  assert accuracy(undefended, x_adv, y) <= 0.02
  # Same key, same result; examples not broken come back unchanged.
  again = small_attack(name)(undefended, x, y, jax.random.PRNGKey(3), EPS)
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(again))
  fooled = jnp.argmax(mlp_apply(undefended, x_adv), -1) != y
  assert bool(jnp.all(fooled | jnp.all(x_adv == x, axis=(1, 2, 3))))


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_random_start_depends_on_key(mnist, undefended):
  _, (x, y) = mnist
  a = small_attack("apgd-ce")(undefended, x, y, jax.random.PRNGKey(3), EPS)
  b = small_attack("apgd-ce")(undefended, x, y, jax.random.PRNGKey(4), EPS)
  assert float(jnp.mean(jnp.any(a != b, axis=(1, 2, 3)))) > 0.9


# ----------------------------------------------------------------------------
# AutoAttack on an adversarially trained MLP (real MNIST, eps = 0.1).
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_standard_autoattack_is_stronger_than_pgd(mnist, robust):
  """Full standard budgets: AA <= PGD^50 x 10 < clean, both far above 0."""
  _, (x, y) = mnist
  x, y = x[:100], y[:100]
  logits_fn = lambda z: mlp_apply(robust, z)
  key = jax.random.PRNGKey(5)
  x_adv, acc = jax.jit(lambda: attacks.autoattack(logits_fn, x, y, eps=AT_EPS, key=key))()
  acc = {k: float(v) for k, v in acc.items()}
  assert list(acc) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  assert acc["clean"] == pytest.approx(accuracy(robust, x, y))
  values = list(acc.values())
  assert all(a >= b for a, b in zip(values, values[1:]))
  assert_in_ball(x_adv, x, AT_EPS)
  assert accuracy(robust, x_adv, y) == pytest.approx(acc["square"])

  x_pgd = jax.jit(lambda: attacks.pgd(logits_fn, x, y, eps=AT_EPS, step_size=0.01,
                                      num_steps=50, key=key, num_restarts=10))()
  pgd_acc = accuracy(robust, x_pgd, y)
  assert acc["square"] <= pgd_acc < acc["clean"]
  assert acc["square"] >= 0.4


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_autoattack_attacks_only_the_remaining_examples(mnist, robust):
  """Chunked (robust examples gathered first) == masked == attacking the subset alone.

  Chunks of 16 and one batch of 48 are different XLA programs, which may
  round differently (a near-zero gradient component can change sign), so
  what is compared is what the attack guarantees, not bits: the robust flags
  (an example at a decision tie may flip: at most one here), and in every run
  each broken example's point lies in the ball and is misclassified while
  every other example comes back unchanged.
  """
  _, (x, y) = mnist
  x, y = x[:48], y[:48]
  logits_fn = lambda z: mlp_apply(robust, z)
  key = jax.random.PRNGKey(6)
  budget = dict(attacks=("apgd-ce", "apgd-t"), version="custom", apgd_iters=10,
                n_target_classes=2)
  run = jax.jit(lambda batch_size: attacks.autoattack_robust_flags(
      logits_fn, x, y, eps=AT_EPS, key=key, batch_size=batch_size, **budget),
      static_argnums=0)
  x_adv, flags = run(None)
  x_adv_chunked, flags_chunked = run(16)
  for name in flags:
    assert_flags_agree(flags[name], flags_chunked[name], name)
  for adv, stage_flags in ((x_adv, flags), (x_adv_chunked, flags_chunked)):
    broken = np.asarray(stage_flags["clean"] & ~stage_flags["apgd-t"])
    assert broken.sum() >= 3 and (~broken).sum() >= 3   # something to compare
    assert_in_ball(adv, x, AT_EPS)
    predicted = np.asarray(jnp.argmax(logits_fn(adv), -1))
    assert np.all(predicted[broken] != np.asarray(y)[broken])
    unchanged = np.asarray(jnp.all(adv == x, axis=(1, 2, 3)))
    assert np.all(unchanged[~broken])

  # APGD-T on just the examples APGD-CE left, with their own keys.
  left = np.flatnonzero(np.asarray(flags["apgd-ce"]))
  keys = apgd_lib.fold_in_each(apgd_lib.per_example_keys(key, x.shape[0]),
                               aa_lib.ATTACK_NAMES.index("apgd-t"))
  sub = attacks.apgd_targeted(logits_fn, x[left], y[left], eps=AT_EPS, key=keys[left],
                              n_iter=10, n_target_classes=2)
  still = jnp.argmax(logits_fn(sub), -1) == y[left]
  assert_flags_agree(still, np.asarray(flags["apgd-t"])[left], "apgd-t on the subset")


def assert_flags_agree(a, b, name, max_flips=1):
  """Per-example flags of two differently compiled runs: equal but for rare ties."""
  flips = int(np.sum(np.asarray(a) != np.asarray(b)))
  assert flips <= max_flips, f"{name}: {flips} of {np.size(a)} examples differ"


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_autoattack_on_colour_images_respects_constraints():
  """A random conv net on [B, 8, 8, 3]: every stage keeps the eps-ball and box."""
  key = jax.random.PRNGKey(7)
  kernel = jax.random.normal(key, (3, 3, 3, 8)) * 0.5
  dense = jax.random.normal(jax.random.fold_in(key, 1), (8 * 8 * 8, 10)) * 0.1

  def logits_fn(z):
    h = jax.lax.conv_general_dilated(z, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(h).reshape(z.shape[0], -1) @ dense

  x = jax.random.uniform(jax.random.fold_in(key, 2), (6, 8, 8, 3))
  y = jnp.argmax(logits_fn(x), -1)
  eps = 4 / 255
  x_adv, acc = jax.jit(lambda: attacks.autoattack(
      logits_fn, x, y, eps=eps, key=key, apgd_iters=5, n_target_classes=2,
      fab_iters=5, square_queries=50))()
  assert_in_ball(x_adv, x, eps)
  assert float(acc["clean"]) == 1.0
  broken = jnp.argmax(logits_fn(x_adv), -1) != y
  assert float(acc["square"]) == pytest.approx(1.0 - float(jnp.mean(broken)))
  x_sq = attacks.square(logits_fn, x, y, eps=eps, key=key, n_queries=50)
  assert_in_ball(x_sq, x, eps)


def test_bad_arguments_raise():
  f = lambda z: z.reshape(z.shape[0], -1)[:, :10]
  x, y = jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="loss"):
    attacks.apgd(f, x, y, eps=0.1, key=jax.random.PRNGKey(0), loss="kl")
  with pytest.raises(ValueError, match="custom"):
    attacks.autoattack(f, x, y, eps=0.1, key=jax.random.PRNGKey(0), attacks=("square",))
  with pytest.raises(TypeError, match="apgd_iterz"):
    attacks.autoattack(f, x, y, eps=0.1, key=jax.random.PRNGKey(0), apgd_iterz=3)
