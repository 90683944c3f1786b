"""Margin and smoothness of the paper (docs/ALGORITHMS.md, section 3).

Two layers, each usable on its own:
  * :func:`per_example_measures` and :func:`summarize` -- pure functions of
    clean and adversarial logits: margins ``M(x)``, ``M(x*)``, smoothness
    ``KL(p(x) || p(x*))``, ``log alpha`` (Figure 5), the error decomposition
    ``R_rob = R_nat + R_bdy`` and the quadrants of Figure 8.
  * :func:`analyse` and :func:`analyse_workdir` -- run PGD^50 over a data set
    through the evaluation engine (every device, per-example keys) and write
    the measures and their summary next to a trained run.
The training-time gradient diagnostics (Figures 4, 6, 7) are
``bat_jax.diagnostics``.
"""

import logging
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax import datasets, fs, losses, naming, rundir
from bat_jax.evaluation import engine
from bat_jax.evaluation.metrics import OTHER_METRIC_IDS, make_pgd_logits_metric

Array = jax.Array
Measures = Dict[str, np.ndarray]

# Appendix B.1 reports the fraction of examples whose margin exceeds 0.9.
HIGH_MARGIN = 0.9


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

  Errors follow docs/ALGORITHMS.md section 3 and the paper's equation (7):
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


def analyse(logits_fn: Callable, images, labels, *, eps, step_size,
            num_steps: int = 50, seed: int = 0, batch_size: int = 256,
            params: Any = None, start: str = "uniform", num_restarts: int = 1,
            norm: str = "linf", par=None) -> Tuple[Measures, Dict[str, float]]:
  """Attacks every example with PGD-CE and measures margin and smoothness.

  Args:
    logits_fn: ``x -> logits`` (inference mode), or ``(params, x) -> logits``
      when ``params`` is given; passing the weights as ``params`` keeps them
      an argument of the compiled function instead of a baked-in constant.
    images: ``[N, ...]`` inputs, float in ``[0, 1]`` or uint8 pixels.
    labels: integer ``[N]``.
    eps, step_size, num_steps: the PGD attack (the paper's PGD^50), in
      ``norm`` ('linf' or 'l2', any spelling).
    seed: each example's random start comes from ``seed`` and its index, so
      the result depends neither on ``batch_size`` nor on the devices.
    batch_size: examples per compiled call, over all devices; the last batch
      is padded and masked, so every example is measured exactly once.
    params: optional weights passed to ``logits_fn`` (see above).
    start, num_restarts: passed to :func:`bat_jax.attacks.pgd.pgd`.
    par: the ``bat_jax.parallel`` wrapper (default: pmap over local devices).

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
  datasets.check_labels(labels, None, "the labels passed to analyse")
  if params is None:
    apply_fn, params = (lambda variables, x: logits_fn(x)), {}
  else:
    apply_fn = logits_fn
  metric_id = OTHER_METRIC_IDS["pgd_logits"]
  evaluator = engine.Evaluator(
      apply_fn, params, batch_size=max(1, min(int(batch_size), num)), par=par,
      metrics={"pgd_logits": make_pgd_logits_metric(num_steps, num_restarts, start,
                                                    naming.canonical_norm(norm))},
      key_fn=lambda name, index: engine.per_example_keys(seed, metric_id, index))
  began = time.time()
  out = evaluator.run("pgd_logits", images, labels, eps=eps, step_size=step_size)
  logging.info("analyse: PGD^%d on %d examples in %.1fs", num_steps, num,
               time.time() - began)
  clean_logits, adv_logits = out["clean_logits"], out["adv_logits"]
  measures = jax.tree.map(np.asarray, jax.jit(per_example_measures)(
      clean_logits, adv_logits, labels.astype(np.int32)))
  measures.update(labels=labels.astype(np.int32), clean_logits=clean_logits,
                  adv_logits=adv_logits)
  return measures, summarize(measures)


def analyse_workdir(workdir: str, *, which: str = "best", split: str = "test",
                    num_examples: Optional[int] = None, eps=None,
                    step_size=None, num_steps: int = 50,
                    num_restarts: int = 1, batch_size: int = 256,
                    seed: int = 0, data_dir: Optional[str] = None,
                    data_file: Optional[str] = None) -> Dict[str, Any]:
  """Analyses a trained run and writes ``WORKDIR/analysis/{which}_*``.

  Restores checkpoint ``which`` (``rundir.restore_model``), loads ``split``
  (``datasets.load_split``) and runs :func:`analyse` in the norm the run
  trained in (``config.norm``). ``eps`` defaults to
  the run's ``config.eps``; ``step_size`` to its evaluation PGD step
  ``config.eval_attack_step_size`` (the paper's PGD^50 uses the evaluation
  step: 0.01 on MNIST, 2/255 on CIFAR); ``data_dir`` to ``config.data_dir``
  ("" meaning TFDS's default).

  Writes ``{which}_measures.npz`` (per-example arrays, logits, labels) and
  ``{which}_summary.json`` (the summary plus the attack settings and the
  run's method / dataset / norm / eps), and returns that summary.
  """
  out_dir = os.path.join(workdir, "analysis")
  fs.check_writable(out_dir, "analysis folder (WORKDIR/analysis)")
  restored = rundir.restore_model(workdir, which)
  config, model, variables = restored.config, restored.model, restored.variables
  norm = naming.norm_of(config)
  eps = config.eps if eps is None else eps
  step_size = config.eval_attack_step_size if step_size is None else step_size
  if data_dir is None:
    data_dir = config.data_dir or None
  if data_file is None:
    data_file = config.data_file or None
  images, labels = datasets.load_split(config.dataset, split, data_dir=data_dir,
                                       num_examples=num_examples, data_file=data_file)

  def logits_fn(params, x):
    return model.apply(params, x, train=False)

  measures, summary = analyse(
      logits_fn, images, labels, params=variables, eps=float(eps),
      step_size=float(step_size), num_steps=num_steps,
      num_restarts=num_restarts, seed=seed, batch_size=batch_size, norm=norm)
  summary.update(
      which=which, split=split, norm=norm, eps=float(eps), step_size=float(step_size),
      num_steps=int(num_steps), num_restarts=int(num_restarts), seed=int(seed),
      dataset=config.dataset, method=config.method, train_eps=float(config.eps),
      checkpoint_step=restored.step, weights=restored.weights)

  fs.save_npz(os.path.join(out_dir, f"{which}_measures.npz"), **measures)
  fs.write_json(os.path.join(out_dir, f"{which}_summary.json"), _jsonable(summary),
                indent=2, sort_keys=True)
  logging.info("analyse_workdir(%s, %s): R_nat=%.4f R_bdy=%.4f", workdir,
               which, summary["R_nat"], summary["R_bdy"])
  return summary


def _jsonable(tree: Dict[str, Any]) -> Dict[str, Any]:
  """NumPy scalars -> Python scalars, so ``json.dump`` accepts them."""
  return {k: (v.item() if isinstance(v, np.generic) else v)
          for k, v in tree.items()}
