"""Square attack (Andriushchenko et al. 2020): AutoAttack's score-based attack, L-inf and L2.

A random search that needs no gradients, so gradient masking cannot fool it.
At every query it proposes to change a random square window of the current
best perturbation and keeps the proposal if it lowers the margin
``z_y - max_{j != y} z_j`` (or misclassifies). The window's side shrinks with
the query count: it covers a fraction ``p`` of the image, ``p = p_init / 2^r``
with ``r`` stepping up after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000
and 8000.

L-inf: the start is vertical stripes of +-eps (one sign per column and
channel); a proposal overwrites the window with a +-2 eps patch (one sign per
channel), projected back onto the eps-ball and [0, 1].

L2: the start tiles the image with windows of side ``h // 5``, each holding
a "meta" pattern (concentric rectangles weighted ``sum 1/(k+1)^2``, positive
on one half and negative on the other, possibly transposed) with one random
sign per channel, scaled to norm eps. A proposal draws two windows: the
first gets the normalised sum of a new signed pattern and its old content,
the second is emptied, and the first is rescaled to the budget
``sqrt(max(eps^2 - ||delta||^2, 0) / C + ||delta on both windows||^2)`` per
channel; the whole perturbation is then scaled to norm eps and clipped to
[0, 1]. Windows have odd sides of at least 3.

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
from bat_jax.attacks.common import (clean_robust, fold_in_each, l2_norm, per_example,
                                    per_example_keys, predict, run_on_robust,
                                    uniform_each)
from bat_jax.attacks.l2 import normalize_l2
from bat_jax.attacks.pgd import NORMS

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
                 rescale_schedule: bool = False, norm: str = "linf") -> np.ndarray:
  """Side of the square window for every query, ``int[n_queries]`` (host-side).

  ``round(sqrt(p * height * width))`` as in the reference (whose
  ``n_features / c`` is ``h * w``): at least 1 for L-inf; for L2 at least 3
  and made odd. Capped at the image's shorter side.
  """
  sides = []
  for i in range(n_queries):
    side = int(round(math.sqrt(
        square_p_selection(i, n_queries, p_init, rescale_schedule) * height * width)))
    if norm == "linf":
      side = max(side, 1)
    else:
      side = max(side, 3)
      side += 1 - side % 2
    sides.append(side)
  return np.minimum(np.array(sides, np.int32), min(height, width))


# --------------------------------------------------------------------------
# L2 "meta" patterns (host-side).
# --------------------------------------------------------------------------


def _rings(rows: int, cols: int) -> np.ndarray:
  """Concentric rectangles around the centre, ring ``k`` adding ``1/(k+1)^2``; unit L2."""
  pattern = np.zeros((rows, cols))
  centre_r, centre_c = rows // 2, cols // 2
  for k in range(max(centre_r, centre_c) + 1):
    pattern[max(centre_r - k, 0):centre_r + k + 1,
            max(centre_c - k, 0):centre_c + k + 1] += 1.0 / (k + 1) ** 2
  norm = np.sqrt(np.sum(pattern ** 2))
  return pattern / norm if norm > 0 else pattern


def meta_pattern(side: int) -> np.ndarray:
  """The L2 Square's ``side x side`` patch: rings ``+`` on the top half, ``-`` below; unit L2."""
  top = side // 2
  pattern = np.concatenate([_rings(top, side), -_rings(side - top, side)])
  return pattern / np.sqrt(np.sum(pattern ** 2))


def _init_windows(height: int, width: int) -> np.ndarray:
  """The L2 start's patterns, ``[2, n_windows, H, W]``: each window's patch, upright
  and transposed, in an otherwise empty image.

  Windows of side ``h // 5`` from ``((h - 5 s) // 2, (h - 5 s) // 2)`` on,
  ``h // s`` by ``w // s`` of them (cut at the border if the image is not
  square).
  """
  side = height // 5
  start = (height - 5 * side) // 2
  patch = meta_pattern(side)
  windows = []
  for a in range(height // side):
    for b in range(width // side):
      top, left = start + a * side, start + b * side
      canvas = np.zeros((2, height + side, width + side))
      canvas[0, top:top + side, left:left + side] = patch
      canvas[1, top:top + side, left:left + side] = patch.T
      windows.append(canvas[:, :height, :width])
  return np.stack(windows, axis=1)


# --------------------------------------------------------------------------
# The search.
# --------------------------------------------------------------------------


def _margin_and_loss(logits: Array, labels: Array, loss: str) -> Tuple[Array, Array]:
  """The margin ``z_y - max_{j!=y} z_j`` (success when <= 0) and the loss to lower."""
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  is_true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  margin = true_logit - jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)
  if loss == "margin":
    return margin, margin
  return margin, -losses.cross_entropy(logits, labels)


def _window(top: Array, left: Array, side, height: int, width: int) -> Array:
  """``[B, H, W]`` masks of the ``side x side`` windows at ``(top, left)`` (``[B]`` each)."""
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side)
  in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side)
  return in_rows[:, :, None] & in_cols[:, None, :]


def _corner(draw: Array, side, extent: int) -> Array:
  """The reference's ``random_int(0, extent - side)``: ``floor(U * (extent - side))``."""
  return jnp.floor(draw * (extent - side)).astype(jnp.int32)


def _search(margin_and_loss, x_best: Array, active: Array, n_queries: int,
            propose: Callable[[Array, Array], Array]) -> Array:
  """Query ``propose(i, x_best)`` until the budget is spent or all are fooled."""
  margin_min, loss_min = margin_and_loss(x_best)

  def cond(state):
    i, _, margin_min, _ = state
    return (i < n_queries) & jnp.any(active & (margin_min > 0))

  def body(state):
    i, x_best, margin_min, loss_min = state
    to_fool = active & (margin_min > 0)
    x_new = propose(i, x_best)
    margin, loss_new = margin_and_loss(x_new)
    improved = loss_new < loss_min
    loss_min = jnp.where(to_fool & improved, loss_new, loss_min)
    accept = to_fool & (improved | (margin <= 0))
    margin_min = jnp.where(accept, margin, margin_min)
    x_best = jnp.where(per_example(accept, x_best), x_new, x_best)
    return i + 1, x_best, margin_min, loss_min

  init = (jnp.zeros((), jnp.int32), x_best, margin_min, loss_min)
  _, x_best, _, _ = jax.lax.while_loop(cond, body, init)
  return x_best


def _square_single_run(logits_fn: LogitsFn, x: Array, labels: Array, eps,
                       keys: Array, active: Array, n_queries: int, p_init: float,
                       rescale_schedule: bool, loss: str) -> Array:
  """One L-inf Square run on NHWC images; returns the best point of each example."""
  batch, height, width, channels = x.shape
  sides = jnp.asarray(square_sizes(n_queries, height, width, p_init, rescale_schedule))
  margin_and_loss = lambda z: _margin_and_loss(logits_fn(z), labels, loss)

  # Queries use keys folded with 0 .. n_queries - 1; the stripes use n_queries.
  stripes = jnp.sign(uniform_each(fold_in_each(keys, n_queries),
                                  (1, width, channels), x.dtype, -1.0, 1.0))
  x_start = jnp.clip(x + eps * stripes, 0.0, 1.0)

  def propose(i, x_best):
    side = sides[i]
    draws = uniform_each(fold_in_each(keys, i), (2 + channels,), x.dtype)
    top = _corner(draws[:, 0], side, height)
    left = _corner(draws[:, 1], side, width)
    signs = jnp.sign(2.0 * draws[:, 2:] - 1.0)                      # [B, C]
    window = _window(top, left, side, height, width)[..., None]
    x_new = x_best + jnp.where(window, 2.0 * eps * signs[:, None, None, :], 0.0)
    return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)

  return _search(margin_and_loss, x_start, active, n_queries, propose)


def _square_l2_single_run(logits_fn: LogitsFn, x: Array, labels: Array, eps,
                          keys: Array, active: Array, n_queries: int, p_init: float,
                          rescale_schedule: bool, loss: str) -> Array:
  """One L2 Square run on NHWC images; returns the best point of each example.

  Query ``i`` draws ``5 + C`` uniforms from ``fold_in(key, i)``: the two
  windows' corners, the pattern's transpose (``> 0.5``) and the channel
  signs; the start draws ``1 + C`` per window (transpose, signs) from
  ``fold_in(key, n_queries)``.
  """
  batch, height, width, channels = x.shape
  margin_and_loss = lambda z: _margin_and_loss(logits_fn(z), labels, loss)
  spatial_norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))

  upright, transposed = jnp.asarray(_init_windows(height, width), x.dtype)
  draws = uniform_each(fold_in_each(keys, n_queries), (upright.shape[0], 1 + channels),
                       x.dtype)
  flip = (draws[..., :1] > 0.5).astype(x.dtype)                  # [B, N, 1]
  signs = jnp.sign(2.0 * draws[..., 1:] - 1.0)                   # [B, N, C]
  delta = (jnp.einsum("bnc,nhw->bhwc", signs * (1.0 - flip), upright)
           + jnp.einsum("bnc,nhw->bhwc", signs * flip, transposed))
  x_start = jnp.clip(x + normalize_l2(delta) * eps, 0.0, 1.0)

  sides_np = square_sizes(n_queries, height, width, p_init, rescale_schedule, "l2")
  kinds = sorted(set(sides_np.tolist()))
  largest = max(kinds)
  patterns = np.zeros((len(kinds), largest, largest))
  for k, side in enumerate(kinds):
    patterns[k, :side, :side] = meta_pattern(side)
  patterns = jnp.asarray(patterns, x.dtype)
  sides = jnp.asarray(sides_np)
  kind_of_query = jnp.asarray([kinds.index(side) for side in sides_np.tolist()])

  def place(pattern, top, left, transpose, window):
    """``[B, H, W]``: ``pattern`` (or its transpose) in the window at ``(top, left)``."""
    r = jnp.clip(jnp.arange(height)[None] - top[:, None], 0, largest - 1)[:, :, None]
    c = jnp.clip(jnp.arange(width)[None] - left[:, None], 0, largest - 1)[:, None, :]
    patch = jnp.where(transpose[:, None, None], pattern[c, r], pattern[r, c])
    return jnp.where(window, patch, 0.0)

  def propose(i, x_best):
    side = sides[i]
    u = uniform_each(fold_in_each(keys, i), (5 + channels,), x.dtype)
    top, left = _corner(u[:, 0], side, height), _corner(u[:, 1], side, width)
    window = _window(top, left, side, height, width)
    emptied = _window(_corner(u[:, 2], side, height), _corner(u[:, 3], side, width),
                      side, height, width)
    pattern = place(patterns[kind_of_query[i]], top, left, u[:, 4] > 0.5, window)
    signs = jnp.sign(2.0 * u[:, 5:] - 1.0)                        # [B, C]
    window, emptied = window[..., None], emptied[..., None]

    delta = x_best - x
    old = jnp.where(window, delta, 0.0)
    room = jnp.maximum(eps ** 2 - per_example(l2_norm(delta), x) ** 2, 0.0) / channels
    budget = jnp.sqrt(room + spatial_norm(jnp.where(window | emptied, delta, 0.0)) ** 2)
    new = pattern[..., None] * signs[:, None, None, :] + old / (1e-12 + spatial_norm(old))
    new = new / (1e-12 + spatial_norm(new)) * budget
    delta = jnp.where(window, new, jnp.where(emptied, 0.0, delta))
    return jnp.clip(x + normalize_l2(delta) * eps, 0.0, 1.0)

  return _search(margin_and_loss, x_start, active, n_queries, propose)


def square(logits_fn: LogitsFn, x: Array, labels: Array, *, eps, key: Array,
           n_queries: int = 5000, p_init: float = 0.8, n_restarts: int = 1,
           loss: str = "margin", rescale_schedule: bool = False,
           active: Optional[Array] = None, norm: str = "linf") -> Array:
  """Square attack (untargeted) with AutoAttack's settings as defaults.

  Args:
    logits_fn: ``x -> logits``, inputs in [0, 1].
    x: clean images ``[B, H, W, C]`` (or ``[B, H, W]``); labels: ``[B]``.
    eps: radius (may be traced).
    key: one PRNG key, or one per example.
    n_queries: queries per restart (static); p_init: initial window fraction.
    n_restarts: runs, each only on the examples still robust.
    loss: ``'margin'`` (AutoAttack) or ``'ce'`` (lower ``-CE``).
    rescale_schedule: stretch the p schedule to ``n_queries`` (see
      :func:`square_p_selection`); AutoAttack does not.
    active: optional ``[B]`` mask of examples to attack (default: all).
    norm: ``'linf'`` or ``'l2'`` (images at least 5 pixels high).

  Returns:
    ``[B, ...]``: an adversarial example where one was found, else the clean
    input; inside the eps-ball and [0, 1], under ``stop_gradient``.
  """
  if loss not in SQUARE_LOSSES:
    raise ValueError(f"square: loss must be one of {SQUARE_LOSSES}; got {loss!r}.")
  if norm not in NORMS:
    raise ValueError(f"square: norm must be one of {NORMS}; got {norm!r}.")
  if n_queries < 1 or n_restarts < 1:
    raise ValueError(f"square needs n_queries >= 1 and n_restarts >= 1; got "
                     f"n_queries={n_queries}, n_restarts={n_restarts}.")
  if x.ndim not in (3, 4) or (norm == "l2" and x.shape[1] < 5):
    raise ValueError("square works on images [B, H, W, C] or [B, H, W] (L2: H >= 5); "
                     f"got shape {x.shape}.")
  x = jax.lax.stop_gradient(x)
  keys = per_example_keys(key, x.shape[0])
  _, robust = clean_robust(logits_fn, x, labels, active)
  images = x if x.ndim == 4 else x[..., None]
  images_fn = logits_fn if x.ndim == 4 else (lambda z: logits_fn(z[..., 0]))
  single_run = _square_single_run if norm == "linf" else _square_l2_single_run

  def run(r, robust):
    x_run = single_run(images_fn, images, labels, eps, fold_in_each(keys, r), robust,
                       n_queries, p_init, rescale_schedule, loss)
    x_run = x_run.reshape(x.shape)
    return predict(logits_fn, x_run) != labels, x_run

  x_adv, _ = run_on_robust(run, x, robust, n_restarts)
  return jax.lax.stop_gradient(x_adv)
