"""APGD: the step-size-free PGD of AutoAttack (Croce & Hein 2020; docs/ALGORITHMS.md section 2).

``apgd`` maximises the cross-entropy or the DLR loss; ``apgd_targeted`` (APGD-T)
maximises the targeted DLR loss towards the 2nd, 3rd, ... most likely clean
classes. Both follow the authors' PyTorch ``auto-attack`` package
(``autopgd_base.py``) step for step, in the L-inf or the L2 norm:

  * start ``x + eps * u / ||u||`` with ``u ~ U(-1, 1)`` (L-inf) or
    ``u ~ N(0, I)`` (L2), clipped to [0, 1];
  * step size ``2 eps``, momentum 0.75 (1.0 on the first iteration); the step
    is ``sign(g)`` (L-inf) or ``g / ||g||_2`` (L2), and every iterate is
    projected onto the eps-ball, then into [0, 1];
  * checkpoints after 22, 41, 57, 70, 80, 87, 93, 99 of 100 iterations, where an
    example halves its step size and restarts from its best point if its loss
    rose in at most ``rho`` of the steps since the last checkpoint, or if its
    step size was not halved at the last checkpoint and its best loss has not
    improved since;
  * the last iterate that misclassifies is the adversarial example.

For randomised models (``stochastic=True``: ``logits_fn(x, keys)``, one key
per example) each gradient is the average over ``eot_iter`` draws
(Expectation over Transformation), as the reference's ``eot_iter``.

Each example's computation depends only on its own input, label and key (one
key per example, derived from the given key by example index unless a batch of
keys is given), so attacking a masked subset of a batch gives exactly what
attacking that subset alone would. Examples that are not broken are returned
unchanged (the clean input), as the reference does.
"""

from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp

from bat_jax import losses
# The common helpers are also reachable from here (code that imports them so).
from bat_jax.attacks.common import (clean_robust, fixed_draw, fold_in_each,  # noqa: F401
                                    linf_norm, per_example, per_example_keys,
                                    predict, run_on_robust, sorted_class_index,
                                    uniform_each)
from bat_jax.attacks.l2 import l2_start, normalize_l2, project_l2
from bat_jax.attacks.pgd import NORMS, project

Array = jax.Array
LogitsFn = Callable[..., Array]

APGD_LOSSES = ("ce", "dlr")
DLR_EPS = 1e-12


# --------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------


def dlr_loss(logits: Array, labels: Array) -> Array:
  """Difference of logits ratio ``-(z_y - max_{j!=y} z_j) / (z_(1) - z_(3) + 1e-12)``, ``[B]``.

  Shift- and scale-invariant in the logits, so it cannot be defeated by
  rescaling them (``z_(k)`` is the k-th largest logit).
  """
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  is_true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  best_other = jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)
  return -(z_y - best_other) / (z_sorted[:, -1] - z_sorted[:, -3] + DLR_EPS)


def targeted_dlr_loss(logits: Array, labels: Array, targets: Array) -> Array:
  """Targeted DLR ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12)``, ``[B]``."""
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (
      z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + DLR_EPS)


# --------------------------------------------------------------------------
# The step-size schedule.
# --------------------------------------------------------------------------


def _checkpoint_lengths(n_iter: int) -> Tuple[int, int, int]:
  """(first interval, minimum interval, decrement), as integers like the reference."""
  return (max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1),
          max(int(0.03 * n_iter), 1))


def apgd_checkpoints(n_iter: int = 100) -> List[int]:
  """Iteration counts after which the step size may be halved, with a leading 0.

  ``[0, 22, 41, 57, 70, 80, 87, 93, 99]`` for 100 iterations: the SPEC's
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` computed, as in the
  reference, with integer interval lengths (22, then 3 fewer each time, at least 6).
  """
  first, minimum, decrement = _checkpoint_lengths(n_iter)
  checkpoints, done, length = [0], 0, first
  while done + length <= n_iter:
    done += length
    checkpoints.append(done)
    length = max(length - decrement, minimum)
  return checkpoints


# --------------------------------------------------------------------------
# Gradients, for deterministic and randomised models.
# --------------------------------------------------------------------------


def _loss_and_grad(logits_fn: LogitsFn, loss_fn: Callable[[Array], Array],
                   labels: Array, x_adv: Array) -> Tuple[Array, Array, Array]:
  """``(loss [B], classified correctly [B], input gradient of the summed loss)``."""
  def total(z):
    logits = logits_fn(z)
    loss = loss_fn(logits)
    return jnp.sum(loss), (loss, logits)
  (_, (loss, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
  return loss, jnp.argmax(logits, axis=-1) == labels, grad


def eot_loss_and_grad(logits_fn: LogitsFn, loss_fn: Callable[[Array], Array],
                      labels: Array, x_adv: Array, keys: Array,
                      eot_iter: int) -> Tuple[Array, Array, Array]:
  """Expectation over Transformation for a randomised ``logits_fn(x, keys)``.

  The gradient is the mean over ``eot_iter`` draws, draw ``j`` made with
  ``fold_in(keys[b], j)`` for example ``b``; the loss and the correctness are
  the last draw's, as in the reference.
  """
  def one_draw(j):
    draw_keys = fold_in_each(keys, j)
    return _loss_and_grad(lambda z: logits_fn(z, draw_keys), loss_fn, labels, x_adv)

  def body(j, carry):
    loss, correct, grad = one_draw(j)
    return loss, correct, carry[2] + grad

  loss, correct, grad = jax.lax.fori_loop(1, eot_iter, body, one_draw(0))
  return loss, correct, grad / eot_iter


# --------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------


def _apgd_single_run(logits_fn: LogitsFn, x: Array, labels: Array, eps,
                     x_start: Array, loss_fn: Callable[[Array], Array],
                     n_iter: int, rho: float, norm: str = "linf",
                     eot_iter: int = 1, draw_keys: Optional[Array] = None) -> dict:
  """One APGD run from ``x_start``; returns its final state.

  The state holds ``correct`` (no iterate misclassified), ``x_best_adv`` (the
  last misclassified iterate), ``x_best`` / ``loss_best`` (highest loss) and
  the per-example ``step`` size, among others.

  ``loss_fn(logits) -> [B]`` is maximised. Mirrors the reference's
  ``attack_single_run`` (L-inf and L2), including its bookkeeping: the
  loss-increase count compares each step's loss with the previous step's
  (with 0 before the first step), ``x_best`` / ``grad_best`` follow the
  highest loss, and the check "not reduced last time and no improvement" uses
  the best loss at the previous checkpoint.

  With ``draw_keys`` (one per example), ``logits_fn(x, keys)`` is randomised
  and the gradient at iteration ``i`` (0: the start) is averaged over
  ``eot_iter`` draws keyed by ``fold_in(draw_keys, i)``.
  """
  first, minimum, decrement = _checkpoint_lengths(n_iter)

  def loss_and_grad(x_adv, i):
    if draw_keys is None:
      return _loss_and_grad(logits_fn, loss_fn, labels, x_adv)
    return eot_loss_and_grad(logits_fn, loss_fn, labels, x_adv,
                             fold_in_each(draw_keys, i), eot_iter)

  if norm == "linf":
    ascend = lambda x_adv, step, grad: project(x_adv + step * jnp.sign(grad), x, eps)
    to_ball = lambda z: project(z, x, eps)
  else:
    ascend = lambda x_adv, step, grad: project_l2(x_adv + step * normalize_l2(grad),
                                                  x, eps)
    to_ball = lambda z: project_l2(z, x, eps)

  x_adv = x_start
  loss, correct, grad = loss_and_grad(x_adv, 0)
  batch = x.shape[0]
  state = dict(
      x_adv=x_adv, x_old=x_adv, grad=grad,
      x_best=x_adv, grad_best=grad, loss_best=loss,
      x_best_adv=x_adv, correct=correct,
      step=jnp.full((batch,), 2.0 * eps, x.dtype),
      # The reference compares the first step's loss with an unwritten (zero)
      # buffer entry; with a single iteration that entry is the step itself.
      prev_loss=jnp.full((batch,), jnp.inf if n_iter == 1 else 0.0, loss.dtype),
      n_increase=jnp.zeros((batch,), jnp.int32),
      since_check=jnp.zeros((), jnp.int32),
      interval=jnp.asarray(first, jnp.int32),
      loss_best_last_check=loss,
      reduced_last_check=jnp.ones((batch,), bool),
  )

  def body(i, s):
    s = dict(s)
    # Gradient step with momentum (the first step has none).
    momentum = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
    z = ascend(s["x_adv"], per_example(s["step"], x), s["grad"])
    x_new = to_ball(s["x_adv"] + (z - s["x_adv"]) * momentum
                    + (s["x_adv"] - s["x_old"]) * (1.0 - momentum))
    s["x_old"] = s["x_adv"]
    s["x_adv"] = x_new

    loss, correct, grad = loss_and_grad(x_new, i + 1)
    s["grad"] = grad
    s["correct"] = s["correct"] & correct
    s["x_best_adv"] = jnp.where(per_example(~correct, x), x_new, s["x_best_adv"])

    s["n_increase"] = s["n_increase"] + (loss > s["prev_loss"]).astype(jnp.int32)
    s["prev_loss"] = loss
    improved = per_example(loss > s["loss_best"], x)
    s["x_best"] = jnp.where(improved, x_new, s["x_best"])
    s["grad_best"] = jnp.where(improved, grad, s["grad_best"])
    s["loss_best"] = jnp.where(loss > s["loss_best"], loss, s["loss_best"])
    s["since_check"] = s["since_check"] + 1

    # Checkpoint: halve the step and go back to the best point where needed.
    at_check = s["since_check"] == s["interval"]
    oscillating = s["n_increase"] <= s["interval"].astype(x.dtype) * rho
    stalled = ~s["reduced_last_check"] & (s["loss_best_last_check"] >= s["loss_best"])
    reduce = oscillating | stalled
    halve = at_check & reduce
    s["step"] = jnp.where(halve, s["step"] / 2.0, s["step"])
    s["x_adv"] = jnp.where(per_example(halve, x), s["x_best"], s["x_adv"])
    s["grad"] = jnp.where(per_example(halve, x), s["grad_best"], s["grad"])
    s["reduced_last_check"] = jnp.where(at_check, reduce, s["reduced_last_check"])
    s["loss_best_last_check"] = jnp.where(at_check, s["loss_best"],
                                          s["loss_best_last_check"])
    s["n_increase"] = jnp.where(at_check, 0, s["n_increase"])
    s["interval"] = jnp.where(at_check,
                              jnp.maximum(s["interval"] - decrement, minimum),
                              s["interval"])
    s["since_check"] = jnp.where(at_check, 0, s["since_check"])
    return s

  return jax.lax.fori_loop(0, n_iter, body, state)


def _linf_start(keys: Array, x: Array, eps) -> Array:
  """``x + eps * u / ||u||_inf``, ``u ~ U(-1, 1)`` per example, clipped to [0, 1]."""
  u = uniform_each(keys, x.shape[1:], x.dtype, -1.0, 1.0)
  u = u / (per_example(linf_norm(u), u) + 1e-12)
  return jnp.clip(x + eps * u, 0.0, 1.0)


def _start(keys: Array, x: Array, eps, norm: str) -> Array:
  return _linf_start(keys, x, eps) if norm == "linf" else l2_start(keys, x, eps)


# --------------------------------------------------------------------------
# Attacks.
# --------------------------------------------------------------------------


def _check_common(n_iter, n_restarts, rho, norm, eot_iter):
  if n_iter < 1 or n_restarts < 1 or eot_iter < 1:
    raise ValueError(f"APGD needs n_iter, n_restarts and eot_iter >= 1; got "
                     f"n_iter={n_iter}, n_restarts={n_restarts}, eot_iter={eot_iter}.")
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"APGD's rho must lie in (0, 1]; got {rho}.")
  if norm not in NORMS:
    raise ValueError(f"APGD's norm must be one of {NORMS}; got {norm!r}.")


def _make_run(logits_fn, x, labels, eps, keys, n_iter, rho, norm, eot_iter,
              stochastic):
  """``(restart r, loss_fn) -> (fooled, x_adv)``: one APGD run per example."""
  def run(r, loss_fn):
    run_keys = fold_in_each(keys, r)
    draw_keys = fold_in_each(run_keys, 1) if stochastic else None
    final = _apgd_single_run(logits_fn, x, labels, eps, _start(run_keys, x, eps, norm),
                             loss_fn, n_iter, rho, norm, eot_iter, draw_keys)
    return ~final["correct"], final["x_best_adv"]
  return run


def apgd(logits_fn: LogitsFn, x: Array, labels: Array, *, eps, key: Array,
         loss: str = "ce", n_iter: int = 100, n_restarts: int = 1,
         rho: float = 0.75, active: Optional[Array] = None, norm: str = "linf",
         eot_iter: int = 1, stochastic: bool = False) -> Array:
  """Untargeted APGD on the cross-entropy (``'ce'``) or DLR (``'dlr'``) loss.

  Args:
    logits_fn: ``x -> logits``, batch first, inputs in [0, 1]; with
      ``stochastic``, a randomised model ``(x, keys) -> logits`` with one PRNG
      key per example (``keys[b]`` draws the randomness for ``x[b]``).
    x: clean inputs, any shape ``[B, ...]``; labels: ``[B]`` integers.
    eps: radius (may be traced).
    key: one PRNG key, or one per example.
    loss: ``'ce'`` or ``'dlr'``.
    n_iter, n_restarts: static budget; restarts run only on examples that the
      previous ones did not break.
    rho: the oscillation threshold of the step-size rule.
    active: optional ``[B]`` mask of examples to attack (default: all); only
      correctly classified examples are ever attacked.
    norm: ``'linf'`` or ``'l2'``.
    eot_iter: draws averaged per gradient (static), for ``stochastic``
      models; a deterministic model's gradient is computed once (the average
      of identical draws).
    stochastic: whether ``logits_fn`` is randomised, as above.

  Returns:
    ``[B, ...]``: an adversarial example where one was found, else the clean
    input; inside the eps-ball and [0, 1], under ``stop_gradient``.
  """
  _check_common(n_iter, n_restarts, rho, norm, eot_iter)
  if loss not in APGD_LOSSES:
    raise ValueError(f"apgd: loss must be one of {APGD_LOSSES}; got {loss!r}. "
                     "Use apgd_targeted for the targeted DLR loss.")
  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  _, robust = clean_robust(fixed_draw(logits_fn, stochastic, keys), x, labels, active)
  loss_fn = ((lambda z: losses.cross_entropy(z, labels)) if loss == "ce"
             else (lambda z: dlr_loss(z, labels)))
  run = _make_run(logits_fn, x, labels, eps, keys, n_iter, rho, norm, eot_iter,
                  stochastic)
  x_adv, _ = run_on_robust(lambda r, _: run(r, loss_fn), x, robust, n_restarts)
  return jax.lax.stop_gradient(x_adv)


def apgd_targeted(logits_fn: LogitsFn, x: Array, labels: Array, *, eps,
                  key: Array, n_iter: int = 100, n_target_classes: int = 9,
                  n_restarts: int = 1, rho: float = 0.75,
                  active: Optional[Array] = None, norm: str = "linf",
                  eot_iter: int = 1, stochastic: bool = False) -> Array:
  """APGD-T: APGD on the targeted DLR loss, for each of the top target classes.

  Target ``k`` (k = 2 .. n_target_classes + 1) is the class with the k-th
  highest clean logit; each target gets ``n_restarts`` runs, each only on the
  examples still robust. Arguments and result as in :func:`apgd`.
  """
  _check_common(n_iter, n_restarts, rho, norm, eot_iter)
  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  clean_logits, robust = clean_robust(fixed_draw(logits_fn, stochastic, keys), x,
                                      labels, active)
  num_classes = clean_logits.shape[-1]
  if num_classes < 4 or not 1 <= n_target_classes <= num_classes - 1:
    raise ValueError(f"apgd_targeted needs >= 4 classes and 1 <= n_target_classes "
                     f"<= {num_classes - 1}; got {num_classes} classes and "
                     f"n_target_classes={n_target_classes}.")
  run = _make_run(logits_fn, x, labels, eps, keys, n_iter, rho, norm, eot_iter,
                  stochastic)

  def targeted_run(r, _):
    targets = sorted_class_index(clean_logits, 2 + r // n_restarts)
    return run(r, lambda z: targeted_dlr_loss(z, labels, targets))

  x_adv, _ = run_on_robust(targeted_run, x, robust, n_target_classes * n_restarts)
  return jax.lax.stop_gradient(x_adv)
