"""Sanity checks of a robustness evaluation: warnings, never failures.

Measured on the first examples (200), they catch what makes robust accuracy
meaningless: an attack that changes unperturbed inputs, accuracy that rises
with eps, a stronger attack doing worse than a weaker one, a model a huge eps
cannot break, and input gradients that are exactly zero (gradient masking).
Attacks that met NaN or inf are named first (:func:`non_finite_warnings`);
then the other warnings point at them rather than at gradient masking.
"""

from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from bat_jax.evaluation import stages
from bat_jax.evaluation.resume import StageRunner

# Thresholds (accuracies are fractions in [0, 1]).
TOLERANCE = 0.01             # allowed violation of an ordering between accuracies
LARGE_EPS = 1.0              # L-inf radius that contains the whole input box
LARGE_EPS_MAX_ACC = 0.02     # PGD accuracy above this at LARGE_EPS is suspicious
ZERO_GRAD_MAX_FRACTION = 0.01  # examples with an all-zero input gradient
SANITY_EXAMPLES = 200


def sanity_measurements(runner: StageRunner, count: int, *, eps: float,
                        step_size: float, pgd_steps: int, large_eps: float = LARGE_EPS,
                        pgd_at_eps: Optional[np.ndarray] = None,
                        clean: Optional[np.ndarray] = None) -> Dict[str, Any]:
  """The numbers the sanity checks judge, measured on the first ``count`` examples.

  PGD runs at 0, eps/2, eps, 2 eps (step size scaled with eps; none past
  ``large_eps``, the radius whose ball holds the whole input box in the
  evaluation's norm: 1 in L-inf, the box's diagonal in L2) and at
  ``large_eps`` (step ``2.5 large_eps / steps``, Madry et al.'s rule), each a
  stage of ``runner`` (saved and resumed like the attacks). ``pgd_at_eps``
  and ``clean`` reuse per-example results of the whole evaluation (same keys,
  same numbers). ``runner`` runs the metrics of a ``stages.Protocol`` with
  ``pgd_steps``.
  """
  select = np.arange(len(runner.images)) < count

  def accuracy(stage, metric, **kwargs):
    return float(np.mean(runner.run(f"sanity.{stage}", metric, select=select,
                                    **kwargs)["correct"][select]))

  # Radii past large_eps (the ball that holds the whole box, in the norm) add nothing.
  sweep = sorted({0.0, min(0.5 * eps, large_eps), min(eps, large_eps),
                  min(2.0 * eps, large_eps)})
  pgd_sweep = []
  for e in sweep:
    e_step = step_size * e / eps if eps > 0 else step_size
    if e == eps and pgd_at_eps is not None:
      acc = float(np.mean(pgd_at_eps[select]))
    else:
      acc = accuracy(f"pgd_eps{e:.6g}", "pgd", eps=e, step_size=e_step)
    pgd_sweep.append({"eps": e, "step_size": e_step, "acc": acc})
  large_step = 2.5 * large_eps / max(pgd_steps, 1)
  zero_grad = runner.run("sanity.zero_grad", "zero_grad", select=select)["zero_grad"]
  clean_acc = (float(np.mean(clean[select])) if clean is not None
               else accuracy("clean", "clean"))
  return {
      "num_examples": int(count),
      "clean_acc": clean_acc,
      "pgd_eps_sweep": pgd_sweep,
      "large_eps": float(large_eps),
      "large_eps_step_size": large_step,
      "large_eps_pgd_acc": accuracy("pgd_large_eps", "pgd", eps=large_eps,
                                    step_size=large_step),
      "zero_grad_fraction": float(np.mean(zero_grad[select])),
  }


def sanity_warnings(sanity: Mapping[str, Any], accuracies: Mapping[str, Any], *,
                    tolerance: float = TOLERANCE,
                    large_eps_max_acc: float = LARGE_EPS_MAX_ACC,
                    zero_grad_max_fraction: float = ZERO_GRAD_MAX_FRACTION,
                    non_finite: Optional[Mapping[str, int]] = None) -> List[str]:
  """What looks wrong in an evaluation, as human-readable warnings.

  ``sanity`` is :func:`sanity_measurements` output; ``accuracies`` holds the
  full-set ``<stage>_acc`` (missing or None: not checked). Checks: PGD at
  eps = 0 equals clean; PGD accuracy does not increase with eps; no stage's
  accuracy exceeds those its registry entry says bound it
  (``stages.ordering``: AutoAttack <= PGD <= FGSM <= clean); a huge eps
  breaks (almost) everything; input gradients are not zero.
  ``non_finite`` (per stage, examples that met NaN or inf): when any did,
  the warnings name them as the likely cause instead of gradient masking.
  """
  warnings = []
  if any((non_finite or {}).values()):
    masked = "the non-finite values above, not necessarily gradient masking"
    weak_attack, stronger, constant, zero_cause = masked, masked, masked, masked
  else:
    weak_attack = "a weak or masked attack"
    stronger = "gradient masking or a bug"
    constant = "the model may be (near) constant or mask its gradients"
    zero_cause = ("gradient masking (saturated softmax, dead units or a "
                  "non-differentiable model)")
  sweep = sanity.get("pgd_eps_sweep") or []
  at_zero = [p["acc"] for p in sweep if p["eps"] == 0]
  clean = sanity.get("clean_acc")
  if at_zero and clean is not None and abs(at_zero[0] - clean) > tolerance:
    warnings.append(f"PGD at eps=0 gives accuracy {at_zero[0]:.4f}, not the clean "
                    f"accuracy {clean:.4f}: the attack changes unperturbed inputs.")
  for lo, hi in zip(sweep, sweep[1:]):
    if hi["acc"] > lo["acc"] + tolerance:
      warnings.append(f"PGD accuracy increases with eps: {lo['acc']:.4f} at eps="
                      f"{lo['eps']:.4g} but {hi['acc']:.4f} at eps={hi['eps']:.4g} "
                      f"({weak_attack}).")
  measured = [name for name in stages.STAGES
              if accuracies.get(stages.STAGES[name].result_key) is not None]
  for strong, weak in stages.ordering(measured):
    high, low = accuracies[strong.result_key], accuracies[weak.result_key]
    if high > low + tolerance:
      warnings.append(f"{strong.text_name} accuracy {high:.4f} exceeds "
                      f"{weak.text_name} accuracy {low:.4f}: the stronger "
                      f"attack is weaker ({stronger}).")
  large = sanity.get("large_eps_pgd_acc")
  if large is not None and large > large_eps_max_acc:
    warnings.append(f"PGD at eps={sanity['large_eps']:g} leaves accuracy {large:.4f} "
                    f"(> {large_eps_max_acc}): {constant}.")
  zero = sanity.get("zero_grad_fraction")
  if zero is not None and zero > zero_grad_max_fraction:
    warnings.append(f"{100 * zero:.1f}% of examples have an all-zero input gradient "
                    f"of the CE loss: {zero_cause}.")
  return warnings


def non_finite_warnings(non_finite: Mapping[str, int]) -> List[str]:
  """One warning naming the stages whose attacks met NaN or inf (none: [])."""
  met = {stage: n for stage, n in non_finite.items() if n}
  if not met:
    return []
  listed = ", ".join(f"{stage}: {n}" for stage, n in met.items())
  return [f"non-finite values (NaN or inf in the logits or the input gradients) met "
          f"under attack, examples per stage: {listed}. These examples count as not "
          "robust; the accuracies say more about the model's numerics than about its "
          "robustness (look for a log, a division or an overflow off the data)."]
