"""Recorded L-inf AutoAttack outputs: the code the L-inf and L2 attacks share
must leave every L-inf result as it is.

``python tests/linf_golden.py`` (with the package to record on the path)
writes ``tests/data/linf_golden.npz``; ``test_attacks_l2.py`` runs the same
calls with the current package and compares, in float64.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "linf_golden.npz"
EPS = 0.06
SQUARE_EPS = 0.15   # where Square breaks some of the examples


def problem():
  """A random two-layer net on 8 images of 6 x 6 x 2 with 6 classes (float64)."""
  rng = np.random.default_rng(14)
  dim = 6 * 6 * 2
  params = [(rng.normal(size=(dim, 24)) * 0.7, rng.normal(size=24) * 0.1),
            (rng.normal(size=(24, 6)), rng.normal(size=6) * 0.1)]
  x = rng.uniform(size=(8, 6, 6, 2))
  (w1, b1), (w2, b2) = params
  y = (np.maximum(x.reshape(8, -1) @ w1 + b1, 0) @ w2 + b2).argmax(1)
  y[:2] = (y[:2] + 1) % 6                     # two examples misclassified
  return params, x, y


def run_all(attacks):
  """Every L-inf attack with small budgets, as one program; call under ``jax.enable_x64``.

  APGD-CE and FAB-T with two restarts (FAB-T's second from a random start),
  Square at a radius where it succeeds, and the standard AutoAttack chain.
  """
  params, x, y = problem()
  params = jax.tree.map(jnp.asarray, params)

  def logits_fn(z):
    h = jax.nn.relu(z.reshape(z.shape[0], -1) @ params[0][0] + params[0][1])
    return h @ params[1][0] + params[1][1]

  @jax.jit
  def run(x, y, key):
    common = dict(eps=EPS, key=key)
    out = {
        "apgd_ce": attacks.apgd(logits_fn, x, y, n_iter=12, n_restarts=2, **common),
        "fab_t": attacks.fab_targeted(logits_fn, x, y, n_iter=12, n_target_classes=2,
                                      n_restarts=2, **common),
        "square": attacks.square(logits_fn, x, y, n_queries=60, eps=SQUARE_EPS, key=key),
    }
    x_adv, flags = attacks.autoattack_robust_flags(
        logits_fn, x, y, apgd_iters=6, n_target_classes=2, fab_iters=6,
        square_queries=30, **common)
    out["autoattack"] = x_adv
    out.update({f"flags_{name}": robust for name, robust in flags.items()})
    return out

  out = run(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(7))
  return {name: np.asarray(value) for name, value in out.items()}


if __name__ == "__main__":
  from bat_jax import attacks as attacks_lib
  with jax.enable_x64(True):
    results = run_all(attacks_lib)
  np.savez_compressed(GOLDEN, **results)
  for name, value in results.items():
    print(name, value.shape, value.dtype, float(np.abs(value).sum()))
