"""FAB: the Fast Adaptive Boundary attack of AutoAttack (L-inf and L2).

FAB (Croce & Hein 2020) looks for the smallest perturbation that changes the
decision: at each step it linearises the boundary ``z_t - z_y = 0`` towards
a class ``t``, projects both the current iterate and the clean input onto
that hyperplane (inside the box [0, 1], minimal in the attack's norm), moves
to a convex combination of the two projections that leans towards the clean
point, overshoots by ``eta``, and after every success steps back towards the
clean input by ``beta``. An example counts as broken only if the smallest
misclassifying perturbation found has norm at most ``eps``.

This follows the authors' ``FABAttack_PT`` (``fab_base.py`` /
``fab_projections.py``). FAB-T (:func:`fab_targeted`) takes the 2nd .. 10th
most likely clean classes as ``t``, each with ``n_restarts`` runs on the
still-robust examples; untargeted FAB (:func:`fab`) takes, at every step, the
class whose linearised boundary is nearest (``|z_t - z_y| / ||grad||_*``,
``*`` the dual norm). The first run starts at the clean point, later runs at
a random point at distance ``eps / 2``.
"""

import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from bat_jax.attacks.common import (clean_robust, fold_in_each, lp_norm,
                                    normal_each, per_example, per_example_keys,
                                    predict, run_on_robust, sorted_class_index,
                                    uniform_each)
from bat_jax.attacks.l2 import projection_l2
from bat_jax.attacks.pgd import NORMS

Array = jax.Array
LogitsFn = Callable[[Array], Array]

FAB_MIN_STEP = 1e-8
FAB_NO_ADV = 1e10  # The "no adversarial found yet" norm of the reference.


PROJECTION_METHODS = ("bisect", "sort")
BISECTION_STEPS = 30


def projection_linf(points: Array, w: Array, b: Array,
                    method: str = "bisect") -> Array:
  """Smallest L-inf step ``d`` with ``<w, points + d> = b`` and ``points + d`` in [0, 1].

  Rows are independent: ``points, w`` are ``[N, D]``, ``b`` is ``[N]``. Every
  coordinate moves by at most ``lambda`` towards the box corner that moves
  ``<w, x>`` towards ``b``; the change reached, ``g(lambda) = -sum_i |w_i|
  min(lambda, room_i)``, is piecewise linear, and ``lambda`` solves
  ``g(lambda) = b`` exactly on the right piece. Where the hyperplane is out of
  reach inside the box, every coordinate moves all the way to the corner.

  ``method='sort'`` is the reference's ``projection_linf``: it sorts the rooms
  and binary-searches the piece over sorted positions. ``'bisect'`` (default)
  finds the same piece by bisection on ``lambda`` and then solves it exactly;
  it gives the same projection (to float rounding) without a sort, which XLA
  runs slowly on CPU (~100 ms for 400 x 784).
  """
  if method not in PROJECTION_METHODS:
    raise ValueError(f"projection_linf: method must be one of {PROJECTION_METHODS}; "
                     f"got {method!r}.")
  side = jnp.where(jnp.sum(w * points, axis=1) - b >= 0, 1.0, -1.0).astype(w.dtype)
  w = w * side[:, None]
  b = b * side
  nonzero = w != 0
  corner = (w < 0).astype(w.dtype)                        # the box corner to move to
  d = jnp.where(nonzero, corner - points, 0.0)             # the largest move
  room = corner - points * (2.0 * corner - 1.0)            # |largest move|
  b = b - jnp.sum(w * points, axis=1)                      # change needed (<= 0)
  b0 = jnp.sum(w * d, axis=1)                              # largest change (<= 0)
  abs_w = jnp.abs(w)
  total_w = jnp.sum(abs_w, axis=1)

  # lambda below every room: all coordinates move by lambda.
  change_at_min_room = -total_w * jnp.min(room, axis=1)
  below_all = b - change_at_min_room > 0
  lmbd_all = jnp.maximum(b / -total_w, 0.0)[:, None]
  # Reachable, with lambda between two rooms: (slope, offset) of g on that piece.
  bracketed = (b - b0 > 0) & ~below_all
  if method == "sort":
    slope, offset = _piece_by_sorting(room, abs_w, d, w, b, b0)
  else:
    slope, offset = _piece_by_bisection(room, abs_w, b)
  lmbd_piece = jnp.maximum((b - offset) / -slope, 0.0)[:, None]

  d_all = (2.0 * corner - 1.0) * lmbd_all
  d_piece = (jnp.minimum(lmbd_piece, d) * corner
             + jnp.maximum(-lmbd_piece, d) * (1.0 - corner))
  d = jnp.where(below_all[:, None], d_all, jnp.where(bracketed[:, None], d_piece, d))
  return jnp.where(nonzero, d, 0.0)


def _piece_by_bisection(room: Array, abs_w: Array, b: Array) -> Tuple[Array, Array]:
  """The piece of ``g`` holding the solution, found by bisection on ``lambda``.

  Returns ``(s, sb)`` with ``g(lambda) = sb - lambda * s`` there: ``s`` sums
  ``|w_i|`` over the coordinates not yet at their corner, ``sb`` the change of
  those that are.
  """
  def change(lmbd):
    return -jnp.sum(abs_w * jnp.minimum(lmbd[:, None], room), axis=1)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    short = change(mid) > b          # not enough change yet: lambda is larger
    return jnp.where(short, mid, lo), jnp.where(short, hi, mid)

  rows = room.shape[0]
  lo, _ = jax.lax.fori_loop(
      0, BISECTION_STEPS, halve,
      (jnp.zeros((rows,), room.dtype), jnp.max(room, axis=1)))
  # lo < lambda, so some coordinate with w != 0 is free (g still falls past lo);
  # a room inside (lo, lambda) would be off by at most lambda - lo.
  free = room > lo[:, None]
  slope = jnp.sum(jnp.where(free, abs_w, 0.0), axis=1)
  offset = -jnp.sum(jnp.where(free, 0.0, abs_w * room), axis=1)
  return slope, offset


def _piece_by_sorting(room, abs_w, d, w, b, b0) -> Tuple[Array, Array]:
  """The reference's search: sort the rooms, binary-search over sorted positions."""
  dim = w.shape[1]
  order = jnp.argsort(room, axis=1)                        # ascending room
  desc = order[:, ::-1]
  w_desc = jnp.take_along_axis(w, desc, axis=1)
  s = jnp.cumsum(jnp.abs(w_desc), axis=1)
  sb = jnp.cumsum(-w_desc * jnp.take_along_axis(d, desc, axis=1), axis=1) + b0[:, None]

  def search(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    coord = jnp.take_along_axis(order, (dim - 1 - mid)[:, None], axis=1)
    b_mid = (jnp.take_along_axis(sb, mid[:, None], axis=1)[:, 0]
             - jnp.take_along_axis(s, mid[:, None], axis=1)[:, 0]
             * jnp.take_along_axis(room, coord, axis=1)[:, 0])
    go_up = b - b_mid > 0
    return jnp.where(go_up, mid, lo), jnp.where(go_up, hi, mid)

  rows = w.shape[0]
  lo, _ = jax.lax.fori_loop(
      0, math.ceil(math.log2(dim)), search,
      (jnp.zeros((rows,), jnp.int32), jnp.full((rows,), dim - 1, jnp.int32)))
  return (jnp.take_along_axis(s, lo[:, None], axis=1)[:, 0],
          jnp.take_along_axis(sb, lo[:, None], axis=1)[:, 0])


def _project(norm: str, points: Array, w: Array, b: Array) -> Array:
  return projection_linf(points, w, b) if norm == "linf" else projection_l2(points, w, b)


def _fab_single_run(logits_fn: LogitsFn, x: Array, labels: Array,
                    targets: Optional[Array], x_start: Array, n_iter: int,
                    alpha_max: float, eta: float, beta: float,
                    norm: str = "linf") -> Tuple[Array, Array]:
  """One FAB run from ``x_start``; returns ``(smallest norm found, its example)``.

  ``targets`` ``[B]`` gives FAB-T; ``None`` the untargeted FAB, which takes
  the nearest linearised boundary at every step. The norm is ``1e10`` (and
  the example the clean input) where no misclassified point was found.
  """
  batch = x.shape[0]
  flat = lambda v: v.reshape(batch, -1)
  x0 = flat(x)
  rows = jnp.arange(batch)

  def targeted_boundary(x1):
    """``z_t - z_y`` at ``x1`` and its input gradient (the hyperplane's normal)."""
    def total(z):
      logits = logits_fn(z.reshape(x.shape))
      diff = (jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
              - jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0])
      return jnp.sum(diff), diff
    (_, diff), grad = jax.value_and_grad(total, has_aux=True)(x1)
    return diff, grad

  def nearest_boundary(x1):
    """The class ``k`` minimising ``|z_k - z_y| / ||grad (z_k - z_y)||_*``."""
    logits, vjp = jax.vjp(lambda z: logits_fn(z.reshape(x.shape)), x1)
    classes = logits.shape[-1]
    basis = jnp.eye(classes, dtype=logits.dtype)
    grads = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, logits.shape))[0])(basis)
    grads = jnp.moveaxis(grads, 0, 1)                                # [B, K, D]
    is_true = jax.nn.one_hot(labels, classes, dtype=bool)
    diffs = jnp.where(is_true, 1e10, logits - logits[rows, labels][:, None])
    normals = grads - grads[rows, labels][:, None, :]
    dual = (jnp.sum(jnp.abs(normals), axis=-1) if norm == "linf"
            else jnp.sqrt(jnp.sum(jnp.square(normals), axis=-1)))
    k = jnp.argmin(jnp.abs(diffs) / (1e-12 + dual), axis=1)
    return diffs[rows, k], normals[rows, k]

  boundary = nearest_boundary if targets is None else targeted_boundary

  def body(_, state):
    x1, best, best_norm = state
    diff, w = boundary(x1)
    b = -diff + jnp.sum(w * x1, axis=1)
    d = _project(norm, jnp.concatenate([x1, x0]), jnp.concatenate([w, w]),
                 jnp.concatenate([b, b]))
    d_iterate, d_clean = d[:batch], d[batch:]
    size = jnp.maximum(lp_norm(d, norm), FAB_MIN_STEP)
    alpha = jnp.clip(size[:batch] / (size[:batch] + size[batch:]), 0.0, alpha_max)
    alpha = alpha[:, None]
    x1 = jnp.clip((x1 + eta * d_iterate) * (1.0 - alpha)
                  + (x0 + eta * d_clean) * alpha, 0.0, 1.0)

    is_adv = predict(logits_fn, x1.reshape(x.shape)) != labels
    dist = lp_norm(x1 - x0, norm)
    better = is_adv & (dist < best_norm)
    best = jnp.where(better[:, None], x1, best)
    best_norm = jnp.where(better, dist, best_norm)
    x1 = jnp.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
    return x1, best, best_norm

  init = (flat(x_start), x0, jnp.full((batch,), FAB_NO_ADV, x.dtype))
  _, best, best_norm = jax.lax.fori_loop(0, n_iter, body, init)
  return best_norm, best.reshape(x.shape)


def _random_start(keys: Array, x: Array, eps, norm: str) -> Array:
  """``x + eps / 2 * u / ||u||``, ``u ~ U(-1, 1)`` (L-inf) or ``N(0, I)`` (L2), clipped."""
  u = (uniform_each(keys, x.shape[1:], x.dtype, -1.0, 1.0) if norm == "linf"
       else normal_each(keys, x.shape[1:], x.dtype))
  return jnp.clip(x + eps * u / per_example(lp_norm(u, norm), u) * 0.5, 0.0, 1.0)


def _fab(logits_fn, x, labels, eps, key, n_iter, n_target_classes, n_restarts,
         alpha_max, eta, beta, active, norm, targeted):
  """FAB-T (``targeted``) or FAB: the runs, each on the still-robust examples."""
  name = "fab_targeted" if targeted else "fab"
  if n_iter < 1 or n_restarts < 1:
    raise ValueError(f"{name} needs n_iter >= 1 and n_restarts >= 1; got "
                     f"n_iter={n_iter}, n_restarts={n_restarts}.")
  if norm not in NORMS:
    raise ValueError(f"{name}: norm must be one of {NORMS}; got {norm!r}.")
  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  clean_logits, robust = clean_robust(logits_fn, x, labels, active)
  num_classes = clean_logits.shape[-1]
  if targeted and not 1 <= n_target_classes <= num_classes - 1:
    raise ValueError(f"fab_targeted: n_target_classes must be in 1..{num_classes - 1}; "
                     f"got {n_target_classes}.")

  def run(r, _):
    targets = (sorted_class_index(clean_logits, 2 + r // n_restarts) if targeted
               else None)
    restart = r % n_restarts
    x_start = x if n_restarts == 1 else jax.lax.cond(
        restart > 0, lambda: _random_start(fold_in_each(keys, r), x, eps, norm),
        lambda: x)
    _, x_run = _fab_single_run(logits_fn, x, labels, targets, x_start, n_iter,
                               alpha_max, eta, beta, norm)
    # The reference's final check: misclassified and within the eps-ball.
    fooled = (predict(logits_fn, x_run) != labels) & (lp_norm(x_run - x, norm) <= eps)
    return fooled, x_run

  num_runs = n_target_classes * n_restarts if targeted else n_restarts
  x_adv, _ = run_on_robust(run, x, robust, num_runs)
  return jax.lax.stop_gradient(x_adv)


def fab_targeted(logits_fn: LogitsFn, x: Array, labels: Array, *, eps,
                 key: Array, n_iter: int = 100, n_target_classes: int = 9,
                 n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, active: Optional[Array] = None,
                 norm: str = "linf") -> Array:
  """FAB-T: minimum-norm targeted attack, counted as a success only within eps.

  Args:
    logits_fn: ``x -> logits``, batch first, inputs in [0, 1].
    x: clean inputs ``[B, ...]``; labels: ``[B]`` integers.
    eps: radius (may be traced): the success threshold, and the size
      (``eps / 2``) of the random start of restarts after the first.
    key: one PRNG key, or one per example (used only when ``n_restarts > 1``).
    n_iter, n_target_classes, n_restarts: static budget; target ``k`` is the
      class with the k-th highest clean logit (k = 2 .. n_target_classes + 1).
    alpha_max, eta, beta: FAB's bias towards the clean point, overshoot and
      backward step.
    active: optional ``[B]`` mask of examples to attack (default: all).
    norm: ``'linf'`` or ``'l2'``.

  Returns:
    ``[B, ...]``: the smallest adversarial example found where its norm is
    at most ``eps``, else the clean input; under ``stop_gradient``.
  """
  return _fab(logits_fn, x, labels, eps, key, n_iter, n_target_classes, n_restarts,
              alpha_max, eta, beta, active, norm, targeted=True)


def fab(logits_fn: LogitsFn, x: Array, labels: Array, *, eps, key: Array,
        n_iter: int = 100, n_restarts: int = 1, alpha_max: float = 0.1,
        eta: float = 1.05, beta: float = 0.9, active: Optional[Array] = None,
        norm: str = "linf") -> Array:
  """Untargeted FAB (AutoAttack 'plus'): the nearest boundary at every step.

  Each step needs the gradients of all the logits (one backward pass per
  class). Arguments and result as in :func:`fab_targeted`, without targets.
  """
  return _fab(logits_fn, x, labels, eps, key, n_iter, 1, n_restarts, alpha_max,
              eta, beta, active, norm, targeted=False)
