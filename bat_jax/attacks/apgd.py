"""APGD: the step-size-free PGD of AutoAttack (Croce & Hein 2020; docs/ALGORITHMS.md section 2).

``apgd`` maximises the cross-entropy or the DLR loss; ``apgd_targeted`` (APGD-T)
maximises the targeted DLR loss towards the 2nd, 3rd, ... most likely clean
classes. Both follow the authors' PyTorch ``auto-attack`` package
(``autopgd_base.py``) step for step:

  * start ``x + eps * u / ||u||_inf`` with ``u ~ U(-1, 1)``, clipped to [0, 1];
  * step size ``2 eps``, momentum 0.75 (1.0 on the first iteration);
  * checkpoints after 22, 41, 57, 70, 80, 87, 93, 99 of 100 iterations, where an
    example halves its step size and restarts from its best point if its loss
    rose in at most ``rho`` of the steps since the last checkpoint, or if its
    step size was not halved at the last checkpoint and its best loss has not
    improved since;
  * the last iterate that misclassifies is the adversarial example.

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
from bat_jax.attacks.pgd import project

Array = jax.Array
LogitsFn = Callable[[Array], Array]

APGD_LOSSES = ("ce", "dlr")
DLR_EPS = 1e-12


# --------------------------------------------------------------------------
# Helpers shared by the AutoAttack modules (apgd, fab, square, autoattack).
# --------------------------------------------------------------------------


def per_example_keys(key: Array, batch_size: int) -> Array:
  """One PRNG key per example.

  A single key is folded with each example's index; a batch of ``batch_size``
  keys (raw ``uint32[B, 2]`` or typed ``key[B]``) is used as it is. Per-example
  keys make an example's attack independent of the rest of its batch.
  """
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  single = key.ndim == (0 if typed else 1)
  if single:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))
  if key.shape[0] != batch_size:
    raise ValueError(f"Got {key.shape[0]} per-example keys for a batch of "
                     f"{batch_size}; pass one key or exactly one per example.")
  return key


def fold_in_each(keys: Array, data) -> Array:
  """``fold_in`` applied to every per-example key with the same ``data``."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def uniform_each(keys: Array, shape, dtype, minval=0.0, maxval=1.0) -> Array:
  """Per-example uniform draws: ``[B, *shape]``, row ``b`` from ``keys[b]``."""
  return jax.vmap(lambda k: jax.random.uniform(k, shape, dtype, minval, maxval))(keys)


def per_example(v: Array, like: Array) -> Array:
  """Reshapes a ``[B]`` vector to broadcast against a batch like ``like``."""
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def linf_norm(v: Array) -> Array:
  """Per-example L-inf norm, ``[B]``."""
  return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=-1)


def predict(logits_fn: LogitsFn, x: Array) -> Array:
  return jnp.argmax(logits_fn(x), axis=-1)


def sorted_class_index(logits: Array, rank: Array) -> Array:
  """The class with the ``rank``-th highest logit (rank 1 = the top class), ``[B]``.

  ``rank`` may be traced. This is how APGD-T and FAB-T pick their targets.
  """
  order = jnp.argsort(logits, axis=-1)
  return jnp.take(order, logits.shape[-1] - rank, axis=-1)


def run_on_robust(run: Callable[[Array, Array], Tuple[Array, Array]], x: Array,
                  robust: Array, num_runs: int) -> Tuple[Array, Array]:
  """Runs ``run(r, robust) -> (fooled, x_run)`` for ``r < num_runs`` on the robust.

  Each run's adversarial examples are kept only for examples that were still
  robust before it (and that it fooled); a run is skipped entirely
  (``lax.cond``) once no example is left. Returns ``(x_adv, robust)``.
  """
  def body(r, carry):
    x_adv, robust = carry

    def attack(_):
      fooled, x_run = run(r, robust)
      broken = robust & fooled
      return (jnp.where(per_example(broken, x), x_run, x_adv), robust & ~broken)

    return jax.lax.cond(jnp.any(robust), attack, lambda _: carry, None)

  return jax.lax.fori_loop(0, num_runs, body, (x, robust))


def _clean_robust(logits_fn, x, labels, active):
  """Examples to attack: classified correctly (and ``active`` if given)."""
  clean_logits = logits_fn(x)
  robust = jnp.argmax(clean_logits, axis=-1) == labels
  if active is not None:
    robust = robust & active
  return clean_logits, robust


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
# One run.
# --------------------------------------------------------------------------


def _apgd_single_run(logits_fn: LogitsFn, x: Array, labels: Array, eps,
                     x_start: Array, loss_fn: Callable[[Array], Array],
                     n_iter: int, rho: float) -> dict:
  """One APGD run from ``x_start``; returns its final state.

  The state holds ``correct`` (no iterate misclassified), ``x_best_adv`` (the
  last misclassified iterate), ``x_best`` / ``loss_best`` (highest loss) and
  the per-example ``step`` size, among others.

  ``loss_fn(logits) -> [B]`` is maximised. Mirrors the reference's
  ``attack_single_run`` (L-inf), including its bookkeeping: the loss-increase
  count compares each step's loss with the previous step's (with 0 before the
  first step), ``x_best`` / ``grad_best`` follow the highest loss, and the
  check "not reduced last time and no improvement" uses the best loss at the
  previous checkpoint.
  """
  first, minimum, decrement = _checkpoint_lengths(n_iter)

  def loss_and_grad(x_adv):
    def total(z):
      logits = logits_fn(z)
      loss = loss_fn(logits)
      return jnp.sum(loss), (loss, logits)
    (_, (loss, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return loss, jnp.argmax(logits, axis=-1) == labels, grad

  x_adv = x_start
  loss, correct, grad = loss_and_grad(x_adv)
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
    step = per_example(s["step"], x)
    z = project(s["x_adv"] + step * jnp.sign(s["grad"]), x, eps)
    x_new = project(s["x_adv"] + (z - s["x_adv"]) * momentum
                    + (s["x_adv"] - s["x_old"]) * (1.0 - momentum), x, eps)
    s["x_old"] = s["x_adv"]
    s["x_adv"] = x_new

    loss, correct, grad = loss_and_grad(x_new)
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


# --------------------------------------------------------------------------
# Attacks.
# --------------------------------------------------------------------------


def _check_common(n_iter, n_restarts, rho):
  if n_iter < 1 or n_restarts < 1:
    raise ValueError(f"APGD needs n_iter >= 1 and n_restarts >= 1; got "
                     f"n_iter={n_iter}, n_restarts={n_restarts}.")
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"APGD's rho must lie in (0, 1]; got {rho}.")


def apgd(logits_fn: LogitsFn, x: Array, labels: Array, *, eps, key: Array,
         loss: str = "ce", n_iter: int = 100, n_restarts: int = 1,
         rho: float = 0.75, active: Optional[Array] = None) -> Array:
  """Untargeted APGD (L-inf) on the cross-entropy (``'ce'``) or DLR (``'dlr'``) loss.

  Args:
    logits_fn: ``x -> logits``, batch first, inputs in [0, 1].
    x: clean inputs, any shape ``[B, ...]``; labels: ``[B]`` integers.
    eps: L-inf radius (may be traced).
    key: one PRNG key, or one per example.
    loss: ``'ce'`` or ``'dlr'``.
    n_iter, n_restarts: static budget; restarts run only on examples that the
      previous ones did not break.
    rho: the oscillation threshold of the step-size rule.
    active: optional ``[B]`` mask of examples to attack (default: all); only
      correctly classified examples are ever attacked.

  Returns:
    ``[B, ...]``: an adversarial example where one was found, else the clean
    input; inside the eps-ball and [0, 1], under ``stop_gradient``.
  """
  _check_common(n_iter, n_restarts, rho)
  if loss not in APGD_LOSSES:
    raise ValueError(f"apgd: loss must be one of {APGD_LOSSES}; got {loss!r}. "
                     "Use apgd_targeted for the targeted DLR loss.")
  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  _, robust = _clean_robust(logits_fn, x, labels, active)
  loss_fn = ((lambda z: losses.cross_entropy(z, labels)) if loss == "ce"
             else (lambda z: dlr_loss(z, labels)))

  def run(r, _):
    start = _linf_start(fold_in_each(keys, r), x, eps)
    final = _apgd_single_run(logits_fn, x, labels, eps, start, loss_fn, n_iter, rho)
    return ~final["correct"], final["x_best_adv"]

  x_adv, _ = run_on_robust(run, x, robust, n_restarts)
  return jax.lax.stop_gradient(x_adv)


def apgd_targeted(logits_fn: LogitsFn, x: Array, labels: Array, *, eps,
                  key: Array, n_iter: int = 100, n_target_classes: int = 9,
                  n_restarts: int = 1, rho: float = 0.75,
                  active: Optional[Array] = None) -> Array:
  """APGD-T: APGD on the targeted DLR loss, for each of the top target classes.

  Target ``k`` (k = 2 .. n_target_classes + 1) is the class with the k-th
  highest clean logit; each target gets ``n_restarts`` runs, each only on the
  examples still robust. Arguments and result as in :func:`apgd`.
  """
  _check_common(n_iter, n_restarts, rho)
  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  clean_logits, robust = _clean_robust(logits_fn, x, labels, active)
  num_classes = clean_logits.shape[-1]
  if num_classes < 4 or not 1 <= n_target_classes <= num_classes - 1:
    raise ValueError(f"apgd_targeted needs >= 4 classes and 1 <= n_target_classes "
                     f"<= {num_classes - 1}; got {num_classes} classes and "
                     f"n_target_classes={n_target_classes}.")

  def run(r, _):
    targets = sorted_class_index(clean_logits, 2 + r // n_restarts)
    start = _linf_start(fold_in_each(keys, r), x, eps)
    loss_fn = lambda z: targeted_dlr_loss(z, labels, targets)
    final = _apgd_single_run(logits_fn, x, labels, eps, start, loss_fn, n_iter, rho)
    return ~final["correct"], final["x_best_adv"]

  x_adv, _ = run_on_robust(run, x, robust, n_target_classes * n_restarts)
  return jax.lax.stop_gradient(x_adv)
