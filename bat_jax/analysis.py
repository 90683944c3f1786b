"""Margin, smoothness and gradient diagnostics of the paper (SPEC.md section 3).

Three layers, each usable on its own:
  * :func:`per_example_measures` and :func:`summarize` -- pure functions of
    clean and adversarial logits: margins ``M(x)``, ``M(x*)``, smoothness
    ``KL(p(x) || p(x*))``, ``log alpha`` (Figure 5), the error decomposition
    ``R_rob = R_nat + R_bdy`` and the quadrants of Figure 8.
  * :func:`analyse` and :func:`analyse_workdir` -- run PGD^50 over a data set
    (one compiled batch function, padded last batch) and write the measures
    and their summary next to a trained run.
  * :func:`gradient_diagnostics` -- the training-time measures of Figures 4, 6
    and 7 (gradient cosines with ``grad M``, expected margin increase,
    normalised gradient norm); pure JAX, callable inside a jitted train step.
"""

import json
import logging
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax import losses
from bat_jax import attacks

Array = jax.Array
Measures = Dict[str, np.ndarray]

# Appendix B.1 reports the fraction of examples whose margin exceeds 0.9.
HIGH_MARGIN = 0.9
# Guards the denominators of cosines and of the normalised gradient norm.
_TINY = 1e-12


# --------------------------------------------------------------------------
# Per-example measures and their summary.
# --------------------------------------------------------------------------


def per_example_measures(clean_logits: Array, adv_logits: Array,
                         labels: Array) -> Dict[str, Array]:
  """Per-example margin / smoothness / log-alpha measures from logits.

  Args:
    clean_logits: ``[N, C]`` logits at the clean inputs ``x``.
    adv_logits: ``[N, C]`` logits at the adversarial inputs ``x*``.
    labels: integer ``[N]``.

  Returns:
    A dict of ``[N]`` arrays:
      ``margin_clean`` ``M(x) = p_y(x) - max_{i!=y} p_i(x)``;
      ``margin_adv`` ``M(x*)``;
      ``kl`` ``KL(p(x) || p(x*))``;
      ``log_alpha_true`` ``log(p_y(x) / p_y(x*))``;
      ``log_alpha_target`` ``log(p_t(x) / p_t(x*))`` with
        ``t = argmax_{i!=y} p_i(x*)``, the class the attack pushed towards;
      ``target`` that ``t``;
      ``correct_clean`` / ``correct_adv`` whether the argmax equals ``y``.
    Log-ratios are differences of log-softmaxes, so they stay finite when the
    probabilities underflow.
  """
  labels = jnp.asarray(labels)
  clean_log_p = jax.nn.log_softmax(clean_logits, axis=-1)
  adv_log_p = jax.nn.log_softmax(adv_logits, axis=-1)
  log_ratio = clean_log_p - adv_log_p

  is_true = jax.nn.one_hot(labels, adv_logits.shape[-1], dtype=bool)
  target = jnp.argmax(jnp.where(is_true, -jnp.inf, adv_log_p), axis=-1)

  def pick(values, classes):
    return jnp.take_along_axis(values, classes[:, None], axis=-1)[:, 0]

  return {
      "margin_clean": losses.margin(clean_logits, labels),
      "margin_adv": losses.margin(adv_logits, labels),
      "kl": losses.kl_divergence(clean_logits, adv_logits),
      "log_alpha_true": pick(log_ratio, labels),
      "log_alpha_target": pick(log_ratio, target),
      "target": target,
      "correct_clean": jnp.argmax(clean_logits, axis=-1) == labels,
      "correct_adv": jnp.argmax(adv_logits, axis=-1) == labels,
  }


def summarize(measures: Mapping[str, Any],
              high_margin: float = HIGH_MARGIN) -> Dict[str, float]:
  """Data-set level numbers from :func:`per_example_measures` output.

  Errors follow SPEC.md section 3 and the paper's equation (7):
    ``R_nat = P[clean wrong]``, ``R_bdy = P[clean right and adversarial
    wrong]``, ``R_rob = R_nat + R_bdy``; ``robust_acc = 1 - R_rob`` counts an
    example as robust only if both its clean and adversarial predictions are
    right (``adv_acc`` is the plain accuracy on ``x*``, which differs only by
    the rare examples an attack turns from wrong to right).
  Quadrants of the ``(M(x), M(x*))`` plane, with a zero margin counted as
  wrong: I ``M(x)>0, M(x*)>0`` (robust), II ``M(x)<=0, M(x*)>0``, III
  ``M(x)<=0, M(x*)<=0`` (natural error), IV ``M(x)>0, M(x*)<=0`` (boundary
  error).
  """
  m_clean = np.asarray(measures["margin_clean"], np.float64)
  m_adv = np.asarray(measures["margin_adv"], np.float64)
  kl = np.asarray(measures["kl"], np.float64)
  log_alpha_true = np.asarray(measures["log_alpha_true"], np.float64)
  log_alpha_target = np.asarray(measures["log_alpha_target"], np.float64)
  correct_clean = np.asarray(measures["correct_clean"], bool)
  correct_adv = np.asarray(measures["correct_adv"], bool)
  if m_clean.size == 0:
    raise ValueError("summarize: the measures hold no examples.")

  def frac(mask):
    return float(np.mean(mask))

  r_nat = frac(~correct_clean)
  r_bdy = frac(correct_clean & ~correct_adv)
  pos_clean, pos_adv = m_clean > 0, m_adv > 0
  return {
      "num_examples": int(m_clean.size),
      "R_nat": r_nat,
      "R_bdy": r_bdy,
      "R_rob": r_nat + r_bdy,
      "clean_acc": 1.0 - r_nat,
      "robust_acc": 1.0 - (r_nat + r_bdy),
      "adv_acc": frac(correct_adv),
      "mean_margin_clean": float(np.mean(m_clean)),
      "mean_margin_adv": float(np.mean(m_adv)),
      "mean_kl": float(np.mean(kl)),
      "median_kl": float(np.median(kl)),
      "mean_log_alpha_true": float(np.mean(log_alpha_true)),
      "mean_log_alpha_target": float(np.mean(log_alpha_target)),
      # Proposition 1's assumption: log alpha_y > 0 and log alpha_t < 0.
      "frac_log_alpha_true_positive": frac(log_alpha_true > 0),
      "frac_log_alpha_target_negative": frac(log_alpha_target < 0),
      "high_margin_threshold": float(high_margin),
      "frac_high_margin_clean": frac(m_clean > high_margin),
      "frac_high_margin_adv": frac(m_adv > high_margin),
      "quadrant_I": frac(pos_clean & pos_adv),
      "quadrant_II": frac(~pos_clean & pos_adv),
      "quadrant_III": frac(~pos_clean & ~pos_adv),
      "quadrant_IV": frac(pos_clean & ~pos_adv),
  }


# --------------------------------------------------------------------------
# PGD^50 over a data set.
# --------------------------------------------------------------------------


def _make_batch_attack(logits_fn: Callable, with_params: bool, num_steps: int,
                       start: str, num_restarts: int) -> Callable:
  """One jitted ``(params, x, labels, key, eps, step_size) -> (clean, adv logits)``.

  ``eps`` and ``step_size`` are traced, so changing them does not recompile;
  the batch shape is fixed by the caller (the last batch is padded).
  """
  def attack(params, x, labels, key, eps, step_size):
    if with_params:
      apply = lambda z: logits_fn(params, z)
    else:
      apply = logits_fn
    x_adv = attacks.pgd(apply, x, labels, eps=eps, step_size=step_size,
                        num_steps=num_steps, key=key, objective="ce",
                        start=start, num_restarts=num_restarts)
    return apply(x), apply(x_adv)
  return jax.jit(attack)


def _to_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1]; float inputs are passed through."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32, copy=False)


def _padded_batch(images: np.ndarray, labels: np.ndarray, start: int,
                  batch_size: int) -> Tuple[np.ndarray, np.ndarray, int]:
  """``images[start:start+batch_size]`` padded with zeros to ``batch_size``.

  Returns the batch, its labels and the number of real (unpadded) rows.
  """
  x = _to_unit_float(images[start:start + batch_size])
  y = labels[start:start + batch_size].astype(np.int32)
  valid = len(x)
  if valid < batch_size:
    x = np.concatenate([x, np.zeros((batch_size - valid,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((batch_size - valid,), y.dtype)])
  return x, y, valid


def analyse(logits_fn: Callable, images, labels, *, eps, step_size,
            num_steps: int = 50, key: Array, batch_size: int = 256,
            params: Any = None, start: str = "uniform",
            num_restarts: int = 1) -> Tuple[Measures, Dict[str, float]]:
  """Attacks every example with PGD-CE and measures margin and smoothness.

  Args:
    logits_fn: ``x -> logits`` (inference mode), or ``(params, x) -> logits``
      when ``params`` is given; passing the weights as ``params`` keeps them
      an argument of the compiled function instead of a baked-in constant.
    images: ``[N, ...]`` inputs, float in ``[0, 1]`` or uint8 pixels (scaled
      by 1/255 batch by batch).
    labels: integer ``[N]``.
    eps, step_size, num_steps: the PGD attack (the paper's PGD^50).
    key: PRNG key; batch ``i`` uses ``fold_in(key, i)``.
    batch_size: examples per compiled call; the last batch is zero-padded and
      its padding dropped, so every example is measured exactly once and the
      function compiles once.
    params: optional weights passed to ``logits_fn`` (see above).
    start, num_restarts: passed to :func:`bat_jax.attacks.pgd.pgd`.

  Returns:
    ``(measures, summary)``: the :func:`per_example_measures` arrays as NumPy
    plus ``labels``, ``clean_logits`` and ``adv_logits``; and
    :func:`summarize` of them.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  num = len(images)
  if num == 0 or len(labels) != num:
    raise ValueError(f"analyse: need matching non-empty images and labels; "
                     f"got {num} images and {len(labels)} labels.")
  batch_size = max(1, min(int(batch_size), num))
  attack = _make_batch_attack(logits_fn, params is not None, num_steps, start,
                              num_restarts)
  began = time.time()
  pending = []  # Dispatch every batch before reading any back.
  for index, offset in enumerate(range(0, num, batch_size)):
    x, y, valid = _padded_batch(images, labels, offset, batch_size)
    out = attack(params, x, y, jax.random.fold_in(key, index), eps, step_size)
    pending.append((out, valid))
  clean_logits = np.concatenate([np.asarray(c)[:v] for (c, _), v in pending])
  adv_logits = np.concatenate([np.asarray(a)[:v] for (_, a), v in pending])
  logging.info("analyse: PGD^%d on %d examples in %.1fs", num_steps, num,
               time.time() - began)

  measures = jax.tree.map(np.asarray, jax.jit(per_example_measures)(
      clean_logits, adv_logits, labels.astype(np.int32)))
  measures.update(labels=labels.astype(np.int32), clean_logits=clean_logits,
                  adv_logits=adv_logits)
  return measures, summarize(measures)


def _config_value(config: Any, name: str, default: Any = None) -> Any:
  """``config.name`` for ConfigDicts, dicts and plain objects alike."""
  if isinstance(config, Mapping):
    return config.get(name, default)
  try:
    return getattr(config, name)
  except (AttributeError, KeyError):
    return default


def analyse_workdir(workdir: str, *, which: str = "best", split: str = "test",
                    num_examples: Optional[int] = None, eps=None,
                    step_size=None, num_steps: int = 50,
                    num_restarts: int = 1, batch_size: int = 256,
                    seed: int = 0,
                    data_dir: Optional[str] = None,
                    data_file: Optional[str] = None) -> Dict[str, Any]:
  """Analyses a trained run and writes ``WORKDIR/analysis/{which}_*``.

  Restores checkpoint ``which`` with ``bat_jax.train.restore_model``, loads
  ``split`` with ``bat_jax.input_pipeline.load_split`` and runs
  :func:`analyse`. ``eps`` defaults to the run's ``config.eps``;
  ``step_size`` to its evaluation PGD step ``config.eval_attack_step_size``
  (the paper's PGD^50 uses the evaluation step: 0.01 on MNIST, 2/255 on
  CIFAR), else ``config.attack_step_size``; ``data_dir`` to
  ``config.data_dir`` ("" meaning TFDS's default); ``data_file`` (a local
  .npz replacing TFDS) to ``config.data_file``.

  Writes ``{which}_measures.npz`` (per-example arrays, logits, labels) and
  ``{which}_summary.json`` (the summary plus the attack settings and the
  run's method / dataset / eps), and returns that summary.
  """
  # Imported here: the trainer and the input pipeline are heavier and are
  # not needed by the pure functions above.
  from bat_jax.input_pipeline import load_split
  from bat_jax.train import restore_model

  restored = restore_model(workdir, which)
  config, model, variables = restored.config, restored.model, restored.variables
  eps = _config_value(config, "eps") if eps is None else eps
  if step_size is None:
    step_size = _config_value(config, "eval_attack_step_size")
    if step_size is None:
      step_size = _config_value(config, "attack_step_size")
  if eps is None or step_size is None:
    raise ValueError(
        f"analyse_workdir: the config of {workdir} has no eps / attack step "
        "size; pass eps= and step_size= explicitly.")
  dataset = _config_value(config, "dataset")
  if data_dir is None:
    data_dir = _config_value(config, "data_dir") or None
  if data_file is None:
    data_file = _config_value(config, "data_file") or None
  # Passed only when set, so load_split stand-ins without it keep working.
  extra = {"data_file": data_file} if data_file else {}
  images, labels = load_split(dataset, split, data_dir=data_dir,
                              num_examples=num_examples, **extra)

  def logits_fn(params, x):
    return model.apply(params, x, train=False)

  measures, summary = analyse(
      logits_fn, images, labels, params=variables, eps=float(eps),
      step_size=float(step_size), num_steps=num_steps,
      num_restarts=num_restarts, key=jax.random.PRNGKey(seed),
      batch_size=batch_size)
  summary.update(
      which=which, split=split, eps=float(eps), step_size=float(step_size),
      num_steps=int(num_steps), num_restarts=int(num_restarts), seed=int(seed),
      dataset=dataset, method=_config_value(config, "method"),
      train_eps=_config_value(config, "eps"),
      checkpoint_step=getattr(restored, "step", None))

  out_dir = os.path.join(workdir, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  np.savez_compressed(os.path.join(out_dir, f"{which}_measures.npz"), **measures)
  with open(os.path.join(out_dir, f"{which}_summary.json"), "w") as f:
    json.dump(_jsonable(summary), f, indent=2, sort_keys=True)
  logging.info("analyse_workdir(%s, %s): R_nat=%.4f R_bdy=%.4f", workdir,
               which, summary["R_nat"], summary["R_bdy"])
  return summary


def _jsonable(tree: Dict[str, Any]) -> Dict[str, Any]:
  """NumPy scalars -> Python scalars, so ``json.dump`` accepts them."""
  return {k: (v.item() if isinstance(v, np.generic) else v)
          for k, v in tree.items()}


# --------------------------------------------------------------------------
# Training-time gradient diagnostics (Figures 4, 6, 7).
# --------------------------------------------------------------------------


def gradient_diagnostics(loss_terms: Mapping[str, Callable[[Any], Array]],
                         total_loss_fn: Callable[[Any], Array],
                         margin_fn: Callable[[Any], Array],
                         params: Any) -> Dict[str, Array]:
  """How each loss term's descent direction moves the margin ``M(x)``.

  All gradients are with respect to ``params`` (any pytree). With ``g_f`` the
  gradient of ``f`` and ``g_M`` that of ``margin_fn``, returns scalars:
    ``cos_{name}_margin``    cosine(-g_name, g_M) (Figure 4), also for
                             ``total``;
    ``margin_increase``      ``g_M . (-g_total)``, the first-order margin
                             gain of a unit-rate descent step (Figure 6 top);
    ``margin_increase_{name}`` the same for each term;
    ``grad_norm_ratio``      ``||g_total|| / |total|`` (equation 6, Figure 7);
    ``grad_norm_ratio_{name}`` the same for each term;
    ``margin``               the value of ``margin_fn`` (Figure 6 bottom);
    ``loss``                 the value of ``total_loss_fn``.
  One forward pass of all functions and one batched (vmapped) backward pass;
  pure JAX, so it can run inside a jitted or pmapped train step. Gradient
  dot products use full float32 precision (TPU matmuls default to bf16).
  """
  names = list(loss_terms)
  for name in names:
    if name == "total":
      raise ValueError("gradient_diagnostics: 'total' is reserved for "
                       "total_loss_fn; rename that loss term.")
  fns = [loss_terms[name] for name in names] + [total_loss_fn, margin_fn]
  total_index, margin_index = len(names), len(names) + 1

  def stacked(p):
    return jnp.stack([jnp.asarray(fn(p), jnp.float32).reshape(()) for fn in fns])

  values, vjp = jax.vjp(stacked, params)
  (grads,) = jax.vmap(vjp)(jnp.eye(len(fns), dtype=values.dtype))
  gram = _gram_matrix(grads)  # gram[i, j] = g_i . g_j
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

  def descent_vs_margin(i):
    increase = -gram[i, margin_index]
    cosine = increase / jnp.maximum(norms[i] * norms[margin_index], _TINY)
    ratio = norms[i] / jnp.maximum(jnp.abs(values[i]), _TINY)
    return increase, cosine, ratio

  out = {}
  for i, name in enumerate(names):
    increase, cosine, ratio = descent_vs_margin(i)
    out[f"cos_{name}_margin"] = cosine
    out[f"margin_increase_{name}"] = increase
    out[f"grad_norm_ratio_{name}"] = ratio
  increase, cosine, ratio = descent_vs_margin(total_index)
  out.update(cos_total_margin=cosine, margin_increase=increase,
             grad_norm_ratio=ratio, margin=values[margin_index],
             loss=values[total_index])
  return out


def _gram_matrix(stacked_grads: Any) -> Array:
  """``[K, K]`` dot products of K gradient pytrees stacked on a leading axis.

  Summed leaf by leaf, so no flattened copy of all parameters is built.
  """
  gram = None
  for leaf in jax.tree_util.tree_leaves(stacked_grads):
    flat = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
    part = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
    gram = part if gram is None else gram + part
  if gram is None:
    raise ValueError("gradient_diagnostics: params has no array leaves.")
  return gram
