"""AutoAttack in L2, the 'plus' and 'rand' versions, and EoT.

Each L2 attack is checked step by step against a NumPy float64 version
written from the algorithm (the reference ``auto-attack`` package's L2
APGD, FAB with its L2 hyperplane projection, and the L2 Square with its meta
patterns and per-window budget); on real MNIST every L2 attack stays in the
L2 ball and the box, breaks an undefended MLP at eps = 3 and leaves it
accurate at eps = 0.05. The L-inf attacks give the outputs recorded
in tests/linf_golden.py.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import linf_golden  # tests/ is on sys.path
from bat_jax import attacks, losses
from mnist_helpers import load_mnist, mlp_apply, mlp_init
# The package exports functions named like these modules, hence import_module.
apgd_lib = importlib.import_module("bat_jax.attacks.apgd")
common = importlib.import_module("bat_jax.attacks.common")
fab_lib = importlib.import_module("bat_jax.attacks.fab")
square_lib = importlib.import_module("bat_jax.attacks.square")

BIG_EPS = 3.0      # breaks an undefended MNIST MLP
TINY_EPS = 0.05    # changes almost nothing
SLACK = 1e-5       # float32 rounding of the L2 norm


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
  return (load_mnist("train", 4000),
          load_mnist("test", 100))


@pytest.fixture(scope="module")
def undefended(mnist):
  """An MLP trained with Adam on clean CE (200 steps)."""
  (x, y), _ = mnist
  params = mlp_init(jax.random.PRNGKey(0), sizes=(784, 256, 10))
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads = jax.grad(
        lambda p: jnp.mean(losses.cross_entropy(mlp_apply(p, xb), yb)))(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for i in range(200):
    j = (i * 128) % (x.shape[0] - 128)
    params, opt_state = step(params, opt_state, x[j:j + 128], y[j:j + 128])
  return params


@pytest.fixture
def fast_compile():
  """XLA's optimisation passes dominate these compile-heavy, run-light tests."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def accuracy(params, x, y):
  return float(jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == y))


def assert_in_l2_ball(x_adv, x, eps):
  assert x_adv.shape == x.shape
  norms = np.sqrt(np.sum(np.square(np.asarray(x_adv, np.float64) - np.asarray(x)).reshape(
      x.shape[0], -1), axis=1))
  assert norms.max() <= eps + SLACK, norms.max()
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


# ----------------------------------------------------------------------------
# NumPy references (float64).
# ----------------------------------------------------------------------------


def random_mlp(rng, dim, hidden, classes, scale=1.0):
  return [(rng.normal(size=(dim, hidden)) * scale, rng.normal(size=hidden) * 0.1),
          (rng.normal(size=(hidden, classes)), rng.normal(size=classes) * 0.1)]


def np_logits(params, x):
  (w1, b1), (w2, b2) = params
  return np.maximum(x.reshape(len(x), -1) @ w1 + b1, 0) @ w2 + b2


def np_logit_grads(params, x, cotangent):
  """Input gradient of ``sum(cotangent * logits)`` (rows independent)."""
  (w1, b1), (w2, _) = params
  pre = x.reshape(len(x), -1) @ w1 + b1
  return (((cotangent @ w2.T) * (pre > 0)) @ w1.T).reshape(x.shape)


def np_ce_and_grad(params, x, y):
  z = np_logits(params, x)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  rows = np.arange(len(y))
  dz = p.copy()
  dz[rows, y] -= 1
  return -np.log(p[rows, y]), z, np_logit_grads(params, x, dz)


def np_l2(v):
  return np.sqrt(np.sum(v.reshape(len(v), -1) ** 2, 1)).reshape((-1,) + (1,) * (v.ndim - 1))


def np_to_l2_ball(v, x, eps):
  """The reference's APGD-L2 projection: rescale delta to norm <= eps, then clip."""
  d = v - x
  return np.clip(x + d / (np_l2(d) + 1e-12) * np.minimum(eps, np_l2(d)), 0, 1)


def np_apgd_l2_run(params, x, y, x_start, eps, n_iter, rho=0.75):
  """APGD-CE (L2), one run: unit-L2 gradient steps of 2 eps with momentum 0.75,
  projection after each; the step halved and the best point restored at the
  checkpoints (oscillation over the last k steps, or no improvement)."""
  k = max(int(0.22 * n_iter), 1)
  k_min, k_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
  x_adv = x_start.copy()
  loss, z, grad = np_ce_and_grad(params, x_adv, y)
  acc = z.argmax(1) == y
  x_best, x_best_adv, grad_best, loss_best = x_adv.copy(), x_adv.copy(), grad.copy(), loss.copy()
  step = np.full((len(y), 1), 2 * eps)
  x_old = x_adv.copy()
  history = np.zeros((n_iter, len(y)))
  counter = 0
  best_at_check, reduced_at_check = loss_best.copy(), np.ones(len(y), bool)
  for i in range(n_iter):
    momentum_diff = x_adv - x_old
    x_old = x_adv.copy()
    a = 0.75 if i > 0 else 1.0
    z1 = np_to_l2_ball(x_adv + step * grad / (np_l2(grad) + 1e-12), x, eps)
    x_adv = np_to_l2_ball(x_adv + (z1 - x_adv) * a + momentum_diff * (1 - a), x, eps)
    loss, z, grad = np_ce_and_grad(params, x_adv, y)
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


def np_l2_projection(t, w, b, iters=100):
  """Minimal-L2 d with <w, t + d> = b and t + d in [0, 1] (to the faces if out of
  reach). KKT: d_i = -min(lmbd, r_i) w_i, r_i where coordinate i meets its face;
  lmbd by bisection, row by row. |w_i| < 1e-8 stays put."""
  c = np.sum(w * t, 1) - b
  w = w * np.where(c >= 0, 1.0, -1.0)[:, None]
  c = np.abs(c)[:, None]
  moving = np.abs(w) >= 1e-8
  safe = np.where(moving, w, 1.0)
  r = np.where(moving, np.where(w > 0, t / safe, (t - 1) / safe), 0.0)
  fall = lambda lmbd: np.sum(w ** 2 * np.minimum(lmbd, r), 1, keepdims=True)
  lo, hi = np.zeros_like(c), r.max(1, keepdims=True)
  for _ in range(iters):
    mid = (lo + hi) / 2
    short = fall(mid) < c
    lo, hi = np.where(short, mid, lo), np.where(short, hi, mid)
  lmbd = np.where(fall(r.max(1, keepdims=True)) < c, r.max(1, keepdims=True), hi)
  return np.where(moving, -np.minimum(lmbd, r) * w, 0.0)


def np_fab_run(params, x, y, target, x_start, n_iter, alpha_max=0.1, eta=1.05, beta=0.9):
  """FAB (L2), one run: project the iterate and the clean point onto the
  linearised boundary with ``target`` (None: the nearest class in
  |z_k - z_y| / ||grad||_2), mix with alpha <= alpha_max, overshoot by eta,
  step back by beta after a success; keep the smallest L2 success."""
  rows = np.arange(len(y))
  classes = params[1][0].shape[1]
  best, best_norm, x1 = x.copy(), np.full(len(y), 1e10), x_start.copy()
  for _ in range(n_iter):
    z = np_logits(params, x1)
    if target is None:
      grads = np.stack([np_logit_grads(params, x1, np.eye(classes)[[k] * len(y)])
                        for k in range(classes)], 1)                     # [B, K, D]
      df = z - z[rows, y][:, None]
      dg = grads - grads[rows, y][:, None]
      df[rows, y] = 1e10
      k = np.argmin(np.abs(df) / (1e-12 + np.sqrt((dg ** 2).sum(-1))), 1)
      diff, w = df[rows, k], dg[rows, k]
    else:
      dz = np.zeros_like(z)
      dz[rows, target], dz[rows, y] = 1.0, -1.0
      diff, w = z[rows, target] - z[rows, y], np_logit_grads(params, x1, dz)
    b = -diff + np.sum(w * x1, 1)
    d1, d2 = np_l2_projection(x1, w, b), np_l2_projection(x, w, b)
    a1 = np.maximum(np.sqrt((d1 ** 2).sum(1)), 1e-8)
    a2 = np.maximum(np.sqrt((d2 ** 2).sum(1)), 1e-8)
    alpha = np.clip(a1 / (a1 + a2), 0, alpha_max)[:, None]
    x1 = np.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0, 1)
    adv = np_logits(params, x1).argmax(1) != y
    dist = np.sqrt(((x1 - x) ** 2).sum(1))
    better = adv & (dist < best_norm)
    best[better], best_norm[better] = x1[better], dist[better]
    x1[adv] = x[adv] + (x1[adv] - x[adv]) * beta
  return best_norm, best


@functools.lru_cache(maxsize=None)
def np_meta(side):
  """The L2 Square's patch: on each half, pixel at Chebyshev distance d from the
  half's centre weighs sum_{k >= d} 1/(k+1)^2 (k up to the half's radius),
  unit L2 per half; + on top, - below; unit L2 overall."""
  def half(rows, cols):
    if rows == 0:
      return np.zeros((0, cols))
    cr, cc = rows // 2, cols // 2
    radius = max(cr, cc)
    dist = np.maximum(np.abs(np.arange(rows)[:, None] - cr), np.abs(np.arange(cols)[None] - cc))
    weight = np.array([sum(1 / (k + 1) ** 2 for k in range(d, radius + 1)) for d in dist.ravel()])
    weight = weight.reshape(rows, cols)
    return weight / np.sqrt((weight ** 2).sum())
  patch = np.concatenate([half(side // 2, side), -half(side - side // 2, side)])
  return patch / np.sqrt((patch ** 2).sum())


def np_square_l2_run(params, x, y, eps, init_draws, query_draws, sides):
  """Square (L2, margin loss) on NHWC images, with the attack's uniform draws:
  init_draws [B, windows, 1 + C] (transpose, signs), query_draws [Q, B, 5 + C]
  (window corners, second window corners, transpose, signs)."""
  n, h, w, c = x.shape
  rows = np.arange(n)

  def margin(z_img):
    z = np_logits(params, z_img)
    others = z.copy()
    others[rows, y] = -np.inf
    return z[rows, y] - others.max(1)

  s0 = h // 5
  first = (h - 5 * s0) // 2
  delta = np.zeros_like(x)
  for e in range(n):
    window = 0
    for a in range(h // s0):
      for b in range(w // s0):
        u = init_draws[e, window]
        patch = np_meta(s0).T if u[0] > 0.5 else np_meta(s0)
        top, left = first + a * s0, first + b * s0
        delta[e, top:top + s0, left:left + s0] += patch[..., None] * np.sign(2 * u[1:] - 1)
        window += 1
  x_best = np.clip(x + delta / (np_l2(delta) + 1e-12) * eps, 0, 1)
  margin_min = margin(x_best)
  loss_min = margin_min.copy()
  accepted = 0
  for i, s in enumerate(sides):
    to_fool = margin_min > 0
    x_new = x_best.copy()
    for e in range(n):
      u = query_draws[i, e]
      vh, vw, vh2, vw2 = (int(np.floor(u[j] * (ext - s))) for j, ext in enumerate((h, w, h, w)))
      d = x_best[e] - x[e]
      old = d[vh:vh + s, vw:vw + s]
      both = np.zeros((h, w, 1))
      both[vh:vh + s, vw:vw + s] = both[vh2:vh2 + s, vw2:vw2 + s] = 1
      budget = np.sqrt(max(eps ** 2 - (d ** 2).sum(), 0) / c + ((d * both) ** 2).sum((0, 1)))
      patch = np_meta(s).T if u[4] > 0.5 else np_meta(s)
      new = patch[..., None] * np.sign(2 * u[5:] - 1) + old / (
          1e-12 + np.sqrt((old ** 2).sum((0, 1))))
      new = new / (1e-12 + np.sqrt((new ** 2).sum((0, 1)))) * budget
      d[vh2:vh2 + s, vw2:vw2 + s] = 0
      d[vh:vh + s, vw:vw + s] = new
      x_new[e] = np.clip(x[e] + d / (np.sqrt((d ** 2).sum()) + 1e-12) * eps, 0, 1)
    m = margin(x_new)
    improved = m < loss_min
    loss_min = np.where(to_fool & improved, m, loss_min)
    accept = to_fool & (improved | (m <= 0))
    accepted += accept.sum()
    margin_min[accept], x_best[accept] = m[accept], x_new[accept]
  return x_best, margin_min, accepted


# ----------------------------------------------------------------------------
# Step-by-step comparisons with the references.
# ----------------------------------------------------------------------------


def jax_mlp(params):
  jparams = jax.tree.map(jnp.asarray, params)
  return lambda z: mlp_apply(jparams, z)


@pytest.mark.parametrize("method", ["bisect", "sort"])
@pytest.mark.usefixtures("fast_compile")
def test_projection_l2_matches_numpy(method):
  rng = np.random.default_rng(11)
  n, dim = 64, 50
  t = rng.uniform(size=(n, dim))
  t[:, :10] = np.round(t[:, :10])                    # pixels at the box's faces
  w = rng.normal(size=(n, dim)) * (rng.uniform(size=(n, dim)) > 0.2)
  b = np.sum(w * t, 1) + rng.normal(size=n) * np.linspace(0.01, 20, n)  # near to out of reach
  expected = np_l2_projection(t, w, b)
  d = np.asarray(attacks.projection_l2(jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32),
                                       jnp.asarray(b, jnp.float32), method=method))
  np.testing.assert_allclose(d, expected, atol=2e-5)
  assert (t + d).min() >= -1e-6 and (t + d).max() <= 1 + 1e-6
  reachable = np.abs(np.sum(w * (t + expected), 1) - b) < 1e-6
  assert reachable.sum() > 10 and (~reachable).sum() > 3      # both cases covered
  moved = (expected != 0).sum(1)
  at_face = ((np.abs(t + expected) < 1e-12) | (np.abs(t + expected - 1) < 1e-12)) & (expected != 0)
  assert (reachable & (at_face.sum(1) == 0)).sum() >= 3       # lambda below every face
  assert (reachable & (at_face.sum(1) > 0) & (at_face.sum(1) < moved)).sum() >= 3
  np.testing.assert_allclose(np.sum(w * (t + d), 1)[reachable], b[reachable], atol=1e-3)
  with jax.enable_x64(True):
    d64 = attacks.projection_l2(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b), method=method)
  np.testing.assert_allclose(np.asarray(d64), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.usefixtures("fast_compile")
def test_apgd_l2_run_matches_numpy_reference():
  """L2 start, normalised steps, momentum, projections and step halving, in float64."""
  rng = np.random.default_rng(12)
  dim, n, n_iter, eps = 20, 128, 40, 0.2
  params = random_mlp(rng, dim, 16, 5, scale=0.8)
  x = rng.uniform(size=(n, dim))
  y = np_logits(params, x).argmax(1)
  with jax.enable_x64(True):
    keys = common.per_example_keys(jax.random.PRNGKey(1), n)
    x_start = np.asarray(apgd_lib._start(keys, jnp.asarray(x), eps, "l2"))
    u = np.asarray(common.normal_each(keys, (dim,), jnp.float64))
    np.testing.assert_allclose(x_start, np.clip(x + eps * u / (np_l2(u) + 1e-12), 0, 1),
                               rtol=1e-12, atol=1e-15)
    yj = jnp.asarray(y)
    got = jax.jit(lambda: apgd_lib._apgd_single_run(
        jax_mlp(params), jnp.asarray(x), yj, eps, jnp.asarray(x_start),
        lambda z: losses.cross_entropy(z, yj), n_iter, 0.75, "l2"))()
    got = jax.tree.map(np.asarray, got)
  expected = np_apgd_l2_run(params, x, y, x_start, eps, n_iter)
  assert len(set(expected["step"])) >= 3                  # the halving rules fired unevenly
  assert 0 < (~expected["correct"]).sum() < n
  for name in ("x_best", "loss_best", "x_best_adv", "step"):
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
  np.testing.assert_array_equal(got["correct"], expected["correct"])
  assert np_l2(got["x_best"] - x).max() <= eps * (1 + 1e-12)


@pytest.mark.parametrize("targeted", [True, False])
@pytest.mark.usefixtures("fast_compile")
def test_fab_l2_run_matches_numpy_reference(targeted):
  """L2 projections, the bias towards the clean point, overshoot, backward step;
  FAB-T towards the 2nd class, FAB towards the nearest boundary."""
  rng = np.random.default_rng(13)
  dim, n, n_iter, eps = 20, 32, 30, 0.5
  params = random_mlp(rng, dim, 16, 5)
  x = rng.uniform(size=(n, dim))
  logits = np_logits(params, x)
  y = logits.argmax(1)
  target = np.argsort(logits, 1)[:, -2] if targeted else None
  with jax.enable_x64(True):
    keys = common.per_example_keys(jax.random.PRNGKey(2), n)
    x_start = np.asarray(fab_lib._random_start(keys, jnp.asarray(x), eps, "l2"))
    norm, best = jax.jit(lambda: fab_lib._fab_single_run(
        jax_mlp(params), jnp.asarray(x), jnp.asarray(y),
        None if target is None else jnp.asarray(target), jnp.asarray(x_start), n_iter,
        0.1, 1.05, 0.9, "l2"))()
  inside = np.all((x_start > 0) & (x_start < 1), 1)
  assert inside.sum() >= 3 and np.allclose(np_l2(x_start - x)[inside], eps / 2)
  expected_norm, expected = np_fab_run(params, x, y, target, x_start, n_iter)
  found = expected_norm < 1e10
  assert 0 < found.sum() and (expected_norm[found] < eps).sum() >= 3
  np.testing.assert_allclose(np.asarray(norm), expected_norm, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(best), expected, atol=1e-8)


def test_square_l2_meta_pattern_and_sizes():
  for side in (1, 2, 3, 5, 6, 9, 25):
    np.testing.assert_allclose(square_lib.meta_pattern(side), np_meta(side), atol=1e-12)
  sides = square_lib.square_sizes(5000, 28, 28, norm="l2")
  assert sides[0] == 25 and sides[11] == 19 and sides[-1] == 3
  assert np.all(sides % 2 == 1)
  assert list(square_lib.square_sizes(80, 10, 10, norm="l2")[[0, 11, 51]]) == [9, 7, 5]


@pytest.mark.usefixtures("fast_compile")
def test_square_l2_run_matches_numpy_reference():
  """The start's tiled meta patterns, both windows, the budget, acceptance."""
  rng = np.random.default_rng(14)
  n, h, w, c, eps, n_queries = 12, 10, 10, 2, 1.0, 80
  params = random_mlp(rng, h * w * c, 16, 5, scale=0.3)
  x = rng.uniform(size=(n, h, w, c))
  y = np_logits(params, x).argmax(1)
  sides = square_lib.square_sizes(n_queries, h, w, norm="l2")
  with jax.enable_x64(True):
    keys = common.per_example_keys(jax.random.PRNGKey(3), n)
    got, init_draws, query_draws = jax.tree.map(np.asarray, jax.jit(lambda: (
        square_lib._square_l2_single_run(
            jax_mlp(params), jnp.asarray(x), jnp.asarray(y), eps, keys,
            jnp.ones(n, bool), n_queries, 0.8, False, "margin"),
        # The draws the attack makes: the start's, then query i's.
        common.uniform_each(common.fold_in_each(keys, n_queries), (25, 1 + c),
                            jnp.float64),
        jax.vmap(lambda i: common.uniform_each(common.fold_in_each(keys, i), (5 + c,),
                                               jnp.float64))(jnp.arange(n_queries))))())
  expected, margin, accepted = np_square_l2_run(params, x, y, eps, init_draws, query_draws,
                                                sides)
  assert 0 < (margin <= 0).sum() < n and 20 < accepted < n * n_queries / 2
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-9, atol=1e-12)
  assert np_l2(expected - x).max() <= eps + 1e-12


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_linf_results_match_the_recorded_ones():
  """The L-inf attacks (default norm) give, in float64, the recorded outputs."""
  golden = np.load(linf_golden.GOLDEN)
  with jax.enable_x64(True):
    results = linf_golden.run_all(attacks)
  assert sorted(results) == sorted(golden.files)
  for name in golden.files:
    if golden[name].dtype == bool:
      np.testing.assert_array_equal(results[name], golden[name], err_msg=name)
    else:
      np.testing.assert_allclose(results[name], golden[name], rtol=1e-9, atol=1e-12,
                                 err_msg=name)
  flags = [golden[f"flags_{s}"].sum() for s in ("clean", "apgd-ce", "apgd-t")]
  assert flags[0] > flags[1] > flags[2] > 0            # the stages did something


# ----------------------------------------------------------------------------
# EoT for randomised models.
# ----------------------------------------------------------------------------


def noisy_mlp(params, sigma=0.3):
  """A randomised model: Gaussian noise on the input, one key per example."""
  return lambda z, keys: mlp_apply(params, z + sigma * common.normal_each(
      keys, z.shape[1:], z.dtype))


@pytest.mark.usefixtures("fast_compile")
def test_eot_gradient_is_the_mean_of_the_draws():
  rng = np.random.default_rng(15)
  dim, n, draws, sigma = 12, 6, 5, 0.3
  params = random_mlp(rng, dim, 16, 4)
  x, y = rng.uniform(size=(n, dim)), rng.integers(0, 4, n)
  with jax.enable_x64(True):
    jparams = jax.tree.map(jnp.asarray, params)
    keys = common.per_example_keys(jax.random.PRNGKey(4), n)
    yj = jnp.asarray(y)
    loss, correct, grad = attacks.eot_loss_and_grad(
        noisy_mlp(jparams, sigma), lambda z: losses.cross_entropy(z, yj), yj,
        jnp.asarray(x), keys, draws)
    noise = [sigma * np.asarray(common.normal_each(common.fold_in_each(keys, j), (dim,),
                                                   jnp.float64)) for j in range(draws)]
  per_draw = [np_ce_and_grad(params, x + e, y) for e in noise]
  np.testing.assert_allclose(np.asarray(grad), np.mean([g for _, _, g in per_draw], 0),
                             rtol=1e-10, atol=1e-14)
  last_loss, last_logits, _ = per_draw[-1]
  np.testing.assert_allclose(np.asarray(loss), last_loss, rtol=1e-10)
  np.testing.assert_array_equal(np.asarray(correct), last_logits.argmax(1) == y)
  assert np.abs(per_draw[0][2] - per_draw[1][2]).max() > 1e-3   # the draws differ


# ----------------------------------------------------------------------------
# Each L2 attack on real MNIST (undefended MLP).
# ----------------------------------------------------------------------------


SMALL_L2 = {
    "apgd-ce": functools.partial(attacks.apgd, n_iter=20),
    "apgd-t": functools.partial(attacks.apgd_targeted, n_iter=20, n_target_classes=3),
    "fab-t": functools.partial(attacks.fab_targeted, n_iter=20, n_target_classes=3),
    "fab": functools.partial(attacks.fab, n_iter=20),
    "square": functools.partial(attacks.square, n_queries=300),
}


@functools.lru_cache(maxsize=None)
def small_l2_attack(name):
  return jax.jit(lambda params, x, y, key, eps: SMALL_L2[name](
      lambda z: mlp_apply(params, z), x, y, eps=eps, key=key, norm="l2"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL_L2))
@pytest.mark.usefixtures("fast_compile")
def test_l2_attack_on_mnist(name, mnist, undefended):
  _, (x, y) = mnist
  clean = accuracy(undefended, x, y)
  assert clean > 0.85
  x_adv = small_l2_attack(name)(undefended, x, y, jax.random.PRNGKey(5), BIG_EPS)
  assert_in_l2_ball(x_adv, x, BIG_EPS)
  # Square is a random search: 300 queries leave 15% here (3,000 leave ~4%).
  assert accuracy(undefended, x_adv, y) <= (0.25 if name == "square" else 0.02)
  fooled = np.asarray(jnp.argmax(mlp_apply(undefended, x_adv), -1) != y)
  unchanged = np.asarray(jnp.all(x_adv == x, axis=(1, 2, 3)))
  assert np.all(fooled | unchanged)                   # not broken: the clean input
  x_tiny = small_l2_attack(name)(undefended, x, y, jax.random.PRNGKey(5), TINY_EPS)
  assert_in_l2_ball(x_tiny, x, TINY_EPS)
  assert accuracy(undefended, x_tiny, y) >= clean - 0.03


# ----------------------------------------------------------------------------
# The 'plus' and 'rand' versions.
# ----------------------------------------------------------------------------


def test_versions_follow_the_reference():
  plus, plus_settings = attacks.version_settings("plus")
  assert plus == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
  assert (plus_settings["apgd_restarts"], plus_settings["fab_untargeted_restarts"],
          plus_settings["fab_restarts"], plus_settings["apgd_targeted_restarts"],
          plus_settings["n_target_classes"], plus_settings["square_queries"]) == (
              5, 5, 1, 1, 9, 5000)
  rand, rand_settings = attacks.version_settings("rand")
  assert rand == ("apgd-ce", "apgd-dlr")
  assert (rand_settings["apgd_restarts"], rand_settings["eot_iter"]) == (1, 20)
  standard, standard_settings = attacks.version_settings("standard")
  assert standard == attacks.STANDARD_ATTACKS and standard_settings == attacks.STANDARD_SETTINGS
  with pytest.raises(ValueError, match="version"):
    attacks.version_settings("fast")


TINY_BUDGET = dict(apgd_iters=5, fab_iters=5, square_queries=20, n_target_classes=2)


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_plus_is_at_least_as_strong_as_apgd_ce(mnist, undefended):
  _, (x, y) = mnist
  x, y = x[:48], y[:48]
  logits_fn = lambda z: mlp_apply(undefended, z)
  key, eps = jax.random.PRNGKey(6), 1.0
  run = lambda **kw: jax.jit(lambda: attacks.autoattack(
      logits_fn, x, y, eps=eps, key=key, norm="l2", **TINY_BUDGET, **kw))()
  x_plus, acc_plus = run(version="plus")
  _, acc_ce = run(version="custom", attacks=("apgd-ce",))
  assert list(acc_plus) == ["clean", "apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
  assert_in_l2_ball(x_plus, x, eps)
  values = [float(v) for v in acc_plus.values()]
  assert all(a >= b for a, b in zip(values, values[1:]))
  assert float(acc_plus["fab-t"]) <= float(acc_ce["apgd-ce"]) < float(acc_ce["clean"])
  assert accuracy(undefended, x_plus, y) == pytest.approx(values[-1])


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_rand_on_a_randomised_model(mnist, undefended):
  """'rand' (EoT) on an MLP with input noise: ball, box, at least APGD-CE's strength."""
  _, (x, y) = mnist
  x, y = x[:48], y[:48]
  model = noisy_mlp(undefended, sigma=0.1)
  key, eps = jax.random.PRNGKey(7), 1.0
  run = lambda **kw: jax.jit(lambda: attacks.autoattack(
      model, x, y, eps=eps, key=key, norm="l2", stochastic=True, apgd_iters=5,
      eot_iter=3, **kw))()
  x_rand, acc_rand = run(version="rand")
  _, acc_ce = run(version="custom", attacks=("apgd-ce",))
  assert list(acc_rand) == ["clean", "apgd-ce", "apgd-dlr"]
  assert_in_l2_ball(x_rand, x, eps)
  assert float(acc_rand["clean"]) > 0.8
  assert float(acc_rand["apgd-dlr"]) <= float(acc_ce["apgd-ce"]) < float(acc_ce["clean"])


def test_bad_arguments_raise():
  f = lambda z: z.reshape(z.shape[0], -1)[:, :10]
  x, y, key = jnp.zeros((2, 6, 6, 1)), jnp.zeros((2,), jnp.int32), jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="norm"):
    attacks.apgd(f, x, y, eps=0.1, key=key, norm="l1")
  with pytest.raises(ValueError, match="norm"):
    attacks.autoattack(f, x, y, eps=0.1, key=key, norm="L2")
  with pytest.raises(ValueError, match="deterministic"):
    attacks.autoattack(lambda z, k: f(z), x, y, eps=0.1, key=key, version="plus",
                       stochastic=True)
  with pytest.raises(ValueError, match="custom"):
    attacks.autoattack(f, x, y, eps=0.1, key=key, version="rand", attacks=("apgd-ce",))
  with pytest.raises(ValueError, match="H >= 5"):
    attacks.square(f, jnp.zeros((2, 4, 4, 1)), y, eps=0.1, key=key, norm="l2")


def test_autoattack_options_accept_plus_and_rand():
  from bat_jax.evaluation.metrics import AutoAttackOptions
  plus = AutoAttackOptions(version="plus", settings={"apgd_iters": 10})
  assert plus.attack_names() == attacks.version_settings("plus")[0]
  assert plus.describe()["attacks"] == list(attacks.version_settings("plus")[0])
  assert plus.attack_settings() == dict(apgd_restarts=5, fab_untargeted_restarts=5,
                                        apgd_iters=10)
  rand = AutoAttackOptions(version="rand")
  assert rand.attack_names() == ("apgd-ce", "apgd-dlr")
  assert rand.attack_settings() == dict(apgd_restarts=1, eot_iter=20)
  assert AutoAttackOptions().attack_settings() == {}
  with pytest.raises(ValueError, match="plus"):
    AutoAttackOptions(version="strong").attack_names()
