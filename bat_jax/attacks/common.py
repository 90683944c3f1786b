"""Helpers shared by the AutoAttack modules (apgd, fab, square, autoattack).

Per-example PRNG keys, per-example norms and draws, the "attack only the
still-robust examples" loop, and the switch between deterministic models
``logits_fn(x)`` and randomised ones ``logits_fn(x, keys)``.
"""

from typing import Callable, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
LogitsFn = Callable[..., Array]

# A randomised model's draws come from its keys folded with this (far from
# the restart, query and target indices the attacks fold in).
MODEL_STREAM = 0x5EED0


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


def normal_each(keys: Array, shape, dtype) -> Array:
  """Per-example standard normal draws: ``[B, *shape]``, row ``b`` from ``keys[b]``."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def per_example(v: Array, like: Array) -> Array:
  """Reshapes a ``[B]`` vector to broadcast against a batch like ``like``."""
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def linf_norm(v: Array) -> Array:
  """Per-example L-inf norm, ``[B]``."""
  return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=-1)


def l2_norm(v: Array) -> Array:
  """Per-example L2 norm, ``[B]``."""
  return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=-1))


def lp_norm(v: Array, norm: str) -> Array:
  """Per-example ``'linf'`` or ``'l2'`` norm, ``[B]``."""
  return linf_norm(v) if norm == "linf" else l2_norm(v)


def predict(logits_fn: LogitsFn, x: Array) -> Array:
  return jnp.argmax(logits_fn(x), axis=-1)


def fixed_draw(logits_fn: LogitsFn, stochastic: bool, keys: Array) -> LogitsFn:
  """``x -> logits``: the model itself, or one draw of a randomised model.

  A randomised model is ``logits_fn(x, keys)`` with one key per example
  (``keys[b]`` draws the randomness applied to ``x[b]``); here its draws come
  from ``fold_in(keys[b], MODEL_STREAM)``, so each call site that passes its
  own keys sees its own draw. Used where the reference makes one forward pass
  (clean accuracy, the targets of APGD-T, the final check of an attack).
  """
  if not stochastic:
    return logits_fn
  draw_keys = fold_in_each(keys, MODEL_STREAM)
  return lambda z: logits_fn(z, draw_keys)


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


def clean_robust(logits_fn: LogitsFn, x: Array, labels: Array, active):
  """Examples to attack: classified correctly (and ``active`` if given)."""
  clean_logits = logits_fn(x)
  robust = jnp.argmax(clean_logits, axis=-1) == labels
  if active is not None:
    robust = robust & active
  return clean_logits, robust
