"""Robust accuracy of one model: clean, FGSM, PGD^50 x 10 and AutoAttack, with sanity checks.

:func:`evaluate` takes a model (``apply_fn`` and variables) and uint8 images
and returns accuracies as fractions, AutoAttack's accuracy after each stage,
timings, the sanity checks, and the protocol that produced the numbers.
:func:`evaluate_with` does the same with a ready :class:`Evaluator`, so
several checkpoints of one architecture compile each metric once.
"""

import time
from typing import Any, Callable, Dict

from absl import logging
import jax
import numpy as np

from bat_jax.evaluation import sanity as sanity_lib
from bat_jax.evaluation.engine import Evaluator
from bat_jax.evaluation.metrics import ATTACKS, Protocol


def make_evaluator(apply_fn: Callable, variables: Any, protocol: Protocol, *,
                   batch_size: int, par=None) -> Evaluator:
  """An :class:`Evaluator` of ``protocol``'s metrics and per-example keys."""
  return Evaluator(apply_fn, variables, batch_size=batch_size,
                   metrics=protocol.metrics(), key_fn=protocol.key_fn(), par=par)


def evaluate(apply_fn: Callable, variables: Any, images: np.ndarray,
             labels: np.ndarray, *, eps: float, pgd_step_size: float,
             protocol: Protocol = Protocol(), batch_size: int = 500,
             sanity_examples: int = sanity_lib.SANITY_EXAMPLES,
             large_eps: float = sanity_lib.LARGE_EPS,
             tolerance: float = sanity_lib.TOLERANCE, par=None) -> Dict[str, Any]:
  """Clean / FGSM / PGD / AutoAttack accuracies of one model, and sanity checks.

  ``apply_fn(variables, x) -> logits`` (inference mode), ``images`` uint8
  ``[N, H, W, C]``. See :func:`evaluate_with` for the other arguments and
  the result.
  """
  evaluator = make_evaluator(apply_fn, variables, protocol,
                             batch_size=min(batch_size, len(images)), par=par)
  return evaluate_with(evaluator, images, labels, eps=eps, pgd_step_size=pgd_step_size,
                       protocol=protocol, sanity_examples=sanity_examples,
                       large_eps=large_eps, tolerance=tolerance)


def evaluate_with(evaluator: Evaluator, images: np.ndarray, labels: np.ndarray, *,
                  eps: float, pgd_step_size: float, protocol: Protocol = Protocol(),
                  sanity_examples: int = sanity_lib.SANITY_EXAMPLES,
                  large_eps: float = sanity_lib.LARGE_EPS,
                  tolerance: float = sanity_lib.TOLERANCE) -> Dict[str, Any]:
  """:func:`evaluate` with a ready :class:`Evaluator` of ``protocol``'s metrics.

  Runs ``protocol.attacks`` on every example, then the sanity checks on the
  first ``sanity_examples`` examples rounded up to whole batches (0: no
  checks). Returns accuracies as fractions (None for attacks not run),
  AutoAttack's accuracy after each stage, timings in seconds (compilation
  included), the sanity measurements and warnings, and the settings.
  """
  if not 0 <= eps <= 1:
    raise ValueError(f"eps={eps} must lie in [0, 1] (pixel units, e.g. 8/255).")
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  if images.dtype != np.uint8 or len(images) != len(labels) or not len(images):
    raise ValueError("evaluate: need uint8 images [N, H, W, C] and N labels, N > 0; "
                     f"got {images.dtype} {images.shape} and {labels.shape}.")
  results: Dict[str, Any] = {f"{name}_acc": None for name in ATTACKS}
  results["autoattack_per_attack"] = None
  timings, per_example = {}, {}
  began = time.time()
  for name in ATTACKS:
    if name not in protocol.attacks:
      continue
    start = time.time()
    out = evaluator.run(name, images, labels, eps=eps, step_size=pgd_step_size)
    timings[name] = time.time() - start
    if name == "autoattack":
      # Stages in the order they ran (device_get sorts dictionary keys).
      stages = ("clean",) + protocol.autoattack.attack_names()
      per_attack = {stage: float(np.mean(out[stage])) for stage in stages}
      results["autoattack_per_attack"] = per_attack
      results["autoattack_acc"] = list(per_attack.values())[-1]
    else:
      per_example[name] = out["correct"]
      results[f"{name}_acc"] = float(np.mean(out["correct"]))
    logging.info("%s accuracy %.4f on %d examples (%.1fs)", name,
                 results[f"{name}_acc"], len(images), timings[name])

  sanity, warnings = {}, []
  if sanity_examples > 0:
    start = time.time()
    subset = min(len(images), -(-sanity_examples // evaluator.batch_size)
                 * evaluator.batch_size)
    pgd_at_eps = per_example["pgd"][:subset] if "pgd" in per_example else None
    sanity = sanity_lib.sanity_measurements(
        evaluator, images[:subset], labels[:subset], eps=eps, step_size=pgd_step_size,
        pgd_steps=protocol.pgd_steps, large_eps=large_eps, pgd_at_eps=pgd_at_eps)
    warnings = sanity_lib.sanity_warnings(sanity, results, tolerance=tolerance)
    timings["sanity"] = time.time() - start
    for warning in warnings:
      logging.warning("Sanity check: %s", warning)
  timings["total"] = time.time() - began
  results.update(
      eps=float(eps), num_examples=int(len(images)), timings_s=timings,
      sanity=sanity, sanity_warnings=warnings,
      settings={"attacks": [a for a in ATTACKS if a in protocol.attacks],
                "pgd_steps": int(protocol.pgd_steps),
                "pgd_restarts": int(protocol.pgd_restarts),
                "pgd_step_size": float(pgd_step_size),
                "autoattack": protocol.autoattack.describe(),
                "batch_size": evaluator.batch_size, "seed": protocol.seed,
                "devices": len(evaluator.par.devices) * jax.process_count(),
                "tolerance": tolerance})
  return results
