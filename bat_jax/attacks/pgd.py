"""FGSM and PGD (docs/ALGORITHMS.md section 2) as pure functions of a ``logits_fn``.

An attack is composed of three parts, each a small pure function:
  * an objective ``(adv_logits, labels, clean_logits) -> [B]`` to maximise,
  * a start (uniform in the ball, a small Gaussian, or the clean point),
  * a norm, which fixes the ascent step and the projection onto the
    eps-ball intersected with the box ``[0, 1]``.
The iterations run in ``jax.lax.fori_loop`` (the step count is static), and
the result is wrapped in ``stop_gradient``: it is a constant to whatever
trains on it.
"""

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from bat_jax import losses

Array = jax.Array
LogitsFn = Callable[[Array], Array]
Objective = Callable[[Array, Array, Array], Array]

OBJECTIVES = ("ce", "kl")
STARTS = ("uniform", "normal", "none")
NORMS = ("linf", "l2")
# TPGD's start (torchattacks, which the reference uses for TRADES and for BAT's
# KL attack): clip(x + 0.001 * N(0, 1), 0, 1).
NORMAL_START_SCALE = 0.001


# --------------------------------------------------------------------------
# Objectives.
# --------------------------------------------------------------------------


def ce_objective(adv_logits: Array, labels: Array, clean_logits: Array) -> Array:
  """Cross-entropy at the adversarial point (PGD-CE, Madry et al.)."""
  del clean_logits
  return losses.cross_entropy(adv_logits, labels)


def kl_objective(adv_logits: Array, labels: Array, clean_logits: Array) -> Array:
  """``KL(stop_grad(p(x)) || p(x_t))`` (TRADES's inner maximisation, "TPGD")."""
  del labels
  return losses.kl_divergence(jax.lax.stop_gradient(clean_logits), adv_logits)


def get_objective(objective: Union[str, Objective]) -> Objective:
  if callable(objective):
    return objective
  table = {"ce": ce_objective, "kl": kl_objective}
  if objective not in table:
    raise ValueError(f"PGD objective must be one of {OBJECTIVES} or a callable "
                     f"(adv_logits, labels, clean_logits) -> [B]; got {objective!r}.")
  return table[objective]


# --------------------------------------------------------------------------
# Norm geometry: projection, ascent direction, random start.
# --------------------------------------------------------------------------


def _per_example_l2(v: Array) -> Array:
  """L2 norm of each example, broadcastable against ``v``."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def project(x_adv: Array, x: Array, eps, norm: str = "linf") -> Array:
  """Projects ``x_adv`` onto ``{||x_adv - x|| <= eps} ∩ [0, 1]``.

  For L-inf the two sets are boxes and clipping to each is the exact
  projection; for L2 the ball projection is followed by the box clip (the
  usual approximation, as in the reference implementations).
  """
  delta = x_adv - x
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  elif norm == "l2":
    norms = _per_example_l2(delta)
    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(norms, 1e-12))
  else:
    raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")
  return jnp.clip(x + delta, 0.0, 1.0)


def ascent_direction(grad: Array, norm: str = "linf") -> Array:
  """The steepest-ascent unit step: ``sign(g)`` for L-inf, ``g/||g||_2`` for L2."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(_per_example_l2(grad), 1e-12)


def _is_per_example(key: Array) -> bool:
  """Whether ``key`` holds one PRNG key per example (typed ``[B]`` or raw ``[B, 2]``)."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim == (1 if typed else 2)


def _sample(key: Array, shape, sampler) -> Array:
  """``sampler(key, shape)``, or per example when ``key`` holds one key per example."""
  if _is_per_example(key):
    return jax.vmap(lambda k: sampler(k, shape[1:]))(key)
  return sampler(key, shape)


def fold_in(key: Array, data: int) -> Array:
  """``jax.random.fold_in`` for one key or for per-example keys."""
  if _is_per_example(key):
    return jax.vmap(jax.random.fold_in, (0, None))(key, data)
  return jax.random.fold_in(key, data)


def random_start(key: Array, x: Array, eps, start: str = "uniform",
                 norm: str = "linf") -> Array:
  """The first iterate.

  ``key`` is one PRNG key, or one per example (``[B]`` keys): then each
  example's start depends only on its own key, not on how a batch is split
  across devices.

  ``uniform``: uniform in the eps-ball (L-inf: ``U(-eps, eps)`` per pixel; L2:
  a random direction with a uniform radius), clipped to ``[0, 1]``.
  ``normal``: ``clip(x + 0.001 N(0, 1), 0, 1)``, torchattacks' TPGD start (the
  reference's TRADES attack); the norm is ignored.
  ``none``: the clean point.
  """
  if start == "none":
    return x
  if start == "normal":
    noise = _sample(key, x.shape, lambda k, s: jax.random.normal(k, s, x.dtype))
    return jnp.clip(x + NORMAL_START_SCALE * noise, 0.0, 1.0)
  if start != "uniform":
    raise ValueError(f"start must be one of {STARTS}; got {start!r}.")
  if norm == "linf":
    noise = _sample(key, x.shape,
                    lambda k, s: jax.random.uniform(k, s, x.dtype, -1.0, 1.0)) * eps
  else:
    direction = _sample(fold_in(key, 0), x.shape,
                        lambda k, s: jax.random.normal(k, s, x.dtype))
    direction = direction / jnp.maximum(_per_example_l2(direction), 1e-12)
    radius = _sample(fold_in(key, 1), (x.shape[0],) + (1,) * (x.ndim - 1),
                     lambda k, s: jax.random.uniform(k, s, x.dtype))
    noise = direction * radius * eps
  return jnp.clip(x + noise, 0.0, 1.0)


# --------------------------------------------------------------------------
# Attacks.
# --------------------------------------------------------------------------


def _input_gradient(logits_fn: LogitsFn, objective: Objective, x_adv: Array,
                    labels: Array, clean_logits: Array) -> Array:
  """Gradient of the summed per-example objective with respect to the input."""
  def total(z):
    return jnp.sum(objective(logits_fn(z), labels, clean_logits))
  return jax.grad(total)(x_adv)


def fgsm(logits_fn: LogitsFn, x: Array, labels: Array, eps, norm: str = "linf") -> Array:
  """Fast gradient sign method: ``clip01(x + eps * sign(grad_x CE))``.

  With ``norm='l2'`` the fast gradient method: one step of length eps along
  the normalised gradient, then clipped to [0, 1].
  """
  grad = _input_gradient(logits_fn, ce_objective, x, labels, None)
  if norm == "linf":
    return jax.lax.stop_gradient(jnp.clip(x + eps * jnp.sign(grad), 0.0, 1.0))
  step = ascent_direction(grad, norm)
  return jax.lax.stop_gradient(project(x + eps * step, x, eps, norm))


def pgd(logits_fn: LogitsFn, x: Array, labels: Array, *, eps, step_size,
        num_steps: int, key: Optional[Array] = None,
        objective: Union[str, Objective] = "ce", start: str = "uniform",
        norm: str = "linf", num_restarts: int = 1) -> Array:
  """Projected gradient ascent on ``objective`` inside the eps-ball ∩ [0, 1].

  Args:
    logits_fn: ``x -> logits``, any JAX-traceable function (a closure over
      the model's parameters, in inference mode for BatchNorm models).
    x: clean inputs in ``[0, 1]``, batch first.
    labels: integer labels ``[B]``.
    eps, step_size: radius and step size, in pixel units (may be traced).
    num_steps: number of iterations (static: it fixes the compiled loop).
    key: PRNG key, or one key per example (``[B]``); required unless
      ``start == 'none'``.
    objective: ``'ce'``, ``'kl'`` or a callable
      ``(adv_logits, labels, clean_logits) -> [B]``.
    start: ``'uniform'``, ``'normal'`` or ``'none'``.
    norm: ``'linf'`` or ``'l2'``.
    num_restarts: independent random starts (static). Per example, the first
      restart that misclassifies (or reaches non-finite logits) is kept;
      otherwise the one with the highest objective. An example is robust only if every restart fails.

  Returns:
    The adversarial inputs, same shape as ``x``, under ``stop_gradient``.
  """
  objective_fn = get_objective(objective)
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")
  if start not in STARTS:
    raise ValueError(f"start must be one of {STARTS}; got {start!r}.")
  if num_steps < 0 or num_restarts < 1:
    raise ValueError("pgd: num_steps must be >= 0 and num_restarts >= 1; got "
                     f"num_steps={num_steps}, num_restarts={num_restarts}.")
  if key is None:
    if start != "none":
      raise ValueError(f"pgd: a PRNG `key` is needed for start={start!r}.")
    key = jax.random.PRNGKey(0)
  x = jax.lax.stop_gradient(x)
  clean_logits = jax.lax.stop_gradient(logits_fn(x))

  def one_run(run_key):
    def body(_, x_adv):
      grad = _input_gradient(logits_fn, objective_fn, x_adv, labels, clean_logits)
      return project(x_adv + step_size * ascent_direction(grad, norm), x, eps, norm)
    x_adv = random_start(run_key, x, eps, start, norm)
    x_adv = jax.lax.fori_loop(0, num_steps, body, x_adv)
    return project(x_adv, x, eps, norm)

  if num_restarts == 1:
    return jax.lax.stop_gradient(one_run(key))

  def score(x_adv):
    adv_logits = logits_fn(x_adv)
    # A restart that reaches non-finite logits is kept like one that fools,
    # so the caller sees the non-finite values instead of a clean-looking start.
    fooled = ((jnp.argmax(adv_logits, axis=-1) != labels)
              | ~jnp.all(jnp.isfinite(adv_logits), axis=-1))
    return fooled, objective_fn(adv_logits, labels, clean_logits)

  def restart(i, best):
    best_x, best_fooled, best_loss = best
    x_adv = one_run(fold_in(key, i))
    fooled, loss = score(x_adv)
    # Keep the first restart that fools; among non-fooling ones, the highest loss.
    better = ~best_fooled & (fooled | (loss > best_loss))
    pick = better.reshape((-1,) + (1,) * (x.ndim - 1))
    return (jnp.where(pick, x_adv, best_x), best_fooled | fooled,
            jnp.where(better, loss, best_loss))

  first = one_run(fold_in(key, 0))
  init = (first,) + score(first)
  best_x, _, _ = jax.lax.fori_loop(1, num_restarts, restart, init)
  return jax.lax.stop_gradient(best_x)
