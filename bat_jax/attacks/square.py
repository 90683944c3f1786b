"""Square attack (Andriushchenko et al. 2020), L-inf: AutoAttack's score-based attack.

A random search that needs no gradients, so gradient masking cannot fool it.
It starts from vertical stripes of +-eps (one sign per column and channel) and,
at every query, proposes to overwrite a random square window with a +-2 eps
patch (one sign per channel), projected back onto the eps-ball and [0, 1]; the
proposal is kept if it lowers the margin ``z_y - max_{j != y} z_j`` (or
misclassifies). The window's side shrinks with the query count: it covers a
fraction ``p`` of the image, ``p = p_init / 2^r`` with ``r`` stepping up after
queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000.

As in the authors' ``auto-attack`` package (``square.py``), examples already
misclassified are frozen, and the search stops once every attacked example is.
The one deliberate difference: the reference draws one window position and
one sign pattern per query for the whole batch, here each example draws its
own (the same distribution for every example, and an example's result does
not depend on its batch).
"""

import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax import losses
from bat_jax.attacks.apgd import (_clean_robust, fold_in_each, per_example,
                                  per_example_keys, predict, run_on_robust,
                                  uniform_each)

Array = jax.Array
LogitsFn = Callable[[Array], Array]

SQUARE_LOSSES = ("margin", "ce")
P_SCHEDULE_QUERIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p_selection(query: int, n_queries: int = 5000, p_init: float = 0.8,
                       rescale_schedule: bool = False) -> float:
  """The fraction of the image covered by the square window at query ``query``.

  ``p_init / 2^r`` where ``r`` counts the thresholds (10, 50, ..., 8000) that
  ``query`` has passed. With ``rescale_schedule`` the query is first mapped
  to ``int(query / n_queries * 10000)`` (the stand-alone reference default);
  AutoAttack itself runs Square with ``resc_schedule=False``, the default here.
  """
  if rescale_schedule:
    query = int(query / n_queries * 10000)
  halvings = sum(query > threshold for threshold in P_SCHEDULE_QUERIES)
  return p_init / 2 ** halvings


def square_sizes(n_queries: int, height: int, width: int, p_init: float = 0.8,
                 rescale_schedule: bool = False) -> np.ndarray:
  """Side of the square window for every query, ``int[n_queries]`` (host-side).

  ``max(round(sqrt(p * height * width)), 1)`` as in the reference (whose
  ``n_features / c`` is ``h * w``), capped at the image's shorter side.
  """
  sides = [max(int(round(math.sqrt(
      square_p_selection(i, n_queries, p_init, rescale_schedule) * height * width))), 1)
           for i in range(n_queries)]
  return np.minimum(np.array(sides, np.int32), min(height, width))


def _margin_and_loss(logits: Array, labels: Array, loss: str) -> Tuple[Array, Array]:
  """The margin ``z_y - max_{j!=y} z_j`` (success when <= 0) and the loss to lower."""
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  is_true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  margin = true_logit - jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)
  if loss == "margin":
    return margin, margin
  return margin, -losses.cross_entropy(logits, labels)


def _square_single_run(logits_fn: LogitsFn, x: Array, labels: Array, eps,
                       keys: Array, active: Array, n_queries: int, p_init: float,
                       rescale_schedule: bool, loss: str) -> Array:
  """One Square run on NHWC images; returns the best point of each example."""
  batch, height, width, channels = x.shape
  sides = jnp.asarray(square_sizes(n_queries, height, width, p_init, rescale_schedule))
  margin_and_loss = lambda z: _margin_and_loss(logits_fn(z), labels, loss)

  # Queries use keys folded with 0 .. n_queries - 1; the stripes use n_queries.
  stripes = jnp.sign(uniform_each(fold_in_each(keys, n_queries),
                                  (1, width, channels), x.dtype, -1.0, 1.0))
  x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
  margin_min, loss_min = margin_and_loss(x_best)

  rows = jnp.arange(height)
  cols = jnp.arange(width)

  def cond(state):
    i, _, margin_min, _ = state
    return (i < n_queries) & jnp.any(active & (margin_min > 0))

  def body(state):
    i, x_best, margin_min, loss_min = state
    to_fool = active & (margin_min > 0)
    side = sides[i]
    draws = uniform_each(fold_in_each(keys, i), (2 + channels,), x.dtype)
    # The reference's random_int(0, n): floor(n * U[0, 1)).
    top = jnp.floor(draws[:, 0] * (height - side)).astype(jnp.int32)[:, None]
    left = jnp.floor(draws[:, 1] * (width - side)).astype(jnp.int32)[:, None]
    signs = jnp.sign(2.0 * draws[:, 2:] - 1.0)                      # [B, C]
    in_rows = (rows[None] >= top) & (rows[None] < top + side)     # [B, H]
    in_cols = (cols[None] >= left) & (cols[None] < left + side)   # [B, W]
    window = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]
    x_new = x_best + jnp.where(window, 2.0 * eps * signs[:, None, None, :], 0.0)
    x_new = jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)

    margin, loss_new = margin_and_loss(x_new)
    improved = loss_new < loss_min
    loss_min = jnp.where(to_fool & improved, loss_new, loss_min)
    accept = to_fool & (improved | (margin <= 0))
    margin_min = jnp.where(accept, margin, margin_min)
    x_best = jnp.where(per_example(accept, x), x_new, x_best)
    return i + 1, x_best, margin_min, loss_min

  init = (jnp.zeros((), jnp.int32), x_best, margin_min, loss_min)
  _, x_best, _, _ = jax.lax.while_loop(cond, body, init)
  return x_best


def square(logits_fn: LogitsFn, x: Array, labels: Array, *, eps, key: Array,
           n_queries: int = 5000, p_init: float = 0.8, n_restarts: int = 1,
           loss: str = "margin", rescale_schedule: bool = False,
           active: Optional[Array] = None) -> Array:
  """Square attack (L-inf, untargeted) with AutoAttack's settings as defaults.

  Args:
    logits_fn: ``x -> logits``, inputs in [0, 1].
    x: clean images ``[B, H, W, C]`` (or ``[B, H, W]``); labels: ``[B]``.
    eps: L-inf radius (may be traced).
    key: one PRNG key, or one per example.
    n_queries: queries per restart (static); p_init: initial window fraction.
    n_restarts: runs, each only on the examples still robust.
    loss: ``'margin'`` (AutoAttack) or ``'ce'`` (lower ``-CE``).
    rescale_schedule: stretch the p schedule to ``n_queries`` (see
      :func:`square_p_selection`); AutoAttack does not.
    active: optional ``[B]`` mask of examples to attack (default: all).

  Returns:
    ``[B, ...]``: an adversarial example where one was found, else the clean
    input; inside the eps-ball and [0, 1], under ``stop_gradient``.
  """
  if loss not in SQUARE_LOSSES:
    raise ValueError(f"square: loss must be one of {SQUARE_LOSSES}; got {loss!r}.")
  if n_queries < 1 or n_restarts < 1:
    raise ValueError(f"square needs n_queries >= 1 and n_restarts >= 1; got "
                     f"n_queries={n_queries}, n_restarts={n_restarts}.")
  if x.ndim not in (3, 4):
    raise ValueError("square works on images [B, H, W, C] or [B, H, W]; got "
                     f"shape {x.shape}.")
  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  _, robust = _clean_robust(logits_fn, x, labels, active)
  images = x if x.ndim == 4 else x[..., None]
  images_fn = logits_fn if x.ndim == 4 else (lambda z: logits_fn(z[..., 0]))

  def run(r, robust):
    x_run = _square_single_run(images_fn, images, labels, eps, fold_in_each(keys, r),
                               robust, n_queries, p_init, rescale_schedule, loss)
    x_run = x_run.reshape(x.shape)
    return predict(logits_fn, x_run) != labels, x_run

  x_adv, _ = run_on_robust(run, x, robust, n_restarts)
  return jax.lax.stop_gradient(x_adv)
