"""Pure-functional adversarial-training losses on logits (docs/ALGORITHMS.md section 1).

Every function here takes arrays and returns arrays; nothing depends on Flax,
on the trainer or on global state, so any JAX project can
``import bat_jax.losses``.

Conventions
  * ``logits``: ``[B, C]``; ``labels``: integer ``[B]``.
  * Per-example functions return ``[B]``.
  * Objectives return ``(loss, aux)``: ``loss`` is the scalar batch mean that is
    differentiated, ``aux`` a dict of scalar components for logging.
  * Gradients flow through every argument, including the "target" distribution
    of each KL term, exactly as in the authors' reference code. Pass
    ``stop_gradient_target=True`` to detach the targets instead.
  * ``label_smoothing`` (a Python float ``s`` in ``[0, 1)``) replaces the one-hot
    target of the cross-entropy terms that take labels by
    ``(1 - s) * onehot + s / C``; at 0.0 they compute exactly the plain CE.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
LossAndAux = Tuple[Array, Dict[str, Array]]

# Small constants from the MART reference implementation (docs/ALGORITHMS.md section 1).
MART_BCE_EPS = 1.0001
MART_KL_EPS = 1e-12
MART_WEIGHT_EPS = 1.0000001


# --------------------------------------------------------------------------
# Per-example building blocks.
# --------------------------------------------------------------------------


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
  """Softmax cross-entropy per example, ``[B]``: ``-log p(x)_y``, or with
  ``label_smoothing = s > 0`` the CE to ``(1 - s) * onehot(y) + s / C``,
  ``(1 - s) * (-log p_y) + s * mean_c(-log p_c)``."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  if label_smoothing == 0.0:  # a Python number: s = 0 is the plain CE's program
    return nll
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)


def kl_divergence(p_logits: Array, q_logits: Array) -> Array:
  """``KL(softmax(p) || softmax(q))`` summed over classes, ``[B]``.

  Gradients flow into both arguments (no stop-gradient on ``p``).
  """
  p_log = jax.nn.log_softmax(p_logits, axis=-1)
  q_log = jax.nn.log_softmax(q_logits, axis=-1)
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def margin(logits: Array, labels: Array) -> Array:
  """The paper's margin ``M(x) = p_y - max_{i != y} p_i`` in probability space, ``[B]``."""
  probs = jax.nn.softmax(logits, axis=-1)
  return _true_minus_best_other(probs, labels)


def _true_minus_best_other(scores: Array, labels: Array) -> Array:
  """``s_y - max_{i != y} s_i`` for scores ``[B, C]``."""
  true_score = jnp.take_along_axis(scores, labels[..., None], axis=-1)[..., 0]
  is_true = jax.nn.one_hot(labels, scores.shape[-1], dtype=bool)
  best_other = jnp.max(jnp.where(is_true, -jnp.inf, scores), axis=-1)
  return true_score - best_other


def _maybe_stop(x: Array, stop: bool) -> Array:
  return jax.lax.stop_gradient(x) if stop else x


# --------------------------------------------------------------------------
# Training objectives (scalar loss, aux dict).
# --------------------------------------------------------------------------


def standard_loss(clean_logits: Array, labels: Array,
                  label_smoothing: float = 0.0) -> LossAndAux:
  """Natural training: mean CE on clean inputs."""
  ce = jnp.mean(cross_entropy(clean_logits, labels, label_smoothing))
  return ce, {"ce": ce}


def at_loss(adv_logits: Array, labels: Array, label_smoothing: float = 0.0) -> LossAndAux:
  """Madry adversarial training: mean CE on the adversarial inputs."""
  ce = jnp.mean(cross_entropy(adv_logits, labels, label_smoothing))
  return ce, {"adv_ce": ce}


def trades_loss(clean_logits: Array, adv_logits: Array, labels: Array,
                beta: float, stop_gradient_target: bool = False,
                label_smoothing: float = 0.0) -> LossAndAux:
  """TRADES: ``CE(f(x), y) + beta * KL(p(x) || p(x*))`` (batch mean)."""
  ce = jnp.mean(cross_entropy(clean_logits, labels, label_smoothing))
  target = _maybe_stop(clean_logits, stop_gradient_target)
  kl = jnp.mean(kl_divergence(target, adv_logits))
  return ce + beta * kl, {"ce": ce, "kl": kl}


def bat_loss(clean_logits: Array, bridge_logits: Array, labels: Array,
             beta: float, stop_gradient_target: bool = False,
             label_smoothing: float = 0.0) -> LossAndAux:
  """Bridged AT: ``CE(f(x), y) + beta * sum_k KL(p(g(k/m)) || p(g((k+1)/m)))``.

  Args:
    clean_logits: ``[B, C]``, the logits at ``g(0) = x``.
    bridge_logits: ``[m, B, C]``, the logits at ``g(k/m)`` for ``k = 1..m``
      (the last one is the adversarial example ``x*``).
    labels: ``[B]``.
    beta: weight of the bridge sum.
    stop_gradient_target: detach the left-hand distribution of each KL term.
    label_smoothing: of the clean CE's target.

  With ``m = 1`` this is exactly :func:`trades_loss`.
  """
  if bridge_logits.ndim != clean_logits.ndim + 1:
    raise ValueError(
        "bat_loss: bridge_logits must have shape [m, B, C] (one leading "
        f"bridge axis); got {bridge_logits.shape} with clean_logits "
        f"{clean_logits.shape}.")
  ce = jnp.mean(cross_entropy(clean_logits, labels, label_smoothing))
  path = jnp.concatenate([clean_logits[None], bridge_logits], axis=0)
  left = _maybe_stop(path[:-1], stop_gradient_target)
  kl_per_bridge = jnp.mean(kl_divergence(left, path[1:]), axis=-1)  # [m]
  bridge_kl = jnp.sum(kl_per_bridge)
  return ce + beta * bridge_kl, {"ce": ce, "kl": bridge_kl,
                                 "kl_last_bridge": kl_per_bridge[-1]}


def mart_loss(clean_logits: Array, adv_logits: Array, labels: Array,
              beta: float, stop_gradient_target: bool = False,
              label_smoothing: float = 0.0) -> LossAndAux:
  """MART (Wang et al. 2020) with the reference implementation's constants.

  ``BCE(x*, y) + beta * mean_b[KL(p(x) || p(x*)) * (1 - p(x)_y)]`` where
  ``BCE = CE(f(x*), y) + mean_b[-log(1.0001 - p(x*)_{y'})]`` and ``y'`` is the
  most likely wrong class under ``p(x*)``. ``label_smoothing`` smooths the
  target of the CE part only: the wrong-class term and the weight keep ``y``.
  """
  num_classes = adv_logits.shape[-1]
  adv_probs = jax.nn.softmax(adv_logits, axis=-1)
  is_true = jax.nn.one_hot(labels, num_classes, dtype=bool)
  # The reference sorts probabilities and takes the best one that is not y.
  wrong_class = jnp.argmax(jnp.where(is_true, -jnp.inf, adv_probs), axis=-1)
  p_wrong = jnp.take_along_axis(adv_probs, wrong_class[:, None], axis=-1)[:, 0]
  adv_ce = jnp.mean(cross_entropy(adv_logits, labels, label_smoothing))
  wrong_term = jnp.mean(-jnp.log(MART_BCE_EPS - p_wrong))
  bce = adv_ce + wrong_term

  clean_probs = jax.nn.softmax(clean_logits, axis=-1)
  target = _maybe_stop(clean_probs, stop_gradient_target)
  kl_per_example = jnp.sum(
      target * (jnp.log(target + MART_KL_EPS) - jnp.log(adv_probs + MART_KL_EPS)),
      axis=-1)
  p_true = jnp.take_along_axis(clean_probs, labels[:, None], axis=-1)[:, 0]
  weight = _maybe_stop(MART_WEIGHT_EPS - p_true, stop_gradient_target)
  weighted_kl = jnp.mean(kl_per_example * weight)
  return bce + beta * weighted_kl, {"bce": bce, "adv_ce": adv_ce,
                                    "kl": weighted_kl}


# --------------------------------------------------------------------------
# The BAT path.
# --------------------------------------------------------------------------


def bridge_points(x: Array, x_adv: Array, num_bridges: int) -> Array:
  """Points ``g(k/m) = x + (k/m)(x* - x)`` for ``k = 1..m``, shape ``[m, *x.shape]``.

  ``delta = x* - x`` is treated as a constant of the attack (stop-gradient);
  the last point equals ``x_adv`` exactly.
  """
  if num_bridges < 1:
    raise ValueError(f"bridge_points: num_bridges must be >= 1, got {num_bridges}.")
  delta = jax.lax.stop_gradient(x_adv - x)
  fractions = jnp.arange(1, num_bridges + 1, dtype=x.dtype) / num_bridges
  fractions = fractions.reshape((num_bridges,) + (1,) * x.ndim)
  points = x[None] + fractions * delta[None]
  # The last point is x_adv itself (x + (x_adv - x) can differ in the last bit),
  # so that m = 1 reproduces TRADES exactly.
  return points.at[-1].set(jax.lax.stop_gradient(x_adv))
