"""L2 geometry of AutoAttack: the eps-ball ∩ [0, 1] and FAB's hyperplane projection.

Written after the reference ``auto-attack`` package (``autopgd_base.py``,
``fab_projections.py``): APGD's L2 start and projection, and the smallest L2
step onto a hyperplane inside the box [0, 1].
"""

import jax
import jax.numpy as jnp

from bat_jax.attacks.common import l2_norm, normal_each, per_example

Array = jax.Array

NORM_EPS = 1e-12         # the reference's guard in x / (||x|| + 1e-12)
FROZEN_W = 1e-8          # |w_i| below this: coordinate i does not move
PROJECTION_METHODS = ("bisect", "sort")
BISECTION_STEPS = 30


def normalize_l2(v: Array) -> Array:
  """``v / (||v||_2 + 1e-12)`` per example."""
  return v / (per_example(l2_norm(v), v) + NORM_EPS)


def project_l2(x_adv: Array, x: Array, eps) -> Array:
  """Onto the L2 eps-ball around ``x``, then into [0, 1] (APGD-L2's projection).

  ``delta / (||delta|| + 1e-12) * min(eps, ||delta||)``, then clipped. The clip
  moves every coordinate towards ``x`` (which lies in [0, 1]), so the result
  stays in the ball.
  """
  delta = x_adv - x
  radius = jnp.minimum(eps, per_example(l2_norm(delta), delta))
  return jnp.clip(x + normalize_l2(delta) * radius, 0.0, 1.0)


def l2_start(keys: Array, x: Array, eps) -> Array:
  """``x + eps * u / ||u||_2``, ``u ~ N(0, I)`` per example, clipped to [0, 1]."""
  u = normal_each(keys, x.shape[1:], x.dtype)
  return jnp.clip(x + eps * normalize_l2(u), 0.0, 1.0)


# --------------------------------------------------------------------------
# FAB: the smallest L2 step onto a hyperplane, inside the box.
# --------------------------------------------------------------------------


def projection_l2(points: Array, w: Array, b: Array, method: str = "bisect") -> Array:
  """Smallest L2 step ``d`` with ``<w, points + d> = b`` and ``points + d`` in [0, 1].

  Rows are independent: ``points, w`` are ``[N, D]``, ``b`` is ``[N]``. With
  ``c = |<w, points> - b|`` and ``w`` signed so that ``<w, d>`` must fall by
  ``c``, the solution is ``d_i = -min(lambda, r_i) w_i``: every coordinate
  moves along ``-w`` until it reaches a face of the box, at ``lambda = r_i``.
  The change ``g(lambda) = -sum_i w_i^2 min(lambda, r_i)`` is piecewise linear
  and decreasing; ``lambda`` solves ``g(lambda) = -c`` exactly on its piece.
  Where the hyperplane is out of reach inside the box, every coordinate goes
  to its face. Coordinates with ``|w_i| < 1e-8`` do not move.

  ``method='sort'`` finds the piece as the reference does, over the sorted
  ``r``; ``'bisect'`` (default) by bisection on ``lambda`` (no sort, which XLA
  runs slowly on CPU), then solves it exactly: the same projection to float
  rounding.
  """
  if method not in PROJECTION_METHODS:
    raise ValueError(f"projection_l2: method must be one of {PROJECTION_METHODS}; "
                     f"got {method!r}.")
  c = jnp.sum(w * points, axis=1) - b
  side = jnp.where(c >= 0, 1.0, -1.0).astype(w.dtype)
  w = w * side[:, None]
  c = c * side                                             # >= 0: the fall needed
  moving = jnp.abs(w) >= FROZEN_W
  safe_w = jnp.where(moving, w, 1.0)
  # Where each coordinate meets its face: t / w for w > 0, (t - 1) / w for w < 0.
  r = jnp.where(moving, jnp.maximum(points / safe_w, (points - 1.0) / safe_w), 0.0)
  w2 = jnp.where(moving, jnp.square(w), 0.0)
  at_faces = -r * w                                        # the largest move
  out_of_reach = jnp.sum(w * at_faces, axis=1) + c > 0
  if method == "sort":
    lmbd = _lambda_by_sorting(r, w2, moving, c)
  else:
    lmbd = _lambda_by_bisection(r, w2, moving, c)
  d = -jnp.minimum(lmbd[:, None], r) * w
  d = jnp.where(out_of_reach[:, None], at_faces, d)
  return jnp.where(moving, d, 0.0)


def _solve_piece(r: Array, w2: Array, free: Array, c: Array) -> Array:
  """``lambda`` with ``g(lambda) = -c`` when exactly the ``free`` coordinates move."""
  slope = jnp.sum(jnp.where(free, w2, 0.0), axis=1)
  stopped = jnp.sum(jnp.where(free, 0.0, w2 * r), axis=1)
  return jnp.maximum((c - stopped) / jnp.where(slope > 0, slope, 1.0), 0.0)


def _lambda_by_bisection(r, w2, moving, c) -> Array:
  def change(lmbd):
    return -jnp.sum(w2 * jnp.minimum(lmbd[:, None], r), axis=1)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    short = change(mid) > -c           # not enough change yet: lambda is larger
    return jnp.where(short, mid, lo), jnp.where(short, hi, mid)

  lo, _ = jax.lax.fori_loop(0, BISECTION_STEPS, halve,
                            (jnp.zeros_like(c), jnp.max(r, axis=1)))
  # lo < lambda: the coordinates with r > lo still move on lambda's piece
  # (a face inside (lo, lambda) would be off by at most lambda - lo).
  return _solve_piece(r, w2, moving & (r > lo[:, None]), c)


def _lambda_by_sorting(r, w2, moving, c) -> Array:
  """The reference's way: ``g`` at every sorted face; the last one above ``-c``."""
  big = jnp.where(moving, r, jnp.inf)                      # frozen ones last
  order = jnp.argsort(big, axis=1)
  r_sorted = jnp.take_along_axis(r, order, axis=1)
  w2_sorted = jnp.take_along_axis(w2, order, axis=1)
  still_free = jnp.sum(w2, axis=1, keepdims=True) - jnp.cumsum(w2_sorted, axis=1)
  g_at_faces = -jnp.cumsum(w2_sorted * r_sorted, axis=1) - r_sorted * still_free
  moving_sorted = jnp.take_along_axis(moving, order, axis=1)
  # g falls with lambda: the faces passed before reaching -c are a prefix.
  passed = jnp.sum(moving_sorted & (g_at_faces > -c[:, None]), axis=1)
  rank = jnp.argsort(order, axis=1)                        # position of each coordinate
  return _solve_piece(r, w2, moving & (rank >= passed[:, None]), c)
